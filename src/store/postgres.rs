//! The shared store: one PostgreSQL database that several Ferry instances
//! use at once — models, versions, routes, rollouts, events, and the
//! artifacts themselves ([`BlobStore`], chunked in `blob_chunks`).
//!
//! The [`Store`] trait is synchronous and is called from tokio worker
//! threads and from current-thread test runtimes, where `block_on` panics.
//! So the store owns a small tokio runtime of its own ([`super::bridge`]):
//! each method spawns its work there (`tokio-postgres` through a `deadpool-postgres` pool) and
//! waits for the reply on a channel, blocking the calling thread as long as a
//! SQLite disk write would.
//!
//! Writes keep SQLite's rules: every method is one transaction with its
//! events, and write transactions take one advisory lock
//! ([`WRITE_LOCK`]), so they are serialised across every instance as
//! SQLite serialises its writers — exactly one first version becomes stable,
//! at most one rollout per model is active, and event ids commit in order
//! (a reader paging events after an id never misses one committed later).
//! Migrations run at start under another advisory lock, so instances that
//! start together apply them once.
//!
//! Every call is bounded in time ([`OP_TIMEOUT`]; connecting, [`CONNECT_TIMEOUT`]),
//! so a server that is down, or a network that drops packets without a
//! reset, fails a control request within seconds, never after the
//! operating system's TCP timeout; pooled connections are checked before
//! each use (deadpool's `Verified` recycling), so the pool heals by itself
//! when the server is back. The outage is logged once when it starts and
//! once when it ends ([`failure::OutageLog`]). TLS to the server comes from
//! the URL's `sslmode` and `sslrootcert` ([`tls`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod blobs;
mod cluster;
mod commands;
mod failure;
mod lease;
mod schema;
mod telemetry;
pub mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{GenericClient, Row, Transaction};

pub use failure::{PgFailure, PgProblem};

use super::lease::{Campaign, Fence, Leader, LeaseSettings, Term};
use super::url::redact;
use super::{
    Counts, Event, Inserted, NewEvent, NotCreated, Page, RolloutRecord, Snapshot, Store, StoreError,
};
use crate::gateway::RoutePolicy;
use crate::records::EventKind;
use crate::records::{InstanceRecord, InstanceReport, ModelRecord, ServingSettings, VersionRecord};
use crate::spec::RolloutSpec;
use crate::strategy::{Phase, RolloutKind, RolloutState};
use crate::units::now_rfc3339;
use failure::{Failure, OutageLog, Transition, corrupt};

/// The advisory lock every write transaction takes ("ferry" + 2).
pub const WRITE_LOCK: i64 = 0x6665_7272_7900_0002;
/// A blob is stored in chunks of this size.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Connections one instance keeps to the server at most.
const POOL_SIZE: usize = 8;
/// The longest one call may take before the server counts as unreachable:
/// a control request during an outage fails within it. Every call is one
/// small transaction or one 1 MiB chunk; a healthy server answers in
/// milliseconds.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a bulk call may take: a copy's snapshot, restore, counts
/// and pages of events (`ferry store copy`), a migration, a retention pass.
const BULK_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest opening a connection may take (TCP, TLS, login).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write transaction may sit idle — its client sending nothing —
/// before PostgreSQL ends its session and so frees the write lock: a writer
/// paused mid-transaction (SIGSTOP, a frozen VM) holds every instance's
/// writes up for at most this long. Our writers never pause between their
/// statements; a bulk write streams without gaps.
pub const WRITE_IDLE_LIMIT: Duration = Duration::from_secs(10);

type Result2<T> = Result<T, Failure>;

fn json<T: serde::de::DeserializeOwned>(row: &Row, idx: usize, what: &str) -> Result2<T> {
    let text: String = row.try_get(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(what, e))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialise")
}

const VERSION_COLUMNS: &str =
    "model, version, source, signature, labels, settings, created_at, loaded";

fn version_row(row: &Row) -> Result2<VersionRecord> {
    Ok(VersionRecord {
        model: row.try_get(0)?,
        version: row.try_get(1)?,
        source: json(row, 2, "version source")?,
        signature: json(row, 3, "version signature")?,
        labels: json(row, 4, "version labels")?,
        settings: json(row, 5, "serving settings")?,
        created_at: row.try_get(6)?,
        loaded: row.try_get(7)?,
    })
}

const MODEL_COLUMNS: &str = "name, stable, created_at, unloaded";

fn model_row(r: &Row) -> Result2<ModelRecord> {
    Ok(ModelRecord {
        name: r.try_get(0)?,
        stable: r.try_get(1)?,
        created_at: r.try_get(2)?,
        unloaded: r.try_get(3)?,
    })
}

const EVENT_COLUMNS: &str = "id, at, model, rollout, kind, message, data";

fn event_row(r: &Row) -> Result2<Event> {
    Ok(Event {
        id: r.try_get(0)?,
        at: r.try_get(1)?,
        model: r.try_get(2)?,
        rollout: r.try_get(3)?,
        kind: EventKind::parse(&r.try_get::<_, String>(4)?),
        message: r.try_get(5)?,
        data: json(r, 6, "event data")?,
    })
}

const ROLLOUT_COLUMNS: &str =
    "id, model, kind, spec, state, undoes, report, created_at, updated_at";

fn rollout_row(row: &Row) -> Result2<RolloutRecord> {
    let report: Option<String> = row.try_get(6)?;
    Ok(RolloutRecord {
        id: row.try_get(0)?,
        model: row.try_get(1)?,
        kind: super::stored_rollout_kind(&row.try_get::<_, String>(2)?)
            .map_err(|e| corrupt("rollout kind", e))?,
        spec: json(row, 3, "rollout spec")?,
        state: json(row, 4, "rollout state")?,
        undoes: row.try_get(5)?,
        report: report
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| corrupt("rollout report", e))?,
        created_at: row.try_get(7)?,
        updated_at: row.try_get(8)?,
    })
}

fn rows<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result2<T>) -> Result2<Vec<T>> {
    rows.iter().map(f).collect()
}

