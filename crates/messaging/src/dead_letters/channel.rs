//! Broker operations of the dead-letter tools, each bounded so an operator tool
//! never hangs, and the few error tests they need.

use super::*;

pub(super) async fn bounded<T>(
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, DeadLetterError> {
    match tokio::time::timeout(OP_TIMEOUT, operation).await {
        Ok(result) => result.map_err(DeadLetterError::from),
        Err(_) => Err(DeadLetterError::Timeout(OP_TIMEOUT)),
    }
}

pub(super) async fn declare_passive(
    channel: &Channel,
    queue: &str,
) -> Result<u32, DeadLetterError> {
    let options = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match tokio::time::timeout(
        OP_TIMEOUT,
        channel.queue_declare(queue.into(), options, FieldTable::default()),
    )
    .await
    {
        Ok(Ok(queue)) => Ok(queue.message_count()),
        Ok(Err(e)) if lapin_not_found(&e) => Err(DeadLetterError::UnknownQueue(queue.to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DeadLetterError::Timeout(OP_TIMEOUT)),
    }
}

pub(super) fn lapin_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

pub(super) fn is_not_found(error: &DeadLetterError) -> bool {
    matches!(error, DeadLetterError::UnknownQueue(_))
}

pub(super) fn missing_dlq(error: DeadLetterError, queue: &str) -> DeadLetterError {
    if is_not_found(&error) {
        DeadLetterError::NoDeadLetterQueue {
            queue: queue.to_owned(),
            dlq: dlq_name(queue),
        }
    } else {
        error
    }
}

pub(super) async fn ack(channel: &Channel, delivery_tag: u64) -> Result<(), DeadLetterError> {
    bounded(channel.basic_ack(delivery_tag, BasicAckOptions::default())).await
}

/// Closes a channel, which hands its unacknowledged messages back to their
/// queue; bounded, and a channel already gone has handed them back already.
pub(super) async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(OP_TIMEOUT, channel.close(200, "done".into())).await;
    }
}
