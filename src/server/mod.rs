//! Listeners, accept loops, connection limits, shutdown and store maintenance.
//!
//! Limits and the shutdown token are passed in, never global. Each listener has its own
//! semaphore; a connection over the limit is closed at once (Postfix then retries or
//! applies its `default_action`) rather than left waiting in the backlog.

pub mod milter;
pub mod policy;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::config::ListenAddr;
use crate::metrics::ListenerStats;
use crate::service::{Greylister, unix_now};

/// A connection's waits for the server's `shutdown` and `hard_stop`, made once and polled
/// by reference in its read loop. On child tokens: waiting on the shared tokens locked one
/// mutex for every connection on every read.
pub(crate) fn connection_stops(
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) -> (
    WaitForCancellationFutureOwned,
    WaitForCancellationFutureOwned,
) {
    (
        shutdown.child_token().cancelled_owned(),
        hard_stop.child_token().cancelled_owned(),
    )
}

/// A bound listening socket.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds `addr`. A Unix socket path left behind by a dead daemon is replaced; one that
    /// a live process still answers on is an error.
    pub async fn bind(addr: &ListenAddr, socket_mode: u32) -> io::Result<Bound> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Bound::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
                Ok(Bound::Unix(l, path.clone()))
            }
        }
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> String {
        match self {
            Bound::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp (unknown: {e})"), |a| a.to_string()),
            Bound::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Per-connection limits of the policy listener.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub io_timeout: Duration,
    pub codec: crate::proto::policy::Limits,
}

/// A protocol served on a listener, with what its connections need.
#[derive(Clone)]
pub enum Handler {
    Policy(Arc<policy::ConnContext>),
    Milter(Arc<milter::MilterContext>),
}

impl Handler {
    fn max_connections(&self) -> usize {
        match self {
            Handler::Policy(c) => c.limits.max_connections,
            Handler::Milter(c) => c.limits.max_connections,
        }
    }

    fn svc(&self) -> &Arc<Greylister> {
        match self {
            Handler::Policy(c) => &c.svc,
            Handler::Milter(c) => &c.svc,
        }
    }

    fn protocol(&self) -> &'static str {
        match self {
            Handler::Policy(_) => "policy",
            Handler::Milter(_) => "milter",
        }
    }

    fn shutdown(&self) -> &CancellationToken {
        match self {
            Handler::Policy(c) => &c.shutdown,
            Handler::Milter(c) => &c.shutdown,
        }
    }

    async fn serve<S: Io>(&self, stream: S, peer: &str) {
        match self {
            Handler::Policy(c) => policy::serve_connection(stream, peer, c).await,
            Handler::Milter(c) => milter::serve_connection(stream, peer, c).await,
        }
    }
}

/// Serves every listener with its handler until the handlers' `shutdown` is cancelled,
/// then waits for open connections to finish their current request (their `hard_stop`
/// closes them even mid-request). Returns when every connection task has ended.
pub async fn serve(listeners: Vec<(Bound, Handler)>) {
    let tracker = TaskTracker::new();
    for (l, handler) in listeners {
        tracker.spawn(accept_loop(l, handler, tracker.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

async fn accept_loop(l: Bound, handler: Handler, tracker: TaskTracker) {
    let name = l.local_addr();
    let limit = handler.max_connections();
    let permits = Arc::new(Semaphore::new(limit));
    let stats = Arc::new(ListenerStats::new(name.clone(), handler.protocol(), limit));
    handler.svc().register_listener(stats.clone());
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = handler.shutdown().cancelled() => break,
            r = accept(&l) => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving.
                tracing::error!(listener = %name, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                listener = %name, peer = %peer, limit,
                "connection limit reached; closing new connection"
            );
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        tracker.spawn(async move {
            match stream {
                Stream::Tcp(s) => handler.serve(s, &peer).await,
                Stream::Unix(s) => handler.serve(s, &peer).await,
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    if let Bound::Unix(_, path) = &l {
        let _ = std::fs::remove_file(path);
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Bound) -> io::Result<(Stream, String)> {
    match l {
        Bound::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Bound::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), format!("unix:{}", path.display())))
        }
    }
}

/// Marker for streams a connection handler can serve.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How the daemon (re)opens its store.
pub type StoreOpener =
    Arc<dyn Fn() -> Result<Arc<dyn crate::store::Store>, crate::store::StoreError> + Send + Sync>;

/// Background store upkeep: group commit every `flush_interval`, an expiry step every tick,
/// and reopening the store while it is missing. Runs until `shutdown`.
pub async fn maintain_store(
    svc: Arc<Greylister>,
    flush_interval: Duration,
    reopen: Option<StoreOpener>,
    shutdown: CancellationToken,
) {
    const TICK: Duration = Duration::from_millis(100);
    const EXPIRE_SCAN: usize = 20_000;
    let mut tick = tokio::time::interval(TICK.min(flush_interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = tokio::time::Instant::now();
    let mut reopen_wait = Duration::from_secs(1);
    let mut next_reopen = tokio::time::Instant::now();
    let mut flush_failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = match svc.store.get() {
            Ok(s) => s,
            Err(_) => {
                let Some(open) = &reopen else { continue };
                if tokio::time::Instant::now() < next_reopen {
                    continue;
                }
                let open = open.clone();
                match tokio::task::spawn_blocking(move || open()).await {
                    Ok(Ok(s)) => {
                        let name = s.describe();
                        svc.store.set(s);
                        tracing::warn!(store = %name, "store is available again; greylisting resumes");
                        reopen_wait = Duration::from_secs(1);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, retry_in = ?reopen_wait, "store still unavailable; answering per fail_mode");
                        svc.store.set_missing(e.to_string());
                        next_reopen = tokio::time::Instant::now() + reopen_wait;
                        reopen_wait = (reopen_wait * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => tracing::error!(error = %e, "store open task failed"),
                }
                continue;
            }
        };
        svc.expire_runtime(unix_now());
        if let Err(e) = store.expire(unix_now(), EXPIRE_SCAN).await {
            tracing::warn!(error = %e, "expiry step failed");
        }
        if last_flush.elapsed() >= flush_interval {
            last_flush = tokio::time::Instant::now();
            match store.flush().await {
                Ok(()) if flush_failing => {
                    flush_failing = false;
                    tracing::warn!("store writes succeed again");
                }
                Ok(()) => {}
                Err(e) => {
                    flush_failing = true;
                    tracing::error!(error = %e, "store flush failed; changes stay in memory and are retried");
                }
            }
        }
    }
}
