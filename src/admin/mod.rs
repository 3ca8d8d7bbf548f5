//! The admin HTTP listener: JSON API, Prometheus `/metrics` and the web dashboard.
//!
//! Loopback by default. Reads are open unless `token_for_reads` is set; every change
//! (runtime entries, purge, release, reload) needs `Authorization: Bearer <token>`, compared in
//! constant time. The dashboard's own files never need it (they hold no data; the page
//! asks for the token and sends it with its API calls). Like the mail listeners it has a
//! connection limit and one per peer (with the idle connection closed to make room,
//! `server::slots`), a deadline for a whole request head (hyper's header timeout, which
//! also ends idle keep-alive connections), a
//! per-request timeout, a body limit, and a lifetime cap per connection.

mod api;
mod assets;
pub mod client;
mod config;
pub mod entries;
mod prometheus;
pub mod wire;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::server::accept::{self, AdmissionLog, Reserve};
use crate::server::replies::Replies;
use crate::server::slots::{PeerKey, Slots};
use crate::service::Greylister;

pub use config::{AdminConfig, DEFAULT_ADMIN_LISTEN, TokenSource};

/// Largest request body accepted (entry changes and purge filters are small).
const MAX_BODY: usize = 64 * 1024;
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// A keep-alive connection is closed (gracefully) after this long, so idle browsers and
/// scrapers cannot hold connection slots forever.
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(120);

/// What the admin API may ask of the running daemon beyond its service.
#[async_trait::async_trait]
pub trait Control: Send + Sync {
    /// Reads the configuration again and swaps in what can change while running; on any
    /// error the running configuration stays and the error says why.
    async fn reload(&self, trigger: &str) -> Result<wire::ReloadReport, String>;

    /// The replies in force (explanations show the reply a decision gets).
    fn replies(&self) -> Arc<Replies>;
}

/// What the admin handlers share.
pub struct AdminState {
    pub svc: Arc<Greylister>,
    pub control: Arc<dyn Control>,
    token: Option<String>,
    token_for_reads: bool,
    max_connections: usize,
    max_connections_per_peer: usize,
    request_timeout: Duration,
    counts_cache: tokio::sync::Mutex<Option<(std::time::Instant, crate::store::Counts)>>,
}

impl AdminState {
    pub fn new(
        svc: Arc<Greylister>,
        control: Arc<dyn Control>,
        token: Option<String>,
        cfg: &AdminConfig,
    ) -> Self {
        if cfg.listen.iter().any(|a| !a.ip().is_loopback()) && !cfg.token_for_reads {
            tracing::warn!(
                "the admin listener is reachable beyond loopback and reads need no token; set admin.token_for_reads"
            );
        }
        AdminState {
            svc,
            control,
            token,
            token_for_reads: cfg.token_for_reads,
            max_connections: cfg.max_connections,
            max_connections_per_peer: cfg.max_connections_per_peer,
            request_timeout: cfg.request_timeout,
            counts_cache: tokio::sync::Mutex::new(None),
        }
    }

    fn token_ok(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some(want) = &self.token else {
            return Err(
                "changes are disabled: no admin token is configured (admin.token or admin.token_file)",
            );
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(g) if bool::from(g.as_bytes().ct_eq(want.as_bytes())) => Ok(()),
            Some(_) => Err("wrong admin token"),
            None => Err("this needs the admin token: Authorization: Bearer <token>"),
        }
    }
}

/// Reads the token file's first line; `None` when the file does not exist.
pub fn read_token_file(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let t = text.lines().next().unwrap_or("").trim().to_string();
            if t.len() < 16 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "token shorter than 16 characters",
                ));
            }
            Ok(Some(t))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a new random token (32 bytes from the kernel, hex) readable by the owner only.
pub fn create_token_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    Ok(token)
}

/// A JSON error body with a status.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = wire::ErrorBody {
        error: message.into(),
    };
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// Token checks, DNS-rebinding protection, and the per-request time limit.
async fn guard(State(st): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let is_read = matches!(*req.method(), Method::GET | Method::HEAD);
    // A web page elsewhere could resolve its own name to 127.0.0.1 and read the dashboard
    // data; only IP literals and localhost are served without a token.
    if !st.token_for_reads && !host_is_local(req.headers()) {
        return error(
            StatusCode::FORBIDDEN,
            "the Host header must be an IP address or localhost (or set admin.token_for_reads)",
        );
    }
    let path = req.uri().path();
    let public = path == "/healthz" || (is_read && assets::PATHS.contains(&path));
    if (!is_read || st.token_for_reads)
        && !public
        && let Err(why) = st.token_ok(req.headers())
    {
        return error(StatusCode::UNAUTHORIZED, why);
    }
    match tokio::time::timeout(st.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took longer than admin.request_timeout",
        ),
    }
}

fn host_is_local(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 clients without Host reach us by address anyway.
        return true;
    };
    host_names_local(host)
}

