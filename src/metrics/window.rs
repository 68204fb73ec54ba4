//! Telemetry in time windows: per model, version and role, counts and latency
//! sketches in 5-second buckets over the last 15 minutes, so analysis can ask
//! "candidate vs stable over the last 30 s". Buckets are aligned to wall-clock
//! time and mergeable: several instances' buckets of the same epoch sum to
//! what one instance would have counted ([`summarize`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::bucket::{Bucket, ClassCounts};
use super::packed::Packed;
use super::sketch::Sketch;

/// Width of one bucket.
pub const BUCKET_SECS: u64 = 5;
/// Buckets kept: 15 minutes.
pub const RING: usize = 180;

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

/// One series of buckets (a model, version and role): the bucket filling
/// now in its open form, the closed ones packed ([`Packed`]), at most
/// [`RING`] in all.
#[derive(Default)]
pub struct Series {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    /// Oldest first; every epoch before `open`'s.
    closed: VecDeque<Packed>,
    open: Option<Bucket>,
}

impl Ring {
    /// Every bucket with `after < epoch <= through`, oldest first, each
    /// handed to `f` as figures to add.
    fn each(&self, after: u64, through: u64, mut f: impl FnMut(Figures<'_>)) {
        for p in self
            .closed
            .iter()
            .filter(|p| p.epoch > after && p.epoch <= through)
        {
            f(Figures::Packed(p));
        }
        if let Some(b) = self
            .open
            .as_ref()
            .filter(|b| b.epoch > after && b.epoch <= through)
        {
            f(Figures::Open(b));
        }
    }
}

/// A bucket of a ring, in whichever form it is kept.
enum Figures<'a> {
    Open(&'a Bucket),
    Packed(&'a Packed),
}

impl Figures<'_> {
    fn merge_into(&self, total: &mut Bucket) {
        match self {
            Figures::Open(b) => total.merge(b),
            Figures::Packed(p) => p.merge_into(total),
        }
    }

    fn to_bucket(&self) -> Bucket {
        match self {
            Figures::Open(b) => (*b).clone(),
            Figures::Packed(p) => p.unpack(),
        }
    }
}

impl Series {
    /// Applies `f` to the bucket covering `now` (Unix seconds).
    pub fn record(&self, now: u64, f: impl FnOnce(&mut Bucket)) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        Self::record_in(&mut ring, now, f);
    }

