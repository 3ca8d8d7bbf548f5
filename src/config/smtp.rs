//! `[smtp]`: the SMTP front end for mail servers without a policy hook.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{MAX_CONNECTIONS, Problems};
use crate::dur::Dur;
use crate::server::smtp::{
    BackendOptions, PregreetConfig, SmtpConfig, SmtpLimits, TarpitConfig, TlsFiles, TrapConfig,
    Traps, defaults as d, load_acceptor,
};

/// `[smtp]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSmtp {
    /// TCP addresses to take SMTP on (none by default): `0.0.0.0:25`, `[::]:25`.
    pub listen: Vec<String>,
    /// The real mail server that accepted transactions are relayed to, `host:port`.
    pub backend: Option<String>,
    /// Host name in the banner, EHLO reply and `Received:` header; default: `hostname`.
    pub hostname: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Longest command line in bytes (CRLF included).
    pub max_line_length: usize,
    pub max_commands: usize,
    /// Rejected commands before the session is closed.
    pub max_errors: usize,
    pub max_recipients: usize,
    /// Advertised SIZE, in bytes.
    pub max_message_size: u64,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    pub backend_connect_timeout: Dur,
    pub backend_timeout: Dur,
    /// Tell the backend the client's address by XCLIENT when it offers it.
    pub backend_xclient: bool,
    /// PROXY protocol towards the backend: `off`, `v1` or `v2`.
    pub backend_proxy: String,
    /// STARTTLS towards the backend when it offers it.
    pub backend_starttls: bool,
    /// Most idle backend sessions kept for later clients; `0`: none.
    pub backend_pool: usize,
    /// How long an idle backend session is kept.
    pub backend_idle: Dur,
    /// Hold the banner's last line back this long; a client that talks first is a bot.
    /// `0` turns the test off.
    pub pregreet_wait: Dur,
    /// `reject` (554) or `defer` (421) a client that talked first.
    pub pregreet_action: String,
    /// How long a pregreeting client's group is greylisted with `[dnsbl] delay`.
    pub pregreet_suspect_for: Dur,
    /// How long a client that waited for the banner is not made to wait again.
    pub pregreet_pass_for: Dur,
    /// Bytes per second of replies to deferred and suspect clients; `0`: no tarpit.
    pub tarpit_rate: u32,
    pub tarpit_max_sessions: usize,
    /// Greytrap addresses (`trap@example.org`, or `@domain`).
    pub traps: Vec<String>,
    /// A file of more greytrap addresses, one per line.
    pub traps_file: Option<PathBuf>,
    /// How long a client that wrote to a trap stays denied.
    pub trap_deny_for: Dur,
    /// PEM certificate chain for STARTTLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    pub tls_key: Option<PathBuf>,
    /// Threads that run the front's sessions (each a single-threaded runtime).
    pub threads: usize,
}

impl Default for RawSmtp {
    fn default() -> Self {
        RawSmtp {
            listen: Vec::new(),
            backend: None,
            hostname: None,
            max_connections: d::MAX_CONNECTIONS,
            max_connections_per_peer: d::MAX_CONNECTIONS_PER_PEER,
            max_line_length: d::MAX_LINE_LENGTH,
            max_commands: d::MAX_COMMANDS,
            max_errors: d::MAX_ERRORS,
            max_recipients: d::MAX_RECIPIENTS,
            max_message_size: d::MAX_MESSAGE_SIZE,
            command_timeout: Dur(d::COMMAND_TIMEOUT),
            data_timeout: Dur(d::DATA_TIMEOUT),
            backend_connect_timeout: Dur(d::BACKEND_CONNECT_TIMEOUT),
            backend_timeout: Dur(d::BACKEND_REPLY_TIMEOUT),
            backend_xclient: true,
            backend_proxy: "off".into(),
            backend_starttls: false,
            backend_pool: d::BACKEND_POOL,
            backend_idle: Dur(d::BACKEND_POOL_IDLE),
            pregreet_wait: Dur(d::PREGREET_WAIT),
            pregreet_action: "reject".into(),
            pregreet_suspect_for: Dur(d::PREGREET_SUSPECT_FOR),
            pregreet_pass_for: Dur(d::PREGREET_PASS_FOR),
            tarpit_rate: 0,
            tarpit_max_sessions: d::TARPIT_MAX_SESSIONS,
            traps: Vec::new(),
            traps_file: None,
            trap_deny_for: Dur(d::TRAP_DENY_FOR),
            tls_cert: None,
            tls_key: None,
            threads: d::THREADS,
        }
    }
}

