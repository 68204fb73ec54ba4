//! Failover along a chain of versions: a production request runs on the
//! stable version and, when that fails in a way another version may not,
//! on the next version of the route's `failover` list, and so on. Each
//! version of a longer chain has a [`Breaker`](super::breaker::Breaker): an
//! open circuit is skipped (the request fails over all the same, and is
//! counted so), except on the last version, which is always tried.
//!
//! Retrying is safe: inference is a pure function of its input, so a request
//! that failed on one version has no effect to undo, and a bad input (the
//! client's mistake) is never retried.
//!
//! How one attempt runs is passed in ([`run_chain`]'s `run`), so the chain's
//! rules are tested with fake replicas; the request path passes
//! [`VersionPool::run`], a call the compiler sees through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pool::{VersionPool, within};
use super::routes::ModelRoute;
use super::{FrontDoor, GatewayError, Served, compare, outcome};
use crate::metrics::{Metrics, Outcome, Role};
use crate::protocol::{RequestedOutput, Tensor};
use crate::runtime::RuntimeError;

/// The versions a request may run on, in order: only its own for anything
/// but production, else the stable version and then the route's failover
/// list (versions not loaded left out).
pub(super) fn chain<'a>(
    route: &'a ModelRoute,
    pool: &'a Arc<VersionPool>,
    role: Role,
) -> Vec<&'a Arc<VersionPool>> {
    if role != Role::Stable {
        return vec![pool];
    }
    std::iter::once(pool)
        .chain(
            route
                .policy
                .failover
                .iter()
                .filter_map(|v| route.pools.get(v)),
        )
        .collect()
}

/// Where a request came from: the role its version was chosen in, the
/// front door that received it, and the outputs it asked for (empty: all).
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin<'a> {
    pub role: Role,
    pub door: FrontDoor,
    pub asked: &'a [RequestedOutput],
    /// The request's id (the client's or a generated one), sent to remotes.
    pub id: &'a str,
}

