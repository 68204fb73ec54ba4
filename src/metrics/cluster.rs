//! Windows merged over every instance sharing a store (cluster-wide
//! analysis): what an instance flushes (its closed buckets per model,
//! version and role, and the epoch it has flushed through), what it reads
//! back of the others', the merged summaries, and whether a window is
//! complete — every instance that was up during it has flushed past its
//! end. Pure: the controller moves these to and from the store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::window::{BUCKET_SECS, Bucket, span, summarize};
use super::{Role, SeriesSummary, Summary, Telemetry};

/// One closed bucket of one series, as an instance flushes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Flushed {
    pub model: String,
    pub version: String,
    pub role: Role,
    pub bucket: Bucket,
}

/// What one flush writes: the closed buckets not written yet (only series
/// that saw something), and the epoch this instance has flushed through —
/// written even when there is no bucket, so a quiet instance still counts
/// as reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct Flush {
    pub instance: String,
    pub through: u64,
    pub buckets: Vec<Flushed>,
}

/// Another instance's bucket of one model, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerBucket {
    pub instance: String,
    pub version: String,
    pub role: Role,
    pub bucket: Bucket,
}

/// What the store holds of one model from the other instances: their
/// buckets, and how far each instance has flushed (instance → epoch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peers {
    pub buckets: Vec<PeerBucket>,
    pub marks: BTreeMap<String, u64>,
}

/// An instance as completeness sees it: when it started and when it was
/// last heard from (ms since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub started_ms: u64,
    pub last_seen_ms: u64,
}

/// Whether a merged window holds every instance's buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Completeness {
    /// Every instance up during the window has flushed past its end.
    pub complete: bool,
    /// Instances up during the window (this one included).
    pub instances_expected: usize,
    /// Of those, the ones whose buckets the window holds.
    pub instances_reporting: usize,
    /// The expected instances that have not reported yet, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

impl Completeness {
    /// This instance alone: complete by definition.
    pub fn alone() -> Completeness {
        Completeness {
            complete: true,
            instances_expected: 1,
            instances_reporting: 1,
            missing: vec![],
        }
    }

    /// Whether other instances take part, or may (the store could not be
    /// read): otherwise nothing is shown, and every output stays as on a
    /// single node.
    pub fn shared(&self) -> bool {
        self.instances_expected > 1 || !self.complete
    }

    /// The window's shortfall in words, for a verdict's reason.
    pub fn shortfall(&self) -> Option<String> {
        (!self.complete).then(|| {
            format!(
                "window incomplete: {} of {} instances reported (not yet: {})",
                self.instances_reporting,
                self.instances_expected,
                self.missing.join(", ")
            )
        })
    }
}

/// Whether the window of epochs `(first, last]` is complete: `me` always
/// reports (its own ring is read); every other member up during the window
/// — started before its end, heard from within `slack` of its start or
/// later — must have flushed through `last`. An instance that died or
/// froze during the window keeps it incomplete: its part of the traffic
/// may be missing, and saying so is the point.
pub fn completeness(
    me: &str,
    members: &[Member],
    marks: &BTreeMap<String, u64>,
    (first, last): (u64, u64),
    slack: Duration,
) -> Completeness {
    let start_ms = (first + 1) * BUCKET_SECS * 1000;
    let end_ms = (last + 1) * BUCKET_SECS * 1000;
    let slack = slack.as_millis() as u64;
    let expected: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.id != me && m.started_ms < end_ms && m.last_seen_ms + slack >= start_ms)
        .map(|m| m.id.as_str())
        .collect();
    let missing: Vec<String> = expected
        .iter()
        .filter(|id| marks.get(**id).is_none_or(|through| *through < last))
        .map(|id| id.to_string())
        .collect();
    Completeness {
        complete: missing.is_empty(),
        instances_expected: expected.len() + 1,
        instances_reporting: expected.len() + 1 - missing.len(),
        missing,
    }
}

impl Telemetry {
    /// The closed buckets with `after < epoch < before` of every series:
    /// what a flush writes.
    pub fn closed_between(&self, after: u64, before: u64) -> Vec<Flushed> {
        let all = self.series.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (model, versions) in all.iter() {
            for (version, roles) in versions {
                for (i, s) in roles.iter().enumerate() {
                    let Some(s) = s else { continue };
                    out.extend(s.between(after, before).into_iter().map(|bucket| Flushed {
                        model: model.clone(),
                        version: version.clone(),
                        role: Role::ALL[i],
                        bucket,
                    }));
                }
            }
        }
        out
    }

    /// One version in one role over the `window` ending with epoch `last`,
    /// this instance's buckets merged with `peers`'.
    pub fn merged_summary(
        &self,
        model: &str,
        version: &str,
        role: Role,
        last: u64,
        window: Duration,
        peers: &Peers,
    ) -> Summary {
        let (first, covered) = span(last, window);
        let total = self.merged_between((model, version, role), first, last, peers);
        summarize([&total], covered)
    }

    /// One version in one role over the closed buckets with
    /// `after < epoch <= through`, this instance's merged with `peers'`
    /// (which must have been read from after `after`): the counts a
    /// cluster-wide counter adds for that span.
    pub fn merged_between(
        &self,
        (model, version, role): (&str, &str, Role),
        after: u64,
        through: u64,
        peers: &Peers,
    ) -> Bucket {
        let mut total = Bucket {
            epoch: through,
            ..Bucket::default()
        };
        let local = self
            .find(model, version, role)
            .map(|s| s.between(after, through + 1))
            .unwrap_or_default();
        let remote = peers
            .buckets
            .iter()
            .filter(|p| p.version == version && p.role == role)
            .map(|p| &p.bucket)
            .filter(|b| b.epoch > after && b.epoch <= through);
        for b in local.iter().chain(remote) {
            total.merge(b);
        }
        total
    }

