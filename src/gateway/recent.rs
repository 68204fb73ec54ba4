//! What answered each recent request: request id → model, version and
//! predicted class, for delayed labels (`POST /v2/models/{m}/feedback`).
//! Bounded: the oldest ids are forgotten first. A label counts once per
//! id, and an id that answered more than one request (clients choose their
//! ids) takes no label at all: it could not say which answer it is for. An entry costs one
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

/// What the memory knows of one id.
struct Entry {
    answered: Answered,
    /// Set when a second request came with the same id.
    shared: bool,
    labelled: bool,
}

/// Why an id takes no label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoLabel {
    /// Never seen, forgotten, or of another model.
    Unknown,
    /// More than one request came with this id.
    Shared,
    /// It already has its label.
    Labelled,
}

struct Inner {
    by_id: HashMap<Arc<str>, Entry>,
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
        // One hash of the id: ids are nearly always new, so the entry's key
        // is made before looking (a repeated id wastes it).
        let id: Arc<str> = id.into();
        match inner.by_id.entry(id.clone()) {
            std::collections::hash_map::Entry::Occupied(mut known) => known.get_mut().shared = true,
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(Entry {
                    answered,
                    shared: false,
                    labelled: false,
                });
                inner.order.push_back(id);
            }
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
            .map(|e| e.answered.clone())
    }

    /// What answered `id` for `model`, marked as labelled, if it may take
    /// a label now: known, answered once, and not labelled yet.
    pub fn label(&self, id: &str, model: &str) -> Result<Answered, NoLabel> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = inner
            .by_id
            .get_mut(id)
            .filter(|e| &*e.answered.model == model)
            .ok_or(NoLabel::Unknown)?;
        if entry.shared {
            return Err(NoLabel::Shared);
        }
        if entry.labelled {
            return Err(NoLabel::Labelled);
        }
        entry.labelled = true;
        Ok(entry.answered.clone())
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

    #[test]
    fn an_id_takes_one_label_and_a_shared_id_none() {
        let r = RecentPredictions::new(10);
        r.remember("a", "m", "1", Role::Stable, Some(1));
        assert_eq!(r.label("a", "other"), Err(NoLabel::Unknown));
        assert_eq!(r.label("a", "m").unwrap().class, Some(1));
        assert_eq!(r.label("a", "m"), Err(NoLabel::Labelled));
        // A second request with the same id: the first answer is kept and
        // neither can be labelled.
        r.remember("b", "m", "1", Role::Stable, Some(0));
        r.remember("b", "m", "2", Role::Candidate, Some(1));
        assert_eq!(&*r.get("b").unwrap().version, "1");
        assert_eq!(r.label("b", "m"), Err(NoLabel::Shared));
        assert_eq!(r.label("never", "m"), Err(NoLabel::Unknown));
    }
}
