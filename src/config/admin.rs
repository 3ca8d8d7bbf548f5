//! `[admin]`: the HTTP API, checked into the admin listener's `AdminConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{MAX_CONNECTIONS, Problems};
use crate::admin::{AdminConfig, DEFAULT_ADMIN_LISTEN, TokenSource};
use crate::dur::Dur;
use crate::store::StoreKind;

/// Bounds of `[admin] entries_poll`.
const ENTRIES_POLL_MIN: Duration = Duration::from_millis(100);
const ENTRIES_POLL_MAX: Duration = Duration::from_secs(60);

/// `[admin]`: the HTTP API, Prometheus `/metrics` and the dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    /// TCP addresses to serve on (default `127.0.0.1:9025`); `[]` disables the admin
    /// listener. When the default address is taken (another greygate on this host) the
    /// daemon runs without it and says so; an address written here must be free.
    pub listen: Option<Vec<String>>,
    /// Bearer token that changes (allow/deny entries, purge, reload) must carry.
    pub token: String,
    /// File whose first line is the token; created with a random token (mode 0600) when
    /// missing. Default: `admin.token` beside the embedded store, or in
    /// /var/lib/greygate for the other backends; none for the memory store.
    pub token_file: Option<PathBuf>,
    /// Also require the token for reads (stats, entries, explain, metrics, dashboard data).
    pub token_for_reads: bool,
    /// File that keeps runtime allow/deny entries across restarts. Default: beside the
    /// embedded store (`<path>.entries.json`), none (memory only) for the memory store.
    /// With redis and postgres the store keeps the entries for every daemon, and this file
    /// (default /var/lib/greygate/runtime-entries.json) is only imported once, when the
    /// store has no entries yet.
    pub entries_file: Option<PathBuf>,
    /// With redis and postgres: how often a daemon looks whether the runtime entries in
    /// the store changed (one small read), 100ms to 60s.
    pub entries_poll: Dur,
    /// Concurrent admin connections. When reached, the connection idle longest (a
    /// keep-alive one, or one whose request has not arrived whole) is closed for the new
    /// one; a new one is closed at once only when every connection is answering.
    pub max_connections: usize,
    /// Concurrent admin connections of one client address, handled the same way among
    /// that address's connections.
    pub max_connections_per_peer: usize,
    /// Longest an admin request (headers included) may take.
    pub request_timeout: Dur,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: None,
            token: String::new(),
            token_file: None,
            token_for_reads: false,
            entries_file: None,
            entries_poll: Dur(Duration::from_secs(1)),
            max_connections: 64,
            // A browser opens at most 6 connections to a host, a scraper and each CLI
            // command one: room for two dashboards and the scrapers, while one address
            // can hold only a quarter of the listener.
            max_connections_per_peer: 16,
            request_timeout: Dur(Duration::from_secs(10)),
        }
    }
}

impl RawAdmin {
    /// The admin listener; the token file and the runtime-entries file default to places
    /// beside the `store`.
    pub(super) fn check(&self, store: &StoreKind, p: &mut Problems<'_>) -> AdminConfig {
        let mut admin_listen = Vec::new();
        let default_listen = vec![DEFAULT_ADMIN_LISTEN.to_string()];
        for (i, l) in self
            .listen
            .as_ref()
            .unwrap_or(&default_listen)
            .iter()
            .enumerate()
        {
            match l.parse::<SocketAddr>() {
                Ok(a) => admin_listen.push(a),
                Err(_) => p.at(
                    &["admin", "listen", &i.to_string()],
                    format!("{l:?} is not an IP address and port such as 127.0.0.1:9025"),
                ),
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            p.at(
                &["admin", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections_per_peer) {
            p.at(
                &["admin", "max_connections_per_peer"],
                format!("max_connections_per_peer must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if !(ENTRIES_POLL_MIN..=ENTRIES_POLL_MAX).contains(&self.entries_poll.0) {
            p.at(
                &["admin", "entries_poll"],
                "entries_poll must be between 100ms and 60s".into(),
            );
        }
        if self.request_timeout.0.is_zero() {
            p.at(
                &["admin", "request_timeout"],
                "request_timeout must be positive".into(),
            );
        }
        if !self.token.is_empty() && self.token.trim().len() < 16 {
            p.at(
                &["admin", "token"],
                "token must have at least 16 characters".into(),
            );
        }
        if !self.token.is_empty() && self.token_file.is_some() {
            p.at(
                &["admin", "token_file"],
                "set token or token_file, not both".into(),
            );
        }

        AdminConfig {
            listen: admin_listen,
            listen_is_default: self.listen.is_none(),
            token: if !self.token.is_empty() {
                TokenSource::Inline(self.token.trim().to_string())
            } else if let Some(f) = self
                .token_file
                .clone()
                .or_else(|| store.state_dir().map(|d| d.join("admin.token")))
            {
                TokenSource::File(f)
            } else {
                TokenSource::None
            },
            token_for_reads: self.token_for_reads,
            entries_file: self.entries_file.clone().or_else(|| match store {
                StoreKind::Memory => None,
                StoreKind::Embedded(p) => {
                    let mut name = p.file_name().unwrap_or_default().to_os_string();
                    name.push(".entries.json");
                    Some(p.with_file_name(name))
                }
                _ => store.state_dir().map(|d| d.join("runtime-entries.json")),
            }),
            entries_poll: self.entries_poll.0,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            request_timeout: self.request_timeout.0,
        }
    }
}
