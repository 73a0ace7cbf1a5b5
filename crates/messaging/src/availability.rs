//! Telling "the database is unavailable" from "this message failed".
//!
//! A consumer pauses on the first kind (the message is not at fault, and spending
//! its retry budget on an outage would dead-letter healthy messages) and retries
//! the second kind with its growing delays.

/// True when `error` says the database cannot be used at all right now: no
/// connection (refused, reset, pool timed out or closed), the server shutting
/// down or refusing connections, out of connections or resources, or refusing
/// our credentials. False for failures of one statement (constraint, deadlock,
/// serialization failure, statement timeout, lock timeout, bad data).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_unavailable_code(&code)),
        _ => false,
    }
}

/// SQLSTATEs of a database that cannot serve anyone (PostgreSQL appendix A).
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || code.starts_with("28") // invalid authorization (credentials refused)
        || matches!(
            code,
            "57P01" // admin_shutdown (e.g. pg_terminate_backend)
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now (starting up, shutting down)
            | "55000" // "database is not currently accepting connections"
            | "3D000" // the database does not exist (dropped, not yet restored)
            | "25006" // read-only transaction (a standby after failover)
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
        for code in ["57014", "40P01", "40001", "23505", "55P03", "22P02"] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }
}
