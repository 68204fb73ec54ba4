//! The route version and the instances table on SQLite: the same shape as
//! on PostgreSQL, so one node behaves as a cluster of one (its own
//! instance, a route version that grows with every change of what serves).

use rusqlite::{Connection, params};

use super::{SqliteStore, map_err, to_json};
use crate::records::{InstanceRecord, InstanceReport};
use crate::store::StoreError;
use crate::units::now_ms;

/// The migration that adds them.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE route_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT INTO route_version (id, version) VALUES (1, 0);
ALTER TABLE models ADD COLUMN route_version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX models_by_route_version ON models(route_version);
CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    url            TEXT NOT NULL,
    version        TEXT NOT NULL,
    started_at     TEXT NOT NULL,
    last_seen      INTEGER NOT NULL,
    route_version  INTEGER NOT NULL,
    warm           TEXT NOT NULL,
    failures       TEXT NOT NULL
);
"#;

/// Records, in the transaction `tx`, that what serves `model` changed:
/// the route version grows by one and becomes the model's.
pub(super) fn changed(tx: &Connection, model: &str) -> rusqlite::Result<i64> {
    tx.execute("UPDATE route_version SET version = version + 1", [])?;
    let version: i64 = tx.query_row("SELECT version FROM route_version", [], |r| r.get(0))?;
    tx.execute(
        "UPDATE models SET route_version = ?2 WHERE name = ?1",
        params![model, version],
    )?;
    Ok(version)
}

/// Records that every model changed (a copy restored into the store).
pub(super) fn all_changed(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute("UPDATE route_version SET version = version + 1", [])?;
    tx.execute(
        "UPDATE models SET route_version = (SELECT version FROM route_version)",
        [],
    )?;
    Ok(())
}

impl SqliteStore {
    pub(super) fn latest_route_version(&self) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row("SELECT version FROM route_version", [], |r| r.get(0))?)
    }

    pub(super) fn models_changed_since(
        &self,
        after: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT name, route_version FROM models WHERE route_version > ?1 ORDER BY route_version",
        )?;
        let rows = stmt.query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    pub(super) fn write_instance(&self, r: &InstanceReport) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO instances (id, url, version, started_at, last_seen, route_version, warm, failures)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET url = ?2, version = ?3, started_at = ?4,
                   last_seen = ?5, route_version = ?6, warm = ?7, failures = ?8",
                params![
                    r.id,
                    r.url,
                    r.version,
                    r.started_at,
                    now_ms() as i64,
                    r.route_version,
                    to_json(&r.warm),
                    to_json(&r.failures)
                ],
            )?;
            Ok(())
        })
    }

    pub(super) fn read_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, url, version, started_at, last_seen, route_version, warm, failures
             FROM instances ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(InstanceRecord {
                report: InstanceReport {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    version: r.get(2)?,
                    started_at: r.get(3)?,
                    route_version: r.get(5)?,
                    warm: super::json_col(r, 6, "an instance's warm versions")?,
                    failures: super::json_col(r, 7, "an instance's load failures")?,
                },
                last_seen_ms: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    pub(super) fn delete_instances(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM instances WHERE last_seen < ?1",
                [before_ms as i64],
            )
        })
    }

    pub(super) fn delete_instance(&self, id: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| tx.execute("DELETE FROM instances WHERE id = ?1", [id]))
            .map(|_| ())
    }
}
