//! The embedded store: one SQLite database in the data dir (WAL journal,
//! `synchronous = FULL`, so a state change that returned is on disk and
//! survives `kill -9` and power loss).

mod cluster;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    Counts, EMBEDDED_TERM, Event, Fence, Inserted, Leader, LeaseSettings, NewEvent, NotCreated,
    Page, RolloutRecord, Snapshot, Store, StoreError,
};
use crate::gateway::RoutePolicy;
use crate::records::{
    EventKind, InstanceRecord, InstanceReport, ModelRecord, ServingSettings, VersionRecord,
};
use crate::spec::RolloutSpec;
use crate::strategy::{Phase, RolloutKind, RolloutState};
use crate::units::now_rfc3339;

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE models (
    name        TEXT PRIMARY KEY,
    stable      TEXT,
    created_at  TEXT NOT NULL
);
CREATE TABLE versions (
    model       TEXT NOT NULL REFERENCES models(name),
    version     TEXT NOT NULL,
    source      TEXT NOT NULL,
    signature   TEXT NOT NULL,
    labels      TEXT NOT NULL,
    settings    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    loaded      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, version)
);
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT NOT NULL,
    model    TEXT NOT NULL,
    rollout  TEXT,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL,
    data     TEXT NOT NULL
);
CREATE INDEX events_by_model ON events(model, id);
"#,
    r#"
ALTER TABLE models ADD COLUMN route TEXT;
"#,
    r#"
CREATE TABLE rollouts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    model       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    active      INTEGER NOT NULL,
    undoes      INTEGER,
    report      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX rollouts_by_model ON rollouts(model, id);
CREATE INDEX rollouts_active ON rollouts(active);
CREATE INDEX events_by_rollout ON events(rollout, id);
"#,
    r#"
ALTER TABLE models ADD COLUMN unloaded TEXT;
"#,
    cluster::MIGRATION,
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The one instance, which always leads (set when it campaigns): what
    /// [`Store::leader`] answers.
    leader: std::sync::OnceLock<Leader>,
}

/// The embedded store's fencing: its one instance leads in
/// [`EMBEDDED_TERM`] for as long as the store is open, so only a write
/// claiming an older term is refused.
fn check_fence(fence: Fence, leader: Option<&Leader>) -> Result<(), StoreError> {
    match fence {
        Fence::Term(term) if fence.refused_at(EMBEDDED_TERM) => Err(StoreError::Fenced {
            term,
            newer: EMBEDDED_TERM,
            holder: leader.map_or_else(|| "this one".into(), |l| l.instance.clone()),
        }),
        _ => Ok(()),
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {e}").into(),
    )
}

fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row,
    idx: usize,
    what: &str,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(what, e))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialise")
}

const VERSION_COLUMNS: &str =
    "model, version, source, signature, labels, settings, created_at, loaded";

fn version_row(row: &Row) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        model: row.get(0)?,
        version: row.get(1)?,
        source: json_col(row, 2, "version source")?,
        signature: json_col(row, 3, "version signature")?,
        labels: json_col(row, 4, "version labels")?,
        settings: json_col(row, 5, "serving settings")?,
        created_at: row.get(6)?,
        loaded: row.get::<_, i64>(7)? != 0,
    })
}

fn event_row(r: &Row) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        at: r.get(1)?,
        model: r.get(2)?,
        rollout: r.get(3)?,
        kind: EventKind::parse(&r.get::<_, String>(4)?),
        message: r.get(5)?,
        data: json_col(r, 6, "event data")?,
    })
}

const ROLLOUT_COLUMNS: &str =
    "id, model, kind, spec, state, undoes, report, created_at, updated_at";

fn rollout_row(row: &Row) -> rusqlite::Result<RolloutRecord> {
    let report: Option<String> = row.get(6)?;
    let kind: String = row.get(2)?;
    Ok(RolloutRecord {
        id: row.get(0)?,
        model: row.get(1)?,
        kind: super::stored_rollout_kind(&kind).map_err(|e| corrupt("rollout kind", e))?,
        spec: json_col::<RolloutSpec>(row, 3, "rollout spec")?,
        state: json_col::<RolloutState>(row, 4, "rollout state")?,
        undoes: row.get(5)?,
        report: report
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| corrupt("rollout report", e))?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
    })
}

