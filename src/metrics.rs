//! Per-version telemetry. Records; decides nothing.
//!
//! Two views of the same events:
//! - [`Telemetry`]: time windows per model, version and role ([`window`],
//!   with mergeable latency [`sketch`]es) for analysis, the dashboard and
//!   `/api/v1/models/{model}/metrics`;
//! - [`Metrics`]: Prometheus series at `/metrics`, keyed by `model` and
//!   `version` only (so they survive a version changing role), with roles,
//!   traffic weights and rollout phases as separate info series; written as
//!   OpenMetrics or as Prometheus' classic text format ([`Exposition`]).

pub mod bucket;
pub mod cluster;
pub mod packed;
pub mod sketch;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::units::now_secs;
pub use window::{Series, Summary};

/// What a version does for a request; telemetry is kept per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Stable,
    Candidate,
    Staging,
    Shadow,
    /// Answered after the stable version failed (failover chain).
    Fallback,
    /// Addressed by `/versions/{v}`.
    Direct,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Stable,
        Role::Candidate,
        Role::Staging,
        Role::Shadow,
        Role::Fallback,
        Role::Direct,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Candidate => "candidate",
            Role::Staging => "staging",
            Role::Shadow => "shadow",
            Role::Fallback => "fallback",
            Role::Direct => "direct",
        }
    }

    /// The role named `name` (its `as_str`).
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn index(self) -> usize {
        Role::ALL.iter().position(|r| *r == self).expect("listed")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    version: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    model: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    model: String,
    from_version: String,
    to_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComparisonLabels {
    model: String,
    version: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    model: String,
    version: String,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    model: String,
    strategy: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn duration_histogram() -> Histogram {
    // 100 µs to about 13 s, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// How a request ended, as counted in `ferry_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Failed (engine error, timeout, unavailable replica).
    Error,
    /// Refused before running: bad input or a full queue.
    Rejected,
}

/// The result of comparing a shadow's answer with the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Agree,
    Disagree,
    /// The shadow failed (or its answer lacked the compared output).
    Error,
}

/// The role and weight series set for one model.
type PublishedRouting = (Vec<RoleLabels>, Vec<VersionLabels>);

/// All of Ferry's Prometheus metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<VersionLabels, Histogram, fn() -> Histogram>,
    failovers: Family<FailoverLabels, Counter>,
    comparisons: Family<ComparisonLabels, Counter>,
    dropped: Family<VersionLabels, Counter>,
    roles: Family<RoleLabels, Gauge>,
    batch_sizes: Family<VersionLabels, Histogram, fn() -> Histogram>,
    weights: Family<VersionLabels, Gauge<f64, AtomicU64>>,
    phases: Family<PhaseLabels, Gauge>,
    in_flight: Family<VersionLabels, Gauge>,
    grpc: Family<GrpcLabels, Counter>,
    /// This instance, by id: 1 while it leads. Every instance reports
    /// itself, so a sum over instances above 1 is a split brain.
    cluster_leader: Family<InstanceLabels, Gauge>,
    /// The route version this instance serves: one behind the others'
    /// for long is a lagging instance.
    route_version: Family<InstanceLabels, Gauge>,
    /// The role and weight series set for each model, to clear on change.
    published: Mutex<HashMap<String, PublishedRouting>>,
    /// The phase series set for each model, to clear on change.
    published_phases: Mutex<HashMap<String, PhaseLabels>>,
}

/// Handles for one version, taken once when its pool starts, so the request
/// path never looks a series up.
#[derive(Clone)]
pub struct VersionMetrics {
    ok: Counter,
    error: Counter,
    rejected: Counter,
    duration: Histogram,
    agree: Counter,
    disagree: Counter,
    compare_error: Counter,
    dropped: Counter,
    /// Requests running or queued on the version's replicas: a request
    /// cancelled by its client (a gRPC deadline, a closed connection) leaves it.
    pub in_flight: Gauge,
}

