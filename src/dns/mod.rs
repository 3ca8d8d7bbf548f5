//! DNS facts for client identities: the sender's SPF, the client's forward-confirmed host
//! name, and the configured DNS allow and block lists — looked up concurrently under one
//! deadline per request, cached, and handed to the pure engine as `IdentityFacts`.
//!
//! **DNS trouble never defers mail by itself.** Whatever is not answered within the budget
//! becomes a fact that says nothing (`Timeout`, an incomplete listing): the identity falls
//! back to the IP prefix and the delay to the configured one. A lookup cut short keeps
//! running in the background (bounded by [`LOOKUP_LIMIT`]) so that its answer is cached
//! for the next request — the retry of a slow sender then finds it.
//!
//! **A resolver that stops answering stops being waited on.** After
//! [`breaker::OPEN_AFTER`] requests in a row got no answer within the budget, requests ask
//! it nothing (cached answers still count) until a background probe gets an answer again:
//! see [`breaker`].

pub mod breaker;
pub mod cache;
pub mod query;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use mail_auth::MessageAuthenticator;
use mail_auth::common::cache::NoCache;
use mail_auth::spf::verify::SpfParameters;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::engine::normalize::{canonical_ip, strip_envelope};
use crate::engine::{
    Classified, Engine, HostName, IdentityFacts, IdentityKind, Request, SpfFact, SpfResult, Unkeyed,
};
use crate::metrics::DnsStats;
use breaker::{Admit, Breaker, Probe};
use cache::{DEFAULT_NEGATIVE_TTL, MAX_TTL, TtlCache};
use query::{ListAnswer, classify_list_answer, list_query_name, mta_host_name, spf_canaries};

/// The checked `[dns]`, `[dnswl]` and `[dnsbl]` sections: what the gatherer looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub enabled: bool,
    pub budget: Duration,
    /// `None`: the system's resolver configuration.
    pub resolver: Option<SocketAddr>,
    pub cache_size: usize,
    /// Look up the host name (PTR, then A/AAAA) when the front end gave none; otherwise
    /// `org:` comes only from the name the MTA verified.
    pub ptr_lookup: bool,
    /// Lower-case zone names, without a trailing dot.
    pub dnswl_zones: Vec<String>,
    pub dnsbl_zones: Vec<String>,
}

/// Longest a lookup may run in the background after its request stopped waiting.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// Most lookup tasks alive at once. Lookups outlive their request (for the cache) by up to
/// `LOOKUP_LIMIT`; while DNS is down a busy MX would otherwise pile up tasks by the
/// thousand. Beyond this, a request's lookup is not started and counts as failed (the
/// identity falls back to the prefix, as for any DNS trouble).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Most DNS records the resolver keeps (fewer when `cache_size` is smaller): the answers
/// made of them are kept by the gatherer, up to `cache_size`, and the records are only
/// asked again when a known sender writes from a new address.
pub const RESOLVER_CACHE_MAX: usize = 20_000;

/// PTR names of one address checked forward; RFC 8601's `iprev` stops at 10, and real mail
/// servers have one.
const MAX_PTR_NAMES: usize = 5;

/// Why the gatherer could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct DnsSetupError(String);

impl DnsSetupError {
    pub fn new(why: impl Into<String>) -> Self {
        DnsSetupError(why.into())
    }
}

/// What one request asks about.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub ip: IpAddr,
    /// The envelope sender as received (`<>`/empty: null sender, no SPF check).
    pub sender: &'a str,
    pub helo: &'a str,
    /// The front end's `client_name` and `reverse_client_name` (see
    /// [`query::mta_host_name`]).
    pub client_name: &'a str,
    pub reverse_client_name: &'a str,
    /// Whether the identity order uses SPF, and the host name: no lookups for unused facts.
    pub spf: bool,
    pub name: bool,
}

