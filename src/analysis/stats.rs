//! The significance tests analysis uses: a one-sided two-proportion z-test
//! for rates, a one-sided Mann-Whitney U test for latency samples given as
//! histogram buckets, and Mood's median test for the A/B report's p50
//! difference. Pure arithmetic.

/// The standard normal CDF (Abramowitz & Stegun 7.1.26 erf, |error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    let erf = if x >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

/// p-value of "the candidate's rate exceeds `k` × stable's rate + `d`"
/// (one-sided): small when the candidate is worse beyond the bound with
/// significance. `1.0` when there is no variance to judge by.
pub fn proportion_exceeds(x_c: u64, n_c: u64, x_s: u64, n_s: u64, k: f64, d: f64) -> f64 {
    if n_c == 0 || n_s == 0 {
        return 1.0;
    }
    let (p_c, p_s) = (x_c as f64 / n_c as f64, x_s as f64 / n_s as f64);
    let var = p_c * (1.0 - p_c) / n_c as f64 + k * k * p_s * (1.0 - p_s) / n_s as f64;
    let diff = p_c - k * p_s - d;
    if var <= 0.0 {
        return if diff > 0.0 { 0.0 } else { 1.0 };
    }
    1.0 - normal_cdf(diff / var.sqrt())
}

/// p-value of "the candidate's rate is below `k` × stable's rate + `d`"
/// (one-sided; for metrics where lower is worse, such as accuracy).
pub fn proportion_falls_short(x_c: u64, n_c: u64, x_s: u64, n_s: u64, k: f64, d: f64) -> f64 {
    if n_c == 0 || n_s == 0 {
        return 1.0;
    }
    let (p_c, p_s) = (x_c as f64 / n_c as f64, x_s as f64 / n_s as f64);
    let var = p_c * (1.0 - p_c) / n_c as f64 + k * k * p_s * (1.0 - p_s) / n_s as f64;
    let diff = k * p_s + d - p_c;
    if var <= 0.0 {
        return if diff > 0.0 { 0.0 } else { 1.0 };
    }
    1.0 - normal_cdf(diff / var.sqrt())
}

/// Two-sided p-value of "the two rates differ" (pooled two-proportion z-test).
pub fn proportions_differ(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<f64> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1 + n2) as f64;
    let var = pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64);
    if var <= 0.0 {
        return Some(1.0);
    }
    let z = (p1 - p2).abs() / var.sqrt();
    Some((2.0 * (1.0 - normal_cdf(z))).min(1.0))
}

/// One-sided Mann-Whitney U test: p-value of "candidate samples tend to be
/// larger than stable samples". Samples come as (value, count) ascending;
/// ties get mid-ranks and the tie-corrected variance.
pub fn mann_whitney_greater(candidate: &[(f64, u32)], stable: &[(f64, u32)]) -> f64 {
    let n1: f64 = candidate.iter().map(|(_, c)| f64::from(*c)).sum();
    let n2: f64 = stable.iter().map(|(_, c)| f64::from(*c)).sum();
    if n1 == 0.0 || n2 == 0.0 {
        return 1.0;
    }
    // Merge both sorted lists into groups of equal value.
    let mut groups: Vec<(f64, f64, f64)> = Vec::new(); // (value, from candidate, from stable)
    let (mut i, mut j) = (0, 0);
    while i < candidate.len() || j < stable.len() {
        let take_c = j >= stable.len() || (i < candidate.len() && candidate[i].0 <= stable[j].0);
        let (v, c, s) = if take_c {
            i += 1;
            (candidate[i - 1].0, f64::from(candidate[i - 1].1), 0.0)
        } else {
            j += 1;
            (stable[j - 1].0, 0.0, f64::from(stable[j - 1].1))
        };
        match groups.last_mut() {
            Some(g) if g.0 == v => {
                g.1 += c;
                g.2 += s;
            }
            _ => groups.push((v, c, s)),
        }
    }
    let n = n1 + n2;
    let mut rank_sum_c = 0.0;
    let mut seen = 0.0;
    let mut tie_term = 0.0;
    for (_, c, s) in &groups {
        let t = c + s;
        let mid_rank = seen + (t + 1.0) / 2.0;
        rank_sum_c += c * mid_rank;
        tie_term += t * t * t - t;
        seen += t;
    }
    let u = rank_sum_c - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    // Continuity correction.
    let z = (u - mean - 0.5) / var.sqrt();
    1.0 - normal_cdf(z)
}

