//! The greylisting service shared by every front end: engine + store + failure policy.
//!
//! Front ends turn their protocol into an engine `Request`, read the clock, and call
//! [`Greylister::check`]. This is the one place that talks to the store on a request's
//! behalf, applies `store_timeout` and `fail_mode`, and logs the decision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::FailMode;
use crate::engine::{Classified, Decision, Engine, Lookup, Mode, Request, TripletOutcome, Verdict};
use crate::store::{Store, StoreError};

/// Unix seconds now. Front ends call this; the engine never does.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

/// Counters for stats and (later) metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub skip: AtomicU64,
    pub pass: AtomicU64,
    pub defer: AtomicU64,
    pub store_failures: AtomicU64,
}

/// Settings of the service beyond the engine's.
#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions {
    pub mode: Mode,
    pub fail_mode: FailMode,
    pub store_timeout: Duration,
}

/// The store, which may be missing while it cannot be opened (the daemon then answers
/// per `fail_mode` and keeps trying to open it).
pub struct StoreSlot {
    store: RwLock<Option<Arc<dyn Store>>>,
    why_missing: Mutex<String>,
}

impl StoreSlot {
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreSlot {
            store: RwLock::new(Some(store)),
            why_missing: Mutex::new(String::new()),
        }
    }

    pub fn missing(why: String) -> Self {
        StoreSlot {
            store: RwLock::new(None),
            why_missing: Mutex::new(why),
        }
    }

    pub fn get(&self) -> Result<Arc<dyn Store>, StoreError> {
        let guard = self.store.read().unwrap_or_else(|e| e.into_inner());
        match &*guard {
            Some(s) => Ok(s.clone()),
            None => Err(StoreError::Unavailable(
                self.why_missing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            )),
        }
    }

    pub fn is_open(&self) -> bool {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn set(&self, store: Arc<dyn Store>) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    pub fn set_missing(&self, why: String) {
        *self.why_missing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// Engine, store and failure policy.
pub struct Greylister {
    pub engine: Engine,
    pub store: StoreSlot,
    pub options: ServiceOptions,
    pub stats: Stats,
}

impl Greylister {
    pub fn new(engine: Engine, store: StoreSlot, options: ServiceOptions) -> Self {
        Greylister {
            engine,
            store,
            options,
            stats: Stats::default(),
        }
    }

    /// Decides one request at `now` and records it in the store. Never fails: store
    /// trouble becomes a fail-open (or fail-closed) decision.
    pub async fn check(&self, req: &Request, now: u64) -> Outcome {
        let decision = match self.engine.classify(req) {
            Classified::Decided(d) => d,
            Classified::Lookup(lookup) => {
                let limit = self.options.store_timeout;
                let result = match tokio::time::timeout(limit, self.lookup(lookup, now)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout(limit)),
                };
                result.unwrap_or_else(|e| {
                    self.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                    Decision::store_failure(self.options.fail_mode == FailMode::Open, e.to_string())
                })
            }
        };
        let outcome = Outcome {
            decision,
            enforced: self.options.mode == Mode::Enforce,
        };
        self.count_and_log(req, &outcome);
        outcome
    }

    /// Rules 4 and 5 against the store, each record changed by one atomic update.
    async fn lookup(&self, lookup: Lookup, now: u64) -> Result<Decision, StoreError> {
        let store = self.store.get()?;
        let engine = &self.engine;
        let key = &lookup.key;
        let delay = lookup.delay.seconds;
        let mut client = None;
        if engine.auto_allow_enabled() {
            client = store
                .update_client(&key.client, &|old| engine.client_seen(old, now))
                .await?;
            if engine.client_allowed(client.as_ref(), now) {
                return Ok(Engine::auto_allow_decision(lookup, client));
            }
        }
        let old = store
            .update_triplet(key, &|old| Some(engine.triplet_step(old, now, delay).1))
            .await?;
        let (outcome, _) = engine.triplet_step(old.as_ref(), now, delay);
        let passed = matches!(
            outcome,
            TripletOutcome::Delayed { .. } | TripletOutcome::Known
        );
        if passed && engine.auto_allow_enabled() {
            // The triplet's new state is committed: the decision stands. Losing one pass
            // count only delays auto-allow a little; answering a store failure now would
            // defer (fail-closed) mail the record already lets through.
            if let Err(e) = store
                .update_client(&key.client, &|old| engine.count_pass(old, now))
                .await
            {
                tracing::warn!(client = %key.client, error = %e, "could not count a pass towards auto-allow");
            }
        }
        Ok(engine.triplet_decision(lookup, outcome, old, client))
    }

    fn count_and_log(&self, req: &Request, o: &Outcome) {
        let d = &o.decision;
        let counter = match o.effective() {
            Verdict::Skip => &self.stats.skip,
            Verdict::Pass => &self.stats.pass,
            Verdict::Defer => &self.stats.defer,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let client = req.client_ip.map(tracing::field::display);
        // Empty fields stay out of the line (tracing skips `None`).
        let group = d.key.as_ref().map(|k| k.client.as_str());
        let detail = d.detail.as_deref();
        // Only worth a field when DNS facts took part; otherwise it is always the prefix.
        let identity = d
            .identity
            .as_ref()
            .filter(|_| req.facts.is_some())
            .map(|i| i.reason.as_ref());
        let delay = d
            .delay
            .filter(|d| d.reason != crate::engine::DelayReason::Configured)
            .map(|d| d.seconds);
        let would = (!o.enforced).then(|| d.verdict.as_str());
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "greygate::decision",
                    verdict = o.effective().as_str(),
                    rule = d.rule.as_str(),
                    would,
                    client,
                    name = req.client_name.as_str(),
                    group,
                    identity,
                    delay,
                    sender = req.sender.as_str(),
                    recipient = req.recipient.as_str(),
                    remaining = d.remaining,
                    delayed = d.delayed,
                    detail,
                    "decision"
                )
            };
        }
        if d.rule == crate::engine::Rule::StoreFailOpen
            || d.rule == crate::engine::Rule::StoreFailClosed
        {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

#[cfg(test)]
mod tests;