/// What [`Gatherer::facts_now`] or [`Gatherer::gather_for`] found.
#[derive(Debug)]
pub enum FactsNow<'e> {
    /// The request needs no facts: it has some already, has no client address, or is
    /// decided without them — then with the engine's classification (`Decided`), which the
    /// caller can use instead of classifying again.
    NotNeeded(Option<Classified>),
    /// The facts (from `facts_now`: every one from the cache or "not known", breaker
    /// open), and the request's classification so far: put the facts into the request,
    /// then finish it with [`Engine::classify_keyed`].
    Gathered(Gathered, Unkeyed<'e>),
}

/// The facts of one request, and what DNS could not say in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gathered {
    pub facts: IdentityFacts,
    /// Lookups that timed out or failed, e.g. `spf (timed out)`, `dnsbl bl.example (SERVFAIL)`.
    pub trouble: Vec<String>,
    /// Some lookup was still unanswered when the budget ran out.
    pub timed_out: bool,
    /// The resolver was not answering (its breaker open) for this long: what the cache did
    /// not hold was not asked.
    pub resolver_down: Option<Duration>,
    pub elapsed: Duration,
}

impl Gathered {
    /// One line for logs and explanations, or `None` when every lookup answered.
    pub fn note(&self) -> Option<String> {
        if self.trouble.is_empty() {
            return None;
        }
        if let Some(down) = self.resolver_down {
            return Some(format!(
                "DNS resolver not answering for {} s (breaker open), not asked: {}",
                down.as_secs(),
                self.trouble.join(", ")
            ));
        }
        let what = if self.timed_out {
            "DNS timed out"
        } else {
            "DNS failed"
        };
        Some(format!(
            "{what} after {} ms: {}",
            self.elapsed.as_millis(),
            self.trouble.join(", ")
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// The check of one sender (lower-cased: the local part only matters to rare macros)
    /// from one address.
    Spf(IpAddr, String),
    Name(IpAddr),
    List(String, IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Spf(SpfResult),
    Name(HostName),
    List(ListAnswer),
}

/// What a lookup's task produces: the value and how long it may be cached, or an error.
type Answer = Result<(Value, Duration), String>;

/// A lookup answered from the cache, or running.
enum Pending {
    Ready(Value),
    Running(JoinHandle<Result<Value, String>>),
    /// Not started: too many lookups in flight.
    Refused,
    /// Not waited on: the resolver is not answering (asked in the background, if at all).
    Skipped,
}

enum Outcome {
    Answer(Value),
    Failed(String),
    TimedOut,
    Skipped,
}

/// Whether a request's lookups go to the resolver, per its breaker.
enum Asking {
    Yes,
    /// In the background only, as the breaker's probe.
    Probe(Arc<Probe>),
    No,
    /// Not at all, for a request decided without waiting if the cache holds every fact it
    /// needs: `missed` says it did not; `hits` is counted only if it did.
    CacheOnly {
        missed: AtomicBool,
        hits: AtomicU64,
    },
}

/// Looks up DNS facts with one resolver and one cache; shared by every connection.
pub struct Gatherer {
    auth: MessageAuthenticator,
    settings: DnsSettings,
    /// This host's name, for SPF's `%{r}` macro.
    host_domain: String,
    cache: Arc<TtlCache<Key, Value>>,
    /// Sender domains that publish no SPF record: `none` for every address and every
    /// sender of them, without asking again (and without an entry per address and sender
    /// in `cache`). Asked by `&str`: no allocation per request.
    no_spf: Arc<TtlCache<String, ()>>,
    stats: Arc<DnsStats>,
    in_flight: Arc<tokio::sync::Semaphore>,
    breaker: Arc<Breaker>,
}

impl fmt::Debug for Gatherer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gatherer")
            .field("settings", &self.settings)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The configuration of a resolver asking `server` (UDP, then TCP for truncated answers),
/// or the system's resolvers (`/etc/resolv.conf`) when `None`.
pub fn resolver_config(
    server: Option<SocketAddr>,
) -> Result<(ResolverConfig, ResolverOpts), DnsSetupError> {
    match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            Ok((
                ResolverConfig::from_name_servers(vec![ns]),
                ResolverOpts::default(),
            ))
        }
        None => hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| DnsSetupError(format!("reading the system configuration: {e}"))),
    }
}

impl Gatherer {
    /// A gatherer asking `settings.resolver` (or the system's resolvers). Must be called
    /// inside a Tokio runtime.
    pub fn new(
        settings: &DnsSettings,
        host_domain: &str,
        stats: Arc<DnsStats>,
    ) -> Result<Gatherer, DnsSetupError> {
        let resolver_name = settings
            .resolver
            .map_or_else(|| "system resolver".to_string(), |a| a.to_string());
        let (config, mut opts) = resolver_config(settings.resolver)?;
        // One try per server, not the resolv.conf default of 5 s × 2: the request stops
        // waiting after `budget` anyway, and a background lookup should end soon.
        opts.timeout = Duration::from_secs(2).max(settings.budget);
        opts.attempts = 1;
        // The records behind the answers (a domain's SPF record and its includes, for the
        // next address of a known sender): the answers themselves are in `cache`.
        opts.cache_size = settings.cache_size.min(RESOLVER_CACHE_MAX) as u64;
        opts.positive_max_ttl = Some(MAX_TTL);
        opts.negative_max_ttl = Some(MAX_TTL);
        opts.use_hosts_file = ResolveHosts::Never;
        // Busy mail servers ask many questions at once.
        opts.max_active_requests = 256;
        let resolver: TokioResolver =
            Resolver::builder_with_config(config, TokioRuntimeProvider::default())
                .with_options(opts)
                .build()
                .map_err(|e| DnsSetupError(e.to_string()))?;
        Ok(Gatherer {
            auth: MessageAuthenticator(resolver),
            settings: settings.clone(),
            host_domain: host_domain.to_string(),
            cache: Arc::new(TtlCache::new(settings.cache_size)),
            no_spf: Arc::new(TtlCache::new(settings.cache_size)),
            breaker: Arc::new(Breaker::new(resolver_name, settings.budget, stats.clone())),
            stats,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// The settings it was built from (a reload keeps the gatherer, and its cache, while
    /// they stay the same).
    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    pub fn host_domain(&self) -> &str {
        &self.host_domain
    }

    /// How long the resolver has not been answering (its breaker open), or `None`.
    pub fn resolver_down_for(&self) -> Option<Duration> {
        self.breaker.down_for()
    }

    /// Gathers DNS facts for `req` when it gets as far as the stored state (rules 1–3 do
    /// not decide it without facts) and carries none yet: allow-listed, authenticated and
    /// non-RCPT requests cost no DNS. Returns the request with its facts, and what DNS said.
    pub async fn facts_for(
        &self,
        engine: &Engine,
        req: &Request,
        now: u64,
    ) -> Option<(Request, Gathered)> {
        match self.gather_for(engine, req, now).await {
            FactsNow::NotNeeded(_) => None,
            FactsNow::Gathered(gathered, _) => {
                let mut with = req.clone();
                with.facts = Some(gathered.facts.clone());
                Some((with, gathered))
            }
        }
    }

    /// [`Gatherer::facts_for`] for a caller that decides the request: the facts (waited
    /// for, within the budget) and the classification so far, as [`Gatherer::facts_now`]
    /// gives them, so that the request is classified once.
    pub async fn gather_for<'e>(
        &self,
        engine: &'e Engine,
        req: &Request,
        now: u64,
    ) -> FactsNow<'e> {
        match needs_facts(engine, req, now) {
            Ok((ip, unkeyed)) => {
                FactsNow::Gathered(self.gather(&ask_for(ip, engine, req)).await, unkeyed)
            }
            Err(not_needed) => not_needed,
        }
    }

    /// What [`Gatherer::facts_for`] gathers, without waiting, when nothing has to be waited
    /// for: the cache holds every fact the request needs, or the resolver is not being
    /// asked (its breaker is open). The caller puts `facts` into its request (no copy of
    /// the request here). `Err(NeedsLookups)`: lookups are needed; use `gather_for`.
    pub fn facts_now<'e>(
        &self,
        engine: &'e Engine,
        req: &Request,
        now: u64,
    ) -> Result<FactsNow<'e>, NeedsLookups> {
        let (ip, unkeyed) = match needs_facts(engine, req, now) {
            Ok(needed) => needed,
            Err(not_needed) => return Ok(not_needed),
        };
        let asking = if self.breaker.skipping() {
            Asking::No
        } else {
            Asking::CacheOnly {
                missed: AtomicBool::new(false),
                hits: AtomicU64::new(0),
            }
        };
        let ask = ask_for(ip, engine, req);
        // Neither mode starts a lookup, so nothing is waited on: ready at the first poll.
        let gathered = poll_once(self.gather_with(&ask, &asking)).ok_or(NeedsLookups)?;
        if let Asking::CacheOnly { missed, hits } = &asking {
            if missed.load(Ordering::Relaxed) {
                return Err(NeedsLookups);
            }
            self.stats.cache_hits.add(hits.load(Ordering::Relaxed));
        }
        self.stats.gathers.add(1);
        self.stats.gather_seconds.observe(gathered.elapsed);
        Ok(FactsNow::Gathered(gathered, unkeyed))
    }

