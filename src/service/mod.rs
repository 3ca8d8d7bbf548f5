//! The greylisting service shared by every front end: engine + store + failure policy.
//!
//! Front ends turn their protocol into an engine `Request`, read the clock, and call
//! [`Greylister::check`]. This is the one place that talks to the store on a request's
//! behalf, applies `store_timeout` and `fail_mode`, and logs the decision.

pub mod entries;
pub mod explain;
pub mod throttle;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::dns::{FactsNow, Gatherer, NeedsLookups};
use crate::engine::{
    Classified, ClientRecord, Decision, Engine, ListKind, Lookup, Mode, Request, Rule,
    RuntimeEntry, Target, Triplet, TripletKey, TripletOutcome, Verdict,
};
use crate::logfmt::Summarised;
use crate::metrics::{Activity, DecisionSeen, ListenerStats, Metrics, StoreOp};
use crate::store::{MemoryStore, Store, StoreError, UpdateFn};

pub use entries::{EntriesError, RuntimeEntries, Selector};
pub use throttle::Throttle;

/// What to answer when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

/// Unix seconds now. Front ends call this; the engine never does.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `tokio::time::timeout`, with the timer armed only when `fut` does not finish at its
/// first poll: a timer costs a runtime handle (a reference count every worker shares) and
/// a clock read, for futures that nearly always finish at once (in-process store lookups,
/// replies that fit the socket buffer).
pub async fn timeout_if_waiting<F: std::future::Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => tokio::time::timeout(limit, fut).await,
    }
}

/// A decision and whether it is enforced (`learn` mode only records it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub enforced: bool,
}

impl Outcome {
    /// The verdict the MTA gets: in learn mode everything is accepted.
    pub fn effective(&self) -> Verdict {
        if self.enforced {
            self.decision.verdict
        } else if self.decision.verdict == Verdict::Defer {
            Verdict::Pass
        } else {
            self.decision.verdict
        }
    }
}

/// A decision made, its bookkeeping not yet done (see [`Greylister::decide`]).
pub struct Decided<'r> {
    pub outcome: Outcome,
    /// The request as decided (with DNS facts, when they were gathered).
    req: Cow<'r, Request>,
    dns_note: Option<String>,
    now: u64,
    /// When deciding began and ended.
    started: Instant,
    finished: Instant,
}

impl<'r> Decided<'r> {
    fn new(
        live: &Live,
        decision: Decision,
        req: Cow<'r, Request>,
        dns_note: Option<String>,
        now: u64,
        started: Instant,
        finished: Option<Instant>,
    ) -> Self {
        let enforced = decision.enforced(live.options.mode);
        Decided {
            outcome: Outcome { decision, enforced },
            req,
            dns_note,
            now,
            started,
            finished: finished.unwrap_or_else(Instant::now),
        }
    }
}

/// Settings of the service beyond the engine's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceOptions {
    pub mode: Mode,
    pub fail_mode: FailMode,
    pub store_timeout: Duration,
}

/// The store, which may be missing while it cannot be opened (the daemon then answers
/// per `fail_mode` and keeps trying to open it).
pub struct StoreSlot {
    // Read on every request by every worker: a lock or a reference count here would be a
    // cache line the workers pass back and forth; arc-swap's loads are thread-local.
    store: ArcSwapOption<Arc<dyn Store>>,
    why_missing: Mutex<String>,
}

/// The store in the slot, borrowed for one request.
pub struct StoreRef(arc_swap::Guard<Option<Arc<Arc<dyn Store>>>>);

impl std::ops::Deref for StoreRef {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match &*self.0 {
            Some(store) => &***store,
            None => unreachable!("a StoreRef is only made for a present store"),
        }
    }
}