/// Whether a `Host` value names this machine without DNS: `[IPv6]` or `[IPv6]:port`, an
/// IPv4 address or `localhost` with an optional port. Parsed whole, as a browser sends it:
/// a name that merely starts like an address (`[::1].evil.example`, `127.0.0.1.evil.example`)
/// is a DNS name an attacker's page may control, so it is not local.
fn host_names_local(host: &str) -> bool {
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        let port_fine = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return port_fine && addr.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = match host.split_once(':') {
        None => host,
        Some((name, port)) if port_ok(port) => name,
        // A second colon (an IPv6 address without brackets) or a port that is no number.
        Some(_) => return false,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn router(st: Arc<AdminState>) -> Router {
    api::routes()
        .merge(assets::routes())
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(st)
}

/// Serves the admin API on `listeners` until `shutdown`; open requests finish first.
pub async fn serve(listeners: Vec<TcpListener>, st: Arc<AdminState>, shutdown: CancellationToken) {
    let app = router(st.clone());
    let tracker = TaskTracker::new();
    for l in listeners {
        tracker.spawn(accept_loop(
            l,
            app.clone(),
            st.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    tracker.close();
    tracker.wait().await;
}

async fn accept_loop(
    l: TcpListener,
    app: Router,
    st: Arc<AdminState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let name = l
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let slots = Slots::new(st.max_connections, st.max_connections_per_peer);
    let log = AdmissionLog::new(&name, "admin");
    let mut reserve = Reserve::default();
    let mut backoff = Duration::from_millis(10);
    let mut pause = accept::FIRST_PAUSE;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) if accept::out_of_descriptors(&e) => {
                    // See `server::accept`: the spare lets the waiting connection be taken
                    // and closed, instead of leaving it hanging.
                    reserve
                        .out_of_descriptors(|cx| l.poll_accept(cx).map_ok(drop), &log, &e, &mut pause)
                        .await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        if !reserve.ensure() {
            log.no_descriptors(&std::io::Error::from_raw_os_error(libc::EMFILE));
            drop(stream);
            reserve.ensure();
            continue;
        }
        pause = accept::FIRST_PAUSE;
        let key = PeerKey::Ip(peer.ip());
        let lease = match slots.admit(key) {
            Ok((lease, evicted)) => {
                if let Some(e) = evicted {
                    log.evicted(&key, &e, slots.limit_for(e.reason));
                }
                lease
            }
            Err(why) => {
                log.refused(&key, why, slots.limit_for(why));
                continue;
            }
        };
        let timeout = st.request_timeout;
        let shutdown = shutdown.clone();
        let app = app.clone();
        tracker.spawn(async move {
            let slot = lease.slot().clone();
            // A request is in progress from the moment hyper has its whole head until the
            // handler's answer: only then may the connection not be closed to make room. A
            // head still trickling in, or a keep-alive wait, is idle.
            let marked = slot.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                let (app, slot) = (app.clone(), marked.clone());
                // Changes are logged with the peer that asked (`/api/release`).
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                async move {
                    if !slot.begin() {
                        // Closed to make room as the request came in; the task drops the
                        // connection.
                        return Ok(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "connection closed to make room for another",
                        ));
                    }
                    let answer = app.oneshot(req).await;
                    slot.done(tokio::time::Instant::now());
                    answer
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(MAX_HEAD.max(8192))
                .max_headers(64);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let evicted = slot.evicted();
            let ended = tokio::select! {
                r = conn.as_mut() => Some(r),
                // Idle: nothing owed to the client, close at once.
                () = evicted => return,
                _ = shutdown.cancelled() => None,
                _ = tokio::time::sleep(MAX_CONNECTION_LIFE) => None,
            };
            if ended.is_none() {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(timeout, conn).await;
            }
            drop(lease);
        });
    }
}
#[cfg(test)]
mod tests {
    use super::host_names_local;

    #[test]
    fn host_is_local_only_for_whole_addresses_and_localhost() {
        for local in [
            "127.0.0.1",
            "127.0.0.1:9025",
            "192.0.2.1:80",
            "localhost",
            "LocalHost:9025",
            "[::1]",
            "[::1]:9025",
            "[fe80::1]:80",
        ] {
            assert!(host_names_local(local), "{local} is local");
        }
        for attack in [
            "[::1].evil.example",
            "[::1].evil.example:9025",
            "[::1]:9025.evil.example",
            "[::1]evil.example",
            "[::1]:",
            "[::1]:99999",
            "[::1]:+80",
            "[::1",
            "[127.0.0.1]",
            "[evil.example]",
            "127.0.0.1.evil.example",
            "127.0.0.1.evil.example:9025",
            "localhost.evil.example",
            "evil.example",
            "evil.example:9025",
            "localhost:",
            "localhost:80:80",
            "localhost:x",
            "127.0.0.1:+80",
            "::1",
            "::1:9025",
            "",
        ] {
            assert!(!host_names_local(attack), "{attack:?} is not local");
        }
    }
}