/// Two-sided p-value of "the two medians differ" (Mood's median test):
/// whether the share of each arm above the pooled median differs, by the
/// pooled two-proportion z-test. Samples come as (value, count) ascending;
/// samples equal to the pooled median count as not above it, so ties never
/// split. `None` when an arm is empty.
pub fn medians_differ(a: &[(f64, u32)], b: &[(f64, u32)]) -> Option<f64> {
    let total = |s: &[(f64, u32)]| s.iter().map(|(_, c)| u64::from(*c)).sum::<u64>();
    let (n_a, n_b) = (total(a), total(b));
    if n_a == 0 || n_b == 0 {
        return None;
    }
    let mut pooled: Vec<(f64, u32)> = a.iter().chain(b).copied().collect();
    pooled.sort_by(|x, y| x.0.total_cmp(&y.0));
    let middle = (n_a + n_b - 1) / 2; // the lower median's rank, from 0
    let mut seen = 0u64;
    let median = pooled
        .iter()
        .find(|(_, c)| {
            seen += u64::from(*c);
            seen > middle
        })
        .map(|(v, _)| *v)?;
    let above = |s: &[(f64, u32)]| {
        s.iter()
            .filter(|(v, _)| *v > median)
            .map(|(_, c)| u64::from(*c))
            .sum::<u64>()
    };
    proportions_differ(above(a), n_a, above(b), n_b)
}

/// Population stability index between two class distributions; counts are
/// smoothed by half a count so an empty class does not make it infinite.
pub fn population_stability_index(candidate: &[(i64, u64)], stable: &[(i64, u64)]) -> Option<f64> {
    let total_c: u64 = candidate.iter().map(|(_, n)| n).sum();
    let total_s: u64 = stable.iter().map(|(_, n)| n).sum();
    if total_c == 0 || total_s == 0 {
        return None;
    }
    let mut classes: Vec<i64> = candidate.iter().chain(stable).map(|(c, _)| *c).collect();
    classes.sort_unstable();
    classes.dedup();
    let k = classes.len() as f64;
    let share = |dist: &[(i64, u64)], total: u64, class: i64| {
        let n = dist
            .iter()
            .find(|(c, _)| *c == class)
            .map_or(0, |(_, n)| *n);
        (n as f64 + 0.5) / (total as f64 + 0.5 * k)
    };
    Some(
        classes
            .iter()
            .map(|c| {
                let (a, b) = (share(candidate, total_c, *c), share(stable, total_s, *c));
                (a - b) * (a / b).ln()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.644_854) - 0.95).abs() < 1e-6);
        assert!((normal_cdf(-1.959_964) - 0.025).abs() < 1e-6);
    }

    #[test]
    fn proportions_detect_a_real_difference_but_not_noise() {
        // 4.1 % vs 1 % with hundreds of requests each: significant.
        assert!(proportion_exceeds(41, 1000, 10, 1000, 1.0, 0.0) < 0.001);
        // 2 of 100 vs 1 of 100: noise.
        assert!(proportion_exceeds(2, 100, 1, 100, 1.0, 0.0) > 0.05);
        // Within the allowed 1.5x: no failure.
        assert!(proportion_exceeds(12, 1000, 10, 1000, 1.5, 0.0) > 0.5);
        // Accuracy 0.90 vs 0.96 on 500 labels: short by more than 0.01.
        assert!(proportion_falls_short(450, 500, 480, 500, 1.0, -0.01) < 0.01);
        assert_eq!(proportion_exceeds(0, 0, 1, 10, 1.0, 0.0), 1.0);
    }

    #[test]
    fn two_sided_proportions() {
        assert_eq!(proportions_differ(0, 12, 0, 7), Some(1.0));
        assert!(proportions_differ(96, 100, 80, 100).unwrap() < 0.01);
        assert_eq!(proportions_differ(1, 0, 1, 1), None);
    }

    #[test]
    fn mann_whitney_sees_a_slower_candidate() {
        let fast: Vec<(f64, u32)> = (1..=20).map(|i| (f64::from(i), 5)).collect();
        let slow: Vec<(f64, u32)> = (11..=30).map(|i| (f64::from(i), 5)).collect();
        assert!(mann_whitney_greater(&slow, &fast) < 0.001);
        assert!(mann_whitney_greater(&fast, &slow) > 0.999);
        assert!((mann_whitney_greater(&fast, &fast) - 0.5).abs() < 0.05);
    }

    #[test]
    fn the_median_test_sees_a_shifted_median_but_not_a_shifted_tail() {
        let base: Vec<(f64, u32)> = (1..=20).map(|i| (f64::from(i), 5)).collect();
        let shifted: Vec<(f64, u32)> = (6..=25).map(|i| (f64::from(i), 5)).collect();
        assert!(medians_differ(&shifted, &base).unwrap() < 0.01);
        assert!(medians_differ(&base, &base).unwrap() > 0.99);
        // Same lower half, a slower upper half: the median does not move.
        let slow_tail: Vec<(f64, u32)> = (1..=10)
            .map(|i| (f64::from(i), 5))
            .chain((31..=40).map(|i| (f64::from(i), 5)))
            .collect();
        assert!(medians_differ(&slow_tail, &base).unwrap() > 0.5);
        assert_eq!(medians_differ(&base, &[]), None);
    }

    #[test]
    fn psi_is_zero_for_equal_distributions_and_grows_with_shift() {
        let a = [(0, 500), (1, 500)];
        let b = [(0, 100), (1, 900)];
        assert!(population_stability_index(&a, &a).unwrap() < 1e-9);
        assert!(population_stability_index(&a, &b).unwrap() > 0.2);
        assert_eq!(population_stability_index(&a, &[]), None);
    }
}
