//! sqlgrey's tables, read from PostgreSQL or SQLite.
//!
//! sqlgrey (1.8, `/usr/sbin/sqlgrey`, database version 3) keeps:
//!
//! - `connect (sender_name, sender_domain, src, rcpt, first_seen)`: pending triplets. The
//!   sender as MAIL FROM gave it, lower-cased and split at its `@` (the null sender is
//!   `-undef-`/`-undef-`), the recipient lower-cased with its extension, `first_seen` the
//!   first attempt. A retry after `reconnect_delay` (5 min) within `max_connect_age` (24 h)
//!   passes: the row leaves `connect` for `from_awl`.
//! - `from_awl (sender_name, sender_domain, src, first_seen, last_seen)`: a sender (its
//!   local part de-VERPed) that passed greylisting from `src`; its mail from there passes
//!   at once, for any recipient, while `last_seen` is within `awl_age` (60 days).
//! - `domain_awl (sender_domain, src, first_seen, last_seen)`: the same for every sender of
//!   a domain, once `group_domain_level` (2) of its senders passed from `src`.
//!
//! `src` is sqlgrey's client identifier: the whole address (`greymethod = full`, and
//! `smart` for hosts without reverse DNS or with dynamic-looking names), its first three
//! octets (`192.0.2`: the /24, `classc` and `smart`), or an IPv6 address written in full
//! (`2001:0db8:0000:...`), for EUI-64 addresses its first four groups (the /64).
//!
//! greygate keys triplets by recipient and keeps no per-sender allow list, so: `connect`
//! rows become pending triplets with their first sighting, or passed ones when an allow
//! list row covers them (sqlgrey passes them at once; it also leaves the rows of senders
//! with an `+extension` in `connect` after they passed); each `from_awl` and `domain_awl`
//! row is one pass of its client group towards greygate's auto-allow (`auto_allow_after`),
//! since every one of them is a sender that passed greylisting from there.
//!
//! Times: in PostgreSQL `timestamp` columns hold the local time of the server's `TimeZone`
//! (sqlgrey writes `NOW()`), read here in that zone; in SQLite sqlgrey stores Unix seconds.
//! MySQL is not read (no MySQL client is built in).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Bad, ImportError, Importer, SourceNet, clamp_time};

/// One value of a row, as the source database gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(Vec<u8>),
}

/// A `connect` row, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRow {
    pub net: SourceNet,
    /// `src` as sqlgrey wrote it (the allow lists are matched on it).
    pub src: String,
    pub sender_name: String,
    pub sender_domain: String,
    /// The sender as MAIL FROM gave it (empty: the null sender).
    pub sender: String,
    pub recipient: String,
    pub first_seen: u64,
}

/// A `from_awl` or `domain_awl` row, read (what greygate uses of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwlRow {
    pub net: SourceNet,
    pub src: String,
    pub last_seen: u64,
    pub sender_domain: String,
    /// `from_awl`'s (de-VERPed) sender name; `None` for `domain_awl`.
    pub sender_name: Option<String>,
}

/// sqlgrey's stand-in for a missing sender part.
const UNDEF: &str = "-undef-";

/// Longest text value read (sqlgrey's columns hold at most 255 characters).
const MAX_TEXT: usize = 4096;

fn text<'a>(cell: Option<&'a Cell>, what: &str) -> Result<&'a str, Bad> {
    match cell {
        Some(Cell::Text(t)) if t.len() <= MAX_TEXT => {
            std::str::from_utf8(t).map_err(|_| Bad::unparseable(format!("{what} is not UTF-8")))
        }
        Some(Cell::Text(_)) => Err(Bad::unparseable(format!("{what} is too long"))),
        _ => Err(Bad::unparseable(format!("{what} is not text"))),
    }
}

