//! The trust database: one `Store` trait, several backends, one conformance suite.
//!
//! A store keeps two kinds of records, triplets and client groups, and updates each
//! atomically with a pure function supplied by the engine. It never interprets records
//! beyond their `expires_at`.

mod breaker;
pub mod conformance;
pub mod embedded;
mod hot;
pub mod memory;
pub mod mode;
pub mod postgres;
mod postgres_tls;
pub mod redis;
mod spec;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::engine::{ClientRecord, RuntimeEntry, Triplet, TripletKey};

pub use embedded::{EmbeddedReader, EmbeddedStore, Verified, verify};
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use redis::RedisStore;
pub use spec::{Access, RedisAuth, RedisTopology, ServerStore, StoreKind, StoreSpec, check, open};

/// An atomic read-modify-write step: gets the current record (if any) and returns the record
/// to store, or `None` to leave the store as it is. It may run more than once (optimistic
/// backends retry), so it must be pure.
pub type UpdateFn<'a, R> = &'a (dyn Fn(Option<&R>) -> Option<R> + Send + Sync);

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store file {path} is locked by another process (is a greygate daemon running?)")]
    Locked { path: String },
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    #[error("store is opened read-only")]
    ReadOnly,
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store backend error: {0}")]
    Backend(String),
    /// A listing cursor this store did not make (mistyped, cut off, or from another
    /// backend): the caller's mistake, not the store's trouble.
    #[error("not a scan cursor of this store: {0:?}")]
    BadCursor(String),
    /// The embedded file cannot be read as a store (damaged, or not a greygate store).
    #[error("store file {path} cannot be read: {reason}")]
    Corrupt { path: String, reason: String },
    /// The store was written with addresses in another mode (`[store] hash_addresses`,
    /// or another secret): see [`mode`].
    #[error("{0}")]
    AddressMode(String),
}

/// How a store is doing beyond answering requests: the embedded store's writes, and
/// whether a shared store's server answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StoreHealth {
    /// The shared store's server (Redis, PostgreSQL) is unreachable: requests are answered
    /// per `fail_mode` until it answers again.
    #[serde(default)]
    pub server_unreachable: bool,
    /// The last commit failed (a full or failing disk): requests are still answered from
    /// memory, and the changes wait there for a commit that succeeds.
    pub writes_failing: bool,
    /// Commits that failed since the store was opened.
    pub failed_commits: u64,
    /// Changes the last failed commit could not write (0 once a commit succeeds).
    pub pending_changes: u64,
    /// The unreadable file this store was opened in place of: it started empty.
    pub set_aside: Option<SetAside>,
}

/// An unreadable store file, renamed and left untouched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SetAside {
    /// Where the file is now.
    pub path: String,
    /// Why it could not be read.
    pub reason: String,
}

/// Progress of incremental expiry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpireStep {
    /// Records removed by this step.
    pub removed: usize,
    /// True when this step finished a full pass over the store.
    pub cycle_done: bool,
}

/// Record counts by state, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub triplets_pending: u64,
    pub triplets_passed: u64,
    pub clients: u64,
}

/// A store's cap on its records (`[store] max_entries`) and what the cap evicted since the
/// store was opened (only the memory and embedded backends enforce one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Capacity {
    /// Most records (triplets and client groups together); 0: no cap.
    pub max_entries: u64,
    pub evicted_pending: u64,
    pub evicted_passed: u64,
    pub evicted_clients: u64,
}

impl Capacity {
    /// Evictions of every kind.
    pub fn evicted(&self) -> u64 {
        self.evicted_pending + self.evicted_passed + self.evicted_clients
    }
}

/// Which records a scan walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Triplets,
    Clients,
}

/// One stored record with its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    Triplet {
        key: TripletKey,
        record: Triplet,
    },
    Client {
        client: String,
        record: ClientRecord,
    },
}

impl Entry {
    /// The record's `expires_at`: scans leave out entries that died before their `now`.
    pub fn expires_at(&self) -> u64 {
        match self {
            Entry::Triplet { record, .. } => record.expires_at,
            Entry::Client { record, .. } => record.expires_at,
        }
    }
}

/// A page of a scan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// An opaque cursor to continue from (printable ASCII, safe in a URL query without
    /// escaping); `None` when the walk is complete. Only meaningful to the store (and, for
    /// `memory`, the process) that made it.
    pub next: Option<String>,
}

/// Keeps the entries a scan should return (the caller's filter: state, client, sender, ...).
pub type EntryFilter<'a> = &'a (dyn Fn(&Entry) -> bool + Send + Sync);

/// Most records one `scan` call looks at, whatever its `limit`: a selective filter over a
/// large store then yields a short (even empty) page and a cursor, not a long stall.
pub const SCAN_EXAMINE: usize = 2000;

