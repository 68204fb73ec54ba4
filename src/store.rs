//! Durable state behind the [`Store`] trait: models, versions and their
//! serving settings, and the event history. Only the store writes state.
//!
//! [`sqlite::SqliteStore`] is the embedded default (WAL, synchronous writes);
//! [`postgres::PostgresStore`] is the one several instances share, and keeps
//! artifacts too ([`BlobStore`]), unless `--artifacts` names a bucket
//! ([`s3::S3Blobs`]). [`url::StoreUrl`] says which one `--store` names. Every method is one transaction: an event is never
//! written without the change it records, nor the change without its event.

pub mod bridge;
pub mod commands;
#[cfg(test)]
pub mod contract;
pub mod lease;
pub mod postgres;
pub mod s3;
pub mod sqlite;
#[cfg(test)]
pub mod testpg;
pub mod url;

use crate::gateway::RoutePolicy;
use crate::records::{
    EventKind, InstanceRecord, InstanceReport, ModelRecord, ServingSettings, VersionRecord,
};
use crate::spec::RolloutSpec;
use crate::strategy::{RolloutKind, RolloutState};

pub use lease::{Fence, Leader, LeaseSettings, Term};
pub use postgres::{PgFailure, PgProblem, PostgresStore};
pub use s3::{BucketFailure, BucketUrl, S3Blobs};
pub use sqlite::SqliteStore;
pub use url::StoreUrl;

/// A failure of the storage itself (disk, corruption, an unreachable server,
/// a bug): never a user mistake.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// PostgreSQL failed or could not be reached (the URL shown has no
    /// password).
    #[error("{0}")]
    Postgres(PgFailure),
    /// The bucket of artifacts (`--artifacts s3://…`) failed or could not
    /// be reached.
    #[error("{0}")]
    Bucket(BucketFailure),
    /// A copy's target already holds data (and replacing it was not asked).
    #[error(
        "the target store is not empty ({models} models, {events} events); copy into an empty database, or replace what it holds"
    )]
    NotEmpty { models: u64, events: u64 },
    #[error("stored data is unreadable ({what}): {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "the database schema is version {found}, newer than this Ferry understands ({known}); upgrade Ferry"
    )]
    TooNew { found: i64, known: i64 },
    /// A leader's rollout write refused because the lease has a newer term
    /// (fencing): nothing was changed, and this instance follows.
    #[error(
        "this instance's term {term} as leader is over: instance {holder} leads in term {newer}, so the rollout write was refused and nothing was changed; try again"
    )]
    Fenced {
        term: Term,
        newer: Term,
        holder: String,
    },
}

impl StoreError {
    /// Whether the database could not be written because of the disk.
    pub fn disk_problem(&self) -> Option<DiskProblem> {
        match self {
            StoreError::Database(rusqlite::Error::SqliteFailure(f, _)) => match f.code {
                rusqlite::ErrorCode::DiskFull => Some(DiskProblem::Full),
                rusqlite::ErrorCode::ReadOnly => Some(DiskProblem::ReadOnly),
                _ => None,
            },
            StoreError::Postgres(f) => match f.problem {
                PgProblem::DiskFull => Some(DiskProblem::DatabaseFull),
                PgProblem::ReadOnly => Some(DiskProblem::DatabaseReadOnly),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether the store could not be reached at all (a shared store's
    /// server down, the network cut): nothing was changed, and trying again
    /// later may work.
    pub fn unreachable(&self) -> bool {
        match self {
            StoreError::Postgres(f) => {
                matches!(f.problem, PgProblem::Unreachable | PgProblem::CommitUnknown)
            }
            StoreError::Bucket(f) => f.problem == s3::BucketProblem::Unreachable,
            _ => false,
        }
    }

    /// For an unreachable store: "the store at URL is unreachable: CAUSE"
    /// (no password, no advice for the operator), what a client is told.
    pub fn unreachable_cause(&self) -> Option<String> {
        match self {
            StoreError::Postgres(f) if self.unreachable() => Some(format!(
                "the store at {} is unreachable: {}",
                f.url, f.detail
            )),
            StoreError::Bucket(f) if self.unreachable() => Some(format!(
                "the artifact bucket {} is unreachable {}: {}",
                f.url, f.doing, f.detail
            )),
            _ => None,
        }
    }

    /// Whether the change may have been made all the same: the connection
    /// was lost while it was being committed.
    pub fn maybe_changed(&self) -> bool {
        matches!(self, StoreError::Postgres(f) if f.problem == PgProblem::CommitUnknown)
    }
}

/// The disk refusing a write: the data dir is full, or cannot be written.
/// The operator can fix both, so the answer says how (not a bare 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskProblem {
    Full,
    ReadOnly,
    /// The PostgreSQL server's disk is full (SQLSTATE 53100).
    DatabaseFull,
    /// The PostgreSQL server only reads (a standby, or read-only mode).
    DatabaseReadOnly,
}

impl DiskProblem {
    pub fn of_io(e: &std::io::Error) -> Option<DiskProblem> {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Some(DiskProblem::Full)
            }
            ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => {
                Some(DiskProblem::ReadOnly)
            }
            _ => None,
        }
    }

    /// What the operator should do.
    pub fn advice(self) -> &'static str {
        match self {
            DiskProblem::Full => {
                "the data dir's disk is full: free space (or move --data-dir to a larger disk), then try again"
            }
            DiskProblem::ReadOnly => {
                "the data dir cannot be written (read-only file system or permissions): make it writable for Ferry's user, then try again"
            }
            DiskProblem::DatabaseFull => {
                "the PostgreSQL server's disk is full: free space on the database server, then try again"
            }
            DiskProblem::DatabaseReadOnly => {
                "the PostgreSQL server accepts no writes (a standby, or read-only mode): point --store at the primary, then try again"
            }
        }
    }
}