/// Unix seconds of a time cell: a number (SQLite, or PostgreSQL's epoch), or text holding
/// a number or `YYYY-MM-DD HH:MM:SS` in UTC (SQLite's own time format).
pub fn time_of(cell: Option<&Cell>, what: &str) -> Result<u64, Bad> {
    let bad = || Bad::unparseable(format!("{what} is not a time"));
    let real = |f: f64| {
        // Up to the year 33658: far beyond any mail, and exact in an f64.
        (f.is_finite() && (0.0..1e12).contains(&f))
            .then(|| f.floor() as u64)
            .ok_or_else(bad)
    };
    match cell {
        Some(Cell::Int(i)) => u64::try_from(*i).map_err(|_| bad()),
        Some(Cell::Real(f)) => real(*f),
        Some(Cell::Text(t)) => {
            let s = std::str::from_utf8(t).map_err(|_| bad())?.trim();
            if let Ok(n) = s.parse::<u64>() {
                return Ok(n);
            }
            if let Ok(f) = s.parse::<f64>() {
                return real(f);
            }
            let dt: jiff::civil::DateTime = s.parse().map_err(|_| bad())?;
            let secs = jiff::tz::TimeZone::UTC
                .to_timestamp(dt)
                .map_err(|_| bad())?
                .as_second();
            u64::try_from(secs).map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// sqlgrey's client identifier as a network: a whole address, three IPv4 octets (the
/// /24), or four IPv6 groups (the /64).
pub fn parse_src(s: &str) -> Option<SourceNet> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        return Some(SourceNet { ip, prefix });
    }
    let octets: Vec<&str> = s.split('.').collect();
    if octets.len() == 3
        && octets
            .iter()
            .all(|o| (1..=3).contains(&o.len()) && o.bytes().all(|b| b.is_ascii_digit()))
    {
        let mut ip = [0u8; 4];
        for (slot, o) in ip.iter_mut().zip(&octets) {
            *slot = o.parse().ok()?;
        }
        return Some(SourceNet {
            ip: IpAddr::from(ip),
            prefix: 24,
        });
    }
    let groups: Vec<&str> = s.split(':').collect();
    if groups.len() == 4
        && groups
            .iter()
            .all(|g| (1..=4).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        let ip = format!("{s}::").parse().ok()?;
        return Some(SourceNet { ip, prefix: 64 });
    }
    None
}

fn src_of(cell: Option<&Cell>) -> Result<(SourceNet, String), Bad> {
    let s = text(cell, "src")?;
    let net = parse_src(s)
        .ok_or_else(|| Bad::unparseable(format!("src {s:?} is not an address or network")))?;
    Ok((net, s.to_string()))
}

/// Reads a `connect` row: `sender_name, sender_domain, src, rcpt, first_seen`.
///
/// # Errors
///
/// A row that cannot be read ([`super::Skip::Unparseable`]).
pub fn parse_connect(cells: &[Cell]) -> Result<ConnectRow, Bad> {
    let name = text(cells.first(), "sender_name")?;
    let domain = text(cells.get(1), "sender_domain")?;
    let (net, src) = src_of(cells.get(2))?;
    let recipient = text(cells.get(3), "rcpt")?;
    let first_seen = time_of(cells.get(4), "first_seen")?;
    let sender = match (name, domain) {
        (UNDEF, UNDEF) => String::new(),
        (name, UNDEF) => name.to_string(),
        (name, domain) => format!("{name}@{domain}"),
    };
    if recipient.is_empty() {
        return Err(Bad::unparseable("rcpt is empty"));
    }
    Ok(ConnectRow {
        net,
        src,
        sender_name: name.to_string(),
        sender_domain: domain.to_string(),
        sender,
        recipient: recipient.to_string(),
        first_seen,
    })
}

/// Reads a `from_awl` row as this import selects it (`src, last_seen, sender_domain,
/// sender_name`), or a `domain_awl` one (`src, last_seen, sender_domain`).
///
/// # Errors
///
/// As [`parse_connect`].
pub fn parse_awl(cells: &[Cell], with_name: bool) -> Result<AwlRow, Bad> {
    let (net, src) = src_of(cells.first())?;
    Ok(AwlRow {
        net,
        src,
        last_seen: time_of(cells.get(1), "last_seen")?,
        sender_domain: text(cells.get(2), "sender_domain")?.to_string(),
        sender_name: if with_name {
            Some(text(cells.get(3), "sender_name")?.to_string())
        } else {
            None
        },
    })
}

/// What sqlgrey's allow lists say of senders at clients, for the `connect` rows: a row
/// they cover passes in sqlgrey at once, so it is imported as passed.
#[derive(Debug, Default)]
pub struct AllowLists {
    /// (src, sender_domain, sender_name) of `from_awl` → its latest `last_seen`.
    senders: HashMap<(String, String, String), u64>,
    /// (src, sender_domain) of `domain_awl` → its latest `last_seen`.
    domains: HashMap<(String, String), u64>,
}

/// Most allow-list rows kept for matching `connect` rows: a bound on the import's memory.
pub const MAX_ALLOW_ROWS: usize = 10_000_000;

impl AllowLists {
    /// Keeps an allow-list row (false when the bound is reached: the row is not kept).
    pub fn add(&mut self, row: &AwlRow) -> bool {
        if self.senders.len() + self.domains.len() >= MAX_ALLOW_ROWS {
            return false;
        }
        let seen = row.last_seen;
        match &row.sender_name {
            Some(name) => {
                let k = (row.src.clone(), row.sender_domain.clone(), name.clone());
                let slot = self.senders.entry(k).or_insert(seen);
                *slot = (*slot).max(seen);
            }
            None => {
                let k = (row.src.clone(), row.sender_domain.clone());
                let slot = self.domains.entry(k).or_insert(seen);
                *slot = (*slot).max(seen);
            }
        }
        true
    }

    /// When sqlgrey's allow lists last let this row's sender through from its `src`:
    /// `domain_awl` by domain; `from_awl` by the sender's name, as it is and without its
    /// `+extension` (sqlgrey's de-VERPing strips it; names it rewrites further are not
    /// matched, and stay pending).
    pub fn covers(&self, row: &ConnectRow) -> Option<u64> {
        if row.sender_domain == UNDEF {
            return None;
        }
        let by_domain = self
            .domains
            .get(&(row.src.clone(), row.sender_domain.clone()))
            .copied();
        let base = row
            .sender_name
            .split_once('+')
            .map_or(row.sender_name.as_str(), |(b, _)| b);
        let by_name = [row.sender_name.as_str(), base]
            .into_iter()
            .filter_map(|name| {
                self.senders
                    .get(&(row.src.clone(), row.sender_domain.clone(), name.to_string()))
                    .copied()
            })
            .max();
        by_domain.max(by_name)
    }
}

/// Where sqlgrey's database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
    /// An SQLite file.
    Sqlite(PathBuf),
}

