//! Leadership: which instance drives the rollouts, as a lease in the
//! store, and what this instance believes about its own lease.
//!
//! The lease (a row on PostgreSQL, `postgres/lease.rs`) names its holder,
//! a **term** that grows by one at every change of holder, when it was
//! taken and when it expires — computed with the database's clock, so the
//! instances' clocks do not matter. The holder renews it every
//! [`LeaseSettings::renew`]; a free or expired lease is taken by one
//! conditional update (term + 1).
//!
//! This module is the pure part: [`Campaign`] turns the answers to renewals
//! into "leading in term N, or not", on the instance's monotonic clock
//! (passed in). A lease counts from when its renewal was **sent**, never
//! from when the answer came: the database computed its expiry later than
//! that, so the holder always stops believing in its lease before the
//! database lets another instance take it. A holder that cannot renew (the
//! store unreachable, an answer too slow) therefore stops acting as leader
//! within its lease, without hearing from anyone.
//!
//! Every rollout write carries a [`Fence`]; the store refuses the leader's
//! write when the lease's term is newer ([`super::StoreError::Fenced`]), in
//! the same transaction, and the instance drops to follower
//! ([`Campaign::fenced`]).

use std::time::{Duration, Instant};

/// A leader's term: grows by one at every change of the lease's holder.
pub type Term = i64;

/// The longest lease `--leader-lease` accepts: rollouts stand still for as
/// long when the leader dies without handing it on.
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// The shortest renewal period `--leader-renew` accepts.
pub const MIN_RENEW: Duration = Duration::from_millis(100);

/// Whose rollout write it is, for fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The leader's write in this term: refused when the lease has a newer
    /// term (another instance leads since), so a leader that was paused
    /// never advances a rollout a newer leader owns.
    Term(Term),
    /// A person's command taken by an instance that does not lead: ordered
    /// with every other write by the store's write lock, not fenced.
    Unfenced,
}

impl Fence {
    /// `Term(t)` while this instance leads in term `t`, else `Unfenced`.
    pub fn of(leading: Option<Term>) -> Fence {
        leading.map_or(Fence::Unfenced, Fence::Term)
    }

    /// Whether the store refuses this write when the lease is at `lease_term`.
    pub fn refused_at(self, lease_term: Term) -> bool {
        matches!(self, Fence::Term(mine) if lease_term > mine)
    }
}

/// How long a lease lasts and how often its holder renews it
/// (`--leader-lease`, `--leader-renew`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease lasts after its renewal was sent: a dead leader is
    /// replaced within about `lease + renew`.
    pub lease: Duration,
    /// How often the holder renews it, and followers try to take it.
    pub renew: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            lease: Duration::from_secs(3),
            renew: Duration::from_secs(1),
        }
    }
}

impl LeaseSettings {
    /// The settings, or what is wrong with them: a renewal must fit at
    /// least twice in a lease (one lost renewal must not cost the lease).
    pub fn validate(self) -> Result<LeaseSettings, String> {
        if self.renew < MIN_RENEW {
            return Err(format!(
                "--leader-renew ({:?}) must be at least {MIN_RENEW:?}: a renewal is a round trip to PostgreSQL (e.g. 1s)",
                self.renew
            ));
        }
        if self.lease > MAX_LEASE {
            return Err(format!(
                "--leader-lease ({:?}) must be at most {MAX_LEASE:?}: it is how long rollouts stand still when the leader dies (e.g. 3s)",
                self.lease
            ));
        }
        if self.lease < self.renew * 2 {
            return Err(format!(
                "--leader-lease ({:?}) must be at least twice --leader-renew ({:?}), so that one slow renewal does not cost the lease; e.g. --leader-lease 3s --leader-renew 1s",
                self.lease, self.renew
            ));
        }
        Ok(self)
    }
}

/// What the store's lease row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The instance that holds (or last held) the lease.
    pub instance: String,
    pub term: Term,
    /// When this holder took it (RFC 3339, the database's clock).
    pub since: String,
    /// Whether the lease has not expired (the database's clock).
    pub valid: bool,
}

/// A change of this instance's role, to log once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It leads from now on, in this term.
    Gained(Term),
    /// It no longer leads (it led in this term).
    Lost(Term),
}

/// This instance's belief about its own lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    term: Term,
    /// When the lease ends on this instance's monotonic clock: the last
    /// renewal's sending time plus the lease.
    until: Instant,
}