/// An event to record: what happened, in words a person can read, plus data.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub model: String,
    pub rollout: Option<String>,
    pub kind: EventKind,
    pub message: String,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(model: &str, kind: EventKind, message: String, data: serde_json::Value) -> NewEvent {
        NewEvent {
            model: model.to_string(),
            rollout: None,
            kind,
            message,
            data,
        }
    }
}

/// The most an event's `data` may take, serialised. An event is written in
/// the same transaction as the change it records, so a bigger one is not
/// refused (that would refuse the change): its data is replaced by a summary
/// ([`NewEvent::bounded`]).
pub const MAX_EVENT_DATA_BYTES: usize = 64 << 10;
/// The most an event's message may take; a longer one is cut.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4 << 10;
/// Fields of an oversized event's data kept beside the summary when each
/// serialises to at most this many bytes.
const KEPT_FIELD_BYTES: usize = 1 << 10;

impl NewEvent {
    /// The event as it is stored: a message over [`MAX_EVENT_MESSAGE_BYTES`]
    /// is cut (saying so), and data over [`MAX_EVENT_DATA_BYTES`] becomes
    /// `{"truncated": {...}}` plus its small top-level fields.
    pub fn bounded(mut self) -> NewEvent {
        if self.message.len() > MAX_EVENT_MESSAGE_BYTES {
            let total = self.message.len();
            let mut cut = MAX_EVENT_MESSAGE_BYTES;
            while !self.message.is_char_boundary(cut) {
                cut -= 1;
            }
            self.message.truncate(cut);
            self.message
                .push_str(&format!("… (cut: the message was {total} bytes)"));
        }
        let size = serde_json::to_string(&self.data).map_or(0, |t| t.len());
        if size > MAX_EVENT_DATA_BYTES {
            let mut summary = serde_json::Map::new();
            if let serde_json::Value::Object(fields) = &self.data {
                for (k, v) in fields {
                    if serde_json::to_string(v).is_ok_and(|t| t.len() <= KEPT_FIELD_BYTES) {
                        summary.insert(k.clone(), v.clone());
                    }
                }
            }
            summary.insert(
                "truncated".into(),
                serde_json::json!({
                    "bytes": size,
                    "limit": MAX_EVENT_DATA_BYTES,
                    "note": "the event's data was too big to store; fields over 1 KiB were left out",
                }),
            );
            self.data = serde_json::Value::Object(summary);
        }
        self
    }
}

/// Which events a listing returns, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The `limit` most recent.
    Latest { limit: usize },
    /// At most `limit` events after the one numbered `after` (0: from the
    /// first).
    After { after: i64, limit: usize },
}

/// A recorded event (ordered by `id`, never rewritten).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Event {
    #[serde(skip)]
    pub id: i64,
    pub at: String,
    pub model: String,
    pub rollout: Option<String>,
    #[schema(value_type = String)]
    pub kind: EventKind,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// What inserting a version did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new version; `stable` says it became the model's stable version (the
    /// model's first version).
    Created { stable: bool },
    /// A version with that name already exists (returned as stored).
    Exists(Box<VersionRecord>),
}