impl Source {
    /// Reads the command line's URL: `postgres://...`, `postgresql://...`, `sqlite:PATH`
    /// (`sqlite:///abs/path` too), or the path of an existing SQLite file.
    ///
    /// # Errors
    ///
    /// MySQL (not supported) or anything else.
    pub fn parse(url: &str) -> Result<Source, String> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Source::Postgres(url.to_string()));
        }
        if lower.starts_with("mysql:") || lower.starts_with("dbi:mysql") {
            return Err(
                "sqlgrey's MySQL database is not supported (greygate has no MySQL \
                        client): copy its connect, from_awl and domain_awl tables to \
                        PostgreSQL or SQLite and import from there"
                    .into(),
            );
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(
                    "sqlite: needs a file path (sqlite:/var/lib/sqlgrey/sqlgrey.db)".into(),
                );
            }
            return Ok(Source::Sqlite(PathBuf::from(path)));
        }
        if !url.contains("://") && std::path::Path::new(url).is_file() {
            return Ok(Source::Sqlite(PathBuf::from(url)));
        }
        Err(format!(
            "{url:?} is neither a postgres:// URL, sqlite:PATH nor an SQLite file"
        ))
    }

    /// For the report: the URL without its password.
    pub fn shown(&self) -> String {
        match self {
            Source::Postgres(url) => crate::store::ServerStore {
                redis: crate::store::RedisTopology::Single,
                url: url.clone(),
                pool_size: 1,
                connect_timeout: Duration::ZERO,
                tls_ca_file: None,
            }
            .redacted_url(),
            Source::Sqlite(path) => format!("sqlite:{}", path.display()),
        }
    }
}

