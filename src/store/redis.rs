//! The `redis` backend: one trust database shared by every MX host of a site (Redis 7,
//! Valkey).
//!
//! Layout: one string key per record, holding `Record::to_bytes`.
//! - `gg:t:{<hex>}`: a triplet, under the first 128 bits of the SHA-256 of its joined key
//!   (a short key of fixed length whatever the addresses, and one hash slot). The value is
//!   the record followed by the joined key's text, which `scan` lists; values written by
//!   greygate before scans existed hold the record only, and are listed from their next
//!   write on. (The other way round does not hold: a greygate from before scans reads a
//!   value with key text as undecodable, so hosts sharing one server should be upgraded
//!   together.) Keeping the text in the value rather than the key keeps every existing
//!   key valid;
//! - `gg:c:{<client group>}`: a client group's auto-allow record; the key gives the group;
//! - `gg:meta:addresses`: the address mode the keys were made in (`store::mode`);
//! - `gg:{entries}`, `gg:{entries}:index`, `gg:{entries}:version`, `gg:{entries}:next_id`:
//!   the runtime allow/deny entries (see [`SharedEntries`]), one hash slot for all four.
//!
//! The joined key holds the addresses as the engine gives them: text, or keyed digests
//! with `[store] hash_addresses` (the SHA-256 of the key name is not keyed: it hides
//! nothing from someone who can guess a triplet).
//!
//! `scan` walks `SCAN ... MATCH gg:t:*` (or `gg:c:*`) of the one server connected to; in a
//! Cluster, of each master in turn (listed by `CLUSTER NODES`, sorted by address; the
//! cursor names the node walked). SCAN may return a key more than once in a walk (when Redis
//! resizes its table meanwhile); a page never holds a key twice, but a walk may list a
//! record on two pages. A SCAN batch with more matches than the page takes leaves the rest
//! in the cursor, so no batch is cut short and SCAN's guarantee holds: every record that
//! lives through the walk is listed at least once.
//!
//! Every command touches exactly one key, so every operation stays within one hash slot
//! (the layout is Redis Cluster safe). Records expire by TTL, set from their `expires_at`
//! on each write; `expire` has nothing to do.
//!
//! An update is an optimistic compare-and-set: run the engine's pure step in Rust on the
//! value this process last saw at the key (absent for a key it never saw), then a Lua
//! script writes the new value only if the key still holds that value (against absence,
//! `SET ... NX GET` does the same without a script: Redis 7 or Valkey). On a mismatch the
//! script returns the current value and the step runs again on it (bounded). So an update
//! is one round trip when no other host changed the key meanwhile, and two otherwise, as
//! with a `GET` first. A step that writes nothing on a remembered value is not trusted:
//! a `GET` reads the server's value and the step runs on it. Within one process, updates
//! of one key also take a striped lock first, so the retries only ever race other hosts,
//! never the requests of this one.
//!
//! The server is one of three set-ups (`RedisTopology`): one server at a URL; the master
//! that Redis Sentinel names, asked afresh at every (re)connection, so that a failover is
//! followed once the connection to the old master fails or is refused a write
//! (`READONLY`); or a Redis Cluster, whose client routes each key to its slot's master and
//! follows `MOVED`/`ASK` itself. TLS (`rediss://`) verifies the server against
//! `tls_ca_file` or the system's roots.
//!
//! All requests share one multiplexed connection (in a cluster: one per node),
//! made on first use. A connection that
//! fails or stops answering is dropped at once (a silently dead TCP connection would
//! otherwise be kept until the kernel gives up on it) and the next admitted operation
//! connects afresh; while the server is down the breaker (`breaker.rs`) answers for it and
//! paces those attempts with backoff.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisError, RedisFuture, Script,
    TlsCertificates, TlsMode, Value,
};
use sha2::{Digest, Sha256};

use super::breaker::Breaker;
use super::spec::{RedisTopology, ServerStore};
use super::{
    Counts, Entry, EntryFilter, EntryKind, ExpireStep, Page, SCAN_EXAMINE, SharedEntries, Store,
    StoreError, StoredEntry, UpdateFn, cursor,
};
use crate::engine::record::Record;
use crate::engine::{ClientRecord, RuntimeEntry, Triplet, TripletKey};

const TRIPLET_PREFIX: &str = "gg:t:";
const CLIENT_PREFIX: &str = "gg:c:";
/// The key of the store's address mode (see `store::mode`); no TTL.
pub const MODE_KEY: &str = "gg:meta:addresses";

/// Compare-and-set: KEYS[1] is set to ARGV[2] (with a TTL of ARGV[3] seconds, 0 = none)
/// only if it holds ARGV[1] ('' = the key must be absent; encoded records are never
/// empty). Returns 1 when written, else what the key holds now: its value, or 0 when absent.
const CAS_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return 1
end
if cur == false then
  return 0
end
return cur
";

/// Rounds of compare-and-set before an update gives up. Only other hosts can win a round
/// (see the striped lock), so this bounds the number of MX hosts updating one key at the
/// same instant that an update survives, with room to spare.
const MAX_CAS_ROUNDS: usize = 32;

/// Shortest TTL given to a record. The engine decides liveness itself from `expires_at`
/// and its own `now`, so a record kept a little past its death is harmless, while one
/// removed early would restart a delay. A record already dead by this host's clock (a
/// stepped clock, tests with synthetic times) is therefore kept briefly rather than written
/// and dropped in the same breath.
const MIN_TTL: u64 = 60;
/// Records living longer than this (about ten years) get no TTL at all rather than a
/// clamped one that would remove them early.
const MAX_TTL: u64 = 10 * 365 * 86_400;

/// In-process lock stripes for updates (see the module documentation).
const STRIPES: usize = 256;
/// Values remembered per stripe (see [`Stripe`]): 65,536 keys in all, about 8 MB.
const SEEN_PER_STRIPE: usize = 256;

