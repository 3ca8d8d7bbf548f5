//! The `postgres` backend: the trust database in PostgreSQL, for sites that keep their
//! state there (one primary; any number of MX hosts).
//!
//! Tables created and migrated on first use (`greygate_schema` holds the version;
//! an advisory lock keeps hosts that start together from migrating twice):
//! - `greygate_triplets (key bytea PRIMARY KEY, record bytea, expires_at bigint, passed boolean,
//!   key_text bytea)`, keyed by the SHA-256 of the joined triplet key (a short key of fixed
//!   length whatever the addresses); `key_text` is the joined key itself, for `scan`, as
//!   bytes (text cannot hold the NUL that joins the parts). Rows written before schema
//!   version 2 have none until their next write, and are not listed until then;
//! - `greygate_clients (client text PRIMARY KEY, record bytea, expires_at bigint)`;
//! - `greygate_meta (name text PRIMARY KEY, value text)`: the address mode the keys were
//!   made in (`store::mode`; schema version 3), and `entries_version`, the change counter
//!   of the runtime entries (schema version 4);
//! - `greygate_entries (id bigserial PRIMARY KEY, list, target, value, added_at,
//!   expires_at, comment)`, unique on (list, target, value): the runtime allow/deny
//!   entries (see [`SharedEntries`]; schema version 4). Each change bumps
//!   `entries_version` in its own transaction, which also serialises the changes.
//!
//! `key_text` holds the addresses as the engine gives them: text, or keyed digests with
//! `[store] hash_addresses`.
//!
//! `record` is `Record::to_bytes`; `expires_at` and `passed` are copies for the expiry
//! index and for counts. An update reads the row; when the engine's step wants a write it
//! runs a transaction that locks the row (`SELECT ... FOR UPDATE`), runs the step again on
//! what it locked, and updates, or inserts with `ON CONFLICT DO NOTHING` when there was no
//! row: if another host inserted the same first sighting meanwhile, the insert waits for
//! that transaction, does nothing, and the loop locks and steps on the winner's row.
//! Expiry deletes dead rows in bounded, indexed batches. `scan` pages through the primary
//! keys (`WHERE key > $cursor ORDER BY key LIMIT n`), so each page is one short index
//! range read and concurrent writes neither block it nor make it repeat or skip rows.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::breaker::Breaker;
use super::postgres_tls;
use super::{
    Counts, Entry, EntryFilter, EntryKind, ExpireStep, Page, SCAN_EXAMINE, SharedEntries, Store,
    StoreError, UpdateFn, cursor,
};
use crate::engine::record::Record;
use crate::engine::{ClientRecord, ListKind, RuntimeEntry, Target, Triplet, TripletKey};

/// Schema migrations in order; the list only ever grows. Each runs once, in the
/// transaction that records its version.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE greygate_triplets (
         key bytea PRIMARY KEY,
         record bytea NOT NULL,
         expires_at bigint NOT NULL,
         passed boolean NOT NULL
     );
     CREATE INDEX greygate_triplets_expires_at ON greygate_triplets (expires_at);
     CREATE TABLE greygate_clients (
         client text PRIMARY KEY,
         record bytea NOT NULL,
         expires_at bigint NOT NULL
     );
     CREATE INDEX greygate_clients_expires_at ON greygate_clients (expires_at);",
    ),
    // The triplet's own key, so that triplets can be listed.
    (
        2,
        "ALTER TABLE greygate_triplets ADD COLUMN key_text bytea;",
    ),
    // The store's own settings: its address mode (see `store::mode`).
    (
        3,
        "CREATE TABLE greygate_meta (name text PRIMARY KEY, value text NOT NULL);",
    ),
    // Runtime allow/deny entries shared by every daemon, and their change counter.
    (
        4,
        "CREATE TABLE greygate_entries (
         id bigserial PRIMARY KEY,
         list text NOT NULL,
         target text NOT NULL,
         value text NOT NULL,
         added_at bigint NOT NULL,
         expires_at bigint,
         comment text NOT NULL,
         UNIQUE (list, target, value)
     );
     INSERT INTO greygate_meta (name, value) VALUES ('entries_version', '0')
         ON CONFLICT (name) DO NOTHING;",
    ),
];

