//! The route table: an immutable snapshot per model, swapped atomically by the
//! one writer (the controller) and read without locks on every request.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::GatewayError;
use super::pool::VersionPool;

/// How one model's traffic is served right now.
#[derive(Clone)]
pub struct ModelRoute {
    /// Serves every request that does not name a version.
    pub stable: Arc<VersionPool>,
    /// Every loaded version (stable included), reachable by `/versions/{v}`.
    pub versions: HashMap<String, Arc<VersionPool>>,
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

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<HashMap<String, Arc<ModelRoute>>> {
        self.models.load_full()
    }

    pub fn model(&self, model: &str) -> Option<Arc<ModelRoute>> {
        self.models.load().get(model).cloned()
    }

    /// Publishes a model's new route (or removes it with `None`) in one swap.
    /// Requests already running keep the pools they hold until they finish.
    pub fn publish(&self, model: &str, route: Option<ModelRoute>) {
        self.models.rcu(|current| {
            let mut next = HashMap::clone(current);
            match &route {
                Some(r) => next.insert(model.to_string(), Arc::new(r.clone())),
                None => next.remove(model),
            };
            next
        });
    }

    /// The pool that serves a request for `model` (and `version`, if named).
    pub fn choose(
        &self,
        model: &str,
        version: Option<&str>,
    ) -> Result<Arc<VersionPool>, GatewayError> {
        let snapshot = self.models.load();
        let route = snapshot.get(model).ok_or_else(|| {
            GatewayError::NotFound(format!(
                "model \"{model}\" is not served here; GET /v2/repository/index lists the models and their state"
            ))
        })?;
        match version {
            None => Ok(route.stable.clone()),
            Some(v) => route.versions.get(v).cloned().ok_or_else(|| {
                let mut loaded: Vec<&str> = route.versions.keys().map(String::as_str).collect();
                loaded.sort_unstable();
                GatewayError::NotFound(format!(
                    "version \"{v}\" of model \"{model}\" is not loaded; loaded versions: {}",
                    loaded.join(", ")
                ))
            }),
        }
    }
}
