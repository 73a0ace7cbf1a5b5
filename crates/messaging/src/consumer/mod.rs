//! The consumer runtime: subscribes a [`Handler`] to a queue and settles every
//! delivery exactly once according to the handler's [`Outcome`].
//!
//! ```text
//!  delivery ─▶ envelope check ──bad──▶ DLQ (reason) ─▶ ack
//!                 │ ok
//!                 ▼
//!          handler (span "process <queue>", child of the message's trace)
//!     Ack ─▶ ack
//!     Retry ─▶ attempts left? ─yes─▶ Q.retry.<delay> (attempt+1) ─▶ ack
//!                             └─no──▶ DLQ (reason, attempts) ─▶ ack
//!     Reject / panic-free permanent failure ─▶ DLQ (reason) ─▶ ack
//!     Unavailable (a dependency is down) ─▶ pause; the message waits, unsettled
//!     no answer within the handler deadline ─▶ Retry (counted as timed out)
//! ```
//!
//! Pausing is a kill switch for outages: when a handler says a dependency is
//! unavailable (database unreachable, pool timed out), the runtime takes no new
//! deliveries (the rest stays in the queue, in order), holds the ones it has,
//! probes [`Handler::ready`] with backoff and, once it answers, runs the held
//! messages again and resumes. No retry budget is spent on an outage, so nothing
//! is dead-lettered because a database was away, however long.
//!
//! Moving a message (to a retry queue or the DLQ) is a confirmed publish followed
//! by the ack (published on [`ConsumerOptions::publisher`], another connection,
//! so a broker alarm that blocks publishing does not stop this one's acks), so a crash in between duplicates, never loses; inbox dedup absorbs
//! the duplicate. If the move fails the delivery is nacked back to the queue, where
//! the queue's `x-delivery-limit` bounds how often that can happen.
//!
//! The runtime re-subscribes by itself after a reconnect and after a broker-side
//! cancel (queue deleted), re-declaring the queue first. On shutdown it cancels the
//! subscription, lets in-flight handlers finish and settle, then closes its channel
//! (anything prefetched but not started returns to the queue).

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use opentelemetry::Context;
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field::Empty};

use crate::{
    Backoff, Broker, Heartbeat, Histogram, OutgoingMessage, PublishError, Publisher, QueueSpec,
    propagation,
};

mod batch;
mod unsettled;

use unsettled::Subscription;

/// Upper bound for one ack, nack or channel close: the client library can leave
/// such a call pending forever when the connection dies under it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound for opening a channel, declaring the queue and subscribing.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound for one [`Handler::ready`] probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs of one delivery answered `Unavailable` right after a probe said the
/// dependency answers again, before the runtime stops believing it is an outage
/// and spends the message's retry budget instead (a failure that only this
/// message meets, or a probe that cannot see the problem).
const UNAVAILABLE_AFTER_RESUME: u32 = 5;

/// Header names the runtime writes when it moves a message.
pub mod headers {
    /// Handler runs that already failed (on messages in retry queues and DLQs).
    pub const RETRY_COUNT: &str = "x-retry-count";
    /// The last transient failure.
    pub const LAST_ERROR: &str = "x-last-error";
    /// Why the runtime dead-lettered the message.
    pub const DEATH_REASON: &str = "x-death-reason";
    /// Handler runs made before dead-lettering.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Where the message was first published, kept across retries.
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// The queue whose consumer gave up on the message.
    pub const FAILED_QUEUE: &str = "x-failed-queue";
    /// When the runtime dead-lettered the message (RFC 3339, microseconds, UTC):
    /// the order of a DLQ, which a quorum queue does not keep for messages an
    /// operator looked at and returned.
    pub const DEAD_LETTERED_AT: &str = "x-dead-lettered-at";
    /// Why, as a class: `poison`, `rejected` or `exhausted` ([`super::DeathClass`]).
    pub const DEATH_CLASS: &str = "x-death-class";
    /// Times the message was sent back from its DLQ to its queue.
    pub const REDRIVE_COUNT: &str = "x-redrive-count";
}