    /// [`Series::record`] if the series is free now; `false` (and `f` not
    /// applied) if another thread holds it. For a caller that must never
    /// wait on a thread that may not get the CPU (a shadow's copies).
    pub fn try_record(&self, now: u64, f: impl FnOnce(&mut Bucket)) -> bool {
        let mut ring = match self.ring.try_lock() {
            Ok(ring) => ring,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        Self::record_in(&mut ring, now, f);
        true
    }

    fn record_in(ring: &mut Ring, now: u64, f: impl FnOnce(&mut Bucket)) {
        let epoch = now / BUCKET_SECS;
        if ring.open.as_ref().is_none_or(|b| b.epoch < epoch) {
            if let Some(closed) = ring.open.take() {
                // Room for twice the buckets held, never more than the ring.
                let held = ring.closed.len();
                if held == ring.closed.capacity() && held < RING {
                    ring.closed.reserve_exact(held.max(4).min(RING - held));
                }
                ring.closed.push_back(Packed::pack(&closed));
            }
            ring.open = Some(Bucket {
                epoch,
                ..Bucket::default()
            });
            while ring.closed.len() >= RING
                || ring
                    .closed
                    .front()
                    .is_some_and(|b| b.epoch + RING as u64 <= epoch)
            {
                ring.closed.pop_front();
            }
        }
        let open = ring.open.as_mut().expect("opened above");
        if open.epoch <= epoch {
            return f(open);
        }
        // The clock stepped back: the latest bucket at or before `now`,
        // unpacked, changed and packed again (or, older than them all, the
        // oldest kept).
        let at = ring
            .closed
            .iter()
            .rposition(|p| p.epoch <= epoch)
            .unwrap_or(0);
        match ring.closed.get_mut(at) {
            Some(packed) => {
                let mut b = packed.unpack();
                f(&mut b);
                *packed = Packed::pack(&b);
            }
            None => f(open),
        }
    }

    /// Bytes the series holds: its ring's slots and what each bucket holds
    /// beside (allocator overhead aside): the per-version size budget.
    pub fn heap_bytes(&self) -> usize {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.closed.capacity() * size_of::<Packed>()
            + ring.closed.iter().map(Packed::heap_bytes).sum::<usize>()
            + ring.open.as_ref().map_or(0, Bucket::heap_bytes)
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
        let mut total = Bucket::default();
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.each(first, last, |b| b.merge_into(&mut total));
        drop(ring);
        summary_of(total, covered)
    }

    /// Copies of the buckets with `after < epoch < before`: the closed
    /// buckets an instance has not flushed yet.
    pub fn between(&self, after: u64, before: u64) -> Vec<Bucket> {
        let mut out = Vec::new();
        if before == 0 {
            return out;
        }
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.each(after, before - 1, |b| out.push(b.to_bucket()));
        out
    }

    /// The newest bucket's start (Unix seconds), if any.
    pub fn last_seen(&self) -> Option<u64> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.open.as_ref().map(|b| b.epoch * BUCKET_SECS)
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

/// A summary of whole buckets whose last is the one filling at `now_ms`:
/// only `now_ms`'s part of that one has passed, so the seconds covered and
/// the rate are those (a 10 s window 2 s into its last bucket covers 7 s;
/// counted over 10, its rate read 30 % low). Nor does it reach back past
/// `since_ms`, when the figures began there (a single node's start).
pub fn to_now(mut summary: Summary, now_ms: u64, since_ms: Option<u64>) -> Summary {
    let bucket_ms = BUCKET_SECS * 1000;
    let unfilled_ms = bucket_ms - now_ms % bucket_ms;
    let covered_ms = (summary.seconds * 1000).saturating_sub(unfilled_ms);
    let covered_ms = since_ms
        .map_or(covered_ms, |since| {
            covered_ms.min(now_ms.saturating_sub(since))
        })
        .max(1000);
    summary.seconds = (covered_ms + 500) / 1000;
    summary.requests_per_second = summary.requests as f64 * 1000.0 / covered_ms as f64;
    summary
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
        classes: total.classes.iter().collect(),
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

    /// A window ending with the filling bucket covers only its part of it:
    /// 100 requests in a 10 s window 2 s into its last bucket are 7 s' worth.
    #[test]
    fn a_window_to_now_counts_the_seconds_it_covers() {
        let ten = Summary {
            seconds: 10,
            requests: 700,
            requests_per_second: 70.0,
            ..Summary::default()
        };
        let s = to_now(ten.clone(), 1_000_000_000 + 2_000, None);
        assert_eq!((s.seconds, s.requests_per_second), (7, 100.0));
        let s = to_now(ten.clone(), 1_000_000_000 + 4_999, None);
        assert_eq!(s.seconds, 10);
        // Nor past the start of the figures: 3.5 s ago, 700 are 200 a second.
        let s = to_now(
            ten.clone(),
            1_000_000_000 + 2_000,
            Some(1_000_000_000 - 1_500),
        );
        assert_eq!((s.seconds, s.requests_per_second), (4, 200.0));
        // Just after a bucket began, at least a second is counted.
        let s = to_now(Summary { seconds: 5, ..ten }, 1_000_000_000, None);
        assert_eq!(s.seconds, 1);
    }

    /// Fifteen minutes of a version answering `per_second` requests a
    /// second, latencies spread like real serving's (0.2 ms to about 2 ms,
    /// a long tail), two classes: the bytes its series holds.
    fn full_ring(per_second: u64) -> (Series, usize) {
        let s = Series::default();
        let t0 = 2_000_000_000;
        let mut x: u64 = 88172645463325252;
        for sec in 0..(RING as u64 * BUCKET_SECS) {
            s.record(t0 + sec, |b| {
                for _ in 0..per_second {
                    // xorshift: a fixed, spread sample.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let u = (x % 10_000) as f64 / 10_000.0;
                    b.requests += 1;
                    b.latency.add(0.000_2 / (1.0 - 0.9 * u));
                    b.classes.add((x % 2) as i64, 1);
                }
            });
        }
        let bytes = s.heap_bytes();
        (s, bytes)
    }

    /// A version's metric windows stay within tens of kilobytes however
    /// long it serves: the ring holds at most 15 minutes, and a closed
    /// bucket is packed (11, 30 and 50 KB at 2, 20 and 200 requests/s,
    /// against 45, 119 and 197 KB with every bucket kept open, shrunk to
    /// fit).
    #[test]
    fn a_full_ring_of_a_busy_version_holds_tens_of_kilobytes() {
        for (rate, budget) in [(2, 16_000), (20, 40_000), (200, 64_000)] {
            let (s, bytes) = full_ring(rate);
            eprintln!("{rate} req/s for 15 minutes: {bytes} bytes");
            assert!(bytes < budget, "{rate} req/s: {bytes} bytes");
            // Still exact: every request counted, quantiles answer.
            let all = s.summary(2_000_000_000 + 899, Duration::from_secs(900));
            assert_eq!(all.requests, rate * 900);
            assert!(all.latency_p99_ms.is_some_and(|p| p > 1.0));
        }
    }

    #[test]
    fn try_record_never_waits_for_a_holder() {
        let s = Series::default();
        let held = s.ring.lock().unwrap();
        assert!(!s.try_record(1_000, |b| b.dropped += 1), "held elsewhere");
        drop(held);
        assert!(s.try_record(1_000, |b| b.dropped += 1));
        assert_eq!(s.summary(1_000, Duration::from_secs(60)).dropped, 1);
    }

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
        let ring = s.ring.lock().unwrap();
        assert_eq!(ring.closed.len() + usize::from(ring.open.is_some()), RING);
    }
}
