//! Per-version counters and latency histograms, exported in the Prometheus
//! text format at `/metrics`. Series are keyed by `model` and `version` only,
//! so they survive a version changing role. Records; decides nothing.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// All of Ferry's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<VersionLabels, Histogram, fn() -> Histogram>,
}

/// Handles for one version, taken once when its pool starts, so the request
/// path never looks a series up.
#[derive(Clone)]
pub struct VersionMetrics {
    ok: Counter,
    error: Counter,
    rejected: Counter,
    duration: Histogram,
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
        Metrics {
            registry: Mutex::new(registry),
            requests,
            duration,
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
        VersionMetrics {
            ok: counter("ok"),
            error: counter("error"),
            rejected: counter("rejected"),
            duration: self
                .duration
                .get_or_create(&VersionLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                })
                .clone(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
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
        let text = m.encode();
        assert!(
            text.contains(r#"ferry_requests_total{model="cancer",version="1",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ferry_requests_total{model="cancer",version="1",outcome="rejected"} 1"#
            )
        );
        assert!(
            text.contains(r#"ferry_request_duration_seconds_count{model="cancer",version="1"} 1"#)
        );
    }
}
