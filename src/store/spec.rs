//! What store to run on, and the one place that opens one: the daemon (which also
//! reopens a store that failed at start) and every command that reads or changes records
//! while no daemon serves them go through [`open`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{
    EmbeddedReader, EmbeddedStore, MemoryStore, PostgresStore, RedisStore, Store, StoreError,
};

/// The checked `[store]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    pub kind: StoreKind,
    /// How often the embedded store commits changes.
    pub flush_interval: Duration,
    /// A store answer slower than this counts as a store failure.
    pub timeout: Duration,
    /// Most records the memory and embedded stores hold (triplets and client groups
    /// together); 0: no cap. The shared stores ignore it: their servers bound their memory.
    pub max_entries: usize,
    /// The address mode the store must be in (`AddressKeys::store_mode`: `plain`, or keyed
    /// digests under one secret): [`open`] refuses a store written in another.
    pub addresses: String,
}

/// The backend and where it keeps its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded(PathBuf),
    Redis(ServerStore),
    Postgres(ServerStore),
}

/// Where a shared store's server is and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerStore {
    /// How the redis backend finds its server: the one at `url`, the master the sentinels
    /// name, or a Redis Cluster. Always `Single` for postgres.
    pub redis: RedisTopology,
    /// The URL as configured, credentials included: show it with `Display`, which hides
    /// the password.
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub tls_ca_file: Option<PathBuf>,
}

/// How the redis backend finds its server.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum RedisTopology {
    /// The one server at the store's `url`.
    #[default]
    Single,
    /// The master that Redis Sentinel names `master_name`, asked of `sentinels`
    /// (`host:port`, or `rediss://host:port` for TLS to the sentinels and the servers).
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
        auth: RedisAuth,
    },
    /// A Redis Cluster, found from any of `nodes` (as `sentinels`).
    Cluster { nodes: Vec<String>, auth: RedisAuth },
}

/// The credentials of the data servers of a Sentinel or Cluster set-up (a single server's
/// are in its URL).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RedisTopology {
    /// Whether connections use TLS: the scheme of the list entries (one for all).
    pub fn tls(&self) -> bool {
        let nodes = match self {
            RedisTopology::Single => return false,
            RedisTopology::Sentinel { sentinels, .. } => sentinels,
            RedisTopology::Cluster { nodes, .. } => nodes,
        };
        nodes.iter().any(|n| n.starts_with("rediss://"))
    }
}

impl fmt::Display for RedisTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisTopology::Single => f.write_str("single server"),
            RedisTopology::Sentinel {
                sentinels,
                master_name,
                ..
            } => write!(
                f,
                "sentinel: master {master_name:?} via {}",
                sentinels.join(", ")
            ),
            RedisTopology::Cluster { nodes, .. } => write!(f, "cluster: {}", nodes.join(", ")),
        }
    }
}

// Never the password.
impl fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)?;
        let auth = match self {
            RedisTopology::Single => return Ok(()),
            RedisTopology::Sentinel { auth, .. } | RedisTopology::Cluster { auth, .. } => auth,
        };
        if let Some(user) = &auth.username {
            write!(f, " user {user:?}")?;
        }
        if auth.password.is_some() {
            f.write_str(" password ***")?;
        }
        Ok(())
    }
}

impl ServerStore {
    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Display for ServerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.redis {
            RedisTopology::Single => f.write_str(&self.redacted_url()),
            other => write!(f, "({other})"),
        }
    }
}

// Configurations get printed and logged: never the password.
impl fmt::Debug for ServerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerStore")
            .field("redis", &self.redis)
            .field("url", &self.redacted_url())
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// Hides the password of `scheme://user:password@host...` URLs and of `password=...` in
/// PostgreSQL `key=value` connection strings.
fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{tail}");
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl StoreKind {
    /// Directory for daemon state beside the store (the admin token, runtime entries): the
    /// embedded file's directory, else /var/lib/greygate; none for the memory store.
    pub fn state_dir(&self) -> Option<PathBuf> {
        match self {
            StoreKind::Memory => None,
            StoreKind::Embedded(path) => Some(
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            ),
            StoreKind::Redis(_) | StoreKind::Postgres(_) => {
                Some(PathBuf::from("/var/lib/greygate"))
            }
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Memory => f.write_str("memory"),
            StoreKind::Embedded(path) => write!(f, "embedded {}", path.display()),
            StoreKind::Redis(server) => write!(f, "redis {server}"),
            StoreKind::Postgres(server) => write!(f, "postgres {server}"),
        }
    }
}

/// Who opens the store, and so how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The daemon: the embedded file read-write and locked, the memory store new, a shared
    /// server's operations bounded by the store timeout. Logs what it opened.
    Serve,
    /// A command that reads while no daemon holds the store: the embedded file read-only;
    /// a shared server is safe to use beside running daemons.
    Read,
    /// A command that changes records while no daemon holds the store.
    Write,
}

