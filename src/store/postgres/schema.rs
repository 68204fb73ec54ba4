//! The PostgreSQL schema and its migrations, counted in `schema_version` and
//! applied at start under an advisory lock, so that instances starting at the
//! same moment apply them once; a newer schema than this Ferry knows is
//! refused.

use super::failure::Failure;
use super::{Db, Result2};
use crate::store::StoreError;

/// Schema migrations, applied in order; `schema_version` counts them.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE models (
    name        TEXT PRIMARY KEY,
    stable      TEXT,
    created_at  TEXT NOT NULL,
    route       TEXT,
    unloaded    TEXT
);
CREATE TABLE versions (
    model       TEXT NOT NULL REFERENCES models(name),
    version     TEXT NOT NULL,
    source      TEXT NOT NULL,
    signature   TEXT NOT NULL,
    labels      TEXT NOT NULL,
    settings    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    loaded      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (model, version)
);
CREATE TABLE events (
    id       BIGSERIAL PRIMARY KEY,
    at       TEXT NOT NULL,
    model    TEXT NOT NULL,
    rollout  TEXT,
    kind     TEXT NOT NULL,
    message  TEXT NOT NULL,
    data     TEXT NOT NULL
);
CREATE INDEX events_by_model ON events(model, id);
CREATE INDEX events_by_rollout ON events(rollout, id);
CREATE TABLE rollouts (
    id          BIGSERIAL PRIMARY KEY,
    model       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    active      BOOLEAN NOT NULL,
    undoes      BIGINT,
    report      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX rollouts_by_model ON rollouts(model, id);
CREATE UNIQUE INDEX rollouts_one_active ON rollouts(model) WHERE active;
CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        BIGINT NOT NULL,
    chunks      INTEGER NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE blob_chunks (
    digest  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    bytes   BYTEA NOT NULL,
    PRIMARY KEY (digest, seq)
);
-- Model weights do not compress: store chunks as they are.
ALTER TABLE blob_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
"#,
    super::cluster::MIGRATION,
    super::lease::MIGRATION,
    super::commands::MIGRATION,
    super::telemetry::MIGRATION,
];

/// The advisory lock migrations run under ("ferry" + 1).
pub const MIGRATE_LOCK: i64 = 0x6665_7272_7900_0001;
pub(super) async fn migrate(db: &Db) -> Result2<()> {
    let mut client = db.client().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let result = apply_migrations(&mut client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(())
}

async fn apply_migrations(client: &mut deadpool_postgres::Object) -> Result2<()> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .await?;
    let current: i32 = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(Failure::Store(StoreError::TooNew {
            found: current.into(),
            known: known.into(),
        }));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!("store schema migrated to version {}", i + 1);
    }
    Ok(())
}
