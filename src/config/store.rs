//! `[store]`: the trust database, checked into the store's `StoreSpec`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{DEFAULT_DB_PATH, Problems};
use crate::dur::Dur;
use crate::engine::AddressKeys;
use crate::engine::privacy::MIN_SECRET_LEN;
use crate::service::FailMode;
use crate::store::{RedisAuth, RedisTopology, ServerStore, StoreKind, StoreSpec};

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
    /// The `redis` backend through Redis Sentinel (instead of `url`): the sentinels to ask,
    /// `host:port` (or `rediss://host:port` for TLS to the sentinels and the servers).
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under (with `sentinels`).
    pub master_name: Option<String>,
    /// The `redis` backend on a Redis Cluster (instead of `url`): some of its nodes,
    /// `host:port` (or `rediss://host:port` for TLS).
    pub cluster_nodes: Vec<String>,
    /// ACL user for the Redis servers of `sentinels` or `cluster_nodes` (a single server's
    /// goes in its `url`).
    pub username: Option<String>,
    /// Password for the Redis servers of `sentinels` or `cluster_nodes` (a single server's
    /// goes in its `url`).
    pub password: Option<String>,
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
    /// Store sender and recipient only as keyed digests (HMAC-SHA256 under the secret),
    /// never as text, in every backend.
    pub hash_addresses: bool,
    /// The hashing secret, inline (at least 16 bytes).
    pub hash_secret: Option<String>,
    /// A file holding the hashing secret (readable by its owner only; a trailing newline
    /// is not part of the secret).
    pub hash_secret_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the store server's TLS certificate: for `redis`,
    /// instead of the system's roots; for `postgres`, the chain (`sslmode=verify-ca`, or
    /// `require` with this file) and the host name too (`sslmode=verify-full`).
    pub tls_ca_file: Option<PathBuf>,
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
            sentinels: Vec::new(),
            master_name: None,
            cluster_nodes: Vec::new(),
            username: None,
            password: None,
            pool_size: 16,
            connect_timeout: Dur(Duration::from_secs(2)),
            flush_interval: Dur(Duration::from_secs(1)),
            timeout: Dur(Duration::from_secs(1)),
            fail_mode: FailMode::Open,
            max_entries: None,
            hash_addresses: false,
            hash_secret: None,
            hash_secret_file: None,
            tls_ca_file: None,
        }
    }
}

