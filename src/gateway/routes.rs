//! The route table: per model, an immutable snapshot of its routing policy
//! and the pools of the versions it uses, swapped atomically by the one
//! writer (the controller) and read without locks on every request.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use super::policy::RoutePolicy;
use super::pool::VersionPool;

/// How one model's traffic is served right now.
pub struct ModelRoute {
    pub policy: RoutePolicy,
    /// Every loaded version of the model (the policy's, plus versions loaded
    /// through the repository API), reachable by `/versions/{v}`.
    pub pools: HashMap<String, Arc<VersionPool>>,
    /// Bounds mirrored copies in flight (present when a shadow is set).
    pub shadow_slots: Option<Arc<Semaphore>>,
    /// Out of service (repository `unload`), by whom: no pools, and
    /// inference is refused with 503 until a repository `load`.
    pub unloaded: Option<String>,
}

impl ModelRoute {
    pub fn new(policy: RoutePolicy, pools: HashMap<String, Arc<VersionPool>>) -> ModelRoute {
        let shadow_slots = policy
            .shadow
            .as_ref()
            .map(|s| Arc::new(Semaphore::new(s.max_in_flight as usize)));
        ModelRoute {
            policy,
            pools,
            shadow_slots,
            unloaded: None,
        }
    }

    /// A model taken out of service by `by`: it keeps its policy (what comes
    /// back on `load`) and serves nothing.
    pub fn unloaded(policy: RoutePolicy, by: &str) -> ModelRoute {
        ModelRoute {
            policy,
            pools: HashMap::new(),
            shadow_slots: None,
            unloaded: Some(by.to_string()),
        }
    }

    /// The loaded versions, sorted.
    pub fn loaded(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.pools.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// All models' routes. Readers take a snapshot; the writer replaces it whole.
#[derive(Default)]
pub struct RouteTable {
    models: ArcSwap<HashMap<String, Arc<ModelRoute>>>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    /// Every model's current policy.
    pub fn snapshot_policies(&self) -> Vec<(String, RoutePolicy)> {
        self.models
            .load()
            .iter()
            .map(|(m, r)| (m.clone(), r.policy.clone()))
            .collect()
    }

    pub fn model(&self, model: &str) -> Option<Arc<ModelRoute>> {
        self.models.load().get(model).cloned()
    }

    /// Publishes a model's new route (or removes it with `None`) in one swap.
    /// Requests already running keep the pools they hold until they finish.
    pub fn publish(&self, model: &str, route: Option<ModelRoute>) {
        let route = route.map(Arc::new);
        self.models.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &route {
                Some(r) => next.insert(model.to_string(), r.clone()),
                None => next.remove(model),
            };
            next
        });
    }
}