/// Keys scanned per `SCAN` call when counting (and at most when listing).
const SCAN_BATCH: usize = 1000;
/// Most `SCAN` calls one `scan` page makes: over a sparse key space a call may find
/// nothing, and a page must not take unbounded round trips.
const SCAN_CALLS: usize = 64;

/// The Redis key of a triplet record.
pub fn triplet_key(key: &TripletKey) -> String {
    let digest = Sha256::digest(key.joined().as_bytes());
    let mut out = String::with_capacity(TRIPLET_PREFIX.len() + 34);
    out.push_str(TRIPLET_PREFIX);
    out.push('{');
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out.push('}');
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The Redis key of a client group's record.
pub fn client_key(client: &str) -> String {
    format!("{CLIENT_PREFIX}{{{client}}}")
}

/// Checks a `redis://` (or `redis+unix://`, `unix://`) URL without connecting.
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("bad redis URL: {e}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The TTL for a record written at `now` (both by this host's clock); `None`: no TTL.
fn ttl_for(expires_at: u64, now: u64) -> Option<u64> {
    let left = expires_at.saturating_sub(now);
    (left <= MAX_TTL).then_some(left.max(MIN_TTL))
}

/// Connection-level trouble (the server is down, unreachable, restarting or too slow)
/// makes the store unavailable; anything else the server said is a backend error.
fn classify(e: RedisError) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_timeout() {
        return StoreError::Unavailable(format!("redis: no answer in time ({e})"));
    }
    let unreachable = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    // A replica: after a failover, a fresh connection finds the new primary.
                    | ServerErrorKind::ReadOnly
            )
        );
    if unreachable {
        StoreError::Unavailable(format!("redis: {e}"))
    } else {
        StoreError::Backend(format!("redis: {e}"))
    }
}

/// A record as read: undecodable bytes (a foreign or damaged value) read as no record, so
/// the next update replaces them instead of failing the key for its whole TTL. Whatever
/// follows the record (a triplet's key text) is not part of it.
fn decode<R: Record>(key: &str, bytes: Option<&[u8]>) -> Option<R> {
    let bytes = bytes?;
    match R::from_bytes(&bytes[..bytes.len().min(R::ENCODED_LEN)]) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key, error = %e, "undecodable record in redis; treating it as absent");
            None
        }
    }
}

/// One lock stripe: updates of its keys take turns, and it remembers the value each of
/// its keys held when this process last read or wrote it. An update sends its
/// compare-and-set against that value straight away (a key never seen: against absence),
/// one round trip where a `GET` first would take two; a wrong guess costs nothing more,
/// since the script answers a mismatch with the current value. Keys are held as their
/// 64-bit keyed hash: two keys that share one only make a wrong guess. Bounded: when full,
/// an arbitrary entry makes room.
#[derive(Default)]
struct Stripe {
    seen: std::collections::HashMap<u64, Box<[u8]>>,
}

impl Stripe {
    fn guess(&self, key: u64) -> Option<Vec<u8>> {
        self.seen.get(&key).map(|v| v.to_vec())
    }

    fn remember(&mut self, key: u64, value: Option<&[u8]>) {
        let Some(value) = value else {
            self.seen.remove(&key);
            return;
        };
        if self.seen.len() >= SEEN_PER_STRIPE
            && !self.seen.contains_key(&key)
            && let Some(&any) = self.seen.keys().next()
        {
            self.seen.remove(&any);
        }
        self.seen.insert(key, value.into());
    }
}

/// A connection to the server (or the cluster) the store is set up for.
#[derive(Clone)]
enum Conn {
    /// One server: a plain one, or the master the sentinels named.
    One(MultiplexedConnection),
    /// A Redis Cluster: the crate routes each key to its slot's master and follows `MOVED`
    /// and `ASK` redirections itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a connection is made.
enum Connector {
    One(redis::Client),
    /// Asks the sentinels for the master at every (re)connection: after a failover, the
    /// first connection that fails (the old master died) or is refused a write (`READONLY`:
    /// the old master came back as a replica) is dropped, and the next one goes to the new
    /// master.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// The parsed entry of a `sentinels` or `cluster_nodes` list: `host:port`,
/// `redis://host:port` or `rediss://host:port` (TLS), without credentials or database.
fn node_addr(raw: &str) -> Result<ConnectionAddr, String> {
    // Error messages quote the entry: never with credentials.
    let entry = &match raw.split_once("://") {
        Some((scheme, rest)) if rest.contains('@') => {
            format!(
                "{scheme}://***@{}",
                rest.rsplit_once('@').map_or("", |(_, h)| h)
            )
        }
        _ => raw.to_owned(),
    };
    let url = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("redis://{raw}")
    };
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("bad redis node {entry:?}: {e}"))?;
    let settings = info.redis_settings();
    if settings.username().is_some() || settings.password().is_some() {
        return Err(format!(
            "redis node {entry:?}: give credentials in [store] username and password, not in \
             the node list"
        ));
    }
    if settings.db() != 0 {
        return Err(format!(
            "redis node {entry:?}: no database number in a node list (Sentinel and Cluster \
             set-ups use database 0)"
        ));
    }
    match info.addr() {
        a @ (ConnectionAddr::Tcp(..) | ConnectionAddr::TcpTls { .. }) => Ok(a.clone()),
        _ => Err(format!(
            "redis node {entry:?}: a node list takes host:port entries, not unix sockets"
        )),
    }
}

/// Checks the entries of a `sentinels` or `cluster_nodes` list without connecting: each
/// parses, and all use one scheme (TLS for all or none).
pub fn check_nodes(entries: &[String]) -> Result<(), String> {
    let mut tls = None;
    for entry in entries {
        let this = matches!(node_addr(entry)?, ConnectionAddr::TcpTls { .. });
        if tls.is_some_and(|t| t != this) {
            return Err(
                "mixed redis:// and rediss:// entries: TLS is for all nodes or none".into(),
            );
        }
        tls = Some(this);
    }
    Ok(())
}

/// Reads and parses a CA file (PEM, one certificate or more) for TLS to the store.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read tls_ca_file {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_ca_file {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_ca_file {}: no certificate in it (PEM, -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(pem)
}