    /// Gathers the facts of one request within the budget. Never fails: what is not known
    /// in time is marked as such.
    pub async fn gather(&self, ask: &Ask<'_>) -> Gathered {
        self.stats.gathers.add(1);
        let asking = match self.breaker.admit() {
            Admit::Ask => Asking::Yes,
            Admit::Probe => Asking::Probe(Probe::new(self.breaker.clone())),
            Admit::Skip => Asking::No,
        };
        let gathered = self.gather_with(ask, &asking).await;
        self.stats.gather_seconds.observe(gathered.elapsed);
        gathered
    }

    async fn gather_with(&self, ask: &Ask<'_>, asking: &Asking) -> Gathered {
        let started = Instant::now();
        let deadline = started + self.settings.budget;
        let ip = canonical_ip(ask.ip);

        // Start every lookup before waiting for any: they run side by side.
        // Lower-cased for the cache's keys; senders nearly always are already (no copy).
        let stripped = strip_envelope(ask.sender);
        let sender: Cow<'_, str> = if stripped.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(stripped.to_ascii_lowercase())
        } else {
            Cow::Borrowed(stripped)
        };
        let domain = sender
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.'))
            .filter(|d| !d.is_empty());
        let spf = match domain {
            Some(d) if ask.spf => Some((d, self.start_spf(asking, ip, &sender, d, ask.helo))),
            _ => None,
        };
        let name = match mta_host_name(ask.client_name, ask.reverse_client_name) {
            Some(known) => Err(known),
            None if ask.name && self.settings.ptr_lookup => Ok(self.start_name(asking, ip)),
            None => Err(HostName::Unknown),
        };
        let start_lists = |zones: &[String]| -> Vec<(String, Pending)> {
            zones
                .iter()
                .map(|z| (z.clone(), self.start_list(asking, z, ip)))
                .collect()
        };
        let dnswl = start_lists(&self.settings.dnswl_zones);
        let dnsbl = start_lists(&self.settings.dnsbl_zones);

