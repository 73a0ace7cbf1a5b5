//! The shop's broker topology.
//!
//! Every service declares the *whole* topology, not only its own queue: an event
//! published before its consumer's queue exists would be dropped (or, through the
//! fanout binding, reach only some consumers), so no service may depend on another
//! having started first. Declaring is idempotent, hence the queue arguments must
//! be identical everywhere: the delivery limit is part of the contract, and only
//! a queue's owner declares its retry queues (whose delays are its own config).

use messaging::{ExchangeBinding, ExchangeSpec, ExchangeType, QueueSpec, RetryPolicy, Topology};

use crate::names::{self, keys};

/// Which service's queue to include.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Order,
    Inventory,
    Notification,
}

/// Exchanges and the `shop.events → shop.notifications` binding, owned by all.
pub fn shared() -> Topology {
    Topology {
        exchanges: vec![
            exchange(names::EVENTS_EXCHANGE, ExchangeType::Topic),
            exchange(names::NOTIFICATIONS_EXCHANGE, ExchangeType::Fanout),
            exchange(names::DEAD_LETTER_EXCHANGE, ExchangeType::Direct),
        ],
        exchange_bindings: vec![ExchangeBinding {
            source: names::EVENTS_EXCHANGE.to_owned(),
            destination: names::NOTIFICATIONS_EXCHANGE.to_owned(),
            routing_key: keys::ALL_ORDER.to_owned(),
        }],
        queues: Vec::new(),
    }
}

/// Redeliveries after which the broker dead-letters a message (consumer crashes,
/// requeues); the same on every queue and in every service.
pub const DELIVERY_LIMIT: u32 = 10;

/// The queue a service consumes, with its bindings and the given retry policy.
pub fn queue(owner: Owner, retry: RetryPolicy) -> QueueSpec {
    let spec = match owner {
        Owner::Order => QueueSpec::new(names::ORDER_QUEUE, names::DEAD_LETTER_EXCHANGE)
            .bind(names::EVENTS_EXCHANGE, keys::ALL_INVENTORY),
        Owner::Inventory => QueueSpec::new(names::INVENTORY_QUEUE, names::DEAD_LETTER_EXCHANGE)
            .bind(names::EVENTS_EXCHANGE, keys::ORDER_PLACED)
            .bind(names::EVENTS_EXCHANGE, keys::ORDER_CANCELLED),
        Owner::Notification => {
            QueueSpec::new(names::NOTIFICATION_QUEUE, names::DEAD_LETTER_EXCHANGE)
                .bind(names::NOTIFICATIONS_EXCHANGE, "")
        }
    };
    spec.with_retry(retry).with_delivery_limit(DELIVERY_LIMIT)
}

/// Everything a service declares at startup: exchanges, every consumer queue with
/// its DLQ and bindings, and the retry queues of its own queue.
pub fn for_service(owner: Owner, retry: RetryPolicy) -> Topology {
    let mut topology = shared();
    for other in [Owner::Order, Owner::Inventory, Owner::Notification] {
        let policy = if other == owner {
            retry.clone()
        } else {
            RetryPolicy {
                delays: Vec::new(),
                ..retry.clone()
            }
        };
        topology.queues.push(queue(other, policy));
    }
    topology
}

fn exchange(name: &str, kind: ExchangeType) -> ExchangeSpec {
    ExchangeSpec {
        name: name.to_owned(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_declares_every_queue_with_the_same_arguments() {
        let retry = RetryPolicy::default();
        let all: Vec<Topology> = [Owner::Order, Owner::Inventory, Owner::Notification]
            .into_iter()
            .map(|o| for_service(o, retry.clone()))
            .collect();
        for topology in &all {
            let names: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    names::ORDER_QUEUE,
                    names::INVENTORY_QUEUE,
                    names::NOTIFICATION_QUEUE
                ]
            );
            assert!(
                topology
                    .queues
                    .iter()
                    .all(|q| q.delivery_limit == DELIVERY_LIMIT)
            );
        }
        // Only the owner declares retry queues.
        assert!(!all[0].queues[0].retry.delays.is_empty());
        assert!(all[0].queues[1].retry.delays.is_empty());
        assert!(!all[1].queues[1].retry.delays.is_empty());
    }
}
