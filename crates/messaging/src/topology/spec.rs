//! What a topology is made of, as data: the exchanges, exchange bindings and
//! consumer queues one process declares, each queue's retry policy, and the
//! names its DLQ and retry queues get.

use std::{num::NonZeroU32, time::Duration};

/// Everything one process declares: the exchanges it publishes to, and the
/// queues it consumes with everything they need. Every replica declares the
/// same at startup and after each reconnect; declaring what exists with the
/// same arguments is a no-op.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    /// Exchanges, durable; declared first. Every exchange a queue binds to or
    /// dead-letters into must exist: list it here unless another process
    /// declares it.
    pub exchanges: Vec<ExchangeSpec>,
    /// Exchange-to-exchange bindings, declared after the exchanges.
    pub exchange_bindings: Vec<ExchangeBinding>,
    /// Consumer queues, each with its DLQ and retry queues.
    pub queues: Vec<QueueSpec>,
}

/// How an exchange routes (the AMQP exchange types this crate declares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExchangeType {
    /// By pattern on dot-separated routing keys (`*` one word, `#` any).
    Topic,
    /// To every bound queue, ignoring the routing key.
    Fanout,
    /// To the queues bound with exactly the routing key (the type for a
    /// dead-letter exchange, whose routing key is the failed queue's name).
    Direct,
}

/// A durable exchange to declare.
#[derive(Clone, Debug)]
pub struct ExchangeSpec {
    /// The exchange's name.
    pub name: String,
    /// How it routes.
    pub kind: ExchangeType,
}

/// `source` forwards to `destination` the messages matching `routing_key`.
#[derive(Clone, Debug)]
pub struct ExchangeBinding {
    /// The exchange messages arrive at.
    pub source: String,
    /// The exchange they are forwarded to.
    pub destination: String,
    /// The binding key, interpreted by `source`'s type.
    pub routing_key: String,
}

/// A consumer queue with its bindings, dead-letter target and retry policy.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    /// The queue's name; its DLQ and retry queues are named after it
    /// (`<name>.dlq`, `<name>.retry.<ms>ms`).
    pub name: String,
    /// `(exchange, routing key)` pairs; a fanout exchange ignores the key.
    pub bindings: Vec<(String, String)>,
    /// Exchange receiving this queue's dead letters (routing key = queue name).
    pub dead_letter_exchange: String,
    /// Redeliveries (consumer crashes, requeues) after which the broker itself
    /// dead-letters a message; explicit because 3.x has no default and 4.x has 20.
    pub delivery_limit: u32,
    /// How [`Outcome::Retry`](crate::Outcome::Retry) is retried.
    pub retry: RetryPolicy,
    /// On how many cluster nodes the queue, its DLQ and its retry queues get
    /// replicas when created (`x-quorum-initial-group-size`); `None` leaves it
    /// to the broker. Fixed at creation: a queue that exists with another
    /// size is kept as it is (with a warning); its members are changed with
    /// `rabbitmq-queues grow`/`shrink`.
    pub initial_group_size: Option<NonZeroU32>,
}

/// Transient failures are retried after `delays[attempt - 1]` (the last delay is
/// reused), until `max_attempts` handler runs have failed. The default: 1 s,
/// 5 s, 30 s (then 30 s again), 5 runs in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after each failed run, in order; each distinct delay is a
    /// retry queue of its own (`Q.retry.<ms>ms`). With none there is nowhere
    /// to wait: the first failure dead-letters the message, whatever
    /// `max_attempts` says.
    pub delays: Vec<Duration>,
    /// Handler runs in all, the first included; after this many failed runs
    /// the message is dead-lettered ([`DeathClass::Exhausted`](crate::DeathClass::Exhausted)).
    /// 1 dead-letters at the first failure.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The delay before handler run `attempt + 1`, after run `attempt` (1-based) failed.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.delays.get(index).or(self.delays.last()).copied()
    }

    /// Whether a message whose run `attempt` (1-based) failed is retried:
    /// runs are left and there is a retry queue to wait in.
    pub fn retries_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts && !self.delays.is_empty()
    }
}