/// The redis store.
pub struct RedisStore {
    shown: String,
    connector: Connector,
    config: AsyncConnectionConfig,
    /// Which roots verify the server's certificate, for error messages.
    trust: String,
    /// The shared connection and its generation (which connection an error came from).
    link: Mutex<Option<(u64, Conn)>>,
    generations: std::sync::atomic::AtomicU64,
    /// One connection attempt at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    cas: Script,
    timeout: Duration,
    breaker: Breaker,
    stripes: Box<[tokio::sync::Mutex<Stripe>]>,
    // Keys are attacker-influenced; stripe choice uses a randomly keyed hash.
    hasher: RandomState,
}

impl RedisStore {
    /// Creates the store for the one server at `url`, without connecting: the connection
    /// is made on first use and remade whenever it is lost, so greygate starts (and fails
    /// open) while Redis is down. Each connection attempt may take `connect_timeout`; every
    /// operation is bounded by `timeout`.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let server = ServerStore {
            redis: RedisTopology::Single,
            url: url.to_owned(),
            pool_size: 1,
            connect_timeout,
            tls_ca_file: None,
        };
        Self::with_server(&server, timeout)
    }

    /// As `new`, for any set-up: one server (TLS with `rediss://`), the master the
    /// sentinels name, or a cluster; TLS certificates verified against the server's
    /// `tls_ca_file` when set, else the system's root certificates.
    pub fn with_server(server: &ServerStore, timeout: Duration) -> Result<Self, StoreError> {
        let bad = |e: String| StoreError::Unavailable(e);
        let certs = match &server.tls_ca_file {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca_file(path).map_err(bad)?),
            }),
            None => None,
        };
        let trust = match &server.tls_ca_file {
            Some(path) => format!("tls_ca_file {}", path.display()),
            None => "the system's root certificates".into(),
        };
        let (shown, connector) = match &server.redis {
            RedisTopology::Single => {
                let client = match &certs {
                    Some(certs) => {
                        redis::Client::build_with_tls(server.url.as_str(), certs.clone())
                    }
                    None => redis::Client::open(server.url.as_str()),
                }
                .map_err(|e| bad(format!("bad redis URL: {e}")))?;
                let info = client.get_connection_info();
                let shown = format!("redis {} db {}", info.addr(), info.redis_settings().db());
                (shown, Connector::One(client))
            }
            RedisTopology::Sentinel {
                sentinels,
                master_name,
                auth,
            } => {
                let addrs = sentinels
                    .iter()
                    .map(|s| node_addr(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                let tls = server.redis.tls();
                let mut b =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)
                        .map_err(|e| bad(format!("redis sentinel: {e}")))?;
                if tls {
                    b = b
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                        .set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(certs) = &certs {
                        b = b
                            .set_client_to_sentinel_certificates(certs.clone())
                            .set_client_to_redis_certificates(certs.clone());
                    }
                }
                if let Some(user) = &auth.username {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(password) = &auth.password {
                    b = b.set_client_to_redis_password(password);
                }
                let client = b.build().map_err(|e| bad(format!("redis sentinel: {e}")))?;
                (
                    format!("redis sentinel master {master_name}"),
                    Connector::Sentinel(tokio::sync::Mutex::new(client)),
                )
            }
            RedisTopology::Cluster { nodes, auth } => {
                let infos = nodes
                    .iter()
                    .map(|s| {
                        node_addr(s).and_then(|a| {
                            a.into_connection_info()
                                .map_err(|e| format!("bad redis node {s:?}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                let mut b = ClusterClientBuilder::new(infos)
                    .connection_timeout(server.connect_timeout)
                    .response_timeout(timeout);
                if let Some(certs) = &certs {
                    b = b.certs(certs.clone());
                }
                if let Some(user) = &auth.username {
                    b = b.username(user);
                }
                if let Some(password) = &auth.password {
                    b = b.password(password);
                }
                let client = b.build().map_err(|e| bad(format!("redis cluster: {e}")))?;
                let first = nodes.first().map_or("", String::as_str);
                let shown = match nodes.len() {
                    0 | 1 => format!("redis cluster {first}"),
                    n => format!("redis cluster {first} (+{} nodes)", n - 1),
                };
                (shown, Connector::Cluster(client))
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(server.connect_timeout))
            .set_response_timeout(Some(timeout));
        Ok(RedisStore {
            breaker: Breaker::new(shown.clone()),
            shown,
            connector,
            config,
            trust,
            link: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            cas: Script::new(CAS_LUA),
            timeout,
            stripes: (0..STRIPES)
                .map(|_| tokio::sync::Mutex::new(Stripe::default()))
                .collect(),
            hasher: RandomState::new(),
        })
    }

    /// Connects and asks the server who it is (for `check-config --connect`), e.g.
    /// `Redis 7.0.15`, with the set-up: `Redis 7.0.15 (sentinel master mymaster at
    /// 127.0.0.1:6380)`, `Redis 7.0.15 (cluster of 3 masters)`.
    pub async fn check(&self) -> Result<String, StoreError> {
        let info: String = self
            .run(async |conn| {
                let _: String = on_one_node(conn, redis::cmd("PING")).await?;
                let mut info = redis::cmd("INFO");
                info.arg("server");
                on_one_node(conn, info).await
            })
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let who = match (field("valkey_version"), field("redis_version")) {
            (Some(v), _) => format!("Valkey {v}"),
            (None, Some(v)) => format!("Redis {v}"),
            (None, None) => "a Redis-compatible server".into(),
        };
        Ok(match &self.connector {
            Connector::One(_) => who,
            Connector::Sentinel(client) => {
                // Asked again for the answer (bounded like any operation).
                let ask = async { client.lock().await.async_get_client().await };
                let master = match tokio::time::timeout(self.timeout, ask).await {
                    Ok(Ok(c)) => c.get_connection_info().addr().to_string(),
                    _ => "?".to_owned(),
                };
                let name = self.shown.trim_start_matches("redis sentinel master ");
                format!("{who} (sentinel master {name} at {master})")
            }
            Connector::Cluster(_) => {
                let masters = self.scan_nodes().await?.len();
                format!("{who} (cluster of {masters} masters)")
            }
        })
    }

    fn current(&self) -> Option<(u64, Conn)> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The shared connection, connecting first when there is none.
    async fn connection(&self) -> Result<(u64, Conn), StoreError> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let _one = self.connecting.lock().await;
        if let Some(link) = self.current() {
            return Ok(link);
        }
        let conn = match &self.connector {
            Connector::One(client) => client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map(Conn::One),
            Connector::Sentinel(client) => {
                // The sentinels name the master (checked with ROLE): a fresh answer at
                // every connection.
                let master = client.lock().await.async_get_client().await;
                match master {
                    Ok(master) => {
                        tracing::debug!(store = %self.shown, master = %master.get_connection_info().addr(), "sentinels named the master");
                        master
                            .get_multiplexed_async_connection_with_config(&self.config)
                            .await
                            .map(Conn::One)
                    }
                    Err(e) => Err(e),
                }
            }
            Connector::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
        .map_err(|e| {
            // Whatever went wrong (refused, timed out, a wrong password, an untrusted
            // certificate), no connection means unreachable: the breaker then paces the
            // next attempts.
            StoreError::Unavailable(format!("redis: cannot connect: {}", self.explain(&e)))
        })?;
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, conn.clone()));
        tracing::debug!(store = %self.shown, generation, "connected");
        Ok((generation, conn))
    }

    /// A connection error in words: certificate trouble says which roots were used.
    fn explain(&self, e: &RedisError) -> String {
        let text = e.to_string();
        if text.contains("invalid peer certificate") || text.contains("UnknownIssuer") {
            if text.contains("NotValidForName") {
                return format!(
                    "TLS: the server's certificate is not valid for the name connected to: {text}"
                );
            }
            return format!(
                "TLS: the server's certificate is not trusted ({}): {text}",
                self.trust
            );
        }
        text
    }

    /// Drops connection `generation` (unless it has been replaced already).
    fn discard(&self, generation: u64) {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.as_ref().is_some_and(|(g, _)| *g == generation) {
            *link = None;
        }
    }

    /// Runs one operation on the shared connection, under the breaker and `timeout`.
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let attempt = self.breaker.admit()?;
        let mut used = None;
        let work = async {
            let (generation, mut conn) = self.connection().await?;
            used = Some(generation);
            op(&mut conn).await
        };
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        match &result {
            Err(e @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                if let Some(generation) = used {
                    self.discard(generation);
                }
                attempt.unreachable(e);
            }
            _ => attempt.reachable(),
        }
        result
    }

    /// The nodes a walk over the key space visits, in order: the one server (`None`), or
    /// each master of a cluster (`host:port`), sorted.
    async fn scan_nodes(&self) -> Result<Vec<Option<String>>, StoreError> {
        if !matches!(self.connector, Connector::Cluster(_)) {
            return Ok(vec![None]);
        }
        let text: String = self
            .run(async |conn| {
                let mut cmd = redis::cmd("CLUSTER");
                cmd.arg("NODES");
                on_one_node(conn, cmd).await
            })
            .await?;
        let mut masters = cluster_masters(&text);
        masters.sort();
        masters.dedup();
        if masters.is_empty() {
            return Err(StoreError::Backend(
                "redis cluster: CLUSTER NODES lists no master".into(),
            ));
        }
        Ok(masters.into_iter().map(Some).collect())
    }

    /// One `SCAN` call on `node` (see `scan_nodes`).
    async fn scan_call(
        &self,
        node: Option<&str>,
        at: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        self.run(async |conn| match (conn, node) {
            (Conn::Cluster(c), Some(node)) => {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                    .ok_or_else(|| {
                        StoreError::Backend(format!("redis cluster: bad node {node:?}"))
                    })?;
                let v = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                    )
                    .await
                    .map_err(classify)?;
                redis::from_redis_value(v)
                    .map_err(|e| StoreError::Backend(format!("redis: SCAN reply: {e}")))
            }
            (conn, _) => cmd.query_async(conn).await.map_err(classify),
        })
        .await
    }

    /// The values of `keys` (`None`: gone). Pipelined on one server; in a cluster, where
    /// a pipeline must stay in one slot, sent at once as single commands.
    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.run(async |conn| match conn {
            Conn::One(_) => {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("GET").arg(k);
                }
                pipe.query_async(conn).await.map_err(classify)
            }
            Conn::Cluster(c) => {
                let mut tasks = tokio::task::JoinSet::new();
                for (i, k) in keys.iter().enumerate() {
                    let mut c = c.clone();
                    let k = k.clone();
                    tasks.spawn(async move {
                        let v: Result<Option<Vec<u8>>, _> =
                            redis::cmd("GET").arg(k).query_async(&mut c).await;
                        (i, v)
                    });
                }
                let mut out = vec![None; keys.len()];
                while let Some(done) = tasks.join_next().await {
                    let (i, v) = done.map_err(|e| StoreError::Backend(format!("redis: {e}")))?;
                    out[i] = v.map_err(classify)?;
                }
                Ok(out)
            }
        })
        .await
    }

    async fn get<R: Record>(&self, key: &str) -> Result<Option<R>, StoreError> {
        self.run(async |conn| {
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(key)
                .query_async(conn)
                .await
                .map_err(classify)?;
            Ok(decode(key, bytes.as_deref()))
        })
        .await
    }

    /// The update of the record at `key`; `suffix` is stored after the record.
    async fn update<R: Record>(
        &self,
        key: &str,
        suffix: &[u8],
        f: UpdateFn<'_, R>,
    ) -> Result<Option<R>, StoreError> {
        self.run(async |conn| {
            let hash = self.hasher.hash_one(key);
            let mut stripe = self.stripes[(hash as usize) % STRIPES].lock().await;
            // The value this process last saw at the key, or absent: a guess that the
            // compare-and-set checks, so it is never trusted for a write.
            let mut current: Option<Vec<u8>> = stripe.guess(hash);
            let mut confirmed = false;
            for _ in 0..MAX_CAS_ROUNDS {
                let old = decode::<R>(key, current.as_deref());
                let new = match f(old.as_ref()) {
                    Some(new) if Some(new) != old => new,
                    // Nothing to write (an unchanged record keeps its TTL too), on what
                    // the server holds.
                    _ if confirmed => return Ok(old),
                    // Nothing to write on a guess: read what the server holds, and step
                    // again on that.
                    _ => {
                        current = redis::cmd("GET")
                            .arg(key)
                            .query_async(conn)
                            .await
                            .map_err(classify)?;
                        confirmed = true;
                        stripe.remember(hash, current.as_deref());
                        continue;
                    }
                };
                let ttl = ttl_for(new.expires_at(), unix_now()).unwrap_or(0);
                let mut value = new.to_bytes();
                value.extend_from_slice(suffix);
                let reply: Value = match &current {
                    // Against absence, Redis's own compare-and-set: `SET ... NX GET` writes
                    // only a missing key and answers what it held (nil: written), at a
                    // fraction of a script's cost.
                    None => {
                        let mut set = redis::cmd("SET");
                        set.arg(key).arg(&value).arg("NX").arg("GET");
                        if ttl > 0 {
                            set.arg("EX").arg(ttl);
                        }
                        match set.query_async(conn).await.map_err(classify)? {
                            Value::Nil => Value::Int(1),
                            other => other,
                        }
                    }
                    Some(expected) => self
                        .cas
                        .key(key)
                        .arg(expected.as_slice())
                        .arg(&value)
                        .arg(ttl)
                        .invoke_async(conn)
                        .await
                        .map_err(classify)?,
                };
                current = match reply {
                    Value::Int(1) => {
                        stripe.remember(hash, Some(&value));
                        return Ok(old);
                    }
                    Value::Int(0) | Value::Nil => None,
                    Value::BulkString(now) => Some(now),
                    other => {
                        return Err(StoreError::Backend(format!(
                            "redis: unexpected compare-and-set reply {other:?}"
                        )));
                    }
                };
                confirmed = true;
                stripe.remember(hash, current.as_deref());
            }
            Err(StoreError::Backend(format!(
                "redis: {key} changed under {MAX_CAS_ROUNDS} update attempts in a row; gave up"
            )))
        })
        .await
    }

    async fn remove(&self, key: &str) -> Result<bool, StoreError> {
        self.run(async |conn| {
            // What this process removed is not guessed back by its next update.
            let hash = self.hasher.hash_one(key);
            self.stripes[(hash as usize) % STRIPES]
                .lock()
                .await
                .remember(hash, None);
            let n: u64 = redis::cmd("DEL")
                .arg(key)
                .query_async(conn)
                .await
                .map_err(classify)?;
            Ok(n > 0)
        })
        .await
    }

    /// One page of a walk over the keys of `kind` (see the module documentation). The
    /// cursor is the SCAN cursor, then `.`, hex key suffix (after the prefix), for each key
    /// of the last batch still to look at; in a cluster, prefixed by the node walked and
    /// `/`.
    async fn scan_page(
        &self,
        kind: EntryKind,
        from: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let prefix = match kind {
            EntryKind::Triplets => TRIPLET_PREFIX,
            EntryKind::Clients => CLIENT_PREFIX,
        };
        let nodes = self.scan_nodes().await?;
        let (mut node, mut at, mut pending) = match from {
            Some(c) => parse_scan_cursor(c, prefix, &nodes)?,
            None => (0, 0, Vec::new()),
        };
        // A node's walk ends when SCAN hands back cursor 0, which is also where it starts
        // (a cursor never stands for a node's end without keys still to look at).
        let mut started = at != 0 || !pending.is_empty();
        let pattern = format!("{prefix}*");
        let mut entries = Vec::new();
        let mut seen: HashSet<Vec<u8>> = pending.iter().cloned().collect();
        let (mut examined, mut calls) = (0, 0);
        loop {
            if pending.is_empty() {
                if started && at == 0 {
                    node += 1;
                    at = 0;
                }
                let Some(name) = nodes.get(node) else {
                    return Ok(Page {
                        entries,
                        next: None,
                    });
                };
                if examined >= SCAN_EXAMINE || calls >= SCAN_CALLS {
                    return Ok(Page {
                        entries,
                        next: Some(format_scan_cursor(name.as_deref(), at, &[], prefix)),
                    });
                }
                // Asking for about what the page still needs keeps the keys left over in
                // the cursor few.
                let count = (limit - entries.len()).clamp(16, SCAN_BATCH);
                let (next, keys) = self.scan_call(name.as_deref(), at, &pattern, count).await?;
                (at, started) = (next, true);
                calls += 1;
                pending = keys
                    .into_iter()
                    .filter(|k| seen.insert(k.clone()))
                    .collect();
                continue;
            }
            let values = self.get_many(&pending).await?;
            let batch = std::mem::take(&mut pending);
            for (i, (key, value)) in batch.iter().zip(values).enumerate() {
                examined += 1;
                if let Some(e) = scanned_entry(kind, key, value.as_deref())
                    && e.expires_at() >= now
                    && keep(&e)
                {
                    entries.push(e);
                }
                if entries.len() >= limit {
                    let rest = &batch[i + 1..];
                    let next = if rest.is_empty() && at == 0 {
                        // This node is done: the next one from its start, if any.
                        nodes
                            .get(node + 1)
                            .map(|n| format_scan_cursor(n.as_deref(), 0, &[], prefix))
                    } else {
                        let name = nodes.get(node).and_then(Option::as_deref);
                        Some(format_scan_cursor(name, at, rest, prefix))
                    };
                    return Ok(Page { entries, next });
                }
            }
        }
    }

    /// Counts the keys matching `pattern` on every node; `values`, when given, sees the
    /// value of each.
    async fn scan(
        &self,
        pattern: &str,
        mut values: Option<&mut (dyn FnMut(Option<Vec<u8>>) + Send)>,
    ) -> Result<u64, StoreError> {
        let mut seen = 0u64;
        for node in self.scan_nodes().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self
                    .scan_call(node.as_deref(), cursor, pattern, SCAN_BATCH)
                    .await?;
                seen += keys.len() as u64;
                if let Some(each) = values.as_mut()
                    && !keys.is_empty()
                {
                    for v in self.get_many(&keys).await? {
                        each(v);
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(seen)
    }
}

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn health(&self) -> super::StoreHealth {
        super::StoreHealth {
            server_unreachable: self.breaker.is_down(),
            ..super::StoreHealth::default()
        }
    }

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        self.get(&triplet_key(key)).await
    }

    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        self.update(&triplet_key(key), key.joined().as_bytes(), f)
            .await
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.get(&client_key(client)).await
    }

    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.update(&client_key(client), &[], f).await
    }

    /// Redis removes records itself when their TTL runs out.
    async fn expire(&self, _now: u64, _max_scan: usize) -> Result<ExpireStep, StoreError> {
        Ok(ExpireStep {
            removed: 0,
            cycle_done: true,
        })
    }

    /// Every update is written through.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Scans the whole key space: for occasional statistics, not for every request.
    async fn counts(&self) -> Result<Counts, StoreError> {
        let mut counts = Counts::default();
        let mut tally = |v: Option<Vec<u8>>| {
            // Without `decode`'s warning: counts are no place to report each bad value.
            let record = v
                .as_deref()
                .map(|v| Triplet::from_bytes(&v[..v.len().min(Triplet::ENCODED_LEN)]));
            match record {
                Some(Ok(t)) if t.passed => counts.triplets_passed += 1,
                Some(Ok(_)) => counts.triplets_pending += 1,
                // Gone since the scan saw it, or undecodable: not a live triplet.
                _ => {}
            }
        };
        self.scan(&format!("{TRIPLET_PREFIX}*"), Some(&mut tally))
            .await?;
        counts.clients = self.scan(&format!("{CLIENT_PREFIX}*"), None).await?;
        Ok(counts)
    }

    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        self.scan_page(kind, cursor, limit, now, keep).await
    }

    async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError> {
        self.remove(&triplet_key(key)).await
    }

    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        self.remove(&client_key(client)).await
    }

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        self.run(async |conn| {
            redis::cmd("GET")
                .arg(MODE_KEY)
                .query_async(conn)
                .await
                .map_err(classify)
        })
        .await
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        self.run(async |conn| {
            redis::cmd("SET")
                .arg(MODE_KEY)
                .arg(mode)
                .query_async(conn)
                .await
                .map_err(classify)
        })
        .await
    }

    fn shared_entries(&self) -> Option<&dyn SharedEntries> {
        Some(self)
    }
}

