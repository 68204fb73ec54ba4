//! Several instances on one store: each follows the store's route version
//! and tells the others what it serves.
//!
//! 1. **Following.** Every change of what serves grows the store's route
//!    version ([`Store::route_version`](crate::store::Store::route_version)).
//!    [`Controller::catch_up`] compares it with the version this instance
//!    has applied and, under the controller's lock (a local change and a
//!    followed one never interleave), re-applies each model changed since
//!    with the same code as start-up (`follow` → `apply`: warm what the
//!    route needs, swap, drain what left), then records the new version.
//!    [`Controller::run_following`] calls it when the store announces a
//!    change (PostgreSQL's `NOTIFY`) and every [`CHECK_EVERY`] (a missed
//!    announcement, a reconnect). The inference path never reads the store.
//! 2. **Reporting.** Every [`HEARTBEAT`] (and after each catch-up) the
//!    instance writes its report: address, build, the route version it
//!    serves, its warm versions and its load failures.
//! 3. **Reading the cluster.** [`view`] turns the reports into what
//!    `GET /api/v1/cluster` shows: an instance is live when heard from
//!    within [`LIVE_WITHIN`], stale after; one silent for [`FORGET_AFTER`]
//!    is forgotten (deleted from the table).
//! 4. **Leadership.** Once ready, the instance competes for the store's
//!    lease ([`Controller::campaign`]; `store::lease` has the rules); the
//!    view names the leader, its term and since when, and every report
//!    sets this instance's `ferry_cluster_leader` and `ferry_route_version`.
//! 5. **Warm everywhere.** [`warm_everywhere`] says whether every live
//!    instance serves the versions a rollout's route needs — each its own
//!    share of it ([`RoutePolicy::for_instance`]: a rolling update across
//!    instances) — is still loading them, or could not (which instance,
//!    why): the rollout loop waits for it before a step counts.
//! 6. **Rolling across instances.** [`rolling_instances`] fixes which
//!    instances a `rolling` update with `scope: instances` takes, and in
//!    which order, when it starts; each instance serves its own route
//!    ([`Controller::own_route`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ControlError, Controller};
use crate::gateway::RoutePolicy;
use crate::records::{InstanceRecord, InstanceReport, LoadFailure};
use crate::store::{Leader, LeaseSettings};
use crate::strategy::rolling::RollingInstance;
use crate::units::now_ms;

/// How often an instance writes its report.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often an instance looks at the store's route version without being
/// told (an announcement missed while its listener reconnected).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// An instance heard from within this long is live; stale after.
pub const LIVE_WITHIN: Duration = Duration::from_secs(5);
/// An instance silent for this long is deleted from the table.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Who this instance is, for its reports.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Random, chosen at start.
    pub id: String,
    /// `--advertise-url`.
    pub url: String,
    pub started_at: String,
}

impl Identity {
    pub fn new(url: String) -> Identity {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("the OS random source works");
        Identity {
            id: hex::encode(bytes),
            url,
            started_at: crate::units::now_rfc3339(),
        }
    }
}

/// The cluster as `GET /api/v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The instance that leads (drives the rollouts), by id: `null` while
    /// no instance holds an unexpired lease (a failover in progress).
    #[serde(default)]
    pub leader: Option<String>,
    /// The lease's term: grows by one at every change of leader (`null`
    /// before any instance led).
    #[serde(default)]
    pub term: Option<i64>,
    /// When the leader took the lease (RFC 3339, the store's clock).
    #[serde(default)]
    pub leader_since: Option<String>,
    /// The store's latest route version.
    pub route_version: i64,
    /// Every instance heard from within the last hour, by id.
    pub instances: Vec<InstanceView>,
}

/// One instance, as the cluster view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub id: String,
    /// How it is reached (`--advertise-url`).
    pub url: String,
    /// The Ferry build it runs.
    pub version: String,
    pub started_at: String,
    /// When it last reported (RFC 3339).
    pub last_seen: String,
    /// Heard from within the last 5 s.
    pub live: bool,
    /// It leads (drives the rollouts).
    #[serde(default)]
    pub leader: bool,
    /// The route version it serves.
    pub route_version: i64,
    /// Its loaded and warm versions, `model/version`.
    pub warm: Vec<String>,
    /// Versions it could not load, and why.
    pub failures: Vec<LoadFailure>,
}

