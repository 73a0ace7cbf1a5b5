-- Transactional outbox: rows written in the same transaction as the state change
-- they announce, published by the relay, marked only after the broker confirmed.
CREATE TABLE outbox (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              UUID        NOT NULL UNIQUE,           -- AMQP message_id
    exchange        TEXT        NOT NULL,
    routing_key     TEXT        NOT NULL,
    type            TEXT        NOT NULL,                  -- AMQP type (protobuf full name)
    payload         BYTEA       NOT NULL,
    headers         JSONB       NOT NULL DEFAULT '{}',     -- traceparent, tracestate, extras
    correlation_id  TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ,
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    -- set only after a message-specific failure (unroutable, nacked), so one bad
    -- row backs off alone instead of stalling the relay
    next_attempt_at TIMESTAMPTZ
);

-- What the relay claims: unpublished rows in seq order. Published rows leave it.
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
-- What retention deletes.
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Idempotent consumers: one row per (consumer, message) processed, written in the
-- handler's transaction.
CREATE TABLE inbox (
    consumer     TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE INDEX inbox_processed_at ON inbox (processed_at);
