//! Rollout specs (DESIGN.md §5): what `ferry apply -f rollout.yaml`, `ferry
//! deploy` and `POST /api/v1/models/{model}/rollouts` describe. Parsed from
//! YAML or JSON into typed data where "exactly one of" is an enum (the
//! strategy), then [`RolloutSpec::validate`]d; an invalid spec is refused
//! before anything changes, with a message naming the field.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gateway::policy::{BreakerSettings, CompareMode, MatchRule};
use crate::units::HumanDuration;

/// How big a spec may be. Each list is checked, and every window, status and
/// event a rollout produces grows with them (a spec with 100 000 checks made
/// 15 MB events every 5 s); the bounds are far above what a real rollout needs.
pub mod limits {
    /// Nesting of `[ ]` and `{ }` in a spec's text (the parser's cost grows
    /// with the square of it).
    pub const NESTING: usize = 32;
    /// `strategy.canary.steps` (and `strategy.shadow.canary.steps`).
    pub const STEPS: usize = 64;
    /// `analysis.checks`, metric and external together.
    pub const CHECKS: usize = 32;
    /// `analysis.checks` with `kind: webhook | prometheus`: each is an
    /// outbound call in every analysis window.
    pub const EXTERNAL_CHECKS: usize = 4;
    /// `notify` webhooks.
    pub const NOTIFY: usize = 8;
    /// `notify[i].events`.
    pub const NOTIFY_EVENTS: usize = 16;
    /// `match` rules of a canary cohort.
    pub const MATCH_RULES: usize = 16;
    /// `match[i].values`.
    pub const MATCH_VALUES: usize = 64;
    /// A URL, Prometheus address or query, or event kind, in bytes.
    pub const TEXT_BYTES: usize = 4096;
    /// A QA dataset, sent with the spec (`qa.content`) or read by the server.
    pub const QA_DATASET_BYTES: u64 = 64 << 20;
}

/// Refuses a list longer than `max`, naming the field and the limit.
fn at_most<T>(field: &str, list: &[T], max: usize) -> Result<(), String> {
    if list.len() > max {
        return Err(format!(
            "{field} has {} entries; at most {max} are allowed",
            list.len()
        ));
    }
    Ok(())
}

/// Refuses a text longer than [`limits::TEXT_BYTES`].
fn short_text(field: &str, text: &str) -> Result<(), String> {
    if text.len() > limits::TEXT_BYTES {
        return Err(format!(
            "{field} is {} bytes long; at most {} are allowed",
            text.len(),
            limits::TEXT_BYTES
        ));
    }
    Ok(())
}

fn ten_seconds() -> HumanDuration {
    dur(10)
}

fn dur(s: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(s))
}

/// A rollout: bring `version` of `model` in with a strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub model: String,
    pub version: String,
    /// Let a candidate change the inputs or outputs clients see.
    #[serde(default)]
    pub allow_signature_change: bool,
    pub strategy: Strategy,
    /// Checks over live metrics, used by every strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,
    /// Webhooks told about rollout events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifySpec>,
}

/// Exactly one strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Basic(BasicSpec),
    Multi(MultiSpec),
    Rolling(RollingSpec),
    Canary(CanarySpec),
    #[serde(alias = "blue-green")]
    BlueGreen(BlueGreenSpec),
    Shadow(ShadowSpec),
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Basic(_) => "basic",
            Strategy::Multi(_) => "multi",
            Strategy::Rolling(_) => "rolling",
            Strategy::Canary(_) => "canary",
            Strategy::BlueGreen(_) => "blue_green",
            Strategy::Shadow(_) => "shadow",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BasicSpec {}

/// Multi-service; a field left out takes [`MultiSpec::default`]'s value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MultiSpec {
    /// Previous versions kept loaded as the failover chain.
    pub keep: u32,
    /// Per-request timeout before failing over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub timeout: Option<HumanDuration>,
    /// The circuit breaker of each version in the chain: the same settings
    /// as a route policy's `breaker`; omitted fields take its defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerSettings>,
}

impl Default for MultiSpec {
    fn default() -> Self {
        MultiSpec {
            keep: 1,
            timeout: None,
            breaker: None,
        }
    }
}

fn one() -> u32 {
    1
}

/// Rolling; every field but `replicas` has a default ([`RollingSpec::new`]).
/// With `scope: instances` the batches are instances and `replicas` is left
/// out (0 here: not given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollingSpec {
    /// The pool size (`scope: replicas`); required there, refused with
    /// `scope: instances`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replicas: u32,
    /// What a batch replaces: replicas of this instance's pool (the
    /// default), or whole instances sharing the store.
    #[serde(default, skip_serializing_if = "RollingScope::is_replicas")]
    pub scope: RollingScope,
    #[serde(default = "one")]
    pub batch_size: u32,
    #[serde(default)]
    pub max_unavailable: u32,
    #[serde(default = "one")]
    pub max_surge: u32,
    #[serde(default = "ten_seconds")]
    #[schema(value_type = String)]
    pub batch_pause: HumanDuration,
    #[serde(default)]
    pub rollback: RollingRollback,
}