/// The schema this greygate writes.
pub const SCHEMA_VERSION: i32 = 4;

/// Advisory lock key held while migrating ("greygate" in ASCII).
const MIGRATION_LOCK: i64 = 0x6772_6579_6761_7465;

/// Lock-and-write rounds before an update gives up; a round is lost only when another
/// host inserts the first record of the key between our look and our insert, or expiry
/// deletes it between our insert attempt and our next look.
const MAX_ROUNDS: usize = 4;

/// Most rows one expiry statement deletes, whatever the caller asks: keeps each delete
/// transaction short.
const MAX_EXPIRE_BATCH: usize = 5000;
/// After a sweep found nothing more to delete, the next waits this long: every MX host
/// sweeps the same tables, and an empty indexed scan ten times a second per host is waste.
const EXPIRE_IDLE: Duration = Duration::from_secs(1);

/// Server-side limits per statement and per idle transaction: a statement of a client that
/// gave up (the timeout dropped its connection) must not run or hold locks for long.
const SERVER_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Statements of one table.
struct Sql {
    get: &'static str,
    lock: &'static str,
    insert: &'static str,
    update: &'static str,
    expire: &'static str,
    /// The first rows of a scan, and the rows after a key.
    scan_first: &'static str,
    scan_after: &'static str,
    remove: &'static str,
}

/// A record kind and its table.
trait Row: Record {
    const SQL: Sql;
    /// The value of the triplets' `passed` column; clients have none.
    fn passed(&self) -> Option<bool>;
}

impl Row for Triplet {
    const SQL: Sql = Sql {
        get: "SELECT record FROM greygate_triplets WHERE key = $1",
        lock: "SELECT record FROM greygate_triplets WHERE key = $1 FOR UPDATE",
        insert: "INSERT INTO greygate_triplets (key, record, expires_at, passed, key_text) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
        // Sets key_text on every write, so rows from before schema 2 gain it.
        update: "UPDATE greygate_triplets SET record = $2, expires_at = $3, passed = $4, \
                 key_text = $5 WHERE key = $1",
        expire: "DELETE FROM greygate_triplets WHERE key IN (SELECT key FROM greygate_triplets \
                 WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        scan_first: "SELECT key, record, key_text FROM greygate_triplets ORDER BY key LIMIT $1",
        scan_after: "SELECT key, record, key_text FROM greygate_triplets WHERE key > $2 \
                     ORDER BY key LIMIT $1",
        remove: "DELETE FROM greygate_triplets WHERE key = $1",
    };
    fn passed(&self) -> Option<bool> {
        Some(self.passed)
    }
}

impl Row for ClientRecord {
    const SQL: Sql = Sql {
        get: "SELECT record FROM greygate_clients WHERE client = $1",
        lock: "SELECT record FROM greygate_clients WHERE client = $1 FOR UPDATE",
        insert: "INSERT INTO greygate_clients (client, record, expires_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (client) DO NOTHING",
        update: "UPDATE greygate_clients SET record = $2, expires_at = $3 WHERE client = $1",
        expire: "DELETE FROM greygate_clients WHERE client IN (SELECT client FROM greygate_clients \
                 WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        // The column's own collation orders both the index and `>`, so pages line up.
        scan_first: "SELECT client, record FROM greygate_clients ORDER BY client LIMIT $1",
        scan_after: "SELECT client, record FROM greygate_clients WHERE client > $2 \
                     ORDER BY client LIMIT $1",
        remove: "DELETE FROM greygate_clients WHERE client = $1",
    };
    fn passed(&self) -> Option<bool> {
        None
    }
}

/// The primary key of a triplet row.
pub fn triplet_key(key: &TripletKey) -> Vec<u8> {
    Sha256::digest(key.joined().as_bytes()).to_vec()
}

/// Unix seconds as PostgreSQL's `bigint`; later than its range reads as "never".
fn sql_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Checks a `postgres://` URL (or a `key=value` connection string) without connecting.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(drop)
}

/// Checks the TLS settings of a URL with `tls_ca_file` (see [`PostgresStore::with_tls_ca`]),
/// reading the CA file, without connecting.
pub fn check_tls(url: &str, tls_ca_file: Option<&std::path::Path>) -> Result<(), String> {
    let (config, tls) = parse_url(url)?;
    postgres_tls::connector(config.get_ssl_mode(), tls, tls_ca_file).map(drop)
}

