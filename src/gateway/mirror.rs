//! Shadow mirroring: a copy of a production request goes to the shadow
//! version. The user's answer never waits for it: the copy is taken when the
//! primary is chosen and handed over once the primary has answered (or
//! failed), with that answer, to run on the serving thread's low-priority
//! companion ([`super::copies`]). A copy handed over when `max_in_flight`
//! copies are already waiting or running, or one that waited longer than
//! the shadow's timeout for the CPU, is dropped and counted, never queued
//! without bound; the count never waits on the companion. When both have
//! answered, the outputs are compared and the result counted on the
//! shadow's series.
//!
//! A shadow on remote endpoints gets the client's own bytes when they can be
//! sent as they are ([`Copy::Body`]): nothing is re-encoded, and only the
//! answers are decoded, for the comparison.

use std::time::Instant;

use super::routes::ModelRoute;
use super::{FrontDoor, compare};
use crate::metrics::{Comparison, Outcome, Role};
use crate::protocol::{self, Tensor};
use crate::runtime::RuntimeError;

/// What a production request can give its shadow copy.
pub enum Copy<'a> {
    /// The decoded inputs (an in-process shadow needs them).
    Tensors(&'a [Tensor]),
    /// The client's body as received, with its
    /// `Inference-Header-Content-Length` (binary extension), when it asks
    /// for no particular outputs; the decoded inputs too when there are.
    Body {
        body: &'a bytes::Bytes,
        header_len: Option<&'a str>,
        inputs: Option<&'a [Tensor]>,
    },
}

/// A copy taken, sent to the shadow (if a slot is free then) when the
/// primary's answer is handed over with [`Mirror::primary_answered`] or
/// [`Mirror::primary_sent`] — or, if the primary's path ends without
/// either (an error on the way), when this is dropped: a copy taken is
/// always sent.
pub struct Mirror {
    copy: Option<Job>,
}

/// What the copy's work needs besides the primary's answer.
struct Job {
    pool: std::sync::Arc<super::VersionPool>,
    /// The route's bound on copies waiting or running.
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    request: Request,
    compare: super::policy::Compare,
    door: FrontDoor,
    /// The request's id: sent with the copy (so the shadow's logs name the
    /// request as production's do) and kept with a disagreement.
    id: String,
}

/// The primary's answer as the copy gets it.
enum Primary {
    /// The compared output, decoded (`None`: the primary failed, or has no
    /// such output).
    Decoded(Option<Tensor>),
    /// A passed-through answer as the remote sent it, with its
    /// `Inference-Header-Content-Length`: decoded by the copy's task, after
    /// the user has the answer.
    Encoded(bytes::Bytes, Option<String>),
}

impl Primary {
    /// The compared output.
    fn output(self, name: &str) -> Option<Tensor> {
        match self {
            Primary::Decoded(output) => output,
            Primary::Encoded(body, header_len) => {
                protocol::decode_response_json(&body, header_len.as_deref())
                    .ok()?
                    .into_iter()
                    .find(|t| t.name == name)
            }
        }
    }
}

/// The request the copy sends.
enum Request {
    Tensors(Vec<Tensor>),
    Body(bytes::Bytes, Option<String>),
}

impl Mirror {
    /// Decides whether to mirror this request (by the policy's percentage)
    /// and, if so, takes the copy; it is sent once the primary has answered,
    /// when a slot is free then. `None` also when the copy cannot be made from
    /// `copy` (a body without decoded inputs for an in-process shadow: the
    /// caller decodes such requests). The copy is counted under the front
    /// door of the request it copies.
    pub fn start(route: &ModelRoute, copy: Copy<'_>, door: FrontDoor, id: &str) -> Option<Mirror> {
        let policy = route.policy.shadow.as_ref()?;
        if fastrand::f64() * 100.0 >= policy.percent {
            return None;
        }
        let pool = route.pools.get(&policy.version)?.clone();
        let slots = route.shadow_slots.as_ref()?.clone();
        let request = match copy {
            Copy::Body {
                body, header_len, ..
            } if pool.is_remote() => Request::Body(body.clone(), header_len.map(str::to_string)),
            Copy::Tensors(inputs)
            | Copy::Body {
                inputs: Some(inputs),
                ..
            } => Request::Tensors(inputs.to_vec()),
            Copy::Body { inputs: None, .. } => return None,
        };
        Some(Mirror {
            copy: Some(Job {
                pool,
                slots,
                request,
                compare: policy.compare.clone(),
                door,
                id: id.to_string(),
            }),
        })
    }