impl VersionMetrics {
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        match outcome {
            Outcome::Ok => self.ok.inc(),
            Outcome::Error => self.error.inc(),
            Outcome::Rejected => self.rejected.inc(),
        };
        if outcome != Outcome::Rejected {
            self.duration.observe(seconds);
        }
    }

    /// Counts a shadow comparison (on the shadow version's series).
    pub fn compared(&self, c: Comparison) {
        match c {
            Comparison::Agree => self.agree.inc(),
            Comparison::Disagree => self.disagree.inc(),
            Comparison::Error => self.compare_error.inc(),
        };
    }

    /// Counts a mirrored copy dropped (on the shadow version's series).
    pub fn dropped(&self) {
        self.dropped.inc();
    }

    /// The shadow counters so far: agreed, disagreed, failed, dropped.
    pub fn shadow_counts(&self) -> [u64; 4] {
        [
            self.agree.get(),
            self.disagree.get(),
            self.compare_error.get(),
            self.dropped.get(),
        ]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<VersionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        let comparisons = Family::<ComparisonLabels, Counter>::default();
        let dropped = Family::<VersionLabels, Counter>::default();
        let roles = Family::<RoleLabels, Gauge>::default();
        let batch_sizes =
            Family::<VersionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                batch_histogram as fn() -> Histogram,
            );
        let weights = Family::<VersionLabels, Gauge<f64, AtomicU64>>::default();
        let phases = Family::<PhaseLabels, Gauge>::default();
        let in_flight = Family::<VersionLabels, Gauge>::default();
        let grpc = Family::<GrpcLabels, Counter>::default();
        let cluster_leader = Family::<InstanceLabels, Gauge>::default();
        let route_version = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "ferry_cluster_leader",
            "1 while this instance leads (drives the rollouts), else 0; each instance reports itself",
            cluster_leader.clone(),
        );
        registry.register(
            "ferry_route_version",
            "The route version this instance serves (the store's grows with every change of what serves)",
            route_version.clone(),
        );
        registry.register(
            "ferry_requests",
            "Inference requests by model, version and outcome (ok, error, rejected)",
            requests.clone(),
        );
        registry.register(
            "ferry_request_duration_seconds",
            "Time to answer an inference request, by the version that answered",
            duration.clone(),
        );
        registry.register(
            "ferry_failovers",
            "Requests passed to the next version of a failover chain: after the version failed them, or past its open circuit breaker",
            failovers.clone(),
        );
        registry.register(
            "ferry_shadow_comparisons",
            "Shadow answers compared with production's (agree, disagree, error)",
            comparisons.clone(),
        );
        registry.register(
            "ferry_shadow_dropped",
            "Mirrored copies dropped because the shadow was saturated",
            dropped.clone(),
        );
        registry.register(
            "ferry_batch_size",
            "Requests merged into one inference run (adaptive batching)",
            batch_sizes.clone(),
        );
        registry.register(
            "ferry_version_role",
            "The role a version plays for its model (1 while it does)",
            roles.clone(),
        );
        registry.register(
            "ferry_traffic_weight_percent",
            "The configured share of production traffic per version",
            weights.clone(),
        );
        registry.register(
            "ferry_rollout_phase",
            "The phase of each model's latest rollout (1 for the current phase)",
            phases.clone(),
        );
        registry.register(
            "ferry_requests_in_flight",
            "Inference requests running or queued on a version's replicas",
            in_flight.clone(),
        );
        registry.register(
            "ferry_grpc_requests",
            "Inference requests that came over gRPC, by model and gRPC status code (the rest of ferry_requests_total came over REST)",
            grpc.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            duration,
            failovers,
            comparisons,
            dropped,
            roles,
            batch_sizes,
            weights,
            phases,
            in_flight,
            grpc,
            cluster_leader,
            route_version,
            published: Mutex::new(HashMap::new()),
            published_phases: Mutex::new(HashMap::new()),
        }
    }

    pub fn for_version(&self, model: &str, version: &str) -> VersionMetrics {
        let counter = |outcome| {
            self.requests
                .get_or_create(&RequestLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    outcome,
                })
                .clone()
        };
        let compared = |result| {
            self.comparisons
                .get_or_create(&ComparisonLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    result,
                })
                .clone()
        };
        let labels = VersionLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        VersionMetrics {
            ok: counter("ok"),
            error: counter("error"),
            rejected: counter("rejected"),
            duration: self.duration.get_or_create(&labels).clone(),
            agree: compared("agree"),
            disagree: compared("disagree"),
            compare_error: compared("error"),
            dropped: self.dropped.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
        }
    }

    /// The histogram of a version's batch sizes.
    pub fn batch_sizes(&self, model: &str, version: &str) -> Histogram {
        self.batch_sizes
            .get_or_create(&VersionLabels {
                model: model.to_string(),
                version: version.to_string(),
            })
            .clone()
    }

    /// Counts a request retried from one version to the next.
    /// Counts an inference request that came over gRPC and the status it
    /// got (`OK`, `INVALID_ARGUMENT`, …). `model` must be one that is
    /// served: a client's unknown names must not make series.
    pub fn grpc_request(&self, model: &str, code: &str) {
        self.grpc
            .get_or_create(&GrpcLabels {
                model: model.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn failover(&self, model: &str, from: &str, to: &str) {
        self.failovers
            .get_or_create(&FailoverLabels {
                model: model.to_string(),
                from_version: from.to_string(),
                to_version: to.to_string(),
            })
            .inc();
    }

    /// Replaces a model's role and weight info series.
    pub fn set_routing(&self, model: &str, roles: &[(String, Role)], weights: &[(String, f64)]) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old_roles, old_weights)) = published.remove(model) {
            old_roles.iter().for_each(|l| {
                self.roles.remove(l);
            });
            old_weights.iter().for_each(|l| {
                self.weights.remove(l);
            });
        }
        let role_labels: Vec<RoleLabels> = roles
            .iter()
            .map(|(v, r)| RoleLabels {
                model: model.to_string(),
                version: v.clone(),
                role: r.as_str(),
            })
            .collect();
        for l in &role_labels {
            self.roles.get_or_create(l).set(1);
        }
        let weight_labels: Vec<VersionLabels> = weights
            .iter()
            .map(|(v, w)| {
                let l = VersionLabels {
                    model: model.to_string(),
                    version: v.clone(),
                };
                self.weights.get_or_create(&l).set(*w);
                l
            })
            .collect();
        published.insert(model.to_string(), (role_labels, weight_labels));
    }

    /// Sets the phase series of a model's latest rollout, replacing the
    /// model's previous one.
    pub fn set_rollout_phase(&self, model: &str, strategy: &str, phase: &str) {
        let labels = PhaseLabels {
            model: model.to_string(),
            strategy: strategy.to_string(),
            phase: phase.to_string(),
        };
        let mut published = self
            .published_phases
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = published.remove(model)
            && old != labels
        {
            self.phases.remove(&old);
        }
        self.phases.get_or_create(&labels).set(1);
        published.insert(model.to_string(), labels);
    }

    /// Sets this instance's cluster series: whether it leads, and the route
    /// version it serves.
    pub fn set_instance(&self, instance: &str, leader: bool, route_version: i64) {
        let labels = InstanceLabels {
            instance: instance.to_string(),
        };
        self.cluster_leader
            .get_or_create(&labels)
            .set(i64::from(leader));
        self.route_version.get_or_create(&labels).set(route_version);
    }

    /// Every series, in the format asked for.
    pub fn encode(&self, format: Exposition) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Text => classic_text(&out),
        }
    }
}