        let mut trouble = Vec::new();
        let mut timed_out = false;
        let mut skipped = false;
        let mut note = |what: &str, o: &Outcome| match o {
            Outcome::Answer(_) => {}
            Outcome::TimedOut => {
                timed_out = true;
                trouble.push(format!("{what} (timed out)"));
            }
            Outcome::Failed(e) => trouble.push(format!("{what} ({e})")),
            Outcome::Skipped => {
                skipped = true;
                trouble.push(what.to_string());
            }
        };
        // Whether the resolver was waited on, and answered something in time.
        let mut waited = false;
        let mut answered = false;

        let mut facts = IdentityFacts::default();
        if let Some((domain, pending)) = spf {
            let o = self
                .finish(pending, deadline, &mut waited, &mut answered)
                .await;
            note("spf", &o);
            let result = match o {
                Outcome::Answer(Value::Spf(r)) => r,
                Outcome::TimedOut | Outcome::Skipped => SpfResult::Timeout,
                _ => SpfResult::TempError,
            };
            facts.spf = Some(SpfFact {
                domain: domain.to_string(),
                result,
            });
        }
        facts.name = match name {
            Err(known) => known,
            Ok(pending) => {
                let o = self
                    .finish(pending, deadline, &mut waited, &mut answered)
                    .await;
                note("host name", &o);
                match o {
                    Outcome::Answer(Value::Name(n)) => n,
                    _ => HostName::Timeout,
                }
            }
        };
        for (kind, lookups, listing) in [
            ("dnswl", dnswl, &mut facts.dnswl),
            ("dnsbl", dnsbl, &mut facts.dnsbl),
        ] {
            listing.complete = true;
            for (zone, pending) in lookups {
                let o = self
                    .finish(pending, deadline, &mut waited, &mut answered)
                    .await;
                note(&format!("{kind} {zone}"), &o);
                match o {
                    Outcome::Answer(Value::List(ListAnswer::Listed(_))) => {
                        listing.hits.push(zone);
                    }
                    Outcome::Answer(Value::List(ListAnswer::NotListed)) => {}
                    // An error code from the zone, a timeout or a failure: "not listed"
                    // cannot be claimed, but neither is a listing.
                    _ => listing.complete = false,
                }
            }
        }
        if waited {
            self.breaker.gathered(answered, timed_out);
        }
        let elapsed = started.elapsed();
        Gathered {
            facts,
            trouble,
            timed_out,
            resolver_down: if skipped {
                Some(self.breaker.down_for().unwrap_or_default())
            } else {
                None
            },
            elapsed,
        }
    }

    /// The cached value of `key`, counted as a hit, if there is one.
    fn cached(&self, asking: &Asking, key: &Key) -> Option<Pending> {
        let v = self.cache.get(key, std::time::Instant::now())?;
        Some(self.hit(asking, v))
    }

    /// An answer from the cache, counted.
    fn hit(&self, asking: &Asking, v: Value) -> Pending {
        match asking {
            Asking::CacheOnly { hits, .. } => {
                hits.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.stats.cache_hits.add(1),
        }
        Pending::Ready(v)
    }

    /// Answers from the cache, or starts the lookup `work` makes as a task that caches what
    /// it finds (unless the resolver is not being asked). `work` is called only when the
    /// lookup starts: a cached or skipped one copies nothing.
    fn start<F>(&self, asking: &Asking, key: Key, work: impl FnOnce() -> F) -> Pending
    where
        F: Future<Output = Answer> + Send + 'static,
    {
        if let Some(ready) = self.cached(asking, &key) {
            return ready;
        }
        let probe = match asking {
            Asking::Yes => None,
            Asking::Probe(p) => Some(p.clone()),
            Asking::No => {
                self.stats.skipped.add(1);
                return Pending::Skipped;
            }
            Asking::CacheOnly { missed, .. } => {
                missed.store(true, Ordering::Relaxed);
                return Pending::Skipped;
            }
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Pending::Refused;
        };
        self.stats.lookups.add(1);
        let cache = self.cache.clone();
        if let Some(p) = &probe {
            p.asked();
        }
        let work = work();
        let task = tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(LOOKUP_LIMIT, work).await {
                Ok(Ok((value, ttl))) => {
                    if let Some(p) = &probe
                        && is_answer(&value)
                    {
                        p.answered();
                    }
                    cache.insert(key, value.clone(), ttl, std::time::Instant::now());
                    Ok(value)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("no answer within {} s", LOOKUP_LIMIT.as_secs())),
            }
        });
        if matches!(asking, Asking::Probe(_)) {
            // A probe runs in the background: the request does not wait on it.
            self.stats.skipped.add(1);
            return Pending::Skipped;
        }
        Pending::Running(task)
    }

    /// Waits for a lookup until `deadline`; the task goes on without us after that.
    /// `waited`: a lookup went to the resolver; `answered`: one got its answer in time.
    async fn finish(
        &self,
        pending: Pending,
        deadline: Instant,
        waited: &mut bool,
        answered: &mut bool,
    ) -> Outcome {
        let failed = |e: String| {
            self.stats.failures.add(1);
            Outcome::Failed(e)
        };
        let handle = match pending {
            Pending::Ready(v) => return Outcome::Answer(v),
            Pending::Skipped => return Outcome::Skipped,
            Pending::Running(h) => h,
            Pending::Refused => {
                return failed(format!(
                    "not looked up: {MAX_IN_FLIGHT} lookups already in flight"
                ));
            }
        };
        *waited = true;
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(Ok(v))) => {
                *answered |= is_answer(&v);
                Outcome::Answer(v)
            }
            Ok(Ok(Err(e))) => failed(e),
            Ok(Err(e)) => failed(format!("lookup task failed: {e}")),
            Err(_) => {
                self.stats.timeouts.add(1);
                Outcome::TimedOut
            }
        }
    }

    fn start_spf(
        &self,
        asking: &Asking,
        ip: IpAddr,
        sender: &str,
        domain: &str,
        helo: &str,
    ) -> Pending {
        // A domain known to publish no SPF record answers `none` for any sender and
        // address: no lookup (and, on `facts_now`'s path, no wait) for a new one.
        if self.no_spf.get(domain, std::time::Instant::now()).is_some() {
            return self.hit(asking, Value::Spf(SpfResult::None));
        }
        let key = Key::Spf(ip, sender.to_string());
        self.start(asking, key, || {
            let auth = self.auth.clone();
            let sender = sender.to_string();
            let domain = domain.to_string();
            let helo = if helo.is_empty() { "unknown" } else { helo }.to_string();
            let host = self.host_domain.clone();
            let no_spf = self.no_spf.clone();
            async move {
                let check = |ip| spf_check(&auth, ip, &sender, &helo, &host);
                let mut result = check(ip).await;
                if result == SpfResult::Pass {
                    // Over-broad SPF: identities are what auto-allow trusts, and
                    // `spf:<domain>` from a record that passes everybody (`+all`, a bare
                    // `all`, `ip4:0.0.0.0/0`, a wildcard `exists:`) would let anyone who
                    // writes that domain into MAIL FROM share the trust its real mail
                    // earned, from any address. Such a pass names no pool: check addresses
                    // nobody can send from too, and when they pass as well the result is
                    // `pass-any`, no identity.
                    let [a, b] = spf_canaries(ip);
                    let (ra, rb) = tokio::join!(check(a), check(b));
                    if ra == SpfResult::Pass || rb == SpfResult::Pass {
                        result = SpfResult::PassAny;
                    }
                }
                let ttl = match result {
                    // `none` is the domain's word, not the address's: no record (or no
                    // domain). Kept once for the domain, as long as any answer, so a
                    // domain that starts publishing one is heard of within `MAX_TTL` as
                    // for the rest; not again for this address and sender.
                    SpfResult::None => {
                        no_spf.insert(domain, (), MAX_TTL, std::time::Instant::now());
                        Duration::ZERO
                    }
                    // A temporary error is not worth keeping.
                    SpfResult::TempError => Duration::ZERO,
                    // The rest is the domain's word for this address.
                    _ => MAX_TTL,
                };
                Ok((Value::Spf(result), ttl))
            }
        })
    }

    fn start_name(&self, asking: &Asking, ip: IpAddr) -> Pending {
        self.start(asking, Key::Name(ip), || {
            let resolver = self.auth.0.clone();
            async move {
                let (name, ttl) = confirmed_name(&resolver, ip).await?;
                Ok((Value::Name(name), ttl))
            }
        })
    }

    fn start_list(&self, asking: &Asking, zone: &str, ip: IpAddr) -> Pending {
        self.start(asking, Key::List(zone.to_string(), ip), || {
            let resolver = self.auth.0.clone();
            let qname = list_query_name(ip, zone);
            async move {
                match resolver.ipv4_lookup(qname.as_str()).await {
                    Ok(lookup) => {
                        let addrs: Vec<_> = lookup
                            .answers()
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::A(a) => Some(a.0),
                                _ => None,
                            })
                            .collect();
                        Ok((
                            Value::List(classify_list_answer(&addrs)),
                            ttl_until(lookup.valid_until()),
                        ))
                    }
                    Err(e) if e.is_no_records_found() => {
                        Ok((Value::List(ListAnswer::NotListed), negative_ttl(&e)))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        })
    }
}