/// The stored reports and lease as the cluster view shows them at
/// `now_ms`: the leader is the lease's holder while the lease is valid.
pub fn view(
    records: Vec<InstanceRecord>,
    lease: Option<Leader>,
    route_version: i64,
    now_ms: u64,
) -> ClusterView {
    let leader = lease.as_ref().filter(|l| l.valid);
    let instances = records
        .into_iter()
        .map(|r| {
            let age = now_ms.saturating_sub(r.last_seen_ms);
            let leads = leader.is_some_and(|l| l.instance == r.report.id);
            InstanceView {
                id: r.report.id,
                url: r.report.url,
                version: r.report.version,
                started_at: r.report.started_at,
                last_seen: crate::units::rfc3339_of_ms(r.last_seen_ms),
                live: age <= LIVE_WITHIN.as_millis() as u64,
                leader: leads,
                route_version: r.report.route_version,
                warm: r.report.warm,
                failures: r.report.failures,
            }
        })
        .collect();
    ClusterView {
        leader: leader.map(|l| l.instance.clone()),
        term: lease.as_ref().map(|l| l.term),
        leader_since: leader.map(|l| l.since.clone()),
        route_version,
        instances,
    }
}

/// Whether every live instance serves a route's versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmEverywhere {
    Yes,
    /// These live instances do not report them warm yet.
    Waiting(Vec<String>),
    /// An instance could not load one: the step fails with this.
    Failed(String),
}

/// Whether every live instance reports every `model/version` it needs
/// (`needed` of its id: an instance may serve its own share of a route)
/// warm. A failure counts only when it was reported at `route_version` or
/// later (the instance tried this route, not an older one).
pub fn warm_everywhere(
    cluster: &ClusterView,
    needed: impl Fn(&str) -> Vec<String>,
    route_version: i64,
) -> WarmEverywhere {
    let mut waiting = Vec::new();
    for i in cluster.instances.iter().filter(|i| i.live) {
        let needed = needed(&i.id);
        if let Some(f) = i
            .failures
            .iter()
            .find(|f| needed.contains(&f.version) && i.route_version >= route_version)
        {
            return WarmEverywhere::Failed(format!(
                "instance {} ({}) could not load version {}: {}",
                i.id, i.url, f.version, f.reason
            ));
        }
        if needed.iter().any(|v| !i.warm.contains(v)) {
            waiting.push(format!("{} ({})", i.id, i.url));
        }
    }
    match waiting.is_empty() {
        true => WarmEverywhere::Yes,
        false => WarmEverywhere::Waiting(waiting),
    }
}

/// The instances a rolling update across instances takes, in batch order:
/// the live ones, by advertised address, then id (fixed when it starts and
/// stored with it: an instance that joins later is not among them).
pub fn rolling_instances(cluster: &ClusterView) -> Vec<RollingInstance> {
    let mut live: Vec<RollingInstance> = cluster
        .instances
        .iter()
        .filter(|i| i.live)
        .map(|i| RollingInstance {
            id: i.id.clone(),
            url: i.url.clone(),
        })
        .collect();
    live.sort_by(|a, b| (&a.url, &a.id).cmp(&(&b.url, &b.id)));
    live.dedup_by(|a, b| a.id == b.id);
    live
}

/// What the rollout loop does about a rollout whose route some instances
/// may not serve yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every live instance serves it: the step goes on.
    Go,
    /// Some are still loading (named): look again at the next tick.
    Wait(String),
    /// The step fails, as a failed load does, with this reason.
    Fail(String),
}

/// [`WarmEverywhere`] after waiting `waited` of at most `bound` (the load
/// timeout): waiting longer than a load may take is a failed load.
pub fn readiness(warm: WarmEverywhere, waited: Duration, bound: Duration) -> Readiness {
    match warm {
        WarmEverywhere::Yes => Readiness::Go,
        WarmEverywhere::Failed(why) => Readiness::Fail(why),
        WarmEverywhere::Waiting(who) if waited <= bound => Readiness::Wait(who.join(", ")),
        WarmEverywhere::Waiting(who) => Readiness::Fail(format!(
            "instance{} {} did not report the route's versions warm within the load timeout ({})",
            if who.len() == 1 { "" } else { "s" },
            who.join(", "),
            crate::units::HumanDuration(bound)
        )),
    }
}

