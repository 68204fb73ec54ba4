//! PostgreSQL failures sorted by what the operator can do about them
//! ([`PgProblem`]), shown with the server's URL (no password) and the fix;
//! and the outage log ([`OutageLog`]): an unreachable server is said once
//! when it goes and once when it is back, not at every call.

use std::time::{Duration, Instant};

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// What went wrong with PostgreSQL, as far as the operator's fix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgProblem {
    /// No answer: the server is down, or the host, port or network is wrong.
    Unreachable,
    /// The connection was lost while a transaction was being committed: the
    /// change may or may not have been made.
    CommitUnknown,
    /// The TLS connection the URL asks for could not be made (a certificate
    /// that is not trusted, a server without TLS).
    Tls,
    /// The database named in the URL does not exist.
    NoDatabase,
    /// The server refused the user or password.
    Credentials,
    /// The server's disk is full.
    DiskFull,
    /// The server accepts no writes.
    ReadOnly,
    /// Anything else (a bug, a constraint, a lost race).
    Other,
}

/// A PostgreSQL failure: what kind, against which server (no password), and
/// the server's or the client's own words.
#[derive(Debug, Clone)]
pub struct PgFailure {
    pub url: String,
    pub problem: PgProblem,
    pub detail: String,
}

impl std::fmt::Display for PgFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (url, detail) = (&self.url, &self.detail);
        match self.problem {
            PgProblem::Unreachable => write!(
                f,
                "the store at {url} is unreachable: {detail}; check that PostgreSQL is running and listening at that host and port, and that the network lets Ferry reach it"
            ),
            PgProblem::CommitUnknown => write!(
                f,
                "the store at {url} is unreachable: {detail}; the connection was lost while a change was being committed, so it may or may not have been made"
            ),
            PgProblem::Tls => write!(
                f,
                "the store at {url} refused the TLS connection: {detail}; check sslmode and sslrootcert in the URL (sslrootcert is the CA that signed the server's certificate; verify-full also needs the URL's host name in that certificate), and that the server has ssl = on"
            ),
            PgProblem::NoDatabase => write!(
                f,
                "the store at {url} cannot be used: {detail}; create the database (createdb) or fix the database name in the URL"
            ),
            PgProblem::Credentials => write!(
                f,
                "the store at {url} refused Ferry's login: {detail}; check the user and password (in the URL or PGPASSWORD) and the server's pg_hba.conf"
            ),
            PgProblem::DiskFull | PgProblem::ReadOnly | PgProblem::Other => {
                write!(f, "the store at {url} failed: {detail}")
            }
        }
    }
}

/// A failure inside one call, before it is given its URL.
pub(super) enum Failure {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    /// No answer within the call's time (see `PostgresStore::run`).
    Timeout(Duration),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Pg(e)
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Failure {
        Failure::Pool(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

/// The error and its causes, one after another.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn classify(e: &tokio_postgres::Error) -> (PgProblem, String) {
    let Some(db) = e.as_db_error() else {
        // tokio-postgres keeps its error kinds private; a TLS failure is
        // told by the kind's words.
        if e.to_string().starts_with("error performing TLS handshake") {
            return (PgProblem::Tls, chain(e));
        }
        // No answer from the server's SQL layer: the connection failed.
        return (PgProblem::Unreachable, chain(e));
    };
    let code = db.code();
    let problem = if *code == SqlState::INVALID_CATALOG_NAME {
        PgProblem::NoDatabase
    } else if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        PgProblem::Credentials
    } else if *code == SqlState::DISK_FULL {
        PgProblem::DiskFull
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        PgProblem::ReadOnly
    } else if code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
    {
        PgProblem::Unreachable
    } else {
        PgProblem::Other
    };
    (
        problem,
        format!("{} (SQLSTATE {})", db.message(), code.code()),
    )
}

impl Failure {
    pub(super) fn into_store_error(self, url: &str) -> StoreError {
        let (problem, detail) = match self {
            Failure::Store(e) => return e,
            Failure::Pg(e) => classify(&e),
            Failure::Pool(PoolError::Backend(e)) => classify(&e),
            Failure::Pool(PoolError::Timeout(_)) => (
                PgProblem::Unreachable,
                "no connection could be made in time".to_string(),
            ),
            Failure::Pool(e) => (PgProblem::Unreachable, e.to_string()),
            Failure::Timeout(after) => (
                PgProblem::Unreachable,
                format!("no answer within {after:?}"),
            ),
        };
        StoreError::Postgres(PgFailure {
            url: url.to_string(),
            problem,
            detail,
        })
    }
}

/// Says when the server becomes unreachable and when it is back, once each:
/// callers report every answer, the log gets the two transitions.
#[derive(Default)]
pub(super) struct OutageLog {
    since: std::sync::Mutex<Option<Instant>>,
}

/// A change the outage log reports.
#[derive(Debug, PartialEq)]
pub(super) enum Transition {
    /// The first call to fail since the server last answered.
    Down,
    /// The first answer after an outage, and how long it lasted.
    Back(Duration),
}

impl OutageLog {
    /// Records one call's outcome (`reached`: the server answered, even with
    /// an error of its own); the transition it makes, if any.
    pub(super) fn record(&self, reached: bool, now: Instant) -> Option<Transition> {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match (reached, *since) {
            (false, None) => {
                *since = Some(now);
                Some(Transition::Down)
            }
            (true, Some(start)) => {
                *since = None;
                Some(Transition::Back(now.saturating_duration_since(start)))
            }
            _ => None,
        }
    }

    /// Whether the last call found the server unreachable.
    pub(super) fn is_down(&self) -> bool {
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Store(StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_when_it_starts_and_once_when_it_ends() {
        let log = OutageLog::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(log.record(true, at(0)), None, "up and answering");
        assert_eq!(log.record(false, at(10)), Some(Transition::Down));
        assert!(log.is_down());
        for ms in [20, 30, 40] {
            assert_eq!(log.record(false, at(ms)), None, "not at every call");
        }
        assert_eq!(
            log.record(true, at(2010)),
            Some(Transition::Back(Duration::from_millis(2000)))
        );
        assert!(!log.is_down());
        assert_eq!(log.record(true, at(2020)), None);
        assert_eq!(
            log.record(false, at(3000)),
            Some(Transition::Down),
            "a second outage"
        );
    }
}
