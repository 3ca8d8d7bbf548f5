//! What the daemon counts while it works: decisions by rule, latencies, store operations,
//! connections per listener, and a short memory of recent activity for the dashboard.
//!
//! Counters are plain atomics indexed by enums (no label maps on the request path); the
//! admin module renders them as Prometheus text. The activity memory is bounded: a ring of
//! recent decisions, one hour of 10-second buckets, and capped top-N maps.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{Rule, Verdict};
use crate::lock;
use crate::store::StoreError;

/// Upper bounds (seconds) of the latency histograms: 50 µs to 5 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0,
];

/// One copy per thread group of something every worker updates on every request: each
/// thread adds to its own cache-aligned copy, so the two workers of a busy daemon do not
/// pass the same cache lines (and locks) back and forth; readers combine the copies.
#[derive(Debug, Default)]
pub struct Striped<T> {
    lanes: [Lane<T>; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Lane<T>(T);

/// Copies of a striped value; threads take one each, round robin (more than the workers of
/// a small machine, so that they rarely share one).
pub(crate) const STRIPES: usize = 8;

impl<T> Striped<T> {
    /// This thread's copy.
    pub fn mine(&self) -> &T {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        }
        &self.lanes[STRIPE.with(|s| *s)].0
    }

    /// Every copy, for readers that combine them.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.lanes.iter().map(|l| &l.0)
    }
}

/// A counter that every worker adds to: striped (see [`Striped`]), summed when read.
#[derive(Debug, Default)]
pub struct Counter(Striped<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.mine().fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.all().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A fixed-bucket latency histogram, striped (see [`Striped`]); a snapshot sums the stripes.
#[derive(Debug, Default)]
pub struct Histogram {
    stripes: Striped<HistogramStripe>,
}

#[derive(Debug, Default)]
struct HistogramStripe {
    /// Non-cumulative counts; the last slot is `+Inf`.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram read at one moment: cumulative bucket counts, total and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let stripe = self.stripes.mine();
        stripe.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        stripe.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for i in 0..=LATENCY_BUCKETS.len() {
            total += self
                .stripes
                .all()
                .map(|s| s.counts[i].load(Ordering::Relaxed))
                .sum::<u64>();
            let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            cumulative.push((bound, total));
        }
        HistogramSnapshot {
            cumulative,
            count: total,
            sum_seconds: self
                .stripes
                .all()
                .map(|s| s.sum_nanos.load(Ordering::Relaxed))
                .sum::<u64>() as f64
                / 1e9,
        }
    }
}

/// Store operations the service performs on a request's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    UpdateTriplet,
    UpdateClient,
}

impl StoreOp {
    pub const ALL: [StoreOp; 2] = [StoreOp::UpdateTriplet, StoreOp::UpdateClient];
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::UpdateTriplet => "update_triplet",
            StoreOp::UpdateClient => "update_client",
        }
    }
}

/// Kinds of store errors, for the error counter's label.
pub const STORE_ERROR_KINDS: [&str; 6] = [
    "locked",
    "unavailable",
    "readonly",
    "timeout",
    "backend",
    "corrupt",
];

fn error_kind(e: &StoreError) -> usize {
    match e {
        StoreError::Locked { .. } => 0,
        StoreError::Unavailable(_) => 1,
        StoreError::ReadOnly => 2,
        StoreError::Timeout(_) => 3,
        // Only listings read cursors, and they are not counted; kept with its kin so the
        // metric's labels stay as they were.
        StoreError::Backend(_) | StoreError::BadCursor(_) => 4,
        StoreError::Corrupt { .. } => 5,
        // Refused at start or at the first use: counted with configuration-like trouble.
        StoreError::AddressMode(_) => 4,
    }
}

const VERDICTS: [Verdict; 3] = [Verdict::Skip, Verdict::Pass, Verdict::Defer];

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Skip => 0,
        Verdict::Pass => 1,
        Verdict::Defer => 2,
    }
}

