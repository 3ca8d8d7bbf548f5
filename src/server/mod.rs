//! Listeners, accept loops, connection limits, shutdown and store maintenance.
//!
//! Limits and the shutdown token are passed in, never global. Each listener has its own
//! slots (`slots.rs`): a limit of connections, and one per peer. When a limit is reached
//! the connection idle longest makes room for the new one; only when none may be closed
//! is the new one closed at once (Postfix then retries or applies its `default_action`)
//! rather than left waiting in the backlog — also when the process is out of file
//! descriptors (`accept.rs`).

pub mod accept;
mod addr;
pub mod milter;
pub mod policy;
pub mod replies;
pub mod slots;
pub mod smtp;
pub mod threads;

pub use addr::ListenAddr;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ListenerStats;
use crate::service::{Greylister, unix_now};
use slots::{PeerKey, Slots};

/// The server's two stop tokens as connections watch them: `shutdown` (stop taking new
/// requests; idle connections close at once) and `hard_stop` (close every connection now,
/// even mid-request: the shutdown grace period is over).
///
/// Every connection polls its waits on every read, and a cancellation token's wait takes
/// two mutexes per poll. Here a poll is one atomic load: a task per token raises a flag and
/// wakes the waiting connections when the token is cancelled.
pub struct StopSignals {
    pub shutdown: CancellationToken,
    pub hard_stop: CancellationToken,
    shutdown_raised: Signal,
    hard_stop_raised: Signal,
}