/// The runtime entries: `gg:{entries}` maps an id to `<added_at> <StoredEntry JSON>`;
/// `gg:{entries}:index` maps `<list> <target> <value>` to the id, so that the same entry
/// added again is updated in place; `gg:{entries}:next_id` hands out ids and
/// `gg:{entries}:version` counts changes. The hash tag keeps the four in one Cluster slot,
/// so each change is one script over its own keys. No TTLs: expired entries are removed by
/// the daemons (they stop matching at their `expires_at` either way).
pub const ENTRIES_KEY: &str = "gg:{entries}";
const ENTRIES_INDEX_KEY: &str = "gg:{entries}:index";
/// The change counter of the runtime entries.
pub const ENTRIES_VERSION_KEY: &str = "gg:{entries}:version";
const ENTRIES_NEXT_ID_KEY: &str = "gg:{entries}:next_id";

/// Adds or updates one entry: ARGV[1] the index field, ARGV[2] `added_at` for a new
/// entry, ARGV[3] the JSON, ARGV[4] the most entries. Returns {id, added_at}, or {} when
/// full.
const PUT_ENTRY_LUA: &str = r"
local id = redis.call('HGET', KEYS[2], ARGV[1])
local added = ARGV[2]
local cur = false
if id then
  cur = redis.call('HGET', KEYS[1], id)