/// The tables read, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Connect,
    FromAwl,
    DomainAwl,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Connect => "connect",
            Table::FromAwl => "from_awl",
            Table::DomainAwl => "domain_awl",
        }
    }

    /// Where [`Table::select`] puts the time column.
    fn time_column(self) -> usize {
        match self {
            Table::Connect => 4,
            Table::FromAwl | Table::DomainAwl => 1,
        }
    }

    /// The columns read, with the time column spelled by `time` (its conversion to Unix
    /// seconds in the source's SQL).
    fn select(self, time: impl Fn(&str) -> String) -> String {
        match self {
            Table::Connect => format!(
                "sender_name, sender_domain, src, rcpt, {} FROM connect",
                time("first_seen")
            ),
            Table::FromAwl => format!(
                "src, {}, sender_domain, sender_name FROM from_awl",
                time("last_seen")
            ),
            Table::DomainAwl => {
                format!("src, {}, sender_domain FROM domain_awl", time("last_seen"))
            }
        }
    }
}

/// Rows fetched per round trip.
const BATCH: usize = 5000;

/// An open source database.
enum Reader {
    Postgres {
        client: tokio_postgres::Client,
        /// The time column of the table being read.
        time: usize,
    },
    #[cfg(feature = "sqlite")]
    Sqlite {
        conn: rusqlite::Connection,
        /// The keyset of the table being read: the last rowid returned.
        after: i64,
        select: String,
    },
}

fn pg_error(e: &tokio_postgres::Error) -> ImportError {
    // The server's own message (with its hint) says more than the driver's summary.
    let msg = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string());
    ImportError::Source(format!("sqlgrey's PostgreSQL: {msg}"))
}

#[cfg(feature = "sqlite")]
fn sqlite_error(e: &rusqlite::Error) -> ImportError {
    ImportError::Source(format!("sqlgrey's SQLite database: {e}"))
}

impl Reader {
    async fn open(source: &Source) -> Result<Reader, ImportError> {
        match source {
            Source::Postgres(url) => {
                let mut config: tokio_postgres::Config = url
                    .parse()
                    .map_err(|e| ImportError::Source(format!("bad postgres URL: {e}")))?;
                // Every statement bounded (a lock someone holds on a table must not hold the
                // import forever), after whatever options the URL sets.
                let options = format!(
                    "{} -c statement_timeout=60000",
                    config.get_options().unwrap_or_default()
                );
                config
                    .options(options.trim_start())
                    .connect_timeout(Duration::from_secs(10))
                    .application_name("greygate import");
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| pg_error(&e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Reader::Postgres { client, time: 0 })
            }
            #[cfg(feature = "sqlite")]
            Source::Sqlite(path) => {
                use rusqlite::OpenFlags;
                if !path.is_file() {
                    return Err(ImportError::Source(format!(
                        "no SQLite file at {}",
                        path.display()
                    )));
                }
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| sqlite_error(&e))?;
                // sqlgrey may be writing: wait for its locks rather than fail at once.
                conn.busy_timeout(Duration::from_secs(10))
                    .map_err(|e| sqlite_error(&e))?;
                Ok(Reader::Sqlite {
                    conn,
                    after: 0,
                    select: String::new(),
                })
            }
            #[cfg(not(feature = "sqlite"))]
            Source::Sqlite(_) => Err(ImportError::Source(
                "this greygate was built without SQLite support (cargo feature \"sqlite\")".into(),
            )),
        }
    }

    async fn has_table(&mut self, name: &str) -> Result<bool, ImportError> {
        match self {
            Reader::Postgres { client: c, .. } => {
                let row = c
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                    .await
                    .map_err(|e| pg_error(&e))?;
                Ok(row.get(0))
            }
            #[cfg(feature = "sqlite")]
            Reader::Sqlite { conn, .. } => conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [name],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)
                .map_err(|e| sqlite_error(&e)),
        }
    }

    /// sqlgrey's database version (`config` table), when it keeps one.
    async fn version(&mut self) -> Result<Option<String>, ImportError> {
        if !self.has_table("config").await? {
            return Ok(None);
        }
        let q = "SELECT value FROM config WHERE parameter = 'version'";
        match self {
            Reader::Postgres { client: c, .. } => Ok(c
                .query_opt(q, &[])
                .await
                .map_err(|e| pg_error(&e))?
                .and_then(|r| r.try_get::<_, Option<String>>(0).ok().flatten())),
            #[cfg(feature = "sqlite")]
            Reader::Sqlite { conn, .. } => {
                use rusqlite::OptionalExtension as _;
                Ok(conn
                    .query_row(q, [], |r| r.get::<_, rusqlite::types::Value>(0))
                    .optional()
                    .map_err(|e| sqlite_error(&e))?
                    .map(|v| match v {
                        rusqlite::types::Value::Integer(i) => i.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        other => format!("{other:?}"),
                    }))
            }
        }
    }

    /// Starts reading `table`.
    async fn start(&mut self, table: Table) -> Result<(), ImportError> {
        match self {
            Reader::Postgres { client: c, time } => {
                *time = table.time_column();
                // A cursor in a read-only transaction: the rows arrive in batches, so the
                // import's memory does not grow with the table.
                let select = table.select(|col| {
                    format!(
                        "EXTRACT(EPOCH FROM ({col} AT TIME ZONE current_setting('TimeZone')))::float8"
                    )
                });
                c.batch_execute(&format!(
                    "BEGIN READ ONLY; DECLARE greygate_import NO SCROLL CURSOR FOR SELECT {select}"
                ))
                .await
                .map_err(|e| pg_error(&e))
            }
            #[cfg(feature = "sqlite")]
            Reader::Sqlite { after, select, .. } => {
                *after = 0;
                *select = table.select(str::to_string);
                Ok(())
            }
        }
    }

    /// The next rows of the table being read (empty at its end); a row whose values could
    /// not be taken is `Err` with why.
    async fn next(&mut self) -> Result<Vec<Result<Vec<Cell>, String>>, ImportError> {
        match self {
            Reader::Postgres { client: c, time } => {
                let rows = c
                    .query(&format!("FETCH FORWARD {BATCH} FROM greygate_import"), &[])
                    .await
                    .map_err(|e| pg_error(&e))?;
                Ok(rows.iter().map(|r| pg_cells(r, *time)).collect())
            }
            #[cfg(feature = "sqlite")]
            Reader::Sqlite {
                conn,
                after,
                select,
            } => {
                // Keyset paging by rowid: bounded batches without holding a statement.
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT rowid, {select} WHERE rowid > ?1 ORDER BY rowid LIMIT {BATCH}"
                    ))
                    .map_err(|e| sqlite_error(&e))?;
                let columns = stmt.column_count();
                let mut rows = stmt.query([*after]).map_err(|e| sqlite_error(&e))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(|e| sqlite_error(&e))? {
                    *after = row.get(0).map_err(|e| sqlite_error(&e))?;
                    out.push(sqlite_cells(row, columns));
                }
                Ok(out)
            }
        }
    }

    /// Ends reading the table.
    async fn end(&mut self) -> Result<(), ImportError> {
        match self {
            Reader::Postgres { client: c, .. } => c
                .batch_execute("CLOSE greygate_import; COMMIT")
                .await
                .map_err(|e| pg_error(&e)),
            #[cfg(feature = "sqlite")]
            Reader::Sqlite { .. } => Ok(()),
        }
    }
}

