//! Backend sessions kept open between client sessions: a client session that ends gives
//! its backend session back (outside any transaction), the next one takes it instead of
//! connecting, reading a banner and greeting anew; the backend is spared the same.
//! Bounded in size, idle ones closed after a bounded time. Only sessions that name no
//! client are shared: never with the PROXY protocol (its header names one client per
//! connection), and never one that told the backend its client by XCLIENT (Postfix
//! refuses a second XCLIENT on a connection: the next client would pass as the last).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::backend::Backend;

/// Idle backend sessions, the most recently used first out.
pub struct Pool {
    idle: Mutex<VecDeque<(Instant, Backend)>>,
    /// Most idle sessions kept; 0: no pool.
    max: usize,
    /// Longest an idle session is kept.
    idle_for: Duration,
}

impl Pool {
    pub fn new(max: usize, idle_for: Duration) -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::with_capacity(max)),
            max,
            idle_for,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0 && !self.idle_for.is_zero()
    }

    /// An idle backend session that still looks open, if any. Sessions idle too long, or
    /// that the backend closed or spoke on meanwhile, are closed on the way.
    pub fn take(&self) -> Option<Backend> {
        let now = Instant::now();
        loop {
            let (since, mut b) = self.idle.lock().expect("pool lock").pop_back()?;
            if now.duration_since(since) >= self.idle_for || b.is_stale() {
                tokio::spawn(b.quit());
                continue;
            }
            return Some(b);
        }
    }

    /// Keeps a backend session outside any transaction for the next client; closes it when
    /// the pool is full or off.
    pub fn put(&self, b: Backend) {
        if self.enabled() {
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.len() < self.max {
                idle.push_back((Instant::now(), b));
                return;
            }
        }
        tokio::spawn(b.quit());
    }

    /// Idle sessions kept now.
    pub fn idle_sessions(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    /// Closes the sessions idle for `idle_for` or more (all of them with `all`).
    pub fn close_idle(&self, all: bool) {
        let now = Instant::now();
        let old: Vec<Backend> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let keep = if all {
                0
            } else {
                // Oldest first: the ones to close are at the front.
                idle.iter()
                    .position(|(since, _)| now.duration_since(*since) < self.idle_for)
                    .map_or(0, |first_young| idle.len() - first_young)
            };
            let n = idle.len() - keep;
            idle.drain(..n).map(|(_, b)| b).collect()
        };
        for b in old {
            tokio::spawn(b.quit());
        }
    }

    /// Closes idle sessions as they reach `idle_for`, until `stop`; then all of them.
    pub async fn reap(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let tick = (self.idle_for / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(tick) => self.close_idle(false),
            }
        }
        self.close_idle(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::smtp::{BackendOptions, ProxyProtocol};

    fn session() -> (Backend, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(1024);
        (Backend::over(Box::new(a)), b)
    }

    #[tokio::test]
    async fn pool_is_bounded_and_gives_back_the_latest_open_session() {
        let pool = Pool::new(2, Duration::from_secs(60));
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (b, peer) = session();
            pool.put(b);
            peers.push(peer);
        }
        assert_eq!(pool.idle_sessions(), 2, "the third is closed, not kept");
        // The backend closes the newest one meanwhile: it is skipped and closed.
        drop(peers.pop());
        drop(peers.pop());
        assert!(pool.take().is_some(), "the first one is still open");
        assert!(pool.take().is_none());
        assert_eq!(pool.idle_sessions(), 0);
    }

    #[tokio::test]
    async fn a_session_the_backend_spoke_on_is_stale() {
        use tokio::io::AsyncWriteExt;
        let pool = Pool::new(4, Duration::from_secs(60));
        let (b, mut peer) = session();
        pool.put(b);
        peer.write_all(b"421 4.4.2 timeout\r\n").await.unwrap();
        assert!(pool.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_are_closed_after_idle_for() {
        let pool = Pool::new(4, Duration::from_secs(5));
        let (b, _peer) = session();
        pool.put(b);
        tokio::time::advance(Duration::from_secs(3)).await;
        let (b2, _peer2) = session();
        pool.put(b2);
        tokio::time::advance(Duration::from_secs(3)).await;
        pool.close_idle(false);
        assert_eq!(
            pool.idle_sessions(),
            1,
            "the older one is gone, the younger kept"
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(pool.take().is_none(), "too old to be taken");
        let (b3, _peer3) = session();
        pool.put(b3);
        pool.close_idle(true);
        assert_eq!(pool.idle_sessions(), 0);
    }

    #[test]
    fn no_pool_with_the_proxy_protocol_or_size_zero() {
        let opts = |proxy, pool| BackendOptions {
            xclient: true,
            proxy,
            starttls: false,
            connect_timeout: Duration::from_secs(1),
            pool,
            pool_idle: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(1),
        };
        let cfg = |o| crate::server::smtp::SmtpConfig {
            listen: Vec::new(),
            backend: None,
            backend_options: o,
            hostname: String::new(),
            limits: crate::server::smtp::SmtpLimits {
                max_connections: 1,
                max_connections_per_peer: 1,
                max_line_length: 512,
                max_commands: 10,
                max_errors: 1,
                max_recipients: 100,
                max_message_size: 1 << 20,
                command_timeout: Duration::from_secs(1),
                data_timeout: Duration::from_secs(1),
            },
            pregreet: crate::server::smtp::PregreetConfig {
                wait: Duration::ZERO,
                action: crate::server::smtp::PregreetAction::Reject,
                suspect_for: Duration::ZERO,
                pass_for: Duration::ZERO,
            },
            tarpit: crate::server::smtp::TarpitConfig {
                rate: 0,
                max_sessions: 1,
            },
            traps: crate::server::smtp::TrapConfig {
                addresses: Vec::new(),
                file: None,
                deny_for: Duration::ZERO,
            },
            tls: None,
            threads: 1,
        };
        use crate::server::smtp::SmtpContext;
        assert!(SmtpContext::pool_for(&cfg(opts(ProxyProtocol::Off, 8))).enabled());
        assert!(!SmtpContext::pool_for(&cfg(opts(ProxyProtocol::V1, 8))).enabled());
        assert!(!SmtpContext::pool_for(&cfg(opts(ProxyProtocol::V2, 8))).enabled());
        assert!(!SmtpContext::pool_for(&cfg(opts(ProxyProtocol::Off, 0))).enabled());
    }
}