#[derive(Default)]
struct Signal {
    raised: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn raise(&self) {
        // The flag first: a wait woken by the notification, or polled after it, sees it.
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

impl StopSignals {
    /// Follows the two tokens from now on. Call within the runtime.
    pub fn new(shutdown: CancellationToken, hard_stop: CancellationToken) -> Arc<Self> {
        let signals = Arc::new(StopSignals {
            shutdown,
            hard_stop,
            shutdown_raised: Signal::default(),
            hard_stop_raised: Signal::default(),
        });
        type Pick = fn(&StopSignals) -> &Signal;
        let follow: [(&CancellationToken, Pick); 2] = [
            (&signals.shutdown, |s| &s.shutdown_raised),
            (&signals.hard_stop, |s| &s.hard_stop_raised),
        ];
        for (token, signal) in follow {
            let (token, watched) = (token.clone(), Arc::downgrade(&signals));
            tokio::spawn(async move {
                token.cancelled().await;
                if let Some(s) = watched.upgrade() {
                    signal(&s).raise();
                }
            });
        }
        signals
    }

    /// A connection's waits for (`shutdown`, `hard_stop`), made once and polled by
    /// reference in its read loop.
    pub(crate) fn waits(&self) -> (StopWait<'_>, StopWait<'_>) {
        (
            StopWait::new(&self.shutdown_raised),
            StopWait::new(&self.hard_stop_raised),
        )
    }
}

/// Resolves once its signal is raised. Registered with the task at the first poll (and
/// again only if polled by another task); later polls just read the flag.
pub(crate) struct StopWait<'a> {
    raised: &'a AtomicBool,
    notified: std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>,
    registered: Option<std::task::Waker>,
}

impl<'a> StopWait<'a> {
    fn new(signal: &'a Signal) -> Self {
        StopWait {
            raised: &signal.raised,
            notified: Box::pin(signal.notify.notified()),
            registered: None,
        }
    }
}

impl std::future::Future for StopWait<'_> {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        if self.raised.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if self.notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.registered = Some(cx.waker().clone());
        // Raised between the first check and the registration: the notification may have
        // gone out before this wait was listed.
        if self.raised.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Connections the kernel holds for a listener before they are accepted.
const LISTEN_BACKLOG: u32 = 1024;

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
            ListenAddr::Tcp(a) => bind_tcp(*a, false),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
                Ok(Bound::Unix(l, path.clone()))
            }
        }
    }

    /// `n` sockets listening on one TCP address, bound with `SO_REUSEPORT` when there are
    /// several, so that the kernel spreads new connections among them; port 0 is the port
    /// the first one got.
    ///
    /// # Errors
    ///
    /// As [`Bound::bind`].
    pub fn bind_shared(addr: SocketAddr, n: usize) -> io::Result<Vec<Bound>> {
        let shared = n > 1;
        let first = bind_tcp(addr, shared)?;
        let addr = match &first {
            Bound::Tcp(l) => l.local_addr()?,
            Bound::Unix(..) => unreachable!("bound to a TCP address"),
        };
        let mut all = vec![first];
        for _ in 1..n {
            all.push(bind_tcp(addr, shared)?);
        }
        Ok(all)
    }

    /// This socket, registered with the runtime this is called on: its readiness is
    /// then told to the thread that accepts on it.
    fn moved_here(self) -> io::Result<Bound> {
        match self {
            Bound::Tcp(l) => Ok(Bound::Tcp(TcpListener::from_std(l.into_std()?)?)),
            Bound::Unix(l, path) => Ok(Bound::Unix(UnixListener::from_std(l.into_std()?)?, path)),
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

fn bind_tcp(a: SocketAddr, reuse_port: bool) -> io::Result<Bound> {
    let sock = match a {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    if a.is_ipv6() {
        // `[::]` takes IPv4 too (one dual-stack socket), whatever the host's
        // net.ipv6.bindv6only says.
        socket2::SockRef::from(&sock).set_only_v6(false)?;
    }
    if reuse_port {
        sock.set_reuseport(true)?;
    }
    // Replies go out at once (no Nagle delay). Set here, Linux's accepted sockets inherit
    // it: no system call per connection (see `NoDelay`).
    let _ = sock.set_nodelay(true);
    sock.bind(a)?;
    // A backlog for bursts of connections (std's default is 128; the kernel caps it at
    // net.core.somaxconn).
    Ok(Bound::Tcp(sock.listen(LISTEN_BACKLOG)?))
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

/// A protocol served on a listener, with what its connections need.
#[derive(Clone)]
pub enum Handler {
    Policy(Arc<policy::PolicyContext>),
    Milter(Arc<milter::MilterContext>),
    Smtp(Arc<smtp::SmtpContext>),
}

impl Handler {
    fn max_connections(&self) -> usize {
        match self {
            Handler::Policy(c) => c.limits.max_connections,
            Handler::Milter(c) => c.limits.max_connections,
            Handler::Smtp(c) => c.config.limits.max_connections,
        }
    }

    fn max_connections_per_peer(&self) -> usize {
        match self {
            Handler::Policy(c) => c.limits.max_connections_per_peer,
            Handler::Milter(c) => c.limits.max_connections_per_peer,
            Handler::Smtp(c) => c.config.limits.max_connections_per_peer,
        }
    }

    fn svc(&self) -> &Arc<Greylister> {
        match self {
            Handler::Policy(c) => &c.svc,
            Handler::Milter(c) => &c.svc,
            Handler::Smtp(c) => &c.svc,
        }
    }

    fn protocol(&self) -> &'static str {
        match self {
            Handler::Policy(_) => "policy",
            Handler::Milter(_) => "milter",
            Handler::Smtp(_) => "smtp",
        }
    }

    /// The SMTP front's PROXY header names the address the client connected to.
    fn wants_local_address(&self) -> bool {
        match self {
            Handler::Smtp(c) => c.config.backend_options.proxy != smtp::ProxyProtocol::Off,
            Handler::Policy(_) | Handler::Milter(_) => false,
        }
    }

    fn shutdown(&self) -> &CancellationToken {
        match self {
            Handler::Policy(c) => &c.stops.shutdown,
            Handler::Milter(c) => &c.stops.shutdown,
            Handler::Smtp(c) => &c.stops.shutdown,
        }
    }

    async fn serve<S: Io + 'static>(
        &self,
        stream: S,
        peer: &str,
        local: Option<std::net::SocketAddr>,
        slot: &slots::Slot,
    ) {
        match self {
            Handler::Policy(c) => policy::serve_connection(stream, peer, c, slot).await,
            Handler::Milter(c) => milter::serve_connection(stream, peer, c, slot).await,
            Handler::Smtp(c) => smtp::serve_connection(stream, peer, local, c, slot).await,
        }
    }
}

/// A listening address, its handler, and its sockets: one, or one per thread of a front
/// end that runs on threads of its own (bound with `SO_REUSEPORT`, see
/// [`Bound::bind_shared`]), each with the runtime its accept loop and connections run on
/// (`None`: the daemon's).
pub struct Listener {
    pub sockets: Vec<(Bound, Option<tokio::runtime::Handle>)>,
    pub handler: Handler,
}

/// What the sockets of one listening address share: its connection limits (the whole
/// address's, whichever socket a connection came in on), counters and admission log.
struct Admission {
    name: String,
    slots: Arc<Slots>,
    stats: Arc<ListenerStats>,
    log: accept::AdmissionLog,
}

/// Serves every listener with its handler until the handlers' `shutdown` is cancelled,
/// then waits for open connections to finish their current request (their `hard_stop`
/// closes them even mid-request). Returns when every connection task has ended.
pub async fn serve(listeners: Vec<Listener>) {
    let tracker = TaskTracker::new();
    for Listener { sockets, handler } in listeners {
        let Some((first, _)) = sockets.first() else {
            continue;
        };
        let name = first.local_addr();
        let slots = Slots::new(
            handler.max_connections(),
            handler.max_connections_per_peer(),
        );
        let stats = Arc::new(ListenerStats::new(
            name.clone(),
            handler.protocol(),
            slots.limit(),
        ));
        handler.svc().register_listener(stats.clone());
        let log = accept::AdmissionLog::new(&name, handler.protocol());
        let admission = Arc::new(Admission {
            name,
            slots,
            stats,
            log,
        });
        for (l, runtime) in sockets {
            let (handler, admission, t) = (handler.clone(), admission.clone(), tracker.clone());
            match runtime {
                None => tracker.spawn(accept_loop(l, handler, admission, t)),
                Some(rt) => tracker.spawn_on(
                    async move {
                        match l.moved_here() {
                            Ok(l) => accept_loop(l, handler, admission, t).await,
                            Err(e) => tracing::error!(
                                listener = %admission.name, error = %e,
                                "cannot move a listening socket to its thread; it takes no connections"
                            ),
                        }
                    },
                    &rt,
                ),
            };
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn accept_loop(l: Bound, handler: Handler, admission: Arc<Admission>, tracker: TaskTracker) {
    let Admission {
        name,
        slots,
        stats,
        log,
    } = &*admission;
    let mut reserve = accept::Reserve::default();
    let mut backoff = Duration::from_millis(10);
    let mut pause = accept::FIRST_PAUSE;
    let mut nodelay = NoDelay::Unknown;
    loop {
        let accepted = tokio::select! {
            _ = handler.shutdown().cancelled() => break,
            r = accept(&l, &mut nodelay) => r,
        };
        let (stream, peer, key) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) if accept::out_of_descriptors(&e) => {
                if reserve
                    .out_of_descriptors(|cx| poll_accept(&l, cx), log, &e, &mut pause)
                    .await
                {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            Err(e) => {
                // Other failures: back off instead of spinning, keep serving.
                tracing::error!(listener = %name, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if !reserve.ensure() {
            // Out of descriptors, and no spare: this connection's is the spare from now on.
            stats.refused.fetch_add(1, Ordering::Relaxed);
            log.no_descriptors(&io::Error::from_raw_os_error(libc::EMFILE));
            drop(stream);
            reserve.ensure();
            continue;
        }
        pause = accept::FIRST_PAUSE;
        let lease = match slots.admit(key) {
            Ok((lease, evicted)) => {
                if let Some(e) = evicted {
                    stats.evicted.fetch_add(1, Ordering::Relaxed);
                    log.evicted(&key, &e, slots.limit_for(e.reason));
                }
                lease
            }
            Err(why) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                log.refused(&key, why, slots.limit_for(why));
                drop(stream);
                continue;
            }
        };
        // The address it came in on, only where a handler uses it (a system call saved
        // on every other connection).
        let local = match &stream {
            Stream::Tcp(s) if handler.wants_local_address() => s.local_addr().ok(),
            _ => None,
        };
        let handler = handler.clone();
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        // The connection's future is kilobytes (an SMTP session's is about 10 KiB): boxed,
        // it is built once on the heap, where spawning it unboxed copied it whole about ten
        // times per connection (into the task, its cell, its stages).
        tracker.spawn(async move {
            let slot = lease.slot();
            match stream {
                Stream::Tcp(s) => Box::pin(handler.serve(s, &peer, local, slot)).await,
                Stream::Unix(s) => Box::pin(handler.serve(s, &peer, local, slot)).await,
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(lease);
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

/// Takes a waiting connection if there is one, without waiting (see `accept::Reserve::shed`).
fn poll_accept(l: &Bound, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
    match l {
        Bound::Tcp(l) => l.poll_accept(cx).map_ok(drop),
        Bound::Unix(l, _) => l.poll_accept(cx).map_ok(drop),
    }
}

/// A connection, its peer's name and key.
type Accepted = (Stream, String, PeerKey);

/// Whether a TCP listener's connections come with TCP_NODELAY from the listening socket
/// (Linux copies it to accepted sockets): asked of the first, then trusted or set on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoDelay {
    Unknown,
    Inherited,
    SetEach,
}

async fn accept(l: &Bound, nodelay: &mut NoDelay) -> io::Result<Accepted> {
    match l {
        Bound::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // An IPv4 client of a dual-stack socket arrives as ::ffff:a.b.c.d: it is the
            // IPv4 address to every front end, limit and log.
            let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
            if *nodelay == NoDelay::Unknown {
                *nodelay = if s.nodelay().unwrap_or(false) {
                    NoDelay::Inherited
                } else {
                    NoDelay::SetEach
                };
            }
            if *nodelay == NoDelay::SetEach {
                let _ = s.set_nodelay(true);
            }
            Ok((Stream::Tcp(s), peer.to_string(), PeerKey::Ip(peer.ip())))
        }
        Bound::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            // No address: the peer is the connecting user (see `PeerKey::Uid`).
            let key = s
                .peer_cred()
                .map_or(PeerKey::Local, |c| PeerKey::Uid(c.uid()));
            Ok((Stream::Unix(s), format!("unix:{}", path.display()), key))
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
    // While commits fail (a full disk), one line at the first failure and then one a
    // minute: a line per second for hours would help nobody.
    const FAILING_REPORT: Duration = Duration::from_secs(60);
    let mut flush_failing: Option<(tokio::time::Instant, u64)> = None;
    let mut evictions = EvictionLog::default();
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
        svc.expire_runtime(unix_now()).await;
        evictions.observe(store.capacity(), tokio::time::Instant::now());
        if let Err(e) = store.expire(unix_now(), EXPIRE_SCAN).await {
            tracing::warn!(error = %e, "expiry step failed");
        }
        if last_flush.elapsed() >= flush_interval {
            last_flush = tokio::time::Instant::now();
            match (store.flush().await, &mut flush_failing) {
                (Ok(()), Some(_)) => {
                    flush_failing = None;
                    let failed = store.health().failed_commits;
                    tracing::warn!(failed_commits = failed, "store writes succeed again");
                }
                (Ok(()), None) => {}
                (Err(e), None) => {
                    flush_failing = Some((tokio::time::Instant::now(), 1));
                    tracing::error!(error = %e, "store flush failed; changes stay in memory and are retried");
                }
                (Err(e), Some((since, failures))) => {
                    *failures += 1;
                    if since.elapsed() >= FAILING_REPORT {
                        let h = store.health();
                        tracing::error!(
                            error = %e, failed_in_a_row = *failures,
                            pending_changes = h.pending_changes,
                            "store flush still failing; changes stay in memory and are retried"
                        );
                        *since = tokio::time::Instant::now();
                    }
                }
            }
        }
    }
}

/// How often a store that keeps evicting says how much.
const EVICTION_SUMMARY: Duration = Duration::from_secs(60);

/// Logs the store's evictions at its cap (`max_entries`) without a line per eviction: one
/// WARN when they start, a summary per [`EVICTION_SUMMARY`] while they go on, and a line
/// when an interval passed without any.
#[derive(Default)]
struct EvictionLog {
    /// Totals at the last summary (or at the start of evicting).
    last: crate::store::Capacity,
    /// When the last summary (or the start) was logged; `None`: not evicting.
    since: Option<tokio::time::Instant>,
}

impl EvictionLog {
    fn observe(&mut self, cap: Option<crate::store::Capacity>, now: tokio::time::Instant) {
        let Some(cap) = cap else { return };
        // Saturating: a store reopened after a failure counts from zero again.
        let new = cap.evicted().saturating_sub(self.last.evicted());
        match self.since {
            None if new > 0 => {
                tracing::warn!(
                    max_entries = cap.max_entries,
                    "store is full: evicting records to stay at max_entries, pending triplets \
                     first (oldest first seen first); a summary follows every minute"
                );
                self.since = Some(now);
            }
            None => return,
            Some(since) if now.duration_since(since) < EVICTION_SUMMARY => return,
            Some(_) if new > 0 => {
                tracing::warn!(
                    max_entries = cap.max_entries,
                    pending = cap
                        .evicted_pending
                        .saturating_sub(self.last.evicted_pending),
                    passed = cap.evicted_passed.saturating_sub(self.last.evicted_passed),
                    clients = cap
                        .evicted_clients
                        .saturating_sub(self.last.evicted_clients),
                    seconds = EVICTION_SUMMARY.as_secs(),
                    "store evictions at max_entries"
                );
                self.since = Some(now);
            }
            Some(_) => {
                tracing::info!(max_entries = cap.max_entries, "store evictions stopped");
                self.since = None;
            }
        }
        self.last = cap;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn accepted_tcp_connections_have_nodelay_set() {
        let addr = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let l = Bound::bind(&addr, 0o600).await.unwrap();
        let Bound::Tcp(listener) = &l else {
            panic!("a TCP listener")
        };
        let to = listener.local_addr().unwrap();
        let mut nodelay = NoDelay::Unknown;
        for _ in 0..3 {
            let _client = tokio::net::TcpStream::connect(to).await.unwrap();
            let (stream, _, _) =
                tokio::time::timeout(Duration::from_secs(5), accept(&l, &mut nodelay))
                    .await
                    .expect("accepted")
                    .unwrap();
            let Stream::Tcp(s) = stream else {
                panic!("a TCP connection")
            };
            assert!(s.nodelay().unwrap(), "TCP_NODELAY on the accepted socket");
        }
        assert_ne!(nodelay, NoDelay::Unknown);
        #[cfg(target_os = "linux")]
        assert_eq!(
            nodelay,
            NoDelay::Inherited,
            "Linux copies TCP_NODELAY from the listening socket"
        );
    }

    /// `[::]` is one dual-stack socket (IPV6_V6ONLY cleared, whatever the host's default):
    /// an IPv4 client reaches it, as the address of an IPv4 peer.
    #[tokio::test]
    async fn an_ipv6_wildcard_listener_takes_ipv4_clients() {
        let addr = ListenAddr::Tcp("[::]:0".parse().unwrap());
        let l = Bound::bind(&addr, 0o600).await.unwrap();
        let Bound::Tcp(listener) = &l else {
            panic!("a TCP listener")
        };
        assert!(
            !socket2::SockRef::from(listener).only_v6().unwrap(),
            "IPV6_V6ONLY"
        );
        let port = listener.local_addr().unwrap().port();
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut nodelay = NoDelay::Unknown;
        let (_, peer, key) = tokio::time::timeout(Duration::from_secs(5), accept(&l, &mut nodelay))
            .await
            .expect("accepted")
            .unwrap();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        assert_eq!(key, PeerKey::Ip("127.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn stop_waits_follow_their_tokens() {
        let (shutdown, hard_stop) = (CancellationToken::new(), CancellationToken::new());
        let stops = StopSignals::new(shutdown.clone(), hard_stop.clone());
        let (soft, hard) = stops.waits();
        tokio::pin!(soft, hard);
        // Registered (polled once, pending), then raised: the waiting task is woken.
        let waiting = tokio::time::timeout(Duration::from_millis(50), &mut soft).await;
        assert!(waiting.is_err(), "not raised yet");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), &mut soft)
            .await
            .expect("shutdown seen");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut hard)
                .await
                .is_err(),
            "hard stop is a signal of its own"
        );
        // Polled from another task than the one it registered with: it registers anew.
        let stops2 = stops.clone();
        let other = tokio::spawn(async move {
            let (_, hard) = stops2.waits();
            hard.await;
        });
        tokio::task::yield_now().await;
        hard_stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .expect("hard stop seen by the other task")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), &mut hard)
            .await
            .expect("and by this one");
        // A wait made after the signal is ready at once.
        let (late, _) = stops.waits();
        tokio::time::timeout(Duration::from_millis(50), late)
            .await
            .expect("already raised");
    }
}
