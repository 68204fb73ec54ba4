//! Telemetry over every instance sharing the store: this instance flushes
//! its closed 5-second buckets to the store just after each bucket closes
//! (off the request path, retried while the buckets are still in the
//! ring), and reads windows merged with the other instances' buckets, with
//! whether each window is complete ([`crate::metrics::cluster`] is the pure
//! part). On an embedded store there are no others: the merged windows are
//! this instance's own, figure for figure.

use std::sync::Arc;
use std::time::Duration;

use super::Controller;
use super::cluster::{HEARTBEAT, Identity};
use crate::metrics::cluster::{Completeness, Flush, Member, Peers, completeness};
use crate::metrics::window::{BUCKET_SECS, RING, span};
use crate::metrics::{Role, SeriesSummary, Summary};
use crate::units::now_ms;

/// How long after a bucket closes this instance flushes it (a request
/// recorded just before the close has taken its bucket's lock by then).
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// How soon a failed flush is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long analysis waits, after a window's last bucket closed, for every
/// instance's flush before it judges what arrived (and says so).
pub const GRACE: Duration = Duration::from_millis(1500);
/// Flushes between two prunings of rows older than the ring (15 minutes).
const PRUNE_EVERY: u64 = 60;

/// What the store said of the other instances, read once for one answer.
pub struct ClusterRead {
    peers: Peers,
    /// Every instance (this one included) with its start and last report,
    /// or why they could not be read.
    members: Result<Vec<Member>, String>,
    me: Option<String>,
}

impl ClusterRead {
    /// This instance alone (no identity yet, or nothing shared).
    fn alone() -> ClusterRead {
        ClusterRead {
            peers: Peers::default(),
            members: Ok(vec![]),
            me: None,
        }
    }

    /// Whether the window of `window` ending with epoch `last` holds every
    /// instance's buckets.
    pub fn completeness(&self, last: u64, window: Duration) -> Completeness {
        let (Some(me), Ok(members)) = (&self.me, &self.members) else {
            return match &self.members {
                // How many others there are is not known: this instance
                // counts what it knows of, itself.
                Err(why) => Completeness {
                    complete: false,
                    instances_expected: 1,
                    instances_reporting: 1,
                    missing: vec![format!("the others (the store could not be read: {why})")],
                },
                Ok(_) => Completeness::alone(),
            };
        };
        let (first, _) = span(last, window);
        completeness(me, members, &self.peers.marks, (first, last), HEARTBEAT)
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }
}

pub use crate::metrics::window::epoch_at;

impl Controller {
    /// Reads the other instances' buckets of `model` of the last `window`
    /// (and the bucket filling now) and the instances table. A store that
    /// cannot be read leaves this instance's figures, marked incomplete; an
    /// embedded store has no other instance.
    pub fn cluster_read(&self, model: &str, window: Duration) -> ClusterRead {
        let store = self.registry.store();
        // An embedded store has one instance (a previous process's row in
        // its instances table included: that one will never flush).
        let Some(me) = self.me.get().filter(|_| store.keeps_buckets()) else {
            return ClusterRead::alone();
        };
        // The window before the bucket filling now, whole buckets.
        let (oldest, _) = span(epoch_at(now_ms()).saturating_sub(1), window);
        if store.known_unreachable() {
            // An outage not yet over: no waiting for a call's time limit.
            return ClusterRead {
                peers: Peers::default(),
                members: Err("it is unreachable".into()),
                me: Some(me.id.clone()),
            };
        }
        let read = store.instances().and_then(|instances| {
            let peers = match instances.iter().any(|i| i.report.id != me.id) {
                true => store.peer_buckets(model, oldest, &me.id)?,
                false => Peers::default(),
            };
            Ok((instances, peers))
        });
        match read {
            Ok((instances, peers)) => ClusterRead {
                peers,
                members: Ok(instances.into_iter().map(member).collect()),
                me: Some(me.id.clone()),
            },
            Err(e) => ClusterRead {
                peers: Peers::default(),
                members: Err(e.to_string()),
                me: Some(me.id.clone()),
            },
        }
    }

