//! basic: replace in place. Switch all traffic to the candidate (the
//! controller loads it first; the old version drains and unloads), then done.
//! No analysis, no automatic rollback, nothing kept warm.

use super::{Plan, succeed};
use crate::records::EventKind;
use crate::spec::RolloutSpec;

pub fn plan(spec: &RolloutSpec, p: &mut Plan, now_ms: u64) {
    match p.state.step {
        0 => {
            let route = p.all_to(&spec.version);
            p.set_route(route);
            p.goto(1, now_ms);
            p.event(
                EventKind::Step,
                format!(
                    "step 1/2: switching all traffic from version {} to version {}",
                    p.state.before.stable, spec.version
                ),
            );
        }
        _ => succeed(p, spec),
    }
}
