-- A row the broker refuses (unroutable, nacked, channel error) or that cannot be
-- read backs off alone; after a bounded number of such failures it is parked:
-- left for the operator with its reason, never claimed again until retried.
ALTER TABLE outbox
    ADD COLUMN failures  INTEGER NOT NULL DEFAULT 0,  -- refusals of this row itself
    ADD COLUMN parked_at TIMESTAMPTZ;

-- What the relay claims: unpublished, unparked rows in seq order.
DROP INDEX outbox_unpublished;
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX outbox_parked ON outbox (seq) WHERE parked_at IS NOT NULL;
