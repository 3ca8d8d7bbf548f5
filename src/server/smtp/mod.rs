//! The SMTP front end: greygate takes port 25 itself for mail servers without a policy hook
//! (Exchange, appliances), greylists at RCPT with the shared service, and relays what passes
//! to the real mail server, the backend, as the transaction goes: it never queues, so it
//! never takes responsibility for a message.
//!
//! - `session.rs`: one client session's state machine (banner, pregreet test, EHLO, MAIL,
//!   RCPT, DATA, BDAT, RSET, STARTTLS, limits) over command lines parsed by `smtp-proto`.
//! - `backend.rs`: the session towards the backend, opened at the first recipient the
//!   engine passes; XCLIENT or PROXY tells it the client's address.
//! - `wire.rs`: bounded line reading, reply writing (tarpitted or not) and the DATA relay.
//! - `pool.rs`: backend sessions that name no client (no XCLIENT, no PROXY) kept between
//!   client sessions (bounded, idle ones closed).
//! - `guard.rs`: what the front remembers about clients: pregreet suspects and passes,
//!   greytraps, the tarpit's budget.
//! - `tls.rs`: STARTTLS towards clients, with a certificate a reload can replace.

mod backend;
mod guard;
mod pool;
mod session;
mod tls;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use guard::{Guard, Traps};
pub use pool::Pool;
pub use session::serve_connection;
pub use tls::{TlsFiles, load_acceptor};

use super::replies::Replies;
use crate::service::Greylister;

/// What a client that talks before the banner ends gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PregreetAction {
    /// `554 5.5.1`, and the connection closes: what postscreen does with `enforce`.
    Reject,
    /// `421 4.7.1`-style deferral (a real MTA, should one pregreet, retries later).
    Defer,
}

impl PregreetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PregreetAction::Reject => "reject",
            PregreetAction::Defer => "defer",
        }
    }
}

impl std::str::FromStr for PregreetAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(PregreetAction::Reject),
            "defer" => Ok(PregreetAction::Defer),
            _ => Err(format!("{s:?} is not \"reject\" or \"defer\"")),
        }
    }
}

/// How the client's address reaches the backend besides the `Received:` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    /// HAProxy PROXY protocol version 1 (text).
    V1,
    /// HAProxy PROXY protocol version 2 (binary).
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ProxyProtocol::Off),
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(format!("{s:?} is not \"off\", \"v1\" or \"v2\"")),
        }
    }
}

/// The SMTP listeners and everything their sessions follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// TCP addresses to listen on (none: the SMTP front is off).
    pub listen: Vec<SocketAddr>,
    /// The real mail server, `host:port`.
    pub backend: Option<String>,
    pub backend_options: BackendOptions,
    /// Host name in the banner, the EHLO reply and the `Received:` header.
    pub hostname: String,
    pub limits: SmtpLimits,
    pub pregreet: PregreetConfig,
    pub tarpit: TarpitConfig,
    pub traps: TrapConfig,
    /// Certificate and key for STARTTLS; `None`: STARTTLS is not offered.
    pub tls: Option<TlsFiles>,
    /// Threads of the front's own: each runs a single-threaded runtime with a listening
    /// socket per address of its own (`SO_REUSEPORT` when more than one), and the sessions
    /// that socket accepts stay on that thread.
    pub threads: usize,
}

impl SmtpConfig {
    /// Equal but for what a reload swaps in (certificate files are re-read anyway, and the
    /// greytraps): the listeners and sessions need no restart for those.
    pub fn same_sockets_and_limits(&self, other: &SmtpConfig) -> bool {
        let strip = |c: &SmtpConfig| SmtpConfig {
            tls: None,
            traps: TrapConfig {
                addresses: Vec::new(),
                file: None,
                deny_for: c.traps.deny_for,
            },
            ..c.clone()
        };
        strip(self) == strip(other) && self.tls.is_some() == other.tls.is_some()
    }
}

/// How the front talks to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// Send XCLIENT when the backend offers it (Postfix with `smtpd_authorized_xclient_hosts`).
    pub xclient: bool,
    pub proxy: ProxyProtocol,
    /// STARTTLS towards the backend when it offers it (its certificate is not verified:
    /// the backend is the operator's own server, usually with a self-signed certificate).
    pub starttls: bool,
    pub connect_timeout: Duration,
    /// Most idle backend sessions kept for later clients (`0`: none, each client session
    /// opens its own). Never used with the PROXY protocol.
    pub pool: usize,
    /// How long an idle backend session is kept.
    pub pool_idle: Duration,
    /// Longest wait for one backend reply; the reply to the end of data may take twice as
    /// long (RFC 5321 §4.5.3.2: 10 minutes against 5).
    pub reply_timeout: Duration,
}

/// Limits of one SMTP listener and its sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Longest command line, CRLF included; a longer one gets `500 5.5.2`.
    pub max_line_length: usize,
    /// Commands in one session before it is closed with `421`.
    pub max_commands: usize,
    /// Rejected commands (syntax, sequence, unknown) before the session is closed.
    pub max_errors: usize,
    pub max_recipients: usize,
    /// Advertised `SIZE`; bigger messages get `552 5.3.4`.
    pub max_message_size: u64,
    /// Longest wait for the next command (RFC 5321: 5 minutes).
    pub command_timeout: Duration,
    /// Longest wait for the next block of message data (RFC 5321: 3 minutes).
    pub data_timeout: Duration,
}