/// A request's facts need lookups: they cannot be had without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsLookups;

/// The client address and the classification so far of a request that needs DNS facts,
/// or why it needs none.
// The error is the callers' answer, handed straight on.
#[allow(clippy::result_large_err)]
fn needs_facts<'e>(
    engine: &'e Engine,
    req: &Request,
    now: u64,
) -> Result<(IpAddr, Unkeyed<'e>), FactsNow<'e>> {
    let Some(ip) = req.client_ip else {
        return Err(FactsNow::NotNeeded(None));
    };
    if req.facts.is_some() {
        return Err(FactsNow::NotNeeded(None));
    }
    match engine.classify_unkeyed(req, now) {
        Ok(unkeyed) => Ok((ip, unkeyed)),
        Err(decided) => Err(FactsNow::NotNeeded(Some(Classified::Decided(decided)))),
    }
}

/// What `req` asks about: the lookups its identity order uses.
fn ask_for<'r>(ip: IpAddr, engine: &Engine, req: &'r Request) -> Ask<'r> {
    let order = &engine.selective.identity_order;
    Ask {
        ip,
        sender: &req.sender,
        helo: &req.helo,
        client_name: &req.client_name,
        reverse_client_name: &req.reverse_client_name,
        spf: order.contains(&IdentityKind::Spf),
        name: order.contains(&IdentityKind::Org),
    }
}