end
if cur then
  added = string.match(cur, '^(%d+) ') or added
else
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
    return {}
  end
  if not id then
    id = tostring(redis.call('INCR', KEYS[4]))
    redis.call('HSET', KEYS[2], ARGV[1], id)
  end
end
redis.call('HSET', KEYS[1], id, added .. ' ' .. ARGV[3])
redis.call('INCR', KEYS[3])
return {id, added}
";

/// Removes the entries whose ids are ARGV, with their index fields; returns {id, value}
/// pairs of those that existed, and bumps the version when there was one.
const REMOVE_ENTRIES_LUA: &str = r"
local gone = {}
for _, id in ipairs(ARGV) do
  local cur = redis.call('HGET', KEYS[1], id)
  if cur then
    redis.call('HDEL', KEYS[1], id)
    local ok, e = pcall(cjson.decode, string.match(cur, '^%d+ (.*)$') or '')
    if ok and type(e) == 'table' then
      local field = tostring(e.list) .. ' ' .. tostring(e.target) .. ' ' .. tostring(e.value)
      if redis.call('HGET', KEYS[2], field) == id then
        redis.call('HDEL', KEYS[2], field)
      end
    end
    table.insert(gone, id)
    table.insert(gone, cur)
  end
end
if #gone > 0 then
  redis.call('INCR', KEYS[3])