fn insert_event(tx: &Connection, e: &NewEvent) -> rusqlite::Result<()> {
    let e = e.clone().bounded();
    tx.execute(
        "INSERT INTO events (at, model, rollout, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![now_rfc3339(), e.model, e.rollout, e.kind.as_str(), e.message, to_json(&e.data)],
    )?;
    Ok(())
}

/// Replaces a model's routing policy; its stable version becomes the policy's.
/// Writes a version's row as it is (registration, and a copy's restore).
fn write_version(tx: &Connection, v: &VersionRecord) -> rusqlite::Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ),
        params![
            v.model,
            v.version,
            to_json(&v.source),
            to_json(&v.signature),
            to_json(&v.labels),
            to_json(&v.settings),
            v.created_at,
            v.loaded as i64
        ],
    )?;
    Ok(())
}

fn write_route(tx: &Connection, model: &str, policy: &RoutePolicy) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE models SET route = ?2, stable = ?3 WHERE name = ?1",
        params![model, to_json(policy), policy.stable],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) `ferry.db` in `dir` and migrates it.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_file(&dir.join("ferry.db"))
    }

    /// Opens (creating if needed) the database file `path` and migrates it.
    pub fn open_file(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            leader: std::sync::OnceLock::new(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied change:
        // every write is a transaction that rolls back when dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_tx<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        // Immediate: the write lock is taken at the start, so two handles on
        // one file (two instances) wait for each other (busy timeout)
        // rather than fail upgrading a read to a write.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        crate::crashpoint::reach("store.before_commit");
        tx.commit()?;
        crate::crashpoint::reach("store.after_commit");
        Ok(out)
    }
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(_, _, reason) => StoreError::Corrupt {
            what: "a stored record".into(),
            reason: reason.to_string(),
        },
        other => StoreError::Database(other),
    }
}

