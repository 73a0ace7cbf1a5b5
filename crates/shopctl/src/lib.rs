//! `shopctl`, the shop's operator tool.
//!
//! ```text
//!  cli      flags and environment (AMQP_URL, ORDER_URL, ...)
//!  dlq      dead letters: list, show, redrive, purge (messaging::dead_letters)
//!  orders   stuck orders; one order's timeline across the three services
//!  outbox   parked outbox rows of a service database (messaging::parked)
//!  stock    stock levels set through inventory-service
//!  token    the bearer token of API calls; `token` mints a development one
//!  api      the services' HTTP APIs, with errors naming the service
//!  output   tables for people, JSON for scripts
//! ```
//!
//! Every failure is one line on stderr and exit code 1; a usage error is
//! clap's message and exit code 2.

mod api;
mod cli;
mod dlq;
mod orders;
mod outbox;
mod output;
mod stock;
mod token;

use std::process::ExitCode;

use clap::Parser;

pub use cli::{Cli, VARIABLES};

/// Why a command failed; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    DeadLetters(#[from] messaging::DeadLetterError),
    #[error(transparent)]
    Database(#[from] service_kit::database::DatabaseError),
    #[error(transparent)]
    Parked(#[from] messaging::parked::ParkedError),
    #[error("{service} unreachable at {url}: {reason}")]
    Unreachable {
        service: &'static str,
        url: String,
        reason: String,
    },
    #[error("{service} answered {status} to {url}: {detail}")]
    Http {
        service: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("unknown order {0}")]
    UnknownOrder(String),
    #[error("no dead letter {id} in {dlq}")]
    UnknownMessage { id: String, dlq: String },
    /// An operation stopped part-way; the line says what moved and what stayed.
    #[error("{0}")]
    Interrupted(String),
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = service_kit::config::crash_point_supported(&service_kit::config::ProcessEnv) {
        eprintln!("shopctl: {e}");
        return ExitCode::FAILURE;
    }
    service_kit::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shopctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shopctl: {e}");
            ExitCode::FAILURE
        }
    }
}

pub async fn run(cli: Cli) -> Result<(), Error> {
    match &cli.command {
        cli::Command::Dlq(command) => dlq::run(&cli, command).await,
        cli::Command::Orders(cli::Orders::Stuck { older_than, limit }) => {
            orders::stuck(
                &cli,
                *older_than,
                usize::try_from(*limit).unwrap_or(usize::MAX),
            )
            .await
        }
        cli::Command::Order { id } => orders::timeline(&cli, id).await,
        cli::Command::Outbox(command) => outbox::run(&cli, command).await,
        cli::Command::Stock(cli::Stock::Set { levels }) => stock::set(&cli, levels).await,
        cli::Command::Token(args) => {
            let scopes: Vec<String> = args
                .scopes
                .iter()
                .flat_map(|s| s.split_whitespace())
                .map(str::to_owned)
                .collect();
            let (token, expires) = token::mint(
                &args.key,
                &token::Claims {
                    subject: &args.sub,
                    scopes: &scopes,
                    issuer: &args.issuer,
                    audience: &args.audience,
                    kid: &args.kid,
                    ttl: args.ttl,
                },
            )?;
            if cli.json {
                output::print_json(&serde_json::json!({"token": token, "expires_at": expires}));
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}