end
return gone
";

/// The index field of an entry: list, target and value (which may hold spaces: it is last).
fn entry_field(e: &RuntimeEntry) -> String {
    format!("{} {} {}", e.list.as_str(), e.target.as_str(), e.value)
}

/// An entry from its id and stored value; `None` for a value greygate did not write.
fn stored_entry(id: &[u8], value: &[u8]) -> Option<RuntimeEntry> {
    let id = std::str::from_utf8(id).ok()?.parse().ok()?;
    let (added, json) = std::str::from_utf8(value).ok()?.split_once(' ')?;
    let e: StoredEntry = serde_json::from_str(json).ok()?;
    Some(RuntimeEntry {
        id,
        list: e.list,
        target: e.target,
        value: e.value,
        added_at: added.parse().ok()?,
        expires_at: e.expires_at,
        comment: e.comment,
    })
}

/// `{id, value, id, value, ...}` as entries, leaving out what does not read as one.
fn stored_entries(pairs: Vec<Vec<u8>>) -> Vec<RuntimeEntry> {
    let mut out: Vec<RuntimeEntry> = pairs
        .chunks_exact(2)
        .filter_map(|p| {
            let e = stored_entry(&p[0], &p[1]);
            if e.is_none() {
                tracing::warn!(
                    id = %String::from_utf8_lossy(&p[0]),
                    "unreadable runtime entry in redis; ignored"
                );
            }
            e
        })
        .collect();
    out.sort_by_key(|e| e.id);
    out
}