/// The URL as tokio-postgres reads it, and the TLS settings it does not know
/// (`sslmode=verify-ca|verify-full`, `sslrootcert`).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, postgres_tls::UrlTls), String> {
    // tokio-postgres also reads `key=value` strings; a URL of another scheme must not
    // be taken for one (it would fail later with a confusing message).
    if url.contains("://") && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        return Err(format!(
            "bad postgres URL: {:?} is not postgres:// or postgresql://",
            url.split("://").next().unwrap_or_default()
        ));
    }
    let (rest, tls) = postgres_tls::split_url(url).map_err(|e| format!("bad postgres URL: {e}"))?;
    let config = rest.parse().map_err(|e| format!("bad postgres URL: {e}"))?;
    Ok((config, tls))
}

/// Connection-level trouble (refused, lost, timed out, server shutting down, a standby
/// after failover) makes the store unavailable; anything else the server said is a
/// backend error.
fn classify(e: &tokio_postgres::Error) -> StoreError {
    let unreachable = match e.code() {
        None => true,
        Some(code) => [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code),
    } || e.is_closed();
    if unreachable {
        StoreError::Unavailable(format!("postgres: {e}"))
    } else {
        StoreError::Backend(format!("postgres: {e}"))
    }
}

/// No connection means unreachable, whatever the reason (refused, timed out, a wrong
/// password): the breaker then paces the next attempts.
fn pool_error(e: PoolError, timeout: Duration) -> StoreError {
    match e {
        PoolError::Timeout(_) => StoreError::Timeout(timeout),
        PoolError::Backend(e) => {
            // The cause (a TLS handshake's, say) is not part of the error's own text.
            let mut said = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !said.contains(&text) {
                    said = format!("{said}: {text}");
                }
                cause = c.source();
            }
            if said.contains("server does not support TLS") {
                said.push_str(
                    " (the url's sslmode requires TLS: turn ssl on in the server, or change \
                     sslmode)",
                );
            }
            StoreError::Unavailable(format!("postgres: cannot connect: {said}"))
        }
        other => StoreError::Unavailable(format!("postgres: {other}")),
    }
}

/// Column `i` of `row`; a type other than the schema's is the backend's error, not a panic.
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
    i: usize,
) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Backend(format!("postgres: unexpected column {i}: {e}")))
}

/// The record in a `SELECT record` row, if any.
fn record<R: Record>(row: Option<tokio_postgres::Row>) -> Result<Option<R>, StoreError> {
    match row {
        Some(row) => Ok(decode(column::<&[u8]>(&row, 0)?)),
        None => Ok(None),
    }
}

fn decode<R: Record>(bytes: &[u8]) -> Option<R> {
    match R::from_bytes(bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            // Replaced by the next update rather than failing the key until it expires.
            tracing::warn!(error = %e, "undecodable record in postgres; treating it as absent");
            None
        }
    }
}

/// The postgres store.
pub struct PostgresStore {
    shown: String,
    tls: &'static str,
    pool: Pool,
    timeout: Duration,
    breaker: Breaker,
    schema: tokio::sync::OnceCell<()>,
    next_sweep: std::sync::Mutex<Option<Instant>>,
}

impl PostgresStore {
    /// Creates the store without connecting: connections are made on use (at most
    /// `pool_size`, each attempt limited to `connect_timeout`), the schema is created or
    /// migrated by the first operation, and every operation is bounded by `timeout`. So
    /// greygate starts, and fails open, while PostgreSQL is down.
    pub fn new(
        url: &str,
        pool_size: usize,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::with_tls_ca(url, None, pool_size, connect_timeout, timeout)
    }