impl RawSmtp {
    /// The SMTP front's settings; `hostname` is the daemon's when `[smtp]` names none.
    pub(super) fn check(&self, hostname: Option<&str>, p: &mut Problems<'_>) -> SmtpConfig {
        let at = |k: &'static str| ["smtp", k];
        let mut listen = Vec::new();
        for (i, l) in self.listen.iter().enumerate() {
            match l.parse() {
                Ok(a) => listen.push(a),
                Err(_) => p.at(
                    &["smtp", "listen", &i.to_string()],
                    format!("{l:?} is not a TCP address like \"0.0.0.0:25\" or \"[::]:25\""),
                ),
            }
        }
        let backend = self.backend.as_ref().map(|b| b.trim().to_string());
        match &backend {
            None if !listen.is_empty() => p.at(
                &at("backend"),
                "the SMTP front needs a backend (the mail server to relay to), \"host:port\""
                    .into(),
            ),
            Some(b) if !valid_host_port(b) => p.at(
                &at("backend"),
                format!("{b:?} is not \"host:port\" (e.g. \"127.0.0.1:2525\" or \"[::1]:2525\")"),
            ),
            _ => {}
        }
        if let Some(h) = &self.hostname
            && (h.is_empty() || h.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            p.at(&at("hostname"), format!("{h:?} is not a host name"));
        }
        for (k, v) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
        ] {
            if !(1..=MAX_CONNECTIONS).contains(&v) {
                p.at(
                    &at(k),
                    format!("{k} must be between 1 and {MAX_CONNECTIONS}"),
                );
            }
        }
        if !(512..=1 << 20).contains(&self.max_line_length) {
            p.at(
                &at("max_line_length"),
                "max_line_length must be between 512 (RFC 5321's minimum) and 1048576".into(),
            );
        }
        for (k, v, min) in [
            ("max_commands", self.max_commands, 10),
            ("max_errors", self.max_errors, 1),
            ("max_recipients", self.max_recipients, 100),
        ] {
            if v < min {
                p.at(&at(k), format!("{k} must be at least {min}"));
            }
        }
        if self.max_message_size < 64 * 1024 {
            p.at(
                &at("max_message_size"),
                "max_message_size below 64 KiB would refuse ordinary mail".into(),
            );
        }
        for (k, v) in [
            ("command_timeout", self.command_timeout),
            ("data_timeout", self.data_timeout),
            ("backend_connect_timeout", self.backend_connect_timeout),
            ("backend_timeout", self.backend_timeout),
        ] {
            if v.0.is_zero() {
                p.at(&at(k), format!("{k} must be positive"));
            }
        }
        if self.backend_pool > self.max_connections {
            p.at(
                &at("backend_pool"),
                "backend_pool must be between 0 and max_connections".into(),
            );
        }
        if self.backend_idle.0 > Duration::from_secs(300) {
            p.at(
                &at("backend_idle"),
                "backend_idle over 5 minutes outlasts mail servers' own idle timeouts".into(),
            );
        }
        let proxy = self.backend_proxy.parse().unwrap_or_else(|e| {
            p.at(&at("backend_proxy"), e);
            crate::server::smtp::ProxyProtocol::Off
        });
        let action = self.pregreet_action.parse().unwrap_or_else(|e| {
            p.at(&at("pregreet_action"), e);
            crate::server::smtp::PregreetAction::Reject
        });
        if self.pregreet_wait.0 > Duration::from_secs(60) {
            p.at(
                &at("pregreet_wait"),
                "pregreet_wait over 60 s would make real mail servers give up".into(),
            );
        }
        if !(1..=d::MAX_THREADS).contains(&self.threads) {
            p.at(
                &at("threads"),
                format!("threads must be between 1 and {}", d::MAX_THREADS),
            );
        }
        if self.tarpit_max_sessions == 0 {
            p.at(
                &at("tarpit_max_sessions"),
                "tarpit_max_sessions must be at least 1".into(),
            );
        }
        let traps = TrapConfig {
            addresses: self.traps.clone(),
            file: self.traps_file.clone(),
            deny_for: self.trap_deny_for.0,
        };
        for (i, t) in self.traps.iter().enumerate() {
            if !t.contains('@') || t.contains(char::is_whitespace) {
                p.at(
                    &["smtp", "traps", &i.to_string()],
                    format!("{t:?} is not an address or @domain"),
                );
            }
        }
        if let Err(e) = Traps::load(&traps) {
            p.at(&at("traps_file"), e);
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                if let Err(e) = load_acceptor(&files) {
                    p.at(&at("tls_cert"), e);
                }
                Some(files)
            }
            (None, None) => None,
            _ => {
                p.at(
                    &at("tls_cert"),
                    "tls_cert and tls_key go together: set both or neither".into(),
                );
                None
            }
        };
        SmtpConfig {
            listen,
            backend,
            backend_options: BackendOptions {
                xclient: self.backend_xclient,
                proxy,
                starttls: self.backend_starttls,
                connect_timeout: self.backend_connect_timeout.0,
                pool: self.backend_pool,
                pool_idle: self.backend_idle.0,
                reply_timeout: self.backend_timeout.0,
            },
            hostname: self
                .hostname
                .clone()
                .or_else(|| hostname.map(str::to_string))
                .unwrap_or_default(),
            limits: SmtpLimits {
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                max_line_length: self.max_line_length,
                max_commands: self.max_commands,
                max_errors: self.max_errors,
                max_recipients: self.max_recipients,
                max_message_size: self.max_message_size,
                command_timeout: self.command_timeout.0,
                data_timeout: self.data_timeout.0,
            },
            pregreet: PregreetConfig {
                wait: self.pregreet_wait.0,
                action,
                suspect_for: self.pregreet_suspect_for.0,
                pass_for: self.pregreet_pass_for.0,
            },
            tarpit: TarpitConfig {
                rate: self.tarpit_rate,
                max_sessions: self.tarpit_max_sessions.max(1),
            },
            traps,
            tls,
            threads: self.threads.clamp(1, d::MAX_THREADS),
        }
    }
}

/// `host:port` with a port number; IPv6 hosts in brackets.
fn valid_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains([':', '[', ']', ' '])
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}