/// A greylisting database backend. Every method is safe to call concurrently; updates of one
/// key are atomic, also across hosts for shared backends.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for logs, e.g. `embedded /var/lib/greygate/greygate.redb`.
    fn describe(&self) -> String;

    /// The records, when this store keeps them all in this process's memory (the memory
    /// and embedded backends): decisions then update them in place.
    fn in_memory(&self) -> Option<&MemoryStore> {
        None
    }

    /// How the store is doing beyond answering: for `/healthz`, stats and metrics.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// The cap on records and its evictions, for a store that enforces one (memory,
    /// embedded); `None` for the shared stores, whose servers bound their own memory.
    fn capacity(&self) -> Option<Capacity> {
        None
    }

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError>;

    /// Applies `f` atomically to the triplet's record; returns the record as it was before.
    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError>;

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError>;

    /// Applies `f` atomically to the client group's record; returns the record as it was before.
    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError>;

    /// Removes records whose `expires_at` is before `now`, scanning about `max_scan`
    /// records: callers step it often so that no single call holds anything for long.
    async fn expire(&self, now: u64, max_scan: usize) -> Result<ExpireStep, StoreError>;

    /// Makes every update so far durable (no-op for stores that write through).
    async fn flush(&self) -> Result<(), StoreError>;

    /// `flush`, leaving nothing in an intermediate form (the embedded store merges its
    /// journal into its tables): at shutdown and after bulk changes. The store stays usable.
    async fn flush_fully(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    async fn counts(&self) -> Result<Counts, StoreError>;

    /// Walks records of `kind` from `cursor` (`None` = start) and returns up to `limit`
    /// entries that `keep` accepts (a `limit` of 0 is taken as 1). It examines at most about [`SCAN_EXAMINE`] records per
    /// call (so a selective filter over a big store returns a short or empty page with a
    /// `next` cursor rather than blocking), never holds locks that block request handling
    /// for long, and does not return records whose `expires_at < now` (dead ones). The order
    /// is stable, so paging with the cursor visits every live record that existed through
    /// the whole walk exactly once (`redis`: at least once, see there). A cursor the store
    /// cannot read is a `StoreError::BadCursor`.
    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError>;

    /// Removes one triplet; true if it existed (a dead record not yet expired away may
    /// count as existing).
    async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError>;

    /// Removes one client group record; true if it existed (as for `remove_triplet`).
    async fn remove_client(&self, client: &str) -> Result<bool, StoreError>;

    /// The address mode recorded in the store (see [`mode`]), if any. No default: a
    /// backend that did not keep it could never refuse keys of another mode.
    async fn address_mode(&self) -> Result<Option<String>, StoreError>;

    /// Records the address mode, durably (callers go through [`mode::claim`]).
    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError>;

    /// The runtime allow/deny entries this store keeps for every daemon that uses it
    /// (`redis`, `postgres`); `None`: the store is this host's own, and the entries stay
    /// in their file.
    fn shared_entries(&self) -> Option<&dyn SharedEntries> {
        None
    }
}

/// Runtime allow/deny entries kept in a store that several daemons share, so that an
/// entry made through any of them applies on all.
///
/// Every change bumps a version number in the same atomic step, so a daemon polls the
/// version alone (one small read) and reads the entries only when it moved. Ids come from
/// the store (a counter or a sequence there), so they are unique across hosts.
#[async_trait]
pub trait SharedEntries: Send + Sync {
    /// The change marker: differs from the last one read whenever an entry was added,
    /// changed or removed since (0 before the first change).
    async fn entries_version(&self) -> Result<u64, StoreError>;

    /// The version, then every entry (expired ones included until someone removes them),
    /// by id. An entry changed between the two reads shows with the older version, so a
    /// poller reads again next time: never a newer version with older entries.
    async fn list_entries(&self) -> Result<(u64, Vec<RuntimeEntry>), StoreError>;

    /// Stores `entry` (its `id` is ignored): a new entry gets the next id and keeps
    /// `added_at`; an existing entry of the same list, target and value keeps its id and
    /// `added_at` and takes the new `expires_at` and `comment`. Returns the entry as
    /// stored, or `None` when it is new and `max` entries exist already.
    async fn put_entry(
        &self,
        entry: &RuntimeEntry,
        max: usize,
    ) -> Result<Option<RuntimeEntry>, StoreError>;

    /// Removes the entries with these ids; returns those that existed.
    async fn remove_entries(&self, ids: &[u64]) -> Result<Vec<RuntimeEntry>, StoreError>;
}

/// What a shared store keeps of an entry beside its id and `added_at`: JSON, written by
/// greygate only (the `redis` backend).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredEntry {
    pub list: crate::engine::ListKind,
    pub target: crate::engine::Target,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

/// Opaque scan cursors: key text may hold any character (NUL joins a triplet's parts), so
/// cursors carry it hex-encoded.
pub(crate) mod cursor {
    use super::StoreError;

    pub(crate) fn hex(bytes: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    pub(crate) fn unhex(s: &str) -> Result<Vec<u8>, StoreError> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let bytes = s.as_bytes();
        if !bytes.len().is_multiple_of(2) {
            return Err(bad(s));
        }
        bytes
            .chunks(2)
            .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| bad(s))
    }

    /// Hex-encoded key text back to text.
    pub(crate) fn unhex_str(s: &str) -> Result<String, StoreError> {
        String::from_utf8(unhex(s)?).map_err(|_| bad(s))
    }

    pub(crate) fn bad(s: &str) -> StoreError {
        StoreError::BadCursor(s.to_string())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn hex_round_trips_and_rejects_junk() {
            let text = "a\0{b}:%ü c";
            assert_eq!(
                super::unhex_str(&super::hex(text.as_bytes())).unwrap(),
                text
            );
            for junk in ["abc", "zz", "AB", "0g"] {
                assert!(super::unhex(junk).is_err(), "{junk}");
            }
        }
    }
}