/// A rollout as stored: its spec, its state, and what it undoes.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    pub id: i64,
    pub model: String,
    /// The strategy's name, or `rollback`.
    pub kind: RolloutKind,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// The rollout a rollback undoes.
    pub undoes: Option<i64>,
    /// The A/B report, stored when the rollout ended.
    pub report: Option<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

impl RolloutRecord {
    /// `r-17`: how people and events name a rollout.
    pub fn name(&self) -> String {
        format!("r-{}", self.id)
    }
}

/// A stored rollout kind, or why this build cannot read it (a newer build
/// wrote a strategy this one does not know).
pub fn stored_rollout_kind(text: &str) -> Result<RolloutKind, String> {
    RolloutKind::parse(text)
        .ok_or_else(|| format!("\"{text}\" is not a strategy this Ferry knows; upgrade Ferry"))
}

/// Parses `r-17` (or `17`) into a rollout id.
pub fn rollout_id(name: &str) -> Option<i64> {
    name.strip_prefix("r-").unwrap_or(name).parse().ok()
}

/// Why a rollout could not be created.
#[derive(Debug, Clone, PartialEq)]
pub enum NotCreated {
    /// The model already has an active rollout.
    Active(Box<RolloutRecord>),
}

/// Durable state. Methods are synchronous and short; callers on async threads
/// run them where blocking for a disk write is acceptable (the control plane).
pub trait Store: Send + Sync + 'static {
    fn models(&self) -> Result<Vec<ModelRecord>, StoreError>;
    fn model(&self, model: &str) -> Result<Option<ModelRecord>, StoreError>;
    fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError>;
    fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, StoreError>;
    /// Inserts a version unless one of that name exists. The model's first
    /// version becomes its stable version; both are recorded as events.
    fn insert_version(&self, v: &VersionRecord) -> Result<Inserted, StoreError>;
    fn update_settings(
        &self,
        model: &str,
        version: &str,
        settings: &ServingSettings,
        event: NewEvent,
    ) -> Result<(), StoreError>;
    /// Marks a non-stable version loaded (addressable by `/versions/{v}`) or not.
    fn set_loaded(
        &self,
        model: &str,
        version: &str,
        loaded: bool,
        event: NewEvent,
    ) -> Result<(), StoreError>;
    /// Takes the model out of service (`by`: who unloaded it, through the
    /// repository API) or puts it back (`None`).
    fn set_unloaded(
        &self,
        model: &str,
        by: Option<&str>,
        event: NewEvent,
    ) -> Result<(), StoreError>;
    fn remove_version(&self, model: &str, version: &str, event: NewEvent)
    -> Result<(), StoreError>;
    /// The model's routing policy, when one was set (otherwise the stable
    /// version takes all traffic).
    fn route(&self, model: &str) -> Result<Option<RoutePolicy>, StoreError>;
    /// Replaces the routing policy; the model's stable version becomes the
    /// policy's, in the same transaction as the event.
    fn set_route(
        &self,
        model: &str,
        policy: &RoutePolicy,
        event: NewEvent,
    ) -> Result<(), StoreError>;
    /// Creates a rollout unless the model has an active one. The events are
    /// recorded with it (their `rollout` is filled in); a rollback marks the
    /// rollout it undoes `rolled_back` in the same transaction.
    #[allow(clippy::too_many_arguments)]
    fn create_rollout(
        &self,
        model: &str,
        kind: RolloutKind,
        spec: &RolloutSpec,
        state: &RolloutState,
        undoes: Option<i64>,
        events: Vec<NewEvent>,
        fence: Fence,
    ) -> Result<Result<RolloutRecord, NotCreated>, StoreError>;
    /// Stores a rollout's new state with the events that explain it. When
    /// the pass publishes its route, `route_changed` is that change's event:
    /// the model's routing policy (and stable version) becomes
    /// `state.route` in the same transaction, so one publish is one write.
    ///
    /// Rollout writes (this, [`Store::create_rollout`],
    /// [`Store::set_rollout_report`]) carry a [`Fence`]: a leader's write
    /// whose term is older than the lease's is refused in the same
    /// transaction ([`StoreError::Fenced`]) and nothing is changed.
    fn update_rollout(
        &self,
        id: i64,
        state: &RolloutState,
        events: Vec<NewEvent>,
        route_changed: Option<NewEvent>,
        fence: Fence,
    ) -> Result<(), StoreError>;
    fn set_rollout_report(
        &self,
        id: i64,
        report: &serde_json::Value,
        fence: Fence,
    ) -> Result<(), StoreError>;
    fn rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError>;
    /// A model's rollouts, newest first; at most `limit`.
    fn rollouts(&self, model: &str, limit: usize) -> Result<Vec<RolloutRecord>, StoreError>;
    /// Every rollout that is progressing or paused.
    fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    /// A page of a rollout's events, oldest first.
    fn rollout_events(&self, id: i64, page: Page) -> Result<Vec<Event>, StoreError>;
    /// A page of a model's events, oldest first.
    fn events(&self, model: &str, page: Page) -> Result<Vec<Event>, StoreError>;
    /// Deletes events recorded before `cutoff` (RFC 3339, as events' `at`),
    /// except those of active rollouts; rollout records stay. Returns how
    /// many were deleted.
    fn delete_events_before(&self, cutoff: &str) -> Result<usize, StoreError>;

    /// How many models, versions, rollouts and events the store holds.
    fn counts(&self) -> Result<Counts, StoreError>;
    /// What tells this database apart from every other: two handles on one
    /// database have the same identity however they were named (a symlink,
    /// `localhost` for `127.0.0.1`), so `ferry store copy` can refuse to
    /// copy a store into itself.
    fn identity(&self) -> Result<String, StoreError>;
    /// Whether the last call found the store unreachable, an outage not yet
    /// over: a reader that can answer without the store need not wait for
    /// a call's timeout. An embedded store is never unreachable.
    fn known_unreachable(&self) -> bool {
        false
    }
    /// Whether this instance drives the active rollouts: one instance at a
    /// time may step them, or every step would be taken (and recorded)
    /// once per instance. `Ok(true)` exactly while this instance is the
    /// leader ([`Store::leading`]).
    fn drives_rollouts(&self) -> Result<bool, StoreError> {
        Ok(self.leading().is_some())
    }
    /// Starts competing for the lease as `instance` (renewing it while
    /// held), once this instance is ready to lead. An embedded store has one
    /// instance, which always leads: it only remembers who that is.
    fn campaign(&self, instance: &str, settings: LeaseSettings);
    /// A graceful stop of `instance`: it stops leading — ending its lease
    /// early, so another instance takes over at its next renewal rather
    /// than after the lease — and leaves the instances table, so nobody
    /// waits for it (a rollout's warm check, a window's completeness, a
    /// rolling update's batches).
    fn leave(&self, instance: &str) -> Result<(), StoreError>;
    /// The term this instance leads in right now, on its own clock (no I/O;
    /// see [`lease`]). An embedded store always leads, in term 1.
    fn leading(&self) -> Option<Term> {
        Some(EMBEDDED_TERM)
    }
    /// Who holds the lease, as the store says (`None` before any instance
    /// has campaigned).
    fn leader(&self) -> Result<Option<Leader>, StoreError>;
    /// The queue through which an instance that does not drive the rollouts
    /// hands rollout commands to the one that does ([`commands`]); `None`
    /// for an embedded store, whose one instance executes every command.
    fn commands(&self) -> Option<&dyn commands::CommandQueue> {
        None
    }
    /// The latest route version: a number that grows by one in the same
    /// transaction as every change of what serves (registration, settings,
    /// load/unload, removal, a route, a rollout's state), so an instance
    /// that has applied every change up to it serves what the store says.
    fn route_version(&self) -> Result<i64, StoreError>;
    /// The models changed after route version `after`, each with the route
    /// version of its latest change, oldest change first.
    fn changed_since(&self, after: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Writes this instance's report (replacing its previous one), stamped
    /// with the time it was written: the instance's heartbeat.
    fn report_instance(&self, report: &InstanceReport) -> Result<(), StoreError>;
    /// Route versions as they are announced (a shared store's `NOTIFY`,
    /// heard on a connection of its own), or `None` when the store
    /// announces nothing (an embedded store has one instance, which made
    /// every change itself). A hint only: a look at [`Store::route_version`]
    /// is the truth.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        None
    }
    /// Whether the store keeps every instance's telemetry buckets (a shared
    /// store does; an embedded one has one instance, which reads its own
    /// ring, so its windows are complete by definition).
    fn keeps_buckets(&self) -> bool {
        false
    }
    /// Writes one flush of this instance's closed telemetry buckets, with
    /// the epoch it has flushed through, in one statement; a bucket already
    /// written (a retried flush) is left as it is. An embedded store keeps
    /// none: its one instance reads its own ring (cluster-wide analysis).
    fn flush_buckets(&self, flush: &crate::metrics::cluster::Flush) -> Result<(), StoreError> {
        let _ = flush;
        Ok(())
    }
    /// The buckets of `model` other instances than `me` flushed with an
    /// epoch after `after`, and how far every instance has flushed.
    fn peer_buckets(
        &self,
        model: &str,
        after: u64,
        me: &str,
    ) -> Result<crate::metrics::cluster::Peers, StoreError> {
        let _ = (model, after, me);
        Ok(Default::default())
    }
    /// Deletes the buckets (and flush marks) older than epoch `before`;
    /// returns how many rows went.
    fn prune_buckets(&self, before: u64) -> Result<usize, StoreError> {
        let _ = before;
        Ok(0)
    }
    /// Every instance's latest report, by id.
    fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError>;
    /// Forgets the instances not heard from since `before_ms` (ms since the
    /// epoch); returns how many.
    fn forget_instances(&self, before_ms: u64) -> Result<usize, StoreError>;
    /// Everything but the events (those are paged: [`Store::event_log`]),
    /// as stored, ids and timestamps included.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// At most `limit` events of every model numbered after `after`, oldest
    /// first: the whole history, page by page.
    fn event_log(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Writes `snapshot` as it is (ids and timestamps kept) in one
    /// transaction. A store that holds anything is refused
    /// ([`StoreError::NotEmpty`]) unless `replace`, which deletes everything
    /// it holds first, events included.
    fn restore(&self, snapshot: &Snapshot, replace: bool) -> Result<(), StoreError>;
    /// Appends events as they are (ids and timestamps kept); ids must be
    /// above every stored one. Later events are numbered after them.
    fn append_events(&self, events: &[Event]) -> Result<(), StoreError>;
}