/// What this instance knows of its lease (see the module doc); time is
/// passed in.
#[derive(Debug, Clone)]
pub struct Campaign {
    lease: Duration,
    held: Option<Held>,
    /// The term this instance last told the log it leads in (None: it told
    /// that it follows), so each change is said once.
    said: Option<Term>,
    /// The newest term whose refused write was said, so a refusal is said
    /// once per term.
    refused: Option<Term>,
    /// This instance is stopping: it neither leads nor renews any more.
    resigned: bool,
}

impl Campaign {
    pub fn new(settings: LeaseSettings) -> Campaign {
        Campaign {
            lease: settings.lease,
            held: None,
            said: None,
            refused: None,
            resigned: false,
        }
    }

    /// Stops leading and campaigning (a graceful stop): returns the term
    /// that was held at `now`, for the store to end the lease early.
    pub fn resign(&mut self, now: Instant) -> Option<Term> {
        let held = self.leading(now);
        self.held = None;
        self.resigned = true;
        held
    }

    /// Whether [`Campaign::resign`] was called: the campaign ends.
    pub fn resigned(&self) -> bool {
        self.resigned
    }

    /// The term this instance leads in at `now`, if any.
    pub fn leading(&self, now: Instant) -> Option<Term> {
        self.held.filter(|h| now < h.until).map(|h| h.term)
    }

    /// The term to present when renewing at `now`: the one held, so the
    /// store keeps it. A lease this instance stopped believing in is not
    /// presented: taking the lease again then starts a new term, and
    /// nothing written in the old one is trusted.
    pub fn renewing(&self, now: Instant) -> Option<Term> {
        self.leading(now)
    }

    /// The store answered a renewal sent at `sent`: `Some(term)` when this
    /// instance holds the lease in `term`, `None` when another does.
    pub fn answered(&mut self, sent: Instant, held: Option<Term>) {
        if self.resigned {
            return; // a renewal sent before the stop: not believed
        }
        self.held = held.map(|term| Held {
            term,
            until: sent + self.lease,
        });
    }

    /// The store refused a write of `term`: another instance leads since.
    /// This instance follows at once (no waiting for its lease to run
    /// out). True the first time a write of `term` is refused: the caller
    /// says so, once (and the end of that term is not said again).
    pub fn fenced(&mut self, term: Term) -> bool {
        if self.held.is_some_and(|h| h.term <= term) {
            self.held = None;
        }
        if self.said.is_some_and(|t| t <= term) {
            self.said = None;
        }
        let first = self.refused.is_none_or(|t| t < term);
        if first {
            self.refused = Some(term);
        }
        first
    }

