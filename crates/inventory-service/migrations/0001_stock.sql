CREATE TABLE stock (
    sku        TEXT        PRIMARY KEY,
    available  BIGINT      NOT NULL CHECK (available >= 0),
    reserved   BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per order inventory has seen. `cancelled` is a tombstone for a
-- cancellation that arrived before the order itself: the order is then never
-- reserved.
CREATE TABLE reservations (
    order_id   UUID        PRIMARY KEY,
    state      TEXT        NOT NULL CHECK (state IN ('reserved', 'rejected', 'released', 'cancelled')),
    items      JSONB       NOT NULL DEFAULT '[]',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
