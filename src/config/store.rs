//! `[store]`: the trust database, checked into the store's `StoreSpec`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{DEFAULT_DB_PATH, Problems};
use crate::dur::Dur;
use crate::service::FailMode;
use crate::store::{ServerStore, StoreKind, StoreSpec};

/// `[store]`: the trust database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStore {
    /// `embedded` (one crash-safe file), `memory` (lost on restart), or a database shared by
    /// several MX hosts: `redis` or `postgres` (at `url`).
    pub backend: String,
    /// File of the embedded store.
    pub path: PathBuf,
    /// Server of the `redis` or `postgres` backend: `redis://[[user]:password@]host[:port][/db]`,
    /// `redis+unix:///path/to/socket`, `postgres://user[:password]@host[:port]/database`.
    pub url: String,
    /// Most connections to the `postgres` server (the `redis` backend multiplexes one).
    pub pool_size: usize,
    /// How long one connection attempt to a `redis` or `postgres` server may take.
    pub connect_timeout: Dur,
    /// How often the embedded store commits changes; a hard kill loses at most this much.
    pub flush_interval: Dur,
    /// A store answer slower than this counts as a store failure.
    pub timeout: Dur,
    /// On store failure: `open` accepts the mail (and says so), `closed` defers it with 4.3.0.
    pub fail_mode: FailMode,
    /// Most records the `memory` and `embedded` stores hold, triplets and client groups
    /// together (default 2,000,000; 0 = no cap). At the cap, the oldest pending
    /// triplets are evicted first. Not for `redis`/`postgres`, whose servers bound their
    /// own memory.
    pub max_entries: Option<u64>,
}

/// The default cap on stored records: about 0.55 GB of RAM and 1.1 GB of file at most on
/// the embedded store (measured under a flood of pending triplets, the costliest kind: RSS
/// 537 MB, 610 MB at its peaks; redb's file 1.08 GB), which a modest host has to spare,
/// and many times the working set of a site of a few thousand mailboxes (pending triplets
/// live for the 2-day retry window, passed ones for 35 days).
pub const DEFAULT_MAX_ENTRIES: u64 = 2_000_000;

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "embedded".into(),
            path: DEFAULT_DB_PATH.into(),
            url: String::new(),
            pool_size: 16,
            connect_timeout: Dur(Duration::from_secs(2)),
            flush_interval: Dur(Duration::from_secs(1)),
            timeout: Dur(Duration::from_secs(1)),
            fail_mode: FailMode::Open,
            max_entries: None,
        }
    }
}

impl RawStore {
    /// The embedded store in `path` instead of the configured store (`--db`).
    pub fn use_embedded(&mut self, path: &std::path::Path) {
        self.backend = "embedded".into();
        self.path = path.to_path_buf();
        self.url.clear();
    }

    /// The memory store instead of the configured store (`--memory`).
    pub fn use_memory(&mut self) {
        self.backend = "memory".into();
        self.url.clear();
    }

    pub(super) fn check(&self, p: &mut Problems<'_>) -> StoreSpec {
        if self.backend == "embedded" && self.path.as_os_str().is_empty() {
            p.at(
                &["store", "path"],
                "the embedded store needs a file path".into(),
            );
        }
        let server = || ServerStore {
            url: self.url.clone(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout.0,
        };
        let store = match self.backend.as_str() {
            "embedded" => StoreKind::Embedded(self.path.clone()),
            "memory" => StoreKind::Memory,
            "redis" => StoreKind::Redis(server()),
            "postgres" => StoreKind::Postgres(server()),
            other => {
                p.at(
                    &["store", "backend"],
                    format!(
                        "unknown store backend {other:?} (embedded, memory, redis or postgres)"
                    ),
                );
                StoreKind::Memory
            }
        };
        type CheckUrl = fn(&str) -> Result<(), String>;
        let shared: Option<(&str, &ServerStore, CheckUrl)> = match &store {
            StoreKind::Redis(server) => Some(("redis", server, crate::store::redis::check_url)),
            StoreKind::Postgres(server) => {
                Some(("postgres", server, crate::store::postgres::check_url))
            }
            StoreKind::Embedded(_) | StoreKind::Memory => None,
        };
        match shared {
            Some((name, server, check)) => {
                if server.url.is_empty() {
                    p.at(
                        &["store", "backend"],
                        format!("the {name} backend needs the server's url in [store]"),
                    );
                } else if let Err(e) = check(&server.url) {
                    // The message may quote the URL: never with its password.
                    p.at(
                        &["store", "url"],
                        e.replace(&server.url, &server.redacted_url()),
                    );
                }
                if server.pool_size == 0 {
                    p.at(
                        &["store", "pool_size"],
                        "pool_size must be at least 1".into(),
                    );
                }
                if self.max_entries.is_some_and(|n| n > 0) {
                    let policy = if name == "redis" {
                        "Redis's maxmemory (with maxmemory-policy volatile-ttl: every greygate \
                         key has a TTL)"
                    } else {
                        "the database's own disk and memory settings"
                    };
                    p.at(
                        &["store", "max_entries"],
                        format!(
                            "max_entries caps the memory and embedded stores only; the {name} \
                             server bounds its records itself: {policy}"
                        ),
                    );
                }
            }
            None if !self.url.is_empty() => {
                let guess = if self.url.starts_with("redis") || self.url.starts_with("unix") {
                    "redis"
                } else {
                    "postgres"
                };
                p.at(
                    &["store", "url"],
                    format!(
                        "url is used by the redis and postgres backends only; set backend = {guess:?}"
                    ),
                );
            }
            None => {}
        }
        for (name, d) in [
            ("flush_interval", self.flush_interval),
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.0.is_zero() {
                p.at(&["store", name], format!("{name} must be positive"));
            }
        }

        let max_entries = match &store {
            StoreKind::Memory | StoreKind::Embedded(_) => {
                self.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES)
            }
            StoreKind::Redis(_) | StoreKind::Postgres(_) => 0,
        };
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        StoreSpec {
            kind: store,
            flush_interval: self.flush_interval.0,
            timeout: self.timeout.0,
            max_entries,
        }
    }
}