/// Polls `f` once: its output if it is ready at once.
fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Whether a lookup's value shows the resolver answering: SPF's `temperror` is what a
/// check that got no answer ends with too, so it says nothing.
fn is_answer(v: &Value) -> bool {
    !matches!(v, Value::Spf(SpfResult::TempError))
}

/// RFC 7208 `check_host()` of the MAIL FROM identity.
async fn spf_check(
    auth: &MessageAuthenticator,
    ip: IpAddr,
    sender: &str,
    helo: &str,
    host: &str,
) -> SpfResult {
    type Params<'x> = mail_auth::Parameters<
        'x,
        SpfParameters<'x>,
        NoCache<Box<str>, mail_auth::Txt>,
        NoCache<Box<str>, mail_auth::RecordSet<mail_auth::MX>>,
        NoCache<Box<str>, mail_auth::RecordSet<std::net::Ipv4Addr>>,
        NoCache<Box<str>, mail_auth::RecordSet<std::net::Ipv6Addr>>,
        NoCache<IpAddr, mail_auth::RecordSet<Box<str>>>,
    >;
    let params: Params<'_> =
        mail_auth::Parameters::new(SpfParameters::verify_mail_from(ip, helo, host, sender));
    // mail-auth's check is a future of tens of kilobytes: boxed, once it starts, instead
    // of inside every lookup task (which spawning copies whole, and three checks for a
    // pass's canaries would triple).
    match Box::pin(auth.check_host(params)).await.result() {
        mail_auth::SpfResult::Pass => SpfResult::Pass,
        mail_auth::SpfResult::Fail => SpfResult::Fail,
        mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
        mail_auth::SpfResult::Neutral => SpfResult::Neutral,
        mail_auth::SpfResult::TempError => SpfResult::TempError,
        mail_auth::SpfResult::PermError => SpfResult::PermError,
        mail_auth::SpfResult::None => SpfResult::None,
    }
}