/// Writes a version's row as it is (registration, and a copy's restore).
async fn write_version(tx: &impl GenericClient, v: &VersionRecord) -> Result2<()> {
    let sql =
        format!("INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
    tx.execute(
        &sql,
        &[
            &v.model,
            &v.version,
            &to_json(&v.source),
            &to_json(&v.signature),
            &to_json(&v.labels),
            &to_json(&v.settings),
            &v.created_at,
            &v.loaded,
        ],
    )
    .await?;
    Ok(())
}

async fn insert_event(tx: &impl GenericClient, e: &NewEvent) -> Result2<()> {
    let e = e.clone().bounded();
    tx.execute(
        "INSERT INTO events (at, model, rollout, kind, message, data) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&now_rfc3339(), &e.model, &e.rollout, &e.kind.as_str(), &e.message, &to_json(&e.data)],
    )
    .await?;
    Ok(())
}

/// What every call works with, moved onto the store's runtime.
struct Db {
    pool: Pool,
}

impl Db {
    async fn client(&self) -> Result2<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Begins a write transaction: serialised with every other writer, and
    /// ended by the server if its client goes silent ([`WRITE_IDLE_LIMIT`]).
    async fn begin<'a>(
        &self,
        client: &'a mut deadpool_postgres::Object,
    ) -> Result2<deadpool_postgres::Transaction<'a>> {
        let tx = client.transaction().await?;
        // One round trip: the idle bound for this transaction only, then
        // the lock.
        tx.batch_execute(&format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}; SELECT pg_advisory_xact_lock({WRITE_LOCK})",
            WRITE_IDLE_LIMIT.as_millis()
        ))
        .await?;
        Ok(tx)
    }

    async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result2<()> {
        crate::crashpoint::reach("store.before_commit");
        tx.commit().await?;
        crate::crashpoint::reach("store.after_commit");
        Ok(())
    }
}