impl Controller {
    /// Whether every other live instance serves the versions the rollout's
    /// current route needs (this instance published it itself): see
    /// [`readiness`]. How long it has waited is kept here, per rollout.
    pub(super) fn cluster_readiness(
        &self,
        record: &crate::store::RolloutRecord,
    ) -> Result<Readiness, ControlError> {
        let store = self.registry.store();
        let view = self.cluster_now()?;
        let route = &record.state.route;
        let needed = |id: &str| -> Vec<String> {
            let theirs = route.for_instance(Some(id));
            theirs
                .versions()
                .into_iter()
                .map(|v| format!("{}/{v}", record.model))
                .collect()
        };
        let changed_at = store
            .changed_since(0)?
            .into_iter()
            .find(|(m, _)| *m == record.model)
            .map_or(0, |(_, v)| v);
        let warm = warm_everywhere(&view, needed, changed_at);
        let mut waits = self.warm_waits.lock().unwrap_or_else(|p| p.into_inner());
        if warm == WarmEverywhere::Yes {
            waits.remove(&record.id);
            return Ok(Readiness::Go);
        }
        let since = *waits
            .entry(record.id)
            .or_insert_with(std::time::Instant::now);
        let verdict = readiness(warm, since.elapsed(), self.limits.timeout);
        if !matches!(verdict, Readiness::Wait(_)) {
            waits.remove(&record.id);
        }
        Ok(verdict)
    }

    /// The cluster with this instance as it is now, not as it last
    /// reported.
    pub(super) fn cluster_now(&self) -> Result<ClusterView, ControlError> {
        let mut view = self.cluster()?;
        if let Some(me) = self.me.get() {
            let now = self.report(me);
            view.instances.retain(|i| i.id != me.id);
            view.instances.push(InstanceView {
                id: now.id,
                url: now.url,
                version: now.version,
                started_at: now.started_at,
                last_seen: crate::units::now_rfc3339(),
                live: true,
                leader: view.leader.as_deref() == Some(me.id.as_str()),
                route_version: now.route_version,
                warm: now.warm,
                failures: now.failures,
            });
        }
        Ok(view)
    }

    /// Tells the controller who this instance is, before it loads anything:
    /// a route may name it (a rolling update across instances).
    pub fn identify(&self, me: Identity) {
        let _ = self.me.set(me);
    }

    /// The share of `route` this instance serves (see
    /// [`RoutePolicy::for_instance`]): what it warms and publishes.
    pub(super) fn own_route(&self, route: &RoutePolicy) -> RoutePolicy {
        route.for_instance(self.me.get().map(|me| me.id.as_str()))
    }

    /// The instances a rolling update across instances takes, fixed now
    /// (see [`rolling_instances`]); refused when none is live.
    pub(super) fn fix_rolling_instances(&self) -> Result<Vec<RollingInstance>, ControlError> {
        let instances = rolling_instances(&self.cluster_now()?);
        if instances.is_empty() {
            return Err(ControlError::Conflict(format!(
                "strategy.rolling.scope: instances rolls over the live instances, and none has reported to the store within {}; check that the instances' heartbeats reach the store (`ferry cluster`), or use scope: replicas",
                crate::units::HumanDuration(LIVE_WITHIN)
            )));
        }
        Ok(instances)
    }

    /// The route version whose changes this instance has applied.
    pub fn served_route_version(&self) -> i64 {
        self.served.load(Ordering::Acquire)
    }

    /// Applies every change the store holds beyond the route version this
    /// instance serves (see the module doc); returns the version it serves
    /// then. A version that cannot start is recorded as a load failure and
    /// the rest goes on; a store failure stops here, to be tried again.
    pub async fn catch_up(&self) -> Result<i64, ControlError> {
        let store = self.registry.store().clone();
        let latest = store.route_version()?;
        if latest <= self.served_route_version() || !self.is_ready() {
            return Ok(self.served_route_version());
        }
        let _guard = self.lock.lock().await;
        for (model, _) in store.changed_since(self.served_route_version())? {
            self.follow_noting_failures(&model).await?;
        }
        self.served.fetch_max(latest, Ordering::AcqRel);
        Ok(self.served_route_version())
    }

