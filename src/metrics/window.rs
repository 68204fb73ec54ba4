//! Telemetry in time windows: per model, version and role, counts and latency
//! sketches in 5-second buckets over the last 15 minutes, so analysis can ask
//! "candidate vs stable over the last 30 s". Buckets are aligned to wall-clock
//! time and mergeable: several instances' buckets of the same epoch sum to
//! what one instance would have counted ([`summarize`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;

/// Width of one bucket.
pub const BUCKET_SECS: u64 = 5;
/// Buckets kept: 15 minutes.
pub const RING: usize = 180;

/// What happened in one bucket of time. Serialised as an instance flushes
/// it to a shared store (issue 15: cluster-wide analysis).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bucket {
    /// Start of the bucket, in `BUCKET_SECS` units since the Unix epoch.
    pub epoch: u64,
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    pub latency: Sketch,
    /// Shadow comparisons (recorded on the shadow's series).
    pub agree: u64,
    pub disagree: u64,
    /// Shadow copies that could not be compared (the shadow failed, or its
    /// answer lacked the compared output).
    pub compare_errors: u64,
    /// Mirrored copies dropped because the shadow was saturated.
    pub dropped: u64,
    /// Predicted classes answered (for prediction-shift analysis).
    pub classes: BTreeMap<i64, u64>,
    /// Delayed labels received for answers of this bucket's time, and how
    /// many matched the predicted class.
    pub labelled: u64,
    pub correct: u64,
    /// Of `requests`, those that came through the gRPC front door (the rest
    /// came over REST): the status splits traffic by protocol.
    pub grpc: u64,
}

impl Bucket {
    /// Adds `o`'s counts to this bucket's.
    pub fn merge(&mut self, o: &Bucket) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.rejected += o.rejected;
        self.latency.merge(&o.latency);
        self.agree += o.agree;
        self.disagree += o.disagree;
        self.compare_errors += o.compare_errors;
        self.dropped += o.dropped;
        for (c, n) in &o.classes {
            *self.classes.entry(*c).or_default() += n;
        }
        self.labelled += o.labelled;
        self.correct += o.correct;
        self.grpc += o.grpc;
    }
}

/// A summary of a window, as the API and analysis see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    /// Seconds the summary covers.
    pub seconds: u64,
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    pub error_rate: Option<f64>,
    pub requests_per_second: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub agree: u64,
    pub disagree: u64,
    /// Share of shadow comparisons that agreed.
    pub agreement: Option<f64>,
    pub dropped: u64,
    #[schema(value_type = Object)]
    pub classes: BTreeMap<i64, u64>,
    /// Delayed labels joined to answers, and how many were right.
    pub labelled: u64,
    pub correct: u64,
    pub accuracy: Option<f64>,
    /// Of `requests`, those that came over gRPC (the rest over REST).
    #[serde(default)]
    pub grpc: u64,
    /// The merged latency sketch (for rank tests).
    #[serde(skip)]
    pub latency: Sketch,
}

/// One series of buckets (a model, version and role).
#[derive(Default)]
pub struct Series {
    ring: Mutex<VecDeque<Bucket>>,
}

impl Series {
    /// Applies `f` to the bucket covering `now` (Unix seconds).
    pub fn record(&self, now: u64, f: impl FnOnce(&mut Bucket)) {
        let epoch = now / BUCKET_SECS;
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.back().is_none_or(|b| b.epoch < epoch) {
            ring.push_back(Bucket {
                epoch,
                ..Bucket::default()
            });
            while ring.len() > RING || ring.front().is_some_and(|b| b.epoch + RING as u64 <= epoch)
            {
                ring.pop_front();
            }
        }
        let bucket = ring
            .iter_mut()
            .rev()
            .find(|b| b.epoch <= epoch)
            .expect("a bucket at or before now exists");
        f(bucket);
    }

    /// Merges the buckets of the last `window` before `now`, the one still
    /// filling included (fresh figures, for people).
    pub fn summary(&self, now: u64, window: Duration) -> Summary {
        self.merged(now / BUCKET_SECS, window)
    }

    /// Merges only complete buckets: the `window` before the bucket still
    /// filling. Analysis judges these, so a window is never a fraction of a
    /// bucket and consecutive windows do not overlap.
    pub fn complete_summary(&self, now: u64, window: Duration) -> Summary {
        self.merged((now / BUCKET_SECS).saturating_sub(1), window)
    }