impl StoreSlot {
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreSlot {
            store: ArcSwapOption::from_pointee(store),
            why_missing: Mutex::new(String::new()),
        }
    }

    pub fn missing(why: String) -> Self {
        StoreSlot {
            store: ArcSwapOption::empty(),
            why_missing: Mutex::new(why),
        }
    }

    pub fn get(&self) -> Result<Arc<dyn Store>, StoreError> {
        match self.store.load_full() {
            Some(store) => Ok(Arc::clone(&store)),
            None => Err(self.unavailable()),
        }
    }

    /// The store for one request, without touching its reference count.
    pub fn borrow(&self) -> Result<StoreRef, StoreError> {
        self.present().ok_or_else(|| self.unavailable())
    }

    /// [`StoreSlot::borrow`] without the error (which takes a lock to spell).
    fn present(&self) -> Option<StoreRef> {
        let guard = self.store.load();
        guard.is_some().then(|| StoreRef(guard))
    }

    fn unavailable(&self) -> StoreError {
        StoreError::Unavailable(
            self.why_missing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// True while the store is open and writing what changes: a store whose commits fail
    /// (a full disk) still answers from memory, and a shared store whose server is
    /// unreachable answers per `fail_mode`, but neither is available in this sense.
    pub fn available(&self) -> bool {
        self.present().is_some_and(|s| {
            let h = s.health();
            !h.writes_failing && !h.server_unreachable
        })
    }

    /// The open store's health; `None` while the store is missing.
    pub fn health(&self) -> Option<crate::store::StoreHealth> {
        self.present().map(|s| s.health())
    }

    pub fn set(&self, store: Arc<dyn Store>) {
        self.store.store(Some(Arc::new(store)));
    }

    pub fn set_missing(&self, why: String) {
        *self.why_missing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// What a reload replaces in one step: the engine (policy, allow lists, runtime entries),
/// the service options and the DNS facts gatherer.
#[derive(Debug, Clone)]
pub struct Live {
    pub engine: Engine,
    pub options: ServiceOptions,
    /// `None`: DNS off; requests carry no facts and are keyed on the IP prefix.
    pub dns: Option<Arc<Gatherer>>,
}

/// Engine, store and failure policy, with the counters the admin API reports.
pub struct Greylister {
    live: ArcSwap<Live>,
    pub store: StoreSlot,
    pub metrics: Metrics,
    pub activity: Activity,
    /// Operator allow/deny entries; changing them swaps a new engine into `live`.
    pub entries: RuntimeEntries,
    /// One read of a shared store's entries at a time (the poller, changes, listings).
    entries_sync: tokio::sync::Mutex<()>,
    /// New triplets per client group, for `new_triplets_per_client`.
    pub throttle: Throttle,
    listeners: Mutex<Vec<Arc<ListenerStats>>>,
    /// Unix seconds the service was created.
    pub started_at: u64,
    /// Requests answered per `fail_mode`: one warning, then a count per interval.
    store_failing: Arc<Summarised>,
    /// Passes not counted towards auto-allow for a store error, likewise.
    pass_uncounted: Arc<Summarised>,
}

impl Greylister {
    pub fn new(engine: Engine, store: StoreSlot, options: ServiceOptions) -> Self {
        Greylister {
            live: ArcSwap::from_pointee(Live {
                engine,
                options,
                dns: None,
            }),
            store,
            metrics: Metrics::default(),
            activity: Activity::default(),
            entries: RuntimeEntries::in_memory(),
            entries_sync: tokio::sync::Mutex::new(()),
            throttle: Throttle::default(),
            listeners: Mutex::new(Vec::new()),
            started_at: unix_now(),
            store_failing: Summarised::new(|count, over| {
                tracing::warn!(
                    target: DECISION_TARGET,
                    count,
                    "store still failing: {count} more requests answered per fail_mode in the last {over:?}"
                );
            }),
            pass_uncounted: Summarised::new(|count, over| {
                tracing::warn!(
                    count,
                    "could not count {count} more passes towards auto-allow in the last {over:?}"
                );
            }),
        }
    }

    /// Uses `entries` (loaded from their file) as the runtime entries from now on.
    pub fn with_entries(mut self, entries: RuntimeEntries) -> Self {
        self.entries = entries;
        self.refresh_runtime(unix_now());
        self
    }

    /// Gathers DNS facts with `dns` from now on (`None`: no DNS).
    pub fn with_dns(self, dns: Option<Arc<Gatherer>>) -> Self {
        self.live.rcu(|cur| Live {
            dns: dns.clone(),
            ..Live::clone(cur)
        });
        self
    }

    /// The engine and options in force now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Replaces engine and options (a reload); the runtime entries carry over.
    pub fn replace_live(&self, mut live: Live) {
        live.engine.runtime = self.live.load().engine.runtime.clone();
        self.live.store(Arc::new(live));
    }

    /// Recompiles the runtime entries alive at `now` into the engine.
    pub fn refresh_runtime(&self, now: u64) {
        let lists = Arc::new(self.entries.compile(now));
        self.live.rcu(|cur| {
            let mut next = Live::clone(cur);
            next.engine.runtime = lists.clone();
            next
        });
    }

    /// Rebuilds the engine's runtime lists once an entry has expired (maintenance tick).
    /// With a shared store the expired entries are also removed there (by whichever daemon
    /// comes first; they stopped matching at their expiry anyway).
    pub async fn expire_runtime(&self, now: u64) {
        let due = self.live.load().engine.runtime.next_expiry();
        if due.is_none_or(|t| t > now) {
            return;
        }
        if self.entries.is_shared() {
            let expired: Vec<u64> = self
                .entries
                .list()
                .iter()
                .filter(|e| !e.alive(now))
                .map(|e| e.id)
                .collect();
            if let Ok(store) = self.store.get()
                && let Some(shared) = store.shared_entries()
                && let Err(e) = shared.remove_entries(&expired).await
            {
                tracing::debug!(error = %e, "could not remove expired runtime entries from the store");
            }
        }
        self.entries.drop_expired(now);
        self.refresh_runtime(now);
    }

    /// The shared store's entries interface, for a daemon whose entries live there.
    fn shared_store(&self) -> Result<Option<Arc<dyn Store>>, EntriesError> {
        if !self.entries.is_shared() {
            return Ok(None);
        }
        let store = self.store.get().map_err(EntriesError::Store)?;
        match store.shared_entries() {
            Some(_) => Ok(Some(store)),
            None => Err(EntriesError::Store(StoreError::Unavailable(
                "this store does not keep runtime entries".into(),
            ))),
        }
    }

    /// Adds (or updates) a runtime entry; it applies to the next request (on every daemon
    /// of a shared store once each has read it: within `[admin] entries_poll`).
    pub async fn add_entry(
        &self,
        list: ListKind,
        target: Target,
        value: &str,
        ttl: Option<u64>,
        comment: &str,
        now: u64,
    ) -> Result<RuntimeEntry, EntriesError> {
        let e = match self.shared_store()? {
            Some(store) => {
                let shared = store.shared_entries().expect("checked by shared_store");
                let e = entries::add_shared(shared, list, target, value, ttl, comment, now).await?;
                self.poll_entries(now).await;
                e
            }
            None => return self.add_file_entry(list, target, value, ttl, comment, now),
        };
        tracing::info!(entry = %e, "runtime entry added");
        Ok(e)
    }

    /// [`Greylister::add_entry`] for entries kept in a file (or memory): synchronous, as it
    /// writes and syncs the file, so a caller that must not hold up its runtime runs it on
    /// a blocking thread. With a shared store it is an error (`EntriesError::Store`).
    pub fn add_file_entry(
        &self,
        list: ListKind,
        target: Target,
        value: &str,
        ttl: Option<u64>,
        comment: &str,
        now: u64,
    ) -> Result<RuntimeEntry, EntriesError> {
        if self.entries.is_shared() {
            return Err(EntriesError::Store(StoreError::Unavailable(
                "runtime entries are kept in the shared store".into(),
            )));
        }
        let e = self.entries.add(list, target, value, ttl, comment, now)?;
        self.refresh_runtime(now);
        tracing::info!(entry = %e, "runtime entry added");
        Ok(e)
    }

    /// Removes runtime entries; they stop applying to the next request.
    pub async fn remove_entries(
        &self,
        list: ListKind,
        sel: &Selector,
        now: u64,
    ) -> Result<Vec<RuntimeEntry>, EntriesError> {
        let gone = match self.shared_store()? {
            Some(store) => {
                let shared = store.shared_entries().expect("checked by shared_store");
                let gone = entries::remove_shared(shared, list, sel).await?;
                self.poll_entries(now).await;
                gone
            }
            None => {
                let gone = self.entries.remove(list, sel)?;
                self.refresh_runtime(now);
                gone
            }
        };
        for e in &gone {
            tracing::info!(entry = %e, "runtime entry removed");
        }
        Ok(gone)
    }

    /// Every runtime entry (expired ones included until the next clean-up), by id: read
    /// afresh from a shared store when it answers, else the entries last read.
    pub async fn list_entries(&self) -> Vec<RuntimeEntry> {
        if self.entries.is_shared() {
            self.poll_entries(unix_now()).await;
        }
        self.entries.list()
    }

    /// Reads the entries of a shared store again if its change marker moved, and compiles
    /// them; while the store cannot be read, the entries last read stay in force (said once
    /// in the log, and once when the store answers again). Nothing to do for entries kept
    /// in a file. Bounded by the store's timeout.
    pub async fn poll_entries(&self, now: u64) {
        if !self.entries.is_shared() {
            return;
        }
        let _one = self.entries_sync.lock().await;
        match self.sync_entries(now).await {
            Ok(changed) => {
                if self.entries.set_failing(false) && self.entries.synced().is_some() {
                    tracing::warn!(
                        entries = self.entries.list().len(),
                        "runtime entries readable in the store again"
                    );
                }
                if changed {
                    tracing::info!(
                        entries = self.entries.list().len(),
                        version = self.entries.synced().unwrap_or(0),
                        "runtime entries read from the store"
                    );
                }
            }
            Err(e) => {
                if self.entries.set_failing(true) {
                    tracing::warn!(
                        error = %e, entries = self.entries.list().len(),
                        "cannot read the runtime entries in the store; the entries last read stay in force"
                    );
                }
            }
        }
    }

    /// [`Greylister::poll_entries`] without the logging; true when the entries changed.
    async fn sync_entries(&self, now: u64) -> Result<bool, StoreError> {
        let store = self.store.get()?;
        let Some(shared) = store.shared_entries() else {
            return Ok(false);
        };
        if let Some(path) = self.entries.take_import() {
            self.import_entries(shared, &path, now).await?;
        }
        let version = shared.entries_version().await?;
        if self.entries.synced() == Some(version) {
            return Ok(false);
        }
        let (version, list) = shared.list_entries().await?;
        self.entries.set_synced(version, list);
        self.refresh_runtime(now);
        Ok(true)
    }

    /// Imports an entries file from before the switch to a shared store (see
    /// [`RuntimeEntries::shared`]); a store error puts it back for the next attempt.
    async fn import_entries(
        &self,
        shared: &dyn crate::store::SharedEntries,
        path: &std::path::Path,
        now: u64,
    ) -> Result<(), StoreError> {
        let file = match RuntimeEntries::load(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "runtime entries file not imported into the store");
                return Ok(());
            }
        };
        let alive: Vec<RuntimeEntry> = file.list().into_iter().filter(|e| e.alive(now)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        let put_back = |e: StoreError| {
            self.entries.put_import(path.to_path_buf());
            e
        };
        let (_, existing) = shared.list_entries().await.map_err(put_back)?;
        if !existing.is_empty() {
            tracing::warn!(
                file = %path.display(), entries = alive.len(),
                "runtime entries file ignored: the store keeps the entries and has some already \
                 (add them with `greygate allow add` / `deny add` if they are still wanted)"
            );
            return Ok(());
        }
        for e in &alive {
            match shared.put_entry(e, entries::MAX_ENTRIES).await {
                Ok(_) => {}
                Err(err) => return Err(put_back(err)),
            }
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".imported");
        let done = path.with_file_name(name);
        if let Err(e) = std::fs::rename(path, &done) {
            tracing::warn!(file = %path.display(), error = %e, "imported runtime entries file could not be renamed");
        }
        tracing::warn!(
            file = %path.display(), renamed = %done.display(), entries = alive.len(),
            "runtime entries file imported into the store, which keeps them from now on"
        );
        Ok(())
    }

    /// Counts a new listener's connections from now on.
    pub fn register_listener(&self, stats: Arc<ListenerStats>) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats);
    }

    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Decides one request at `now` and records it in the store, then counts and logs the
    /// decision. Never fails: store trouble becomes a fail-open (or fail-closed) decision.
    pub async fn check(&self, req: &Request, now: u64) -> Outcome {
        let decided = self.decide(Cow::Borrowed(req), now).await;
        self.record(&decided);
        decided.outcome
    }

    /// [`Greylister::check`] without the bookkeeping: front ends that can reply first do,
    /// then pass the result to [`Greylister::record`] (the client is not kept waiting for
    /// counters, the dashboard and the log line).
    ///
    /// Decided at once, without a future, when nothing needs waiting for: no DNS facts to
    /// gather and the records in this process (memory and embedded backends) or the store
    /// unavailable. DNS and stores across the network take `decide_waiting`,
    /// boxed: its future is kilobytes, which every caller would otherwise carry and copy.
    pub async fn decide<'r>(&self, req: Cow<'r, Request>, now: u64) -> Decided<'r> {
        match self.decide_now(req, now) {
            Ok(decided) => decided,
            Err(req) => Box::pin(self.decide_waiting(req, now)).await,
        }
    }

    /// The request decided at once, or handed back when DNS facts are to be gathered or
    /// the store is across the network.
    // The error is the caller's request handed back (moved, as it came in).
    #[allow(clippy::result_large_err)]
    fn decide_now<'r>(
        &self,
        req: Cow<'r, Request>,
        now: u64,
    ) -> Result<Decided<'r>, Cow<'r, Request>> {
        let started = Instant::now();
        let live = self.live.load();
        let Some(dns) = &live.dns else {
            return self
                .decide_classified(&live, req, None, None, now, started)
                .map_err(|(req, ..)| req);
        };
        // DNS facts that need no waiting (cached, or the resolver's breaker is open), for
        // records in this process: decided at once too.
        if self
            .store
            .present()
            .is_some_and(|s| s.in_memory().is_none())
        {
            return Err(req);
        }
        match dns.facts_now(&live.engine, &req, now) {
            Err(NeedsLookups) => Err(req),
            Ok(found) => {
                let (req, note, classified) = with_facts(&live.engine, req, found);
                self.decide_classified(&live, req, classified, note, now, started)
                    .map_err(|(req, ..)| req)
            }
        }
    }

    /// DNS facts gathered (when `[dns]` is on), then decided: in this process when the
    /// records are, else through the store's futures under `store_timeout`.
    async fn decide_waiting<'r>(&self, req: Cow<'r, Request>, now: u64) -> Decided<'r> {
        let started = Instant::now();
        let live = self.live.load();
        let (req, dns_note, classified) = match &live.dns {
            Some(dns) => {
                let found = dns.gather_for(&live.engine, &req, now).await;
                with_facts(&live.engine, req, found)
            }
            None => (req, None, None),
        };
        let (req, dns_note, classified) =
            match self.decide_classified(&live, req, classified, dns_note, now, started) {
                Ok(decided) => return decided,
                Err(back) => back,
            };
        let mut finished = None;
        let decision = match classified.unwrap_or_else(|| live.engine.classify(&req, now)) {
            Classified::Decided(d) => d,
            Classified::Lookup(lookup) => {
                let limit = live.options.store_timeout;
                let result = match self.store.borrow() {
                    Err(e) => Err(e),
                    Ok(store) => {
                        let lookup = self.lookup(&*store, &live.engine, lookup, now, &mut finished);
                        timeout_if_waiting(limit, lookup)
                            .await
                            .unwrap_or(Err(StoreError::Timeout(limit)))
                    }
                };
                self.or_fail_mode(&live, &req, result, &mut finished)
            }
        };
        Decided::new(&live, decision, req, dns_note, now, started, finished)
    }

    /// Decides `req` when its records are in this process, or the store is missing (the
    /// fail mode's answer), with the engine's classification of `req` when the caller has
    /// it already (`None`: classified here); hands the request back, with what came with
    /// it, for a store across the network.
    // The error is the caller's request handed back (moved, as it came in).
    #[allow(clippy::result_large_err, clippy::type_complexity)]
    fn decide_classified<'r>(
        &self,
        live: &Live,
        req: Cow<'r, Request>,
        classified: Option<Classified>,
        dns_note: Option<String>,
        now: u64,
        started: Instant,
    ) -> Result<Decided<'r>, (Cow<'r, Request>, Option<String>, Option<Classified>)> {
        // Missing: the store's error is spelled only for a request that needs the store.
        let store = self.store.present();
        let records = match &store {
            Some(store) => match store.in_memory() {
                Some(records) => Some(records),
                None => return Err((req, dns_note, classified)),
            },
            None => None,
        };
        let mut finished = None;
        let classified = classified.unwrap_or_else(|| live.engine.classify(&req, now));
        let decision = match classified {
            Classified::Decided(d) => d,
            Classified::Lookup(lookup) => {
                let result = match records {
                    Some(records) => {
                        self.lookup_in_memory(records, &live.engine, lookup, now, &mut finished)
                    }
                    None => Err(self.store.unavailable()),
                };
                self.or_fail_mode(live, &req, result, &mut finished)
            }
        };
        Ok(Decided::new(
            live, decision, req, dns_note, now, started, finished,
        ))
    }

    /// The store's decision, or the fail mode's when the store failed (naming the
    /// recipient's section, whose mode still decides whether it is enforced).
    fn or_fail_mode(
        &self,
        live: &Live,
        req: &Request,
        result: Result<Decision, StoreError>,
        finished: &mut Option<Instant>,
    ) -> Decision {
        result.unwrap_or_else(|e| {
            *finished = None;
            self.metrics.count_store_error(&e);
            let open = live.options.fail_mode == FailMode::Open;
            let counter = if open {
                &self.metrics.fail_open
            } else {
                &self.metrics.fail_closed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut d = Decision::store_failure(open, e.to_string());
            d.domain = live
                .engine
                .domain_section(&req.recipient)
                .map(|s| s.applied.clone());
            d
        })
    }

    /// [`Greylister::lookup`] on records in memory, whose updates never wait: run to its
    /// end at once.
    fn lookup_in_memory(
        &self,
        records: &MemoryStore,
        engine: &Engine,
        lookup: Lookup,
        now: u64,
        finished: &mut Option<Instant>,
    ) -> Result<Decision, StoreError> {
        let mut fut = std::pin::pin!(self.lookup(records, engine, lookup, now, finished));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result,
            // Not reachable: every await in it is an in-memory update, ready at once.
            Poll::Pending => Err(StoreError::Backend(
                "an in-memory update did not finish at once".into(),
            )),
        }
    }

    /// Rules 4 and 5 against the store, each record changed by one atomic update.
    async fn lookup(
        &self,
        store: &(impl Updates + ?Sized),
        engine: &Engine,
        lookup: Lookup,
        now: u64,
        finished: &mut Option<Instant>,
    ) -> Result<Decision, StoreError> {
        let key = &lookup.key;
        let delay = lookup.delay.seconds;
        let mut client = None;
        // One clock read per operation: each ends where the next begins (the engine's
        // work between them is a few comparisons).
        let mut mark = Instant::now();
        // `None`: an operation that failed (counted as an error, not timed).
        let mut lap = |op: Option<StoreOp>| {
            let t = Instant::now();
            if let Some(op) = op {
                self.metrics.count_store_op(op, t - mark);
            }
            mark = t;
            *finished = Some(t);
        };
        if engine.auto_allow_enabled() {
            client = store
                .client(&key.client, &|old| engine.client_seen(old, now))
                .await?;
            lap(Some(StoreOp::UpdateClient));
            if engine.client_allowed(client.as_ref(), now) {
                return Ok(Engine::auto_allow_decision(lookup, client));
            }
        }
        // The throttle is asked only about a triplet the step finds new (the update knows,
        // under its lock): known ones cost nothing. The step may run more than once
        // (optimistic stores), so it only reads the count, and says what it found in
        // `throttled` (seconds until the group's window ends; NOT_THROTTLED: it may add).
        const NOT_THROTTLED: u64 = u64::MAX;
        let throttled = AtomicU64::new(NOT_THROTTLED);
        let step = |old: Option<&Triplet>| {
            let (outcome, next) = engine.triplet_step(old, now, delay);
            if outcome == TripletOutcome::New && engine.throttle_enabled() {
                let wait = engine.throttled(self.throttle.get(&key.client).as_ref(), now);
                throttled.store(wait.unwrap_or(NOT_THROTTLED), Ordering::Relaxed);
                if wait.is_some() {
                    return None;
                }
            }
            Some(next)
        };
        let old = store.triplet(key, &step).await?;
        lap(Some(StoreOp::UpdateTriplet));
        let (outcome, _) = engine.triplet_step(old.as_ref(), now, delay);
        if outcome == TripletOutcome::New && engine.throttle_enabled() {
            match throttled.load(Ordering::Relaxed) {
                NOT_THROTTLED => self
                    .throttle
                    .update(&key.client, |w| engine.count_new_triplet(w, now)),
                wait => return Ok(engine.throttled_decision(lookup, wait, old, client)),
            }
        }
        let passed = outcome.passes();
        if passed && engine.auto_allow_enabled() {
            // The triplet's new state is committed: the decision stands. Losing one pass
            // count only delays auto-allow a little; answering a store failure now would
            // defer (fail-closed) mail the record already lets through.
            match store
                .client(&key.client, &|old| engine.count_pass(old, now))
                .await
            {
                Ok(_) => lap(Some(StoreOp::UpdateClient)),
                Err(e) => {
                    lap(None);
                    self.metrics.count_store_error(&e);
                    self.pass_uncounted.hit(|| {
                        tracing::warn!(client = %key.client, error = %e, "could not count a pass towards auto-allow");
                    });
                }
            }
        }
        Ok(engine.triplet_decision(lookup, outcome, old, client))
    }

    /// Counts and logs a decision (see [`Greylister::decide`]).
    pub fn record(&self, decided: &Decided<'_>) {
        let (req, o, dns) = (&*decided.req, &decided.outcome, decided.dns_note.as_deref());
        let d = &o.decision;
        let took = decided.finished.saturating_duration_since(decided.started);
        self.metrics.count_decision(d.rule, o.effective(), took);
        if !o.enforced && d.verdict == Verdict::Defer {
            self.metrics
                .learn_would_defer
                .fetch_add(1, Ordering::Relaxed);
        }
        self.activity.record(&DecisionSeen {
            at: decided.now,
            when: decided.finished,
            verdict: o.effective(),
            rule: d.rule,
            enforced: o.enforced,
            client: req.client_ip,
            group: d.key.as_ref().map_or("", |k| k.client.as_str()),
            sender: &req.sender,
            recipient: &req.recipient,
            delayed: d.delayed,
            detail: d.detail.as_deref(),
            domain: d.domain.as_ref().map(|s| &*s.name),
        });
        if d.rule == Rule::StoreFailOpen || d.rule == Rule::StoreFailClosed {
            // The decision line below is the request's record, at INFO like every other;
            // the warning that the store fails is one line and then a count per interval
            // (a line per request was 389 MB in a 45-second Redis outage).
            self.store_failing.hit(|| {
                tracing::warn!(
                    target: DECISION_TARGET,
                    rule = d.rule.as_str(),
                    error = d.detail.as_deref().unwrap_or(""),
                    "store failed; answering per fail_mode until it is back"
                );
            });
        }
        let line = DecisionLine { req, o, dns };
        let level = tracing::Level::INFO;
        if !tracing::enabled!(target: DECISION_TARGET, tracing::Level::INFO) {
            return;
        }
        // The text log takes the line as written here, in the order and spelling of the
        // structured event (the same line for a fraction of the cost); JSON takes the event.
        if !crate::logfmt::write_direct(level, DECISION_TARGET, |out| line.write_fields(out)) {
            line.event(level);
        }
    }
}