#[async_trait]
impl SharedEntries for RedisStore {
    async fn entries_version(&self) -> Result<u64, StoreError> {
        self.run(async |conn| {
            let v: Option<u64> = redis::cmd("GET")
                .arg(ENTRIES_VERSION_KEY)
                .query_async(conn)
                .await
                .map_err(classify)?;
            Ok(v.unwrap_or(0))
        })
        .await
    }

    async fn list_entries(&self) -> Result<(u64, Vec<RuntimeEntry>), StoreError> {
        self.run(async |conn| {
            // Pipelined, not MULTI: the version is read first, which is all a poller needs.
            let (version, pairs): (Option<u64>, Vec<Vec<u8>>) = redis::pipe()
                .cmd("GET")
                .arg(ENTRIES_VERSION_KEY)
                .cmd("HGETALL")
                .arg(ENTRIES_KEY)
                .query_async(conn)
                .await
                .map_err(classify)?;
            Ok((version.unwrap_or(0), stored_entries(pairs)))
        })
        .await
    }

    async fn put_entry(
        &self,
        entry: &RuntimeEntry,
        max: usize,
    ) -> Result<Option<RuntimeEntry>, StoreError> {
        let json = serde_json::to_string(&StoredEntry {
            list: entry.list,
            target: entry.target,
            value: entry.value.clone(),
            expires_at: entry.expires_at,
            comment: entry.comment.clone(),
        })
        .map_err(|e| StoreError::Backend(format!("runtime entry: {e}")))?;
        let script = Script::new(PUT_ENTRY_LUA);
        let reply: Vec<u64> = self
            .run(async |conn| {
                script
                    .key(ENTRIES_KEY)
                    .key(ENTRIES_INDEX_KEY)
                    .key(ENTRIES_VERSION_KEY)
                    .key(ENTRIES_NEXT_ID_KEY)
                    .arg(entry_field(entry))
                    .arg(entry.added_at)
                    .arg(&json)
                    .arg(max)
                    .invoke_async(conn)
                    .await
                    .map_err(classify)
            })
            .await?;
        Ok(match reply[..] {
            [id, added_at] => Some(RuntimeEntry {
                id,
                added_at,
                ..entry.clone()
            }),
            _ => None,
        })
    }

    async fn remove_entries(&self, ids: &[u64]) -> Result<Vec<RuntimeEntry>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let script = Script::new(REMOVE_ENTRIES_LUA);
        let pairs: Vec<Vec<u8>> = self
            .run(async |conn| {
                script
                    .key(ENTRIES_KEY)
                    .key(ENTRIES_INDEX_KEY)
                    .key(ENTRIES_VERSION_KEY)
                    .arg(ids)
                    .invoke_async(conn)
                    .await
                    .map_err(classify)
            })
            .await?;
        Ok(stored_entries(pairs))
    }
}

/// The entry a scanned key and its value stand for, if they make one: a key gone since
/// SCAN saw it, an undecodable value, or a triplet value without key text (written before
/// scans existed) or with text that does not hash to its key (foreign) makes none.
fn scanned_entry(kind: EntryKind, key: &[u8], value: Option<&[u8]>) -> Option<Entry> {
    let value = value?;
    let key = std::str::from_utf8(key).ok()?;
    match kind {
        EntryKind::Triplets => {
            let (record, text) = value.split_at_checked(Triplet::ENCODED_LEN)?;
            let tkey = TripletKey::split(std::str::from_utf8(text).ok()?)?;
            if triplet_key(&tkey) != key {
                return None;
            }
            Some(Entry::Triplet {
                key: tkey,
                record: Triplet::from_bytes(record).ok()?,
            })
        }
        EntryKind::Clients => {
            let client = key.strip_prefix(CLIENT_PREFIX)?.strip_prefix('{')?;
            Some(Entry::Client {
                client: client.strip_suffix('}')?.to_owned(),
                record: decode(key, Some(value))?,
            })
        }
    }
}

/// The answer of one server to `cmd` (in a cluster, of any node: commands without a key
/// would otherwise go to every node).
async fn on_one_node<T: redis::FromRedisValue>(
    conn: &mut Conn,
    cmd: redis::Cmd,
) -> Result<T, StoreError> {
    let value = match conn {
        Conn::One(c) => cmd.query_async(c).await,
        Conn::Cluster(c) => {
            c.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                .await
        }
    }
    .map_err(classify)?;
    redis::from_redis_value(value).map_err(|e| StoreError::Backend(format!("redis: {e}")))
}

/// The masters of a cluster (`host:port`) in a `CLUSTER NODES` answer: one line per node,
/// `<id> <host:port@cport[,hostname]> <flags> ...`; failed masters are left out.
fn cluster_masters(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, addr, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let addr = addr.split(['@', ',']).next()?;
            (!addr.is_empty() && !addr.starts_with(':')).then(|| addr.to_owned())
        })
        .collect()
}

fn format_scan_cursor(node: Option<&str>, at: u64, keys: &[Vec<u8>], prefix: &str) -> String {
    let mut out = match node {
        Some(node) => format!("{node}/{at}"),
        None => at.to_string(),
    };
    for k in keys {
        out.push('.');
        out.push_str(&cursor::hex(k.strip_prefix(prefix.as_bytes()).unwrap_or(k)));
    }
    out
}

