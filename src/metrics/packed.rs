//! A closed 5-second bucket in a few bytes: once a bucket closes it is read
//! (windows, flushes) far more than written (a delayed label's count), so a
//! series keeps it as variable-length integers — its counters, its latency
//! sketch's (index step, count) pairs and its classes — a tenth or less of
//! the open form's size. Merging reads the bytes directly; nothing is
//! allocated to read a window. Only this module knows the layout.

use super::bucket::Bucket;

/// A closed bucket: its epoch, and its figures packed.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub epoch: u64,
    bytes: Box<[u8]>,
}

impl Packed {
    pub fn pack(b: &Bucket) -> Packed {
        let mut out = Vec::with_capacity(32);
        for n in counters(b) {
            put(&mut out, n);
        }
        let entries = b.latency.entries();
        put(&mut out, entries.len() as u64);
        let mut last = 0u16;
        for (i, c) in entries {
            put(&mut out, u64::from(i - last));
            put(&mut out, u64::from(*c));
            last = *i;
        }
        let classes: Vec<(i64, u64)> = b.classes.iter().collect();
        put(&mut out, classes.len() as u64);
        for (c, n) in classes {
            put(&mut out, zigzag(c));
            put(&mut out, n);
        }
        Packed {
            epoch: b.epoch,
            bytes: out.into_boxed_slice(),
        }
    }

    /// The bucket as it was packed.
    pub fn unpack(&self) -> Bucket {
        let mut b = Bucket {
            epoch: self.epoch,
            ..Bucket::default()
        };
        self.merge_into(&mut b);
        b
    }

    /// Adds this bucket's figures to `into` (its epoch is left alone).
    pub fn merge_into(&self, into: &mut Bucket) {
        let mut r = Reader(&self.bytes);
        let [
            requests,
            errors,
            rejected,
            agree,
            disagree,
            compare_errors,
            dropped,
            labelled,
            correct,
            grpc,
        ] = std::array::from_fn(|_| r.next());
        into.requests += requests;
        into.errors += errors;
        into.rejected += rejected;
        into.agree += agree;
        into.disagree += disagree;
        into.compare_errors += compare_errors;
        into.dropped += dropped;
        into.labelled += labelled;
        into.correct += correct;
        into.grpc += grpc;
        let mut index = 0u16;
        for _ in 0..r.next() {
            index += r.next() as u16;
            into.latency.add_count(index, r.next() as u32);
        }
        for _ in 0..r.next() {
            let class = unzigzag(r.next());
            into.classes.add(class, r.next());
        }
    }

    /// Bytes held beside the struct itself.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len()
    }
}

/// The counters in their packed order.
fn counters(b: &Bucket) -> [u64; 10] {
    [
        b.requests,
        b.errors,
        b.rejected,
        b.agree,
        b.disagree,
        b.compare_errors,
        b.dropped,
        b.labelled,
        b.correct,
        b.grpc,
    ]
}

/// LEB128: seven bits a byte, low first, the high bit set on all but the last.
fn put(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// The next integer; the bytes were written by [`put`], so they are
    /// well formed (a short read gives 0 rather than a panic).
    fn next(&mut self) -> u64 {
        let mut n = 0u64;
        let mut shift = 0;
        while let Some((&byte, rest)) = self.0.split_first() {
            self.0 = rest;
            n |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
            shift += 7;
        }
        n
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(seed: u64) -> Bucket {
        let mut b = Bucket {
            epoch: 400_000_000 + seed,
            requests: seed * 1_000_003,
            errors: seed % 7,
            rejected: u64::MAX - seed,
            agree: 127,
            disagree: 128,
            compare_errors: 16_384,
            dropped: 0,
            labelled: seed,
            correct: seed / 2,
            grpc: 1 << 40,
            ..Bucket::default()
        };
        for i in 0..seed * 13 {
            b.latency.add(1e-6 * ((i * 7919) % 5_000_000 + 1) as f64);
        }
        for c in [-3, 0, 1, i64::MIN, i64::MAX] {
            b.classes.add(c, seed + 1);
        }
        b
    }

    #[test]
    fn a_packed_bucket_unpacks_to_the_same_figures() {
        for seed in [0, 1, 2, 17, 300] {
            let b = bucket(seed);
            let p = Packed::pack(&b);
            assert_eq!(p.unpack(), b, "seed {seed}");
            // Merged into another: the same as merging the open form.
            let (mut by_bytes, mut by_bucket) = (bucket(3), bucket(3));
            by_bytes.requests = 5; // keep the sums inside u64
            by_bucket.requests = 5;
            by_bytes.rejected = 0;
            by_bucket.rejected = 0;
            p.merge_into(&mut by_bytes);
            by_bucket.merge(&b);
            assert_eq!(by_bytes, by_bucket, "seed {seed}");
        }
    }

    #[test]
    fn a_closed_bucket_of_real_traffic_packs_into_a_few_hundred_bytes() {
        let mut b = Bucket::default();
        for i in 0..1_000u64 {
            b.requests += 1;
            b.latency
                .add(0.000_2 / (1.0 - 0.9 * ((i * 7919) % 1000) as f64 / 1000.0));
            b.classes.add((i % 2) as i64, 1);
        }
        let open = size_of::<Bucket>() + b.heap_bytes();
        let packed = size_of::<Packed>() + Packed::pack(&b).heap_bytes();
        assert!(packed * 3 < open, "packed {packed} bytes, open {open}");
        assert!(packed < 400, "packed {packed} bytes");
    }

    #[test]
    fn zigzag_round_trips_the_extremes() {
        for n in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
    }
}
