//! Settling a delivery exactly once: ack, requeue, move to a retry queue or the
//! DLQ (a confirmed publish, then the ack).

use std::{sync::atomic::Ordering, time::Duration};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::AMQPValue,
};

use super::{
    DeathClass, Handler, Runtime, SETTLE_TIMEOUT, Verdict,
    envelope::{header_str, set_header, set_str},
    headers,
    unsettled::Subscription,
};
use crate::{OutgoingMessage, PublishError, propagation};

impl<H: Handler> Runtime<H> {
    /// Settles a delivery the handler gave a final answer for (in its span).
    pub(super) async fn settle(
        &self,
        delivery: &Delivery,
        verdict: Verdict,
        attempt: u32,
        subscription: &Subscription,
    ) {
        match verdict {
            Verdict::Ack => {
                tracing::Span::current().record("message.outcome", "ack");
                crate::crash_point!(crate::faults::points::CONSUMER_BEFORE_ACK);
                self.ack(delivery, subscription).await;
            }
            Verdict::Retry(reason) if self.queue.retry.retries_after(attempt) => {
                tracing::Span::current().record("message.outcome", "retry");
                self.retry(delivery, &reason, attempt, subscription).await;
            }
            Verdict::Retry(reason) => {
                tracing::Span::current().record("message.outcome", "dead-lettered");
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
                tracing::Span::current().record("message.outcome", "dead-lettered");
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

    pub(super) async fn ack(&self, delivery: &Delivery, subscription: &Subscription) {
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

    pub(super) async fn requeue(
        &self,
        delivery: &Delivery,
        why: &str,
        subscription: &Subscription,
    ) {
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

    pub(super) async fn retry(
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

    pub(super) async fn dead_letter(
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
    pub(super) async fn publish_move(
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
    pub(super) fn copy(
        &self,
        delivery: &Delivery,
        exchange: &str,
        routing_key: &str,
    ) -> OutgoingMessage {
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
