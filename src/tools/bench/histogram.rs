//! The latency histogram every connection records into and the percentiles reported from it.

use std::fmt;

use serde::Serialize;

/// Sub-buckets per power of two: values are kept to within 1/64 (1.6 %) of what was recorded.
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const HALF: usize = SUB / 2;
const BUCKETS: usize = (64 - SUB_BITS as usize) * HALF + SUB;

/// A log-linear histogram of nanoseconds (the HdrHistogram layout, fixed precision): constant
/// memory and O(1) recording whatever the run length, so it cannot become the bottleneck.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros()) - (SUB_BITS - 1);
        shift as usize * HALF + (v >> shift) as usize
    }

    /// The highest value that falls into bucket `i`.
    fn high(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let shift = i / HALF - 1;
        let m = (i - shift * HALF) as u64;
        // The last bucket ends at u64::MAX: compute in u128 so its top does not overflow.
        let top = (u128::from(m) + 1) << shift;
        u64::try_from(top - 1).unwrap_or(u64::MAX)
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The nearest-rank percentile (`p` in 0..=100), reported as the top of its bucket, so
    /// never below the true value and at most 1/64 above it; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::high(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Percentiles in microseconds for reports.
    pub fn summary(&self) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50: us(self.percentile(50.0)),
            p90: us(self.percentile(90.0)),
            p99: us(self.percentile(99.0)),
            p999: us(self.percentile(99.9)),
            max: us(self.max),
            mean: self.mean() / 1000.0,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::bench::Rng;

    /// The exact nearest-rank percentile of sorted values.
    fn exact(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_are_within_bucket_precision() {
        let mut rng = Rng::new(42);
        let mut values: Vec<u64> = (0..50_000)
            .map(|i| match i % 3 {
                0 => rng.below(200),
                1 => 10_000 + rng.below(90_000),
                _ => rng.below(5_000_000_000),
            })
            .collect();
        let mut h = Histogram::new();
        for &v in &values {
            h.record(v);
        }
        values.sort_unstable();
        for p in [0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0] {
            let want = exact(&values, p);
            let got = h.percentile(p);
            assert!(got >= want, "p{p}: {got} < {want}");
            assert!(
                got as f64 <= want as f64 * (1.0 + 1.0 / 64.0) + 1.0,
                "p{p}: {got} too far above {want}"
            );
        }
        assert_eq!(h.percentile(100.0), *values.last().expect("values"));
        assert_eq!(h.count(), 50_000);
    }

    #[test]
    fn histogram_small_values_are_exact_and_merge_adds() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 1..=100 {
            a.record(v);
        }
        assert_eq!(a.percentile(50.0), 50);
        assert_eq!(a.percentile(99.0), 99);
        b.record(u64::MAX);
        a.merge(&b);
        assert_eq!(a.count(), 101);
        assert_eq!(a.max(), u64::MAX);
        assert_eq!(a.percentile(100.0), u64::MAX);
        assert_eq!(Histogram::new().percentile(99.0), 0);
    }

    #[test]
    fn bucket_bounds_are_contiguous() {
        for i in 1..BUCKETS {
            assert_eq!(
                Histogram::index(Histogram::high(i - 1) + 1),
                i,
                "bucket {i}"
            );
            assert_eq!(Histogram::index(Histogram::high(i)), i, "bucket {i}");
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }
}
