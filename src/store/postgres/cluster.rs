//! The route version, its announcement and the instances table on
//! PostgreSQL. Every change of what serves grows the route version by one
//! in its own transaction and sends `NOTIFY ferry_changes` with
//! `"<version> <model>"`: PostgreSQL delivers a notification at commit, so
//! no instance hears of a change that is not committed. Each instance
//! listens on a connection of its own, outside the pool ([`listen`], one
//! per [`Channel`]: these changes, and the commands of `commands.rs`).

use std::time::Duration;

use tokio_postgres::{AsyncMessage, GenericClient, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Db, Result2, json, to_json};
use crate::records::{InstanceRecord, InstanceReport};
use crate::store::CHANGES_CHANNEL;
use crate::units::now_ms;

/// The migration that adds them.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE route_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  BIGINT NOT NULL
);
INSERT INTO route_version (id, version) VALUES (1, 0);
ALTER TABLE models ADD COLUMN route_version BIGINT NOT NULL DEFAULT 0;
CREATE INDEX models_by_route_version ON models(route_version);
CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    url            TEXT NOT NULL,
    version        TEXT NOT NULL,
    started_at     TEXT NOT NULL,
    last_seen      BIGINT NOT NULL,
    route_version  BIGINT NOT NULL,
    warm           TEXT NOT NULL,
    failures       TEXT NOT NULL
);
"#;

/// Records, in the transaction `tx`, that what serves `model` changed: the
/// route version grows by one, becomes the model's, and is announced at
/// commit. The row lock on `route_version` orders versions as commits.
pub(super) async fn changed(tx: &Transaction<'_>, model: &str) -> Result2<i64> {
    let version = next_version(tx).await?;
    tx.execute(
        "UPDATE models SET route_version = $2 WHERE name = $1",
        &[&model, &version],
    )
    .await?;
    let payload = format!("{version} {model}");
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload])
        .await?;
    Ok(version)
}

/// The next route version, taken in `tx` (its row lock orders versions as
/// commits).
async fn next_version(tx: &Transaction<'_>) -> Result2<i64> {
    Ok(tx
        .query_one(
            "UPDATE route_version SET version = version + 1 RETURNING version",
            &[],
        )
        .await?
        .try_get(0)?)
}

/// [`changed`] for the model a rollout belongs to.
pub(super) async fn rollout_changed(tx: &Transaction<'_>, id: i64) -> Result2<()> {
    let model: String = tx
        .query_one("SELECT model FROM rollouts WHERE id = $1", &[&id])
        .await?
        .try_get(0)?;
    changed(tx, &model).await.map(drop)
}

/// Records that every model changed (a copy restored into the store).
pub(super) async fn all_changed(tx: &Transaction<'_>) -> Result2<()> {
    let version = next_version(tx).await?;
    tx.execute("UPDATE models SET route_version = $1", &[&version])
        .await?;
    let payload = format!("{version} *");
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &payload])
        .await?;
    Ok(())
}

pub(super) async fn latest(db: &Db) -> Result2<i64> {
    let client = db.client().await?;
    Ok(client
        .query_one("SELECT version FROM route_version", &[])
        .await?
        .try_get(0)?)
}

pub(super) async fn changed_since(db: &Db, after: i64) -> Result2<Vec<(String, i64)>> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT name, route_version FROM models WHERE route_version > $1 ORDER BY route_version",
            &[&after],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