/// A PostgreSQL row as cells: text columns, and the time (epoch seconds) at `time`.
fn pg_cells(row: &tokio_postgres::Row, time: usize) -> Result<Vec<Cell>, String> {
    let mut cells = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let cell = if i == time {
            row.try_get::<_, Option<f64>>(i)
                .map(|v| v.map_or(Cell::Null, Cell::Real))
        } else {
            row.try_get::<_, Option<String>>(i)
                .map(|v| v.map_or(Cell::Null, |s| Cell::Text(s.into_bytes())))
        };
        cells.push(cell.map_err(|e| format!("column {i}: {e}"))?);
    }
    Ok(cells)
}

/// An SQLite row as cells, past its leading rowid.
#[cfg(feature = "sqlite")]
fn sqlite_cells(row: &rusqlite::Row<'_>, columns: usize) -> Result<Vec<Cell>, String> {
    use rusqlite::types::ValueRef;
    (1..columns)
        .map(|i| {
            row.get_ref(i)
                .map(|v| match v {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(n) => Cell::Int(n),
                    ValueRef::Real(f) => Cell::Real(f),
                    ValueRef::Text(t) | ValueRef::Blob(t) => Cell::Text(t.to_vec()),
                })
                .map_err(|e| format!("column {i}: {e}"))
        })
        .collect()
}

/// The sqlgrey database version this import reads (sqlgrey 1.7 and 1.8).
const DB_VERSION: &str = "3";

