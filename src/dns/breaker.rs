//! Reachability of the resolver: stop waiting on one that does not answer, find out in the
//! background when it answers again.
//!
//! Without this, every request while the resolver is down would wait the whole `[dns]
//! budget` for answers that cannot come: 64 connections × 300 ms would cap a busy MX at
//! about 200 requests/s. The breaker opens after [`OPEN_AFTER`] requests in a row whose
//! lookups all went unanswered within the budget (none of them answered). While it is
//! open, requests use what the cache holds and ask nothing: the facts are "not known" and
//! the identity is the prefix, answered at once. One request per backoff interval (200 ms
//! doubling to 2 s) starts its lookups as a probe *in the background* — no request ever
//! waits on a probe — and the first probe lookup answered within the budget closes the
//! breaker. The idea is the stores' breaker (`store::breaker`), with the probe moved off
//! the request path because DNS facts are optional.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::DnsStats;

/// Requests in a row that got no answer in time before the breaker opens. One slow domain
/// does not open it: any answer to any request in between starts the count again.
pub const OPEN_AFTER: u32 = 3;
/// First wait before a probe; doubled after each probe that found no answer, up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between probes: DNS facts come back at most this long (plus the budget)
/// after the resolver does.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

struct Down {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
    /// A probe is under way: no second one.
    probing: bool,
}

#[derive(Default)]
struct State {
    /// Requests in a row whose lookups went unanswered (while closed).
    silent: u32,
    down: Option<Down>,
}

/// What one request may do with the resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Ask and wait (up to the budget).
    Ask,
    /// The resolver is down and it is time to try it: ask, but do not wait.
    Probe,
    /// The resolver is down: ask nothing.
    Skip,
}

/// Tracks whether the resolver answers. Shared by every request and lookup task.
pub(crate) struct Breaker {
    /// Names the resolver in log lines.
    name: String,
    budget: Duration,
    state: Mutex<State>,
    stats: Arc<DnsStats>,
}