    /// [`new`](Self::new) with the CA that verifies the server's certificate
    /// (`[store] tls_ca_file`). TLS follows the URL's `sslmode`, as libpq: `disable`;
    /// `prefer` (the default) and `require`, which encrypt without checking the certificate
    /// unless a CA is given (then `require` checks the chain); `verify-ca`, the chain must
    /// lead to the CA; `verify-full`, and name the URL's host. The CA may also come as
    /// `sslrootcert=` in the URL. A CA that cannot be read, or a verify mode without one,
    /// is an error here.
    pub fn with_tls_ca(
        url: &str,
        tls_ca_file: Option<&std::path::Path>,
        pool_size: usize,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let (mut config, tls) = parse_url(url).map_err(StoreError::Unavailable)?;
        let tls = postgres_tls::connector(config.get_ssl_mode(), tls, tls_ca_file)
            .map_err(|e| StoreError::Unavailable(format!("postgres: {e}")))?;
        let tls_shown = tls.describe(config.get_ssl_mode());
        let host = config.get_hosts().first().map_or_else(
            || "localhost".to_string(),
            |h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
            },
        );
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let shown = format!(
            "postgres {}@{host}:{port}/{}",
            config.get_user().unwrap_or("?"),
            config.get_dbname().or(config.get_user()).unwrap_or("?")
        );
        let ms = |d: Duration| d.as_millis().max(1);
        // Appended to whatever options the URL sets (e.g. a search_path).
        let options = format!(
            "{} -c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            config.get_options().unwrap_or_default(),
            ms(SERVER_STATEMENT_TIMEOUT),
            ms(timeout),
            ms(SERVER_STATEMENT_TIMEOUT),
        );
        config
            .options(options.trim_start())
            .connect_timeout(connect_timeout)
            .application_name("greygate");
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))?;
        Ok(PostgresStore {
            breaker: Breaker::new(shown.clone()),
            shown,
            tls: tls_shown,
            pool,
            timeout,
            schema: tokio::sync::OnceCell::new(),
            next_sweep: std::sync::Mutex::new(None),
        })
    }

    /// The TLS of its connections as the URL's `sslmode` and the CA make it: `off`,
    /// `prefer (certificate not checked)`, `require (certificate not checked)`,
    /// `verify-ca` or `verify-full`.
    pub fn tls(&self) -> &'static str {
        self.tls
    }

    /// Connects, migrates the schema if needed and reports the server (for
    /// `check-config --connect`), e.g. `PostgreSQL 15.8, schema version 3, TLS TLSv1.3
    /// (verify-full)` (the server's own view of the connection, `pg_stat_ssl`).
    pub async fn check(&self) -> Result<String, StoreError> {
        self.run(async |client| {
            let row = client
                .query_one("SHOW server_version", &[])
                .await
                .map_err(|e| classify(&e))?;
            let version: String = column(&row, 0)?;
            // What the server sees of this very connection.
            let row = client
                .query_opt(
                    "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                    &[],
                )
                .await
                .map_err(|e| classify(&e))?;
            let tls = match row {
                Some(row) => format!(
                    "TLS {} ({})",
                    column::<Option<String>>(&row, 0)?.unwrap_or_default(),
                    self.tls
                ),
                None => "no TLS".to_string(),
            };
            Ok(format!(
                "PostgreSQL {version}, schema version {SCHEMA_VERSION}, {tls}"
            ))
        })
        .await
    }

    /// Runs `op` on a pooled connection (the schema ready), under the breaker and
    /// `timeout`. A connection whose operation failed at the connection level or timed out
    /// is discarded rather than handed to the next request mid-statement.
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let attempt = self.breaker.admit()?;
        let deadline = Instant::now() + self.timeout;
        let mut client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let e = pool_error(e, self.timeout);
                attempt.unreachable(&e);
                return Err(e);
            }
            Err(_) => {
                let e = StoreError::Timeout(self.timeout);
                attempt.unreachable(&e);
                return Err(e);
            }
        };
        let work = async {
            self.schema.get_or_try_init(|| migrate(&mut client)).await?;
            op(&mut client).await
        };
        let result = match tokio::time::timeout_at(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        match &result {
            Err(e @ (StoreError::Unavailable(_) | StoreError::Timeout(_))) => {
                drop(Object::take(client));
                attempt.unreachable(e);
            }
            _ => attempt.reachable(),
        }
        result
    }

    async fn get<R: Row>(&self, key: &(dyn ToSql + Sync)) -> Result<Option<R>, StoreError> {
        self.run(async |client| {
            let stmt = client
                .prepare_cached(R::SQL.get)
                .await
                .map_err(|e| classify(&e))?;
            let row = client
                .query_opt(&stmt, &[key])
                .await
                .map_err(|e| classify(&e))?;
            record(row)
        })
        .await
    }

    /// The update of the row at `key`; `text` is the triplet's `key_text` (clients: none).
    async fn update<R: Row>(
        &self,
        key: &(dyn ToSql + Sync),
        text: Option<&(dyn ToSql + Sync)>,
        f: UpdateFn<'_, R>,
    ) -> Result<Option<R>, StoreError> {
        self.run(async |client| {
            let pg = |e: tokio_postgres::Error| classify(&e);
            // A look without a lock first: when the step writes nothing (the common
            // auto-allow check of a client group), that read is the whole atomic update,
            // and hot rows are never locked just to be read.
            let get = client.prepare_cached(R::SQL.get).await.map_err(pg)?;
            let row = client.query_opt(&get, &[key]).await.map_err(pg)?;
            let seen: Option<R> = record(row)?;
            match f(seen.as_ref()) {
                Some(new) if Some(new) != seen => {}
                _ => return Ok(seen),
            }

            let lock = client.prepare_cached(R::SQL.lock).await.map_err(pg)?;
            let insert = client.prepare_cached(R::SQL.insert).await.map_err(pg)?;
            let update = client.prepare_cached(R::SQL.update).await.map_err(pg)?;
            let tx = client.transaction().await.map_err(pg)?;
            for _ in 0..MAX_ROUNDS {
                let row = tx.query_opt(&lock, &[key]).await.map_err(pg)?;
                let exists = row.is_some();
                let old: Option<R> = record(row)?;
                let new = match f(old.as_ref()) {
                    Some(new) if Some(new) != old => new,
                    _ => {
                        tx.rollback().await.map_err(pg)?;
                        return Ok(old);
                    }
                };
                let bytes = new.to_bytes();
                let expires_at = sql_time(new.expires_at());
                let passed = new.passed();
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![key, &bytes, &expires_at];
                if let Some(p) = &passed {
                    params.push(p);
                }
                params.extend(text);
                if exists {
                    tx.execute(&update, &params).await.map_err(pg)?;
                } else if tx.execute(&insert, &params).await.map_err(pg)? == 0 {
                    // Another host inserted this key's first record after our look; the
                    // insert waited for its commit, so the next look locks its row.
                    continue;
                }
                tx.commit().await.map_err(pg)?;
                return Ok(old);
            }
            Err(StoreError::Backend(format!(
                "postgres: key changed under {MAX_ROUNDS} update attempts in a row; gave up"
            )))
        })
        .await
    }
}