/// The formats `/metrics` is written in: OpenMetrics for scrapers that ask
/// for it in `Accept` (Prometheus does), and Prometheus' classic text format
/// (0.0.4) for the others, so that each parser reads the types it expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    OpenMetrics,
    Text,
}

impl Exposition {
    /// The format an `Accept` header prefers: OpenMetrics when it is listed
    /// with a weight at least that of plain text (and above 0).
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        let (mut open_metrics, mut text) = (0.0f64, 0.0f64);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= text {
            Exposition::OpenMetrics
        } else {
            Exposition::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrites OpenMetrics as the classic text format: a counter family is
/// named with its `_total` samples' name, OpenMetrics-only types become
/// `untyped`, and `# UNIT` and `# EOF` are left out.
fn classic_text(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), kind),
                "counter" | "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with("# ") {
            continue; // # UNIT, # EOF
        }
        // A sample, without an exemplar (` # {...}`) if it has one.
        let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// A version's series, one slot per [`Role`].
type RoleSeries = [Option<Arc<Series>>; 6];

/// A shadow answer that disagreed with production's, kept as an example.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Disagreement {
    pub id: String,
    #[schema(value_type = Object)]
    pub primary: serde_json::Value,
    #[schema(value_type = Object)]
    pub shadow: serde_json::Value,
}

/// Disagreements kept per shadow version.
const EXAMPLES: usize = 5;

/// The time-window series of every model, version and role.
#[derive(Default)]
pub struct Telemetry {
    series: RwLock<HashMap<String, HashMap<String, RoleSeries>>>,
    /// When these series began: the ring holds nothing older.
    since: Since,
    /// The latest disagreements per (model, version), each numbered so a
    /// reader can take only those newer than what it has seen.
    examples: Mutex<HashMap<(String, String), Examples>>,
}

/// A moment, now by default (Unix milliseconds).
struct Since(u64);

impl Default for Since {
    fn default() -> Self {
        Since(crate::units::now_ms())
    }
}

/// Numbered disagreements: the latest few and the last number given.
#[derive(Default)]
struct Examples {
    latest: std::collections::VecDeque<(u64, Disagreement)>,
    last: u64,
}