/// Forward-confirmed reverse DNS: a PTR name of `ip` whose A/AAAA records contain `ip`.
async fn confirmed_name(
    resolver: &TokioResolver,
    ip: IpAddr,
) -> Result<(HostName, Duration), String> {
    let ptr = match resolver.reverse_lookup(ip).await {
        Ok(l) => l,
        Err(e) if e.is_no_records_found() => return Ok((HostName::Unverified, negative_ttl(&e))),
        Err(e) => return Err(format!("PTR: {e}")),
    };
    let mut ttl = ttl_until(ptr.valid_until());
    let names: Vec<String> = ptr
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .take(MAX_PTR_NAMES)
        .collect();
    let mut checks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let resolver = resolver.clone();
        let name = name.clone();
        checks.spawn(async move { (i, resolves_to(&resolver, &name, ip).await) });
    }
    let mut confirmed: Option<usize> = None;
    let mut error = None;
    while let Some(done) = checks.join_next().await {
        match done {
            Ok((i, Ok((true, t)))) => {
                ttl = ttl.min(t);
                confirmed = Some(confirmed.map_or(i, |c| c.min(i)));
            }
            Ok((_, Ok((false, t)))) => ttl = ttl.min(t),
            Ok((_, Err(e))) => error = Some(e),
            Err(e) => error = Some(e.to_string()),
        }
    }
    match (confirmed, error) {
        (Some(i), _) => {
            let name = names[i].trim_end_matches('.').to_ascii_lowercase();
            Ok((HostName::Verified(name), ttl))
        }
        // A name that might have confirmed could not be checked: not "unverified".
        (None, Some(e)) => Err(e),
        (None, None) => Ok((HostName::Unverified, ttl)),
    }
}