    /// Hands the primary's outputs (or `None` when it failed) to the copy,
    /// and sends it.
    pub fn primary_answered(mut self, outputs: Option<&[Tensor]>) {
        if let Some(job) = self.copy.take() {
            let compared =
                outputs.and_then(|o| o.iter().find(|t| t.name == job.compare.output).cloned());
            job.send(Primary::Decoded(compared));
        }
    }

    /// Hands a passed-through primary's answer, as the remote sent it, to
    /// the copy, and sends it; the answer is decoded by the copy's work,
    /// after the user has it.
    pub fn primary_sent(mut self, answer: bytes::Bytes, header_len: Option<String>) {
        if let Some(job) = self.copy.take() {
            job.send(Primary::Encoded(answer, header_len));
        }
    }
}

impl Drop for Mirror {
    /// The primary's path ended without an answer to hand over: the copy
    /// still goes, and only the shadow's own outcome is counted.
    fn drop(&mut self) {
        if let Some(job) = self.copy.take() {
            job.send(Primary::Decoded(None));
        }
    }
}

impl Job {
    /// Sends the copy, on this thread's companion (or as a task), then
    /// compares its answer with the primary's; or drops it, counted, when
    /// `max_in_flight` copies are already waiting or running.
    fn send(self, primary: Primary) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.pool.shadow_dropped();
            return;
        };
        let handed = Instant::now();
        super::copies::run(Box::pin(async move {
            let _permit = permit;
            // Waiting for the CPU counts against the shadow's timeout: a
            // copy the companion could not start in time is dropped (and
            // its slot freed) as soon as the companion reaches it.
            if handed.elapsed() >= self.pool.timeout() {
                self.pool.shadow_dropped();
                return;
            }
            self.run(primary).await;
        }));
    }

    async fn run(self, primary: Primary) {
        let Job {
            pool,
            request,
            compare,
            door,
            id,
            ..
        } = self;
        // The shadow's latency is how long its answer took to be ready
        // where the engine can tell (a worker thread's run; a plain-HTTP
        // remote's answer by the kernel's receive time): this thread runs
        // at the lowest priority, and its own wait for the CPU on a busy
        // gateway is not the shadow's latency. Otherwise (TLS, gRPC), the
        // time until this thread had the answer.
        let started = Instant::now();
        let (result, took) = match request {
            Request::Tensors(inputs) => match pool.infer_timed(inputs, &id, pool.timeout()).await {
                Ok((outputs, took)) => (Ok(outputs), took),
                Err(e) => (Err(e), None),
            },
            Request::Body(body, header_len) => {
                match pool
                    .forward(body, header_len.as_deref(), &id, pool.timeout())
                    .await
                {
                    Ok(passed) => (
                        protocol::decode_response_json(&passed.body, passed.header_len.as_deref())
                            .map_err(|e| {
                                RuntimeError::Inference(format!(
                                    "the shadow version sent an unreadable answer: {}",
                                    e.of_answer()
                                ))
                            }),
                        passed.took,
                    ),
                    Err(e) => (Err(e), None),
                }
            }
        };
        // An answer without the compared output (or with none) is the
        // shadow's error, as it would be production's.
        let result = result.and_then(|outputs| {
            let compared = std::iter::once(compare.output.as_str());
            super::failover::answers_what_was_asked(&pool, &outputs, compared)?;
            Ok(outputs)
        });
        let seconds = took.unwrap_or_else(|| started.elapsed()).as_secs_f64();
        let (outcome, class) = match &result {
            Ok(out) => (
                Outcome::Ok,
                out.iter()
                    .find(|t| t.name == compare.output)
                    .and_then(|t| compare::predicted_classes(t).first().copied()),
            ),
            Err(e) => {
                pool.shadow_failed(e);
                (Outcome::Error, None)
            }
        };
        pool.record(Role::Shadow, door, outcome, seconds, class);
        // `None`: the primary failed, so there is nothing to compare with.
        let primary = primary.output(&compare.output);
        let comparison = match (&result, &primary) {
            (Err(_), _) => Some(Comparison::Error),
            (Ok(shadow), Some(p)) => Some(
                match compare::agree(std::slice::from_ref(p), shadow, &compare) {
                    Some(true) => Comparison::Agree,
                    Some(false) => Comparison::Disagree,
                    None => Comparison::Error,
                },
            ),
            (Ok(_), None) => None,
        };
        if let Some(c) = comparison {
            pool.metrics.compared(c);
            pool.record_shadow(|b| match c {
                Comparison::Agree => b.agree += 1,
                Comparison::Disagree => b.disagree += 1,
                Comparison::Error => b.compare_errors += 1,
            });
        }
        // The example after its count: a reader that takes examples, then
        // counts, never sees more disagreements than were counted.
        if let (Some(Comparison::Disagree), Ok(shadow), Some(p)) = (comparison, &result, &primary)
            && let Some(s) = shadow.iter().find(|t| t.name == compare.output)
        {
            pool.record_disagreement(&id, p, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::gateway::policy::{Compare, CompareMode, RoutePolicy, ShadowPolicy};
    use crate::metrics::{Metrics, Telemetry};
    use crate::protocol::{Signature, TensorData};
    use crate::records::ServingSettings;
    use crate::units::HumanDuration;

    /// Stable `a`, shadow `b` at 100 %, each with `timeout` and no replica
    /// (a copy sent fails at once, counted as a failed comparison).
    fn route(timeout: Duration) -> ModelRoute {
        let metrics = Metrics::new();
        let telemetry = Arc::new(Telemetry::default());
        let pools = ["a", "b"]
            .into_iter()
            .map(|v| {
                let settings = ServingSettings {
                    timeout: HumanDuration(timeout),
                    ..ServingSettings::default()
                };
                let pool = crate::gateway::VersionPool::new(
                    "m".into(),
                    v.into(),
                    Signature {
                        inputs: Vec::new(),
                        outputs: Vec::new(),
                    },
                    Vec::new(),
                    settings,
                    metrics.for_version("m", v),
                    telemetry.clone(),
                );
                (v.to_string(), Arc::new(pool))
            })
            .collect::<HashMap<_, _>>();
        let mut policy = RoutePolicy::stable_only("a");
        policy.shadow = Some(ShadowPolicy {
            version: "b".into(),
            percent: 100.0,
            compare: Compare {
                output: "y".into(),
                mode: CompareMode::Class,
                tolerance: 0.0,
            },
            max_in_flight: 4,
        });
        ModelRoute::new(policy, pools)
    }

    fn tensor(name: &str) -> Tensor {
        Tensor {
            name: name.into(),
            shape: vec![1],
            data: TensorData::Int64(vec![1]),
        }
    }

    /// Runs the copies handed over so far (they are tasks of this
    /// runtime: no companion thread here) until `b`'s counts change.
    async fn settled(route: &ModelRoute, before: [u64; 4]) -> [u64; 4] {
        let b = &route.pools["b"];
        for _ in 0..1000 {
            tokio::task::yield_now().await;
            if b.metrics.shadow_counts() != before {
                break;
            }
        }
        b.metrics.shadow_counts()
    }

    /// A copy that waited longer than the shadow's timeout before its
    /// thread could start it (on a busy gateway, the copies' thread waits
    /// for the CPU) is dropped and counted, not sent late; one that did not
    /// wait is sent. Counts: agreed, disagreed, failed, dropped.
    #[test]
    fn a_copy_that_waited_past_the_shadows_timeout_is_dropped_and_counted() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let route = route(Duration::from_millis(50));
            let inputs = [tensor("x")];
            let outputs = [tensor("y")];
            let copy =
                |id| Mirror::start(&route, Copy::Tensors(&inputs), FrontDoor::Rest, id).unwrap();

            copy("1").primary_answered(Some(&outputs));
            assert_eq!(
                settled(&route, [0; 4]).await,
                [0, 0, 1, 0],
                "sent at once: it runs (and fails: no replica)"
            );

            copy("2").primary_answered(Some(&outputs));
            // The copy's thread is busy past the timeout before it runs.
            std::thread::sleep(Duration::from_millis(80));
            assert_eq!(settled(&route, [0, 0, 1, 0]).await, [0, 0, 1, 1]);
            // Its slot is free again: the next copy goes.
            copy("3").primary_answered(Some(&outputs));
            assert_eq!(settled(&route, [0, 0, 1, 1]).await, [0, 0, 2, 1]);
            // The failed copies were said in the log, once: a failure
            // within the interval after is counted for the next line.
            let error = RuntimeError::Unavailable("down".into());
            assert!(!route.pools["b"].shadow_failed(&error));
        });
    }
}