impl Breaker {
    pub(crate) fn new(name: String, budget: Duration, stats: Arc<DnsStats>) -> Self {
        // A new gatherer (start, or a reload that changed `[dns]`) trusts its resolver.
        stats.resolver_down.store(0, Ordering::Relaxed);
        Breaker {
            name,
            budget,
            state: Mutex::new(State::default()),
            stats,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data, consistent after any panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn admit(&self) -> Admit {
        let mut state = self.state();
        let Some(down) = state.down.as_mut() else {
            return Admit::Ask;
        };
        if down.probing || Instant::now() < down.next_try {
            return Admit::Skip;
        }
        down.probing = true;
        Admit::Probe
    }

    /// Whether a request now would ask nothing ([`Admit::Skip`]), without claiming a probe.
    pub(crate) fn skipping(&self) -> bool {
        self.state()
            .down
            .as_ref()
            .is_some_and(|d| d.probing || Instant::now() < d.next_try)
    }

    /// How long the resolver has been considered down, or `None` while it answers.
    pub(crate) fn down_for(&self) -> Option<Duration> {
        self.state().down.as_ref().map(|d| d.since.elapsed())
    }

    /// A request that asked the resolver (admitted with [`Admit::Ask`]) is done: whether
    /// any of its lookups was answered, and whether any was left unanswered at the budget.
    pub(crate) fn gathered(&self, answered: bool, timed_out: bool) {
        let mut state = self.state();
        if answered {
            state.silent = 0;
            self.close(&mut state);
        } else if timed_out && state.down.is_none() {
            state.silent += 1;
            if state.silent >= OPEN_AFTER {
                let now = Instant::now();
                state.down = Some(Down {
                    since: now,
                    next_try: now + MIN_BACKOFF,
                    backoff: MIN_BACKOFF,
                    probing: false,
                });
                self.stats.resolver_down.store(1, Ordering::Relaxed);
                self.stats.breaker_opened.add(1);
                tracing::error!(
                    resolver = %self.name,
                    requests = state.silent,
                    budget_ms = self.budget.as_millis(),
                    "DNS resolver not answering; requests stop asking it (identities fall back to the prefix) and it is probed in the background"
                );
            }
        }
    }

    fn close(&self, state: &mut State) {
        if let Some(down) = state.down.take() {
            state.silent = 0;
            self.stats.resolver_down.store(0, Ordering::Relaxed);
            tracing::warn!(
                resolver = %self.name,
                down_for = ?down.since.elapsed(),
                "DNS resolver answers again; DNS facts resume"
            );
        }
    }

    /// A probe ended: answered in time (closes the breaker), found no answer (the next
    /// probe waits twice as long), or had nothing to ask (everything cached: the next
    /// request probes).
    fn probed(&self, result: ProbeResult) {
        let mut state = self.state();
        match result {
            ProbeResult::Answered => self.close(&mut state),
            ProbeResult::Silent => {
                if let Some(down) = state.down.as_mut() {
                    down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                    down.next_try = Instant::now() + down.backoff;
                    down.probing = false;
                    tracing::debug!(resolver = %self.name, retry_in = ?down.backoff, "DNS resolver still not answering");
                }
            }
            ProbeResult::Unused => {
                if let Some(down) = state.down.as_mut() {
                    down.probing = false;
                }
            }
        }
    }
}

enum ProbeResult {
    Answered,
    Silent,
    Unused,
}

/// The lookups of one probing request; every lookup task holds it. The first answer within
/// the budget closes the breaker; when the last task is done (or none was started), the
/// probe's result goes to the breaker.
pub(crate) struct Probe {
    breaker: Arc<Breaker>,
    deadline: Instant,
    asked: AtomicBool,
    answered: AtomicBool,
}

impl Probe {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Arc<Probe> {
        let deadline = Instant::now() + breaker.budget;
        Arc::new(Probe {
            breaker,
            deadline,
            asked: AtomicBool::new(false),
            answered: AtomicBool::new(false),
        })
    }

    /// A lookup of the probe was started.
    pub(crate) fn asked(&self) {
        self.asked.store(true, Ordering::Relaxed);
    }

    /// A lookup of the probe got an answer from the resolver (now).
    pub(crate) fn answered(&self) {
        if Instant::now() <= self.deadline && !self.answered.swap(true, Ordering::Relaxed) {
            self.breaker.probed(ProbeResult::Answered);
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.answered.load(Ordering::Relaxed) {
            return;
        }
        self.breaker.probed(if self.asked.load(Ordering::Relaxed) {
            ProbeResult::Silent
        } else {
            ProbeResult::Unused
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new(
            "test".into(),
            Duration::from_millis(300),
            Arc::default(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_silent_requests_in_a_row_and_probes_in_the_background() {
        let b = breaker();
        for _ in 0..OPEN_AFTER - 1 {
            b.gathered(false, true);
        }
        // An answer in between starts the count again: one slow domain is not a dead resolver.
        b.gathered(true, false);
        for _ in 0..OPEN_AFTER - 1 {
            b.gathered(false, true);
        }
        assert_eq!(b.admit(), Admit::Ask);
        // Failures that came back at once (no timeout) say nothing about waiting.
        b.gathered(false, false);
        assert_eq!(b.admit(), Admit::Ask);
        b.gathered(false, true);
        assert_eq!(b.admit(), Admit::Skip, "open after {OPEN_AFTER} in a row");
        assert!(b.down_for().is_some());
        assert_eq!(b.stats.resolver_down.load(Ordering::Relaxed), 1);
        assert_eq!(b.stats.breaker_opened.get(), 1);

        tokio::time::advance(MIN_BACKOFF).await;
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::Skip, "one probe at a time");
        let probe = Probe::new(b.clone());
        probe.asked();
        drop(probe); // no answer: the backoff doubles
        assert_eq!(b.admit(), Admit::Skip);
        tokio::time::advance(MIN_BACKOFF).await;
        assert_eq!(b.admit(), Admit::Skip, "within the doubled backoff");
        tokio::time::advance(MIN_BACKOFF).await;
        assert_eq!(b.admit(), Admit::Probe);
        // A probe with everything cached asked nothing: the next request probes.
        drop(Probe::new(b.clone()));
        assert_eq!(b.admit(), Admit::Probe);
        let probe = Probe::new(b.clone());
        probe.asked();
        // An answer after the budget does not count.
        tokio::time::advance(Duration::from_millis(301)).await;
        probe.answered();
        drop(probe);
        assert_eq!(b.admit(), Admit::Skip);
        tokio::time::advance(MAX_BACKOFF).await;
        assert_eq!(b.admit(), Admit::Probe);
        let probe = Probe::new(b.clone());
        probe.asked();
        probe.answered();
        assert_eq!(b.admit(), Admit::Ask, "closed at the probe's first answer");
        drop(probe);
        assert_eq!(b.admit(), Admit::Ask);
        assert!(b.down_for().is_none());
        assert_eq!(b.stats.resolver_down.load(Ordering::Relaxed), 0);
        // Closing starts the count from zero.
        b.gathered(false, true);
        assert_eq!(b.admit(), Admit::Ask);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_at_least_every_max_backoff() {
        let b = breaker();
        for _ in 0..OPEN_AFTER {
            b.gathered(false, true);
        }
        for _ in 0..20 {
            tokio::time::advance(MAX_BACKOFF).await;
            assert_eq!(b.admit(), Admit::Probe);
            let p = Probe::new(b.clone());
            p.asked();
        }
    }
}