/// The PostgreSQL store (see the module doc).
pub struct PostgresStore {
    db: Arc<Db>,
    /// Runs every call; shut down without waiting when the store is dropped
    /// (dropping a runtime may not block on an async thread).
    runtime: Option<tokio::runtime::Runtime>,
    /// The URL without its password, for errors and logs.
    shown: String,
    /// How the change listener connects (outside the pool).
    config: tokio_postgres::Config,
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    /// Whether the server is reachable, for the two log lines of an outage.
    outage: OutageLog,
    /// What this instance believes about its lease ([`lease::campaign`]
    /// renews it once [`Store::campaign`] started it).
    campaign: Arc<std::sync::Mutex<Campaign>>,
    /// Whether the campaign was started (it is started once).
    campaigning: AtomicBool,
    /// Announced commands, heard on one connection for the whole instance
    /// once something asks ([`commands`]).
    command_notices: std::sync::OnceLock<tokio::sync::watch::Receiver<i64>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl PostgresStore {
    /// Connects to `url`, checks the server answers, and migrates the schema
    /// (under an advisory lock: instances starting together migrate once).
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let shown = redact(url);
        let fail = |detail: String| {
            StoreError::Postgres(PgFailure {
                url: shown.clone(),
                problem: PgProblem::Other,
                detail,
            })
        };
        let (plain, tls) = tls::split(url).map_err(&fail)?;
        let mut config: tokio_postgres::Config = plain
            .parse()
            .map_err(|e| fail(format!("the URL is not valid: {e}")))?;
        config
            .application_name("ferry")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            // Data the server does not acknowledge (a cut that drops
            // packets) ends the connection after this.
            .tcp_user_timeout(OP_TIMEOUT);
        let connector = tls.apply(&mut config).map_err(&fail)?;
        let runtime = super::bridge::runtime("ferry-store", 2)
            .map_err(|e| fail(format!("cannot start the store's threads: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            connector.clone(),
            ManagerConfig {
                // A connection the network cut without a reset still looks
                // open: a query proves it before it is used again.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(OP_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
                .recycle_timeout(Some(Duration::from_secs(1)))
                .build()
                .map_err(|e| fail(format!("cannot make a connection pool: {e}")))?
        };
        let store = PostgresStore {
            db: Arc::new(Db { pool }),
            runtime: Some(runtime),
            shown,
            config,
            connector,
            outage: OutageLog::default(),
            campaign: Arc::new(std::sync::Mutex::new(Campaign::new(
                LeaseSettings::default(),
            ))),
            campaigning: AtomicBool::new(false),
            command_notices: std::sync::OnceLock::new(),
        };
        // A migration may rewrite a large table: a bulk call's time.
        store.call(BULK_TIMEOUT, |db| async move { schema::migrate(&db).await })?;
        Ok(store)
    }

    /// The URL without its password.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Runs `work` on the store's runtime and waits for its answer, at most
    /// [`OP_TIMEOUT`].
    fn run<T, F>(&self, work: impl FnOnce(Arc<Db>) -> F + Send + 'static) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result2<T>> + Send + 'static,
    {
        self.run_within(OP_TIMEOUT, work)
    }

    /// Runs `work` on the store's runtime and waits for its answer, at most
    /// `limit`; an outage's start and end are logged here.
    fn run_within<T, F>(
        &self,
        limit: Duration,
        work: impl FnOnce(Arc<Db>) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result2<T>> + Send + 'static,
    {
        let answer = self.call(limit, work);
        let reached = answer.as_ref().err().is_none_or(|e| !e.unreachable());
        match (self.outage.record(reached, Instant::now()), &answer) {
            (Some(Transition::Down), Err(e)) => tracing::error!(
                "{e}. Until it is back, control requests that need it answer 503 and change nothing; inference goes on with the routes this instance serves"
            ),
            (Some(Transition::Back(after)), _) => tracing::warn!(
                "the store at {} is reachable again after {:.1} s; control requests work again",
                self.shown,
                after.as_secs_f64()
            ),
            _ => {}
        }
        answer
    }

    /// Runs `work` on the store's runtime and waits for its answer, at most
    /// `limit` (the outage log not told: [`PostgresStore::open`] says its
    /// own failure).
    fn call<T, F>(
        &self,
        limit: Duration,
        work: impl FnOnce(Arc<Db>) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result2<T>> + Send + 'static,
    {
        let db = self.db.clone();
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the store");
        let answer = super::bridge::wait(runtime, async move {
            match tokio::time::timeout(limit, work(db)).await {
                Ok(answer) => answer,
                Err(_) => Err(Failure::Timeout(limit)),
            }
        });
        answer
            .unwrap_or(Err(Failure::Timeout(limit)))
            .map_err(|f| f.into_store_error(&self.shown))
    }

    /// Runs `work` in one write transaction (see [`Db::begin`]).
    fn write<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: for<'t> FnOnce(&'t Transaction<'t>) -> futures_box::BoxFuture<'t, Result2<T>>
            + Send
            + 'static,
    {
        self.write_within(OP_TIMEOUT, work)
    }

    /// [`PostgresStore::write`] within `limit`. A connection lost once the
    /// commit was sent leaves the change unknown, and the error says so
    /// ([`PgProblem::CommitUnknown`]); lost before, nothing was changed.
    fn write_within<T, W>(&self, limit: Duration, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: for<'t> FnOnce(&'t Transaction<'t>) -> futures_box::BoxFuture<'t, Result2<T>>
            + Send
            + 'static,
    {
        let committing = Arc::new(AtomicBool::new(false));
        let sent = committing.clone();
        let answer = self.run_within(limit, move |db| async move {
            let mut client = db.client().await?;
            let tx = db.begin(&mut client).await?;
            let out = work(&tx).await?;
            sent.store(true, Ordering::Release);
            Db::commit(tx).await?;
            Ok(out)
        });
        answer.map_err(|e| match e {
            StoreError::Postgres(mut f)
                if f.problem == PgProblem::Unreachable && committing.load(Ordering::Acquire) =>
            {
                f.problem = PgProblem::CommitUnknown;
                StoreError::Postgres(f)
            }
            e => e,
        })
    }
}

impl PostgresStore {
    /// A rollout write refused by fencing ends this instance's leadership
    /// at once, said once here.
    fn noting_fence<T>(&self, answer: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e @ StoreError::Fenced { term, .. }) = &answer
            && lease::lock(&self.campaign).fenced(*term)
        {
            tracing::warn!("{e}; this instance follows from now on");
        }
        answer
    }
}

/// A boxed future borrowing a transaction: what [`PostgresStore::write`]'s
/// work returns.
mod futures_box {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

impl Store for PostgresStore {
    fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        self.run(|db| async move {
            let client = db.client().await?;
            let sql = format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name");
            rows(client.query(&sql, &[]).await?, model_row)
        })
    }

    fn model(&self, model: &str) -> Result<Option<ModelRecord>, StoreError> {
        let model = model.to_string();
        self.run(|db| async move {
            let client = db.client().await?;
            let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1");
            client
                .query_opt(&sql, &[&model])
                .await?
                .as_ref()
                .map(model_row)
                .transpose()
        })
    }

    fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let model = model.to_string();
        self.run(|db| async move {
            let client = db.client().await?;
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 ORDER BY created_at, version"
            );
            rows(client.query(&sql, &[&model]).await?, version_row)
        })
    }

    fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError> {
        let (model, version) = (model.to_string(), version.to_string());
        self.run(|db| async move {
            let client = db.client().await?;
            select_version(&**client, &model, &version).await
        })
    }

    fn insert_version(&self, v: &VersionRecord) -> Result<Inserted, StoreError> {
        let v = v.clone();
        self.write(move |tx| Box::pin(async move { insert_version(tx, &v).await }))
    }

    fn update_settings(
        &self,
        model: &str,
        version: &str,
        settings: &ServingSettings,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        let args = (model.to_string(), version.to_string(), to_json(settings));
        self.write(move |tx| {
            Box::pin(async move {
                let (model, version, settings) = &args;
                tx.execute(
                    "UPDATE versions SET settings = $3 WHERE model = $1 AND version = $2",
                    &[model, version, settings],
                )
                .await?;
                insert_event(tx, &event).await?;
                cluster::changed(tx, &args.0).await.map(drop)
            })
        })
    }

    fn set_loaded(
        &self,
        model: &str,
        version: &str,
        loaded: bool,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        let args = (model.to_string(), version.to_string());
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE versions SET loaded = $3 WHERE model = $1 AND version = $2",
                    &[&args.0, &args.1, &loaded],
                )
                .await?;
                insert_event(tx, &event).await?;
                cluster::changed(tx, &args.0).await.map(drop)
            })
        })
    }

    fn set_unloaded(
        &self,
        model: &str,
        by: Option<&str>,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        let args = (model.to_string(), by.map(str::to_string));
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE models SET unloaded = $2 WHERE name = $1",
                    &[&args.0, &args.1],
                )
                .await?;
                insert_event(tx, &event).await?;
                cluster::changed(tx, &args.0).await.map(drop)
            })
        })
    }

    fn remove_version(
        &self,
        model: &str,
        version: &str,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        let args = (model.to_string(), version.to_string());
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "DELETE FROM versions WHERE model = $1 AND version = $2",
                    &[&args.0, &args.1],
                )
                .await?;
                insert_event(tx, &event).await?;
                cluster::changed(tx, &args.0).await.map(drop)
            })
        })
    }

    fn route(&self, model: &str) -> Result<Option<RoutePolicy>, StoreError> {
        let model = model.to_string();
        self.run(|db| async move {
            let client = db.client().await?;
            let row = client
                .query_opt("SELECT route FROM models WHERE name = $1", &[&model])
                .await?;
            let text: Option<String> = match row {
                Some(row) => row.try_get(0)?,
                None => None,
            };
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| corrupt(&format!("route of model {model}"), e))
        })
    }

    fn set_route(
        &self,
        model: &str,
        policy: &RoutePolicy,
        event: NewEvent,
    ) -> Result<(), StoreError> {
        let args = (model.to_string(), to_json(policy), policy.stable.clone());
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE models SET route = $2, stable = $3 WHERE name = $1",
                    &[&args.0, &args.1, &args.2],
                )
                .await?;
                insert_event(tx, &event).await?;
                cluster::changed(tx, &args.0).await.map(drop)
            })
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
        let new = NewRollout {
            model: model.to_string(),
            kind: kind.to_string(),
            spec: to_json(spec),
            state: to_json(state),
            active: state.phase.is_active(),
            undoes,
            events,
        };
        let answer = self.write(move |tx| {
            Box::pin(async move {
                lease::check(tx, fence).await?;
                create_rollout(tx, new).await
            })
        });
        self.noting_fence(answer)
    }

    fn update_rollout(
        &self,
        id: i64,
        state: &RolloutState,
        events: Vec<NewEvent>,
        route_changed: Option<NewEvent>,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let (text, active) = (to_json(state), state.phase.is_active());
        let route = (to_json(&state.route), state.route.stable.clone());
        let answer = self.write(move |tx| {
            Box::pin(async move {
                lease::check(tx, fence).await?;
                // Whether the phase moved: the other instances show it.
                let phase_moved: bool = tx
                    .query_one(
                        "WITH old AS (SELECT state FROM rollouts WHERE id = $1 FOR UPDATE)
                         UPDATE rollouts SET state = $2, active = $3, updated_at = $4 WHERE id = $1
                         RETURNING (SELECT (old.state::jsonb ->> 'phase') IS DISTINCT FROM ($2::text::jsonb ->> 'phase') FROM old)",
                        &[&id, &text, &active, &now_rfc3339()],
                    )
                    .await?
                    .try_get::<_, Option<bool>>(0)?
                    .unwrap_or(true);
                for mut e in events {
                    e.rollout = Some(format!("r-{id}"));
                    insert_event(tx, &e).await?;
                }
                // Only a change of what serves, or of the phase, is
                // announced to the other instances (a step that counted
                // comparisons or judged a window is not).
                if route_changed.is_none() && !phase_moved {
                    return Ok(());
                }
                if let Some(event) = route_changed {
                    tx.execute(
                        "UPDATE models SET route = $2, stable = $3
                         WHERE name = (SELECT model FROM rollouts WHERE id = $1)",
                        &[&id, &route.0, &route.1],
                    )
                    .await?;
                    insert_event(tx, &event).await?;
                }
                cluster::rollout_changed(tx, id).await
            })
        });
        self.noting_fence(answer)
    }

    fn set_rollout_report(
        &self,
        id: i64,
        report: &serde_json::Value,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let text = to_json(report);
        let answer = self.write(move |tx| {
            Box::pin(async move {
                lease::check(tx, fence).await?;
                tx.execute(
                    "UPDATE rollouts SET report = $2 WHERE id = $1",
                    &[&id, &text],
                )
                .await?;
                Ok(())
            })
        });
        self.noting_fence(answer)
    }

    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError> {
        self.run(move |db| async move {
            let client = db.client().await?;
            select_rollout(&**client, id).await
        })
    }

    fn rollouts(&self, model: &str, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        let model = model.to_string();
        self.run(move |db| async move {
            let client = db.client().await?;
            let sql = format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE model = $1 ORDER BY id DESC LIMIT $2"
            );
            rows(
                client.query(&sql, &[&model, &(limit as i64)]).await?,
                rollout_row,
            )
        })
    }

    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        self.run(|db| async move {
            let client = db.client().await?;
            let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE active ORDER BY id");
            rows(client.query(&sql, &[]).await?, rollout_row)
        })
    }

    fn rollout_events(&self, id: i64, page: Page) -> Result<Vec<Event>, StoreError> {
        self.page_of("rollout", format!("r-{id}"), page)
    }

    fn events(&self, model: &str, page: Page) -> Result<Vec<Event>, StoreError> {
        self.page_of("model", model.to_string(), page)
    }

    fn delete_events_before(&self, cutoff: &str) -> Result<usize, StoreError> {
        let cutoff = cutoff.to_string();
        // A retention pass may delete a long history at once.
        self.write_within(BULK_TIMEOUT, move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "DELETE FROM events WHERE at < $1 AND (rollout IS NULL OR rollout NOT IN
                           (SELECT 'r-' || id FROM rollouts WHERE active))",
                        &[&cutoff],
                    )
                    .await?;
                Ok(n as usize)
            })
        })
    }

    fn known_unreachable(&self) -> bool {
        self.outage.is_down()
    }

    fn campaign(&self, instance: &str, settings: LeaseSettings) {
        if self.campaigning.swap(true, Ordering::AcqRel) {
            return;
        }
        *lease::lock(&self.campaign) = Campaign::new(settings);
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the store");
        runtime.spawn(lease::campaign(
            self.config.clone(),
            self.connector.clone(),
            self.shown.clone(),
            instance.to_string(),
            settings,
            self.campaign.clone(),
        ));
    }

    fn leading(&self) -> Option<Term> {
        lease::lock(&self.campaign).leading(Instant::now())
    }

    fn leader(&self) -> Result<Option<Leader>, StoreError> {
        self.run(|db| async move {
            let client = db.client().await?;
            lease::leader(&**client).await
        })
    }

    fn identity(&self) -> Result<String, StoreError> {
        self.run(|db| async move {
            let client = db.client().await?;
            // The cluster's system identifier (set by initdb) and the
            // database's oid: the same database whatever host name reached it.
            let row = client
                .query_one(
                    "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                            (SELECT oid::text FROM pg_database WHERE datname = current_database())",
                    &[],
                )
                .await?;
            let (cluster, database): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            Ok(format!("postgres:{cluster}:{database}"))
        })
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        self.run_within(BULK_TIMEOUT, |db| async move {
            let client = db.client().await?;
            let row = client
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM models), (SELECT COUNT(*) FROM versions),
                            (SELECT COUNT(*) FROM rollouts), (SELECT COUNT(*) FROM events)",
                    &[],
                )
                .await?;
            let n = |i: usize| row.try_get::<_, i64>(i).map(|n| n as u64);
            Ok(Counts {
                models: n(0)?,
                versions: n(1)?,
                rollouts: n(2)?,
                events: n(3)?,
            })
        })
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.run_within(BULK_TIMEOUT, |db| async move {
            let mut client = db.client().await?;
            // One consistent view of the three tables.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let sql = format!("SELECT {MODEL_COLUMNS}, route FROM models ORDER BY name");
            let mut models = Vec::new();
            for row in tx.query(&sql, &[]).await? {
                let route: Option<String> = row.try_get(4)?;
                let route = route
                    .map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| corrupt("a model's route", e))?;
                models.push((model_row(&row)?, route));
            }
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM versions ORDER BY model, created_at, version"
            );
            let versions = rows(tx.query(&sql, &[]).await?, version_row)?;
            let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY id");
            let rollouts = rows(tx.query(&sql, &[]).await?, rollout_row)?;
            tx.commit().await?;
            Ok(Snapshot {
                models,
                versions,
                rollouts,
            })
        })
    }

    fn event_log(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.run_within(BULK_TIMEOUT, move |db| async move {
            let client = db.client().await?;
            let sql =
                format!("SELECT {EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2");
            rows(
                client.query(&sql, &[&after, &(limit as i64)]).await?,
                event_row,
            )
        })
    }

    fn restore(&self, snapshot: &Snapshot, replace: bool) -> Result<(), StoreError> {
        let snapshot = snapshot.clone();
        self.write_within(BULK_TIMEOUT, move |tx| {
            Box::pin(async move { restore(tx, &snapshot, replace).await })
        })
    }

    fn route_version(&self) -> Result<i64, StoreError> {
        self.run(|db| async move { cluster::latest(&db).await })
    }

    fn changed_since(&self, after: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.run(move |db| async move { cluster::changed_since(&db, after).await })
    }

    fn report_instance(&self, report: &InstanceReport) -> Result<(), StoreError> {
        let report = report.clone();
        self.run(move |db| async move {
            let client = db.client().await?;
            cluster::report(&**client, &report).await
        })
    }

    fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.run(|db| async move { cluster::instances(&db).await })
    }

    fn keeps_buckets(&self) -> bool {
        true
    }

    fn flush_buckets(&self, flush: &crate::metrics::cluster::Flush) -> Result<(), StoreError> {
        let flush = flush.clone();
        self.run(move |db| async move { telemetry::flush(&db, &flush).await })
    }

    fn peer_buckets(
        &self,
        model: &str,
        after: u64,
        me: &str,
    ) -> Result<crate::metrics::cluster::Peers, StoreError> {
        let (model, me) = (model.to_string(), me.to_string());
        self.run(move |db| async move { telemetry::peers(&db, &model, after, &me).await })
    }

    fn prune_buckets(&self, before: u64) -> Result<usize, StoreError> {
        self.run(move |db| async move { telemetry::prune(&db, before).await })
    }

    fn forget_instances(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.run(move |db| async move { cluster::forget(&db, before_ms).await })
    }

    fn leave(&self, instance: &str) -> Result<(), StoreError> {
        let held = lease::lock(&self.campaign).resign(Instant::now());
        let instance = instance.to_string();
        self.run(move |db| async move {
            let client = db.client().await?;
            if let Some(term) = held {
                lease::resign(&**client, &instance, term).await?;
            }
            cluster::remove(&**client, &instance).await
        })
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        let (tx, rx) = tokio::sync::watch::channel(0);
        let runtime = self.runtime.as_ref()?;
        runtime.spawn(cluster::listen(
            self.config.clone(),
            self.connector.clone(),
            self.shown.clone(),
            &cluster::CHANGES,
            tx,
        ));
        Some(rx)
    }

    fn commands(&self) -> Option<&dyn super::commands::CommandQueue> {
        Some(self)
    }

    fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.write_within(BULK_TIMEOUT, move |tx| {
            Box::pin(async move {
                let sql = format!(
                    "INSERT INTO events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                );
                let statement = tx.prepare(&sql).await?;
                for e in &events {
                    tx.execute(
                        &statement,
                        &[
                            &e.id,
                            &e.at,
                            &e.model,
                            &e.rollout,
                            &e.kind.as_str(),
                            &e.message,
                            &to_json(&e.data),
                        ],
                    )
                    .await?;
                }
                move_sequence_past(tx, "events").await
            })
        })
    }
}