impl RawStore {
    /// The redis-only keys that are set.
    fn redis_keys(&self) -> Vec<&'static str> {
        [
            ("sentinels", !self.sentinels.is_empty()),
            ("master_name", self.master_name.is_some()),
            ("cluster_nodes", !self.cluster_nodes.is_empty()),
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// The redis backend's way to its server: exactly one of `url`, `sentinels` (with
    /// `master_name`) or `cluster_nodes`; `tls_ca_file` only with TLS.
    fn redis_topology(&self, p: &mut Problems<'_>) -> RedisTopology {
        let given: Vec<&str> = [
            ("url", !self.url.is_empty()),
            ("sentinels", !self.sentinels.is_empty()),
            ("cluster_nodes", !self.cluster_nodes.is_empty()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let auth = RedisAuth {
            username: self.username.clone(),
            password: self.password.clone(),
        };
        let topology = match given.as_slice() {
            [] => {
                p.at(
                    &["store", "backend"],
                    "the redis backend needs the server's url in [store] (url = \
                     \"redis://host:6379\"), or sentinels = [\"host:26379\", ...] with \
                     master_name, or cluster_nodes = [\"host:6379\", ...]"
                        .into(),
                );
                RedisTopology::Single
            }
            [_, second, ..] => {
                p.at(
                    &["store", second],
                    format!(
                        "give the redis server one way: {}, not several",
                        given.join(" or ")
                    ),
                );
                RedisTopology::Single
            }
            ["url"] => RedisTopology::Single,
            ["sentinels"] => match &self.master_name {
                Some(name) if !name.is_empty() => RedisTopology::Sentinel {
                    sentinels: self.sentinels.clone(),
                    master_name: name.clone(),
                    auth,
                },
                _ => {
                    p.at(
                        &["store", "sentinels"],
                        "sentinels needs master_name: the name the sentinels monitor the master \
                         under (sentinel monitor <master_name> ...)"
                            .into(),
                    );
                    RedisTopology::Single
                }
            },
            _ => RedisTopology::Cluster {
                nodes: self.cluster_nodes.clone(),
                auth,
            },
        };
        if self.master_name.is_some()
            && !matches!(topology, RedisTopology::Sentinel { .. })
            && given.len() == 1
        {
            p.at(
                &["store", "master_name"],
                "master_name goes with sentinels = [...] only".into(),
            );
        }
        let (list_key, list) = match &topology {
            RedisTopology::Sentinel { sentinels, .. } => ("sentinels", sentinels),
            RedisTopology::Cluster { nodes, .. } => ("cluster_nodes", nodes),
            RedisTopology::Single => {
                for key in ["username", "password"] {
                    if self.redis_keys().contains(&key) && given == ["url"] {
                        p.at(
                            &["store", key],
                            format!(
                                "{key} is for sentinels or cluster_nodes; a single server's \
                                 goes in its url (redis://user:password@host:port/db)"
                            ),
                        );
                    }
                }
                if self.tls_ca_file.is_some()
                    && given == ["url"]
                    && !self.url.starts_with("rediss://")
                {
                    p.at(
                        &["store", "tls_ca_file"],
                        "tls_ca_file verifies a TLS server: use a rediss:// url".into(),
                    );
                }
                return topology;
            }
        };
        if let Err(e) = crate::store::redis::check_nodes(list) {
            p.at(&["store", list_key], e);
        } else if self.tls_ca_file.is_some() && !topology.tls() {
            p.at(
                &["store", "tls_ca_file"],
                format!(
                    "tls_ca_file verifies TLS servers: write the {list_key} entries as \
                     rediss://host:port"
                ),
            );
        }
        topology
    }

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

    /// How addresses go into keys: `hash_addresses` with its secret, checked.
    pub(super) fn address_keys(&self, p: &mut Problems<'_>) -> AddressKeys {
        let secret = match (&self.hash_secret, &self.hash_secret_file) {
            (Some(_), Some(_)) => {
                p.at(
                    &["store", "hash_secret_file"],
                    "give the hashing secret once: hash_secret or hash_secret_file, not both"
                        .into(),
                );
                return AddressKeys::plain();
            }
            (Some(inline), None) => Some(("hash_secret", inline.as_bytes().to_vec())),
            (None, Some(path)) => match read_secret_file(path) {
                Ok(bytes) => Some(("hash_secret_file", bytes)),
                Err(e) => {
                    p.at(&["store", "hash_secret_file"], e);
                    return AddressKeys::plain();
                }
            },
            (None, None) => None,
        };
        match (self.hash_addresses, secret) {
            (false, None) => AddressKeys::plain(),
            (false, Some((key, _))) => {
                p.at(
                    &["store", key],
                    format!(
                        "{key} is set but hash_addresses is false: addresses would be stored as \
                         plain text; set hash_addresses = true (or remove {key})"
                    ),
                );
                AddressKeys::plain()
            }
            (true, None) => {
                p.at(
                    &["store", "hash_addresses"],
                    "hash_addresses needs a secret: hash_secret_file (a file readable by \
                     greygate only) or hash_secret"
                        .into(),
                );
                AddressKeys::plain()
            }
            (true, Some((key, bytes))) if bytes.len() < MIN_SECRET_LEN => {
                p.at(
                    &["store", key],
                    format!(
                        "the hashing secret is {} bytes; it needs at least {MIN_SECRET_LEN} \
                         (e.g. the output of `openssl rand -hex 32`)",
                        bytes.len()
                    ),
                );
                AddressKeys::plain()
            }
            (true, Some((_, bytes))) => AddressKeys::hashed(&bytes),
        }
    }

    pub(super) fn check(&self, p: &mut Problems<'_>) -> StoreSpec {
        if self.backend == "embedded" && self.path.as_os_str().is_empty() {
            p.at(
                &["store", "path"],
                "the embedded store needs a file path".into(),
            );
        }
        let server = || ServerStore {
            redis: RedisTopology::Single,
            url: self.url.clone(),
            pool_size: self.pool_size,
            connect_timeout: self.connect_timeout.0,
            tls_ca_file: self.tls_ca_file.clone(),
        };
        let store = match self.backend.as_str() {
            "embedded" => StoreKind::Embedded(self.path.clone()),
            "memory" => StoreKind::Memory,
            "redis" => StoreKind::Redis(ServerStore {
                redis: self.redis_topology(p),
                ..server()
            }),
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
                if server.redis != RedisTopology::Single
                    || (name == "redis" && server.url.is_empty())
                {
                    // Checked by `redis_topology`.
                } else if server.url.is_empty() {
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
                } else if name == "postgres"
                    && let Err(e) = crate::store::postgres::check_tls(
                        &server.url,
                        server.tls_ca_file.as_deref(),
                    )
                {
                    let key = if server.tls_ca_file.is_some() {
                        "tls_ca_file"
                    } else {
                        "url"
                    };
                    p.at(&["store", key], e);
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
            None if let Some(key) = self.redis_keys().first() => {
                p.at(
                    &["store", key],
                    format!("{key} is used by the redis backend only; set backend = \"redis\""),
                );
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
        if let (StoreKind::Redis(_), Some(path)) = (&store, &self.tls_ca_file)
            && let Err(e) = crate::store::redis::read_ca_file(path)
        {
            p.at(&["store", "tls_ca_file"], e);
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
            // Set from `address_keys` by the caller.
            addresses: AddressKeys::plain().store_mode(),
        }
    }
}

/// Reads the hashing secret from `path`: refused when group or others may read the file;
/// one trailing newline (`\n` or `\r\n`) is not part of it.
fn read_secret_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the hashing secret {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the hashing secret {} is readable by others than its owner (mode {mode:03o}); \
             make it private: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let mut bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the hashing secret {}: {e}", path.display()))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    Ok(bytes)
}