    /// The `window` of buckets ending with (and including) epoch `last`.
    fn merged(&self, last: u64, window: Duration) -> Summary {
        let (first, covered) = span(last, window);
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let total = merge_all(ring.iter().filter(|b| b.epoch > first && b.epoch <= last));
        drop(ring);
        summary_of(total, covered)
    }

    /// Copies of the buckets with `after < epoch < before`: the closed
    /// buckets an instance has not flushed yet.
    pub fn between(&self, after: u64, before: u64) -> Vec<Bucket> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter()
            .filter(|b| b.epoch > after && b.epoch < before)
            .cloned()
            .collect()
    }

    /// Copies of the buckets of the `window` ending with epoch `last`.
    pub fn in_window(&self, last: u64, window: Duration) -> Vec<Bucket> {
        let (first, _) = span(last, window);
        self.between(first, last + 1)
    }

    /// The newest bucket's start (Unix seconds), if any.
    pub fn last_seen(&self) -> Option<u64> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.back().map(|b| b.epoch * BUCKET_SECS)
    }
}

/// The epoch of the bucket filling at `now_ms` (ms since the Unix epoch).
pub fn epoch_at(now_ms: u64) -> u64 {
    now_ms / 1000 / BUCKET_SECS
}

/// The epoch just before a `window` ending with epoch `last`, and the
/// seconds the window covers (whole buckets).
pub fn span(last: u64, window: Duration) -> (u64, u64) {
    let n = window.as_secs().div_ceil(BUCKET_SECS).max(1);
    (last.saturating_sub(n), n * BUCKET_SECS)
}

/// The summary of `buckets` merged, over `covered` seconds: the one place a
/// window's figures are computed, whether its buckets are this instance's
/// or every instance's.
pub fn summarize<'a>(buckets: impl IntoIterator<Item = &'a Bucket>, covered: u64) -> Summary {
    summary_of(merge_all(buckets), covered)
}

fn merge_all<'a>(buckets: impl IntoIterator<Item = &'a Bucket>) -> Bucket {
    let mut total = Bucket::default();
    for b in buckets {
        total.merge(b);
    }
    total
}

fn summary_of(total: Bucket, covered: u64) -> Summary {
    let ms = |q| total.latency.quantile(q).map(|s| (s * 1e5).round() / 100.0);
    let compared = total.agree + total.disagree;
    Summary {
        seconds: covered,
        requests: total.requests,
        errors: total.errors,
        rejected: total.rejected,
        error_rate: (total.requests > 0).then(|| total.errors as f64 / total.requests as f64),
        requests_per_second: total.requests as f64 / covered.max(1) as f64,
        latency_p50_ms: ms(0.5),
        latency_p95_ms: ms(0.95),
        latency_p99_ms: ms(0.99),
        agree: total.agree,
        disagree: total.disagree,
        agreement: (compared > 0).then(|| total.agree as f64 / compared as f64),
        dropped: total.dropped,
        classes: total.classes,
        labelled: total.labelled,
        correct: total.correct,
        accuracy: (total.labelled > 0).then(|| total.correct as f64 / total.labelled as f64),
        grpc: total.grpc,
        latency: total.latency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_recent_buckets_only() {
        let s = Series::default();
        let t0 = 1_000_000;
        for i in 0..60 {
            s.record(t0 + i, |b| {
                b.requests += 10;
                b.grpc += 3;
                b.errors += u64::from(i >= 50);
                b.latency.add(0.001);
            });
        }
        let now = t0 + 59;
        let last_30 = s.summary(now, Duration::from_secs(30));
        assert_eq!(last_30.requests, 300);
        assert_eq!(last_30.grpc, 90);
        assert_eq!(last_30.errors, 10);
        // Analysis sees only complete buckets: t0+25..54 at t0+59, and
        // t0+30..59 once that bucket has closed.
        assert_eq!(s.complete_summary(now, Duration::from_secs(30)).errors, 5);
        assert_eq!(
            s.complete_summary(now + 1, Duration::from_secs(30)).errors,
            10
        );
        assert!((last_30.latency_p50_ms.unwrap() - 1.0).abs() < 0.02);
        assert!((last_30.requests_per_second - 10.0).abs() < 1e-9);
        // Fifteen minutes later nothing is left.
        assert_eq!(s.summary(now + 901, Duration::from_secs(60)).requests, 0);
    }

    #[test]
    fn the_ring_stays_bounded() {
        let s = Series::default();
        for i in 0..10_000u64 {
            s.record(i * BUCKET_SECS, |b| b.requests += 1);
        }
        assert_eq!(s.ring.lock().unwrap().len(), RING);
    }
}
