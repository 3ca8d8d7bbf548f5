//! Per-domain aggregates that finished messages fold into, so that `track` keeps a
//! message only while it is in flight: counts, the added delays' quantiles (exact for the
//! first [`EXACT_DELAYS`] of a domain, then a DDSketch with 1 % relative error) and a
//! fixed histogram for charts and metrics. Memory per domain is bounded whatever the log
//! size: at most [`EXACT_DELAYS`] values, or the sketch's bins (at most 2,048, about 650
//! for delays between one second and five days).

use std::collections::HashMap;

use sketches_ddsketch::{Config, DDSketch};

use super::Message;
use crate::tools::maillog::DeliveryStatus;

/// Added delays a domain keeps exactly before it switches to the sketch: small reports
/// (one site, one day) show the exact figures.
pub const EXACT_DELAYS: usize = 64;

/// Relative error of the quantiles once a domain has more than [`EXACT_DELAYS`] delays.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;

/// Upper bounds (seconds) of the added-delay histogram, the last one open: the HTML
/// report's chart and the `--follow` metrics' buckets.
pub const DELAY_BUCKETS: [f64; 6] = [60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, f64::INFINITY];

/// The quantile rule every figure uses, exact or sketched: the value at rank
/// `floor(q × (n − 1))` of the sorted values (the sketch's own rule).
fn rank(q: f64, n: usize) -> usize {
    ((q * (n.saturating_sub(1)) as f64) as usize).min(n.saturating_sub(1))
}

/// Added delays of one domain: exact while few, sketched after.
#[derive(Clone, Default)]
pub struct Delays {
    exact: Vec<f64>,
    sketch: Option<Box<DDSketch>>,
}

impl std::fmt::Debug for Delays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delays")
            .field("exact", &self.exact.len())
            .field("sketched", &self.sketch.is_some())
            .finish()
    }
}

impl Delays {
    pub fn add(&mut self, v: f64) {
        if let Some(s) = &mut self.sketch {
            s.add(v);
            return;
        }
        self.exact.push(v);
        if self.exact.len() > EXACT_DELAYS {
            let mut s = Box::new(DDSketch::new(sketch_config()));
            for &x in &self.exact {
                s.add(x);
            }
            self.exact = Vec::new();
            self.sketch = Some(s);
        }
    }

    /// The `q` quantile (0..=1); `None` without values.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        match &self.sketch {
            Some(s) => s.quantile(q).ok().flatten(),
            None => exact_quantile(&self.exact, q),
        }
    }

    pub fn is_exact(&self) -> bool {
        self.sketch.is_none()
    }
}

fn sketch_config() -> Config {
    Config::new(SKETCH_RELATIVE_ERROR, 2048, 1e-9)
}

/// The `q` quantile of unsorted `values`, the value at rank `floor(q × (n − 1))`: the reference the
/// sketch is held to.
pub fn exact_quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[rank(q, v.len())])
}

/// What one destination domain has seen. A message counts once per domain however many
/// of its recipients are there.
#[derive(Debug, Clone, Default)]
pub struct DomainAgg {
    pub messages: u64,
    /// Messages with at least one greylisting deferral for a recipient in this domain.
    pub greylisted: u64,
    /// Messages deferred for other reasons only.
    pub deferred_other: u64,
    /// Messages not yet delivered, bounced nor expired for some recipient here.
    pub still_queued: u64,
    /// Bounced or expired.
    pub bounced: u64,
    /// Seconds greylisting added (first greylisting deferral to delivery) per greylisted,
    /// delivered message.
    pub added: Delays,
    pub added_total: f64,
    /// Added delays per [`DELAY_BUCKETS`] bucket (not cumulative).
    pub added_buckets: [u64; DELAY_BUCKETS.len()],
}

impl DomainAgg {
    /// Greylisted messages that were delivered: the count of the added delays.
    pub fn added_count(&self) -> u64 {
        self.added_buckets.iter().sum()
    }

    fn add_delay(&mut self, a: f64) {
        self.added.add(a);
        self.added_total += a;
        let i = DELAY_BUCKETS
            .iter()
            .position(|ub| a < *ub)
            .unwrap_or(DELAY_BUCKETS.len() - 1);
        self.added_buckets[i] += 1;
    }
}

/// Every domain's aggregate, by lower-case domain.
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    pub domains: HashMap<Box<str>, DomainAgg>,
    /// Messages folded in.
    pub messages: u64,
}

/// One message's recipients in one domain, folded.
struct Folded<'a> {
    domain: &'a str,
    grey: bool,
    other: bool,
    added: Option<f64>,
    queued: bool,
    bounced: bool,
}

impl Aggregates {
    /// Adds a message (finished, or as it stands while in flight).
    pub fn fold(&mut self, m: &Message) {
        self.messages += 1;
        // Per (message, domain): fold the recipients. Messages have few recipients: a
        // linear search beats a map.
        let mut seen: Vec<Folded<'_>> = Vec::new();
        for r in &m.recipients {
            let outcome = r.outcome();
            let grey = r.greylisted();
            let f = Folded {
                domain: &r.domain,
                grey,
                other: !grey && r.deferred(),
                added: r.added_delay(),
                queued: outcome.is_none(),
                bounced: matches!(
                    outcome,
                    Some(DeliveryStatus::Bounced | DeliveryStatus::Expired)
                ),
            };
            match seen.iter_mut().find(|s| s.domain == f.domain) {
                Some(s) => {
                    s.grey |= f.grey;
                    s.other |= f.other;
                    s.added = match (s.added, f.added) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                    s.queued |= f.queued;
                    s.bounced |= f.bounced;
                }
                None => seen.push(f),
            }
        }
        for f in seen {
            let d = match self.domains.get_mut(f.domain) {
                Some(d) => d,
                None => self.domains.entry(f.domain.into()).or_default(),
            };
            d.messages += 1;
            d.greylisted += u64::from(f.grey);
            d.deferred_other += u64::from(f.other && !f.grey);
            d.still_queued += u64::from(f.queued);
            d.bounced += u64::from(f.bounced);
            if let Some(a) = f.added {
                d.add_delay(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_sketched_within_the_stated_error() {
        let mut d = Delays::default();
        let mut all = Vec::new();
        // A long-tailed spread of delays: seconds to days.
        let mut x = 7u64;
        for i in 0..5000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 33) % 400_000) as f64 / 10.0 + (i % 3) as f64;
            d.add(v);
            all.push(v);
            if all.len() == EXACT_DELAYS {
                assert!(d.is_exact());
                assert_eq!(d.quantile(0.5), exact_quantile(&all, 0.5));
            }
        }
        assert!(!d.is_exact());
        for q in [0.01, 0.25, 0.5, 0.9, 0.95, 0.99] {
            let want = exact_quantile(&all, q).unwrap();
            let got = d.quantile(q).unwrap();
            assert!(
                (got - want).abs() <= want * SKETCH_RELATIVE_ERROR + 1e-9,
                "q={q}: {got} vs {want}"
            );
        }
        assert_eq!(Delays::default().quantile(0.5), None);
    }

    #[test]
    fn quantile_rule() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(exact_quantile(&v, 0.5), Some(50.0));
        assert_eq!(exact_quantile(&v, 0.95), Some(95.0));
        assert_eq!(exact_quantile(&[7.0], 0.95), Some(7.0));
        assert_eq!(exact_quantile(&[], 0.5), None);
    }
}