/// Why a message was dead-lettered, in the few classes an operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathClass {
    /// The envelope itself is unusable (no message id or type, body too large).
    Poison,
    /// The handler refused it as permanently wrong (bad payload, unknown type,
    /// broken invariant).
    Rejected,
    /// Transient failures used up every retry.
    Exhausted,
}

impl DeathClass {
    pub const ALL: [Self; 3] = [Self::Poison, Self::Rejected, Self::Exhausted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Poison => "poison",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == value)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the handler decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or already done): acknowledge.
    Ack,
    /// A transient failure: try again later, with a growing delay.
    Retry(String),
    /// A permanent failure (bad payload, unknown type, invariant broken): DLQ now.
    Reject(String),
    /// A dependency of the handler is unavailable (not the message's fault): the
    /// consumer pauses until [`Handler::ready`] answers, then runs it again.
    Unavailable(String),
}

impl Outcome {
    /// The outcome of a database failure: [`Outcome::Unavailable`] when the
    /// database cannot be used at all ([`crate::availability::is_unavailable`]),
    /// else [`Outcome::Retry`].
    pub fn database(error: &sqlx::Error) -> Self {
        let reason = format!("database: {error}");
        if crate::availability::is_unavailable(error) {
            Self::Unavailable(reason)
        } else {
            Self::Retry(reason)
        }
    }
}

/// A delivery whose envelope has been checked.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    pub queue: String,
    pub message_id: String,
    pub message_type: String,
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub headers: FieldTable,
    pub correlation_id: Option<String>,
    pub app_id: Option<String>,
    pub timestamp: Option<u64>,
    /// 1 on the first handler run; grows with each retry.
    pub attempt: u32,
    /// Times an operator sent the message back from its DLQ.
    pub redrives: u32,
    /// The broker redelivered it (a previous consumer died before settling).
    pub redelivered: bool,
    /// The producer's trace context (empty when absent or malformed).
    pub trace_context: Context,
    /// This delivery's consumer span (`process <queue>`, a child of
    /// `trace_context`). [`Handler::handle`] already runs inside it; a
    /// [`Handler::handle_batch`] runs each message's work in its own.
    pub span: tracing::Span,
}

/// Processes one message. Runs inside the consumer span; must not assume it runs
/// only once per message (use the inbox for effects).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: IncomingMessage) -> impl Future<Output = Outcome> + Send;

    /// Processes the deliveries that were ready together (at most
    /// [`ConsumerOptions::batch`]), answering one [`Outcome`] per message, in
    /// order. A handler overrides it to share work between them, e.g. one
    /// database transaction ([`crate::InboxConsumer`]). The default handles them
    /// one after the other, each in its span.
    fn handle_batch(
        &self,
        messages: Vec<IncomingMessage>,
    ) -> impl Future<Output = Vec<Outcome>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(messages.len());
            for message in messages {
                let span = message.span.clone();
                outcomes.push(self.handle(message).instrument(span).await);
            }
            outcomes
        }
    }

    /// Whether the handler's dependencies answer again, asked while the consumer
    /// is paused after [`Outcome::Unavailable`]. The default says yes, so the
    /// held messages are simply tried again after the backoff.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
}

#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Unacknowledged deliveries the broker may push ahead (basic.qos).
    pub prefetch: u16,
    /// Handler runs (of one message or one batch) at once.
    pub concurrency: usize,
    /// Most deliveries handed to one [`Handler::handle_batch`]: those already
    /// received when a handler slot frees, so a batch never waits to fill up.
    /// 1 hands every delivery to [`Handler::handle`] alone.
    pub batch: usize,
    /// Name stamped on moved messages and the consumer tag.
    pub app_id: String,
    /// Delay between re-subscribe attempts.
    pub backoff: Backoff,
    /// Larger bodies are dead-lettered unread (no handler is asked to decode them).
    pub max_body: usize,
    /// A handler run that takes longer is abandoned and retried (and counted).
    pub handler_timeout: Duration,
    /// Publishes retries and dead letters; `None` publishes on the consuming
    /// connection. Give it a publisher on another connection: a broker alarm
    /// blocks every connection that publishes, acks included.
    pub publisher: Option<Publisher>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 32,
            concurrency: 8,
            batch: 1,
            app_id: "shop".to_owned(),
            backoff: Backoff::default(),
            max_body: 1024 * 1024,
            handler_timeout: Duration::from_secs(30),
            publisher: None,
        }
    }
}

