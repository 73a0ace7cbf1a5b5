//! Integration tests of inventory-service's store against the real PostgreSQL
//! (`DATABASE_URL`, default postgres on 127.0.0.1:5432). Every test creates its
//! own database and drops it at the end.

mod lock_order;
