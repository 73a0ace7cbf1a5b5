//! Crash points for fault-injection tests, off unless enabled by environment:
//!
//! ```text
//!   CRASH_POINT=<name>[@<n>]   abort the process the n-th time (default 1st) <name> is reached
//!   CRASH_MARKER=<file>        append "<name>\n" to <file> just before aborting
//! ```
//!
//! The abort is immediate (no destructors, no graceful shutdown), like a SIGKILL
//! at that line. The marker lets a test prove the point really fired.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

struct Armed {
    name: String,
    nth: u64,
    marker: Option<String>,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let raw = std::env::var("CRASH_POINT")
                .ok()
                .filter(|v| !v.is_empty())?;
            let (name, nth) = match raw.split_once('@') {
                Some((name, nth)) => (name.to_owned(), nth.parse().unwrap_or(1).max(1)),
                None => (raw, 1),
            };
            Some(Armed {
                name,
                nth,
                marker: std::env::var("CRASH_MARKER").ok(),
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process here if `CRASH_POINT` names this point and its count is reached.
pub fn crash_point(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name != name || armed.hits.fetch_add(1, Ordering::SeqCst) + 1 != armed.nth {
        return;
    }
    if let Some(marker) = &armed.marker {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(marker)
        {
            let _ = writeln!(file, "{name}");
            let _ = file.sync_all();
        }
    }
    eprintln!("crash point {name} reached: aborting (CRASH_POINT)");
    std::process::abort();
}

/// The crash points of the messaging crate.
pub mod points {
    /// The relay has the broker's confirms but has not marked the rows.
    pub const RELAY_AFTER_CONFIRM: &str = "relay.after-confirm";
    /// A handler's work committed (it answered `Ack`), the delivery is not acked
    /// (a batch reaches it once, before its one ack).
    pub const CONSUMER_BEFORE_ACK: &str = "consumer.before-ack";
    /// A redrive has the confirms of a batch of copies, the DLQ originals are
    /// not acked.
    pub const REDRIVE_AFTER_CONFIRM: &str = "redrive.after-confirm";
}