/// Counters of one consumer since startup.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// `dead_lettered` by [`DeathClass`].
    dead_lettered_by_class: [AtomicU64; 3],
    /// First runs of messages an operator sent back from the DLQ.
    pub redriven: AtomicU64,
    /// Deliveries sent back to the queue because settling failed.
    pub requeued: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Handler runs abandoned at the handler deadline (then retried).
    pub timed_out: AtomicU64,
    /// Times the consumer paused because a dependency was unavailable.
    pub pauses: AtomicU64,
    /// Handler run times, seconds; a batch's run counts once for each of its
    /// messages.
    pub handler_duration: Histogram,
}

impl ConsumerStats {
    /// Messages dead-lettered for `class` since startup.
    pub fn dead_lettered_as(&self, class: DeathClass) -> u64 {
        self.dead_lettered_by_class[class.index()].load(Ordering::Relaxed)
    }
}

/// A running consumer.
#[derive(Debug)]
pub struct ConsumerHandle {
    queue: String,
    subscribed: Arc<AtomicBool>,
    stats: Arc<ConsumerStats>,
    gate: watch::Receiver<Option<String>>,
    heartbeat: Heartbeat,
    task: tokio::task::JoinHandle<()>,
}

/// A cheap, cloneable view of a running consumer (for readiness and metrics).
#[derive(Clone, Debug)]
pub struct ConsumerProbe {
    pub queue: String,
    subscribed: Arc<AtomicBool>,
    pub stats: Arc<ConsumerStats>,
    gate: watch::Receiver<Option<String>>,
    heartbeat: Heartbeat,
}

impl ConsumerProbe {
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Why the consumer is paused, while it is.
    pub fn paused(&self) -> Option<String> {
        self.gate.borrow().clone()
    }

    /// The consumer loop's proof of life (liveness, not readiness).
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

impl ConsumerHandle {
    pub fn probe(&self) -> ConsumerProbe {
        ConsumerProbe {
            queue: self.queue.clone(),
            subscribed: self.subscribed.clone(),
            stats: self.stats.clone(),
            gate: self.gate.clone(),
            heartbeat: self.heartbeat.clone(),
        }
    }

