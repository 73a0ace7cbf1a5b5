-- What a service did for each order, in the order it happened: every event it
-- emitted (written with the outbox row, in the same transaction) and every event
-- it applied (written inside its inbox transaction, so a duplicate delivery
-- records nothing). An operator's timeline of an order is read from here.
CREATE TABLE order_history (
    seq        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   UUID        NOT NULL,
    direction  TEXT        NOT NULL CHECK (direction IN ('emitted', 'applied')),
    event      TEXT        NOT NULL,                      -- routing key, e.g. order.placed
    -- AMQP message_id: the outbox row's id for emitted events; whatever the
    -- producer sent for applied ones (the inbox keeps it as text too)
    message_id TEXT        NOT NULL,
    trace_id   TEXT        CHECK (trace_id ~ '^[0-9a-f]{32}$'),  -- W3C trace id
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX order_history_by_order ON order_history (order_id, seq);