impl Store for SqliteStore {
    fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT name, stable, created_at, unloaded FROM models ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelRecord {
                name: r.get(0)?,
                stable: r.get(1)?,
                created_at: r.get(2)?,
                unloaded: r.get(3)?,
            })
        })?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn model(&self, model: &str) -> Result<Option<ModelRecord>, StoreError> {
        let conn = self.lock();
        conn.query_row(
            "SELECT name, stable, created_at, unloaded FROM models WHERE name = ?1",
            [model],
            |r| {
                Ok(ModelRecord {
                    name: r.get(0)?,
                    stable: r.get(1)?,
                    created_at: r.get(2)?,
                    unloaded: r.get(3)?,
                })
            },
        )
        .optional()
        .map_err(map_err)
    }

    fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE model = ?1 ORDER BY created_at, version"
        ))?;
        let rows = stmt.query_map([model], version_row)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError> {
        let conn = self.lock();
        conn.query_row(
            &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = ?1 AND version = ?2"),
            [model, version],
            version_row,
        )
        .optional()
        .map_err(map_err)
    }

    fn insert_version(&self, v: &VersionRecord) -> Result<Inserted, StoreError> {
        self.with_tx(|tx| {
            let existing = tx
                .query_row(
                    &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = ?1 AND version = ?2"),
                    [&v.model, &v.version],
                    version_row,
                )
                .optional()?;
            if let Some(existing) = existing {
                return Ok(Inserted::Exists(Box::new(existing)));
            }
            let stable: Option<Option<String>> = tx
                .query_row("SELECT stable FROM models WHERE name = ?1", [&v.model], |r| r.get(0))
                .optional()?;
            let becomes_stable = !matches!(stable, Some(Some(_)));
            if stable.is_none() {
                tx.execute(
                    "INSERT INTO models (name, stable, created_at) VALUES (?1, NULL, ?2)",
                    params![v.model, v.created_at],
                )?;
            }
            write_version(tx, v)?;
            let what = v.source.summary();
            insert_event(
                tx,
                &NewEvent::new(
                    &v.model,
                    EventKind::VersionRegistered,
                    format!("version {} registered: {what}", v.version),
                    serde_json::json!({"version": v.version, "source": v.source, "labels": v.labels}),
                ),
            )?;
            if becomes_stable {
                tx.execute("UPDATE models SET stable = ?2 WHERE name = ?1", [&v.model, &v.version])?;
                insert_event(
                    tx,
                    &NewEvent::new(
                        &v.model,
                        EventKind::StableSet,
                        format!(
                            "version {} is the stable version: it is the model's first version",
                            v.version
                        ),
                        serde_json::json!({"version": v.version}),
                    ),
                )?;
            }
            cluster::changed(tx, &v.model)?;
            Ok(Inserted::Created {
                stable: becomes_stable,
            })
        })
    }

    fn update_settings(
        &self,
        model: &str,
        version: &str,
        settings: &ServingSettings,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE versions SET settings = ?3 WHERE model = ?1 AND version = ?2",
                params![model, version, to_json(settings)],
            )?;
            insert_event(tx, &event)?;
            cluster::changed(tx, model).map(drop)
        })
    }

    fn set_loaded(
        &self,
        model: &str,
        version: &str,
        loaded: bool,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE versions SET loaded = ?3 WHERE model = ?1 AND version = ?2",
                params![model, version, loaded as i64],
            )?;
            insert_event(tx, &event)?;
            cluster::changed(tx, model).map(drop)
        })
    }

    fn set_unloaded(
        &self,
        model: &str,
        by: Option<&str>,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE models SET unloaded = ?2 WHERE name = ?1",
                params![model, by],
            )?;
            insert_event(tx, &event)?;
            cluster::changed(tx, model).map(drop)
        })
    }

    fn remove_version(
        &self,
        model: &str,
        version: &str,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM versions WHERE model = ?1 AND version = ?2",
                [model, version],
            )?;
            insert_event(tx, &event)?;
            cluster::changed(tx, model).map(drop)
        })
    }

    fn route(&self, model: &str) -> Result<Option<RoutePolicy>, StoreError> {
        let conn = self.lock();
        let text: Option<Option<String>> = conn
            .query_row("SELECT route FROM models WHERE name = ?1", [model], |r| {
                r.get(0)
            })
            .optional()?;
        match text.flatten() {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: format!("route of model {model}"),
                    reason: e.to_string(),
                }),
        }
    }

    fn set_route(
        &self,
        model: &str,
        policy: &RoutePolicy,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            write_route(tx, model, policy)?;
            insert_event(tx, &event)?;
            cluster::changed(tx, model).map(drop)
        })
    }

    fn create_rollout(
        &self,
        model: &str,
        kind: RolloutKind,
        spec: &RolloutSpec,
        state: &RolloutState,
        undoes: Option<i64>,
        events: Vec<NewEvent>,
        fence: Fence,
    ) -> Result<Result<RolloutRecord, NotCreated>, StoreError> {
        check_fence(fence, self.leader.get())?;
        self.with_tx(|tx| {
            let active = tx
                .query_row(
                    &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE model = ?1 AND active = 1"),
                    [model],
                    rollout_row,
                )
                .optional()?;
            if let Some(active) = active {
                return Ok(Err(NotCreated::Active(Box::new(active))));
            }
            let now = now_rfc3339();
            tx.execute(
                "INSERT INTO rollouts (model, kind, spec, state, active, undoes, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![model, kind.to_string(), to_json(spec), to_json(state), state.phase.is_active() as i64, undoes, now],
            )?;
            let id = tx.last_insert_rowid();
            if let Some(undone) = undoes {
                let old: Option<String> =
                    tx.query_row("SELECT state FROM rollouts WHERE id = ?1", [undone], |r| r.get(0)).optional()?;
                if let Some(old) = old {
                    let mut old: RolloutState = serde_json::from_str(&old).map_err(|e| corrupt("rollout state", e))?;
                    old.phase = Phase::RolledBack;
                    old.message = format!("rolled back by r-{id}");
                    tx.execute(
                        "UPDATE rollouts SET state = ?2, active = 0, updated_at = ?3 WHERE id = ?1",
                        params![undone, to_json(&old), now],
                    )?;
                }
            }
            for mut e in events {
                e.rollout = Some(format!("r-{id}"));
                insert_event(tx, &e)?;
            }
            cluster::changed(tx, model)?;
            let record = tx.query_row(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                [id],
                rollout_row,
            )?;
            Ok(Ok(record))
        })
    }

    fn update_rollout(
        &self,
        id: i64,
        state: &RolloutState,
        events: Vec<NewEvent>,
        route_changed: Option<NewEvent>,
        fence: Fence,
    ) -> Result<(), StoreError> {
        check_fence(fence, self.leader.get())?;
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE rollouts SET state = ?2, active = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    id,
                    to_json(state),
                    state.phase.is_active() as i64,
                    now_rfc3339()
                ],
            )?;
            for mut e in events {
                e.rollout = Some(format!("r-{id}"));
                insert_event(tx, &e)?;
            }
            let model: String =
                tx.query_row("SELECT model FROM rollouts WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?;
            if let Some(event) = route_changed {
                write_route(tx, &model, &state.route)?;
                insert_event(tx, &event)?;
            }
            cluster::changed(tx, &model).map(drop)
        })
    }

    fn set_rollout_report(
        &self,
        id: i64,
        report: &serde_json::Value,
        fence: Fence,
    ) -> Result<(), StoreError> {
        check_fence(fence, self.leader.get())?;
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE rollouts SET report = ?2 WHERE id = ?1",
                params![id, to_json(report)],
            )?;
            Ok(())
        })
    }

    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError> {
        let conn = self.lock();
        conn.query_row(
            &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
            [id],
            rollout_row,
        )
        .optional()
        .map_err(map_err)
    }

    fn rollouts(&self, model: &str, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE model = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![model, limit as i64], rollout_row)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE active = 1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([], rollout_row)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn rollout_events(&self, id: i64, page: Page) -> Result<Vec<Event>, StoreError> {
        self.page_of("rollout", &format!("r-{id}"), page)
    }

    fn events(&self, model: &str, page: Page) -> Result<Vec<Event>, StoreError> {
        self.page_of("model", model, page)
    }

    fn delete_events_before(&self, cutoff: &str) -> Result<usize, StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM events WHERE at < ?1 AND (rollout IS NULL OR rollout NOT IN
                   (SELECT 'r-' || id FROM rollouts WHERE active = 1))",
                [cutoff],
            )
        })
    }

    fn identity(&self) -> Result<String, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let conn = self.lock();
        let Some(path) = conn.path().filter(|p| !p.is_empty()) else {
            return Ok(format!("sqlite:memory:{:p}", self));
        };
        // The file itself (device and inode), not the name it was opened by.
        let file = std::fs::metadata(path).map_err(|e| StoreError::Corrupt {
            what: format!("the database file {path}"),
            reason: e.to_string(),
        })?;
        Ok(format!("sqlite:{}:{}", file.dev(), file.ino()))
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        let conn = self.lock();
        conn.query_row(
            "SELECT (SELECT COUNT(*) FROM models), (SELECT COUNT(*) FROM versions),
                    (SELECT COUNT(*) FROM rollouts), (SELECT COUNT(*) FROM events)",
            [],
            |r| {
                let n = |i| r.get::<_, i64>(i).map(|n| n as u64);
                Ok(Counts {
                    models: n(0)?,
                    versions: n(1)?,
                    rollouts: n(2)?,
                    events: n(3)?,
                })
            },
        )
        .map_err(map_err)
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One transaction: a consistent view of the three tables.
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT name, stable, created_at, unloaded, route FROM models ORDER BY name",
            )?;
            let models = stmt
                .query_map([], |r| {
                    let route: Option<String> = r.get(4)?;
                    let route = route
                        .map(|t| serde_json::from_str::<RoutePolicy>(&t))
                        .transpose()
                        .map_err(|e| corrupt("a model's route", e))?;
                    let model = ModelRecord {
                        name: r.get(0)?,
                        stable: r.get(1)?,
                        created_at: r.get(2)?,
                        unloaded: r.get(3)?,
                    };
                    Ok((model, route))
                })?
                .collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(&format!(
                "SELECT {VERSION_COLUMNS} FROM versions ORDER BY model, created_at, version"
            ))?;
            let versions = stmt.query_map([], version_row)?.collect::<Result<_, _>>()?;
            let mut stmt = tx.prepare(&format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id"
            ))?;
            let rollouts = stmt.query_map([], rollout_row)?.collect::<Result<_, _>>()?;
            Ok(Snapshot {
                models,
                versions,
                rollouts,
            })
        })
    }

    fn event_log(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, at, model, rollout, kind, message, data FROM events
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], event_row)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn restore(&self, snapshot: &Snapshot, replace: bool) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if replace {
            tx.execute_batch(
                "DELETE FROM events; DELETE FROM rollouts; DELETE FROM versions; DELETE FROM models;",
            )?;
        } else {
            let (models, events): (i64, i64) = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM models) + (SELECT COUNT(*) FROM rollouts),
                        (SELECT COUNT(*) FROM events)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if models + events > 0 {
                return Err(StoreError::NotEmpty {
                    models: models as u64,
                    events: events as u64,
                });
            }
        }
        restore_rows(&tx, snapshot).map_err(map_err)?;
        cluster::all_changed(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn route_version(&self) -> Result<i64, StoreError> {
        self.latest_route_version()
    }

    fn changed_since(&self, after: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.models_changed_since(after)
    }

    fn report_instance(&self, report: &InstanceReport) -> Result<(), StoreError> {
        self.write_instance(report)
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.read_instances()
    }

    fn forget_instances(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.delete_instances(before_ms)
    }

    fn leave(&self, instance: &str) -> Result<(), StoreError> {
        self.delete_instance(instance)
    }

    fn campaign(&self, instance: &str, _settings: LeaseSettings) {
        let _ = self.leader.set(Leader {
            instance: instance.to_string(),
            term: EMBEDDED_TERM,
            since: now_rfc3339(),
            valid: true,
        });
    }

    fn leader(&self) -> Result<Option<Leader>, StoreError> {
        Ok(self.leader.get().cloned())
    }

    fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "INSERT INTO events (id, at, model, rollout, kind, message, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in events {
                stmt.execute(params![
                    e.id,
                    e.at,
                    e.model,
                    e.rollout,
                    e.kind.as_str(),
                    e.message,
                    to_json(&e.data)
                ])?;
            }
            Ok(())
        })
    }
}