    /// True while subscribed to its queue (for readiness).
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Waits until the consumer stopped (after its shutdown token fired).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Runtime<H> {
    broker: Broker,
    publisher: Publisher,
    queue: QueueSpec,
    options: ConsumerOptions,
    handler: Arc<H>,
    subscribed: Arc<AtomicBool>,
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
    /// `Some(reason)` while paused for an unavailable dependency.
    gate: watch::Sender<Option<String>>,
    heartbeat: Heartbeat,
}

/// Starts consuming `queue` with `handler` until `shutdown` fires.
pub fn spawn_consumer<H: Handler>(
    broker: Broker,
    queue: QueueSpec,
    options: ConsumerOptions,
    handler: H,
    shutdown: CancellationToken,
) -> ConsumerHandle {
    let subscribed = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ConsumerStats::default());
    let (gate, gate_view) = watch::channel(None);
    let heartbeat = Heartbeat::default();
    let runtime = Arc::new(Runtime {
        publisher: options
            .publisher
            .clone()
            .unwrap_or_else(|| Publisher::new(broker.clone(), options.app_id.clone())),
        broker,
        queue: queue.clone(),
        options,
        handler: Arc::new(handler),
        subscribed: subscribed.clone(),
        stats: stats.clone(),
        shutdown,
        gate,
        heartbeat: heartbeat.clone(),
    });
    ConsumerHandle {
        queue: queue.name,
        subscribed,
        stats,
        gate: gate_view,
        heartbeat,
        task: tokio::spawn(runtime.run()),
    }
}

/// Why waiting at the pause gate ended.
enum Gate {
    Open,
    Shutdown,
    /// The connection the delivery came on is gone.
    Lost,
}

/// How a delivery is settled once its handler gave a final answer.
enum Verdict {
    Ack,
    Retry(String),
    Reject(String),
}

enum End {
    Shutdown,
    /// The broker cancelled the subscription (queue deleted) or the stream ended.
    Cancelled,
    Failed(lapin::Error),
    /// The connection went away (the stream may not have noticed yet).
    Lost,
}

impl<H: Handler> Runtime<H> {
    async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            self.heartbeat.beat();
            let link = loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    link = self.broker.connected() => match link { Some(l) => break l, None => return },
                    () = self.heartbeat.sleep(Duration::from_secs(1)) => {}
                }
            };
            let Some(connection) = link.connection else {
                continue;
            };
            let generation = link.generation;
            let subscribed = tokio::select! {
                subscribed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.subscribe(&connection)) => match subscribed {
                    Ok(subscribed) => subscribed.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {SUBSCRIBE_TIMEOUT:?}")),
                },
                () = self.broker.lost(generation) => Err("the connection was lost while subscribing".to_owned()),
                () = self.shutdown.cancelled() => return,
            };
            match subscribed {
                Err(error) => {
                    tracing::warn!(queue = %self.queue.name, %error, "subscribe failed; retrying");
                }
                Ok((channel, consumer)) => {
                    failures = 0;
                    self.subscribed.store(true, Ordering::Relaxed);
                    self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(queue = %self.queue.name, "consumer subscribed");
                    let mut in_flight = JoinSet::new();
                    let end = tokio::select! {
                        end = self.consume(consumer, &mut in_flight, generation) => end,
                        () = self.broker.lost(generation) => End::Lost,
                    };
                    self.subscribed.store(false, Ordering::Relaxed);
                    match &end {
                        End::Shutdown => {
                            let cancel = channel.basic_cancel(
                                self.tag(&channel).as_str().into(),
                                BasicCancelOptions::default(),
                            );
                            let _ = tokio::time::timeout(SETTLE_TIMEOUT, cancel).await;
                        }
                        End::Cancelled if connection.status().connected() => tracing::warn!(
                            queue = %self.queue.name,
                            "subscription cancelled by the broker (queue deleted?); re-declaring and re-subscribing"
                        ),
                        End::Cancelled => {}
                        End::Failed(error) => {
                            tracing::warn!(queue = %self.queue.name, %error, "consumer stream failed; re-subscribing");
                        }
                        End::Lost => {
                            tracing::warn!(queue = %self.queue.name, "connection lost; re-subscribing after reconnect");
                        }
                    }
                    if matches!(end, End::Shutdown) {
                        // In-flight handlers finish and settle before the channel goes.
                        while in_flight.join_next().await.is_some() {}
                        let _ = tokio::time::timeout(
                            SETTLE_TIMEOUT,
                            channel.close(200, "consumer stopped".into()),
                        )
                        .await;
                        tracing::info!(queue = %self.queue.name, "consumer stopped");
                        return;
                    }
                    // The old channel is gone: its deliveries come back to whoever
                    // subscribes next, so do not wait for their settlement here.
                    in_flight.detach_all();
                }
            }
            let delay = self.options.backoff.delay(failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = self.heartbeat.sleep(delay) => {}
            }
        }
    }

    fn tag(&self, channel: &Channel) -> String {
        format!(
            "{}.{}.{}",
            self.options.app_id,
            self.queue.name,
            channel.id()
        )
    }

    async fn subscribe(
        &self,
        connection: &lapin::Connection,
    ) -> lapin::Result<(Channel, lapin::Consumer)> {
        // Re-declaring makes a deleted queue come back with its bindings.
        self.queue.declare(connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.options.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.name.as_str().into(),
                self.tag(&channel).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }

    async fn consume(
        self: &Arc<Self>,
        mut consumer: lapin::Consumer,
        in_flight: &mut JoinSet<()>,
        generation: u64,
    ) -> End {
        let limit = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let subscription = Arc::new(Subscription::new(generation));
        loop {
            self.heartbeat.beat();
            while in_flight.try_join_next().is_some() {}
            // While paused no new delivery is taken: what the broker has not
            // pushed yet stays in the queue, in order.
            match self.resumed(generation).await {
                Gate::Open => {}
                Gate::Shutdown => return End::Shutdown,
                Gate::Lost => return End::Lost,
            }
            let permit = tokio::select! {
                () = self.shutdown.cancelled() => return End::Shutdown,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return End::Shutdown,
                },
                // Every handler slot busy is alive too.
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return End::Shutdown,
                next = consumer.next() => next,
                // Idle is alive: beat, and look at the gate again.
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            let first = match next {
                None => return End::Cancelled,
                Some(Err(error)) => return End::Failed(error),
                Some(Ok(delivery)) => delivery,
            };
            subscription.taken(first.delivery_tag);
            let mut deliveries = vec![first];
            // What else has arrived joins the batch; nothing is waited for.
            let mut ended = None;
            while deliveries.len() < self.options.batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => {
                        subscription.taken(delivery.delivery_tag);
                        deliveries.push(delivery);
                    }
                    Some(Some(Err(error))) => {
                        ended = Some(End::Failed(error));
                        break;
                    }
                    Some(None) => {
                        ended = Some(End::Cancelled);
                        break;
                    }
                    None => break,
                }
            }
            let runtime = self.clone();
            let subscription = subscription.clone();
            in_flight.spawn(async move {
                if deliveries.len() == 1 {
                    let delivery = deliveries.pop().expect("one delivery");
                    runtime.process(&delivery, &subscription, true).await;
                } else {
                    runtime.process_batch(deliveries, &subscription).await;
                }
                drop(permit);
            });
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// Waits while the consumer is paused. Ends early on shutdown or when the
    /// connection of `generation` is gone (a held delivery then returns to the
    /// queue when its channel closes, unsettled by us).
    async fn resumed(&self, generation: u64) -> Gate {
        let mut gate = self.gate.subscribe();
        if gate.borrow_and_update().is_none() {
            return Gate::Open;
        }
        tokio::select! {
            () = self.shutdown.cancelled() => Gate::Shutdown,
            () = self.broker.lost(generation) => Gate::Lost,
            open = gate.wait_for(Option::is_none) => if open.is_ok() { Gate::Open } else { Gate::Shutdown },
        }
    }

    /// Closes the gate for `reason`; the first to close it starts the probe.
    fn pause(self: &Arc<Self>, reason: &str) {
        let closed_now = self.gate.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason.to_owned());
                true
            } else {
                false
            }
        });
        if closed_now {
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(queue = %self.queue.name, %reason, "a dependency is unavailable; consumer paused, messages stay in the queue");
            let runtime = self.clone();
            tokio::spawn(async move { runtime.probe_until_ready().await });
        }
    }

    /// Asks [`Handler::ready`] with backoff until it answers, then reopens the gate.
    async fn probe_until_ready(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let delay = self
                .options
                .backoff
                .delay(attempt)
                .max(Duration::from_millis(100));
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = self.heartbeat.sleep(delay) => {}
            }
            match tokio::time::timeout(PROBE_TIMEOUT, self.handler.ready()).await {
                Ok(Ok(())) => {
                    self.gate.send_replace(None);
                    tracing::info!(queue = %self.queue.name, probes = attempt + 1, "dependency answers again; consumer resumed");
                    return;
                }
                Ok(Err(reason)) => {
                    tracing::debug!(queue = %self.queue.name, %reason, "dependency still unavailable");
                }
                Err(_) => {
                    tracing::debug!(queue = %self.queue.name, "dependency probe timed out");
                }
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// Runs one delivery's handler until it gives a final answer, then settles
    /// it. `first_run` is false when a batch already counted the run.
    async fn process(
        self: &Arc<Self>,
        delivery: &Delivery,
        subscription: &Subscription,
        mut first_run: bool,
    ) {
        let mut unavailable_after_resume = 0u32;
        let (outcome, attempt, span) = loop {
            let waited = self.gate.borrow().is_some();
            if !matches!(self.resumed(subscription.generation).await, Gate::Open) {
                return;
            }
            let message = match self.envelope(delivery) {
                Ok(message) => message,
                Err(reason) => {
                    tracing::warn!(queue = %self.queue.name, %reason, "poison message; dead-lettering");
                    self.dead_letter(delivery, &reason, 0, DeathClass::Poison, subscription)
                        .await;
                    return;
                }
            };
            let span = message.span.clone();
            let attempt = message.attempt;
            if std::mem::take(&mut first_run) {
                self.count_redriven(&message);
            }
            let started = Instant::now();
            let run = AssertUnwindSafe(self.handler.handle(message).instrument(span.clone()))
                .catch_unwind();
            let deadline = self.options.handler_timeout;
            let outcome = match tokio::time::timeout(deadline, run).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Outcome::Retry("handler panicked".to_owned()),
                Err(_) => {
                    self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(parent: &span, queue = %self.queue.name, ?deadline, "handler deadline passed; abandoning the run");
                    Outcome::Retry(format!("handler did not finish within {deadline:?}"))
                }
            };
            self.stats
                .handler_duration
                .observe(started.elapsed().as_secs_f64());
            let verdict = match outcome {
                Outcome::Unavailable(reason)
                    if unavailable_after_resume < UNAVAILABLE_AFTER_RESUME =>
                {
                    unavailable_after_resume += u32::from(waited);
                    span.record("shop.outcome", "paused");
                    self.pause(&reason);
                    continue;
                }
                Outcome::Unavailable(reason) => Verdict::Retry(format!(
                    "{reason} (still failing after the dependency answered again {UNAVAILABLE_AFTER_RESUME} times)"
                )),
                Outcome::Ack => Verdict::Ack,
                Outcome::Retry(reason) => Verdict::Retry(reason),
                Outcome::Reject(reason) => Verdict::Reject(reason),
            };
            break (verdict, attempt, span);
        };
        self.settle(delivery, outcome, attempt, subscription)
            .instrument(span)
            .await;
    }

    /// A first run of a message an operator sent back from the DLQ.
    fn count_redriven(&self, message: &IncomingMessage) {
        if message.redrives > 0 && message.attempt == 1 {
            self.stats.redriven.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Settles a delivery the handler gave a final answer for (in its span).
    async fn settle(
        &self,
        delivery: &Delivery,
        verdict: Verdict,
        attempt: u32,
        subscription: &Subscription,
    ) {
        match verdict {
            Verdict::Ack => {
                tracing::Span::current().record("shop.outcome", "ack");
                crate::faults::crash_point(crate::faults::points::CONSUMER_BEFORE_ACK);
                self.ack(delivery, subscription).await;
            }
            Verdict::Retry(reason) if attempt < self.queue.retry.max_attempts => {
                tracing::Span::current().record("shop.outcome", "retry");
                self.retry(delivery, &reason, attempt, subscription).await;
            }
            Verdict::Retry(reason) => {
                tracing::Span::current().record("shop.outcome", "dead-lettered");
                let reason = format!("gave up after {attempt} attempts: {reason}");
                self.dead_letter(
                    delivery,
                    &reason,
                    attempt,
                    DeathClass::Exhausted,
                    subscription,
                )
                .await;
            }
            Verdict::Reject(reason) => {
                tracing::Span::current().record("shop.outcome", "dead-lettered");
                self.dead_letter(
                    delivery,
                    &reason,
                    attempt,
                    DeathClass::Rejected,
                    subscription,
                )
                .await;
            }
        }
    }

    /// Checks what every message must carry; a failure is permanent.
    fn envelope(&self, delivery: &Delivery) -> Result<IncomingMessage, String> {
        let properties = &delivery.properties;
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or("missing message_id")?;
        let message_type = properties
            .kind()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or("missing type")?;
        if delivery.data.len() > self.options.max_body {
            return Err(format!(
                "body of {} bytes exceeds the limit of {} bytes",
                delivery.data.len(),
                self.options.max_body
            ));
        }
        let headers = properties.headers().clone().unwrap_or_default();
        let retried = header_u32(&headers, headers::RETRY_COUNT).unwrap_or(0);
        let redrives = header_u32(&headers, headers::REDRIVE_COUNT).unwrap_or(0);
        let exchange = header_str(&headers, headers::ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| delivery.exchange.as_str().to_owned());
        let routing_key = header_str(&headers, headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
        let mut message = IncomingMessage {
            queue: self.queue.name.clone(),
            trace_context: propagation::extract(Some(&headers)),
            message_id,
            message_type,
            exchange,
            routing_key,
            payload: delivery.data.clone(),
            headers,
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            app_id: properties.app_id().as_ref().map(|s| s.as_str().to_owned()),
            timestamp: *properties.timestamp(),
            attempt: retried.saturating_add(1),
            redrives,
            redelivered: delivery.redelivered,
            span: tracing::Span::none(),
        };
        message.span = consumer_span(&message);
        propagation::set_parent(&message.span, message.trace_context.clone());
        propagation::tag_correlation(&message.span, message.correlation_id.as_deref());
        Ok(message)
    }

    async fn ack(&self, delivery: &Delivery, subscription: &Subscription) {
        let ack = delivery.acker.ack(BasicAckOptions::default());
        match tokio::time::timeout(SETTLE_TIMEOUT, ack).await {
            Ok(Ok(_)) => {
                subscription.settled([delivery.delivery_tag]);
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => tracing::warn!(
                queue = %self.queue.name, %error,
                "ack failed; the broker redelivers the message once its channel closes"
            ),
            Err(_) => tracing::warn!(
                queue = %self.queue.name,
                "ack timed out; the broker redelivers the message once its channel closes"
            ),
        }
    }

    async fn requeue(&self, delivery: &Delivery, why: &str, subscription: &Subscription) {
        self.stats.requeued.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(queue = %self.queue.name, why, "returning the message to its queue");
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        match tokio::time::timeout(SETTLE_TIMEOUT, delivery.acker.nack(options)).await {
            Ok(Ok(_)) => subscription.settled([delivery.delivery_tag]),
            Ok(Err(error)) => {
                tracing::warn!(queue = %self.queue.name, %error, "nack failed; the broker redelivers the message once its channel closes");
            }
            Err(_) => {
                tracing::warn!(queue = %self.queue.name, "nack timed out; the broker redelivers the message once its channel closes")
            }
        }
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        reason: &str,
        attempt: u32,
        subscription: &Subscription,
    ) {
        let delay = self
            .queue
            .retry
            .delay_after(attempt)
            .unwrap_or(Duration::from_secs(1));
        let mut copy = self.copy(delivery, "", &self.queue.retry_queue_name(delay));
        set_header(
            &mut copy.headers,
            headers::RETRY_COUNT,
            AMQPValue::LongLongInt(i64::from(attempt)),
        );
        set_str(&mut copy.headers, headers::LAST_ERROR, reason);
        tracing::info!(queue = %self.queue.name, attempt, ?delay, %reason, "transient failure; retrying later");
        match self.publish_move(&copy, subscription.generation).await {
            Ok(()) => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                self.ack(delivery, subscription).await;
            }
            Err(error) => {
                self.requeue(
                    delivery,
                    &format!("scheduling the retry failed: {error}"),
                    subscription,
                )
                .await
            }
        }
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
        class: DeathClass,
        subscription: &Subscription,
    ) {
        let mut copy = self.copy(delivery, &self.queue.dead_letter_exchange, &self.queue.name);
        set_str(&mut copy.headers, headers::DEATH_REASON, reason);
        set_str(&mut copy.headers, headers::DEATH_CLASS, class.as_str());
        set_str(
            &mut copy.headers,
            headers::DEAD_LETTERED_AT,
            &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
        set_header(
            &mut copy.headers,
            headers::ATTEMPTS,
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        set_str(&mut copy.headers, headers::FAILED_QUEUE, &self.queue.name);
        tracing::warn!(queue = %self.queue.name, %reason, attempts, "dead-lettering message");
        match self.publish_move(&copy, subscription.generation).await {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                self.stats.dead_lettered_by_class[class.index()].fetch_add(1, Ordering::Relaxed);
                self.ack(delivery, subscription).await;
            }
            Err(error) => {
                self.requeue(
                    delivery,
                    &format!("dead-lettering failed: {error}"),
                    subscription,
                )
                .await
            }
        }
    }

    /// Publishes a retry or dead-letter copy. While the publish connection is down
    /// or blocked by an alarm the delivery is held (unsettled) and the publish
    /// waits: returning the message to the queue would spin it through its
    /// delivery limit in seconds and have the broker dead-letter a healthy
    /// message. Gives up on shutdown or when the connection of `generation`
    /// (the delivery's) is gone.
    async fn publish_move(
        &self,
        copy: &OutgoingMessage,
        generation: u64,
    ) -> Result<(), PublishError> {
        loop {
            match self.publisher.publish(copy).await {
                Err(e @ (PublishError::Blocked | PublishError::NotConnected)) => {
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Err(e),
                        () = self.broker.lost(generation) => return Err(e),
                        () = self.heartbeat.sleep(Duration::from_millis(250)) => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// The delivery as a new message for `exchange`/`routing_key`, envelope and
    /// headers kept, and its first destination remembered.
    fn copy(&self, delivery: &Delivery, exchange: &str, routing_key: &str) -> OutgoingMessage {
        let properties = &delivery.properties;
        let mut headers = properties.headers().clone().unwrap_or_default();
        if header_str(&headers, headers::ORIGINAL_EXCHANGE).is_none() {
            set_str(
                &mut headers,
                headers::ORIGINAL_EXCHANGE,
                delivery.exchange.as_str(),
            );
            set_str(
                &mut headers,
                headers::ORIGINAL_ROUTING_KEY,
                delivery.routing_key.as_str(),
            );
        }
        // The trace context travels as a header already; keep it as it was.
        let parent = propagation::extract(Some(&headers));
        let mut message = OutgoingMessage::new(
            exchange,
            routing_key,
            properties
                .kind()
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or_default(),
            delivery.data.clone(),
        );
        message.message_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        message.content_type = properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        message.correlation_id = properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned());
        message.timestamp = *properties.timestamp();
        message.app_id = properties.app_id().as_ref().map(|s| s.as_str().to_owned());
        message.headers = headers;
        message.parent = Some(parent);
        message
    }
}

fn consumer_span(message: &IncomingMessage) -> tracing::Span {
    tracing::info_span!(
        "process",
        otel.name = %format!("process {}", message.queue),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %message.exchange,
        messaging.destination.subscription.name = %message.queue,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = %message.message_id,
        messaging.message.conversation_id = message.correlation_id.as_deref(),
        messaging.message.body.size = message.payload.len(),
        shop.message_type = %message.message_type,
        shop.attempt = message.attempt,
        shop.outcome = Empty,
    )
}

fn set_header(headers: &mut FieldTable, key: &str, value: AMQPValue) {
    headers.insert(key.into(), value);
}

fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    // Bound what a reason can add to a message.
    let value: String = value.chars().take(1024).collect();
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

/// A string header, however the producer encoded it.
pub fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A non-negative integer header, however the producer encoded it.
pub fn header_u32(headers: &FieldTable, key: &str) -> Option<u32> {
    let value: i64 = match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(value).ok()
}