impl RollingSpec {
    /// A pool of `replicas` with every other field at its default: what a
    /// spec naming only `replicas` parses to.
    pub fn new(replicas: u32) -> RollingSpec {
        RollingSpec {
            replicas,
            scope: RollingScope::Replicas,
            batch_size: one(),
            max_unavailable: 0,
            max_surge: one(),
            batch_pause: ten_seconds(),
            rollback: RollingRollback::default(),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a rolling update replaces batch by batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RollingScope {
    /// Replicas of each instance's pool for the model: traffic split by
    /// weight in proportion.
    #[default]
    Replicas,
    /// Whole instances on a shared store: an instance serves the candidate
    /// only or the stable version only; the load balancer's spread is the
    /// split.
    Instances,
}

impl RollingScope {
    pub fn is_replicas(&self) -> bool {
        *self == RollingScope::Replicas
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RollingRollback {
    #[default]
    Batch,
    All,
}

/// Canary: ordered steps, optional stickiness and cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    pub header: String,
}

/// One canary step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Percent of eligible traffic to the candidate.
    Weight(f64),
    /// A timed pause (`30s`), or `{}` to wait for `ferry promote`.
    Pause(Pause),
    /// Wait for a passing analysis verdict.
    Analysis(AnalysisGate),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Pause {
    #[schema(value_type = String)]
    For(HumanDuration),
    UntilPromoted(Empty),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// An analysis gate; `passes` consecutive passing windows open it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalysisGate {
    #[serde(default = "one")]
    pub passes: u32,
}

impl Step {
    /// The step as the status lists it: `weight 10`, `pause 30s`, `analysis`.
    pub fn describe(&self) -> String {
        match self {
            Step::Weight(w) => format!("weight {w}"),
            Step::Pause(Pause::For(d)) => format!("pause {d}"),
            Step::Pause(Pause::UntilPromoted(_)) => "pause until promoted".into(),
            Step::Analysis(g) if g.passes > 1 => format!("analysis ({} passes)", g.passes),
            Step::Analysis(_) => "analysis".into(),
        }
    }
}

/// Blue-green; a field left out takes [`BlueGreenSpec::default`]'s value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BlueGreenSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qa: Option<QaSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub auto_promote_after: Option<HumanDuration>,
    #[schema(value_type = String)]
    pub scale_down_delay: HumanDuration,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub post_promotion: Option<HumanDuration>,
}

impl Default for BlueGreenSpec {
    fn default() -> Self {
        BlueGreenSpec {
            qa: None,
            auto_promote_after: None,
            scale_down_delay: dur(300),
            post_promotion: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QaSpec {
    /// JSON Lines of V2 request bodies with a `label` (a path, relative to
    /// the spec file; the CLI sends its content).
    pub dataset: String,
    /// The dataset's content, as the CLI sends it; without it the server
    /// reads `dataset` inside its `--qa-dir` (refused without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The output judged (default `probabilities`, a classifier's scores).
    #[serde(default = "probabilities")]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mean_abs_error: Option<f64>,
}

impl QaSpec {
    /// The output a QA dataset is judged on when the spec names none: a
    /// classifier's scores.
    pub const DEFAULT_OUTPUT: &str = "probabilities";
}

fn probabilities() -> String {
    QaSpec::DEFAULT_OUTPUT.into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    pub mirror_percent: f64,
    pub compare: CompareSpec,
    pub min_comparisons: u64,
    pub min_agreement: f64,
    pub then: ShadowThen,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareSpec {
    pub output: String,
    #[serde(default)]
    pub mode: CompareMode,
    #[serde(default)]
    pub tolerance: f64,
}

impl CompareSpec {
    /// Compares `output` with the default mode and tolerance.
    pub fn of(output: String) -> CompareSpec {
        CompareSpec {
            output,
            mode: CompareMode::default(),
            tolerance: 0.0,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum ShadowThen {
    Promote,
    Manual,
    Canary,
}

/// How analysis runs (DESIGN.md §3); a field left out takes
/// [`AnalysisSpec::default`]'s value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisSpec {
    #[schema(value_type = String)]
    pub interval: HumanDuration,
    pub min_requests: u64,
    pub failure_limit: u32,
    pub max_inconclusive: u32,
    pub confidence: f64,
    pub checks: Vec<CheckSpec>,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        AnalysisSpec {
            interval: ten_seconds(),
            min_requests: 50,
            failure_limit: 2,
            max_inconclusive: 6,
            confidence: 0.95,
            checks: Vec::new(),
        }
    }
}

/// One check: a metric with one condition, or an external check
/// (`kind: webhook | prometheus`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ExternalKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vs_stable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_vs_stable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delta_vs_stable: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_delta_vs_stable: Option<f64>,
    /// Latency checks against stable: a difference smaller than this many
    /// milliseconds never fails, however significant (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_difference_ms: Option<f64>,
    /// Prometheus server (`kind: prometheus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// PromQL query returning one number (`kind: prometheus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Webhook to POST the window's context to (`kind: webhook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ErrorRate,
    LatencyP50Ms,
    LatencyP95Ms,
    LatencyP99Ms,
    Requests,
    Agreement,
    Accuracy,
    PredictionShift,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::LatencyP50Ms => "latency_p50_ms",
            Metric::LatencyP95Ms => "latency_p95_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
            Metric::Requests => "requests",
            Metric::Agreement => "agreement",
            Metric::Accuracy => "accuracy",
            Metric::PredictionShift => "prediction_shift",
        }
    }

    /// Whether larger values are worse (for the direction of a condition).
    pub fn is_latency(self) -> bool {
        matches!(
            self,
            Metric::LatencyP50Ms | Metric::LatencyP95Ms | Metric::LatencyP99Ms
        )
    }

    pub fn higher_is_worse(self) -> bool {
        matches!(
            self,
            Metric::ErrorRate
                | Metric::LatencyP50Ms
                | Metric::LatencyP95Ms
                | Metric::LatencyP99Ms
                | Metric::PredictionShift
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExternalKind {
    Webhook,
    Prometheus,
}

/// A validated condition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    Max(f64),
    Min(f64),
    MaxVsStable(f64),
    MinVsStable(f64),
    MaxDeltaVsStable(f64),
    MinDeltaVsStable(f64),
}

impl Condition {
    /// The number the condition compares with.
    pub fn bound(&self) -> f64 {
        match *self {
            Condition::Max(x)
            | Condition::Min(x)
            | Condition::MaxVsStable(x)
            | Condition::MinVsStable(x)
            | Condition::MaxDeltaVsStable(x)
            | Condition::MinDeltaVsStable(x) => x,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Condition::Max(v) => format!("max {v}"),
            Condition::Min(v) => format!("min {v}"),
            Condition::MaxVsStable(v) => format!("max {v} x stable"),
            Condition::MinVsStable(v) => format!("min {v} x stable"),
            Condition::MaxDeltaVsStable(v) => format!("max stable {}", signed(*v)),
            Condition::MinDeltaVsStable(v) => format!("min stable {}", signed(*v)),
        }
    }
}

impl Condition {
    /// Whether the condition compares with the stable version's value.
    pub fn against_stable(&self) -> bool {
        !matches!(self, Condition::Max(_) | Condition::Min(_))
    }
}

/// A difference added to stable's value, as arithmetic reads it: `+ 5`,
/// `- 0.01` (so `min stable - 0.01` is not read as "stable is -0.01").
pub fn signed(d: f64) -> String {
    if d < 0.0 {
        format!("- {}", -d)
    } else {
        format!("+ {d}")
    }
}

/// What `min_difference_ms` is when a latency check against stable leaves
/// it out: differences under a millisecond are noise to a person.
pub const DEFAULT_MIN_DIFFERENCE_MS: f64 = 1.0;

/// A validated check.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Metric {
        metric: Metric,
        condition: Condition,
        /// For latency against stable: the smallest difference (ms) that
        /// can fail the check. `None` for every other check.
        min_difference_ms: Option<f64>,
    },
    Prometheus {
        address: String,
        query: String,
        condition: Condition,
    },
    Webhook {
        url: String,
    },
}

impl CheckSpec {
    fn conditions(&self) -> Vec<Condition> {
        [
            self.max.map(Condition::Max),
            self.min.map(Condition::Min),
            self.max_vs_stable.map(Condition::MaxVsStable),
            self.min_vs_stable.map(Condition::MinVsStable),
            self.max_delta_vs_stable.map(Condition::MaxDeltaVsStable),
            self.min_delta_vs_stable.map(Condition::MinDeltaVsStable),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The validated check; the error names the field (`field` is its path).
    pub fn check(&self, field: &str) -> Result<Check, String> {
        for (name, text) in [
            ("url", &self.url),
            ("address", &self.address),
            ("query", &self.query),
        ] {
            if let Some(t) = text {
                short_text(&format!("{field}.{name}"), t)?;
            }
        }
        match (self.metric, self.kind) {
            (Some(_), Some(_)) => Err(format!("{field}: give either metric or kind, not both")),
            (None, None) => Err(format!(
                "{field}: give a metric (error_rate, latency_p99_ms, accuracy, …) or kind: webhook | prometheus"
            )),
            (Some(metric), None) => self.metric_check(field, metric),
            (None, Some(ExternalKind::Webhook)) => self.webhook_check(field),
            (None, Some(ExternalKind::Prometheus)) => self.prometheus_check(field),
        }
    }

    fn metric_check(&self, field: &str, metric: Metric) -> Result<Check, String> {
        let conditions = self.conditions();
        let [condition] = conditions.as_slice() else {
            return Err(format!(
                "{field}: give exactly one of max, min, max_vs_stable, min_vs_stable, max_delta_vs_stable, min_delta_vs_stable (found {})",
                conditions.len()
            ));
        };
        if self.address.is_some() || self.query.is_some() || self.url.is_some() {
            return Err(format!(
                "{field}: address, query and url belong to external checks (kind)"
            ));
        }
        let x = condition.bound();
        if !x.is_finite() {
            return Err(format!("{field}: the bound must be a number"));
        }
        if matches!(
            condition,
            Condition::MaxVsStable(_) | Condition::MinVsStable(_)
        ) && x <= 0.0
        {
            return Err(format!("{field}: a ratio to stable must be greater than 0"));
        }
        if metric == Metric::Agreement && condition.against_stable() {
            return Err(format!(
                "{field}: agreement is how often a shadow's answers agree with production's, and stable has none to compare with: give min (e.g. min: 0.95)"
            ));
        }
        if metric == Metric::PredictionShift && condition.against_stable() {
            return Err(format!(
                "{field}: prediction_shift already compares the candidate with stable (the PSI of their predicted classes), and stable has none of its own: give max (e.g. max: 0.2)"
            ));
        }
        if matches!(
            metric,
            Metric::ErrorRate | Metric::Accuracy | Metric::Agreement
        ) {
            let range = match condition {
                Condition::Max(_) | Condition::Min(_) => 0.0..=1.0,
                Condition::MaxDeltaVsStable(_) | Condition::MinDeltaVsStable(_) => -1.0..=1.0,
                Condition::MaxVsStable(_) | Condition::MinVsStable(_) => 0.0..=f64::MAX,
            };
            if !range.contains(&x) {
                return Err(format!(
                    "{field}: {} is a share between 0 and 1, so a bound of {x} is outside what it can be (a difference to stable's lies between -1 and 1): give a share, e.g. 0.01 for 1 %",
                    metric.as_str()
                ));
            }
        } else if matches!(condition, Condition::Max(_) | Condition::Min(_)) && x < 0.0 {
            return Err(format!(
                "{field}: {} is never negative, so a bound of {x} is outside what it can be: give 0 or more",
                metric.as_str()
            ));
        }
        let floored = metric.is_latency() && condition.against_stable();
        Ok(Check::Metric {
            metric,
            condition: *condition,
            min_difference_ms: self.min_difference_ms(field, floored)?,
        })
    }

    /// A latency check against stable's `min_difference_ms` (its default
    /// when left out); refused on any other check.
    fn min_difference_ms(&self, field: &str, floored: bool) -> Result<Option<f64>, String> {
        match self.min_difference_ms {
            Some(_) if !floored => Err(format!(
                "{field}.min_difference_ms applies only to latency checks against stable (latency_p50_ms, latency_p95_ms or latency_p99_ms with max_vs_stable, min_vs_stable, max_delta_vs_stable or min_delta_vs_stable)"
            )),
            Some(ms) if !(ms.is_finite() && ms >= 0.0) => Err(format!(
                "{field}.min_difference_ms must be 0 or more milliseconds, not {ms}"
            )),
            Some(ms) => Ok(Some(ms)),
            None => Ok(floored.then_some(DEFAULT_MIN_DIFFERENCE_MS)),
        }
    }

    fn webhook_check(&self, field: &str) -> Result<Check, String> {
        let url = address(field, "webhook", "url", &self.url)?;
        if !self.conditions().is_empty() || self.address.is_some() || self.query.is_some() {
            return Err(format!(
                "{field}: a webhook check takes only url (its answer says pass, fail or inconclusive)"
            ));
        }
        Ok(Check::Webhook { url })
    }

    fn prometheus_check(&self, field: &str) -> Result<Check, String> {
        let address = address(field, "prometheus", "address", &self.address)?;
        let query = self
            .query
            .clone()
            .ok_or_else(|| format!("{field}: a prometheus check needs query"))?;
        let condition = match self.conditions().as_slice() {
            [c @ (Condition::Max(_) | Condition::Min(_))] => *c,
            _ => {
                return Err(format!(
                    "{field}: a prometheus check needs exactly one of max or min"
                ));
            }
        };
        Ok(Check::Prometheus {
            address,
            query,
            condition,
        })
    }
}

/// The `http://` address an external check of `kind` calls, from its field
/// `name`.
fn address(field: &str, kind: &str, name: &str, value: &Option<String>) -> Result<String, String> {
    let address = value
        .clone()
        .ok_or_else(|| format!("{field}: a {kind} check needs {name}"))?;
    if !address.starts_with("http://") {
        return Err(format!("{field}.{name} must start with http://"));
    }
    Ok(address)
}

/// A webhook told about rollout events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    pub url: String,
    /// Event kinds sent (default: the rollout's end states).
    #[serde(default)]
    pub events: Vec<String>,
}

fn check_weight(field: &str, w: f64) -> Result<(), String> {
    if w.is_finite() && (0.0..=100.0).contains(&w) {
        Ok(())
    } else {
        Err(format!("{field} must be between 0 and 100, not {w}"))
    }
}

fn check_canary(field: &str, c: &CanarySpec) -> Result<(), String> {
    if c.steps.is_empty() {
        return Err(format!("{field}.steps must list at least one step"));
    }
    at_most(&format!("{field}.steps"), &c.steps, limits::STEPS)?;
    at_most(&format!("{field}.match"), &c.matches, limits::MATCH_RULES)?;
    for (i, m) in c.matches.iter().enumerate() {
        at_most(
            &format!("{field}.match[{i}].values"),
            &m.values,
            limits::MATCH_VALUES,
        )?;
    }
    for (i, s) in c.steps.iter().enumerate() {
        if let Step::Weight(w) = s {
            check_weight(&format!("{field}.steps[{i}].weight"), *w)?;
        }
        if let Step::Analysis(g) = s
            && g.passes == 0
        {
            return Err(format!(
                "{field}.steps[{i}].analysis.passes must be at least 1"
            ));
        }
    }
    let mut probe = crate::gateway::RoutePolicy::stable_only("stable");
    probe.candidate = Some(crate::gateway::policy::CandidateSplit {
        version: "candidate".into(),
        weight: 0.0,
        sticky_header: c.sticky.as_ref().map(|s| s.header.clone()),
        matches: c.matches.clone(),
    });
    probe.validate().map_err(|e| {
        format!(
            "{field}: {}",
            e.replace("candidate.sticky_header", "sticky.header")
                .replace("candidate.", "")
        )
    })
}

impl RolloutSpec {
    /// Parses YAML (JSON is YAML too) and [`validate`](Self::validate)s it:
    /// what the control API does with a spec it receives. The error says
    /// where and what.
    pub fn from_yaml(text: &str) -> Result<RolloutSpec, String> {
        let spec = RolloutSpec::parse(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses YAML (JSON is YAML too) into a spec without validating it: for
    /// a client that sends the spec on to the server, which validates it.
    pub fn parse(text: &str) -> Result<RolloutSpec, String> {
        // The YAML parser's time grows with the square of the nesting depth
        // of flow collections (`[[[…]]]`): a 64 KB spec could hold a core
        // for a minute. No spec nests deeper than a dozen levels.
        let depth = flow_depth(text);
        if depth > limits::NESTING {
            return Err(format!(
                "the spec nests {depth} levels of [ ] or {{ }}; at most {} are allowed",
                limits::NESTING
            ));
        }
        // Single-key maps (`canary: {...}`, `- weight: 10`) select enum variants,
        // as in JSON, rather than YAML tags.
        yaml_serde::with::singleton_map_recursive::deserialize(yaml_serde::Deserializer::from_str(
            text,
        ))
        .map_err(|e| format!("the spec is not valid: {e}"))
    }

    /// The validated analysis checks.
    pub fn checks(&self) -> Vec<Check> {
        self.analysis
            .iter()
            .flat_map(|a| a.checks.iter().enumerate())
            .filter_map(|(i, c)| c.check(&format!("analysis.checks[{i}]")).ok())
            .collect()
    }

    /// Checks every field; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        crate::records::check_name("model", &self.model).map_err(|e| e.to_string())?;
        crate::records::check_name("version", &self.version).map_err(|e| e.to_string())?;
        match &self.strategy {
            Strategy::Basic(_) => {}
            Strategy::Multi(m) => check_multi(m)?,
            Strategy::Rolling(r) => check_rolling(r)?,
            Strategy::Canary(c) => check_canary("strategy.canary", c)?,
            Strategy::BlueGreen(b) => {
                if let Some(qa) = &b.qa {
                    check_qa("strategy.blue_green.qa", qa)?;
                }
            }
            Strategy::Shadow(s) => check_shadow(s)?,
        }
        if let Some(a) = &self.analysis {
            check_analysis(a)?;
            check_analysis_is_read(&self.strategy)?;
            check_agreement_is_a_shadows(&self.strategy, a)?;
        }
        check_notify(&self.notify)
    }
}

/// Basic and multi end as soon as the candidate serves, before a window
/// could close: an analysis given with them would be stored and never
/// run, so it is refused rather than silently ignored.
fn check_analysis_is_read(strategy: &Strategy) -> Result<(), String> {
    let (name, why) = match strategy {
        Strategy::Basic(_) => (
            "basic",
            "a basic rollout switches all traffic at once and ends, so no window is ever judged",
        ),
        Strategy::Multi(_) => (
            "multi",
            "a multi rollout ends as soon as the candidate is primary and warm; its failover chain guards it, not analysis",
        ),
        _ => return Ok(()),
    };
    Err(format!(
        "analysis is not used by strategy {name}: {why}. Remove analysis, or use a strategy that judges the candidate on live traffic (canary, rolling, blue_green or shadow)"
    ))
}

/// Agreement is a shadow's comparison with production: any other strategy
/// has none, and a check on it could only ever be inconclusive.
fn check_agreement_is_a_shadows(strategy: &Strategy, a: &AnalysisSpec) -> Result<(), String> {
    if matches!(strategy, Strategy::Shadow(_)) {
        return Ok(());
    }
    match a
        .checks
        .iter()
        .position(|c| c.metric == Some(Metric::Agreement))
    {
        Some(i) => Err(format!(
            "analysis.checks[{i}]: agreement is how often a shadow's answers agree with production's, and a {} rollout has no shadow, so the check could never decide: use it with strategy shadow, or remove it",
            strategy.name()
        )),
        None => Ok(()),
    }
}

fn check_multi(m: &MultiSpec) -> Result<(), String> {
    if m.keep == 0 {
        return Err(
            "strategy.multi.keep must be at least 1 (the versions kept for failover)".into(),
        );
    }
    match &m.breaker {
        Some(b) => b.validate("strategy.multi.breaker"),
        None => Ok(()),
    }
}

fn check_rolling(r: &RollingSpec) -> Result<(), String> {
    if r.scope == RollingScope::Instances {
        return check_rolling_instances(r);
    }
    if r.replicas == 0 {
        return Err(
            "strategy.rolling.replicas must be between 1 and 64, not 0: it is required with scope: replicas (the pool size for the rollout); scope: instances replaces whole instances instead".into(),
        );
    }
    if r.replicas > 64 {
        return Err(format!(
            "strategy.rolling.replicas must be between 1 and 64, not {}",
            r.replicas
        ));
    }
    if r.batch_size == 0 || r.batch_size > r.replicas {
        return Err(format!(
            "strategy.rolling.batch_size must be between 1 and replicas ({}), not {}",
            r.replicas, r.batch_size
        ));
    }
    if r.max_unavailable >= r.replicas {
        return Err("strategy.rolling.max_unavailable must be less than replicas".into());
    }
    Ok(())
}

/// `scope: instances`: the batches are the instances live when the rollout
/// starts, so `replicas` (and the pool's `max_unavailable` and
/// `max_surge`) mean nothing.
fn check_rolling_instances(r: &RollingSpec) -> Result<(), String> {
    if r.replicas != 0 {
        return Err(format!(
            "strategy.rolling.replicas ({}) has no meaning with scope: instances: the batches are the live instances, each keeping its own replicas; remove replicas, or use scope: replicas",
            r.replicas
        ));
    }
    if r.max_unavailable != 0 {
        return Err(
            "strategy.rolling.max_unavailable has no meaning with scope: instances (an instance's replicas are not replaced); remove it".into(),
        );
    }
    if r.max_surge != one() {
        return Err(format!(
            "strategy.rolling.max_surge ({}) has no meaning with scope: instances (no replicas are started beside an instance's own); remove it",
            r.max_surge
        ));
    }
    if r.batch_size == 0 || r.batch_size > 64 {
        return Err(format!(
            "strategy.rolling.batch_size must be between 1 and 64 instances, not {}",
            r.batch_size
        ));
    }
    Ok(())
}

fn check_qa(field: &str, qa: &QaSpec) -> Result<(), String> {
    short_text(&format!("{field}.dataset"), &qa.dataset)?;
    if let Some(content) = &qa.content
        && content.len() as u64 > limits::QA_DATASET_BYTES
    {
        return Err(format!(
            "{field}.content (the dataset sent with the spec) is {} bytes; at most {} ({} MiB) are allowed",
            content.len(),
            limits::QA_DATASET_BYTES,
            limits::QA_DATASET_BYTES >> 20
        ));
    }
    match (qa.min_accuracy, qa.max_mean_abs_error) {
        (Some(a), None) if (0.0..=1.0).contains(&a) => Ok(()),
        (Some(a), None) => Err(format!(
            "{field}.min_accuracy must be between 0 and 1, not {a}"
        )),
        (None, Some(e)) if e >= 0.0 => Ok(()),
        (None, Some(e)) => Err(format!(
            "{field}.max_mean_abs_error must be 0 or more, not {e}"
        )),
        _ => Err(format!(
            "{field}: give exactly one of min_accuracy or max_mean_abs_error"
        )),
    }
}

fn check_shadow(s: &ShadowSpec) -> Result<(), String> {
    check_weight("strategy.shadow.mirror_percent", s.mirror_percent)?;
    if s.mirror_percent == 0.0 {
        return Err(
            "strategy.shadow.mirror_percent is 0: the shadow would get no copy and could never be compared; give a share above 0 (up to 100)"
                .into(),
        );
    }
    let tolerance = s.compare.tolerance;
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return Err(format!(
            "strategy.shadow.compare.tolerance must be 0 or more (the largest difference allowed between two values with mode: abs), not {tolerance}"
        ));
    }
    if !(0.0..=1.0).contains(&s.min_agreement) {
        return Err(format!(
            "strategy.shadow.min_agreement must be between 0 and 1, not {}",
            s.min_agreement
        ));
    }
    if s.min_comparisons == 0 {
        return Err("strategy.shadow.min_comparisons must be at least 1".into());
    }
    match (s.then, &s.canary) {
        (ShadowThen::Canary, None) => Err(
            "strategy.shadow.then is canary: give the canary block (strategy.shadow.canary.steps)"
                .into(),
        ),
        (ShadowThen::Canary, Some(c)) => check_canary("strategy.shadow.canary", c),
        (_, Some(_)) => Err("strategy.shadow.canary is only used with then: canary".into()),
        _ => Ok(()),
    }
}

fn check_analysis(a: &AnalysisSpec) -> Result<(), String> {
    if a.interval.0 < Duration::from_secs(crate::metrics::window::BUCKET_SECS) {
        return Err(format!(
            "analysis.interval must be at least {}s (the metrics' bucket width), not {}",
            crate::metrics::window::BUCKET_SECS,
            a.interval
        ));
    }
    if a.min_requests == 0 {
        return Err("analysis.min_requests must be at least 1".into());
    }
    if a.failure_limit == 0 {
        return Err("analysis.failure_limit must be at least 1".into());
    }
    if !(a.confidence > 0.5 && a.confidence < 1.0) {
        return Err(format!(
            "analysis.confidence must be between 0.5 and 1 (e.g. 0.95), not {}",
            a.confidence
        ));
    }
    at_most("analysis.checks", &a.checks, limits::CHECKS)?;
    for (i, c) in a.checks.iter().enumerate() {
        c.check(&format!("analysis.checks[{i}]"))?;
    }
    let external = a.checks.iter().filter(|c| c.kind.is_some()).count();
    if external > limits::EXTERNAL_CHECKS {
        return Err(format!(
            "analysis.checks has {external} external checks (kind: webhook or prometheus), each called every window; at most {} are allowed",
            limits::EXTERNAL_CHECKS
        ));
    }
    Ok(())
}

fn check_notify(notify: &[NotifySpec]) -> Result<(), String> {
    at_most("notify", notify, limits::NOTIFY)?;
    for (i, n) in notify.iter().enumerate() {
        short_text(&format!("notify[{i}].url"), &n.url)?;
        if !n.url.starts_with("http://") {
            return Err(format!("notify[{i}].url must start with http://"));
        }
        at_most(
            &format!("notify[{i}].events"),
            &n.events,
            limits::NOTIFY_EVENTS,
        )?;
    }
    Ok(())
}

/// The deepest nesting of YAML flow collections (`[`, `{`) in `text`,
/// outside quoted strings and comments. Conservative: a bracket inside a
/// plain scalar counts too, which can only refuse a spec nested absurdly.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut quote, mut escaped, mut comment) = (None::<char>, false, false);
    let mut previous = '\n';
    for c in text.chars() {
        if comment {
            comment = c != '\n';
        } else if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if q == '"' && c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                '"' | '\'' => quote = Some(c),
                '#' if previous.is_whitespace() => comment = true,
                '[' | '{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = c;
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
model: cancer
version: "2"
allow_signature_change: false
strategy:
  canary:
    steps:
      - weight: 10
      - pause: 30s
      - analysis: {}
      - weight: 50
      - pause: {}
      - weight: 100
    sticky: { header: x-user-id }
    match:
      - { header: x-region, values: [eu-west] }
analysis:
  interval: 10s
  min_requests: 50
  failure_limit: 2
  max_inconclusive: 6
  confidence: 0.95
  checks:
    - { metric: error_rate, max: 0.01 }
    - { metric: latency_p99_ms, max_vs_stable: 1.5 }
    - { metric: accuracy, min_delta_vs_stable: -0.01 }
    - { metric: prediction_shift, max: 0.2 }
    - { kind: prometheus, address: "http://127.0.0.1:9090", query: "sum(rate(checkout_failures[1m]))", max: 5 }
notify:
  - { url: "http://127.0.0.1:9000/hooks/ferry", events: [aborted, succeeded, failed, rolled_back] }
"#;

    /// A shadow spec that could never decide is refused when applied, with
    /// what to give instead.
    #[test]
    fn a_shadow_that_could_never_decide_is_refused() {
        let spec = |shadow: &str, checks: &str| {
            format!(
                "model: cancer\nversion: \"2\"\nstrategy: {{ shadow: {{ compare: {{ output: p, mode: abs, tolerance: 0.01 }}, min_comparisons: 5, min_agreement: 0.9, then: promote, {shadow} }} }}\nanalysis: {{ checks: [ {checks} ] }}\n"
            )
        };
        let ok = "{ metric: agreement, min: 0.9 }";
        assert!(RolloutSpec::from_yaml(&spec("mirror_percent: 100", ok)).is_ok());
        let cases = [
            (
                spec("mirror_percent: 0", ok),
                "mirror_percent is 0: the shadow would get no copy",
            ),
            (
                spec("mirror_percent: 100", ok).replace("tolerance: 0.01", "tolerance: -1"),
                "compare.tolerance must be 0 or more",
            ),
            (
                spec(
                    "mirror_percent: 100",
                    "{ metric: agreement, min_vs_stable: 0.9 }",
                ),
                "analysis.checks[0]: agreement is how often a shadow's answers agree with production's, and stable has none to compare with: give min",
            ),
            (
                spec(
                    "mirror_percent: 100",
                    "{ metric: agreement, max_delta_vs_stable: 0.1 }",
                ),
                "stable has none to compare with",
            ),
        ];
        for (text, refusal) in cases {
            let err = RolloutSpec::from_yaml(&text).unwrap_err();
            assert!(err.contains(refusal), "{text}: {err}");
        }
    }

    #[test]
    fn the_design_example_parses() {
        let spec = RolloutSpec::from_yaml(DESIGN_EXAMPLE).unwrap();
        let Strategy::Canary(c) = &spec.strategy else {
            panic!("canary")
        };
        assert_eq!(
            c.steps.iter().map(Step::describe).collect::<Vec<_>>(),
            [
                "weight 10",
                "pause 30s",
                "analysis",
                "weight 50",
                "pause until promoted",
                "weight 100"
            ]
        );
        assert_eq!(spec.checks().len(), 5);
        assert_eq!(
            spec.checks()[1],
            Check::Metric {
                metric: Metric::LatencyP99Ms,
                condition: Condition::MaxVsStable(1.5),
                min_difference_ms: Some(DEFAULT_MIN_DIFFERENCE_MS),
            }
        );
        // JSON is accepted too, and round-trips.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(RolloutSpec::from_yaml(&json).unwrap(), spec);
    }

    #[test]
    fn every_strategy_kind_parses() {
        for s in [
            "strategy: { basic: {} }",
            "strategy: { multi: { keep: 2, timeout: 500ms, breaker: { error_rate: 0.5, window: 10s, probe_every: 1s } } }",
            "strategy: { rolling: { replicas: 4, batch_size: 1, max_unavailable: 0, max_surge: 1, batch_pause: 10s, rollback: batch } }",
            "strategy: { blue_green: { qa: { dataset: holdout.jsonl, output: probabilities, min_accuracy: 0.95 }, auto_promote_after: 60s, scale_down_delay: 5m, post_promotion: 60s } }",
            "strategy: { blue-green: { scale_down_delay: 5m } }",
            "strategy: { shadow: { mirror_percent: 100, compare: { output: probabilities, mode: class }, min_comparisons: 500, min_agreement: 0.98, then: canary, canary: { steps: [ { weight: 10 }, { pause: 1m }, { weight: 100 } ] } } }",
        ] {
            let text = format!("model: cancer\nversion: \"2\"\n{s}\n");
            RolloutSpec::from_yaml(&text).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn a_multi_breaker_is_checked_like_a_route_policys() {
        for (s, want) in [
            (
                "breaker: { window: 0s }",
                "strategy.multi.breaker.window must be at least 1s",
            ),
            (
                "breaker: { error_rate: 0 }",
                "strategy.multi.breaker.error_rate must be in (0, 1], not 0",
            ),
            (
                "breaker: { min_requests: 10, bogus: 1 }",
                "unknown field `bogus`",
            ),
        ] {
            let text = format!("model: cancer\nversion: \"2\"\nstrategy: {{ multi: {{ {s} }} }}\n");
            let err = RolloutSpec::from_yaml(&text).unwrap_err();
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases = [
            (
                "strategy: { canary: { steps: [ { weight: 120 } ] } }",
                "strategy.canary.steps[0].weight must be between 0 and 100",
            ),
            (
                "strategy: { canary: { steps: [] } }",
                "strategy.canary.steps must list at least one step",
            ),
            (
                "strategy: { canry: { steps: [] } }",
                "unknown variant `canry`",
            ),
            (
                "strategy: { basic: {}, multi: {} }",
                "the spec is not valid",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 10 } ], sticky: { header: X-User } } }",
                "sticky.header",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate } ] }",
                "analysis.checks[0]: give exactly one of",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rat, max: 1 } ] }",
                "unknown variant `error_rat`",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: prediction_shift, max_vs_stable: 2 } ] }",
                "analysis.checks[0]: prediction_shift already compares the candidate with stable",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate, max: 2 } ] }",
                "analysis.checks[0]: error_rate is a share between 0 and 1, so a bound of 2 is outside what it can be",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: accuracy, min_delta_vs_stable: 2 } ] }",
                "accuracy is a share between 0 and 1",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate, max: -0.1 } ] }",
                "a bound of -0.1 is outside what it can be",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: latency_p99_ms, max: -5 } ] }",
                "analysis.checks[0]: latency_p99_ms is never negative, so a bound of -5 is outside what it can be: give 0 or more",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate, max: 0.01 }, { metric: agreement, min: 0.95 } ] }",
                "analysis.checks[1]: agreement is how often a shadow's answers agree with production's, and a canary rollout has no shadow",
            ),
            (
                "strategy: { basic: {} }\nanalysis: { checks: [ { metric: error_rate, max: 0.01 } ] }",
                "analysis is not used by strategy basic: a basic rollout switches all traffic at once and ends, so no window is ever judged. Remove analysis, or use a strategy that judges the candidate on live traffic (canary, rolling, blue_green or shadow)",
            ),
            (
                "strategy: { multi: {} }\nanalysis: {}",
                "analysis is not used by strategy multi: a multi rollout ends as soon as the candidate is primary and warm",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { interval: 1s }",
                "analysis.interval must be at least 5s",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { kind: prometheus, address: \"http://x\", max: 1 } ] }",
                "needs query",
            ),
            (
                "strategy: { shadow: { mirror_percent: 100, compare: { output: p }, min_comparisons: 5, min_agreement: 0.9, then: canary } }",
                "give the canary block",
            ),
            (
                "strategy: { blue_green: { qa: { dataset: d, output: p } } }",
                "exactly one of min_accuracy or max_mean_abs_error",
            ),
            (
                "strategy: { rolling: { replicas: 2, batch_size: 3 } }",
                "batch_size must be between 1 and replicas (2)",
            ),
            (
                "strategy: { basic: {} }\nnotify: [ { url: \"ftp://x\" } ]",
                "notify[0].url",
            ),
            ("strategy: { basic: {} }\nextra: 1", "unknown field `extra`"),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: error_rate, max_vs_stable: 2, min_difference_ms: 1 } ] }",
                "analysis.checks[0].min_difference_ms applies only to latency checks against stable",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: latency_p99_ms, max: 20, min_difference_ms: 1 } ] }",
                "analysis.checks[0].min_difference_ms applies only",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ { metric: latency_p99_ms, max_vs_stable: 1.5, min_difference_ms: -1 } ] }",
                "analysis.checks[0].min_difference_ms must be 0 or more milliseconds, not -1",
            ),
        ];
        for (body, needle) in cases {
            let text = format!("model: cancer\nversion: \"2\"\n{body}\n");
            let err = RolloutSpec::from_yaml(&text).unwrap_err();
            assert!(
                err.contains(needle),
                "{body}\n  expected {needle:?}\n  got {err:?}"
            );
        }
        let err = RolloutSpec::from_yaml("model: ../x\nversion: \"2\"\nstrategy: { basic: {} }")
            .unwrap_err();
        assert!(err.contains("is not allowed"));
    }

    /// `scope: instances` replaces whole instances: `replicas` is refused
    /// there (and required with the default scope); the scope is written
    /// only when it is not the default, so a per-replica spec reads back as
    /// it always did.
    #[test]
    fn rolling_across_instances_takes_no_replicas() {
        let parse = |body: &str| {
            RolloutSpec::from_yaml(&format!(
                "model: cancer\nversion: \"2\"\nstrategy: {body}\n"
            ))
        };
        let spec = parse("{ rolling: { scope: instances, batch_size: 1 } }").unwrap();
        let Strategy::Rolling(r) = &spec.strategy else {
            panic!("rolling");
        };
        assert_eq!(
            (r.scope, r.replicas, r.batch_size),
            (RollingScope::Instances, 0, 1)
        );
        let json = serde_json::to_string(&spec.strategy).unwrap();
        assert!(json.contains(r#""scope":"instances""#), "{json}");
        assert!(!json.contains("replicas"), "{json}");
        let per_replica = parse("{ rolling: { replicas: 4 } }").unwrap();
        let json = serde_json::to_string(&per_replica.strategy).unwrap();
        assert_eq!(
            json,
            r#"{"rolling":{"replicas":4,"batch_size":1,"max_unavailable":0,"max_surge":1,"batch_pause":"10s","rollback":"batch"}}"#
        );
        for (body, needle) in [
            (
                "{ rolling: { scope: instances, replicas: 3 } }",
                "strategy.rolling.replicas (3) has no meaning with scope: instances",
            ),
            (
                "{ rolling: { scope: instances, max_unavailable: 1 } }",
                "strategy.rolling.max_unavailable has no meaning with scope: instances",
            ),
            (
                "{ rolling: { scope: instances, max_surge: 99999 } }",
                "strategy.rolling.max_surge (99999) has no meaning with scope: instances",
            ),
            (
                "{ rolling: { scope: instances, batch_size: 0 } }",
                "strategy.rolling.batch_size must be between 1 and 64 instances, not 0",
            ),
            (
                "{ rolling: { batch_size: 1 } }",
                "strategy.rolling.replicas must be between 1 and 64, not 0: it is required with scope: replicas",
            ),
            ("{ rolling: { scope: nodes } }", "unknown variant `nodes`"),
        ] {
            let err = parse(body).unwrap_err();
            assert!(
                err.contains(needle),
                "{body}\n  expected {needle:?}\n  got {err:?}"
            );
        }
    }

    /// A spec over each size limit is refused naming the field and the
    /// limit; one at the limit is accepted.
    #[test]
    fn specs_over_a_size_limit_name_the_field_and_the_limit() {
        let spec = |body: String| format!("model: cancer\nversion: \"2\"\n{body}\n");
        let metric = "{ metric: error_rate, max: 0.01 }";
        let shadow = "shadow: { mirror_percent: 100, compare: { output: p }, min_comparisons: 5, min_agreement: 0.9, then: canary, canary";
        // (the spec with LIST where `limit` or `limit + 1` items go, the item, the limit, the refusal)
        let cases = [
            (
                "strategy: { canary: { steps: [ LIST ] } }".to_string(),
                "{ weight: 10 }",
                limits::STEPS,
                "strategy.canary.steps has 65 entries; at most 64 are allowed",
            ),
            (
                format!("strategy: {{ {shadow}: {{ steps: [ LIST ] }} }} }}"),
                "{ weight: 10 }",
                limits::STEPS,
                "strategy.shadow.canary.steps has 65 entries; at most 64",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 10 } ], match: [ LIST ] } }".into(),
                "{ header: x-region, values: [eu] }",
                limits::MATCH_RULES,
                "strategy.canary.match has 17 entries; at most 16",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 10 } ], match: [ { header: x-region, values: [ LIST ] } ] } }".into(),
                "eu",
                limits::MATCH_VALUES,
                "strategy.canary.match[0].values has 65 entries; at most 64",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ LIST ] }".into(),
                metric,
                limits::CHECKS,
                "analysis.checks has 33 entries; at most 32 are allowed",
            ),
            (
                "strategy: { canary: { steps: [ { weight: 100 } ] } }\nanalysis: { checks: [ LIST ] }".into(),
                "{ kind: webhook, url: \"http://127.0.0.1:9/h\" }",
                limits::EXTERNAL_CHECKS,
                "analysis.checks has 5 external checks (kind: webhook or prometheus), each called every window; at most 4",
            ),
            (
                "strategy: { basic: {} }\nnotify: [ LIST ]".into(),
                "{ url: \"http://127.0.0.1:9/n\" }",
                limits::NOTIFY,
                "notify has 9 entries; at most 8 are allowed",
            ),
            (
                "strategy: { basic: {} }\nnotify: [ { url: \"http://127.0.0.1:9/n\", events: [ LIST ] } ]".into(),
                "aborted",
                limits::NOTIFY_EVENTS,
                "notify[0].events has 17 entries; at most 16",
            ),
        ];
        let with = |template: &str, n: usize, item: &str| {
            spec(template.replace("LIST", &vec![item; n].join(", ")))
        };
        for (template, item, limit, needle) in &cases {
            RolloutSpec::from_yaml(&with(template, *limit, item))
                .unwrap_or_else(|e| panic!("{limit} entries must be accepted: {e}"));
            let err = RolloutSpec::from_yaml(&with(template, limit + 1, item)).unwrap_err();
            assert!(err.contains(needle), "expected {needle:?}\n  got {err:?}");
        }
        let err = RolloutSpec::from_yaml(&with(&cases[4].0, 100_000, metric)).unwrap_err();
        assert_eq!(
            err,
            "analysis.checks has 100000 entries; at most 32 are allowed"
        );
        let long = format!("http://x/{}", "a".repeat(limits::TEXT_BYTES));
        for (body, needle) in [
            (
                format!("strategy: {{ basic: {{}} }}\nnotify: [ {{ url: \"{long}\" }} ]"),
                "notify[0].url is 4105 bytes long; at most 4096",
            ),
            (
                format!(
                    "strategy: {{ canary: {{ steps: [ {{ weight: 100 }} ] }} }}\nanalysis: {{ checks: [ {{ kind: prometheus, address: \"http://p\", query: \"{long}\", max: 1 }} ] }}"
                ),
                "analysis.checks[0].query is 4105 bytes long",
            ),
        ] {
            let err = RolloutSpec::from_yaml(&spec(body)).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    /// What the control API makes of a spec that leaves fields out: the
    /// defaults docs/reference.md documents, written out here in full.
    #[test]
    fn fields_left_out_take_the_documented_defaults() {
        let spec = |strategy: &str, analysis: &str| {
            RolloutSpec::from_yaml(&format!(
                "{{\"model\": \"cancer\", \"version\": \"2\", \"strategy\": {strategy}{analysis}}}"
            ))
            .unwrap_or_else(|e| panic!("{strategy}: {e}"))
        };
        let secs = |s| HumanDuration(Duration::from_secs(s));
        let multi = spec(r#"{"multi": {}}"#, "");
        assert_eq!(
            multi.strategy,
            Strategy::Multi(MultiSpec {
                keep: 1,
                timeout: None,
                breaker: None
            })
        );
        assert_eq!(
            spec(r#"{"rolling": {"replicas": 4}}"#, "").strategy,
            Strategy::Rolling(RollingSpec {
                replicas: 4,
                scope: RollingScope::Replicas,
                batch_size: 1,
                max_unavailable: 0,
                max_surge: 1,
                batch_pause: secs(10),
                rollback: RollingRollback::Batch,
            })
        );
        assert_eq!(
            spec(
                r#"{"blue_green": {"qa": {"dataset": "d.jsonl", "min_accuracy": 0.9}}}"#,
                ""
            )
            .strategy,
            Strategy::BlueGreen(BlueGreenSpec {
                qa: Some(QaSpec {
                    dataset: "d.jsonl".into(),
                    content: None,
                    output: "probabilities".into(),
                    min_accuracy: Some(0.9),
                    max_mean_abs_error: None,
                }),
                auto_promote_after: None,
                scale_down_delay: secs(300),
                post_promotion: None,
            })
        );
        let Strategy::Shadow(shadow) = spec(
            r#"{"shadow": {"mirror_percent": 100, "compare": {"output": "label"}, "min_comparisons": 5, "min_agreement": 0.9, "then": "promote"}}"#,
            "",
        )
        .strategy
        else {
            panic!("shadow")
        };
        assert_eq!(
            (shadow.compare.mode, shadow.compare.tolerance),
            (CompareMode::Class, 0.0)
        );
        assert_eq!(
            spec(
                r#"{"canary": {"steps": [{"weight": 100}]}}"#,
                r#", "analysis": {}"#
            )
            .analysis,
            Some(AnalysisSpec {
                interval: secs(10),
                min_requests: 50,
                failure_limit: 2,
                max_inconclusive: 6,
                confidence: 0.95,
                checks: vec![],
            })
        );
        assert!(!multi.allow_signature_change);
        assert_eq!((multi.analysis, multi.notify), (None, vec![]));
    }

    #[test]
    fn a_qa_dataset_sent_with_the_spec_is_bounded() {
        let qa = |content: String| RolloutSpec {
            model: "cancer".into(),
            version: "2".into(),
            allow_signature_change: false,
            strategy: Strategy::BlueGreen(BlueGreenSpec {
                qa: Some(QaSpec {
                    dataset: "holdout.jsonl".into(),
                    content: Some(content),
                    output: "probabilities".into(),
                    min_accuracy: Some(0.9),
                    max_mean_abs_error: None,
                }),
                auto_promote_after: None,
                scale_down_delay: BlueGreenSpec::default().scale_down_delay,
                post_promotion: None,
            }),
            analysis: None,
            notify: vec![],
        };
        let max = limits::QA_DATASET_BYTES as usize;
        qa("x".repeat(max)).validate().unwrap();
        let err = qa("x".repeat(max + 1)).validate().unwrap_err();
        assert_eq!(
            err,
            "strategy.blue_green.qa.content (the dataset sent with the spec) is 67108865 bytes; at most 67108864 (64 MiB) are allowed"
        );
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Arbitrary text, and a valid spec with bytes replaced, never
            /// panic the parser: the answer is a spec or a reason.
            #[test]
            fn spec_parsing_never_panics(text in "\\PC{0,300}", at in 0usize..400, junk in "\\PC{0,6}") {
                let _ = RolloutSpec::from_yaml(&text);
                let valid = "model: cancer\nversion: \"2\"\nstrategy:\n  canary:\n    steps:\n      - weight: 20\n        pause: 30s\n      - weight: 100\nanalysis:\n  interval: 10s\n  checks:\n    - metric: error_rate\n      max: 0.01\n";
                let mut chars: Vec<char> = valid.chars().collect();
                let at = at.min(chars.len());
                chars.splice(at..at, junk.chars());
                let mutated: String = chars.into_iter().collect();
                if let Err(e) = RolloutSpec::from_yaml(&mutated) {
                    prop_assert!(!e.is_empty());
                }
            }
        }
    }

    #[test]
    fn deeply_nested_specs_are_refused_before_parsing() {
        let deep = format!(
            "{{\"model\":\"m\",\"version\":\"2\",\"strategy\":{{\"basic\":{{}}}},\"x\":{}{}}}",
            "[".repeat(32_000),
            "]".repeat(32_000)
        );
        let started = std::time::Instant::now();
        let err = RolloutSpec::from_yaml(&deep).unwrap_err();
        assert!(err.contains("at most 32 are allowed"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Brackets in quotes and comments do not count; real specs pass.
        assert_eq!(
            flow_depth("a: \"[[[[\" # {{{{\nb: '[[' \nc: [1, [2, {d: 3}]]"),
            3
        );
        assert!(RolloutSpec::from_yaml("model: m\nversion: \"2\"\nstrategy: { canary: { steps: [ { weight: 10 }, { weight: 100 } ] } }").is_ok());
    }
}