impl PostgresStore {
    /// A page of the events whose `column` (`model` or `rollout`) is `key`.
    fn page_of(
        &self,
        column: &'static str,
        key: String,
        page: Page,
    ) -> Result<Vec<Event>, StoreError> {
        self.run(move |db| async move {
            let client = db.client().await?;
            let (sql, after, limit) = match page {
                Page::Latest { limit } => (
                    format!(
                        "SELECT {EVENT_COLUMNS} FROM
                           (SELECT * FROM events WHERE {column} = $1 AND id > $2 ORDER BY id DESC LIMIT $3) AS latest
                         ORDER BY id"
                    ),
                    0,
                    limit,
                ),
                Page::After { after, limit } => (
                    format!(
                        "SELECT {EVENT_COLUMNS} FROM events
                         WHERE {column} = $1 AND id > $2 ORDER BY id LIMIT $3"
                    ),
                    after,
                    limit,
                ),
            };
            rows(
                client.query(&sql, &[&key, &after, &(limit as i64)]).await?,
                event_row,
            )
        })
    }
}

async fn select_version(
    client: &impl GenericClient,
    model: &str,
    version: &str,
) -> Result2<Option<VersionRecord>> {
    let sql = format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2");
    client
        .query_opt(&sql, &[&model, &version])
        .await?
        .as_ref()
        .map(version_row)
        .transpose()
}