/// Whether `name`'s addresses of `ip`'s family include `ip`, and for how long that holds.
async fn resolves_to(
    resolver: &TokioResolver,
    name: &str,
    ip: IpAddr,
) -> Result<(bool, Duration), String> {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let lookup = match ip {
        IpAddr::V4(_) => resolver.ipv4_lookup(fqdn.as_str()).await,
        IpAddr::V6(_) => resolver.ipv6_lookup(fqdn.as_str()).await,
    };
    match lookup {
        Ok(l) => {
            let hit = l.answers().iter().any(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0) == ip,
                RData::AAAA(a) => IpAddr::V6(a.0) == ip,
                _ => false,
            });
            Ok((hit, ttl_until(l.valid_until())))
        }
        Err(e) if e.is_no_records_found() => Ok((false, negative_ttl(&e))),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

fn ttl_until(valid_until: std::time::Instant) -> Duration {
    valid_until.saturating_duration_since(std::time::Instant::now())
}

/// The negative TTL a "no such name" answer carries (its SOA), or a default.
fn negative_ttl(e: &NetError) -> Duration {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => nr
            .negative_ttl
            .map_or(DEFAULT_NEGATIVE_TTL, |s| Duration::from_secs(u64::from(s))),
        _ => DEFAULT_NEGATIVE_TTL,
    }
}

#[cfg(test)]
mod tests;