/// Opens the store `spec` names. The redis and postgres stores connect on first use (and
/// reconnect by themselves), so they open even while their server is down. An embedded
/// file held by a running daemon is `StoreError::Locked`: ask the daemon instead.
pub fn open(spec: &StoreSpec, access: Access) -> Result<Arc<dyn Store>, StoreError> {
    match (&spec.kind, access) {
        // A new store: it takes the configured mode (no address was stored before).
        (StoreKind::Memory, Access::Serve) => Ok(Arc::new(MemoryStore::with_cap(spec.max_entries))),
        (StoreKind::Memory, _) => Err(StoreError::Unavailable(
            "the memory store lives only inside the running daemon".into(),
        )),
        (StoreKind::Embedded(path), Access::Serve) => {
            let s = match EmbeddedStore::open_capped(path, unix_now(), spec.max_entries) {
                Err(StoreError::Corrupt { reason, .. }) => {
                    let aside = set_aside(path, &reason)?;
                    EmbeddedStore::open_capped(path, unix_now(), spec.max_entries)?
                        .started_after_set_aside(aside)
                }
                opened => opened?,
            };
            let r = s.load_report();
            if r.empty_file {
                tracing::warn!(
                    path = %path.display(),
                    "store file was empty (0 bytes); starting a new store in it"
                );
            }
            if r.undecodable > 0 {
                tracing::warn!(
                    path = %path.display(), rows = r.undecodable,
                    "store rows this version cannot read were left on disk untouched"
                );
            }
            tracing::info!(
                path = %path.display(), triplets = r.triplets, clients = r.clients,
                expired = r.expired, undecodable = r.undecodable, "store loaded"
            );
            if r.evicted > 0 {
                tracing::warn!(
                    path = %path.display(), evicted = r.evicted, max_entries = spec.max_entries,
                    "the file held more records than max_entries: the oldest pending ones were \
                     evicted, and leave the file at the first commit"
                );
            }
            s.claim_addresses(&spec.addresses)?;
            Ok(Arc::new(s))
        }
        // A command changes a few records while no daemon runs: it evicts nothing (the
        // daemon applies the cap when it loads the file).
        (StoreKind::Embedded(path), Access::Write) => {
            let s = EmbeddedStore::open(path, unix_now())?;
            s.claim_addresses(&spec.addresses)?;
            Ok(Arc::new(s))
        }
        (StoreKind::Embedded(path), Access::Read) => {
            let s = EmbeddedReader::open(path)?;
            s.check_addresses(&spec.addresses)?;
            Ok(Arc::new(s))
        }
        (StoreKind::Redis(server), _) => {
            let s = RedisStore::with_server(server, op_limit(spec, server, access))?;
            if access == Access::Serve {
                tracing::info!(store = %s.describe(), "store ready (connects on first use)");
            }
            Ok(claimed(Arc::new(s), spec, access))
        }
        (StoreKind::Postgres(server), _) => {
            // The daemon needs a pool for its requests; a command one connection.
            let pool = if access == Access::Serve {
                server.pool_size
            } else {
                1
            };
            let s = PostgresStore::with_tls_ca(
                &server.url,
                server.tls_ca_file.as_deref(),
                pool,
                server.connect_timeout,
                op_limit(spec, server, access),
            )?;
            if access == Access::Serve {
                tracing::info!(
                    store = %s.describe(), pool_size = pool, tls = s.tls(),
                    "store ready (connects on first use)"
                );
            }
            Ok(claimed(Arc::new(s), spec, access))
        }
    }
}

/// A shared store that checks its address mode (and records it, unless `access` only
/// reads) before its first operation: it connects on first use.
fn claimed(store: Arc<dyn Store>, spec: &StoreSpec, access: Access) -> Arc<dyn Store> {
    Arc::new(super::mode::Claimed::new(
        store,
        spec.addresses.clone(),
        access != Access::Read,
    ))
}

/// Renames an unreadable store file aside, untouched, so that a new store can start in its
/// place: mail keeps flowing (the trust database is learnt again) and the file is there
/// for a look. Fails (the daemon then answers per `fail_mode` and retries) when the file
/// cannot be renamed.
fn set_aside(path: &Path, reason: &str) -> Result<super::SetAside, StoreError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{}", unix_now()));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside).map_err(|e| {
        StoreError::Unavailable(format!(
            "{} cannot be read ({reason}) and cannot be set aside: {e}",
            path.display()
        ))
    })?;
    tracing::error!(
        path = %path.display(), %reason, set_aside = %aside.display(),
        "store file cannot be read; it was set aside untouched and a new, empty store starts \
         in its place (greylisting relearns its correspondents)"
    );
    Ok(super::SetAside {
        path: aside.display().to_string(),
        reason: reason.to_string(),
    })
}

/// How long one operation of a shared store may take: the store timeout for a request; a
/// command's may spend its whole connect_timeout on connecting first.
fn op_limit(spec: &StoreSpec, server: &ServerStore, access: Access) -> Duration {
    match access {
        Access::Serve => spec.timeout,
        Access::Read | Access::Write => server.connect_timeout + spec.timeout,
    }
}

/// `check-config --connect`: asks the store's server who it is (the postgres backend
/// creates or migrates its schema, as the daemon would). `None`: no server to ask.
pub async fn check(spec: &StoreSpec) -> Result<Option<String>, StoreError> {
    match &spec.kind {
        StoreKind::Redis(s) => {
            let store = RedisStore::with_server(s, op_limit(spec, s, Access::Read))?;
            let who = store.check().await?;
            super::mode::check(&store, &spec.addresses).await?;
            Ok(Some(who))
        }
        StoreKind::Postgres(s) => {
            let store = PostgresStore::with_tls_ca(
                &s.url,
                s.tls_ca_file.as_deref(),
                1,
                s.connect_timeout,
                op_limit(spec, s, Access::Read),
            )?;
            let who = store.check().await?;
            super::mode::check(&store, &spec.addresses).await?;
            Ok(Some(who))
        }
        StoreKind::Memory | StoreKind::Embedded(_) => Ok(None),
    }
}

/// Unix seconds now: an opened embedded store leaves out what expired before it.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
