//! A complete small service on `messaging`: `POST /greetings` stores a greeting
//! and its event in one transaction (the outbox); the relay publishes the event;
//! a consumer of `greetings.audit` records each event exactly once (the inbox).
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   cargo run -p messaging --example greetings
//! curl -d ada 127.0.0.1:3000/greetings; curl 127.0.0.1:3000/readyz
//! ```

use axum::{Router, extract::State, http::StatusCode, routing::get, routing::post};
use messaging::{
    AmqpSettings, ApplyError, BoxFuture, InboxHandler, IncomingMessage, NewMessage, QueueSpec,
    Runtime, Topology,
};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TABLES: &str =
    "CREATE TABLE IF NOT EXISTS greetings (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS audit (message_id TEXT NOT NULL, name TEXT NOT NULL);";

fn topology() -> Topology {
    let audit = QueueSpec::new("greetings.audit", "greetings.dlx").bind("greetings", "greeting.#");
    Topology::single_queue("greetings", "greetings.dlx", audit)
}

/// Stores the greeting and its event together: both commit, or neither.
async fn greet(State(pool): State<PgPool>, name: String) -> Result<StatusCode, StatusCode> {
    let fail = |e: sqlx::Error| {
        tracing::error!(error = %e, "greeting not stored");
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut tx = pool.begin().await.map_err(fail)?;
    sqlx::query("INSERT INTO greetings (name) VALUES ($1)")
        .bind(&name)
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
    let event = NewMessage::new(
        "greetings",
        "greeting.created",
        "example.Greeting",
        name.into_bytes(),
    );
    messaging::enqueue(&mut tx, event).await.map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(StatusCode::ACCEPTED)
}

/// Records each greeting event once, however often it is delivered.
struct Audit;

impl InboxHandler for Audit {
    type Event = String;
    type Output = ();

    fn decode(&self, message: &IncomingMessage) -> Result<String, String> {
        String::from_utf8(message.payload.clone()).map_err(|e| format!("not UTF-8: {e}"))
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
        name: &'a String,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO audit (message_id, name) VALUES ($1, $2)")
                .bind(&message.message_id)
                .bind(name)
                .execute(tx)
                .await?;
            Ok(())
        })
    }
}

/// Runs the service on `listener` until `shutdown` fires, then stops in order.
async fn serve(
    pool: PgPool,
    amqp: AmqpSettings,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    sqlx::raw_sql(TABLES).execute(&pool).await?;
    let runtime = Runtime::builder(pool.clone(), amqp)
        .topology(topology())
        .consume_inbox("greetings.audit", Audit)
        .start(shutdown.clone())
        .await?;
    let probe = runtime.probe();
    let readyz = move || async move {
        let failing: Vec<_> = probe.checks().into_iter().filter(|c| !c.ok).collect();
        let status = match failing.is_empty() {
            true => StatusCode::OK,
            false => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, format!("{failing:?}"))
    };
    let app = Router::new()
        .route("/greetings", post(greet))
        .route("/readyz", get(readyz))
        .with_state(pool);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    runtime.join().await;
    Ok(served?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt::init();
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    let amqp = AmqpSettings::from_url(&std::env::var("AMQP_URL")?)?;
    let listener = tokio::net::TcpListener::bind(
        std::env::var("HTTP_ADDR").unwrap_or("127.0.0.1:3000".into()),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::signal::ctrl_c().await.ok();
        stop.cancel()
    });
    serve(pool, amqp, listener, shutdown).await
}

#[cfg(test)]
mod tests;
