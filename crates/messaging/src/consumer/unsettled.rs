//! The deliveries of one subscription that are not settled yet, so that a batch
//! can be acknowledged with one `basic.ack(multiple)` exactly when that frame
//! acknowledges nothing but the batch.
//!
//! A tag is forgotten only once its ack or nack has been written, never when it
//! is merely about to be. So a multi-ack that finds every unsettled tag up to its
//! own in its batch cannot overtake another task's settle frame for a lower tag
//! (which would make the broker see that tag twice and close the channel), and
//! it never acknowledges a delivery held by another task (a retry waiting for a
//! blocked publisher, a handler still running).

use std::{
    collections::BTreeSet,
    sync::{Mutex, PoisonError},
};

/// One subscription (channel) of a consumer: its connection generation and the
/// delivery tags it has taken and not settled. Delivery tags restart at 1 on
/// every channel, so each subscription has its own.
#[derive(Debug)]
pub(super) struct Subscription {
    /// The connection the deliveries came on ([`crate::Broker::lost`]).
    pub generation: u64,
    unsettled: Mutex<BTreeSet<u64>>,
}

impl Subscription {
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            unsettled: Mutex::new(BTreeSet::new()),
        }
    }

    /// A delivery was taken from the channel.
    pub fn taken(&self, tag: u64) {
        self.tags().insert(tag);
    }

    /// These deliveries' settle frames were written.
    pub fn settled(&self, tags: impl IntoIterator<Item = u64>) {
        let mut unsettled = self.tags();
        for tag in tags {
            unsettled.remove(&tag);
        }
    }

    /// Whether `basic.ack(multiple)` on the largest of `tags` (sorted, ascending)
    /// would acknowledge exactly `tags`: every unsettled tag up to it is one of them.
    pub fn multi_ack_covers(&self, tags: &[u64]) -> bool {
        let Some(&last) = tags.last() else {
            return false;
        };
        self.tags()
            .range(..=last)
            .all(|tag| tags.binary_search(tag).is_ok())
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        // The set stays consistent whatever panicked while holding it.
        self.unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::Subscription;

    #[test]
    fn a_multi_ack_covers_a_batch_only_when_nothing_below_it_is_unsettled() {
        let subscription = Subscription::new(1);
        for tag in 1..=6 {
            subscription.taken(tag);
        }
        // 1..3 still unsettled by another task: acking 4..6 as multiple would ack them.
        assert!(!subscription.multi_ack_covers(&[4, 5, 6]));
        assert!(subscription.multi_ack_covers(&[1, 2, 3]));
        subscription.settled([1, 3]);
        // 2 is held (e.g. a retry waiting for the publisher).
        assert!(!subscription.multi_ack_covers(&[4, 5, 6]));
        subscription.settled([2]);
        assert!(subscription.multi_ack_covers(&[4, 5, 6]));
        // Tags above the batch do not matter.
        subscription.taken(7);
        assert!(subscription.multi_ack_covers(&[4, 5, 6]));
        assert!(!subscription.multi_ack_covers(&[]));
    }
}