impl PostgresStore {
    async fn remove<R: Row>(&self, key: &(dyn ToSql + Sync)) -> Result<bool, StoreError> {
        self.run(async |client| {
            let n = client
                .execute(R::SQL.remove, &[key])
                .await
                .map_err(|e| classify(&e))?;
            Ok(n > 0)
        })
        .await
    }

    /// One page of keyset paging; the cursor is the hex primary key of the last row looked
    /// at. Rows are read in chunks sized to what the page still needs, up to
    /// `SCAN_EXAMINE` rows in all.
    async fn scan_page(
        &self,
        kind: EntryKind,
        from: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let mut after: Option<Vec<u8>> = from.map(cursor::unhex).transpose()?;
        let sql = match kind {
            EntryKind::Triplets => Triplet::SQL,
            EntryKind::Clients => ClientRecord::SQL,
        };
        let mut entries = Vec::new();
        let mut examined = 0;
        while examined < SCAN_EXAMINE {
            let chunk = (2 * (limit - entries.len()))
                .max(16)
                .min(SCAN_EXAMINE - examined);
            let n = i64::try_from(chunk).unwrap_or(i64::MAX);
            let rows = self
                .run(async |client| {
                    let pg = |e: tokio_postgres::Error| classify(&e);
                    match (&after, kind) {
                        (None, _) => client.query(sql.scan_first, &[&n]).await.map_err(pg),
                        (Some(k), EntryKind::Triplets) => client
                            .query(sql.scan_after, &[&n, &k.as_slice()])
                            .await
                            .map_err(pg),
                        (Some(k), EntryKind::Clients) => {
                            let k = std::str::from_utf8(k)
                                .map_err(|_| cursor::bad(from.unwrap_or_default()))?;
                            client.query(sql.scan_after, &[&n, &k]).await.map_err(pg)
                        }
                    }
                })
                .await?;
            for (i, row) in rows.iter().enumerate() {
                examined += 1;
                let (key, entry) = scanned_entry(kind, row)?;
                if let Some(e) = entry
                    && e.expires_at() >= now
                    && keep(&e)
                {
                    entries.push(e);
                }
                let table_ended = rows.len() < chunk && i + 1 == rows.len();
                if entries.len() >= limit {
                    return Ok(Page {
                        entries,
                        next: (!table_ended).then(|| cursor::hex(&key)),
                    });
                }
                after = Some(key);
            }
            if rows.len() < chunk {
                return Ok(Page {
                    entries,
                    next: None,
                });
            }
        }
        Ok(Page {
            entries,
            next: after.map(|k| cursor::hex(&k)),
        })
    }
}

