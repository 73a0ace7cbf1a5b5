CREATE TABLE orders (
    id          UUID        PRIMARY KEY,
    customer_id TEXT        NOT NULL,
    email       TEXT,
    status      TEXT        NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelled')),
    reason      TEXT,
    shortages   JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Listing: newest first, by customer or by status, keyset-paginated on (created_at, id).
CREATE INDEX orders_by_customer ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX orders_by_status ON orders (status, created_at DESC, id DESC);
CREATE INDEX orders_by_time ON orders (created_at DESC, id DESC);

CREATE TABLE order_items (
    order_id UUID    NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line     INTEGER NOT NULL,
    sku      TEXT    NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line)
);

-- Idempotency-Key of POST /orders: the first request's normalized body and its
-- response, replayed for the same key and body.
CREATE TABLE idempotency_keys (
    key         TEXT        PRIMARY KEY,
    request     TEXT        NOT NULL,
    status_code INTEGER     NOT NULL,
    response    JSONB       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
