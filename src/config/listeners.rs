//! `[policy]` and `[milter]`: the front ends' listeners and limits, and how each spells a
//! deferral.

use std::time::Duration;

use serde::Deserialize;

use super::{MAX_CONNECTIONS, Problems};
use crate::dur::Dur;
use crate::proto::policy::Limits;
use crate::server::milter::{MilterConfig, MilterLimits};
use crate::server::policy::{PolicyConfig, PolicyLimits};
use crate::server::replies::DeferAction;

/// Default connections per peer and listener, policy and milter alike: half the default
/// `max_connections`. A Postfix host opens one connection per smtpd process, up to its
/// `default_process_limit` of 100 per service, so even two services checking mail (port
/// 25 and 587, say) fit; and no one address can hold more than half of a listener.
pub const DEFAULT_PER_PEER: usize = 256;

/// `[policy]`: the Postfix policy delegation listener(s).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPolicyServer {
    /// Addresses to listen on: `127.0.0.1:10023`, `[::1]:10023`, `unix:/path/to/socket`.
    pub listen: Vec<String>,
    /// How a deferral is answered: `DEFER_IF_PERMIT`, `DEFER`, or an explicit 4xx code such as `451 4.7.1`.
    pub defer_action: String,
    /// Text of the deferral; `{remaining}` is replaced by the seconds until a retry passes.
    pub defer_text: String,
    /// File mode of Unix sockets (octal).
    pub socket_mode: String,
    /// Concurrent connections per listener. When reached, the connection idle longest
    /// is closed for the new one; a new one is closed at once only when none is idle.
    pub max_connections: usize,
    /// Concurrent connections of one client address (for a Unix socket, one user) per
    /// listener, handled the same way among that peer's connections.
    pub max_connections_per_peer: usize,
    /// Close a connection with no complete request for this long (blank lines do not count).
    pub idle_timeout: Dur,
    /// Close a connection that takes this long to finish a started request or to take a reply.
    pub io_timeout: Dur,
    /// Longest request line in bytes.
    pub max_line_length: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
}

impl Default for RawPolicyServer {
    fn default() -> Self {
        let l = Limits::default();
        RawPolicyServer {
            listen: vec!["127.0.0.1:10023".into()],
            defer_action: "DEFER_IF_PERMIT".into(),
            defer_text: "Greylisted, please try again in {remaining} seconds".into(),
            socket_mode: "0666".into(),
            max_connections: 512,
            max_connections_per_peer: DEFAULT_PER_PEER,
            idle_timeout: Dur(Duration::from_secs(600)),
            io_timeout: Dur(Duration::from_secs(10)),
            max_line_length: l.max_line,
            max_attributes: l.max_attributes,
        }
    }
}

/// `[milter]`: the milter listener(s) for Sendmail and Postfix `smtpd_milters`. The
/// deferral text is `[policy] defer_text`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMilter {
    /// Addresses to listen on (none by default): `127.0.0.1:10024`, `unix:/path`.
    pub listen: Vec<String>,
    /// SMTP code and enhanced status code of a deferral, e.g. `451 4.7.1`.
    pub reply_code: String,
    /// Concurrent connections per listener. When reached, the connection idle longest
    /// is closed for the new one; a new one is closed at once only when none is idle.
    pub max_connections: usize,
    /// Concurrent connections of one client address (for a Unix socket, one user) per
    /// listener, handled the same way among that peer's connections.
    pub max_connections_per_peer: usize,
    /// Close a connection whose MTA sends no command that moves the session on for this
    /// long (macros and other no-op frames do not count).
    pub idle_timeout: Dur,
    /// Close a connection that takes this long to finish a frame or to take a reply.
    pub io_timeout: Dur,
    /// Largest frame in bytes.
    pub max_frame: usize,
    /// Most macros kept per connection, all SMTP stages together; more are dropped.
    pub max_macros: usize,
    /// Most bytes of macro names and values kept per connection; more are dropped.
    pub max_macro_bytes: usize,
}

impl Default for RawMilter {
    fn default() -> Self {
        RawMilter {
            listen: Vec::new(),
            reply_code: "451 4.7.1".into(),
            max_connections: 512,
            max_connections_per_peer: DEFAULT_PER_PEER,
            idle_timeout: Dur(Duration::from_secs(600)),
            io_timeout: Dur(Duration::from_secs(10)),
            max_frame: crate::proto::milter::DEFAULT_MAX_FRAME,
            max_macros: crate::server::milter::DEFAULT_MAX_MACROS,
            max_macro_bytes: crate::server::milter::DEFAULT_MAX_MACRO_BYTES,
        }
    }
}

