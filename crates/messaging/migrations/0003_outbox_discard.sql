-- A parked row the operator discarded stays, marked: what was never published
-- remains explainable (retention deletes published rows only). It keeps
-- parked_at, so the relay never claims it.
ALTER TABLE outbox ADD COLUMN discarded_at TIMESTAMPTZ;