/// A scanned row's primary key (as bytes), and its entry unless the row makes none (an
/// undecodable record, a triplet without `key_text` from before schema 2).
fn scanned_entry(
    kind: EntryKind,
    row: &tokio_postgres::Row,
) -> Result<(Vec<u8>, Option<Entry>), StoreError> {
    Ok(match kind {
        EntryKind::Triplets => {
            let key: Vec<u8> = column(row, 0)?;
            let text: Option<&[u8]> = column(row, 2)?;
            let tkey = text
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(TripletKey::split);
            let record = decode::<Triplet>(column(row, 1)?);
            let entry = tkey
                .zip(record)
                .map(|(key, record)| Entry::Triplet { key, record });
            (key, entry)
        }
        EntryKind::Clients => {
            let client: String = column(row, 0)?;
            let entry = decode::<ClientRecord>(column(row, 1)?).map(|record| Entry::Client {
                client: client.clone(),
                record,
            });
            (client.into_bytes(), entry)
        }
    })
}

/// Creates or upgrades the schema, once per store (and once across hosts starting
/// together: the advisory lock serialises them, and the version table tells the later ones
/// there is nothing left to do).
async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let pg = |e: tokio_postgres::Error| classify(&e);
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS greygate_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM greygate_schema", &[])
        .await
        .map_err(pg)?;
    let current: i32 = column(&row, 0)?;
    if current > SCHEMA_VERSION {
        // A newer greygate migrated this database; writing to a schema this one does not
        // know could corrupt it.
        return Err(StoreError::Backend(format!(
            "postgres schema version {current} is newer than this greygate's ({SCHEMA_VERSION}); upgrade greygate"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO greygate_schema (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg)?;
        tracing::info!(version, "postgres schema migrated");
    }
    tx.commit().await.map_err(pg)
}

#[async_trait]
impl Store for PostgresStore {
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
        let text = key.joined().into_bytes();
        self.update(&triplet_key(key), Some(&text), f).await
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.get(&client).await
    }

    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.update(&client, None, f).await
    }

    /// Deletes up to `max_scan` dead rows of each table through the `expires_at` index;
    /// rows that requests hold locked are skipped (they are being rewritten anyway).
    async fn expire(&self, now: u64, max_scan: usize) -> Result<ExpireStep, StoreError> {
        let done = ExpireStep {
            removed: 0,
            cycle_done: true,
        };
        {
            let next = self.next_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if next.is_some_and(|t| Instant::now() < t) {
                return Ok(done);
            }
        }
        if self.breaker.is_down() {
            // Requests already report the outage; expiry simply waits for the server.
            return Ok(done);
        }
        let batch = max_scan.clamp(1, MAX_EXPIRE_BATCH);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let now = sql_time(now);
        let (triplets, clients) = self
            .run(async |client| {
                let pg = |e: tokio_postgres::Error| classify(&e);
                let t = client
                    .execute(Triplet::SQL.expire, &[&now, &limit])
                    .await
                    .map_err(pg)?;
                let c = client
                    .execute(ClientRecord::SQL.expire, &[&now, &limit])
                    .await
                    .map_err(pg)?;
                Ok((t, c))
            })
            .await?;
        let as_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let step = ExpireStep {
            removed: as_usize(triplets).saturating_add(as_usize(clients)),
            cycle_done: as_usize(triplets) < batch && as_usize(clients) < batch,
        };
        if step.cycle_done {
            *self.next_sweep.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + EXPIRE_IDLE);
        }
        Ok(step)
    }

    /// Every update is committed when it is made.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.run(async |client| {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE NOT passed), count(*) FILTER (WHERE passed), \
                     (SELECT count(*) FROM greygate_clients) FROM greygate_triplets",
                    &[],
                )
                .await
                .map_err(|e| classify(&e))?;
            let n = |i: usize| column::<i64>(&row, i).map(|n| u64::try_from(n).unwrap_or(0));
            Ok(Counts {
                triplets_pending: n(0)?,
                triplets_passed: n(1)?,
                clients: n(2)?,
            })
        })
        .await
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
        self.remove::<Triplet>(&triplet_key(key)).await
    }

    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        self.remove::<ClientRecord>(&client).await
    }

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        self.run(async |client| {
            let row = client
                .query_opt(
                    "SELECT value FROM greygate_meta WHERE name = $1",
                    &[&super::mode::MODE_NAME],
                )
                .await
                .map_err(|e| classify(&e))?;
            row.map(|r| column::<String>(&r, 0)).transpose()
        })
        .await
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        self.run(async |client| {
            client
                .execute(
                    "INSERT INTO greygate_meta (name, value) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    &[&super::mode::MODE_NAME, &mode],
                )
                .await
                .map_err(|e| classify(&e))?;
            Ok(())
        })
        .await
    }

    fn shared_entries(&self) -> Option<&dyn SharedEntries> {
        Some(self)
    }
}