/// Every counter of the service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The counters every request adds to.
    hot: Striped<HotCounters>,
    /// Decisions that learn mode turned from defer into pass.
    pub learn_would_defer: AtomicU64,
    pub decision_seconds: Histogram,
    store_seconds: [Histogram; StoreOp::ALL.len()],
    store_errors: [AtomicU64; STORE_ERROR_KINDS.len()],
    pub fail_open: AtomicU64,
    pub fail_closed: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Pending triplets an operator released through the admin API.
    pub released: AtomicU64,
    /// Shared with the DNS facts gatherer, which a reload may replace.
    pub dns: std::sync::Arc<DnsStats>,
    /// The SMTP front end's sessions.
    pub smtp: SmtpStats,
}

/// Counters of the SMTP front end (decisions at its RCPT count with the others).
#[derive(Debug, Default)]
pub struct SmtpStats {
    /// Sessions started.
    pub sessions: AtomicU64,
    /// Clients caught talking before the banner ended.
    pub pregreets: AtomicU64,
    /// RCPTs to a greytrap address.
    pub trap_hits: AtomicU64,
    /// Sessions whose replies were slowed down.
    pub tarpitted: AtomicU64,
    /// Sessions closed for too many errors.
    pub error_disconnects: AtomicU64,
    /// The backend could not be reached or stopped answering.
    pub backend_failures: AtomicU64,
    /// Backend sessions opened for clients (not those taken from the pool).
    pub backend_connections: AtomicU64,
    /// Backend sessions taken from the pool for a client.
    pub backend_reuses: AtomicU64,
    /// Messages the backend accepted.
    pub messages: AtomicU64,
    pub message_bytes: AtomicU64,
    /// Sessions that started TLS.
    pub tls_sessions: AtomicU64,
}

/// Counters of every request, one copy per stripe.
#[derive(Debug, Default)]
struct HotCounters {
    /// Answers by (rule, verdict the MTA got).
    decisions: [[AtomicU64; 3]; Rule::ALL.len()],
    store_ops: [AtomicU64; StoreOp::ALL.len()],
}

/// Counters of the DNS facts gatherer, counted by every request that gathers facts: striped,
/// so that the two workers of a busy daemon do not pass these cache lines back and forth.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Requests whose facts were gathered.
    pub gathers: Counter,
    /// Lookups sent (an SPF check, a host name check, one DNS list zone).
    pub lookups: Counter,
    /// Lookups answered from the cache.
    pub cache_hits: Counter,
    /// Lookups still unanswered when the request's budget ran out.
    pub timeouts: Counter,
    /// Lookups that failed (SERVFAIL, refused, network errors).
    pub failures: Counter,
    /// Lookups not made because the resolver was not answering (its breaker was open).
    pub skipped: Counter,
    /// 1 while the resolver is considered down (breaker open), else 0.
    pub resolver_down: AtomicU64,
    /// Times the resolver's breaker opened.
    pub breaker_opened: Counter,
    /// Time spent gathering, per request.
    pub gather_seconds: Histogram,
}

impl Metrics {
    pub fn count_decision(&self, rule: Rule, verdict: Verdict, took: Duration) {
        // `get`: a rule left out of `Rule::ALL` must not panic on the request path (a unit
        // test checks that ALL is complete and in order).
        if let Some(row) = self.hot.mine().decisions.get(rule as usize) {
            row[verdict_index(verdict)].fetch_add(1, Ordering::Relaxed);
        }
        self.decision_seconds.observe(took);
    }

    pub fn count_store_op(&self, op: StoreOp, took: Duration) {
        self.hot.mine().store_ops[op as usize].fetch_add(1, Ordering::Relaxed);
        self.store_seconds[op as usize].observe(took);
    }

    pub fn count_store_error(&self, e: &StoreError) {
        self.store_errors[error_kind(e)].fetch_add(1, Ordering::Relaxed);
    }