/// The cursor `s` as (index into `nodes`, SCAN cursor, keys still to look at). A cluster
/// node gone since the cursor was made is followed by the next one in order.
fn parse_scan_cursor(
    s: &str,
    prefix: &str,
    nodes: &[Option<String>],
) -> Result<(usize, u64, Vec<Vec<u8>>), StoreError> {
    let (node, rest) = match s.split_once('/') {
        Some((node, rest)) => {
            let at = nodes.iter().position(|n| n.as_deref() == Some(node));
            match at {
                Some(i) => (i, rest),
                None if nodes.iter().all(Option::is_some) => {
                    // Gone (a failover renamed it): go on with the next in order, afresh.
                    let next = nodes.iter().position(|n| n.as_deref() > Some(node));
                    return Ok((next.unwrap_or(nodes.len()), 0, Vec::new()));
                }
                None => return Err(cursor::bad(s)),
            }
        }
        None if nodes.iter().all(Option::is_none) => (0, s),
        None => return Err(cursor::bad(s)),
    };
    let mut parts = rest.split('.');
    let at = parts
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| cursor::bad(s))?;
    let keys = parts
        .map(|p| {
            let mut key = prefix.as_bytes().to_vec();
            key.extend(cursor::unhex(p)?);
            Ok(key)
        })
        .collect::<Result<_, StoreError>>()?;
    Ok((node, at, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hide_addresses_and_stay_in_one_slot() {
        let k = TripletKey {
            client: "192.0.2.0/24".into(),
            sender: "alice@example.net".into(),
            recipient: "bob@example.org".into(),
        };
        let t = triplet_key(&k);
        assert!(t.starts_with("gg:t:{") && t.ends_with('}'), "{t}");
        assert_eq!(t.len(), "gg:t:{}".len() + 32);
        assert!(!t.contains("alice") && !t.contains("example"), "{t}");
        let other = TripletKey {
            recipient: "Bob@example.org".into(),
            ..k.clone()
        };
        assert_ne!(t, triplet_key(&other), "keys are exact");
        assert_eq!(client_key("192.0.2.0/24"), "gg:c:{192.0.2.0/24}");
    }

    /// The entries' keys share one hash tag: each script touches a single Cluster slot.
    #[test]
    fn entries_keys_share_one_hash_slot() {
        for k in [
            ENTRIES_KEY,
            ENTRIES_INDEX_KEY,
            ENTRIES_VERSION_KEY,
            ENTRIES_NEXT_ID_KEY,
        ] {
            let tag = &k[k.find('{').unwrap() + 1..k.find('}').unwrap()];
            assert_eq!(tag, "entries", "{k}");
        }
    }

    #[test]
    fn ttls_round_up_never_down() {
        assert_eq!(ttl_for(1_000_000 + 300, 1_000_000), Some(300));
        assert_eq!(ttl_for(1_000_000 + 5, 1_000_000), Some(MIN_TTL));
        assert_eq!(ttl_for(10, 1_000_000), Some(MIN_TTL), "already dead");
        assert_eq!(ttl_for(u64::MAX - 1, 1_000_000), None, "beyond MAX_TTL");
    }

    #[test]
    fn cluster_masters_are_read_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host2 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 :0@0 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(cluster_masters(text), ["127.0.0.1:7001", "127.0.0.1:7002"]);
    }

    #[test]
    fn cluster_cursors_name_their_node_and_survive_its_departure() {
        let nodes = [
            Some("127.0.0.1:7001".to_owned()),
            Some("127.0.0.1:7003".to_owned()),
        ];
        let c = format_scan_cursor(
            Some("127.0.0.1:7003"),
            42,
            &[b"gg:t:{ab}".to_vec()],
            "gg:t:",
        );
        assert_eq!(
            parse_scan_cursor(&c, "gg:t:", &nodes).unwrap(),
            (1, 42, vec![b"gg:t:{ab}".to_vec()])
        );
        // 7002 is gone: the walk goes on with the next node in order, from its start.
        assert_eq!(
            parse_scan_cursor("127.0.0.1:7002/9", "gg:t:", &nodes).unwrap(),
            (1, 0, vec![])
        );
        assert_eq!(
            parse_scan_cursor("127.0.0.1:7009/9", "gg:t:", &nodes).unwrap(),
            (2, 0, vec![]),
            "past the last node: done"
        );
        // A one-server cursor on a cluster, and the other way round, are refused.
        assert!(parse_scan_cursor("42", "gg:t:", &nodes).is_err());
        assert!(parse_scan_cursor("127.0.0.1:7001/4", "gg:t:", &[None]).is_err());
        assert_eq!(
            parse_scan_cursor("7", "gg:t:", &[None]).unwrap(),
            (0, 7, vec![])
        );
    }

    #[test]
    fn node_lists_take_host_port_or_redis_urls_without_credentials() {
        assert!(check_nodes(&["10.0.0.1:26379".into(), "redis://[::1]:26379".into()]).is_ok());
        assert!(check_nodes(&["rediss://a:1".into(), "rediss://b:2".into()]).is_ok());
        let mixed = check_nodes(&["a:1".into(), "rediss://b:2".into()]).unwrap_err();
        assert!(mixed.contains("TLS is for all nodes or none"), "{mixed}");
        let creds = check_nodes(&["redis://:pw@a:1".into()]).unwrap_err();
        assert!(
            creds.contains("username and password") && !creds.contains("pw@"),
            "{creds}"
        );
        assert!(
            check_nodes(&["redis://a:1/3".into()]).is_err(),
            "no database"
        );
        assert!(check_nodes(&["unix:///run/redis.sock".into()]).is_err());
    }

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("redis+unix:///run/redis.sock").is_ok());
        assert!(check_url("postgres://localhost/x").is_err());
        assert!(check_url("redis://[nonsense").is_err());
    }
}