    /// One version in one role over the complete buckets of the last
    /// `window` before `now_ms`, merged over every instance in `read`.
    pub fn merged_summary(
        &self,
        read: &ClusterRead,
        (model, version, role): (&str, &str, Role),
        window: Duration,
        now_ms: u64,
    ) -> Summary {
        let last = epoch_at(now_ms).saturating_sub(1);
        self.telemetry
            .merged_summary(model, version, role, last, window, &read.peers)
    }

    /// Every series of `model` over the last `window` (this instance's
    /// filling bucket included, as a single node shows it), merged over
    /// every instance, and the completeness of the closed part.
    pub fn merged_summaries(
        &self,
        model: &str,
        window: Duration,
    ) -> (Vec<SeriesSummary>, Completeness) {
        let read = self.cluster_read(model, window);
        let now_ms = now_ms();
        let now = epoch_at(now_ms);
        let mut series = self
            .telemetry
            .merged_summaries(model, now, window, &read.peers);
        // One node's figures begin with its process; a cluster's may be
        // older than this instance.
        let since = (!self.registry.store().keeps_buckets()).then(|| self.telemetry.since_ms());
        for s in &mut series {
            let summary = std::mem::take(&mut s.summary);
            s.summary = crate::metrics::window::to_now(summary, now_ms, since);
        }
        // The others' filling buckets are never in the store: the closed
        // part is what completeness speaks of.
        (series, read.completeness(now.saturating_sub(1), window))
    }

    /// Flushes this instance's closed buckets just after each closes, until
    /// the process ends; prunes rows older than the ring now and then.
    pub async fn run_flushing(self: Arc<Self>, me: Identity) {
        if !self.registry.store().keeps_buckets() {
            return; // an embedded store: this instance's ring is the source
        }
        let mut through: u64 = 0;
        let mut flushes: u64 = 0;
        let mut failing = false;
        loop {
            tokio::time::sleep(match failing {
                true => RETRY_EVERY,
                false => until_flush(now_ms()),
            })
            .await;
            let open = epoch_at(now_ms());
            let flush = Flush {
                instance: me.id.clone(),
                through: open - 1,
                buckets: self.telemetry.closed_between(through, open),
            };
            let store = self.registry.store().clone();
            let prune = flushes.is_multiple_of(PRUNE_EVERY);
            // A store call blocks its thread: off the async workers.
            let written = tokio::task::spawn_blocking(move || {
                store.flush_buckets(&flush)?;
                if prune {
                    store.prune_buckets(open.saturating_sub(RING as u64))?;
                }
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    through = open - 1;
                    flushes += 1;
                    failing = false;
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(
                            "cannot flush this instance's telemetry to the store: {e}; trying again every {RETRY_EVERY:?} while the buckets are kept (15 minutes)"
                        );
                    }
                    failing = true;
                }
                Err(_) => failing = true,
            }
        }
    }
}

/// An instance's report as completeness sees it.
fn member(r: crate::records::InstanceRecord) -> Member {
    let started_ms = crate::units::ms_of_rfc3339(&r.report.started_at).unwrap_or(0);
    Member {
        id: r.report.id,
        started_ms,
        last_seen_ms: r.last_seen_ms,
    }
}

/// How long until [`FLUSH_AFTER`] past the next bucket's close.
fn until_flush(now_ms: u64) -> Duration {
    let bucket_ms = BUCKET_SECS * 1000;
    let after = FLUSH_AFTER.as_millis() as u64;
    let into = now_ms % bucket_ms;
    let wait = match into < after {
        true => after - into,
        false => bucket_ms - into + after,
    };
    Duration::from_millis(wait)
}