    /// [`Controller::follow`], a version that cannot start recorded as this
    /// instance's load failure (and logged) rather than returned.
    pub(super) async fn follow_noting_failures(&self, model: &str) -> Result<(), ControlError> {
        match self.follow(model).await {
            Ok(()) => self.failed(model, None),
            Err(ControlError::Start {
                model,
                version,
                reason,
            }) => {
                tracing::error!(%model, %version, "not serving: {reason}");
                self.failed(&model, Some((version, reason)));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Brings one model's published route in line with the store (as at
    /// start-up), and shows its latest rollout's phase.
    pub(super) async fn follow(&self, model: &str) -> Result<(), ControlError> {
        let applied = self.apply(model, None).await;
        if let Some(latest) = self.registry.store().rollouts(model, 1)?.first() {
            self.publish_phase(latest);
        }
        applied
    }

    /// Records the model's load failure (or that it has none).
    fn failed(&self, model: &str, failure: Option<(String, String)>) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|k, _| k.split_once('/').is_none_or(|(m, _)| m != model));
        if let Some((version, reason)) = failure {
            failures.insert(format!("{model}/{version}"), reason);
        }
    }

    /// What this instance reports about itself.
    pub fn report(&self, me: &Identity) -> InstanceReport {
        let mut warm: Vec<String> = self
            .routes
            .snapshot_policies()
            .into_iter()
            .flat_map(|(model, _)| {
                let pools = self.routes.model(&model).map(|r| {
                    r.pools
                        .keys()
                        .map(|v| format!("{model}/{v}"))
                        .collect::<Vec<_>>()
                });
                pools.unwrap_or_default()
            })
            .collect();
        warm.sort();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        InstanceReport {
            id: me.id.clone(),
            url: me.url.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: me.started_at.clone(),
            route_version: self.served_route_version(),
            warm,
            failures: failures
                .iter()
                .map(|(version, reason)| LoadFailure {
                    version: version.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    /// The instances sharing this store, live or stale, and who leads.
    pub fn cluster(&self) -> Result<ClusterView, ControlError> {
        let store = self.registry.store();
        let latest = store.route_version()?;
        let lease = store.leader()?;
        Ok(view(store.instances()?, lease, latest, now_ms()))
    }

    /// Competes for the leader's lease as `me` from now on (see
    /// `store::lease`); an embedded store's one instance leads at once.
    pub fn campaign(&self, me: &Identity, settings: LeaseSettings) {
        self.registry.store().campaign(&me.id, settings);
        self.metrics.set_instance(
            &me.id,
            self.registry.store().leading().is_some(),
            self.served_route_version(),
        );
    }

    /// Follows the store until the process ends (see the module doc).
    pub async fn run_following(self: Arc<Self>, me: Identity) {
        let mut announced = self.registry.store().changes();
        let mut failing = false;
        loop {
            match announced.as_mut() {
                Some(rx) => {
                    let _ = tokio::time::timeout(CHECK_EVERY, rx.changed()).await;
                }
                None => tokio::time::sleep(CHECK_EVERY).await,
            }
            let before = self.served_route_version();
            match self.catch_up().await {
                Ok(now) if now != before => self.write_report(&me).await,
                Ok(_) => {}
                Err(e) if !failing => {
                    tracing::warn!(
                        "cannot follow the store's changes: {e}; trying again every {CHECK_EVERY:?}"
                    );
                    failing = true;
                    continue;
                }
                Err(_) => continue,
            }
            failing = false;
        }
    }

    /// Reports this instance every [`HEARTBEAT`] and forgets instances
    /// silent for [`FORGET_AFTER`], until the process ends.
    pub async fn run_heartbeat(self: Arc<Self>, me: Identity) {
        let _ = self.me.set(me.clone());
        // An embedded store is one node's: any other row is a previous
        // process of this one (killed, so it never left), not a second
        // instance to list beside it.
        if !self.registry.store().keeps_buckets()
            && let Err(e) = self.registry.store().forget_instances(now_ms())
        {
            tracing::debug!("cannot forget a previous process's row: {e}");
        }
        let mut beats: u64 = 0;
        loop {
            self.write_report(&me).await;
            if beats.is_multiple_of(60) {
                let before = now_ms().saturating_sub(FORGET_AFTER.as_millis() as u64);
                if let Err(e) = self.registry.store().forget_instances(before) {
                    tracing::debug!("cannot forget silent instances: {e}");
                }
            }
            beats += 1;
            tokio::time::sleep(HEARTBEAT).await;
        }
    }

    /// A graceful stop, once the listeners have drained: flushes every
    /// bucket this instance holds (the one filling now included: no request
    /// comes after it), then leaves the store's view of the cluster — its
    /// row, and its lease when it leads — so the others neither wait for it
    /// nor count its windows incomplete, and another instance leads at once.
    pub async fn leave(&self) {
        let Some(me) = self.me.get() else { return };
        self.leaving.store(true, Ordering::Release);
        let store = self.registry.store().clone();
        let flush = store.keeps_buckets().then(|| {
            let open = crate::metrics::window::epoch_at(now_ms());
            crate::metrics::cluster::Flush {
                instance: me.id.clone(),
                through: open,
                buckets: self.telemetry.closed_between(0, open + 1),
            }
        });
        let id = me.id.clone();
        // A store call blocks its thread: off the async workers.
        let left = tokio::task::spawn_blocking(move || {
            if let Some(flush) = flush {
                store.flush_buckets(&flush)?;
            }
            store.leave(&id)
        })
        .await;
        match left {
            Ok(Ok(())) => tracing::info!("instance {} left the cluster", me.id),
            Ok(Err(e)) => tracing::warn!(
                "instance {} could not leave the cluster cleanly: {e}; the others see it stale within {LIVE_WITHIN:?}, and its lease, if it led, expires",
                me.id
            ),
            Err(_) => {}
        }
    }

    /// Sets this instance's cluster series from what it knows now, without
    /// a store call: whether it holds the lease by its own clock, and the
    /// route version it serves. At each scrape (a report may be stuck on an
    /// unreachable store for its time limit) and each report.
    pub fn show_instance(&self) {
        if let Some(me) = self.me.get() {
            self.metrics.set_instance(
                &me.id,
                self.registry.store().leading().is_some(),
                self.served_route_version(),
            );
        }
    }

    async fn write_report(&self, me: &Identity) {
        if self.leaving.load(Ordering::Acquire) {
            return;
        }
        let store = self.registry.store().clone();
        let report = self.report(me);
        self.metrics
            .set_instance(&me.id, store.leading().is_some(), report.route_version);
        // A store call blocks its thread: off the async workers.
        let written = tokio::task::spawn_blocking(move || store.report_instance(&report)).await;
        if let Ok(Err(e)) = written {
            tracing::debug!("cannot write this instance's report: {e}");
        }
    }
}

/// The failures recorded per `model/version`.
pub(super) type Failures = std::sync::Mutex<BTreeMap<String, String>>;
/// Since when each rollout (by id) waits for other instances.
pub(super) type WarmWaits = std::sync::Mutex<std::collections::HashMap<i64, std::time::Instant>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{ControllerParts, Reach};
    use crate::gateway::RouteTable;
    use crate::metrics::{Metrics, Telemetry};
    use crate::registry::{Artifact, Blobs, NewVersion, Registry};
    use crate::runtime::{LoadLimits, OnnxRuntime, remote};
    use crate::store::SqliteStore;

    fn record(id: &str, last_seen_ms: u64, route_version: i64, warm: &[&str]) -> InstanceRecord {
        InstanceRecord {
            report: InstanceReport {
                id: id.into(),
                url: format!("http://{id}:8080"),
                version: "0.1.0".into(),
                started_at: "2026-12-01T20:00:00.000Z".into(),
                route_version,
                warm: warm.iter().map(|w| w.to_string()).collect(),
                failures: vec![],
            },
            last_seen_ms,
        }
    }

    #[test]
    fn an_instance_is_live_within_five_seconds_of_its_last_report() {
        let now = 1_000_000;
        let v = view(
            vec![
                record("a", now, 3, &[]),
                record("b", now - 5_000, 3, &[]),
                record("c", now - 5_001, 2, &[]),
                record("d", now + 200, 3, &[]), // another clock a little ahead
            ],
            None,
            3,
            now,
        );
        let live: Vec<(&str, bool)> = v
            .instances
            .iter()
            .map(|i| (i.id.as_str(), i.live))
            .collect();
        assert_eq!(live, [("a", true), ("b", true), ("c", false), ("d", true)]);
        assert_eq!(v.instances[0].last_seen, "1970-01-01T00:16:40.000Z");
        assert_eq!(v.route_version, 3);
        assert_eq!((v.leader, v.term), (None, None));
    }

    #[test]
    fn the_leader_is_the_lease_s_holder_while_its_lease_is_valid() {
        let now = 1_000_000;
        let lease = |valid| Leader {
            instance: "b".into(),
            term: 4,
            since: "2026-12-01T20:00:00.000Z".into(),
            valid,
        };
        let records = || vec![record("a", now, 3, &[]), record("b", now, 3, &[])];
        let v = view(records(), Some(lease(true)), 3, now);
        assert_eq!(
            (v.leader.as_deref(), v.term, v.leader_since.as_deref()),
            (Some("b"), Some(4), Some("2026-12-01T20:00:00.000Z"))
        );
        let leaders: Vec<bool> = v.instances.iter().map(|i| i.leader).collect();
        assert_eq!(leaders, [false, true]);
        // Expired and not yet taken (a failover under way): nobody leads,
        // the term stays.
        let v = view(records(), Some(lease(false)), 3, now);
        assert_eq!((v.leader, v.term, v.leader_since), (None, Some(4), None));
        assert!(v.instances.iter().all(|i| !i.leader));
    }

    #[test]
    fn a_step_waits_for_live_instances_only_and_fails_on_a_failed_load() {
        let now = 1_000_000;
        let needed = vec!["m/2".to_string()];
        let cluster = |records| view(records, None, 7, now);
        let all_warm = cluster(vec![
            record("a", now, 7, &["m/1", "m/2"]),
            record("b", now, 7, &["m/2"]),
            record("gone", now - 60_000, 3, &["m/1"]),
        ]);
        assert_eq!(
            warm_everywhere(&all_warm, |_| needed.clone(), 7),
            WarmEverywhere::Yes
        );
        let loading = cluster(vec![
            record("a", now, 7, &["m/1", "m/2"]),
            record("b", now, 6, &["m/1"]),
        ]);
        assert_eq!(
            warm_everywhere(&loading, |_| needed.clone(), 7),
            WarmEverywhere::Waiting(vec!["b (http://b:8080)".into()])
        );
        let mut failing = record("b", now, 7, &["m/1"]);
        failing.report.failures.push(LoadFailure {
            version: "m/2".into(),
            reason: "warm-up failed".into(),
        });
        let mut old = failing.clone();
        old.report.route_version = 6;
        assert_eq!(
            warm_everywhere(&cluster(vec![old]), |_| needed.clone(), 7),
            WarmEverywhere::Waiting(vec!["b (http://b:8080)".into()]),
            "a failure of an older route is not this one's"
        );
        assert_eq!(
            warm_everywhere(&cluster(vec![failing]), |_| needed.clone(), 7),
            WarmEverywhere::Failed(
                "instance b (http://b:8080) could not load version m/2: warm-up failed".into()
            )
        );
    }

    /// A rolling update across instances: the instance on the candidate
    /// must have it warm; the others need only the stable version.
    #[test]
    fn each_instance_is_waited_for_with_its_own_share_of_the_route() {
        let now = 1_000_000;
        let mut route = crate::gateway::RoutePolicy::stable_only("1");
        route.candidate = Some(crate::gateway::policy::CandidateSplit {
            version: "2".into(),
            weight: 50.0,
            sticky_header: None,
            matches: vec![],
        });
        route.candidate_instances = vec!["a".into()];
        let needed = |id: &str| -> Vec<String> {
            let theirs = route.for_instance(Some(id));
            theirs.versions().iter().map(|v| format!("m/{v}")).collect()
        };
        let before = view(
            vec![record("a", now, 7, &["m/1"]), record("b", now, 7, &["m/1"])],
            None,
            7,
            now,
        );
        assert_eq!(
            warm_everywhere(&before, needed, 7),
            WarmEverywhere::Waiting(vec!["a (http://a:8080)".into()]),
            "b does not load the candidate"
        );
        let after = view(
            vec![
                record("a", now, 7, &["m/1", "m/2"]),
                record("b", now, 7, &["m/1"]),
            ],
            None,
            7,
            now,
        );
        assert_eq!(warm_everywhere(&after, needed, 7), WarmEverywhere::Yes);
    }

    #[test]
    fn rolling_takes_the_live_instances_by_address_then_id() {
        let now = 1_000_000;
        let mut late = record("z", now, 7, &[]);
        late.report.url = "http://10.0.0.1:8080".into();
        let mut twin = record("y", now, 7, &[]);
        twin.report.url = "http://10.0.0.1:8080".into();
        let cluster = view(
            vec![
                record("c", now, 7, &[]),
                late,
                record("gone", now - 60_000, 7, &[]),
                twin,
                record("b", now, 7, &[]),
            ],
            None,
            7,
            now,
        );
        let order: Vec<String> = rolling_instances(&cluster)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            order,
            [
                "y (http://10.0.0.1:8080)",
                "z (http://10.0.0.1:8080)",
                "b (http://b:8080)",
                "c (http://c:8080)"
            ],
            "the stale one is left out"
        );
    }

    #[test]
    fn waiting_longer_than_a_load_may_take_is_a_failed_load() {
        let bound = Duration::from_secs(60);
        let waiting = || WarmEverywhere::Waiting(vec!["b (http://b:8080)".into()]);
        assert_eq!(
            readiness(WarmEverywhere::Yes, bound * 2, bound),
            Readiness::Go
        );
        assert_eq!(
            readiness(waiting(), bound, bound),
            Readiness::Wait("b (http://b:8080)".into())
        );
        assert_eq!(
            readiness(waiting(), bound + Duration::from_millis(1), bound),
            Readiness::Fail(
                "instance b (http://b:8080) did not report the route's versions warm within the load timeout (1m)"
                    .into()
            )
        );
        assert_eq!(
            readiness(WarmEverywhere::Failed("why".into()), Duration::ZERO, bound),
            Readiness::Fail("why".into())
        );
    }

    fn onnx() -> Arc<OnnxRuntime> {
        OnnxRuntime::for_tests()
    }

    /// A controller on the database file in `dir` (another instance when
    /// called twice: its own store handle, routes and pools).
    fn instance(dir: &std::path::Path) -> Arc<Controller> {
        let store = Arc::new(SqliteStore::open(dir).expect("a store"));
        let blobs = Arc::new(Blobs::open(dir).expect("a blob dir"));
        let http = remote::RemoteHttp::new(Duration::from_secs(2), 64 << 20);
        let limits = LoadLimits {
            max_input_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
        };
        Arc::new(Controller::new(ControllerParts {
            registry: Arc::new(Registry::new(store, blobs, onnx(), http.clone(), limits)),
            routes: Arc::new(RouteTable::new()),
            onnx: onnx(),
            http,
            metrics: Arc::new(Metrics::new()),
            telemetry: Arc::new(Telemetry::default()),
            drain_timeout: Duration::from_secs(1),
            reach: Reach::default(),
            limits,
            command_wait: crate::controller::commands::DEFAULT_WAIT,
        }))
    }

    async fn register(c: &Controller, version: &str, file: &str) {
        let path = format!("{}/examples/models/{file}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(path).expect("the example model");
        let staged = c.registry().blobs().stage_bytes(&bytes).await.unwrap();
        c.register(NewVersion {
            model: "cancer".into(),
            version: version.into(),
            artifact: Artifact::Onnx(staged),
            labels: Default::default(),
            settings: Default::default(),
        })
        .await
        .unwrap();
    }

    fn serves(c: &Controller) -> Vec<String> {
        c.report(&Identity::new("http://x".into())).warm
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_follows_the_changes_another_made() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (instance(dir.path()), instance(dir.path()));
        a.start().await.unwrap();
        b.start().await.unwrap();
        register(&a, "1", "cancer-v1.onnx").await;
        register(&a, "2", "cancer-v2.onnx").await;
        assert_eq!(serves(&a), ["cancer/1"]);
        assert_eq!(serves(&b), Vec::<String>::new(), "b has not looked yet");
        let latest = b.catch_up().await.unwrap();
        assert_eq!(latest, a.registry().store().route_version().unwrap());
        assert_eq!(serves(&b), ["cancer/1"]);
        let policy = crate::gateway::RoutePolicy::stable_only("2");
        a.set_route("cancer", policy.clone(), "test").await.unwrap();
        assert_eq!(b.routes.model("cancer").unwrap().policy.stable, "1");
        b.catch_up().await.unwrap();
        assert_eq!(b.routes.model("cancer").unwrap().policy, policy);
        assert_eq!(
            serves(&b),
            ["cancer/2"],
            "the version that left was drained"
        );
        assert_eq!(
            b.served_route_version(),
            a.registry().store().route_version().unwrap()
        );
        let unchanged = b.served_route_version();
        assert_eq!(b.catch_up().await.unwrap(), unchanged, "nothing new");
    }
}