/// The updates of a decision, as a store makes them: through its futures, or in place for
/// records held in this process (whose futures would be ready at once anyway).
trait Updates: Sync {
    async fn triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError>;
    async fn client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError>;
}

impl Updates for dyn Store + '_ {
    async fn triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        self.update_triplet(key, f).await
    }
    async fn client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.update_client(client, f).await
    }
}

impl Updates for MemoryStore {
    async fn triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        Ok(self.update_triplet_now(key, f))
    }
    async fn client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.update_client_now(client, f))
    }
}

/// The log target of decision lines (`GREYGATE_LOG=greygate::decision=warn` and the like).
const DECISION_TARGET: &str = "greygate::decision";

/// The fields of a decision's log line.
struct DecisionLine<'a> {
    req: &'a Request,
    o: &'a Outcome,
    dns: Option<&'a str>,
}

impl DecisionLine<'_> {
    /// Only worth a field when DNS facts took part; otherwise it is always the prefix.
    fn identity(&self) -> Option<&str> {
        let d = &self.o.decision;
        d.identity
            .as_ref()
            .filter(|_| self.req.facts.is_some())
            .map(|i| i.reason.as_ref())
    }

    /// A delay other than the configured one (DNSBL listing, verified sender).
    fn delay(&self) -> Option<u64> {
        self.o
            .decision
            .delay
            .filter(|d| d.reason != crate::engine::DelayReason::Configured)
            .map(|d| d.seconds)
    }

    /// The name of the recipient's `[[domains]]` section, when one applied.
    fn domain(&self) -> Option<&str> {
        self.o.decision.domain.as_ref().map(|s| &*s.name)
    }

    fn would(&self) -> Option<&'static str> {
        (!self.o.enforced).then(|| self.o.decision.verdict.as_str())
    }

    /// The structured event (JSON log): empty fields stay out (tracing skips `None`).
    fn event(&self, level: tracing::Level) {
        let (req, o, d) = (self.req, self.o, &self.o.decision);
        let client = req.client_ip.map(tracing::field::display);
        let group = d.key.as_ref().map(|k| k.client.as_str());
        let detail = d.detail.as_deref();
        let (identity, delay, would, dns) = (self.identity(), self.delay(), self.would(), self.dns);
        let domain = self.domain();
        let tls = req.tls.then_some(true);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: DECISION_TARGET,
                    verdict = o.effective().as_str(),
                    rule = d.rule.as_str(),
                    would,
                    domain,
                    client,
                    name = req.client_name.as_str(),
                    group,
                    identity,
                    delay,
                    dns,
                    sender = req.sender.as_str(),
                    recipient = req.recipient.as_str(),
                    remaining = d.remaining,
                    delayed = d.delayed,
                    tls,
                    detail,
                    "decision"
                )
            };
        }
        if level == tracing::Level::WARN {
            line!(warn);
        } else {
            line!(info);
        }
    }

    /// The message and fields as `logfmt::QuickFields` writes [`DecisionLine::event`].
    fn write_fields(&self, out: &mut String) {
        use crate::engine::normalize::write_ip;
        use crate::logfmt::write_quoted;
        use std::fmt::Write as _;
        let (req, o, d) = (self.req, self.o, &self.o.decision);
        let num = |out: &mut String, name: &str, v: Option<u64>| {
            if let Some(v) = v {
                let _ = write!(out, " {name}={v}");
            }
        };
        let text = |out: &mut String, name: &str, v: Option<&str>| {
            if let Some(v) = v {
                out.push(' ');
                out.push_str(name);
                out.push('=');
                let _ = write_quoted(out, v);
            }
        };
        out.push_str("decision");
        text(out, "verdict", Some(o.effective().as_str()));
        text(out, "rule", Some(d.rule.as_str()));
        text(out, "would", self.would());
        text(out, "domain", self.domain());
        if let Some(ip) = req.client_ip {
            out.push_str(" client=");
            let _ = write_ip(out, ip);
        }
        text(out, "name", Some(&req.client_name));
        text(out, "group", d.key.as_ref().map(|k| k.client.as_str()));
        text(out, "identity", self.identity());
        num(out, "delay", self.delay());
        text(out, "dns", self.dns);
        text(out, "sender", Some(&req.sender));
        text(out, "recipient", Some(&req.recipient));
        num(out, "remaining", d.remaining);
        num(out, "delayed", d.delayed);
        if req.tls {
            out.push_str(" tls=true");
        }
        text(out, "detail", d.detail.as_deref());
    }
}

/// `req` with what the gatherer found put into it (the facts go into the request itself:
/// no copy of a request the front end handed over), what DNS could not say, and the
/// engine's classification when the gatherer began or finished one.
fn with_facts<'r>(
    engine: &Engine,
    req: Cow<'r, Request>,
    found: FactsNow<'_>,
) -> (Cow<'r, Request>, Option<String>, Option<Classified>) {
    match found {
        FactsNow::NotNeeded(classified) => (req, None, classified),
        FactsNow::Gathered(mut gathered, unkeyed) => {
            let note = gathered.note();
            let mut req = req;
            req.to_mut().facts = Some(std::mem::take(&mut gathered.facts));
            let classified = engine.classify_keyed(unkeyed, &req);
            (req, note, Some(classified))
        }
    }
}

#[cfg(test)]
mod tests;