impl RawPolicyServer {
    /// The policy listeners and how a policy reply spells a deferral.
    pub(super) fn check(
        &self,
        milter_listen_empty: bool,
        p: &mut Problems<'_>,
    ) -> (PolicyConfig, DeferAction) {
        let mut listen = Vec::new();
        if self.listen.is_empty() && milter_listen_empty {
            p.at(
                &["policy", "listen"],
                "at least one listen address is needed (policy, milter or smtp)".into(),
            );
        }
        for (i, l) in self.listen.iter().enumerate() {
            match l.parse() {
                Ok(a) => listen.push(a),
                Err(e) => p.at(&["policy", "listen", &i.to_string()], e),
            }
        }
        let defer_action = self.defer_action.parse().unwrap_or_else(|e| {
            p.at(&["policy", "defer_action"], e);
            DeferAction::DeferIfPermit
        });
        if self.defer_text.contains(['\r', '\n']) || self.defer_text.trim().is_empty() {
            p.at(
                &["policy", "defer_text"],
                "defer_text must be one non-empty line".into(),
            );
        }
        let digits = self
            .socket_mode
            .strip_prefix("0o")
            .unwrap_or(&self.socket_mode);
        let socket_mode = Some(digits)
            .filter(|d| {
                !d.is_empty() && d.len() <= 4 && d.bytes().all(|b| (b'0'..=b'7').contains(&b))
            })
            .and_then(|d| u32::from_str_radix(d, 8).ok())
            .filter(|m| *m <= 0o777)
            .unwrap_or_else(|| {
                p.at(
                    &["policy", "socket_mode"],
                    format!(
                        "{:?} is not an octal file mode like \"0660\"",
                        self.socket_mode
                    ),
                );
                0o666
            });
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            p.at(
                &["policy", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections_per_peer) {
            p.at(
                &["policy", "max_connections_per_peer"],
                format!("max_connections_per_peer must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("io_timeout", self.io_timeout),
        ] {
            if d.0.is_zero() {
                p.at(&["policy", name], format!("{name} must be positive"));
            }
        }
        if self.max_line_length < 256 {
            p.at(
                &["policy", "max_line_length"],
                "max_line_length below 256 would refuse ordinary Postfix requests".into(),
            );
        }
        if self.max_attributes < 32 {
            p.at(
                &["policy", "max_attributes"],
                "max_attributes below 32 would refuse ordinary Postfix requests".into(),
            );
        }

        let config = PolicyConfig {
            listen,
            socket_mode,
            limits: PolicyLimits {
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                idle_timeout: self.idle_timeout.0,
                io_timeout: self.io_timeout.0,
                codec: Limits {
                    max_line: self.max_line_length,
                    max_attributes: self.max_attributes,
                },
            },
        };
        (config, defer_action)
    }
}

impl RawMilter {
    /// The milter listeners and the reply code of a milter deferral.
    pub(super) fn check(&self, p: &mut Problems<'_>) -> (MilterConfig, String) {
        let mut milter_listen = Vec::new();
        for (i, l) in self.listen.iter().enumerate() {
            match l.parse() {
                Ok(a) => milter_listen.push(a),
                Err(e) => p.at(&["milter", "listen", &i.to_string()], e),
            }
        }
        // The same checks as an explicit policy defer code: 45x and an optional 4.x.y.
        if !matches!(self.reply_code.parse(), Ok(DeferAction::Code(_))) {
            p.at(
                &["milter", "reply_code"],
                format!(
                    "{:?} is not a 450/451/452 reply code such as \"451 4.7.1\"",
                    self.reply_code
                ),
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            p.at(
                &["milter", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections_per_peer) {
            p.at(
                &["milter", "max_connections_per_peer"],
                format!("max_connections_per_peer must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("io_timeout", self.io_timeout),
        ] {
            if d.0.is_zero() {
                p.at(&["milter", name], format!("{name} must be positive"));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_frame) {
            p.at(
                &["milter", "max_frame"],
                "max_frame must be between 1 KiB and 64 MiB".into(),
            );
        }
        // Postfix and Sendmail send about 20 macros, a few KiB, over a whole session.
        if !(32..=1 << 20).contains(&self.max_macros) {
            p.at(
                &["milter", "max_macros"],
                "max_macros must be between 32 (fewer would drop macros ordinary MTAs send) and 1048576".into(),
            );
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.max_macro_bytes) {
            p.at(
                &["milter", "max_macro_bytes"],
                "max_macro_bytes must be between 4 KiB (less would drop macros ordinary MTAs send) and 64 MiB".into(),
            );
        }

        let config = MilterConfig {
            listen: milter_listen,
            limits: MilterLimits {
                max_connections: self.max_connections,
                max_connections_per_peer: self.max_connections_per_peer,
                idle_timeout: self.idle_timeout.0,
                io_timeout: self.io_timeout.0,
                max_frame: self.max_frame,
                max_macros: self.max_macros,
                max_macro_bytes: self.max_macro_bytes,
            },
        };
        let code = self
            .reply_code
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        (config, code)
    }
}