    /// What a cluster-wide counter adds now (a shadow's comparisons): for
    /// this instance, its closed buckets through `last`; for every other,
    /// its flushed buckets through the epoch it has flushed through (its
    /// mark in `peers`, however late that flush came) — each after the
    /// epoch `counted` says was counted for it (`start` for an instance
    /// not counted yet; never older than the ring). Returns the sum and the
    /// new per-instance epochs to store with it. `peers` must have been
    /// read from before the oldest of those epochs.
    pub fn count_on(
        &self,
        (model, version, role): (&str, &str, Role),
        (me, last): (&str, u64),
        start: u64,
        counted: &BTreeMap<String, u64>,
        peers: &Peers,
    ) -> (Bucket, BTreeMap<String, u64>) {
        let floor = last.saturating_sub(super::window::RING as u64);
        let from = |id: &str| counted.get(id).copied().unwrap_or(start).max(floor);
        let mut total = Bucket::default();
        let mut through = BTreeMap::new();
        if last > from(me) {
            if let Some(s) = self.find(model, version, role) {
                for b in s.between(from(me), last + 1) {
                    total.merge(&b);
                }
            }
            through.insert(me.to_string(), last);
        }
        for (id, &mark) in peers.marks.iter().filter(|(id, _)| *id != me) {
            let after = from(id);
            if mark <= after {
                continue;
            }
            let theirs = peers.buckets.iter().filter(|p| {
                p.instance == *id
                    && p.version == version
                    && p.role == role
                    && p.bucket.epoch > after
                    && p.bucket.epoch <= mark
            });
            for p in theirs {
                total.merge(&p.bucket);
            }
            through.insert(id.clone(), mark);
        }
        (total, through)
    }

    /// Every series of a model (this instance's or a peer's) over the
    /// `window` ending with epoch `last`, merged with `peers`'.
    pub fn merged_summaries(
        &self,
        model: &str,
        last: u64,
        window: Duration,
        peers: &Peers,
    ) -> Vec<SeriesSummary> {
        let mut keys: BTreeSet<(String, Role)> = self.keys(model).into_iter().collect();
        keys.extend(peers.buckets.iter().map(|p| (p.version.clone(), p.role)));
        keys.into_iter()
            .map(|(version, role)| SeriesSummary {
                summary: self.merged_summary(model, &version, role, last, window, peers),
                version,
                role,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 2_000_000_000 / BUCKET_SECS * BUCKET_SECS;

    /// A series only the peers saw (the leader took none of the
    /// candidate's traffic) is still listed and judged.
    #[test]
    fn a_series_only_peers_saw_is_merged() {
        let leader = Telemetry::default();
        let peer = Telemetry::default();
        peer.series("m", "2", Role::Candidate)
            .record(T0, |b| b.requests += 7);
        let peers = Peers {
            buckets: peer
                .closed_between(0, T0 / BUCKET_SECS + 1)
                .into_iter()
                .map(|f| PeerBucket {
                    instance: "b".into(),
                    version: f.version,
                    role: f.role,
                    bucket: f.bucket,
                })
                .collect(),
            marks: BTreeMap::from([("b".to_string(), T0 / BUCKET_SECS)]),
        };
        let s = leader.merged_summaries("m", T0 / BUCKET_SECS, Duration::from_secs(10), &peers);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].version.as_str(), s[0].summary.requests), ("2", 7));
    }

    fn member(id: &str, started_ms: u64, last_seen_ms: u64) -> Member {
        Member {
            id: id.into(),
            started_ms,
            last_seen_ms,
        }
    }

    /// A window is complete once every instance up during it has flushed
    /// through its last bucket; a frozen instance keeps the windows it was
    /// up in incomplete, and is not expected in later ones.
    #[test]
    fn a_window_waits_for_every_instance_up_during_it() {
        let e = T0 / BUCKET_SECS;
        let ms = |epoch: u64| epoch * BUCKET_SECS * 1000;
        let window = (e, e + 6); // epochs e+1..=e+6
        let slack = Duration::from_secs(1);
        let members = [
            member("me", 0, ms(e + 7)),
            member("b", 0, ms(e + 7)),
            member("frozen", 0, ms(e + 3)),
            member("late", ms(e + 8), ms(e + 9)),
        ];
        let mut marks = BTreeMap::from([("b".to_string(), e + 5), ("frozen".to_string(), e + 2)]);
        let c = completeness("me", &members, &marks, window, slack);
        assert_eq!(
            c,
            Completeness {
                complete: false,
                instances_expected: 3,
                instances_reporting: 1,
                missing: vec!["b".into(), "frozen".into()],
            }
        );
        assert_eq!(
            c.shortfall().unwrap(),
            "window incomplete: 1 of 3 instances reported (not yet: b, frozen)"
        );
        marks.insert("b".into(), e + 6);
        let c = completeness("me", &members, &marks, window, slack);
        assert_eq!((c.complete, c.instances_reporting), (false, 2));
        // The next windows begin after the frozen instance was last heard
        // from (beyond the heartbeat's slack): it is not expected there.
        let later = (e + 6, e + 12);
        marks.insert("b".into(), e + 12);
        marks.insert("late".into(), e + 12);
        let c = completeness("me", &members, &marks, later, slack);
        assert!(c.complete && c.instances_expected == 3, "{c:?}");
        // Alone: complete, and nothing to show.
        let c = completeness("me", &members[..1], &BTreeMap::new(), window, slack);
        assert_eq!(c, Completeness::alone());
        assert!(!c.shared());
    }
}