/// Postscreen's pregreet test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PregreetConfig {
    /// How long the banner's last line is held back; zero turns the test off.
    pub wait: Duration,
    pub action: PregreetAction,
    /// How long a pregreeting client's group stays suspect (greylisted with `[dnsbl] delay`).
    pub suspect_for: Duration,
    /// How long a client that passed the test is not made to wait again.
    pub pass_for: Duration,
}

/// Slow replies for deferred and suspect clients (spamd's stuttering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarpitConfig {
    /// Bytes per second of tarpitted replies; zero turns the tarpit off.
    pub rate: u32,
    /// Sessions tarpitted at once; more are answered at full speed.
    pub max_sessions: usize,
}

/// Greytraps: addresses no real sender writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapConfig {
    /// Addresses (normalised, lower case) and `@domain` entries.
    pub addresses: Vec<String>,
    /// A file of more addresses, one per line, read at start and reload.
    pub file: Option<PathBuf>,
    /// How long a trapped client stays on the runtime deny list.
    pub deny_for: Duration,
}

/// Defaults, shared by the configuration and the tests.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_CONNECTIONS: usize = 1024;
    /// Postfix anvil's `smtpd_client_connection_count_limit` is 50.
    pub const MAX_CONNECTIONS_PER_PEER: usize = 50;
    /// What `smtp-proto` accepts; RFC 5321 asks for 512 and extensions take more.
    pub const MAX_LINE_LENGTH: usize = 4096;
    pub const MAX_COMMANDS: usize = 10_000;
    pub const MAX_ERRORS: usize = 10;
    /// RFC 5321 §4.5.3.1.8: at least 100.
    pub const MAX_RECIPIENTS: usize = 1000;
    pub const MAX_MESSAGE_SIZE: u64 = 64 * 1024 * 1024;
    pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
    pub const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
    pub const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(300);
    pub const BACKEND_POOL: usize = 32;
    /// Postfix's own SMTP client keeps a cached connection idle for 2 s
    /// (`smtp_connection_cache_time_limit`); far below any server's idle timeout.
    pub const BACKEND_POOL_IDLE: Duration = Duration::from_secs(5);
    /// Postscreen's `postscreen_greet_wait`.
    pub const PREGREET_WAIT: Duration = Duration::from_secs(6);
    pub const PREGREET_SUSPECT_FOR: Duration = Duration::from_secs(24 * 3600);
    /// Postscreen's `postscreen_greet_ttl`.
    pub const PREGREET_PASS_FOR: Duration = Duration::from_secs(24 * 3600);
    pub const TARPIT_MAX_SESSIONS: usize = 64;
    pub const TRAP_DENY_FOR: Duration = Duration::from_secs(24 * 3600);
    /// One thread serves some 9,000 messages of 10 KB a second (BENCHMARKS.md).
    pub const THREADS: usize = 1;
    pub const MAX_THREADS: usize = 64;
}

/// What an SMTP session needs.
pub struct SmtpContext {
    pub svc: Arc<Greylister>,
    /// Swapped whole by a reload.
    pub replies: Arc<arc_swap::ArcSwap<Replies>>,
    pub config: SmtpConfig,
    /// STARTTLS towards clients; swapped whole by a reload (a renewed certificate).
    pub tls: Arc<arc_swap::ArcSwapOption<tokio_rustls::TlsAcceptor>>,
    pub guard: Arc<Guard>,
    /// Backend sessions kept between client sessions.
    pub pool: Pool,
    /// Shutdown and hard stop.
    pub stops: Arc<super::StopSignals>,
}

impl SmtpContext {
    /// The pool for these settings: none with the PROXY protocol (its header names one
    /// client for the whole connection).
    pub fn pool_for(config: &SmtpConfig) -> Pool {
        let o = &config.backend_options;
        let max = if o.proxy == ProxyProtocol::Off {
            o.pool
        } else {
            0
        };
        Pool::new(max, o.pool_idle)
    }
}

/// Asks the backend what it offers, once at start: logs whether it answers (mail is
/// deferred while it does not) and whether XCLIENT will carry client addresses, and
/// learns whether to offer BDAT.
pub async fn check_backend(target: String, cfg: SmtpConfig, guard: Arc<Guard>) {
    let opts = &cfg.backend_options;
    match backend::Backend::capabilities(&target, opts, &cfg.hostname).await {
        Ok(caps) => {
            guard.learn_backend(&caps);
            let xclient = opts.xclient && !caps.xclient.is_empty();
            tracing::info!(
                backend = %target, chunking = caps.chunking, xclient,
                proxy = ?opts.proxy, size = ?caps.size,
                "SMTP backend answers"
            );
            if opts.proxy == ProxyProtocol::Off && !xclient {
                tracing::warn!(
                    backend = %target,
                    "SMTP backend offers no XCLIENT: it sees greygate's address; the client's is in the Received: header"
                );
            }
        }
        Err(e) => tracing::error!(
            backend = %target, error = %e,
            "SMTP backend does not answer; clients get 451 until it does"
        ),
    }
}