    /// Non-zero decision counters as (rule, verdict, count).
    pub fn decisions(&self) -> Vec<(Rule, Verdict, u64)> {
        let mut out = Vec::new();
        for rule in Rule::ALL {
            for v in VERDICTS {
                let n = self.sum(|c| &c.decisions[rule as usize][verdict_index(v)]);
                if n > 0 {
                    out.push((rule, v, n));
                }
            }
        }
        out
    }

    /// Total answers with this verdict.
    pub fn verdict_total(&self, v: Verdict) -> u64 {
        Rule::ALL
            .iter()
            .map(|&rule| self.sum(|c| &c.decisions[rule as usize][verdict_index(v)]))
            .sum()
    }

    pub fn store_ops(&self) -> Vec<(StoreOp, u64, HistogramSnapshot)> {
        StoreOp::ALL
            .iter()
            .map(|&op| {
                let i = op as usize;
                (
                    op,
                    self.sum(|c| &c.store_ops[i]),
                    self.store_seconds[i].snapshot(),
                )
            })
            .collect()
    }

    /// One hot counter, summed over the stripes.
    fn sum(&self, counter: impl Fn(&HotCounters) -> &AtomicU64) -> u64 {
        self.hot
            .all()
            .map(|c| counter(c).load(Ordering::Relaxed))
            .sum()
    }

    pub fn store_errors(&self) -> Vec<(&'static str, u64)> {
        STORE_ERROR_KINDS
            .iter()
            .zip(&self.store_errors)
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Connection counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// The bound address (`127.0.0.1:10023`, `unix:/path`).
    pub address: String,
    /// `policy` or `milter`.
    pub protocol: &'static str,
    pub limit: usize,
    pub open: AtomicUsize,
    pub accepted: AtomicU64,
    /// New connections closed at once: the listener or the peer at its limit with no
    /// connection that could make room, or the process out of file descriptors.
    pub refused: AtomicU64,
    /// Idle connections closed to make room for a new one.
    pub evicted: AtomicU64,
}

impl ListenerStats {
    pub fn new(address: String, protocol: &'static str, limit: usize) -> Self {
        ListenerStats {
            address,
            protocol,
            limit,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }
}

/// One decision as the dashboard shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecentDecision {
    pub at: u64,
    pub verdict: Verdict,
    pub rule: Rule,
    /// False in learn mode: the verdict was only logged.
    pub enforced: bool,
    /// Kept as an address: formatting it is left to whoever reads the dashboard.
    pub client: Option<std::net::IpAddr>,
    pub group: String,
    pub sender: String,
    pub recipient: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delayed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The recipient's `[[domains]]` section, when one applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Answers in one 10-second bucket.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bucket {
    pub start: u64,
    pub pass: u64,
    pub defer: u64,
    pub skip: u64,
}

/// A name and how often it was deferred.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopEntry {
    pub name: String,
    pub defers: u64,
}

const RECENT: usize = 200;
pub const BUCKET_SECONDS: u64 = 10;
const BUCKETS: usize = 360;
const TOP_WINDOW: u64 = 3600;
const TOP_CAP: usize = 10_000;

/// Deferral counts per name over the current and the previous hour.
#[derive(Debug, Default)]
struct TopCounts {
    window_start: u64,
    current: HashMap<String, u64>,
    previous: HashMap<String, u64>,
}

impl TopCounts {
    fn add(&mut self, name: &str, now: u64) {
        if now >= self.window_start + TOP_WINDOW {
            let stale = now >= self.window_start + 2 * TOP_WINDOW;
            self.previous = std::mem::take(&mut self.current);
            if stale {
                self.previous.clear();
            }
            self.window_start = now - now % TOP_WINDOW;
        }
        if let Some(n) = self.current.get_mut(name) {
            *n += 1;
        } else if self.current.len() < TOP_CAP {
            // Beyond the cap a flood of new names is not counted rather than grow memory.
            self.current.insert(name.to_string(), 1);
        }
    }

