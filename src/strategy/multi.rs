//! multi: the candidate becomes primary and the previous `keep` versions stay
//! loaded as an ordered failover chain (with a circuit breaker per version).
//! Succeeds as soon as the candidate is primary and warm; the chain stays as
//! the model's arrangement until the next rollout replaces it.

use super::{Plan, succeed};
use crate::gateway::RoutePolicy;
use crate::records::EventKind;
use crate::spec::{MultiSpec, RolloutSpec};

pub fn plan(spec: &RolloutSpec, m: &MultiSpec, p: &mut Plan, now_ms: u64) {
    match p.state.step {
        0 => {
            let before = &p.state.before;
            let chain: Vec<String> = std::iter::once(before.stable.clone())
                .chain(before.failover.iter().cloned())
                .filter(|v| *v != spec.version)
                .take(m.keep as usize)
                .collect();
            let mut route = RoutePolicy::stable_only(&spec.version);
            route.failover = chain.clone();
            route.timeout = m.timeout.or(before.timeout);
            if let Some(b) = &m.breaker {
                route.breaker = b.clone();
            }
            p.set_route(route);
            p.goto(1, now_ms);
            p.event(
                EventKind::Step,
                format!(
                    "step 1/2: version {} is primary; failover chain: {}",
                    spec.version,
                    chain.join(" > ")
                ),
            );
        }
        _ => succeed(p, spec),
    }
}
