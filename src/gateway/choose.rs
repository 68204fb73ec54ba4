//! Choosing the version for a request, as a pure function of the policy, the
//! request's facts and a random draw (passed in, so tests are exact):
//!
//! 1. `/versions/{v}` in the path → that version (handled by the caller);
//! 2. `x-ferry-env: staging` → the staging version;
//! 3. cohort rules decide whether the request is eligible for the candidate;
//! 4. eligible requests go to the candidate by weight: with a sticky key,
//!    by the key's bucket (0–9,999), else by the random draw;
//! 5. everything else goes to the stable version.

use super::policy::{CandidateSplit, RoutePolicy};
use crate::metrics::Role;

/// Buckets a sticky key or a random draw falls into (0.01 % each).
pub const BUCKETS: u32 = 10_000;

/// Why no version could be chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum NoVersion {
    /// The request asked for staging but the model has none.
    NoStaging,
}

/// The stable, deterministic bucket of a sticky key: FNV-1a, then a
/// splitmix64 finaliser to spread similar keys. Never changes between
/// releases: users must keep their version across restarts and upgrades.
pub fn sticky_bucket(key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(BUCKETS)) as u32
}

/// Whether the request is in the candidate's cohort (every rule matches).
fn eligible<'h>(split: &CandidateSplit, header: &impl Fn(&str) -> Option<&'h str>) -> bool {
    split
        .matches
        .iter()
        .all(|rule| header(&rule.header).is_some_and(|v| rule.values.iter().any(|x| x == v)))
}

/// Chooses the version (and its role) for a request that did not name one.
/// `random_bucket` is uniform in `0..BUCKETS`.
pub fn choose<'p, 'h>(
    policy: &'p RoutePolicy,
    staging: bool,
    header: impl Fn(&str) -> Option<&'h str>,
    random_bucket: u32,
) -> Result<(&'p str, Role), NoVersion> {
    if staging {
        return policy
            .staging
            .as_deref()
            .map(|v| (v, Role::Staging))
            .ok_or(NoVersion::NoStaging);
    }
    if let Some(split) = &policy.candidate
        && eligible(split, &header)
    {
        let bucket = split
            .sticky_header
            .as_deref()
            .and_then(&header)
            .map_or(random_bucket, sticky_bucket);
        if bucket < split.basis_points() {
            return Ok((&split.version, Role::Candidate));
        }
    }
    Ok((&policy.stable, Role::Stable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::policy::MatchRule;
    use proptest::prelude::*;

    fn policy(weight: f64, sticky: bool, matches: Vec<MatchRule>) -> RoutePolicy {
        let mut p = RoutePolicy::stable_only("1");
        p.candidate = Some(CandidateSplit {
            version: "2".into(),
            weight,
            sticky_header: sticky.then(|| "x-user-id".to_string()),
            matches,
        });
        p.staging = Some("3".into());
        p
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn staging_header_wins_and_a_missing_staging_is_an_error() {
        let p = policy(100.0, false, vec![]);
        assert_eq!(choose(&p, true, no_headers, 0), Ok(("3", Role::Staging)));
        let p = RoutePolicy::stable_only("1");
        assert_eq!(choose(&p, true, no_headers, 0), Err(NoVersion::NoStaging));
    }

    #[test]
    fn cohort_rules_restrict_the_candidate() {
        let rule = MatchRule {
            header: "x-region".into(),
            values: vec!["eu-west".into(), "eu-north".into()],
        };
        let p = policy(100.0, false, vec![rule]);
        let eu = |h: &str| (h == "x-region").then_some("eu-north");
        let us = |h: &str| (h == "x-region").then_some("us-east");
        assert_eq!(choose(&p, false, eu, 9_999).unwrap().1, Role::Candidate);
        assert_eq!(choose(&p, false, us, 0).unwrap().1, Role::Stable);
        assert_eq!(choose(&p, false, no_headers, 0).unwrap().1, Role::Stable);
    }

    #[test]
    fn sticky_buckets_are_stable_across_releases() {
        // Pinned values: changing the hash would move users between versions.
        assert_eq!(sticky_bucket("user-1"), sticky_bucket("user-1"));
        let pinned: Vec<u32> = ["user-1", "user-2", "alice"]
            .iter()
            .map(|k| sticky_bucket(k))
            .collect();
        assert_eq!(pinned, vec![PINNED[0], PINNED[1], PINNED[2]]);
    }

    const PINNED: [u32; 3] = [7624, 8795, 572];

    proptest! {
        #[test]
        fn raising_the_weight_never_moves_a_sticky_user_back(key in "[a-z0-9-]{1,24}", w1 in 0u32..=10_000, w2 in 0u32..=10_000) {
            let (lo, hi) = if w1 <= w2 { (w1, w2) } else { (w2, w1) };
            let at = |bp: u32| {
                let p = policy(f64::from(bp) / 100.0, true, vec![]);
                choose(&p, false, |h| (h == "x-user-id").then_some(key.as_str()), 0).unwrap().1
            };
            if at(lo) == Role::Candidate {
                prop_assert_eq!(at(hi), Role::Candidate);
            }
        }

        #[test]
        fn the_same_key_always_gets_the_same_version(key in ".{0,40}", w in 0u32..=10_000, r1 in 0u32..BUCKETS, r2 in 0u32..BUCKETS) {
            let p = policy(f64::from(w) / 100.0, true, vec![]);
            let h = |name: &str| (name == "x-user-id").then_some(key.as_str());
            prop_assert_eq!(choose(&p, false, h, r1), choose(&p, false, h, r2));
        }

        #[test]
        fn random_draws_converge_to_the_weight(w in 0u32..=10_000, seed in any::<u64>()) {
            let p = policy(f64::from(w) / 100.0, false, vec![]);
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = 20_000;
            let hits = (0..n).filter(|_| choose(&p, false, no_headers, rng.u32(0..BUCKETS)).unwrap().1 == Role::Candidate).count();
            let share = hits as f64 / n as f64;
            let want = f64::from(w) / 10_000.0;
            // 5 standard deviations of a binomial proportion, plus a hair.
            let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt() + 1e-9;
            prop_assert!((share - want).abs() <= tol, "share {share} want {want}");
        }

        #[test]
        fn sticky_keys_spread_evenly(w in 1u32..10_000) {
            let n = 20_000;
            let hits = (0..n).filter(|i| sticky_bucket(&format!("user-{i}")) < w).count();
            let share = hits as f64 / n as f64;
            let want = f64::from(w) / 10_000.0;
            let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt() + 1e-9;
            prop_assert!((share - want).abs() <= tol, "share {share} want {want}");
        }
    }
}