    /// The top `n` over every stripe's counts. Each stripe rolls its hour when it counts:
    /// one that has not counted since is behind the newest and contributes only what is
    /// still within the last two hours.
    fn top(stripes: &[&TopCounts], n: usize) -> Vec<TopEntry> {
        let newest = stripes.iter().map(|t| t.window_start).max().unwrap_or(0);
        let mut all: HashMap<&str, u64> = HashMap::new();
        for t in stripes {
            let counts: Box<dyn Iterator<Item = (&String, &u64)>> = if t.window_start == newest {
                Box::new(t.previous.iter().chain(&t.current))
            } else if t.window_start + TOP_WINDOW == newest {
                Box::new(t.current.iter())
            } else {
                continue;
            };
            for (k, v) in counts {
                *all.entry(k.as_str()).or_default() += v;
            }
        }
        let mut v: Vec<TopEntry> = all
            .into_iter()
            .map(|(name, defers)| TopEntry {
                name: name.to_string(),
                defers,
            })
            .collect();
        v.sort_by(|a, b| b.defers.cmp(&a.defers).then_with(|| a.name.cmp(&b.name)));
        v.truncate(n);
        v
    }
}

#[derive(Debug, Default)]
struct ActivityInner {
    /// With the instant each was recorded: stripes are merged in that order.
    recent: VecDeque<(Instant, RecentDecision)>,
    series: VecDeque<Bucket>,
    groups: TopCounts,
    domains: TopCounts,
}

/// Recent decisions, answers per 10 s over the last hour, and the most deferred client
/// groups and sender domains over the last one to two hours. Striped (see [`Striped`]):
/// every worker records every decision, readers merge.
#[derive(Debug, Default)]
pub struct Activity {
    stripes: Striped<Mutex<ActivityInner>>,
}

impl Activity {
    /// Records a decision, copying its strings into those of the oldest entry it replaces
    /// (once the ring is full and they fit, only a decision's `detail` is allocated).
    pub fn record(&self, d: &DecisionSeen<'_>) {
        // Work that needs no lock is done before taking it.
        let domain = (d.verdict == Verdict::Defer).then(|| {
            let domain = d.sender.rsplit_once('@').map_or("<>", |(_, dom)| dom);
            if domain.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(domain.to_ascii_lowercase())
            } else {
                Cow::Borrowed(domain)
            }
        });
        let mut a = lock(self.stripes.mine());
        let start = d.at - d.at % BUCKET_SECONDS;
        if a.series.back().is_none_or(|b| b.start < start) {
            a.series.push_back(Bucket {
                start,
                ..Bucket::default()
            });
            while a.series.len() > BUCKETS {
                a.series.pop_front();
            }
        }
        // A decision stamped before the newest bucket (clock step) lands in the newest one.
        let b = a.series.back_mut().expect("pushed above");
        match d.verdict {
            Verdict::Pass => b.pass += 1,
            Verdict::Defer => b.defer += 1,
            Verdict::Skip => b.skip += 1,
        }
        if let Some(domain) = domain {
            a.groups.add(d.group, d.at);
            a.domains.add(&domain, d.at);
        }
        let reuse = if a.recent.len() == RECENT {
            a.recent.pop_front().map(|(_, old)| old)
        } else {
            None
        };
        a.recent.push_back((d.when, d.owned(reuse)));
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<RecentDecision> {
        let mut all: Vec<(Instant, RecentDecision)> = Vec::new();
        for stripe in self.stripes.all() {
            let a = lock(stripe);
            all.extend(a.recent.iter().rev().take(limit).cloned());
        }
        all.sort_by_key(|x| std::cmp::Reverse(x.0));
        all.into_iter().take(limit).map(|(_, d)| d).collect()
    }

