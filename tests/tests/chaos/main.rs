//! The chaos suite: a stream of orders while faults hit the real processes, then
//! the invariants. One scenario at a time (some faults are broker-wide), but
//! for two that share nothing (see `harness::SERIAL`).
//!
//! Each scenario prints a summary line (also appended to target/chaos-summary.txt):
//! `chaos <name>: faults=<n> orders=<n> lost=<n> duplicated=<n> recovered_in=<s>`.

mod cluster;
mod database_outage;
mod harness;
mod long_faults;
mod scenarios;