/// The term of an embedded store's one instance: it always leads.
pub const EMBEDDED_TERM: Term = 1;

/// The channel a PostgreSQL store announces changes on (`NOTIFY`, at
/// commit), its payload `"<route version> <model>"`.
pub const CHANGES_CHANNEL: &str = "ferry_changes";

/// What a store holds, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Counts {
    pub models: u64,
    pub versions: u64,
    pub rollouts: u64,
    pub events: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} models, {} versions, {} rollouts, {} events",
            self.models, self.versions, self.rollouts, self.events
        )
    }
}

/// Everything a store holds but its events, for a copy to another store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Every model with its routing policy, by name.
    pub models: Vec<(ModelRecord, Option<RoutePolicy>)>,
    /// Every version of every model.
    pub versions: Vec<VersionRecord>,
    /// Every rollout, by id.
    pub rollouts: Vec<RolloutRecord>,
}

/// Content-addressed artifacts every instance can read (by default inside
/// the shared PostgreSQL store; in an S3-compatible bucket with
/// `--artifacts`, [`S3Blobs`]). A blob is streamed both ways in chunks: a
/// large model is never held in memory whole. Writing the same digest twice
/// is harmless (the content is the same); a blob is visible only once
/// complete.
pub trait BlobStore: Send + Sync + 'static {
    /// Whether a complete blob with this digest is stored.
    fn has_blob(&self, digest: &str) -> Result<bool, StoreError>;
    /// Stores the bytes read from `from` under `digest`, chunk by chunk (a
    /// no-op when the blob is already stored). Bytes whose sha256 is not
    /// `digest` are refused and nothing is visible. Returns the size.
    fn put_blob(&self, digest: &str, from: &mut dyn std::io::Read) -> Result<u64, StoreError>;
    /// Writes the blob's bytes to `to`, chunk by chunk; false when no blob
    /// has this digest. The reader checks the digest.
    fn get_blob(&self, digest: &str, to: &mut dyn std::io::Write) -> Result<bool, StoreError>;
}

/// Reads until `buf` is full or the input ends; how many bytes were read
/// (a blob store's chunk or part).
pub(crate) fn read_full(from: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
