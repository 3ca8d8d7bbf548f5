//! The checked `[admin]` section, and where the admin token comes from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The default admin address (a port browsers do not block).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9025";

/// Where the admin token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Written in the configuration.
    Inline(String),
    /// Read from (or, by the daemon, created in) this file.
    File(PathBuf),
    /// No token: changes through the API are refused.
    None,
}

/// The checked `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: Vec<SocketAddr>,
    /// True when `listen` was not configured: a busy default port is not fatal.
    pub listen_is_default: bool,
    pub token: TokenSource,
    pub token_for_reads: bool,
    pub entries_file: Option<PathBuf>,
    /// How often a daemon of a shared store reads the entries' change marker.
    pub entries_poll: Duration,
    pub max_connections: usize,
    /// Connections of one client address.
    pub max_connections_per_peer: usize,
    /// Longest an admin request may take, its head included.
    pub request_timeout: Duration,
}

impl AdminConfig {
    /// The URL a local CLI uses to reach the daemon.
    pub fn url(&self) -> Option<String> {
        self.listen.first().map(|a| {
            let a = match a.ip() {
                ip if ip.is_unspecified() && a.is_ipv4() => {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                }
                ip if ip.is_unspecified() => {
                    SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), a.port())
                }
                _ => *a,
            };
            format!("http://{a}")
        })
    }
}

impl TokenSource {
    /// The token the daemon checks: inline, read from its file, or a new random one
    /// written there. `None` (changes refused) when there is none or the file cannot be
    /// used; either way the daemon serves mail.
    pub fn resolve_or_create(&self) -> Option<String> {
        match self {
            TokenSource::Inline(t) => Some(t.clone()),
            TokenSource::None => None,
            TokenSource::File(path) => match super::read_token_file(path) {
                Ok(Some(t)) => Some(t),
                Ok(None) => match super::create_token_file(path) {
                    Ok(t) => {
                        tracing::info!(path = %path.display(), "admin token created");
                        Some(t)
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot create the admin token file; changes through the admin API are disabled");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the admin token file; changes through the admin API are disabled");
                    None
                }
            },
        }
    }

    /// The token a command sends: inline or read from its file (never created).
    pub fn resolve(&self) -> Option<String> {
        match self {
            TokenSource::Inline(t) => Some(t.clone()),
            TokenSource::File(p) => super::read_token_file(p).ok().flatten(),
            TokenSource::None => None,
        }
    }
}
