//! A mergeable latency sketch: log-spaced buckets (each 2 % wide, so any
//! quantile is within about 1 % of the true value), stored sparsely — a
//! window of real traffic touches a few dozen buckets, not all of them.

use serde::{Deserialize, Serialize};

/// Bucket growth factor: bucket `i` holds latencies in (γ^(i-1), γ^i] µs.
const GAMMA: f64 = 1.02;
/// Bucket of latencies at or below 1 µs; the top bucket holds ≥ ~100 s.
const MAX_INDEX: u16 = 1_000;

fn index(seconds: f64) -> u16 {
    let us = (seconds * 1e6).max(1.0);
    let i = (us.ln() / GAMMA.ln()).ceil();
    if i.is_nan() {
        0
    } else {
        i.clamp(0.0, f64::from(MAX_INDEX)) as u16
    }
}

/// The representative value of a bucket, in seconds (relative midpoint).
fn value(i: u16) -> f64 {
    2.0 * GAMMA.powi(i32::from(i)) / (GAMMA + 1.0) / 1e6
}

/// Latency counts by log bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    /// (bucket index, count), sorted by index.
    buckets: Vec<(u16, u32)>,
    count: u64,
}

impl Sketch {
    pub fn add(&mut self, seconds: f64) {
        let i = index(seconds);
        match self.buckets.binary_search_by_key(&i, |(b, _)| *b) {
            Ok(pos) => self.buckets[pos].1 += 1,
            Err(pos) => self.buckets.insert(pos, (i, 1)),
        }
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Sketch) {
        for (i, c) in &other.buckets {
            match self.buckets.binary_search_by_key(i, |(b, _)| *b) {
                Ok(pos) => self.buckets[pos].1 += c,
                Err(pos) => self.buckets.insert(pos, (*i, *c)),
            }
        }
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0–1) in seconds, or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).round() as u64;
        let mut seen = 0u64;
        for (i, c) in &self.buckets {
            seen += u64::from(*c);
            if seen > rank {
                return Some(value(*i));
            }
        }
        self.buckets.last().map(|(i, _)| value(*i))
    }

    /// (representative seconds, count) per bucket, ascending: the samples a
    /// rank test needs.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u32)> + '_ {
        self.buckets.iter().map(|(i, c)| (value(*i), *c))
    }

    /// Adds `c` latencies to bucket `i` (a packed bucket read back).
    pub fn add_count(&mut self, i: u16, c: u32) {
        match self.buckets.last_mut() {
            // Read back in order: appended, no search.
            Some((last, _)) if *last < i => self.buckets.push((i, c)),
            Some((last, n)) if *last == i => *n += c,
            None => self.buckets.push((i, c)),
            Some(_) => match self.buckets.binary_search_by_key(&i, |(b, _)| *b) {
                Ok(pos) => self.buckets[pos].1 += c,
                Err(pos) => self.buckets.insert(pos, (i, c)),
            },
        }
        self.count += u64::from(c);
    }

    /// (bucket index, count), by index: what a packed bucket keeps.
    pub fn entries(&self) -> &[(u16, u32)] {
        &self.buckets
    }

    /// Bytes of memory the sketch holds (for the size budget).
    pub fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * size_of::<(u16, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut s = Sketch::default();
        let samples: Vec<f64> = (1..=10_000).map(|i| f64::from(i) * 1e-5).collect(); // 10 µs .. 100 ms
        for x in &samples {
            s.add(*x);
        }
        for q in [0.5, 0.95, 0.99] {
            let exact = samples[((samples.len() - 1) as f64 * q).round() as usize];
            let got = s.quantile(q).unwrap();
            assert!(
                (got - exact).abs() / exact < 0.011,
                "q{q}: {got} vs {exact}"
            );
        }
        assert!(s.heap_bytes() < 40_000);
    }

    #[test]
    fn merging_equals_adding_everything_to_one() {
        let (mut a, mut b, mut all) = (Sketch::default(), Sketch::default(), Sketch::default());
        for i in 0..500 {
            let x = 1e-4 * f64::from(i % 37 + 1);
            if i % 2 == 0 {
                a.add(x)
            } else {
                b.add(x)
            }
            all.add(x);
        }
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(Sketch::default().quantile(0.5), None);
    }
}