pub(super) async fn report(client: &impl GenericClient, r: &InstanceReport) -> Result2<()> {
    client
        .execute(
            "INSERT INTO instances (id, url, version, started_at, last_seen, route_version, warm, failures)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET url = $2, version = $3, started_at = $4,
               last_seen = $5, route_version = $6, warm = $7, failures = $8",
            &[
                &r.id,
                &r.url,
                &r.version,
                &r.started_at,
                &(now_ms() as i64),
                &r.route_version,
                &to_json(&r.warm),
                &to_json(&r.failures),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn instances(db: &Db) -> Result2<Vec<InstanceRecord>> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT id, url, version, started_at, last_seen, route_version, warm, failures
             FROM instances ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(InstanceRecord {
                report: InstanceReport {
                    id: r.try_get(0)?,
                    url: r.try_get(1)?,
                    version: r.try_get(2)?,
                    started_at: r.try_get(3)?,
                    route_version: r.try_get(5)?,
                    warm: json(r, 6, "an instance's warm versions")?,
                    failures: json(r, 7, "an instance's load failures")?,
                },
                last_seen_ms: r.try_get::<_, i64>(4)?.max(0) as u64,
            })
        })
        .collect()
}

pub(super) async fn forget(db: &Db, before_ms: u64) -> Result2<usize> {
    let client = db.client().await?;
    let n = client
        .execute(
            "DELETE FROM instances WHERE last_seen < $1",
            &[&(before_ms as i64)],
        )
        .await?;
    Ok(n as usize)
}

/// Removes one instance's row (it stopped gracefully).
pub(super) async fn remove(client: &impl GenericClient, id: &str) -> Result2<()> {
    client
        .execute("DELETE FROM instances WHERE id = $1", &[&id])
        .await?;
    Ok(())
}

/// A channel an instance listens on: announcements whose payload starts
/// with a number, folded into the value a `watch` hands on.
pub(super) struct Channel {
    pub name: &'static str,
    /// What it announces, for the log.
    pub what: &'static str,
    /// Reads one number once listening (again after every reconnect),
    /// folded in like one heard: what was announced while not listening.
    pub latest: &'static str,
    /// Folds a number heard into the value handed on; true when it changed.
    pub fold: fn(&mut i64, i64) -> bool,
}

/// Changes of what serves: the latest route version.
pub(super) const CHANGES: Channel = Channel {
    name: CHANGES_CHANNEL,
    what: "changes",
    latest: "SELECT version FROM route_version",
    fold: bump,
};

/// How long the listener waits before connecting again after its
/// connection broke (the periodic check covers what it misses meanwhile).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Listens for announced changes on a connection of its own (a pooled one
/// would be handed to other work) and sends each announced route version
/// to `tx`, reconnecting when the connection breaks; ends when nobody
/// receives any more.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    shown: String,
    channel: &'static Channel,
    tx: tokio::sync::watch::Sender<i64>,
) {
    let mut said = false;
    while !tx.is_closed() {
        match listen_once(&config, tls.clone(), channel, &tx).await {
            Ok(()) => return,
            Err(e) if !said => {
                tracing::warn!(
                    "listening for {} on {shown}: {e}; connecting again every {RECONNECT_AFTER:?} (they are caught by the periodic check meanwhile)",
                    channel.what
                );
                said = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channel: &Channel,
    tx: &tokio::sync::watch::Sender<i64>,
) -> Result<(), String> {
    let (client, mut connection) = config
        .connect(tls)
        .await
        .map_err(|e| super::failure::chain(&e))?;
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if notes_tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    let listening = async {
        client
            .batch_execute(&format!("LISTEN {}", channel.name))
            .await?;
        client
            .query_one(channel.latest, &[])
            .await?
            .try_get::<_, i64>(0)
    };
    // Connected again: whatever was announced meanwhile is caught by a look
    // at the latest number.
    let latest = listening.await.map_err(|e| super::failure::chain(&e))?;
    tx.send_if_modified(|v| (channel.fold)(v, latest));
    while let Some(payload) = notes.recv().await {
        if let Some(number) = payload.split(' ').next().and_then(|v| v.parse().ok()) {
            tx.send_if_modified(|v| (channel.fold)(v, number));
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e.to_string()),
        _ => Err("the server closed the connection".into()),
    }
}

fn bump(current: &mut i64, seen: i64) -> bool {
    if seen > *current {
        *current = seen;
        return true;
    }
    false
}