    /// Buckets of the last `seconds` before `now`, oldest first, empty buckets included.
    pub fn series(&self, now: u64, seconds: u64) -> Vec<Bucket> {
        let seconds = seconds.min(BUCKETS as u64 * BUCKET_SECONDS);
        let last = now - now % BUCKET_SECONDS;
        let first = last.saturating_sub(seconds - BUCKET_SECONDS.min(seconds));
        let n = usize::try_from((last - first) / BUCKET_SECONDS + 1).unwrap_or(BUCKETS);
        let mut out: Vec<Bucket> = (0..n as u64)
            .map(|i| Bucket {
                start: first + i * BUCKET_SECONDS,
                ..Bucket::default()
            })
            .collect();
        for stripe in self.stripes.all() {
            let a = lock(stripe);
            for b in &a.series {
                if b.start < first
                    || b.start > last
                    || !(b.start - first).is_multiple_of(BUCKET_SECONDS)
                {
                    continue;
                }
                let Some(slot) = usize::try_from((b.start - first) / BUCKET_SECONDS)
                    .ok()
                    .and_then(|i| out.get_mut(i))
                else {
                    continue;
                };
                slot.pass += b.pass;
                slot.defer += b.defer;
                slot.skip += b.skip;
            }
        }
        out
    }

    /// The most deferred client groups and sender domains.
    pub fn top(&self, n: usize) -> (Vec<TopEntry>, Vec<TopEntry>) {
        let stripes: Vec<_> = self.stripes.all().map(lock).collect();
        let groups: Vec<&TopCounts> = stripes.iter().map(|a| &a.groups).collect();
        let domains: Vec<&TopCounts> = stripes.iter().map(|a| &a.domains).collect();
        (TopCounts::top(&groups, n), TopCounts::top(&domains, n))
    }
}

/// A decision as [`Activity::record`] takes it, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct DecisionSeen<'a> {
    pub at: u64,
    /// When it was decided: recent decisions of all stripes are merged in this order.
    pub when: Instant,
    pub verdict: Verdict,
    pub rule: Rule,
    pub enforced: bool,
    pub client: Option<std::net::IpAddr>,
    pub group: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub delayed: Option<u64>,
    pub detail: Option<&'a str>,
    /// The recipient's `[[domains]]` section, when one applied.
    pub domain: Option<&'a str>,
}