/// One series' summary, as the metrics API lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SeriesSummary {
    pub version: String,
    pub role: Role,
    #[serde(flatten)]
    pub summary: Summary,
}

impl Telemetry {
    /// When this process began keeping series (Unix milliseconds).
    pub fn since_ms(&self) -> u64 {
        self.since.0
    }

    /// The series of a model, version and role (created on first use).
    pub fn series(&self, model: &str, version: &str, role: Role) -> Arc<Series> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .and_then(|m| m.get(version))
            .and_then(|roles| roles[role.index()].clone())
        {
            return s;
        }
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        let slot = &mut all
            .entry(model.to_string())
            .or_default()
            .entry(version.to_string())
            .or_default()[role.index()];
        slot.get_or_insert_with(Default::default).clone()
    }

    /// The series of a model, version and role, if it exists.
    fn find(&self, model: &str, version: &str, role: Role) -> Option<Arc<Series>> {
        self.series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .and_then(|m| m.get(version))
            .and_then(|roles| roles[role.index()].clone())
    }

    /// The (version, role) of every series of a model.
    fn keys(&self, model: &str) -> Vec<(String, Role)> {
        let all = self.series.read().unwrap_or_else(|p| p.into_inner());
        let Some(versions) = all.get(model) else {
            return vec![];
        };
        versions
            .iter()
            .flat_map(|(v, roles)| {
                let present = roles.iter().enumerate().filter(|(_, s)| s.is_some());
                present.map(|(i, _)| (v.clone(), Role::ALL[i]))
            })
            .collect()
    }

    /// The summary of one version in one role over the complete buckets of
    /// the last `window` (empty when it has seen no traffic in that role):
    /// what analysis judges.
    pub fn summary(&self, model: &str, version: &str, role: Role, window: Duration) -> Summary {
        let last = (now_secs() / window::BUCKET_SECS).saturating_sub(1);
        let alone = cluster::Peers::default();
        self.merged_summary(model, version, role, last, window, &alone)
    }

    /// Keeps a disagreement as an example (the most recent few per version).
    pub fn record_disagreement(&self, model: &str, version: &str, example: Disagreement) {
        let mut all = self.examples.lock().unwrap_or_else(|p| p.into_inner());
        let list = all
            .entry((model.to_string(), version.to_string()))
            .or_default();
        list.last += 1;
        list.latest.push_back((list.last, example));
        while list.latest.len() > EXAMPLES {
            list.latest.pop_front();
        }
    }

    /// The latest disagreements of a shadow version.
    pub fn disagreements(&self, model: &str, version: &str) -> Vec<Disagreement> {
        self.disagreements_since(model, version, 0).0
    }

    /// The disagreements numbered after `seen` (of the latest few), and the
    /// last number given so far.
    pub fn disagreements_since(
        &self,
        model: &str,
        version: &str,
        seen: u64,
    ) -> (Vec<Disagreement>, u64) {
        let all = self.examples.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&(model.to_string(), version.to_string()))
            .map(|l| {
                let newer = l.latest.iter().filter(|(n, _)| *n > seen);
                (newer.map(|(_, d)| d.clone()).collect(), l.last)
            })
            .unwrap_or_default()
    }

    /// Summaries of every series of a model over the last `window`.
    pub fn summaries(&self, model: &str, window: Duration) -> Vec<SeriesSummary> {
        let now_ms = crate::units::now_ms();
        let now = now_ms / 1000 / window::BUCKET_SECS;
        let mut series = self.merged_summaries(model, now, window, &cluster::Peers::default());
        for s in &mut series {
            s.summary = window::to_now(
                std::mem::take(&mut s.summary),
                now_ms,
                Some(self.since_ms()),
            );
        }
        series
    }

    /// Drops the series of versions that no longer serve and have seen no
    /// traffic for the whole retention (15 minutes).
    pub fn forget_idle(&self, model: &str, serving: &[&str]) {
        let now = now_secs();
        let retention = (window::RING as u64) * window::BUCKET_SECS;
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(versions) = all.get_mut(model) {
            versions.retain(|version, roles| {
                serving.contains(&version.as_str())
                    || roles
                        .iter()
                        .flatten()
                        .any(|s| s.last_seen().is_some_and(|t| t + retention > now))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_contract_names_and_labels() {
        let m = Metrics::new();
        let v = m.for_version("cancer", "1");
        v.record(Outcome::Ok, 0.0002);
        v.record(Outcome::Rejected, 0.0);
        m.failover("cancer", "2", "1");
        m.set_routing(
            "cancer",
            &[("1".into(), Role::Stable), ("2".into(), Role::Candidate)],
            &[("1".into(), 90.0), ("2".into(), 10.0)],
        );
        m.set_rollout_phase("cancer", "canary", "progressing");
        m.set_instance("3f1c0a9b2e7d", true, 42);
        let text = m.encode(Exposition::OpenMetrics);
        for line in [
            r#"ferry_cluster_leader{instance="3f1c0a9b2e7d"} 1"#,
            r#"ferry_route_version{instance="3f1c0a9b2e7d"} 42"#,
            r#"ferry_requests_total{model="cancer",version="1",outcome="ok"} 1"#,
            r#"ferry_requests_total{model="cancer",version="1",outcome="rejected"} 1"#,
            r#"ferry_request_duration_seconds_count{model="cancer",version="1"} 1"#,
            r#"ferry_failovers_total{model="cancer",from_version="2",to_version="1"} 1"#,
            r#"ferry_version_role{model="cancer",version="2",role="candidate"} 1"#,
            r#"ferry_traffic_weight_percent{model="cancer",version="2"} 10.0"#,
            r#"ferry_shadow_comparisons_total{model="cancer",version="1",result="agree"} 0"#,
            r#"ferry_rollout_phase{model="cancer",strategy="canary",phase="progressing"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A new routing replaces the old info series.
        m.set_routing(
            "cancer",
            &[("2".into(), Role::Stable)],
            &[("2".into(), 100.0)],
        );
        m.set_rollout_phase("cancer", "canary", "succeeded");
        m.set_instance("3f1c0a9b2e7d", false, 43);
        let text = m.encode(Exposition::OpenMetrics);
        assert!(text.contains(r#"ferry_cluster_leader{instance="3f1c0a9b2e7d"} 0"#));
        assert!(text.contains(r#"ferry_route_version{instance="3f1c0a9b2e7d"} 43"#));
        assert!(!text.contains(r#"version="1",role="stable""#));
        assert!(!text.contains(r#"phase="progressing""#), "{text}");
        assert!(text.contains(
            r#"ferry_rollout_phase{model="cancer",strategy="canary",phase="succeeded"} 1"#
        ));
        assert!(text.contains(r#"ferry_version_role{model="cancer",version="2",role="stable"} 1"#));
    }

    /// The classic format names each counter family after its samples
    /// (`ferry_requests_total`), so Prometheus' text parser types them, and
    /// has no OpenMetrics-only lines.
    #[test]
    fn the_classic_text_format_types_counters_by_their_sample_names() {
        let m = Metrics::new();
        m.for_version("cancer", "1").record(Outcome::Ok, 0.0002);
        let open = m.encode(Exposition::OpenMetrics);
        assert!(open.contains("# TYPE ferry_requests counter") && open.ends_with("# EOF\n"));
        let text = m.encode(Exposition::Text);
        assert!(
            text.contains("# TYPE ferry_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP ferry_requests_total Inference requests"),
            "{text}"
        );
        assert!(text.contains("# TYPE ferry_request_duration_seconds histogram"));
        assert!(
            text.contains(r#"ferry_requests_total{model="cancer",version="1",outcome="ok"} 1"#)
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn the_format_follows_accept() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            Exposition::negotiate(Some(prometheus)),
            Exposition::OpenMetrics
        );
        assert_eq!(Exposition::negotiate(None), Exposition::Text);
        assert_eq!(Exposition::negotiate(Some("*/*")), Exposition::Text);
        assert_eq!(
            Exposition::negotiate(Some("text/plain;version=0.0.4")),
            Exposition::Text
        );
        assert_eq!(
            Exposition::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Exposition::Text
        );
        assert_eq!(
            Exposition::negotiate(Some("text/plain;q=0.5, application/openmetrics-text;q=0.9")),
            Exposition::OpenMetrics
        );
    }

    #[test]
    fn telemetry_series_are_per_role_and_summarised() {
        let t = Telemetry::default();
        t.series("m", "1", Role::Stable)
            .record(now_secs(), |b| b.requests += 3);
        t.series("m", "1", Role::Stable)
            .record(now_secs(), |b| b.requests += 2);
        t.series("m", "2", Role::Candidate)
            .record(now_secs(), |b| b.requests += 1);
        let s = t.summaries("m", Duration::from_secs(30));
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].version.as_str(), s[0].role, s[0].summary.requests),
            ("1", Role::Stable, 5)
        );
        t.forget_idle("m", &["1"]);
        assert_eq!(
            t.summaries("m", Duration::from_secs(30)).len(),
            2,
            "recent traffic is kept"
        );
    }
}