/// sqlgrey's database, opened and checked: its version and its tables are what this import
/// reads.
pub struct SqlgreyDb {
    db: Reader,
}

impl SqlgreyDb {
    /// Connects (PostgreSQL) or opens read-only (SQLite) and checks the database.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or read, is not sqlgrey's (no `connect` table) or is
    /// of another version.
    pub async fn open(source: &Source) -> Result<SqlgreyDb, ImportError> {
        let mut db = Reader::open(source).await?;
        match db.version().await? {
            Some(v) if v.trim() != DB_VERSION => {
                return Err(ImportError::Source(format!(
                    "sqlgrey database version {v}; this import reads version {DB_VERSION} \
                     (sqlgrey 1.7 and later): let a current sqlgrey start on it once to \
                     upgrade it"
                )));
            }
            _ => {}
        }
        if !db.has_table("connect").await? {
            return Err(ImportError::Source(format!(
                "{} has no connect table: not sqlgrey's database",
                source.shown()
            )));
        }
        Ok(SqlgreyDb { db })
    }
}

/// Reads sqlgrey's tables into the importer.
///
/// # Errors
///
/// The database failed while being read, or the store failed.
pub async fn import(imp: &mut Importer, source: SqlgreyDb) -> Result<(), ImportError> {
    let mut db = source.db;
    // The allow lists first: they also say which connect rows sqlgrey passes at once.
    let mut allow = AllowLists::default();
    for table in [Table::FromAwl, Table::DomainAwl, Table::Connect] {
        if table != Table::Connect && !db.has_table(table.name()).await? {
            imp.note(format!(
                "no {} table: nothing of it to import",
                table.name()
            ));
            continue;
        }
        let t = imp.table(table.name());
        db.start(table).await?;
        let mut n = 0u64;
        loop {
            let rows = db.next().await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                n += 1;
                imp.read(t);
                let what = || format!("row {n}");
                let used = match row {
                    Ok(cells) if table == Table::Connect => {
                        connect_row(imp, t, &cells, &allow).await?
                    }
                    Ok(cells) => awl_row(imp, t, &cells, table, &mut allow)?,
                    Err(why) => Err(Bad::unparseable(why)),
                };
                if let Err(bad) = used {
                    imp.skip(t, bad, what);
                }
            }
        }
        db.end().await?;
    }
    Ok(())
}

/// A `from_awl` or `domain_awl` row: one pass of its client group, and kept for matching
/// `connect` rows.
fn awl_row(
    imp: &mut Importer,
    t: usize,
    cells: &[Cell],
    table: Table,
    allow: &mut AllowLists,
) -> Result<Result<(), Bad>, ImportError> {
    let r = match parse_awl(cells, table == Table::FromAwl) {
        Ok(r) => r,
        Err(bad) => return Ok(Err(bad)),
    };
    if !allow.add(&r) {
        imp.note(format!(
            "more than {MAX_ALLOW_ROWS} allow-list rows: connect rows of senders beyond them              are imported as pending"
        ));
    }
    let group = match super::group_of(imp.engine(), r.net) {
        Ok(g) => g,
        Err(bad) => return Ok(Err(bad)),
    };
    imp.client_pass_each(t, group, clamp_time(r.last_seen, imp.now()))?;
    Ok(Ok(()))
}

/// A `connect` row: a pending triplet with its first sighting, or a passed one when
/// sqlgrey's allow lists let its sender through from its client.
async fn connect_row(
    imp: &mut Importer,
    t: usize,
    cells: &[Cell],
    allow: &AllowLists,
) -> Result<Result<(), Bad>, ImportError> {
    let r = match parse_connect(cells) {
        Ok(r) => r,
        Err(bad) => return Ok(Err(bad)),
    };
    let key = match super::key_of(imp.engine(), r.net, &r.sender, &r.recipient) {
        Ok(k) => k,
        Err(bad) => return Ok(Err(bad)),
    };
    let now = imp.now();
    let first = clamp_time(r.first_seen, now);
    let passed = allow
        .covers(&r)
        .map(|seen| super::passed(imp.engine(), first, clamp_time(seen, now)))
        .filter(|p| imp.engine().triplet_alive(p, now));
    let record = passed.unwrap_or_else(|| super::pending(imp.engine(), first, first));
    imp.triplet(t, key, record).await?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests;
