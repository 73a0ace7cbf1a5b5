//! Telling "the database is unavailable" from "this message failed".
//!
//! A consumer pauses on the first kind (the message is not at fault, and spending
//! its retry budget on an outage would dead-letter healthy messages) and retries
//! the second kind with its growing delays.

/// True when `error` says the database cannot be used at all right now: no
/// connection (refused, reset, pool timed out or closed), the server shutting
/// down or refusing connections, out of connections or disk, or refusing
/// our credentials. False for failures of one statement (constraint, deadlock,
/// serialization failure, statement timeout, lock timeout, bad data).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_unavailable_code(&code)),
        _ => false,
    }
}

/// SQLSTATEs of a database that cannot serve anyone (PostgreSQL appendix A).
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("28") // invalid authorization (credentials refused)
        || matches!(
            code,
            "53300" // too_many_connections
            | "53100" // disk_full
            | "57P01" // admin_shutdown (e.g. pg_terminate_backend)
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up, shutting down)
            | "55000" // "database is not currently accepting connections" (also a
                      // few statement errors: the consumer stops believing in an
                      // outage when a message keeps failing after the probe answered)
            | "3D000" // the database does not exist (dropped, not yet restored)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_outages_and_statement_failures_are_not() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        for code in ["08006", "53300", "57P01", "55000", "28P01"] {
            assert!(is_unavailable_code(code), "{code}");
        }
        for code in [
            "57014", "40P01", "40001", "23505", "55P03", "22P02", "53200", "25006",
        ] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }
}
