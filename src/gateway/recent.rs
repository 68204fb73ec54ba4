//! What answered each recent request: request id → model, version and
//! predicted class, for delayed labels (`POST /v2/models/{m}/feedback`).
//! Bounded: the oldest ids are forgotten first. A label counts once per
//! id, and an id that answered more than one request (clients choose their
//! ids) takes no label at all: it could not say which answer it is for.
//!
//! This runs on every request, so an entry is small and made without
//! allocating: the id is kept as its 64-bit keyed hash (SipHash with a
//! per-process random key, so a client choosing ids cannot choose their
//! keys), and model and version as the index of their pair, each pair
//! stored once. Two live ids with the same hash (about 10⁻¹⁰ over 100,000
//! ids) read as one id sent twice: neither takes a label. A label for an id
//! not remembered whose hash is a live id's (about 5·10⁻¹⁵ per label with
//! 100,000 kept, and not to be aimed at: the key is secret) would go to
//! that id's answer.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
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
    /// The (model, version) pair, an index into [`Inner::pairs`].
    pair: u32,
    role: Role,
    class: Option<i64>,
    /// Set when a second request came with this id.
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
    /// Its answer had no class Ferry could read (no `label` output in
    /// JSON), so a label could not be judged right or wrong.
    NoPrediction,
}

/// The maps' keys are keyed hashes already: used as they are.
#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys, already keyed hashes, are hashed here: any other key
        // type would lose the spread the map needs.
        debug_assert!(false, "KeyIsHash hashes u64 keys only");
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByHash<V> = HashMap<u64, V, BuildHasherDefault<KeyIsHash>>;

struct Inner {
    by_id: ByHash<Entry>,
    order: VecDeque<u64>,
    /// Every (model, version) pair ever answered, once each.
    pairs: Vec<(Arc<str>, Arc<str>)>,
    pair_of: ByHash<u32>,
}

impl Inner {
    /// The index of the pair (model, version), added when new.
    fn pair(&mut self, key: u64, model: &str, version: &str) -> u32 {
        let is = |p: &(Arc<str>, Arc<str>)| &*p.0 == model && &*p.1 == version;
        if let Some(&i) = self.pair_of.get(&key)
            && is(&self.pairs[i as usize])
        {
            return i;
        }
        // Another pair with this hash (never seen in practice): looked for
        // the long way, so no answer is ever given another's name.
        if let Some(i) = self.pairs.iter().position(is) {
            return i as u32;
        }
        let i = self.pairs.len() as u32;
        self.pairs.push((model.into(), version.into()));
        self.pair_of.entry(key).or_insert(i);
        i
    }

    fn answered(&self, e: &Entry) -> Answered {
        let (model, version) = &self.pairs[e.pair as usize];
        Answered {
            model: model.clone(),
            version: version.clone(),
            role: e.role,
            class: e.class,
        }
    }
}

/// A bounded memory of recent answers.
pub struct RecentPredictions {
    capacity: usize,
    keys: RandomState,
    inner: Mutex<Inner>,
}

impl RecentPredictions {
    pub fn new(capacity: usize) -> RecentPredictions {
        RecentPredictions {
            capacity,
            keys: RandomState::new(),
            inner: Mutex::new(Inner {
                by_id: ByHash::default(),
                order: VecDeque::new(),
                pairs: Vec::new(),
                pair_of: ByHash::default(),
            }),
        }
    }

    fn key(&self, id: &str) -> u64 {
        self.keys.hash_one(id)
    }

    pub fn remember(&self, id: &str, model: &str, version: &str, role: Role, class: Option<i64>) {
        if self.capacity == 0 {
            return;
        }
        let key = self.key(id);
        let pair_key = self.keys.hash_one((model, version));
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let pair = inner.pair(pair_key, model, version);
        match inner.by_id.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut known) => known.get_mut().shared = true,
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(Entry {
                    pair,
                    role,
                    class,
                    shared: false,
                    labelled: false,
                });
                inner.order.push_back(key);
            }
        }
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Answered> {
        let key = self.key(id);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.by_id.get(&key).map(|e| inner.answered(e))
    }

    /// What answered `id` for `model`, marked as labelled, if it may take
    /// a label now: known, answered once, and not labelled yet.
    pub fn label(&self, id: &str, model: &str) -> Result<Answered, NoLabel> {
        let key = self.key(id);
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let entry = inner
            .by_id
            .get_mut(&key)
            .filter(|e| &*inner.pairs[e.pair as usize].0 == model)
            .ok_or(NoLabel::Unknown)?;
        if entry.shared {
            return Err(NoLabel::Shared);
        }
        if entry.labelled {
            return Err(NoLabel::Labelled);
        }
        if entry.class.is_none() {
            return Err(NoLabel::NoPrediction);
        }
        entry.labelled = true;
        let entry = &inner.by_id[&key];
        Ok(inner.answered(entry))
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
    fn pairs_with_one_hash_keep_their_own_names() {
        let r = RecentPredictions::new(10);
        let mut inner = r.inner.lock().unwrap();
        let a = inner.pair(7, "m", "1");
        let b = inner.pair(7, "m", "2");
        assert_ne!(a, b, "a second pair under the same hash is a new pair");
        assert_eq!(inner.pair(7, "m", "2"), b, "and found again");
        assert_eq!(inner.pair(7, "m", "1"), a);
        assert_eq!(inner.pair(8, "m", "1"), a, "whatever the hash says");
        assert_eq!(
            (&*inner.pairs[b as usize].0, &*inner.pairs[b as usize].1),
            ("m", "2")
        );
    }

    #[test]
    fn many_models_and_versions_are_told_apart() {
        let r = RecentPredictions::new(1_000);
        for i in 0..1_000 {
            let (m, v) = (format!("m{}", i % 50), format!("{}", i % 7));
            r.remember(&format!("id-{i}"), &m, &v, Role::Stable, Some(i));
        }
        for i in (0..1_000).step_by(37) {
            let got = r
                .label(&format!("id-{i}"), &format!("m{}", i % 50))
                .unwrap();
            assert_eq!(
                (&*got.version, got.class),
                (format!("{}", i % 7).as_str(), Some(i))
            );
        }
        r.remember("id-new", "m0", "0", Role::Stable, None);
        assert!(r.get("id-0").is_none(), "the oldest is forgotten");
        assert_eq!(r.len(), 1_000);
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
        // An answer without a class Ferry read cannot be judged: refused,
        // and not consumed.
        r.remember("c", "m", "1", Role::Stable, None);
        assert_eq!(r.label("c", "m"), Err(NoLabel::NoPrediction));
        assert_eq!(r.label("c", "m"), Err(NoLabel::NoPrediction));
    }
}