/// Whether a window whose last bucket closed at the last boundary before
/// `now_ms` may be judged now: complete, or the grace is over.
pub fn may_judge(c: &Completeness, now_ms: u64) -> bool {
    c.complete || now_ms % (BUCKET_SECS * 1000) >= GRACE.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis;
    use crate::metrics::Telemetry;
    use crate::metrics::cluster::PeerBucket;
    use crate::metrics::window::Bucket;
    use crate::spec::RolloutSpec;

    const T0: u64 = 2_000_000_000 / BUCKET_SECS * BUCKET_SECS;

    /// One request's record: its series and what it adds.
    #[derive(Clone, Copy)]
    struct Req {
        at: u64,
        candidate: bool,
        ms: f64,
        error: bool,
        class: i64,
        label: Option<i64>,
    }

    /// Two minutes of traffic on a stable and a slower candidate.
    fn traffic() -> Vec<Req> {
        (0..2400u64)
            .map(|i| Req {
                at: T0 + i / 20,
                candidate: i % 4 == 0,
                ms: if i % 4 == 0 { 9.0 } else { 3.0 } + (i % 7) as f64,
                error: i % 97 == 0,
                class: (i % 3) as i64,
                label: (i % 5 == 0).then_some((i % 2) as i64),
            })
            .collect()
    }

    fn record(t: &Telemetry, r: &Req) {
        let (version, role) = match r.candidate {
            true => ("2", Role::Candidate),
            false => ("1", Role::Stable),
        };
        t.series("m", version, role).record(r.at, |b| {
            b.requests += 1;
            b.errors += u64::from(r.error);
            b.latency.add(r.ms / 1000.0);
            b.classes.add(r.class, 1);
            if let Some(l) = r.label {
                b.labelled += 1;
                b.correct += u64::from(l == r.class);
            }
        });
    }

    /// Each instance's flushes as the store hands them to `me`.
    fn peers_of(me: usize, instances: &[Telemetry], through: u64) -> Peers {
        let mut peers = Peers::default();
        for (i, t) in instances.iter().enumerate().filter(|(i, _)| *i != me) {
            let id = format!("i{i}");
            for f in t.closed_between(0, through + 1) {
                peers.buckets.push(PeerBucket {
                    instance: id.clone(),
                    version: f.version,
                    role: f.role,
                    bucket: f.bucket,
                });
            }
            peers.marks.insert(id, through);
        }
        peers
    }

    /// The same requests answered by one instance, or spread over three
    /// (round robin, so every bucket is split): the leader's merged
    /// windows give the same summaries, figure for figure, and the same
    /// verdict.
    #[test]
    fn three_instances_merged_judge_as_one_with_the_same_requests() {
        let one = Telemetry::default();
        let three: Vec<Telemetry> = (0..3).map(|_| Telemetry::default()).collect();
        for (i, r) in traffic().iter().enumerate() {
            record(&one, r);
            record(&three[i % 3], r);
        }
        let last = T0 / BUCKET_SECS + 23; // two minutes in, the last closed bucket
        let window = Duration::from_secs(30);
        let peers = peers_of(0, &three, last);
        let spec = RolloutSpec::from_yaml(
            "model: m\nversion: \"2\"\nstrategy: { canary: { steps: [{ weight: 25 }] } }\nanalysis:\n  interval: 30s\n  min_requests: 20\n  checks:\n    - { metric: latency_p99_ms, max_vs_stable: 1.5 }\n    - { metric: error_rate, max: 0.05 }\n    - { metric: accuracy, min: 0.3 }\n",
        )
        .unwrap();
        let settings = analysis::Settings {
            min_requests: 20,
            confidence: 0.95,
        };
        let verdict_of =
            |c: &Summary, s: &Summary| analysis::evaluate(&spec.checks(), c, s, &[], settings);
        let alone = Peers::default();
        let c1 = one.merged_summary("m", "2", Role::Candidate, last, window, &alone);
        let s1 = one.merged_summary("m", "1", Role::Stable, last, window, &alone);
        let c3 = three[0].merged_summary("m", "2", Role::Candidate, last, window, &peers);
        let s3 = three[0].merged_summary("m", "1", Role::Stable, last, window, &peers);
        assert!(c1.requests > 100 && c1.labelled > 0, "{c1:?}");
        assert_eq!(c1, c3);
        assert_eq!(s1, s3);
        let (v1, v3) = (verdict_of(&c1, &s1), verdict_of(&c3, &s3));
        assert_eq!(v1, v3);
        assert_eq!(v1.outcome, analysis::Outcome::Fail, "{v1:?}");
        // The leader alone saw a third: its own figures would not do.
        let own = three[0].merged_summary("m", "2", Role::Candidate, last, window, &alone);
        assert!(own.requests * 2 < c1.requests, "{own:?}");
        // Every series of the model, as the metrics endpoint lists them.
        let listed = three[0].merged_summaries("m", last, window, &peers);
        let totals: Vec<u64> = listed.iter().map(|s| s.summary.requests).collect();
        assert_eq!(totals, vec![s1.requests, c1.requests]);
    }

    /// Shadow comparisons counted tick after tick, as a leader counts them
    /// (whichever instance leads, going on from the per-instance epochs the
    /// stored counts went through), while one instance flushes late (its
    /// mark lags, as when it is frozen, then catches up): every comparison
    /// of every instance is counted once, the late ones included.
    #[test]
    fn shadow_comparisons_counted_tick_by_tick_add_up_over_three_instances() {
        let three: Vec<Telemetry> = (0..3).map(|_| Telemetry::default()).collect();
        let first = T0 / BUCKET_SECS;
        let mut all = Bucket::default();
        for i in 0..600u64 {
            let at = T0 + i / 5; // 120 s: 24 buckets
            let comparison = |b: &mut Bucket| match i % 10 {
                0 => b.disagree += 1,
                1 => b.compare_errors += 1,
                2 => b.dropped += 1,
                _ => b.agree += 1,
            };
            three[(i % 3) as usize]
                .series("m", "2", Role::Shadow)
                .record(at, comparison);
            comparison(&mut all);
        }
        let last = first + 23;
        // Each tick: who leads, the last closed bucket, and how far
        // instance 2 has flushed (frozen from first + 6 to first + 16).
        let ticks = [
            (0, first + 4, first + 4),
            (0, first + 9, first + 6),
            (1, first + 15, first + 6),
            (1, first + 18, first + 18),
            (0, last, last),
        ];
        let mut counted = std::collections::BTreeMap::new();
        let mut total = Bucket::default();
        for (leader, now_last, late_mark) in ticks {
            let mut peers = peers_of(leader, &three, now_last);
            if leader != 2 {
                peers.marks.insert("i2".into(), late_mark);
                peers
                    .buckets
                    .retain(|p| p.instance != "i2" || p.bucket.epoch <= late_mark);
            }
            let me = format!("i{leader}");
            let (sum, through) = three[leader].count_on(
                ("m", "2", Role::Shadow),
                (&me, now_last),
                first - 1,
                &counted,
                &peers,
            );
            total.merge(&sum);
            for (id, e) in through {
                counted.insert(id, e);
            }
        }
        assert_eq!(
            (
                total.agree,
                total.disagree,
                total.compare_errors,
                total.dropped
            ),
            (all.agree, all.disagree, all.compare_errors, all.dropped)
        );
        assert_eq!(total.agree + total.disagree, 480);
        assert_eq!(counted["i2"], last);
        // Nothing of another role; nothing more once every bucket counted.
        let peers = peers_of(0, &three, last);
        let (none, _) = three[0].count_on(
            ("m", "2", Role::Candidate),
            ("i0", last),
            first - 1,
            &Default::default(),
            &peers,
        );
        assert_eq!(none.agree + none.disagree, 0);
        let (again, through) = three[0].count_on(
            ("m", "2", Role::Shadow),
            ("i0", last),
            first - 1,
            &counted,
            &peers,
        );
        assert_eq!((again.agree, again.disagree), (0, 0));
        assert!(through.is_empty(), "{through:?}");
    }

    #[test]
    fn flushes_are_timed_just_after_each_bucket_closes() {
        let b = BUCKET_SECS * 1000;
        assert_eq!(until_flush(10 * b), FLUSH_AFTER);
        assert_eq!(until_flush(10 * b + 20), Duration::from_millis(30));
        assert_eq!(until_flush(10 * b + 50), Duration::from_millis(b));
        assert_eq!(until_flush(10 * b + 4_000), Duration::from_millis(1_050));
    }

    #[test]
    fn an_incomplete_window_waits_for_the_grace_then_is_judged() {
        let b = BUCKET_SECS * 1000;
        let mut c = Completeness::alone();
        assert!(may_judge(&c, 10 * b + 60), "alone: at once, as on one node");
        c.complete = false;
        assert!(!may_judge(&c, 10 * b + 60));
        assert!(!may_judge(&c, 10 * b + 1_400));
        assert!(may_judge(&c, 10 * b + 1_500));
    }
}
