//! One 5-second bucket of a series: what happened in it (counts, the
//! latency sketch, predicted classes), mergeable, and serialised as an
//! instance flushes it to a shared store. `window` keeps them in rings,
//! `packed` keeps closed ones small.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sketch::Sketch;

/// What happened in one bucket of time. Serialised as an instance flushes
/// it to a shared store (issue 15: cluster-wide analysis).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bucket {
    /// Start of the bucket, in `BUCKET_SECS` units since the Unix epoch.
    pub epoch: u64,
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    pub latency: Sketch,
    /// Shadow comparisons (recorded on the shadow's series).
    pub agree: u64,
    pub disagree: u64,
    /// Shadow copies that could not be compared (the shadow failed, or its
    /// answer lacked the compared output).
    pub compare_errors: u64,
    /// Mirrored copies dropped because the shadow was saturated.
    pub dropped: u64,
    /// Predicted classes answered (for prediction-shift analysis).
    pub classes: ClassCounts,
    /// Delayed labels received for answers of this bucket's time, and how
    /// many matched the predicted class.
    pub labelled: u64,
    pub correct: u64,
    /// Of `requests`, those that came through the gRPC front door (the rest
    /// came over REST): the status splits traffic by protocol.
    pub grpc: u64,
}

impl Bucket {
    /// Bytes this bucket holds beside its own size (the size budget).
    pub fn heap_bytes(&self) -> usize {
        self.latency.heap_bytes() + self.classes.heap_bytes()
    }

    /// Adds `o`'s counts to this bucket's.
    pub fn merge(&mut self, o: &Bucket) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.rejected += o.rejected;
        self.latency.merge(&o.latency);
        self.agree += o.agree;
        self.disagree += o.disagree;
        self.compare_errors += o.compare_errors;
        self.dropped += o.dropped;
        for (c, n) in o.classes.iter() {
            self.classes.add(c, n);
        }
        self.labelled += o.labelled;
        self.correct += o.correct;
        self.grpc += o.grpc;
    }
}

/// Answers per predicted class, sorted by class: a bucket holds a handful
/// (two for a binary classifier), so a sorted vector, a few bytes each,
/// rather than a map's node. Stored as a JSON object, `{"class": count}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassCounts(Vec<(i64, u64)>);

impl ClassCounts {
    /// Adds `n` answers of class `c`.
    pub fn add(&mut self, c: i64, n: u64) {
        match self.0.binary_search_by_key(&c, |(k, _)| *k) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => self.0.insert(i, (c, n)),
        }
    }

    /// (class, answers), by class.
    pub fn iter(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.0.iter().copied()
    }

    pub fn heap_bytes(&self) -> usize {
        self.0.capacity() * size_of::<(i64, u64)>()
    }
}

impl Serialize for ClassCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for ClassCounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<i64, u64>::deserialize(d)?;
        Ok(ClassCounts(map.into_iter().collect()))
    }
}
