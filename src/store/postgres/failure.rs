//! PostgreSQL failures sorted by what the operator can do about them
//! ([`PgProblem`]), shown with the server's URL (no password) and the fix.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use super::CALL_TIMEOUT;
use crate::store::StoreError;

/// What went wrong with PostgreSQL, as far as the operator's fix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgProblem {
    /// No answer: the server is down, or the host, port or network is wrong.
    Unreachable,
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
    Timeout,
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
fn chain(e: &dyn std::error::Error) -> String {
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
            Failure::Timeout => (
                PgProblem::Unreachable,
                format!("no answer within {CALL_TIMEOUT:?}"),
            ),
        };
        StoreError::Postgres(PgFailure {
            url: url.to_string(),
            problem,
            detail,
        })
    }
}

pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Store(StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}
