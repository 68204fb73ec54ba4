//! A circuit breaker per version of a failover chain. Closed: requests flow
//! and outcomes are counted over a sliding window. Open (error rate over the
//! threshold with enough requests, or too many consecutive failures): the
//! version is skipped. After `probe_every`, one probe request is let through
//! (half-open): success closes the circuit, failure opens it again.
//!
//! The state machine is pure ([`Circuit`], time passed in); [`Breaker`] wraps
//! it in a mutex for the request path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::policy::BreakerSettings;

/// Where the circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The pure state machine.
#[derive(Debug, Clone)]
pub struct Circuit {
    pub state: CircuitState,
    consecutive_failures: u32,
    /// (second, ok, failed) buckets, oldest first.
    window: VecDeque<(Instant, u32, u32)>,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            state: CircuitState::Closed,
            consecutive_failures: 0,
            window: VecDeque::new(),
        }
    }
}

impl Circuit {
    /// Whether a request may be sent now. In half-open state only one probe
    /// is in flight at a time.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::Open { until } if now >= until => {
                self.state = CircuitState::HalfOpen { probing: true };
                true
            }
            CircuitState::Open { .. } => false,
            CircuitState::HalfOpen { probing: true } => false,
            CircuitState::HalfOpen { probing: false } => {
                self.state = CircuitState::HalfOpen { probing: true };
                true
            }
        }
    }

    /// Records how a request that was allowed ended.
    pub fn record(&mut self, ok: bool, now: Instant, s: &BreakerSettings) {
        match self.state {
            CircuitState::HalfOpen { .. } => {
                if ok {
                    *self = Circuit::default();
                } else {
                    self.open(now, s);
                }
            }
            CircuitState::Open { .. } => {}
            CircuitState::Closed => {
                self.count(ok, now, s.window.0);
                self.consecutive_failures = if ok { 0 } else { self.consecutive_failures + 1 };
                let (n, failed) = self
                    .window
                    .iter()
                    .fold((0u32, 0u32), |(n, f), (_, o, e)| (n + o + e, f + e));
                let rate_tripped =
                    n >= s.min_requests.max(1) && f64::from(failed) / f64::from(n) >= s.error_rate;
                let streak_tripped = s.consecutive_failures > 0
                    && self.consecutive_failures >= s.consecutive_failures;
                if rate_tripped || streak_tripped {
                    self.open(now, s);
                }
            }
        }
    }

    fn open(&mut self, now: Instant, s: &BreakerSettings) {
        self.state = CircuitState::Open {
            until: now + s.probe_every.0,
        };
        self.window.clear();
        self.consecutive_failures = 0;
    }

    fn count(&mut self, ok: bool, now: Instant, window: Duration) {
        while self
            .window
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= window)
        {
            self.window.pop_front();
        }
        match self.window.back_mut() {
            Some((t, o, e)) if now.duration_since(*t) < Duration::from_secs(1) => {
                if ok {
                    *o += 1
                } else {
                    *e += 1
                }
            }
            _ => self.window.push_back((now, ok as u32, (!ok) as u32)),
        }
    }
}

/// The breaker of one version, shared by the requests that use it.
#[derive(Default)]
pub struct Breaker(Mutex<Circuit>);

impl Breaker {
    pub fn allow(&self, now: Instant) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).allow(now)
    }

    pub fn record(&self, ok: bool, now: Instant, s: &BreakerSettings) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(ok, now, s)
    }

    pub fn is_open(&self) -> bool {
        !matches!(
            self.0.lock().unwrap_or_else(|p| p.into_inner()).state,
            CircuitState::Closed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::HumanDuration;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            error_rate: 0.5,
            consecutive_failures: 3,
            window: HumanDuration(Duration::from_secs(10)),
            min_requests: 4,
            probe_every: HumanDuration(Duration::from_secs(1)),
        }
    }

    #[test]
    fn consecutive_failures_open_then_a_probe_closes() {
        let s = settings();
        let t0 = Instant::now();
        let mut c = Circuit::default();
        for i in 0..3 {
            assert!(c.allow(t0));
            c.record(false, t0 + Duration::from_millis(i), &s);
        }
        assert!(matches!(c.state, CircuitState::Open { .. }));
        assert!(!c.allow(t0 + Duration::from_millis(500)), "open: skipped");
        let probe_time = t0 + Duration::from_millis(1_010);
        assert!(c.allow(probe_time), "one probe after probe_every");
        assert!(!c.allow(probe_time), "only one probe at a time");
        c.record(true, probe_time, &s);
        assert_eq!(c.state, CircuitState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let s = settings();
        let t0 = Instant::now();
        let mut c = Circuit::default();
        for _ in 0..3 {
            c.record(false, t0, &s);
        }
        let t1 = t0 + Duration::from_secs(2);
        assert!(c.allow(t1));
        c.record(false, t1, &s);
        assert!(!c.allow(t1 + Duration::from_millis(999)));
        assert!(c.allow(t1 + Duration::from_millis(1_000)));
    }

    #[test]
    fn error_rate_needs_enough_requests_and_old_outcomes_expire() {
        let s = BreakerSettings {
            consecutive_failures: 0,
            ..settings()
        };
        let t0 = Instant::now();
        let mut c = Circuit::default();
        // 1 failure of 2: 50 % but below min_requests.
        c.record(true, t0, &s);
        c.record(false, t0, &s);
        assert_eq!(c.state, CircuitState::Closed);
        // 11 s later the old outcomes no longer count.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            c.record(true, t1, &s);
        }
        c.record(false, t1, &s);
        assert_eq!(c.state, CircuitState::Closed, "1 of 4 in the window");
        c.record(false, t1, &s);
        c.record(false, t1, &s);
        assert!(
            matches!(c.state, CircuitState::Open { .. }),
            "3 of 6 = 50 %"
        );
    }
}
