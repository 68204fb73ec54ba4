//! `--store URL`: which store a Ferry uses, parsed and validated, and shown
//! with its password redacted (a password never reaches a log, an event or
//! an error).
//!
//! - `sqlite:PATH` — the embedded store: `PATH/ferry.db` when PATH is a
//!   directory (a data dir), else the database file itself. The default is
//!   `sqlite:<data-dir>/ferry.db`.
//! - `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?…]` (or `postgresql://`) —
//!   the store several instances share; `sslmode` and `sslrootcert` as
//!   libpq reads them (`postgres/tls.rs`).

use std::path::{Path, PathBuf};

/// A validated `--store` value.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, as given (with any password).
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({})", self.shown())
    }
}

impl StoreUrl {
    /// The default of a data dir: `sqlite:<data-dir>/ferry.db`.
    pub fn default_for(data_dir: &Path) -> StoreUrl {
        StoreUrl::Sqlite(data_dir.join("ferry.db"))
    }

    /// Parses `sqlite:PATH` or `postgres://…`; an error names the value and
    /// the forms accepted.
    pub fn parse(text: &str) -> Result<StoreUrl, String> {
        let shown = redact(text);
        let forms =
            "use sqlite:PATH (a data dir or a database file) or postgres://USER@HOST:PORT/DATABASE";
        if let Some(path) = text.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("store {shown:?} names no file; {forms}"));
            }
            let path = PathBuf::from(path);
            let file = if path.is_dir() {
                path.join("ferry.db")
            } else {
                path
            };
            return Ok(StoreUrl::Sqlite(file));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            // sslmode and sslrootcert are read as libpq reads them, beyond
            // what tokio-postgres knows (super::postgres::tls).
            let (plain, _) =
                super::postgres::tls::split(text).map_err(|e| format!("store {shown:?}: {e}"))?;
            let config: tokio_postgres::Config = plain.parse().map_err(|e| {
                format!("store {shown:?} is not a valid PostgreSQL URL ({e}); {forms}")
            })?;
            if config.get_hosts().is_empty() {
                return Err(format!("store {shown:?} names no host; {forms}"));
            }
            if config.get_dbname().is_none() {
                return Err(format!(
                    "store {shown:?} names no database; add it to the URL's path (…/DATABASE)"
                ));
            }
            return Ok(StoreUrl::Postgres(text.to_string()));
        }
        let kind: String = text
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .take(20)
            .collect();
        Err(format!("store {shown:?}: unknown kind {kind:?}; {forms}"))
    }

    /// The URL as it may be shown: the password replaced by `***`.
    pub fn shown(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => redact(url),
        }
    }

    /// For a SQLite store, the directory that holds its database (and, when
    /// it is a data dir, its `blobs/`).
    pub fn sqlite_dir(&self) -> Option<&Path> {
        match self {
            StoreUrl::Sqlite(file) => Some(file.parent().unwrap_or(Path::new("."))),
            StoreUrl::Postgres(_) => None,
        }
    }
}

/// `url` with the password (in the user part or a `password=` parameter)
/// replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_malformed(url);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// A text that is not a URL (a typo such as `postgres:/…`, or a
/// `key=value` connection string) may still hold a password: everything
/// before its last `@` and every `password=` value is hidden.
fn redact_malformed(text: &str) -> String {
    let text = match text.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => text.to_string(),
    };
    let mut shown = String::with_capacity(text.len());
    for part in text.split_inclusive([' ', '&']) {
        match part.split_once('=') {
            Some((k, v)) if k.eq_ignore_ascii_case("password") => {
                let sep = v.chars().last().filter(|c| matches!(c, ' ' | '&'));
                shown.push_str(k);
                shown.push_str("=***");
                shown.extend(sep);
            }
            _ => shown.push_str(part),
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_malformed_store_texts_are_never_shown() {
        for text in [
            "postgres:/fsec:S3cretPw@127.0.0.1/x",
            "postgres//fsec:S3cretPw@127.0.0.1:15433/db",
            "host=127.0.0.1 user=fsec password=S3cretPw dbname=db",
            "host=127.0.0.1&Password=S3cretPw&dbname=db",
        ] {
            let err = StoreUrl::parse(text).unwrap_err();
            assert!(!err.contains("S3cretPw"), "{err}");
            assert!(err.contains("unknown kind"), "{err}");
        }
        assert_eq!(
            redact("host=h password=S3cretPw dbname=d"),
            "host=h password=*** dbname=d"
        );
    }

    #[test]
    fn passwords_are_never_shown() {
        for (url, shown) in [
            (
                "postgres://ferry:s3cret@db:5432/ferry",
                "postgres://ferry:***@db:5432/ferry",
            ),
            (
                "postgres://ferry:p@ss@db/ferry",
                "postgres://ferry:***@db/ferry",
            ),
            (
                "postgres://ferry@db/ferry?sslmode=require&password=x",
                "postgres://ferry@db/ferry?sslmode=require&password=***",
            ),
            ("postgres://db/ferry", "postgres://db/ferry"),
        ] {
            assert_eq!(redact(url), shown);
            assert_eq!(StoreUrl::parse(url).unwrap().shown(), shown);
            assert!(!format!("{:?}", StoreUrl::parse(url).unwrap()).contains("s3cret"));
        }
    }

    #[test]
    fn the_kinds_are_parsed_and_others_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        assert_eq!(
            StoreUrl::parse(&format!("sqlite:{d}")).unwrap(),
            StoreUrl::Sqlite(dir.path().join("ferry.db")),
            "a directory is a data dir"
        );
        assert_eq!(
            StoreUrl::parse(&format!("sqlite:{d}/other.db")).unwrap(),
            StoreUrl::Sqlite(dir.path().join("other.db"))
        );
        assert_eq!(
            StoreUrl::default_for(dir.path()).sqlite_dir(),
            Some(dir.path())
        );
        assert!(matches!(
            StoreUrl::parse("postgresql://u@h:5/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        let e = StoreUrl::parse("mysql://root:pw@h/db").unwrap_err();
        assert!(
            e.contains("unknown kind \"mysql\"") && !e.contains("pw"),
            "{e}"
        );
        assert!(e.contains("postgres://"), "{e}");
        let e = StoreUrl::parse("postgres://u:pw@h").unwrap_err();
        assert!(e.contains("names no database") && !e.contains("pw@"), "{e}");
        assert!(matches!(
            StoreUrl::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem"),
            Ok(StoreUrl::Postgres(_))
        ));
        let e = StoreUrl::parse("postgres://u:pw@h/db?sslmode=strict").unwrap_err();
        assert!(
            e.contains("sslmode=strict is not a mode") && !e.contains("pw@"),
            "{e}"
        );
        assert!(StoreUrl::parse("sqlite:").is_err());
        assert!(StoreUrl::parse("ferry.db").is_err());
    }
}
