//! What answered each recent request: request id → model, version and
//! predicted class, for delayed labels (`POST /v2/models/{m}/feedback`).
//! Bounded: the oldest ids are forgotten first. An entry costs one
//! allocation (its id, shared by the index and the queue); model and version
//! names are shared by every entry that names them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crate::metrics::Role;

/// The answer a request id got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub model: Arc<str>,
    pub version: Arc<str>,
    /// The role the version played for this request.
    pub role: Role,
    pub class: Option<i64>,
}

struct Inner {
    by_id: HashMap<Arc<str>, Answered>,
    order: VecDeque<Arc<str>>,
    /// Model and version names, one copy each (as many as were ever served).
    names: HashSet<Arc<str>>,
}

impl Inner {
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }
}

/// A bounded memory of recent answers.
pub struct RecentPredictions {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl RecentPredictions {
    pub fn new(capacity: usize) -> RecentPredictions {
        RecentPredictions {
            capacity,
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                order: VecDeque::new(),
                names: HashSet::new(),
            }),
        }
    }

    pub fn remember(&self, id: &str, model: &str, version: &str, role: Role, class: Option<i64>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let answered = Answered {
            model: inner.name(model),
            version: inner.name(version),
            role,
            class,
        };
        if let Some(known) = inner.by_id.get_mut(id) {
            *known = answered;
        } else {
            let id: Arc<str> = id.into();
            inner.by_id.insert(id.clone(), answered);
            inner.order.push_back(id);
        }
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Answered> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_newest_and_forgets_the_oldest() {
        let r = RecentPredictions::new(2);
        r.remember("a", "m", "1", Role::Stable, Some(0));
        r.remember("b", "m", "2", Role::Candidate, Some(1));
        r.remember("c", "m", "2", Role::Candidate, None);
        assert_eq!(r.len(), 2);
        assert!(r.get("a").is_none());
        assert_eq!(r.get("b").unwrap().class, Some(1));
        assert_eq!(&*r.get("c").unwrap().version, "2");
    }
}