const ENTRIES_VERSION: &str =
    "SELECT value::bigint FROM greygate_meta WHERE name = 'entries_version'";
/// Bumps the change counter; run first in a change's transaction, its row lock makes
/// changes take turns (so the count checked against the limit stays true).
const BUMP_ENTRIES_VERSION: &str = "UPDATE greygate_meta SET value = (value::bigint + 1)::text \
                                    WHERE name = 'entries_version'";
const ENTRY_COLUMNS: &str = "id, list, target, value, added_at, expires_at, comment";

fn list_kind(s: &str) -> Option<ListKind> {
    match s {
        "allow" => Some(ListKind::Allow),
        "deny" => Some(ListKind::Deny),
        _ => None,
    }
}

fn target(s: &str) -> Option<Target> {
    match s {
        "client" => Some(Target::Client),
        "sender" => Some(Target::Sender),
        "recipient" => Some(Target::Recipient),
        _ => None,
    }
}

/// A `greygate_entries` row (columns as [`ENTRY_COLUMNS`]); `None` for a row greygate did
/// not write (an unknown list or target).
fn entry_row(row: &tokio_postgres::Row) -> Result<Option<RuntimeEntry>, StoreError> {
    let time = |t: i64| u64::try_from(t).unwrap_or(0);
    let (Some(list), Some(tgt)) = (list_kind(column(row, 1)?), target(column(row, 2)?)) else {
        tracing::warn!("unreadable runtime entry in postgres; ignored");
        return Ok(None);
    };
    Ok(Some(RuntimeEntry {
        id: time(column(row, 0)?),
        list,
        target: tgt,
        value: column(row, 3)?,
        added_at: time(column(row, 4)?),
        expires_at: column::<Option<i64>>(row, 5)?.map(time),
        comment: column(row, 6)?,
    }))
}

fn entry_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<RuntimeEntry>, StoreError> {
    Ok(rows
        .iter()
        .map(entry_row)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect())
}

#[async_trait]
impl SharedEntries for PostgresStore {
    async fn entries_version(&self) -> Result<u64, StoreError> {
        self.run(async |client| {
            let row = client
                .query_opt(ENTRIES_VERSION, &[])
                .await
                .map_err(|e| classify(&e))?;
            let v = row.map(|r| column::<i64>(&r, 0)).transpose()?;
            Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
        })
        .await
    }

