//! The `memory` backend: the reference store for tests and for sites that accept losing
//! the database on restart. Its records (also the embedded backend's, which keeps them
//! here) may be capped: see [`MemoryStore::with_cap`].

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::hot::{Evicted, HotMap, Inserted, KeyText, SHARDS};
use super::{
    Capacity, Counts, Entry, EntryFilter, EntryKind, ExpireStep, Page, SCAN_EXAMINE, Store,
    StoreError, UpdateFn, cursor,
};
use crate::engine::{ClientRecord, Triplet, TripletKey};

/// Records in process memory only.
pub struct MemoryStore {
    pub(crate) triplets: HotMap<Triplet>,
    pub(crate) clients: HotMap<ClientRecord>,
    /// Most records (triplets and client groups together); 0: no cap.
    max_entries: usize,
    /// Records evicted so far: pending triplets, passed triplets, client groups.
    evicted: [AtomicU64; 3],
    /// The recorded address mode (see `store::mode`).
    mode: std::sync::Mutex<Option<String>>,
}

/// The record just inserted, spared by the eviction it causes unless nothing else is left:
/// a full store keeps taking new triplets (evicting older ones) rather than refusing them.
#[derive(Clone, Copy)]
enum Spare {
    Triplet(Inserted),
    Client(Inserted),
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_cap(0)
    }

    /// A store of at most `max_entries` records (0: no cap). When an insert puts it over,
    /// one record is evicted: the oldest pending triplet (by first sighting), else the
    /// least recently seen passed triplet, else the least recently seen client group, and
    /// only when nothing else is left the record just inserted.
    pub fn with_cap(max_entries: usize) -> Self {
        Self::with_key_text(KeyText::Always, max_entries)
    }

    pub(crate) fn with_key_text(key_text: KeyText, max_entries: usize) -> Self {
        let queued = max_entries > 0;
        MemoryStore {
            triplets: HotMap::with_queue(key_text, queued),
            clients: HotMap::with_queue(key_text, queued),
            max_entries,
            evicted: Default::default(),
            mode: std::sync::Mutex::default(),
        }
    }

    /// [`Store::update_triplet`], done at once.
    pub(crate) fn update_triplet_now(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Option<Triplet> {
        let (old, inserted) = self.triplets.update_tracked(&key.parts(), f);
        if let Some(new) = inserted {
            self.enforce_cap(Some(Spare::Triplet(new)));
        }
        old
    }

    /// [`Store::update_client`], done at once.
    pub(crate) fn update_client_now(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Option<ClientRecord> {
        let (old, inserted) = self.clients.update_tracked(&[client], f);
        if let Some(new) = inserted {
            self.enforce_cap(Some(Spare::Client(new)));
        }
        old
    }

    /// Records held, triplets and client groups together.
    pub(crate) fn len(&self) -> usize {
        self.triplets.len() + self.clients.len()
    }

    /// Evicts records while the store is over its cap: after an insert (run by the
    /// inserting request once its own shard lock is released; an eviction takes a few short
    /// shard locks, one at a time), and after loading a file. Returns how many it evicted.
    fn enforce_cap(&self, spare: Option<Spare>) -> usize {
        let mut n = 0;
        if self.max_entries == 0 {
            return n;
        }
        while self.len() > self.max_entries {
            let Some(kind) = self.evict_one(spare) else {
                break;
            };
            self.evicted[kind].fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        n
    }

    /// Evicts down to the cap (a loaded file held more records); how many went.
    pub(crate) fn shrink_to_cap(&self) -> usize {
        self.enforce_cap(None)
    }

    /// Evicts one record, in the order that protects what matters (see `with_cap`); the
    /// index of its kind in `evicted`, or `None` when nothing was left.
    fn evict_one(&self, spare: Option<Spare>) -> Option<usize> {
        const PENDING: usize = 0;
        const PASSED: usize = 1;
        const CLIENT: usize = 2;
        // Each lookup below is told about the spare only if it is among what it looks at.
        // A triplet insert starts at its own shard, whose lock it just released.
        let (start, pending, passed, client) = match spare {
            Some(Spare::Triplet(new)) => {
                let fp = Some(new.fp);
                let (pending, passed) = if new.pending { (fp, None) } else { (None, fp) };
                (
                    Some(HotMap::<Triplet>::shard_of(new.fp)),
                    pending,
                    passed,
                    None,
                )
            }
            Some(Spare::Client(new)) => (None, None, None, Some(new.fp)),
            None => (None, None, None, None),
        };
        let pending_start = start.unwrap_or_else(|| self.triplets.next_shard());
        if self.triplets.evict_pending(pending_start, pending) {
            return Some(PENDING);
        }
        if self.triplets.evict_kept(start, passed) {
            return Some(PASSED);
        }
        if self.clients.evict_kept(None, client) {
            return Some(CLIENT);
        }
        match spare? {
            Spare::Triplet(new) => self.triplets.evict_fp(new.fp).map(|e| match e {
                Evicted::Pending => PENDING,
                Evicted::Kept => PASSED,
            }),
            Spare::Client(new) => self.clients.evict_fp(new.fp).map(|_| CLIENT),
        }
    }

    /// The cap and what it evicted so far.
    pub(crate) fn capacity(&self) -> Capacity {
        let n = |i: usize| self.evicted[i].load(Ordering::Relaxed);
        Capacity {
            max_entries: self.max_entries as u64,
            evicted_pending: n(0),
            evicted_passed: n(1),
            evicted_clients: n(2),
        }
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

    fn capacity(&self) -> Option<Capacity> {
        Some(MemoryStore::capacity(self))
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

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        Ok(crate::lock(&self.mode).clone())
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        *crate::lock(&self.mode) = Some(mode.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn key(i: usize) -> TripletKey {
        TripletKey {
            client: format!("10.{}.{}.0/24", i >> 8 & 255, i & 255),
            sender: format!("s{i}@example.net"),
            recipient: "r@example.org".into(),
        }
    }

    fn pending(first_seen: u64) -> Triplet {
        Triplet {
            first_seen,
            last_seen: first_seen,
            expires_at: first_seen + 2 * 86_400,
            attempts: 1,
            passes: 0,
            passed: false,
        }
    }

    fn passed(last_seen: u64) -> Triplet {
        Triplet {
            passes: 1,
            passed: true,
            expires_at: last_seen + 35 * 86_400,
            ..pending(last_seen - 600)
        }
    }

    fn client(last_seen: u64) -> ClientRecord {
        ClientRecord {
            passes: 5,
            last_counted: last_seen,
            last_seen,
            expires_at: last_seen + 35 * 86_400,
        }
    }

    fn put(s: &MemoryStore, k: &TripletKey, t: Triplet) {
        s.update_triplet_now(k, &|_| Some(t));
    }

    /// A flood of new triplets into a full store (stepped `now`, one new triplet per
    /// second): the store stays at its cap, every passed triplet and client group stays,
    /// and the pending triplets evicted are the oldest ones.
    #[test]
    fn a_full_store_evicts_pending_oldest_first_and_keeps_the_rest() {
        const CAP: usize = 5_000;
        const FLOOD: usize = 50_000;
        let s = MemoryStore::with_cap(CAP);
        for i in 0..200 {
            put(&s, &key(1_000_000 + i), passed(T0 - 86_400 + i as u64));
        }
        for i in 0..50 {
            s.update_client_now(&format!("192.0.{i}.0/24"), &|_| Some(client(T0)));
        }
        for i in 0..FLOOD {
            put(&s, &key(i), pending(T0 + i as u64));
            assert!(s.len() <= CAP, "over the cap after {i} new triplets");
        }
        let c = s.count();
        assert_eq!(
            (c.triplets_passed, c.clients),
            (200, 50),
            "nothing kept was evicted"
        );
        let kept = CAP - 250;
        assert_eq!(c.triplets_pending, kept as u64);
        let cap = s.capacity();
        assert_eq!(cap.max_entries, CAP as u64);
        assert_eq!(cap.evicted_pending, (FLOOD - kept) as u64);
        assert_eq!((cap.evicted_passed, cap.evicted_clients), (0, 0));
        // The newest `kept` were first seen from `newest` on. Evicting per shard is an
        // approximation of oldest first: nearly all of the newest stay (about 91% here), and
        // nothing much older than them does. With 5 records per shard here, this is the
        // coarsest it gets; larger caps come closer.
        let newest = FLOOD - kept;
        let survivors: Vec<usize> = (0..FLOOD)
            .filter(|&i| s.triplets.get(&key(i).joined()).is_some())
            .collect();
        let among_newest = survivors.iter().filter(|&&i| i >= newest).count();
        assert!(
            among_newest * 100 >= kept * 85,
            "{among_newest} of the newest {kept} survived"
        );
        let oldest = survivors[0];
        assert!(
            oldest >= newest - 2 * kept,
            "a triplet first seen at {oldest} survived"
        );
        // Each queue entry is live here (no triplet passed or expired).
        assert_eq!(s.triplets.queue_stats(), (kept, kept));
    }

    /// With no pending triplet left to evict, passed triplets go before client groups, about
    /// the least recently seen first; a new record is not the one refused while anything
    /// else could go.
    #[test]
    fn without_pending_ones_passed_go_before_clients_least_recently_seen_first() {
        let s = MemoryStore::with_cap(10);
        for i in 0..8 {
            put(&s, &key(i), passed(T0 + i as u64));
        }
        s.update_client_now("c1", &|_| Some(client(T0 + 1)));
        s.update_client_now("c2", &|_| Some(client(T0 + 2)));
        // Over the cap, nothing pending but the newcomer: a passed triplet goes.
        put(&s, &key(100), pending(T0 + 100));
        assert_eq!(s.len(), 10);
        assert_eq!(s.count().triplets_passed, 7);
        assert!(s.triplets.get(&key(100).joined()).is_some());
        // Now there is a pending one to evict: it goes before anything kept.
        put(&s, &key(101), pending(T0 + 101));
        assert!(s.triplets.get(&key(100).joined()).is_none());
        assert!(s.triplets.get(&key(101).joined()).is_some());
        assert_eq!(s.count().triplets_passed, 7);
        // A pending triplet that passes is no longer a candidate of the first kind.
        put(&s, &key(101), passed(T0 + 200));
        put(&s, &key(102), pending(T0 + 102));
        assert!(s.triplets.get(&key(101).joined()).is_some() || s.count().triplets_passed == 7);
        assert_eq!(s.count().clients, 2, "clients go last");
        let cap = s.capacity();
        assert_eq!(
            (cap.evicted_pending, cap.evicted_passed, cap.evicted_clients),
            (1, 2, 0)
        );

        // Client groups and a passed triplet: the triplet goes first, then the least
        // recently seen group; never the newcomer.
        let s = MemoryStore::with_cap(2);
        put(&s, &key(0), passed(T0 + 60));
        s.update_client_now("old", &|_| Some(client(T0)));
        s.update_client_now("new", &|_| Some(client(T0 + 10)));
        assert!(s.triplets.get(&key(0).joined()).is_none());
        assert!(s.clients.get("old").is_some() && s.clients.get("new").is_some());
        s.update_client_now("newer", &|_| Some(client(T0 + 5)));
        assert!(s.clients.get("old").is_none(), "least recently seen");
        assert!(s.clients.get("new").is_some() && s.clients.get("newer").is_some());
        let cap = s.capacity();
        assert_eq!((cap.evicted_passed, cap.evicted_clients), (1, 1));
    }

    /// Records that are not pending go about least recently seen first: among many, the
    /// ones evicted are nearly all from the least recently seen end.
    #[test]
    fn kept_records_go_about_least_recently_seen_first() {
        const CAP: usize = 20_000;
        let s = MemoryStore::with_cap(CAP);
        for i in 0..CAP {
            put(&s, &key(i), passed(T0 + i as u64));
        }
        // 2,000 more passed triplets (no pending one to evict): 2,000 go.
        for i in CAP..CAP + 2_000 {
            put(&s, &key(i), passed(T0 + i as u64));
        }
        assert_eq!(s.len(), CAP);
        let gone_old = (0..2_000)
            .filter(|&i| s.triplets.get(&key(i).joined()).is_none())
            .count();
        assert!(
            gone_old >= 1_500,
            "{gone_old} of the 2,000 least recently seen went"
        );
        assert_eq!(s.capacity().evicted_passed, 2_000);
    }

    /// Queue entries of triplets that passed, were removed or expired are dropped as the
    /// queue is compacted: the queues stay within about twice the pending records.
    #[test]
    fn stale_queue_entries_stay_bounded() {
        let s = MemoryStore::with_cap(1_000_000);
        for round in 0..5u64 {
            for i in 0..20_000 {
                put(&s, &key(i), pending(T0 + round * 10));
            }
            for i in 0..20_000 {
                match i % 3 {
                    0 => put(&s, &key(i), passed(T0 + round * 10 + 5)),
                    1 => {
                        s.triplets.remove(&key(i).joined());
                    }
                    _ => {}
                }
            }
            let (queued, pending_counted) = s.triplets.queue_stats();
            let c = s.count();
            assert_eq!(pending_counted as u64, c.triplets_pending);
            assert_eq!(s.triplets.pending() as u64, c.triplets_pending);
            assert_eq!(s.len() as u64, c.triplets_pending + c.triplets_passed);
            assert!(
                queued <= 2 * pending_counted + 2 * SHARDS * super::super::hot::COMPACT_MIN,
                "round {round}: {queued} queued for {pending_counted} pending"
            );
            // Expire everything pending: their entries go stale too.
            s.expire_now(T0 + round * 10 + 3 * 86_400, usize::MAX);
            assert_eq!(s.triplets.pending(), 0);
            let (queued, _) = s.triplets.queue_stats();
            assert!(
                queued <= SHARDS * super::super::hot::COMPACT_MIN,
                "{queued}"
            );
        }
    }

    /// Without a cap nothing is queued, so records cost what they did before caps.
    #[test]
    fn uncapped_stores_queue_nothing() {
        let s = MemoryStore::new();
        for i in 0..1000 {
            put(&s, &key(i), pending(T0 + i as u64));
        }
        assert_eq!(s.triplets.queue_stats(), (0, 1000));
        assert_eq!(s.capacity().evicted(), 0);
    }
}
