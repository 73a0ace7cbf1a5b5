-- Exactly one notification per (order, event), whatever the redeliveries.
CREATE TABLE notifications (
    id           UUID        PRIMARY KEY,
    order_id     UUID        NOT NULL,
    event        TEXT        NOT NULL,              -- routing key, e.g. order.confirmed
    message_id   TEXT        NOT NULL,
    channel      TEXT        NOT NULL CHECK (channel IN ('log', 'webhook')),
    body         JSONB       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at TIMESTAMPTZ,
    attempts     INTEGER     NOT NULL DEFAULT 0,
    last_error   TEXT,
    UNIQUE (order_id, event)
);

CREATE INDEX notifications_by_order ON notifications (order_id, created_at, id);