    /// The change of role at `now` not yet said, if any (each is said
    /// once).
    pub fn change(&mut self, now: Instant) -> Option<Change> {
        let now_leading = self.leading(now);
        if now_leading == self.said {
            return None;
        }
        let before = std::mem::replace(&mut self.said, now_leading);
        Some(match (before, now_leading) {
            (_, Some(term)) => Change::Gained(term),
            (Some(term), None) => Change::Lost(term),
            (None, None) => unreachable!("equal, returned above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn campaign() -> (Campaign, Instant) {
        (Campaign::new(LeaseSettings::default()), Instant::now())
    }

    #[test]
    fn a_lease_counts_from_when_its_renewal_was_sent() {
        let (mut c, t0) = campaign();
        assert_eq!(c.leading(t0), None);
        // Sent at t0, answered 2 s later: it holds until t0 + 3 s, not t0 + 5 s.
        c.answered(t0, Some(7));
        assert_eq!(c.leading(t0 + 2 * S), Some(7));
        assert_eq!(c.leading(t0 + 3 * S - Duration::from_millis(1)), Some(7));
        assert_eq!(c.leading(t0 + 3 * S), None, "over at sent + lease");
    }

    #[test]
    fn a_leader_that_cannot_renew_stops_leading_within_its_lease() {
        let (mut c, t0) = campaign();
        c.answered(t0, Some(1));
        c.answered(t0 + S, Some(1));
        // Every renewal from t0 + 2 s fails (the store unreachable): no
        // answer at all, the belief runs out on its own.
        assert_eq!(c.leading(t0 + 3 * S), Some(1));
        assert_eq!(c.leading(t0 + 4 * S), None);
        assert_eq!(c.renewing(t0 + 4 * S), None, "not presented again");
    }

    #[test]
    fn an_answer_that_another_holds_the_lease_ends_leadership_at_once() {
        let (mut c, t0) = campaign();
        c.answered(t0, Some(4));
        c.answered(t0 + S, None);
        assert_eq!(c.leading(t0 + S), None);
    }

    #[test]
    fn a_refused_write_drops_to_follower_unless_the_term_is_already_newer() {
        let (mut c, t0) = campaign();
        c.answered(t0, Some(5));
        assert_eq!(c.change(t0), Some(Change::Gained(5)));
        assert!(c.fenced(4), "a late write of an older term, said");
        assert_eq!(c.leading(t0), Some(5), "a refusal of an older term");
        assert!(c.fenced(5));
        assert_eq!(c.leading(t0), None);
        assert_eq!(c.change(t0), None, "said by whoever saw the refusal");
        assert!(!c.fenced(5), "said once");
        assert!(!c.fenced(4), "nor an older one after it");
        // The lease already lost (the renewal's answer came first): the
        // refusal is still said.
        let (mut c, t0) = campaign();
        c.answered(t0, Some(7));
        c.answered(t0 + S, None);
        assert!(c.fenced(7));
    }

    #[test]
    fn each_change_of_role_is_said_once() {
        let (mut c, t0) = campaign();
        assert_eq!(c.change(t0), None, "a follower from the start");
        c.answered(t0, Some(2));
        assert_eq!(c.change(t0), Some(Change::Gained(2)));
        assert_eq!(c.change(t0 + S), None);
        assert_eq!(c.change(t0 + 4 * S), Some(Change::Lost(2)));
        assert_eq!(c.change(t0 + 5 * S), None);
        c.answered(t0 + 5 * S, Some(3));
        assert_eq!(c.change(t0 + 5 * S), Some(Change::Gained(3)));
        // Lost and taken again in a new term between two looks: said as
        // the new term.
        c.answered(t0 + 9 * S, Some(4));
        assert_eq!(c.change(t0 + 9 * S), Some(Change::Gained(4)));
    }

    #[test]
    fn fencing_refuses_only_the_leader_s_write_of_an_older_term() {
        assert!(Fence::Term(3).refused_at(4));
        assert!(!Fence::Term(3).refused_at(3));
        assert!(!Fence::Term(3).refused_at(2));
        assert!(!Fence::Unfenced.refused_at(99));
        assert_eq!(Fence::of(Some(2)), Fence::Term(2));
        assert_eq!(Fence::of(None), Fence::Unfenced);
    }

    #[test]
    fn a_renewal_must_fit_twice_in_a_lease() {
        assert!(LeaseSettings::default().validate().is_ok());
        let e = LeaseSettings {
            lease: Duration::from_secs(3),
            renew: Duration::from_secs(2),
        }
        .validate()
        .unwrap_err();
        assert!(
            e.contains("--leader-lease") && e.contains("--leader-renew"),
            "{e}"
        );
        assert!(
            LeaseSettings {
                lease: S,
                renew: Duration::ZERO
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_resigned_campaign_leads_no_more_whatever_a_late_answer_says() {
        let t0 = Instant::now();
        let mut c = Campaign::new(LeaseSettings::default());
        c.answered(t0, Some(4));
        assert_eq!(c.resign(t0 + S), Some(4), "the term held is handed back");
        assert!(c.resigned());
        assert_eq!(c.leading(t0 + S), None);
        c.answered(t0 + S, Some(4));
        assert_eq!(c.leading(t0 + S), None, "a renewal sent before the stop");
    }

    #[test]
    fn a_lease_longer_than_five_minutes_or_a_renewal_under_100ms_is_refused() {
        let settings = |lease, renew| LeaseSettings { lease, renew }.validate();
        let e = settings(Duration::from_secs(3_600_000), S).unwrap_err();
        assert!(
            e.contains("--leader-lease") && e.contains("at most 300s"),
            "{e}"
        );
        assert!(settings(MAX_LEASE, S).is_ok());
        let e = settings(Duration::from_millis(1), Duration::from_micros(500)).unwrap_err();
        assert!(e.contains("--leader-renew") && e.contains("100ms"), "{e}");
        assert!(settings(Duration::from_millis(200), MIN_RENEW).is_ok());
    }
}