impl QueueSpec {
    /// A queue named `name` whose dead letters go through `dead_letter_exchange`
    /// (declare that exchange too, as [`ExchangeType::Direct`]), with no
    /// bindings yet, a delivery limit of 10 and the default [`RetryPolicy`].
    pub fn new(name: impl Into<String>, dead_letter_exchange: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            dead_letter_exchange: dead_letter_exchange.into(),
            delivery_limit: 10,
            retry: RetryPolicy::default(),
            initial_group_size: None,
        }
    }

    /// The same queue, also bound to `exchange` with `routing_key`.
    #[must_use]
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// The same queue with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same queue with another [`QueueSpec::delivery_limit`].
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }

    /// The same queue with another [`QueueSpec::initial_group_size`].
    #[must_use]
    pub fn with_initial_group_size(mut self, size: Option<NonZeroU32>) -> Self {
        self.initial_group_size = size;
        self
    }

    /// The name of its dead-letter queue, `<name>.dlq`.
    pub fn dlq_name(&self) -> String {
        crate::dead_letters::dlq_name(&self.name)
    }

    /// The retry queue that holds a message for `delay`.
    pub fn retry_queue_name(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.name, delay.as_millis())
    }

    /// Every queue [`declare`](Self::declare) creates: the queue, its DLQ and its
    /// retry queues.
    pub fn queue_names(&self) -> Vec<String> {
        let mut delays = self.retry.delays.clone();
        delays.sort();
        delays.dedup();
        [self.name.clone(), self.dlq_name()]
            .into_iter()
            .chain(delays.into_iter().map(|d| self.retry_queue_name(d)))
            .collect()
    }
}

impl Topology {
    /// The same topology with every queue's
    /// [`initial_group_size`](QueueSpec::initial_group_size) set to `size`.
    #[must_use]
    pub fn with_initial_group_size(mut self, size: Option<NonZeroU32>) -> Self {
        for queue in &mut self.queues {
            queue.initial_group_size = size;
        }
        self
    }

    /// One topic exchange, its dead-letter exchange and one queue: the smallest
    /// topology the consumer runtime works on (tests and benchmarks).
    pub fn single_queue(exchange: &str, dead_letter_exchange: &str, queue: QueueSpec) -> Self {
        Self {
            exchanges: vec![
                ExchangeSpec {
                    name: exchange.to_owned(),
                    kind: ExchangeType::Topic,
                },
                ExchangeSpec {
                    name: dead_letter_exchange.to_owned(),
                    kind: ExchangeType::Direct,
                },
            ],
            exchange_bindings: vec![],
            queues: vec![queue],
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{QueueSpec, RetryPolicy};

    #[test]
    fn retry_delay_grows_then_repeats_the_last() {
        let policy = RetryPolicy {
            delays: vec![Duration::from_millis(10), Duration::from_millis(50)],
            max_attempts: 5,
        };
        assert_eq!(policy.delay_after(1), Some(Duration::from_millis(10)));
        assert_eq!(policy.delay_after(2), Some(Duration::from_millis(50)));
        assert_eq!(policy.delay_after(4), Some(Duration::from_millis(50)));
    }

    #[test]
    fn a_policy_without_delays_never_retries() {
        let none = RetryPolicy {
            delays: Vec::new(),
            max_attempts: 5,
        };
        assert!(!none.retries_after(1));
        let some = RetryPolicy::default();
        assert!(some.retries_after(4));
        assert!(!some.retries_after(5));
    }

    #[test]
    fn names_derive_from_the_queue() {
        let q = QueueSpec::new("inventory.order-events", "shop.dlx");
        assert_eq!(q.dlq_name(), "inventory.order-events.dlq");
        assert_eq!(
            q.retry_queue_name(Duration::from_secs(5)),
            "inventory.order-events.retry.5000ms"
        );
    }
}
