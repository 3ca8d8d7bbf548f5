//! The `memory` backend: the reference store for tests and for sites that accept losing
//! the database on restart.

use async_trait::async_trait;

use super::hot::{HotMap, KeyText, SHARDS};
use super::{
    Counts, Entry, EntryFilter, EntryKind, ExpireStep, Page, SCAN_EXAMINE, Store, StoreError,
    UpdateFn, cursor,
};
use crate::engine::{ClientRecord, Triplet, TripletKey};

/// Records in process memory only.
pub struct MemoryStore {
    pub(crate) triplets: HotMap<Triplet>,
    pub(crate) clients: HotMap<ClientRecord>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_key_text(KeyText::Always)
    }

    pub(crate) fn with_key_text(key_text: KeyText) -> Self {
        MemoryStore {
            triplets: HotMap::new(key_text),
            clients: HotMap::new(key_text),
        }
    }

    /// [`Store::update_triplet`], done at once.
    pub(crate) fn update_triplet_now(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Option<Triplet> {
        self.triplets.update(&key.parts(), f)
    }

    /// [`Store::update_client`], done at once.
    pub(crate) fn update_client_now(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Option<ClientRecord> {
        self.clients.update(&[client], f)
    }

    pub(crate) fn expire_now(&self, now: u64, max_scan: usize) -> ExpireStep {
        // Sweep both maps in step; the cycle is done when both have wrapped.
        let t = self.triplets.expire(now, max_scan);
        let c = self.clients.expire(now, max_scan);
        ExpireStep {
            removed: t.removed + c.removed,
            cycle_done: t.cycle_done && c.cycle_done,
        }
    }

    pub(crate) fn count(&self) -> Counts {
        let mut counts = Counts::default();
        self.triplets.for_each(|t| {
            if t.passed {
                counts.triplets_passed += 1;
            } else {
                counts.triplets_pending += 1;
            }
        });
        self.clients.for_each(|_| counts.clients += 1);
        counts
    }

    /// Pages through the maps in (shard, key) order; the cursor is `<shard>.<hex key>` of
    /// the last record looked at. Shards follow the per-process fingerprint keys, so a
    /// cursor is only good in the process that made it (as is the store's content).
    fn scan_now(
        &self,
        kind: EntryKind,
        after: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        let after = after.map(parse_cursor).transpose()?;
        let after = after.as_ref().map(|(i, k)| (*i, k.as_str()));
        let limit = limit.max(1);
        let mut entries = Vec::new();
        let mut take = |entry: Entry| {
            if entry.expires_at() >= now && keep(&entry) {
                entries.push(entry);
            }
            entries.len() < limit
        };
        let last = match kind {
            EntryKind::Triplets => self.triplets.walk(after, SCAN_EXAMINE, &mut |k, record| {
                // Every key here was made by `TripletKey::joined`.
                match crate::engine::TripletKey::split(k) {
                    Some(key) => take(Entry::Triplet { key, record }),
                    None => true,
                }
            }),
            EntryKind::Clients => self.clients.walk(after, SCAN_EXAMINE, &mut |k, record| {
                take(Entry::Client {
                    client: k.to_owned(),
                    record,
                })
            }),
        };
        Ok(Page {
            entries,
            next: last.map(|(i, k)| format_cursor(i, &k)),
        })
    }
}

fn format_cursor(shard: usize, key: &str) -> String {
    format!("{shard}.{}", cursor::hex(key.as_bytes()))
}

fn parse_cursor(s: &str) -> Result<(usize, String), StoreError> {
    let (shard, key) = s.split_once('.').ok_or_else(|| cursor::bad(s))?;
    let shard: usize = shard.parse().map_err(|_| cursor::bad(s))?;
    if shard >= SHARDS {
        return Err(cursor::bad(s));
    }
    Ok((shard, cursor::unhex_str(key)?))
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn in_memory(&self) -> Option<&MemoryStore> {
        Some(self)
    }

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        Ok(self.triplets.get(&key.joined()))
    }

    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        Ok(self.update_triplet_now(key, f))
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.clients.get(client))
    }

    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.update_client_now(client, f))
    }

    async fn expire(&self, now: u64, max_scan: usize) -> Result<ExpireStep, StoreError> {
        Ok(self.expire_now(now, max_scan))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(self.count())
    }

    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        self.scan_now(kind, cursor, limit, now, keep)
    }

    async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError> {
        Ok(self.triplets.remove(&key.joined()))
    }

    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        Ok(self.clients.remove(client))
    }
}