async fn select_rollout(client: &impl GenericClient, id: i64) -> Result2<Option<RolloutRecord>> {
    let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1");
    client
        .query_opt(&sql, &[&id])
        .await?
        .as_ref()
        .map(rollout_row)
        .transpose()
}

async fn insert_version(tx: &Transaction<'_>, v: &VersionRecord) -> Result2<Inserted> {
    if let Some(existing) = select_version(tx, &v.model, &v.version).await? {
        return Ok(Inserted::Exists(Box::new(existing)));
    }
    let stable: Option<Option<String>> = tx
        .query_opt("SELECT stable FROM models WHERE name = $1", &[&v.model])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let becomes_stable = !matches!(stable, Some(Some(_)));
    if stable.is_none() {
        tx.execute(
            "INSERT INTO models (name, stable, created_at) VALUES ($1, NULL, $2)",
            &[&v.model, &v.created_at],
        )
        .await?;
    }
    write_version(tx, v).await?;
    let what = v.source.summary();
    let registered = NewEvent::new(
        &v.model,
        EventKind::VersionRegistered,
        format!("version {} registered: {what}", v.version),
        serde_json::json!({"version": v.version, "source": v.source, "labels": v.labels}),
    );
    insert_event(tx, &registered).await?;
    if becomes_stable {
        tx.execute(
            "UPDATE models SET stable = $2 WHERE name = $1",
            &[&v.model, &v.version],
        )
        .await?;
        let stable = NewEvent::new(
            &v.model,
            EventKind::StableSet,
            format!(
                "version {} is the stable version: it is the model's first version",
                v.version
            ),
            serde_json::json!({"version": v.version}),
        );
        insert_event(tx, &stable).await?;
    }
    cluster::changed(tx, &v.model).await?;
    Ok(Inserted::Created {
        stable: becomes_stable,
    })
}

/// A rollout to create, serialised before it crosses to the store's runtime.
struct NewRollout {
    model: String,
    kind: String,
    spec: String,
    state: String,
    active: bool,
    undoes: Option<i64>,
    events: Vec<NewEvent>,
}

async fn create_rollout(
    tx: &Transaction<'_>,
    new: NewRollout,
) -> Result2<Result<RolloutRecord, NotCreated>> {
    let sql = format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE model = $1 AND active");
    if let Some(active) = tx.query_opt(&sql, &[&new.model]).await? {
        return Ok(Err(NotCreated::Active(Box::new(rollout_row(&active)?))));
    }
    let now = now_rfc3339();
    let id: i64 = tx
        .query_one(
            "INSERT INTO rollouts (model, kind, spec, state, active, undoes, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING id",
            &[
                &new.model,
                &new.kind,
                &new.spec,
                &new.state,
                &new.active,
                &new.undoes,
                &now,
            ],
        )
        .await?
        .try_get(0)?;
    if let Some(undone) = new.undoes
        && let Some(row) = tx
            .query_opt("SELECT state FROM rollouts WHERE id = $1", &[&undone])
            .await?
    {
        let old: String = row.try_get(0)?;
        let mut old: RolloutState =
            serde_json::from_str(&old).map_err(|e| corrupt("rollout state", e))?;
        old.phase = Phase::RolledBack;
        old.message = format!("rolled back by r-{id}");
        tx.execute(
            "UPDATE rollouts SET state = $2, active = FALSE, updated_at = $3 WHERE id = $1",
            &[&undone, &to_json(&old), &now],
        )
        .await?;
    }
    for mut e in new.events {
        e.rollout = Some(format!("r-{id}"));
        insert_event(tx, &e).await?;
    }
    cluster::changed(tx, &new.model).await?;
    let record = select_rollout(tx, id)
        .await?
        .expect("the rollout was inserted in this transaction");
    Ok(Ok(record))
}