    async fn list_entries(&self) -> Result<(u64, Vec<RuntimeEntry>), StoreError> {
        self.run(async |client| {
            let pg = |e: tokio_postgres::Error| classify(&e);
            // Version first: an entry committed between the two reads comes with the older
            // version, and the next poll reads again.
            let v = client.query_opt(ENTRIES_VERSION, &[]).await.map_err(pg)?;
            let v = v.map(|r| column::<i64>(&r, 0)).transpose()?;
            let rows = client
                .query(
                    &format!("SELECT {ENTRY_COLUMNS} FROM greygate_entries ORDER BY id"),
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok((
                v.map_or(0, |v| u64::try_from(v).unwrap_or(0)),
                entry_rows(&rows)?,
            ))
        })
        .await
    }

    async fn put_entry(
        &self,
        entry: &RuntimeEntry,
        max: usize,
    ) -> Result<Option<RuntimeEntry>, StoreError> {
        self.run(async |client| {
            let pg = |e: tokio_postgres::Error| classify(&e);
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(BUMP_ENTRIES_VERSION, &[]).await.map_err(pg)?;
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM greygate_entries WHERE list = $1 AND target = $2 AND value = $3",
                    &[&entry.list.as_str(), &entry.target.as_str(), &entry.value],
                )
                .await
                .map_err(pg)?
                .is_some();
            if !exists {
                let row = tx
                    .query_one("SELECT count(*) FROM greygate_entries", &[])
                    .await
                    .map_err(pg)?;
                if usize::try_from(column::<i64>(&row, 0)?).unwrap_or(usize::MAX) >= max {
                    tx.rollback().await.map_err(pg)?;
                    return Ok(None);
                }
            }
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO greygate_entries (list, target, value, added_at, expires_at, \
                         comment) VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (list, target, value) DO UPDATE \
                         SET expires_at = EXCLUDED.expires_at, comment = EXCLUDED.comment \
                         RETURNING {ENTRY_COLUMNS}"
                    ),
                    &[
                        &entry.list.as_str(),
                        &entry.target.as_str(),
                        &entry.value,
                        &sql_time(entry.added_at),
                        &entry.expires_at.map(sql_time),
                        &entry.comment,
                    ],
                )
                .await
                .map_err(pg)?;
            let stored = entry_row(&row)?;
            tx.commit().await.map_err(pg)?;
            Ok(stored)
        })
        .await
    }

    async fn remove_entries(&self, ids: &[u64]) -> Result<Vec<RuntimeEntry>, StoreError> {
        let ids: Vec<i64> = ids.iter().filter_map(|&i| i64::try_from(i).ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.run(async |client| {
            let pg = |e: tokio_postgres::Error| classify(&e);
            let tx = client.transaction().await.map_err(pg)?;
            tx.execute(BUMP_ENTRIES_VERSION, &[]).await.map_err(pg)?;
            let rows = tx
                .query(
                    &format!(
                        "DELETE FROM greygate_entries WHERE id = ANY($1) RETURNING {ENTRY_COLUMNS}"
                    ),
                    &[&ids],
                )
                .await
                .map_err(pg)?;
            if rows.is_empty() {
                // Nothing changed: no version bump for the others to chase.
                tx.rollback().await.map_err(pg)?;
                return Ok(Vec::new());
            }
            let gone = entry_rows(&rows)?;
            tx.commit().await.map_err(pg)?;
            Ok(gone)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_connecting() {
        assert!(check_url("postgres://greygate:secret@db.example:5433/greygate").is_ok());
        assert!(check_url("postgresql://greygate@%2Frun%2Fpostgresql/greygate").is_ok());
        assert!(check_url("host=/run/postgresql user=greygate").is_ok());
        assert!(check_url("redis://127.0.0.1/").is_err());
        assert!(check_url("postgres://h:notaport/db").is_err());
        let (c, _) = parse_url("postgres://u@db1,db2/gg?options=-csearch_path%3Dgreygate").unwrap();
        assert_eq!(c.get_options(), Some("-csearch_path=greygate"));
        assert_eq!(c.get_hosts().len(), 2);
    }

    #[test]
    fn times_beyond_bigint_read_as_never() {
        assert_eq!(sql_time(5), 5);
        assert_eq!(sql_time(u64::MAX - 1), i64::MAX);
    }

    #[tokio::test]
    async fn description_names_the_server_without_the_password() {
        let s = PostgresStore::new(
            "postgres://gg:secret@db.example:5433/trust",
            4,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(s.describe(), "postgres gg@db.example:5433/trust");
    }
}