/// Writes a snapshot's rows as they are (ids and timestamps kept).
fn restore_rows(tx: &Connection, s: &Snapshot) -> rusqlite::Result<()> {
    for (m, route) in &s.models {
        tx.execute(
            "INSERT INTO models (name, stable, created_at, unloaded, route) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![m.name, m.stable, m.created_at, m.unloaded, route.as_ref().map(to_json)],
        )?;
    }
    for v in &s.versions {
        write_version(tx, v)?;
    }
    for r in &s.rollouts {
        tx.execute(
            "INSERT INTO rollouts (id, model, kind, spec, state, active, undoes, report, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.id,
                r.model,
                r.kind.to_string(),
                to_json(&r.spec),
                to_json(&r.state),
                r.state.phase.is_active() as i64,
                r.undoes,
                r.report.as_ref().map(to_json),
                r.created_at,
                r.updated_at
            ],
        )?;
    }
    Ok(())
}

impl SqliteStore {
    /// A page of the events whose `column` (`model` or `rollout`) is `key`.
    fn page_of(&self, column: &str, key: &str, page: Page) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock();
        let (sql, bound, limit) = match page {
            Page::Latest { limit } => (
                format!(
                    "SELECT id, at, model, rollout, kind, message, data FROM
                       (SELECT * FROM events WHERE {column} = ?1 AND id > ?2 ORDER BY id DESC LIMIT ?3)
                     ORDER BY id"
                ),
                0,
                limit,
            ),
            Page::After { after, limit } => (
                format!(
                    "SELECT id, at, model, rollout, kind, message, data FROM events
                     WHERE {column} = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                ),
                after,
                limit,
            ),
        };
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![key, bound, limit as i64], event_row)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::contract::record;

    /// The Store contract, on SQLite.
    mod contract {
        use std::sync::Arc;

        use crate::store::contract::Database;
        use crate::store::{SqliteStore, Store};

        struct Sqlite(tempfile::TempDir);

        impl Database for Sqlite {
            fn open(&self) -> Arc<dyn Store> {
                Arc::new(SqliteStore::open(self.0.path()).expect("the store opens"))
            }

            fn another(&self) -> Box<dyn Database> {
                Box::new(Sqlite(tempfile::tempdir().unwrap()))
            }
        }

        crate::store_contract!(Box::new(Sqlite(tempfile::tempdir().unwrap())));
    }

    fn note(store: &SqliteStore, model: &str, n: usize) {
        for i in 0..n {
            store
                .set_loaded(
                    model,
                    "2",
                    i % 2 == 0,
                    NewEvent::new(
                        model,
                        "note".into(),
                        format!("{i}"),
                        serde_json::json!({"i": i}),
                    ),
                )
                .unwrap();
        }
    }

    #[test]
    fn retention_deletes_old_events_but_not_an_active_rollouts_nor_rollouts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.insert_version(&record("m", "1")).unwrap();
        store.insert_version(&record("m", "2")).unwrap();
        store.insert_version(&record("n", "1")).unwrap();
        store.insert_version(&record("n", "2")).unwrap();
        let spec =
            RolloutSpec::from_yaml("model: m\nversion: \"2\"\nstrategy: { basic: {} }").unwrap();
        let route = RoutePolicy::stable_only("1");
        let state = crate::strategy::initial_state(&route, 0);
        let ev = |m: &str| {
            vec![NewEvent::new(
                m,
                EventKind::RolloutStarted,
                "s".into(),
                serde_json::json!({}),
            )]
        };
        let ended = store
            .create_rollout(
                "n",
                RolloutKind::Basic,
                &spec,
                &state,
                None,
                ev("n"),
                Fence::Unfenced,
            )
            .unwrap()
            .unwrap();
        let mut done = state.clone();
        done.phase = Phase::Succeeded;
        store
            .update_rollout(ended.id, &done, ev("n"), None, Fence::Unfenced)
            .unwrap();
        let active = store
            .create_rollout(
                "m",
                RolloutKind::Basic,
                &spec,
                &state,
                None,
                ev("m"),
                Fence::Unfenced,
            )
            .unwrap()
            .unwrap();
        // Every event so far is "old"; one more is recorded "now".
        store
            .lock()
            .execute("UPDATE events SET at = '2020-01-01T00:00:00.000Z'", [])
            .unwrap();
        note(&store, "m", 1);
        let deleted = store
            .delete_events_before("2021-01-01T00:00:00.000Z")
            .unwrap();
        let left: Vec<(Option<String>, String)> = ["m", "n"]
            .iter()
            .flat_map(|m| store.events(m, Page::Latest { limit: 100 }).unwrap())
            .map(|e| (e.rollout, e.kind.to_string()))
            .collect();
        assert_eq!(
            left,
            [
                (Some(active.name()), "rollout_started".to_string()),
                (None, "note".to_string())
            ],
            "the active rollout's event and the recent one stay"
        );
        assert_eq!(
            deleted, 8,
            "both models' registration events (3 each) and the ended rollout's 2"
        );
        assert!(
            store.rollout(ended.id).unwrap().is_some(),
            "rollout records stay"
        );
        assert_eq!(store.rollouts("m", 10).unwrap().len(), 1);
    }

    #[test]
    fn an_oversized_event_is_stored_as_a_bounded_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.insert_version(&record("m", "1")).unwrap();
        store.insert_version(&record("m", "2")).unwrap();
        let huge = "x".repeat(15 << 20);
        let event = NewEvent::new(
            "m",
            "analysis".into(),
            "y".repeat(100_000),
            serde_json::json!({"checks": huge, "by": "ci"}),
        );
        store.set_loaded("m", "2", true, event).unwrap();
        let stored = store
            .events("m", Page::Latest { limit: 1 })
            .unwrap()
            .remove(0);
        let size = serde_json::to_string(&stored.data).unwrap().len();
        assert!(size < 1024, "{size} bytes");
        assert_eq!(stored.data["by"], "ci", "small fields are kept");
        assert_eq!(
            stored.data["truncated"]["limit"],
            super::super::MAX_EVENT_DATA_BYTES
        );
        assert_eq!(
            stored.data["truncated"]["bytes"],
            (15 << 20) + r#"{"checks":"","by":"ci"}"#.len()
        );
        assert!(stored.message.len() < 4200, "{}", stored.message.len());
        assert!(
            stored
                .message
                .ends_with("(cut: the message was 100000 bytes)")
        );
        // A small event is stored as it is.
        let small = NewEvent::new(
            "m",
            "k".into(),
            "fine".into(),
            serde_json::json!({"a": [1, 2]}),
        );
        assert_eq!(small.clone().bounded(), small);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("ferry.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
