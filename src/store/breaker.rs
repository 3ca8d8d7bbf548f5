//! Reachability of a store server: fail fast while it is down, retry it with backoff.
//!
//! Without this, every request during an outage would wait the full `store.timeout` for a
//! connection that cannot come, and a busy MX would pile up hundreds of waiting
//! connections. With it, the first failure marks the server down; requests are refused at
//! once (the service answers per `fail_mode`) except one attempt per backoff interval,
//! which finds out when the server is back.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::StoreError;

/// First wait after a failure; doubled after each failed retry, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between retries: greylisting resumes at most this long after the server
/// is back.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

struct Down {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
    /// An attempt admitted to test the server is under way: no second one.
    probing: bool,
    error: String,
}

/// Tracks whether one server answers. Shared by every operation on it.
pub(crate) struct Breaker {
    /// Names the server in log lines (`redis redis://...`).
    name: String,
    down: Mutex<Option<Down>>,
}

impl Breaker {
    pub(crate) fn new(name: String) -> Self {
        Breaker {
            name,
            down: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        // The state is plain data, consistent after any panic elsewhere.
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets an operation go to the server, or refuses it at once while the server is down
    /// and it is not yet time for the next attempt.
    pub(crate) fn admit(&self) -> Result<Attempt<'_>, StoreError> {
        let mut state = self.state();
        let Some(down) = state.as_mut() else {
            return Ok(Attempt {
                breaker: self,
                probe: false,
                settled: false,
            });
        };
        let now = Instant::now();
        if down.probing || now < down.next_try {
            return Err(StoreError::Unavailable(format!(
                "{} unreachable for {} s ({}); next attempt in {} ms",
                self.name,
                now.duration_since(down.since).as_secs(),
                down.error,
                down.next_try.saturating_duration_since(now).as_millis()
            )));
        }
        down.probing = true;
        Ok(Attempt {
            breaker: self,
            probe: true,
            settled: false,
        })
    }

    /// Whether the server is currently considered down.
    pub(crate) fn is_down(&self) -> bool {
        self.state().is_some()
    }

    fn reachable(&self) {
        if let Some(down) = self.state().take() {
            tracing::warn!(
                store = %self.name,
                down_for = ?down.since.elapsed(),
                "store server reachable again; greylisting resumes"
            );
        }
    }

    fn unreachable(&self, probe: bool, error: String) {
        let now = Instant::now();
        let mut state = self.state();
        match state.as_mut() {
            None => {
                tracing::error!(
                    store = %self.name, %error,
                    "store server unreachable; answering per fail_mode and retrying with backoff"
                );
                *state = Some(Down {
                    since: now,
                    next_try: now + MIN_BACKOFF,
                    backoff: MIN_BACKOFF,
                    probing: false,
                    error,
                });
            }
            Some(down) => {
                // Only the probe moves the backoff on: the failures of operations that were
                // already in flight when the server went down say nothing new.
                if probe {
                    down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                    down.next_try = now + down.backoff;
                    down.probing = false;
                    tracing::debug!(store = %self.name, %error, retry_in = ?down.backoff, "store server still unreachable");
                }
                down.error = error;
            }
        }
    }
}

/// One admitted operation. Settle it with [`Attempt::reachable`] or
/// [`Attempt::unreachable`]; dropping it unsettled (the caller's timeout cancelled the
/// operation) counts as the server being unreachable.
pub(crate) struct Attempt<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Attempt<'_> {
    /// The server answered (even with an error of its own, such as a constraint violation).
    pub(crate) fn reachable(mut self) {
        self.settled = true;
        self.breaker.reachable();
    }

    /// The server did not answer: connection refused or lost, or too slow.
    pub(crate) fn unreachable(mut self, error: &StoreError) {
        self.settled = true;
        self.breaker.unreachable(self.probe, error.to_string());
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker
                .unreachable(self.probe, "no answer before the request's timeout".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fails_fast_while_down_and_probes_with_growing_backoff() {
        let b = Breaker::new("test".into());
        b.admit().unwrap().reachable();
        assert!(!b.is_down());

        b.admit()
            .unwrap()
            .unreachable(&StoreError::Unavailable("refused".into()));
        assert!(b.is_down());
        let refused = b.admit().err().expect("refused while down");
        assert!(refused.to_string().contains("refused"), "{refused}");

        tokio::time::advance(MIN_BACKOFF).await;
        let probe = b.admit().expect("one probe after the backoff");
        assert!(b.admit().is_err(), "no second probe while one is under way");
        drop(probe); // cancelled by a timeout: counts as unreachable
        assert!(b.admit().is_err(), "backoff doubled");
        tokio::time::advance(MIN_BACKOFF).await;
        assert!(b.admit().is_err(), "still within the doubled backoff");
        tokio::time::advance(MIN_BACKOFF).await;
        b.admit()
            .expect("probe after the doubled backoff")
            .reachable();
        assert!(!b.is_down(), "a successful probe closes the breaker");
        b.admit().expect("admitted again").reachable();
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped() {
        let b = Breaker::new("test".into());
        let e = StoreError::Unavailable("down".into());
        b.admit().unwrap().unreachable(&e);
        for _ in 0..20 {
            tokio::time::advance(MAX_BACKOFF).await;
            b.admit()
                .expect("a probe at least every MAX_BACKOFF")
                .unreachable(&e);
        }
    }
}