/// Moves a table's id sequence past its largest id (after ids were written
/// as they were).
async fn move_sequence_past(tx: &Transaction<'_>, table: &str) -> Result2<()> {
    tx.execute(
        &format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        ),
        &[],
    )
    .await?;
    Ok(())
}

async fn restore(tx: &Transaction<'_>, s: &Snapshot, replace: bool) -> Result2<()> {
    if replace {
        tx.batch_execute(
            "DELETE FROM events; DELETE FROM rollouts; DELETE FROM versions; DELETE FROM models;",
        )
        .await?;
    } else {
        let row = tx
            .query_one(
                "SELECT (SELECT COUNT(*) FROM models) + (SELECT COUNT(*) FROM rollouts), (SELECT COUNT(*) FROM events)",
                &[],
            )
            .await?;
        let (models, events): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if models + events > 0 {
            return Err(Failure::Store(StoreError::NotEmpty {
                models: models as u64,
                events: events as u64,
            }));
        }
    }
    for (m, route) in &s.models {
        tx.execute(
            "INSERT INTO models (name, stable, created_at, unloaded, route) VALUES ($1, $2, $3, $4, $5)",
            &[&m.name, &m.stable, &m.created_at, &m.unloaded, &route.as_ref().map(to_json)],
        )
        .await?;
    }
    for v in &s.versions {
        write_version(tx, v).await?;
    }
    for r in &s.rollouts {
        tx.execute(
            "INSERT INTO rollouts (id, model, kind, spec, state, active, undoes, report, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &r.id,
                &r.model,
                &r.kind.to_string(),
                &to_json(&r.spec),
                &to_json(&r.state),
                &r.state.phase.is_active(),
                &r.undoes,
                &r.report.as_ref().map(to_json),
                &r.created_at,
                &r.updated_at,
            ],
        )
        .await?;
    }
    move_sequence_past(tx, "rollouts").await?;
    move_sequence_past(tx, "events").await?;
    cluster::all_changed(tx).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testpg;
    use crate::store::{BlobStore, DiskProblem};

    fn sha256(bytes: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    /// The database name of a test URL.
    fn name(url: &str) -> &str {
        url.rsplit('/').next().unwrap()
    }

    /// A short lease, so the tests wait less than a second for a takeover.
    const FAST: LeaseSettings = LeaseSettings {
        lease: Duration::from_millis(900),
        renew: Duration::from_millis(300),
    };

    /// Waits (at most `within`) until `store` leads; its term, and how long
    /// it waited.
    fn leads(store: &PostgresStore, within: Duration) -> (Term, Duration) {
        let started = Instant::now();
        loop {
            if let Some(term) = store.leading() {
                assert!(store.drives_rollouts().unwrap());
                return (term, started.elapsed());
            }
            assert!(started.elapsed() < within, "no lease within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn rollout_of(store: &PostgresStore, fence: Fence) -> RolloutRecord {
        use crate::store::contract::record;
        store.insert_version(&record("m", "1")).unwrap();
        store.insert_version(&record("m", "2")).unwrap();
        let spec =
            RolloutSpec::from_yaml("model: m\nversion: \"2\"\nstrategy:\n  basic: {}\n").unwrap();
        let route = store
            .route("m")
            .unwrap()
            .unwrap_or_else(|| RoutePolicy::stable_only("1"));
        let state = crate::strategy::initial_state(&route, 0);
        store
            .create_rollout(
                "m",
                RolloutKind::of(&spec.strategy),
                &spec,
                &state,
                None,
                vec![],
                fence,
            )
            .unwrap()
            .unwrap()
    }

    #[test]
    fn one_instance_leads_and_another_takes_over_in_a_newer_term_within_the_lease() {
        let url = testpg::database();
        let (a, b) = (
            PostgresStore::open(&url).unwrap(),
            PostgresStore::open(&url).unwrap(),
        );
        assert_eq!(a.leader().unwrap(), None, "nobody campaigned yet");
        assert!(!a.drives_rollouts().unwrap(), "not before campaigning");
        a.campaign("a", FAST);
        let (term, _) = leads(&a, Duration::from_secs(5));
        b.campaign("b", FAST);
        std::thread::sleep(FAST.lease * 2);
        assert_eq!(a.leading(), Some(term), "a keeps its lease and its term");
        assert_eq!(b.leading(), None, "one leader at a time");
        let shown = b.leader().unwrap().unwrap();
        assert_eq!(
            (shown.instance.as_str(), shown.term, shown.valid),
            ("a", term, true)
        );
        assert!(
            shown.since.ends_with('Z') && shown.since.len() == 24,
            "{}",
            shown.since
        );
        // a dies: b takes the lease once it expired, in the next term.
        drop(a);
        let (next, waited) = leads(&b, Duration::from_secs(5));
        assert_eq!(next, term + 1);
        assert!(
            waited <= FAST.lease + FAST.renew + Duration::from_millis(500),
            "{waited:?}"
        );
        assert_eq!(b.leader().unwrap().unwrap().instance, "b");
    }

    #[test]
    fn a_write_of_an_older_term_is_refused_and_its_leader_follows_at_once() {
        let url = testpg::database();
        let a = PostgresStore::open(&url).unwrap();
        // A lease long enough that only fencing can end it in this test.
        a.campaign(
            "a",
            LeaseSettings {
                lease: Duration::from_secs(60),
                renew: Duration::from_secs(20),
            },
        );
        let (term, _) = leads(&a, Duration::from_secs(5));
        let r = rollout_of(&a, Fence::Term(term));
        let events = a
            .rollout_events(
                r.id,
                Page::After {
                    after: 0,
                    limit: 100,
                },
            )
            .unwrap();
        // Another instance takes the lease (as after a pause longer than
        // the lease): a still believes it leads.
        testpg::shared().psql(
            name(&url),
            "UPDATE leader_lease SET holder = 'b', term = term + 1, acquired_at = now()",
        );
        assert_eq!(a.leading(), Some(term));
        let mut moved = r.state.clone();
        moved.message = "a step of the old term".into();
        let e = a
            .update_rollout(
                r.id,
                &moved,
                vec![NewEvent::new(
                    "m",
                    EventKind::Other("step".into()),
                    "old".into(),
                    serde_json::json!({}),
                )],
                None,
                Fence::of(a.leading()),
            )
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Fenced { term: t, newer, holder } if *t == term && *newer == term + 1 && holder == "b"),
            "{e}"
        );
        assert!(e.to_string().contains("instance b leads in term"), "{e}");
        assert_eq!(a.leading(), None, "it follows at once");
        assert_eq!(
            a.rollout(r.id).unwrap().unwrap().state,
            r.state,
            "the step was not applied"
        );
        assert_eq!(
            a.rollout_events(
                r.id,
                Page::After {
                    after: 0,
                    limit: 100
                }
            )
            .unwrap(),
            events
        );
        let e = a
            .set_rollout_report(r.id, &serde_json::json!({}), Fence::Term(term))
            .unwrap_err();
        assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
        // The new term's writes, and unfenced ones, go through.
        a.update_rollout(r.id, &moved, vec![], None, Fence::Term(term + 1))
            .unwrap();
        a.set_rollout_report(r.id, &serde_json::json!({}), Fence::Unfenced)
            .unwrap();
    }

    #[test]
    fn a_leader_cut_off_from_the_store_stops_leading_within_its_lease_and_takes_a_new_term_after() {
        let server = testpg::PgServer::start();
        let url = server.database();
        let a = PostgresStore::open(&url).unwrap();
        a.campaign("a", FAST);
        let (term, _) = leads(&a, Duration::from_secs(5));
        server.stop("immediate");
        let cut = Instant::now();
        while a.leading().is_some() {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            cut.elapsed() <= FAST.lease,
            "stopped leading after {:?}",
            cut.elapsed()
        );
        server.restart();
        let (again, _) = leads(&a, Duration::from_secs(10));
        assert!(
            again > term,
            "never the old term again: {again} after {term}"
        );
    }

    #[test]
    fn a_writer_paused_inside_its_transaction_holds_the_others_up_for_a_bounded_time() {
        let url = testpg::database();
        let paused = Arc::new(PostgresStore::open(&url).unwrap());
        let other = PostgresStore::open(&url).unwrap();
        // A writer that takes the write lock and then sends nothing for
        // longer than the bound, as a SIGSTOPped one would.
        let writer = paused.clone();
        let stalled = std::thread::spawn(move || {
            writer.write_within(WRITE_IDLE_LIMIT * 3, |_tx| {
                Box::pin(async {
                    tokio::time::sleep(WRITE_IDLE_LIMIT * 2).await;
                    Ok(())
                })
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let write = || other.write(|_tx| Box::pin(async { Ok(()) }));
        let mut tries = 0;
        while let Err(e) = write() {
            tries += 1;
            assert!(e.unreachable(), "{e}");
            assert!(
                started.elapsed() < WRITE_IDLE_LIMIT + Duration::from_secs(5),
                "the other instance's writes still wait after {:?}: {e}",
                started.elapsed()
            );
        }
        assert!(tries >= 1, "the paused writer held the lock at first");
        // Its session was ended under it: its commit fails (from its side
        // it cannot tell when the session ended, so it says it may have
        // been made).
        let e = stalled.join().unwrap().unwrap_err();
        assert!(e.unreachable(), "{e}");
    }

    #[test]
    fn a_write_cut_off_during_its_commit_says_it_may_have_been_made() {
        let url = testpg::database();
        let store = PostgresStore::open(&url).unwrap();
        // A table whose commit takes a second (a deferred trigger sleeps).
        testpg::shared().psql(
            name(&url),
            "CREATE TABLE slow (x int);
             CREATE FUNCTION sleep_a_second() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON slow
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleep_a_second();",
        );
        let insert = |sql: &'static str| {
            store.write_within(Duration::from_millis(300), move |tx| {
                Box::pin(async move {
                    tx.batch_execute(sql).await?;
                    Ok(())
                })
            })
        };
        // Cut off before the commit: nothing was changed, and it says so.
        let e = insert("SELECT pg_sleep(1); INSERT INTO slow VALUES (1)").unwrap_err();
        assert!(e.unreachable() && !e.maybe_changed(), "{e}");
        // (Its transaction holds the write lock until its sleep ends.)
        std::thread::sleep(Duration::from_millis(1200));
        // Cut off once the commit was sent: it may have been made.
        let e = insert("INSERT INTO slow VALUES (2)").unwrap_err();
        assert!(e.unreachable() && e.maybe_changed(), "{e}");
        assert!(
            e.to_string().contains("may or may not have been made"),
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            testpg::shared().psql(name(&url), "SELECT string_agg(x::text, ',') FROM slow"),
            "2",
            "the first never was, the second was made after all"
        );
    }

    /// Whether the store's connections are encrypted (pg_stat_ssl).
    fn encrypted(store: &PostgresStore) -> bool {
        store
            .run(|db| async move {
                let client = db.client().await?;
                let row = client
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await?;
                Ok(row.try_get::<_, bool>(0)?)
            })
            .unwrap()
    }

    fn tls_file(name: &str) -> String {
        format!("{}/tests/data/tls/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn tls_to_postgres_follows_sslmode_and_sslrootcert() {
        let server = testpg::PgServer::start_tls(
            tls_file("server.pem").as_ref(),
            tls_file("server.key").as_ref(),
        );
        let url = server.database();
        let (port, db) = (server.port, name(&url).to_string());
        let at =
            |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/{db}?{params}");
        let ca = tls_file("ca.pem");
        // The server's certificate names localhost and 127.0.0.1.
        for host in ["127.0.0.1", "localhost"] {
            let store =
                PostgresStore::open(&at(host, &format!("sslmode=verify-full&sslrootcert={ca}")))
                    .unwrap();
            assert!(encrypted(&store), "{host}");
        }
        // Under another address: verify-ca takes it, verify-full does not.
        let store = PostgresStore::open(&at(
            "127.0.0.2",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ))
        .unwrap();
        assert!(encrypted(&store));
        let e = PostgresStore::open(&at(
            "127.0.0.2",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ))
        .err()
        .expect("the name is not the certificate's");
        assert!(
            matches!(&e, StoreError::Postgres(f) if f.problem == PgProblem::Tls),
            "{e}"
        );
        assert!(
            e.to_string().contains("not valid for name \"127.0.0.2\""),
            "{e}"
        );
        // A CA that did not sign the server's certificate.
        let other = tls_file("client.pem");
        let e = PostgresStore::open(&at(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={other}"),
        ))
        .err()
        .expect("not trusted");
        let text = e.to_string();
        assert!(
            text.contains("refused the TLS connection")
                && text.contains("UnknownIssuer")
                && text.contains("sslrootcert"),
            "{text}"
        );
        assert!(!e.unreachable(), "a certificate problem is not an outage");
        // require and prefer encrypt without checking; disable does not.
        assert!(encrypted(
            &PostgresStore::open(&at("127.0.0.2", "sslmode=require")).unwrap()
        ));
        assert!(
            encrypted(&PostgresStore::open(&at("127.0.0.1", "")).unwrap()),
            "prefer"
        );
        assert!(!encrypted(
            &PostgresStore::open(&at("127.0.0.1", "sslmode=disable")).unwrap()
        ));
        // require with a root file checks the chain, as libpq does.
        let e = PostgresStore::open(&at(
            "127.0.0.1",
            &format!("sslmode=require&sslrootcert={other}"),
        ))
        .err()
        .expect("checked against the root file");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn a_server_without_tls_is_refused_when_the_url_requires_it() {
        let url = testpg::database();
        let e = PostgresStore::open(&format!("{url}?sslmode=require"))
            .err()
            .expect("the test server has no TLS");
        let text = e.to_string();
        assert!(
            text.contains("server does not support TLS") && text.contains("ssl = on"),
            "{text}"
        );
        let plain = PostgresStore::open(&format!("{url}?sslmode=prefer")).unwrap();
        assert!(!encrypted(&plain), "prefer falls back to plain");
        let e = PostgresStore::open(&format!(
            "{url}?sslmode=verify-full&sslrootcert=/nonexistent.pem"
        ))
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("sslrootcert /nonexistent.pem"),
            "{e}"
        );
    }

    #[test]
    fn instances_starting_together_on_an_empty_database_migrate_once() {
        let url = testpg::database();
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    PostgresStore::open(&url).map(|_| ())
                })
            })
            .collect();
        for t in opened {
            t.join().unwrap().expect("every instance comes up");
        }
        let applied = testpg::shared().psql(
            name(&url),
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_version",
        );
        let all: Vec<String> = (1..=schema::MIGRATIONS.len())
            .map(|v| v.to_string())
            .collect();
        assert_eq!(applied, all.join(","), "each migration once");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let url = testpg::database();
        drop(PostgresStore::open(&url).unwrap());
        testpg::shared().psql(name(&url), "INSERT INTO schema_version VALUES (99)");
        match PostgresStore::open(&url) {
            Err(StoreError::TooNew { found: 99, .. }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn connection_problems_name_the_url_without_its_password_and_what_to_check() {
        let server = testpg::shared();
        let missing = format!(
            "postgres://postgres:hunter2@127.0.0.1:{}/no_such_db",
            server.port
        );
        let e = PostgresStore::open(&missing).err().expect("refused");
        let text = e.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains(&format!(
                "postgres://postgres:***@127.0.0.1:{}/no_such_db",
                server.port
            )) && text.contains("does not exist")
                && text.contains("create the database"),
            "{text}"
        );
        assert!(!e.unreachable());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nobody = format!("postgres://ferry:hunter2@127.0.0.1:{port}/ferry");
        let e = PostgresStore::open(&nobody).err().expect("refused");
        let text = e.to_string();
        assert!(e.unreachable(), "{text}");
        assert!(
            text.starts_with(&format!(
                "the store at postgres://ferry:***@127.0.0.1:{port}/ferry is unreachable"
            )) && text.contains("check that PostgreSQL is running")
                && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn a_stopped_server_is_unreachable_and_the_store_reconnects_when_it_is_back() {
        let server = testpg::PgServer::start();
        let url = server.database();
        let store = PostgresStore::open(&url).unwrap();
        store
            .insert_version(&crate::store::contract::record("m", "1"))
            .unwrap();
        server.stop("fast");
        let e = store.models().unwrap_err();
        assert!(e.unreachable(), "{e}");
        assert!(e.disk_problem().is_none());
        let e = store
            .insert_version(&crate::store::contract::record("m", "2"))
            .unwrap_err();
        assert!(e.unreachable(), "{e}");
        server.restart();
        assert_eq!(store.versions("m").unwrap().len(), 1, "nothing was changed");
        store
            .insert_version(&crate::store::contract::record("m", "2"))
            .unwrap();
        assert_eq!(store.versions("m").unwrap().len(), 2);
    }

    #[test]
    fn the_database_server_s_full_disk_is_a_disk_problem_of_its_own() {
        let failure = |problem| {
            StoreError::Postgres(PgFailure {
                url: "postgres://x@h/db".into(),
                problem,
                detail: "d".into(),
            })
        };
        assert_eq!(
            failure(PgProblem::DiskFull).disk_problem(),
            Some(DiskProblem::DatabaseFull)
        );
        assert_eq!(
            failure(PgProblem::ReadOnly).disk_problem(),
            Some(DiskProblem::DatabaseReadOnly)
        );
        assert!(
            DiskProblem::DatabaseFull
                .advice()
                .contains("database server")
        );
        assert!(!failure(PgProblem::Other).unreachable());
    }

    #[test]
    fn a_blob_is_stored_in_chunks_and_streamed_back() {
        let url = testpg::database();
        let store = PostgresStore::open(&url).unwrap();
        let bytes: Vec<u8> = (0..CHUNK_BYTES * 5 / 2)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let digest = sha256(&bytes);
        assert!(!store.has_blob(&digest).unwrap());
        assert!(!store.get_blob(&digest, &mut Vec::new()).unwrap());
        assert_eq!(
            store.put_blob(&digest, &mut &bytes[..]).unwrap(),
            bytes.len() as u64
        );
        assert!(store.has_blob(&digest).unwrap());
        let chunks = testpg::shared().psql(
            name(&url),
            &format!(
                "SELECT count(*), max(length(bytes)) FROM blob_chunks WHERE digest = '{digest}'"
            ),
        );
        assert_eq!(chunks, format!("3|{CHUNK_BYTES}"));
        let mut back = Vec::new();
        assert!(store.get_blob(&digest, &mut back).unwrap());
        assert!(back == bytes, "the same bytes come back");
        // Stored again (another instance): harmless.
        store.put_blob(&digest, &mut &bytes[..]).unwrap();
        // Bytes that are not the digest's are refused and never visible.
        let wrong = sha256(b"other");
        let e = store.put_blob(&wrong, &mut &b"not other"[..]).unwrap_err();
        assert!(e.to_string().contains("nothing was stored"), "{e}");
        assert!(!store.has_blob(&wrong).unwrap());
        // An empty artifact is a blob too.
        let empty = sha256(b"");
        store.put_blob(&empty, &mut &b""[..]).unwrap();
        let mut back = Vec::new();
        assert!(store.get_blob(&empty, &mut back).unwrap() && back.is_empty());
    }

    /// The Store contract, on PostgreSQL (a fresh database per test on the
    /// test process's server).
    mod contract {
        use std::sync::Arc;

        use crate::store::contract::Database;
        use crate::store::testpg;
        use crate::store::{PostgresStore, Store};

        struct Postgres(String);

        impl Database for Postgres {
            fn open(&self) -> Arc<dyn Store> {
                Arc::new(PostgresStore::open(&self.0).expect("the store opens"))
            }

            fn another(&self) -> Box<dyn Database> {
                Box::new(Postgres(testpg::database()))
            }
        }

        crate::store_contract!(Box::new(Postgres(testpg::database())));
    }
}
