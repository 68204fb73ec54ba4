//! Shadow mirroring: a copy of a production request goes to the shadow
//! version on its own task. The user's answer never waits for it; when the
//! shadow is saturated (`max_in_flight` copies running) the copy is dropped
//! and counted, never queued. When both have answered, the outputs are
//! compared and the result counted on the shadow's series.

use std::time::Instant;

use tokio::sync::oneshot;

use super::compare;
use super::routes::ModelRoute;
use crate::metrics::{Comparison, Outcome, Role};
use crate::protocol::Tensor;

/// A copy on its way; tell it the primary's answer with [`Mirror::primary_answered`].
pub struct Mirror {
    output: String,
    primary: oneshot::Sender<Option<Tensor>>,
}

impl Mirror {
    /// Decides whether to mirror this request (by the policy's percentage and
    /// the free slots) and, if so, sends the copy at once.
    pub fn start(route: &ModelRoute, inputs: &[Tensor], id: &str) -> Option<Mirror> {
        let policy = route.policy.shadow.as_ref()?;
        if fastrand::f64() * 100.0 >= policy.percent {
            return None;
        }
        let pool = route.pools.get(&policy.version)?.clone();
        let Ok(permit) = route.shadow_slots.as_ref()?.clone().try_acquire_owned() else {
            pool.metrics.dropped();
            pool.record_shadow(|b| b.dropped += 1);
            return None;
        };
        let (primary, primary_answer) = oneshot::channel::<Option<Tensor>>();
        let inputs = inputs.to_vec();
        let compare = policy.compare.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let result = pool.infer(inputs, pool.timeout()).await;
            let seconds = started.elapsed().as_secs_f64();
            let (outcome, class) = match &result {
                Ok(out) => (
                    Outcome::Ok,
                    out.iter()
                        .find(|t| t.name == compare.output)
                        .and_then(|t| compare::predicted_classes(t).first().copied()),
                ),
                Err(_) => (Outcome::Error, None),
            };
            pool.record(Role::Shadow, outcome, seconds, class);
            // `None`: the primary failed, so there is nothing to compare with.
            let primary = primary_answer.await.ok().flatten();
            let comparison = match (&result, primary) {
                (Err(_), _) => Some(Comparison::Error),
                (Ok(shadow), Some(p)) => Some(
                    match compare::agree(std::slice::from_ref(&p), shadow, &compare) {
                        Some(true) => Comparison::Agree,
                        Some(false) => {
                            if let Some(s) = shadow.iter().find(|t| t.name == compare.output) {
                                pool.record_disagreement(&id, &p, s);
                            }
                            Comparison::Disagree
                        }
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
                    Comparison::Error => {}
                });
            }
        });
        Some(Mirror {
            output: policy.compare.output.clone(),
            primary,
        })
    }

    /// Hands the primary's outputs (or `None` when it failed) to the copy.
    pub fn primary_answered(self, outputs: Option<&[Tensor]>) {
        let compared = outputs.and_then(|o| o.iter().find(|t| t.name == self.output).cloned());
        let _ = self.primary.send(compared);
    }
}