/// Runs the request on the first version of `chain` that takes it, each
/// attempt within `timeout`, recording each attempt on its version (the
/// first in the origin's role, the rest as fallbacks, all under its front
/// door) and each step along the chain as a failover. The error is the last version's, or the first that is not
/// worth retrying.
pub(super) async fn run_chain(
    metrics: &Metrics,
    route: &ModelRoute,
    chain: &[&Arc<VersionPool>],
    origin: Origin<'_>,
    inputs: Vec<Tensor>,
    timeout: Duration,
    run: impl AsyncFn(
        &VersionPool,
        Vec<Tensor>,
        &str,
    ) -> Result<(Vec<Tensor>, Option<Duration>), RuntimeError>,
) -> Result<Served, GatewayError> {
    let breakers = chain.len() > 1;
    let mut inputs = Some(inputs);
    let mut last_error: Option<RuntimeError> = None;
    let mut previous: Option<&str> = None;
    for (i, pool) in chain.iter().enumerate() {
        let is_last = i + 1 == chain.len();
        if breakers && !is_last && !pool.breaker.allow(Instant::now()) {
            previous = Some(&pool.version);
            continue;
        }
        let attempt_inputs = if is_last {
            inputs.take().expect("inputs are kept for the last attempt")
        } else {
            inputs
                .clone()
                .expect("inputs are kept until the last attempt")
        };
        if let Some(from) = previous {
            metrics.failover(&pool.model, from, &pool.version);
        }
        let attempt_role = if i == 0 { origin.role } else { Role::Fallback };
        let started = Instant::now();
        let mut unanswered = Unanswered {
            pool,
            role: attempt_role,
            door: origin.door,
            started,
            waiting: true,
        };
        let result = within(timeout, run(pool, attempt_inputs, origin.id)).await;
        unanswered.answered();
        // The engine's own time when it could tell (see `Engine::infer_timed`).
        let (result, took) = match result {
            Ok((outputs, took)) => (
                answers_what_was_asked(pool, &outputs, origin.asked.iter().map(|o| &*o.name))
                    .map(|()| outputs),
                took,
            ),
            Err(e) => (Err(e), None),
        };
        let seconds = took.unwrap_or_else(|| started.elapsed()).as_secs_f64();
        if breakers {
            pool.breaker
                .record(result.is_ok(), Instant::now(), &route.policy.breaker);
        }
        let class = result.as_ref().ok().and_then(|o| compare::answer_class(o));
        pool.record(attempt_role, origin.door, outcome(&result), seconds, class);
        match result {
            Ok(outputs) => {
                return Ok(Served {
                    version: pool.version.clone(),
                    role: attempt_role,
                    outputs,
                    class,
                });
            }
            Err(e) if !e.is_retryable() => return Err(e.into()),
            Err(e) => {
                previous = Some(&pool.version);
                last_error = Some(e);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| {
            RuntimeError::Unavailable("no version of the chain could take the request".into())
        })
        .into())
}

/// A version's answer must hold every output the request named, and at
/// least one: an answer without them is the version's error (counted as
/// such, and failed over like any), not a 200 with less than was asked.
/// Only a remote version can fall short (ONNX Runtime runs every output).
pub(super) fn answers_what_was_asked<'a>(
    pool: &VersionPool,
    outputs: &[Tensor],
    mut asked: impl Iterator<Item = &'a str>,
) -> Result<(), RuntimeError> {
    let missing = asked.find(|name| !outputs.iter().any(|t| t.name == *name));
    let what = match (outputs.is_empty(), missing) {
        (true, _) => "no outputs".to_string(),
        (false, Some(name)) => format!(
            "no output {name:?}, which the request asked for (it answered {})",
            outputs
                .iter()
                .map(|t| format!("{:?}", t.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (false, None) => return Ok(()),
    };
    Err(RuntimeError::Upstream(format!(
        "version \"{}\" of model \"{}\" answered with {what}",
        pool.version, pool.model
    )))
}

/// An attempt whose caller stopped waiting (a gRPC client's deadline, a
/// reset stream: the request is dropped mid-run) is recorded as an error on
/// its version when dropped, so a version too slow for its clients shows in
/// its error rate and latency instead of vanishing from them.
struct Unanswered<'a> {
    pool: &'a VersionPool,
    role: Role,
    door: FrontDoor,
    started: Instant,
    waiting: bool,
}

impl Unanswered<'_> {
    /// The attempt ended; its caller records how.
    fn answered(&mut self) {
        self.waiting = false;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.waiting {
            let seconds = self.started.elapsed().as_secs_f64();
            self.pool
                .record(self.role, self.door, Outcome::Error, seconds, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::gateway::policy::{BreakerSettings, RoutePolicy};
    use crate::metrics::{Exposition, Telemetry};
    use crate::protocol::{Signature, TensorData};
    use crate::records::ServingSettings;
    use crate::units::HumanDuration;

    const MODEL: &str = "cancer";

    /// A route over versions `a`, `b`, `c` (no replicas: the fake runs the
    /// requests), `a` stable and `b`, `c` its failover chain.
    struct Fixture {
        metrics: Metrics,
        telemetry: Arc<Telemetry>,
        route: ModelRoute,
    }

    impl Fixture {
        fn new() -> Fixture {
            let metrics = Metrics::new();
            let telemetry = Arc::new(Telemetry::default());
            let pools = ["a", "b", "c"]
                .into_iter()
                .map(|v| {
                    let pool = VersionPool::new(
                        MODEL.into(),
                        v.into(),
                        Signature {
                            inputs: Vec::new(),
                            outputs: Vec::new(),
                        },
                        Vec::new(),
                        ServingSettings::default(),
                        metrics.for_version(MODEL, v),
                        telemetry.clone(),
                    );
                    (v.to_string(), Arc::new(pool))
                })
                .collect::<HashMap<_, _>>();
            let mut policy = RoutePolicy::stable_only("a");
            policy.failover = vec!["b".into(), "c".into()];
            policy.breaker = BreakerSettings {
                error_rate: 1.0,
                consecutive_failures: 1,
                window: HumanDuration(Duration::from_secs(10)),
                min_requests: 100,
                probe_every: HumanDuration(Duration::from_secs(60)),
            };
            Fixture {
                metrics,
                telemetry,
                route: ModelRoute::new(policy, pools),
            }
        }

        fn pool(&self, version: &str) -> &Arc<VersionPool> {
            &self.route.pools[version]
        }

        fn chain(&self) -> Vec<&Arc<VersionPool>> {
            chain(&self.route, self.pool("a"), Role::Stable)
        }

        /// (requests, errors, rejected) recorded on a version in a role.
        fn counted(&self, version: &str, role: Role) -> (u64, u64, u64) {
            let s = self
                .telemetry
                .series(MODEL, version, role)
                .summary(crate::units::now_secs(), Duration::from_secs(60));
            (s.requests, s.errors, s.rejected)
        }

        /// How often requests failed over from one version to another.
        fn failovers(&self, from: &str, to: &str) -> u64 {
            let needle = format!(
                "ferry_failovers_total{{model=\"{MODEL}\",from_version=\"{from}\",to_version=\"{to}\"}} "
            );
            self.metrics
                .encode(Exposition::Text)
                .lines()
                .find_map(|l| l.strip_prefix(&needle))
                .map_or(0, |n| n.parse().expect("a counter"))
        }
    }

    /// A replica per version that answers with the version's name as its
    /// one output, unless `failing` says how it fails; every call is logged.
    struct Fake {
        failing: HashMap<&'static str, Failure>,
        calls: Mutex<Vec<String>>,
    }

    #[derive(Clone, Copy)]
    enum Failure {
        Fail,
        BadInput,
        Hang,
        /// Answers, with no outputs (a remote can).
        Empty,
    }

    impl Fake {
        fn new(failing: &[(&'static str, Failure)]) -> Fake {
            Fake {
                failing: failing.iter().copied().collect(),
                calls: Mutex::new(Vec::new()),
            }
        }

        async fn run(
            &self,
            pool: &VersionPool,
            inputs: Vec<Tensor>,
        ) -> Result<Vec<Tensor>, RuntimeError> {
            self.calls.lock().unwrap().push(pool.version.clone());
            assert_eq!(inputs.len(), 1, "every attempt gets the request's inputs");
            match self.failing.get(pool.version.as_str()) {
                None => Ok(vec![Tensor {
                    name: pool.version.clone(),
                    shape: vec![1],
                    data: TensorData::Int64(vec![7]),
                }]),
                Some(Failure::Fail) => Err(RuntimeError::Unavailable("replica down".into())),
                Some(Failure::BadInput) => Err(RuntimeError::BadInput("no such input".into())),
                Some(Failure::Empty) => Ok(vec![]),
                Some(Failure::Hang) => {
                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                    unreachable!("the chain's timeout ends a hanging attempt")
                }
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn input() -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            shape: vec![1],
            data: TensorData::Fp32(vec![1.0]),
        }]
    }

    async fn serve(f: &Fixture, fake: &Fake) -> Result<Served, GatewayError> {
        serve_asking(f, fake, &[]).await
    }

    /// [`serve`] for a request that names the outputs it wants.
    async fn serve_asking(
        f: &Fixture,
        fake: &Fake,
        asked: &[RequestedOutput],
    ) -> Result<Served, GatewayError> {
        run_chain(
            &f.metrics,
            &f.route,
            &f.chain(),
            Origin {
                role: Role::Stable,
                door: FrontDoor::Rest,
                asked,
                id: "r-1",
            },
            input(),
            Duration::from_secs(1),
            async |pool: &VersionPool, inputs, _id: &str| Ok((fake.run(pool, inputs).await?, None)),
        )
        .await
    }

    #[test]
    fn only_production_requests_have_a_chain() {
        let f = Fixture::new();
        let versions = |role| -> Vec<String> {
            chain(&f.route, f.pool("a"), role)
                .iter()
                .map(|p| p.version.clone())
                .collect()
        };
        assert_eq!(versions(Role::Stable), ["a", "b", "c"]);
        assert_eq!(versions(Role::Candidate), ["a"]);
        assert_eq!(versions(Role::Direct), ["a"]);
    }

    #[tokio::test]
    async fn a_healthy_stable_version_answers_alone() {
        let f = Fixture::new();
        let fake = Fake::new(&[]);
        let served = serve(&f, &fake).await.expect("answered");
        assert_eq!((served.version.as_str(), served.role), ("a", Role::Stable));
        assert_eq!(served.class, Some(7), "the class of the first row");
        assert_eq!(fake.calls(), ["a"]);
        assert_eq!(f.counted("a", Role::Stable), (1, 0, 0));
        assert_eq!(f.failovers("a", "b"), 0);
    }

    #[tokio::test]
    async fn a_failing_primary_fails_over_to_the_next() {
        let f = Fixture::new();
        let fake = Fake::new(&[("a", Failure::Fail)]);
        let served = serve(&f, &fake).await.expect("the fallback answered");
        assert_eq!(
            (served.version.as_str(), served.role),
            ("b", Role::Fallback)
        );
        assert_eq!(fake.calls(), ["a", "b"]);
        assert_eq!(f.counted("a", Role::Stable), (1, 1, 0));
        assert_eq!(f.counted("b", Role::Fallback), (1, 0, 0));
        assert_eq!(f.failovers("a", "b"), 1);
        assert!(f.pool("a").breaker.is_open(), "one failure opens it here");
        assert!(!f.pool("b").breaker.is_open());
    }

    /// An answer without what was asked (no outputs at all, or not the one
    /// the request named) is the version's error, counted and failed over,
    /// never a 200 with less than was asked.
    #[tokio::test]
    async fn an_answer_short_of_what_was_asked_is_the_versions_error() {
        let f = Fixture::new();
        let fake = Fake::new(&[("a", Failure::Empty)]);
        let served = serve(&f, &fake).await.expect("the fallback answered");
        assert_eq!(served.version, "b");
        assert_eq!(f.counted("a", Role::Stable), (1, 1, 0));
        // Each version answers an output named after itself: asking for
        // "c" fails on a and b, saying what they answered instead.
        let f = Fixture::new();
        let fake = Fake::new(&[]);
        let asked = [RequestedOutput {
            name: "c".into(),
            binary: None,
        }];
        let served = serve_asking(&f, &fake, &asked).await.expect("c answered");
        assert_eq!(
            (served.version.as_str(), served.outputs[0].name.as_str()),
            ("c", "c")
        );
        assert_eq!(f.counted("b", Role::Fallback), (1, 1, 0));
        let e = answers_what_was_asked(f.pool("a"), &[], std::iter::empty()).unwrap_err();
        assert_eq!(
            e.to_string(),
            RuntimeError::Upstream(format!(
                "version \"a\" of model \"{}\" answered with no outputs",
                f.pool("a").model
            ))
            .to_string()
        );
        let e =
            answers_what_was_asked(f.pool("a"), &served.outputs, ["p"].into_iter()).unwrap_err();
        assert!(
            e.to_string().contains(
                "answered with no output \"p\", which the request asked for (it answered \"c\")"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_open_breaker_is_skipped_and_counted_as_a_failover() {
        let f = Fixture::new();
        f.pool("a")
            .breaker
            .record(false, Instant::now(), &f.route.policy.breaker);
        assert!(f.pool("a").breaker.is_open());
        let fake = Fake::new(&[]);
        let served = serve(&f, &fake).await.expect("the fallback answered");
        assert_eq!(
            (served.version.as_str(), served.role),
            ("b", Role::Fallback)
        );
        assert_eq!(fake.calls(), ["b"], "the open version is not called");
        assert_eq!(f.counted("a", Role::Stable), (0, 0, 0));
        assert_eq!(f.failovers("a", "b"), 1);
    }

    #[tokio::test]
    async fn the_last_version_is_tried_even_with_its_breaker_open() {
        let f = Fixture::new();
        for v in ["a", "b", "c"] {
            f.pool(v)
                .breaker
                .record(false, Instant::now(), &f.route.policy.breaker);
        }
        let fake = Fake::new(&[]);
        let served = serve(&f, &fake).await.expect("the last version answered");
        assert_eq!(served.version, "c");
        assert_eq!(fake.calls(), ["c"]);
        assert_eq!(f.failovers("b", "c"), 1, "counted from the last skipped");
    }

    #[tokio::test]
    async fn when_all_fail_the_last_error_is_the_answer() {
        let f = Fixture::new();
        let fake = Fake::new(&[
            ("a", Failure::Fail),
            ("b", Failure::Fail),
            ("c", Failure::Fail),
        ]);
        let err = serve(&f, &fake).await.err().expect("every version failed");
        assert!(
            matches!(err, GatewayError::Runtime(RuntimeError::Unavailable(ref m)) if m == "replica down"),
            "{err:?}"
        );
        assert_eq!(fake.calls(), ["a", "b", "c"]);
        assert_eq!(f.counted("c", Role::Fallback), (1, 1, 0));
        assert_eq!((f.failovers("a", "b"), f.failovers("b", "c")), (1, 1));
    }

    #[tokio::test]
    async fn a_bad_input_is_never_retried() {
        let f = Fixture::new();
        let fake = Fake::new(&[("a", Failure::BadInput)]);
        let err = serve(&f, &fake).await.err().expect("refused");
        assert!(
            matches!(err, GatewayError::Runtime(RuntimeError::BadInput(_))),
            "{err:?}"
        );
        assert_eq!(fake.calls(), ["a"]);
        assert_eq!(f.counted("a", Role::Stable), (0, 0, 1), "rejected");
        assert_eq!(f.failovers("a", "b"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_times_out_fails_over() {
        let f = Fixture::new();
        let fake = Fake::new(&[("a", Failure::Hang)]);
        let served = serve(&f, &fake).await.expect("the fallback answered");
        assert_eq!(served.version, "b");
        assert_eq!(
            f.counted("a", Role::Stable),
            (1, 1, 0),
            "a timeout is an error"
        );
        assert_eq!(f.failovers("a", "b"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_its_caller_stops_waiting_for_is_an_error() {
        let f = Fixture::new();
        let fake = Fake::new(&[("a", Failure::Hang)]);
        // The client's deadline (shorter than the route's timeout) drops
        // the request mid-run.
        let dropped = tokio::time::timeout(Duration::from_millis(200), serve(&f, &fake)).await;
        assert!(dropped.is_err(), "the caller stopped waiting");
        assert_eq!(
            f.counted("a", Role::Stable),
            (1, 1, 0),
            "a request dropped mid-run is an error"
        );
        assert_eq!(fake.calls(), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_on_the_last_version_is_the_answer() {
        let f = Fixture::new();
        let fake = Fake::new(&[
            ("a", Failure::Fail),
            ("b", Failure::Fail),
            ("c", Failure::Hang),
        ]);
        let err = serve(&f, &fake).await.err().expect("timed out");
        assert!(
            matches!(err, GatewayError::Runtime(RuntimeError::Timeout(t)) if t == Duration::from_secs(1)),
            "{err:?}"
        );
    }
}