impl DecisionSeen<'_> {
    /// The decision owned, in the strings of `reuse` when given.
    fn owned(&self, reuse: Option<RecentDecision>) -> RecentDecision {
        let (mut group, mut sender, mut recipient) =
            reuse.map_or_else(Default::default, |o| (o.group, o.sender, o.recipient));
        for (into, from) in [
            (&mut group, self.group),
            (&mut sender, self.sender),
            (&mut recipient, self.recipient),
        ] {
            into.clear();
            into.push_str(from);
        }
        RecentDecision {
            at: self.at,
            verdict: self.verdict,
            rule: self.rule,
            enforced: self.enforced,
            client: self.client,
            group,
            sender,
            recipient,
            delayed: self.delayed,
            detail: self.detail.map(str::to_owned),
            domain: self.domain.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision<'a>(
        at: u64,
        verdict: Verdict,
        group: &'a str,
        sender: &'a str,
    ) -> DecisionSeen<'a> {
        DecisionSeen {
            at,
            when: Instant::now(),
            verdict,
            rule: Rule::New,
            enforced: true,
            client: "192.0.2.1".parse().ok(),
            group,
            sender,
            recipient: "r@example.org",
            delayed: None,
            detail: None,
            domain: None,
        }
    }

    #[test]
    fn rule_all_is_in_declaration_order() {
        // Counters are indexed by `rule as usize`; a rule missing from ALL or out of order
        // would count under another rule's name.
        for (i, r) in Rule::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(9));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], (0.000_05, 1));
        assert_eq!(s.cumulative[4], (0.001, 2));
        assert_eq!(s.cumulative.last().unwrap().1, 3);
        assert!((s.sum_seconds - 9.00074).abs() < 1e-9);
    }

    #[test]
    fn series_fills_gaps_and_top_counts_defers() {
        let a = Activity::default();
        a.record(&decision(
            1000,
            Verdict::Defer,
            "192.0.2.0/24",
            "a@Spam.example",
        ));
        a.record(&decision(
            1005,
            Verdict::Pass,
            "192.0.2.0/24",
            "a@b.example",
        ));
        a.record(&decision(
            1031,
            Verdict::Defer,
            "198.51.100.0/24",
            "x@spam.example",
        ));
        a.record(&decision(1032, Verdict::Defer, "198.51.100.0/24", ""));
        let s = a.series(1039, 60);
        assert_eq!(s.len(), 6);
        assert_eq!(s.first().unwrap().start, 980);
        assert_eq!((s[2].start, s[2].defer, s[2].pass), (1000, 1, 1));
        assert_eq!((s[5].start, s[5].defer), (1030, 2));
        let (groups, domains) = a.top(5);
        assert_eq!(groups[0].name, "198.51.100.0/24");
        assert_eq!(groups[0].defers, 2);
        assert_eq!(domains[0].name, "spam.example");
        assert_eq!(domains[0].defers, 2);
        assert_eq!(a.recent(2)[0].at, 1032);
    }

    #[test]
    fn activity_recorded_on_many_threads_reads_as_one() {
        let a = Activity::default();
        std::thread::scope(|s| {
            for t in 0..6u64 {
                let a = &a;
                s.spawn(move || {
                    for i in 0..300u64 {
                        let verdict = if i % 3 == 0 {
                            Verdict::Defer
                        } else {
                            Verdict::Pass
                        };
                        let sender = format!("s{t}@d{}.example", i % 2);
                        a.record(&decision(1000 + i, verdict, "192.0.2.0/24", &sender));
                    }
                });
            }
        });
        let recent = a.recent(200);
        assert_eq!(recent.len(), 200);
        for t in 0..6 {
            // Each thread's decisions newest first (threads interleave as they ran).
            let mine: Vec<u64> = recent
                .iter()
                .filter(|d| d.sender.starts_with(&format!("s{t}@")))
                .map(|d| d.at)
                .collect();
            assert!(mine.windows(2).all(|w| w[0] > w[1]), "thread {t}: {mine:?}");
        }
        let series = a.series(1299, 3600);
        let (pass, defer) = series
            .iter()
            .fold((0, 0), |(p, d), b| (p + b.pass, d + b.defer));
        assert_eq!((pass, defer), (6 * 200, 6 * 100));
        let (groups, domains) = a.top(5);
        assert_eq!(groups[0].defers, 600);
        assert_eq!(domains.iter().map(|d| d.defers).sum::<u64>(), 600);
        // A stripe whose hour is over counts as the previous hour, two hours on as nothing.
        a.record(&decision(
            1000 + 3600,
            Verdict::Defer,
            "198.51.100.0/24",
            "x@y",
        ));
        assert_eq!(a.top(1).0[0].defers, 600);
        a.record(&decision(
            1000 + 3 * 3600,
            Verdict::Defer,
            "198.51.100.0/24",
            "x@y",
        ));
        assert_eq!(
            a.top(5).0,
            vec![TopEntry {
                name: "198.51.100.0/24".into(),
                defers: 1
            }]
        );
    }

    #[test]
    fn recent_decisions_merge_in_recording_order() {
        let a = Activity::default();
        for (i, sender) in ["first@x", "second@x", "third@x", "fourth@x"]
            .iter()
            .enumerate()
        {
            // Alternate threads, one after the other: each records into its own stripe.
            std::thread::scope(|s| {
                s.spawn(|| a.record(&decision(5000 - i as u64, Verdict::Pass, "g", sender)));
            });
        }
        let senders: Vec<String> = a.recent(3).into_iter().map(|d| d.sender).collect();
        assert_eq!(senders, ["fourth@x", "third@x", "second@x"]);
    }

    #[test]
    fn top_counts_roll_over_hours() {
        let mut t = TopCounts::default();
        t.add("a", 3600);
        t.add("a", 7200);
        assert_eq!(
            TopCounts::top(&[&t], 1)[0].defers,
            2,
            "previous hour still counts"
        );
        t.add("b", 4 * 3600 + 1);
        assert_eq!(
            TopCounts::top(&[&t], 5).len(),
            1,
            "two hours later the old counts are gone"
        );
    }
}
