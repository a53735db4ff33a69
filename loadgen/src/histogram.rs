//! A latency histogram in microseconds that many subscriber tasks record into at once: exact
//! below 128 µs, then 64 buckets per power of two (under 1.6 % error), lock-free.

use std::sync::atomic::{AtomicU64, Ordering};

/// Values below this are their own bucket.
const LINEAR: u64 = 128;
/// Buckets per power of two above `LINEAR`.
const PER_OCTAVE: usize = 64;
/// Powers of two covered above `LINEAR`: up to 2^42 µs, far past any run.
const OCTAVES: usize = 36;
const BUCKETS: usize = LINEAR as usize + OCTAVES * PER_OCTAVE;

pub struct Histogram {
    counts: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Percentiles of what a histogram recorded, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

fn bucket_of(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    // `octave` is at least 1 here, and `top` keeps the seven leading bits: 64..=127.
    let octave = (63 - micros.leading_zeros()) as usize - 6;
    let top = (micros >> octave) as usize;
    (octave * PER_OCTAVE + top).min(BUCKETS - 1)
}

/// The largest value that falls in `bucket`, so reported percentiles never flatter.
fn upper_bound(bucket: usize) -> u64 {
    if bucket < LINEAR as usize {
        return bucket as u64;
    }
    let octave = bucket / PER_OCTAVE - 1;
    let top = (bucket - octave * PER_OCTAVE) as u64;
    ((top + 1) << octave) - 1
}

impl Histogram {
    pub fn record(&self, micros: u64) {
        self.counts[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Percentiles::default();
        }
        let at = |fraction: f64| {
            let rank = ((total as f64 * fraction).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (bucket, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return upper_bound(bucket);
                }
            }
            upper_bound(BUCKETS - 1)
        };
        let max = counts.iter().rposition(|n| *n > 0).map_or(0, upper_bound);
        Percentiles {
            count: total,
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut last = 0;
        for v in 0..1_000_000u64 {
            let b = bucket_of(v);
            assert!(b == last || b == last + 1, "gap at {v}");
            assert!(upper_bound(b) >= v, "bucket {b} ends below {v}");
            let err = (upper_bound(b) - v) as f64 / v.max(1) as f64;
            assert!(err < 0.016, "{v} lands {err} too high");
            last = b;
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let h = Histogram::default();
        for v in 1..=1000 {
            h.record(v);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert!((500..=508).contains(&p.p50_us), "{p:?}");
        assert!((990..=1006).contains(&p.p99_us), "{p:?}");
        assert!(p.max_us >= 1000 && p.max_us < 1016, "{p:?}");
        h.clear();
        assert_eq!(h.percentiles().count, 0);
    }
}
