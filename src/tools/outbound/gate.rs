//! Politeness and concurrency for probes: at most one connection at a time to each server
//! (the `ip:port` connected to, whatever MX names led there), and at most N probes working
//! at once over the whole run (connections and DNS lookups alike).
//!
//! A probe waits for the server's turn first and takes a run-wide slot only then, so probes
//! queued behind a busy server never hold slots other servers could use. A holder of a slot
//! waits for nothing else, and a probe holds at most one server's turn at a time, so waiting
//! always ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// Shared by every probe of a run.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    /// One turn per server; entries stay for the run (at most one per address probed).
    servers: std::sync::Mutex<HashMap<SocketAddr, Arc<Mutex<()>>>>,
}

/// The right to talk to one server: its turn and a run-wide slot, both given back on drop.
#[derive(Debug)]
pub struct Pass {
    // Field order is drop order: the slot goes back first, then the server's turn.
    _slot: Option<OwnedSemaphorePermit>,
    _turn: OwnedMutexGuard<()>,
}

impl Gate {
    /// At most `concurrency` (at least 1) probes at once.
    pub fn new(concurrency: usize) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS))),
            servers: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A run-wide slot for work that talks to no SMTP server (DNS lookups).
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        // The semaphore is never closed: `None` cannot happen, and would only mean no bound.
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Waits for `server`'s turn, then for a slot.
    pub async fn connect(&self, server: SocketAddr) -> Pass {
        let turn = {
            let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
            servers.entry(server).or_default().clone()
        };
        let turn = turn.lock_owned().await;
        Pass {
            _slot: self.slot().await,
            _turn: turn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Counts who is inside, now and at most.
    #[derive(Default)]
    struct Peak {
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl Peak {
        fn enter(&self) {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_connection_per_server_and_n_over_the_run() {
        let gate = Arc::new(Gate::new(3));
        let servers: Vec<SocketAddr> = (0..5)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 2500 + i)))
            .collect();
        let total = Arc::new(Peak::default());
        let per: Arc<Vec<Peak>> = Arc::new((0..5).map(|_| Peak::default()).collect());
        let mut set = tokio::task::JoinSet::new();
        for i in 0..40usize {
            // Server 0 gets most of the work, as a big provider's MX does.
            let s = if i % 2 == 0 { 0 } else { i % 5 };
            let (gate, addr, total, per) = (gate.clone(), servers[s], total.clone(), per.clone());
            set.spawn(async move {
                if i % 7 == 0 {
                    // A DNS lookup first, inside the run-wide bound too.
                    let _slot = gate.slot().await;
                    total.enter();
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    total.leave();
                }
                let _pass = gate.connect(addr).await;
                total.enter();
                per[s].enter();
                tokio::time::sleep(Duration::from_millis(10 + i as u64 % 3)).await;
                per[s].leave();
                total.leave();
            });
        }
        let started = tokio::time::Instant::now();
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        assert_eq!(total.max.load(Ordering::SeqCst), 3);
        for (i, p) in per.iter().enumerate() {
            assert_eq!(p.max.load(Ordering::SeqCst), 1, "server {i}");
        }
        // Server 0's 24 probes went one after another (at least 24 x 10 ms), while the
        // rest ran beside them: well under the 450 ms that all 40 one by one would take.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(240) && took < Duration::from_millis(400),
            "{took:?}"
        );
    }
}
