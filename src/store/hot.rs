//! A sharded in-memory map of records: the memory backend, and the embedded backend's hot state.
//!
//! Many small shards keep every lock short, including an expiry sweep of one shard. The
//! embedded backend turns on dirty tracking so a group commit writes only what changed.
//!
//! Keys are held as 128-bit keyed fingerprints and records in a packed form: at ten million
//! triplets the key text and its allocation were most of the memory (176 bytes per entry,
//! now about 83). The embedded backend keeps the text of a key only while the key is dirty,
//! for the commit (its file has the rest, for scans); the memory backend has nowhere else to
//! find it and keeps it for every record, so that it can list them.
//!
//! With a cap on the number of records (`[store] max_entries`), each shard also keeps its
//! pending triplets in the order they were first seen, so an insert over the cap evicts
//! about the oldest in O(1) amortised, a few short shard locks and no scan: see
//! [`HotMap::evict_pending`]. The counts the cap is checked against are atomics beside the
//! shards.

use std::collections::{HashMap, VecDeque, hash_map};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::engine::record::Record;
use crate::engine::{ClientRecord, Triplet};
use crate::lock;

use super::ExpireStep;

pub(crate) const SHARDS: usize = 1024;

/// A record's in-memory form.
pub(crate) trait Packed: Record {
    type Packed: Copy + Send + 'static;
    fn pack(&self) -> Self::Packed;
    fn unpack(p: &Self::Packed) -> Self;
    /// The first sighting (stored seconds) of a pending triplet: those are evicted first,
    /// the oldest first. `None` for the records a full store keeps longest (passed
    /// triplets, client groups).
    fn pending_since(p: &Self::Packed) -> Option<u32>;
    /// When the record was last seen: of the records kept longest, the least recently seen
    /// go first.
    fn last_seen(p: &Self::Packed) -> u32;
}

/// Unix seconds as `u32` (until 2106); later values saturate, which only shortens a record's
/// life in memory.
fn secs(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// [`Triplet`] in 24 bytes instead of 40.
#[derive(Clone, Copy)]
pub(crate) struct PackedTriplet {
    first_seen: u32,
    last_seen: u32,
    expires_at: u32,
    attempts: u32,
    passes: u32,
    passed: bool,
}

impl Packed for Triplet {
    type Packed = PackedTriplet;
    fn pack(&self) -> PackedTriplet {
        PackedTriplet {
            first_seen: secs(self.first_seen),
            last_seen: secs(self.last_seen),
            expires_at: secs(self.expires_at),
            attempts: self.attempts,
            passes: self.passes,
            passed: self.passed,
        }
    }
    fn unpack(p: &PackedTriplet) -> Self {
        Triplet {
            first_seen: p.first_seen.into(),
            last_seen: p.last_seen.into(),
            expires_at: p.expires_at.into(),
            attempts: p.attempts,
            passes: p.passes,
            passed: p.passed,
        }
    }
    fn pending_since(p: &PackedTriplet) -> Option<u32> {
        (!p.passed).then_some(p.first_seen)
    }
    fn last_seen(p: &PackedTriplet) -> u32 {
        p.last_seen
    }
}

/// [`ClientRecord`] in 16 bytes instead of 32.
#[derive(Clone, Copy)]
pub(crate) struct PackedClient {
    passes: u32,
    last_counted: u32,
    last_seen: u32,
    expires_at: u32,
}

impl Packed for ClientRecord {
    type Packed = PackedClient;
    fn pack(&self) -> PackedClient {
        PackedClient {
            passes: self.passes,
            last_counted: secs(self.last_counted),
            last_seen: secs(self.last_seen),
            expires_at: secs(self.expires_at),
        }
    }
    fn unpack(p: &PackedClient) -> Self {
        ClientRecord {
            passes: p.passes,
            last_counted: p.last_counted.into(),
            last_seen: p.last_seen.into(),
            expires_at: p.expires_at.into(),
        }
    }
    fn pending_since(_: &PackedClient) -> Option<u32> {
        None
    }
    fn last_seen(p: &PackedClient) -> u32 {
        p.last_seen
    }
}

/// The shard maps are keyed by fingerprints that are already keyed hashes: their low 64
/// bits serve as the map's hash as they are.
#[derive(Default)]
struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type FpMap<V> = HashMap<u128, V, BuildHasherDefault<FingerprintHasher>>;

/// A shard's pending triplets in the order they were first seen (the oldest in front), as
/// eviction candidates. An entry is not removed when its record passes, is removed or
/// expires: it goes stale, and stale entries are dropped when they reach the front or when
/// the queue is compacted ([`Shard::compact_at`]). An entry is live while the map holds a
/// pending record of its key first seen at its `first_seen`.
enum Queue {
    /// Fingerprints (16 bytes): the memory backend's `names` has every key's text.
    Fp(VecDeque<(u32, [u64; 2])>),
    /// Key text: the embedded backend must name an evicted record's row to delete it at
    /// the next commit, and keeps no other text of a committed record.
    Text(VecDeque<(u32, Box<str>)>),
}

impl Queue {
    fn new(key_text: KeyText) -> Self {
        match key_text {
            KeyText::Always => Queue::Fp(VecDeque::new()),
            KeyText::WhileDirty => Queue::Text(VecDeque::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Queue::Fp(q) => q.len(),
            Queue::Text(q) => q.len(),
        }
    }

    fn push(&mut self, first_seen: u32, fp: u128, text: impl FnOnce() -> Box<str>) {
        match self {
            Queue::Fp(q) => q.push_back((first_seen, split(fp))),
            Queue::Text(q) => q.push_back((first_seen, text())),
        }
    }

    /// The front entry's first sighting and fingerprint.
    fn front(&self, fingerprint: impl Fn(&str) -> u128) -> Option<(u32, u128)> {
        match self {
            Queue::Fp(q) => q.front().map(|&(t, fp)| (t, join(fp))),
            Queue::Text(q) => q.front().map(|(t, key)| (*t, fingerprint(key))),
        }
    }

    /// Drops the front entry, handing back its key text if it has one.
    fn pop_front(&mut self) -> Option<Box<str>> {
        match self {
            Queue::Fp(q) => {
                q.pop_front();
                None
            }
            Queue::Text(q) => q.pop_front().map(|(_, key)| key),
        }
    }

    fn retain(&mut self, fingerprint: impl Fn(&str) -> u128, keep: impl Fn(u32, u128) -> bool) {
        match self {
            Queue::Fp(q) => q.retain(|&(t, fp)| keep(t, join(fp))),
            Queue::Text(q) => q.retain(|(t, key)| keep(*t, fingerprint(key))),
        }
    }

    fn shrink(&mut self) {
        match self {
            Queue::Fp(q) => q.shrink_to_fit(),
            Queue::Text(q) => q.shrink_to_fit(),
        }
    }
}

// A fingerprint as two words: a `u128` would align queue entries to 16 bytes (32 each).
fn split(fp: u128) -> [u64; 2] {
    [fp as u64, (fp >> 64) as u64]
}

fn join(w: [u64; 2]) -> u128 {
    u128::from(w[0]) | u128::from(w[1]) << 64
}

struct Shard<P> {
    map: FpMap<P>,
    /// The text of every key in `map` (`KeyText::Always` only).
    names: FpMap<Box<str>>,
    /// Changed since the last commit, with the key's text (`None` in the map: removed).
    dirty: FpMap<Box<str>>,
    /// Rows read at start-up, built into `map` in one go by `finish_loading`.
    loading: Vec<(u128, P)>,
    /// The pending rows among them with their text (for the queue), in file order.
    loading_pending: Vec<(u32, u128, Box<str>)>,
    /// Pending records of `map`, for eviction.
    queue: Queue,
    /// Pending records in `map`.
    pending: usize,
    /// The queue is compacted when it grows past this: twice its live length after the
    /// last compaction, so a compaction (linear in the queue) comes at most once per as
    /// many pushes or stale entries as it looked at, and stale entries never outnumber
    /// live ones by much.
    compact_at: usize,
}

/// Fewest entries a shard's queue may hold before it is compacted.
pub(crate) const COMPACT_MIN: usize = 32;

/// Which keys' text a map keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyText {
    /// Every record's, so records can be listed (the memory backend).
    Always,
    /// A key's text only while its change awaits the group commit (the embedded backend,
    /// whose file holds every key's text), and for pending records while the store has a
    /// cap (to delete an evicted one's row).
    WhileDirty,
}

/// Which records an eviction took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    Pending,
    /// A passed triplet or a client group: what a full store keeps longest.
    Kept,
}

pub(crate) struct HotMap<R: Packed> {
    shards: Box<[Mutex<Shard<R::Packed>>]>,
    // Attackers choose senders and recipients: fingerprints are keyed hashes (SipHash-1-3
    // with 128-bit output, one pass over the key), random per process, so no one can aim
    // for a collision (odds for 10^7 keys: about 10^-25).
    sip_keys: (u64, u64),
    key_text: KeyText,
    /// Whether pending records are queued for eviction (the store has a cap). Without one,
    /// nothing is queued and a record costs what it did before caps existed.
    queued: bool,
    sweep_cursor: AtomicUsize,
    /// The second shard an eviction looks at (see [`HotMap::evict_pending`]).
    evict_cursor: AtomicUsize,
    /// Records in the map, all shards together: the cap is checked on every insert, so
    /// summing shards is out.
    len: AtomicUsize,
    /// Pending records, all shards together.
    pending: AtomicUsize,
    /// Evicted records whose rows the embedded file may still hold and whose key text
    /// memory does not have (passed triplets, client groups): the next commit finds them
    /// by walking the table. Only the embedded backend gathers them.
    orphans: Mutex<Vec<u128>>,
}

/// A record an update inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Inserted {
    pub(crate) fp: u128,
    /// It is pending (an eviction candidate of the first kind).
    pub(crate) pending: bool,
}

/// A changed key and its value now (`None`: removed).
pub(crate) type Change<R> = (Box<str>, Option<R>);

impl<R: Packed> HotMap<R> {
    #[cfg(test)]
    pub(crate) fn new(key_text: KeyText) -> Self {
        Self::with_queue(key_text, false)
    }

    /// A map that queues pending records for eviction when `queued` (the store has a cap).
    pub(crate) fn with_queue(key_text: KeyText, queued: bool) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: FpMap::default(),
                    names: FpMap::default(),
                    dirty: FpMap::default(),
                    loading: Vec::new(),
                    loading_pending: Vec::new(),
                    queue: Queue::new(key_text),
                    pending: 0,
                    compact_at: COMPACT_MIN,
                })
            })
            .collect();
        HotMap {
            shards,
            // Two unpredictable words from std's per-process random hash keys.
            sip_keys: (
                RandomState::new().hash_one(0x9e37_79b9_u64),
                RandomState::new().hash_one(0x7f4a_7c15_u64),
            ),
            key_text,
            queued,
            sweep_cursor: AtomicUsize::new(0),
            evict_cursor: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            orphans: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn fingerprint(&self, key: &str) -> u128 {
        self.fingerprint_parts(&[key])
    }

    /// The fingerprint of `parts` joined by NUL (a triplet key's parts, see
    /// [`TripletKey::joined`](crate::engine::TripletKey::joined)), without joining them.
    fn fingerprint_parts(&self, parts: &[&str]) -> u128 {
        let mut h = SipHasher13::new_with_keys(self.sip_keys.0, self.sip_keys.1);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                h.write(b"\0");
            }
            h.write(part.as_bytes());
        }
        h.finish128().as_u128()
    }

    /// The shard a fingerprint lives in.
    pub(crate) fn shard_of(fp: u128) -> usize {
        ((fp >> 64) as usize) % SHARDS
    }

    fn shard(&self, fp: u128) -> std::sync::MutexGuard<'_, Shard<R::Packed>> {
        lock(&self.shards[Self::shard_of(fp)])
    }

    /// The next shard of the eviction cursor.
    pub(crate) fn next_shard(&self) -> usize {
        self.evict_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS
    }

    /// Records held.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Pending records held.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn get(&self, key: &str) -> Option<R> {
        let fp = self.fingerprint(key);
        self.shard(fp).map.get(&fp).map(R::unpack)
    }

    /// Queues a record read at start-up (not dirty); `finish_loading` builds the maps.
    pub(crate) fn load(&self, key: &str, value: R) {
        let fp = self.fingerprint(key);
        let packed = value.pack();
        let mut shard = self.shard(fp);
        shard.loading.push((fp, packed));
        if self.queued
            && let Some(first_seen) = R::pending_since(&packed)
        {
            let text = match self.key_text {
                KeyText::Always => Box::default(),
                KeyText::WhileDirty => key.into(),
            };
            shard.loading_pending.push((first_seen, fp, text));
        }
    }

    /// Builds each shard's map from its queued rows in one go: inserting rows in file order
    /// instead jumps across every shard's table and was most of a large store's start-up.
    /// The shards are independent, so every core builds its share (start-up of a large
    /// store is mostly this and the scan). Pending records join their shard's eviction
    /// queue oldest first.
    pub(crate) fn finish_loading(&self) {
        let build = |shards: &[Mutex<Shard<R::Packed>>]| {
            let (mut records, mut pending) = (0, 0);
            for shard in shards {
                let mut shard = lock(shard);
                let shard = &mut *shard;
                let rows = std::mem::take(&mut shard.loading);
                // Counted whether or not they are queued: removals and expiry count down.
                shard.pending += rows
                    .iter()
                    .filter(|(_, p)| R::pending_since(p).is_some())
                    .count();
                shard.map.reserve(rows.len());
                shard.map.extend(rows);
                let mut queued = std::mem::take(&mut shard.loading_pending);
                queued.sort_by_key(|&(first_seen, ..)| first_seen);
                shard.compact_at = (2 * queued.len()).max(COMPACT_MIN);
                for (first_seen, fp, text) in queued {
                    shard.queue.push(first_seen, fp, || text);
                }
                records += shard.map.len();
                pending += shard.pending;
            }
            self.len.fetch_add(records, Ordering::Relaxed);
            self.pending.fetch_add(pending, Ordering::Relaxed);
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let per = self.shards.len().div_ceil(threads);
        std::thread::scope(|s| {
            for chunk in self.shards.chunks(per) {
                s.spawn(move || build(chunk));
            }
        });
    }

    /// Removes `key`'s record, if any, and records that it is gone, so the next flush
    /// deletes it on disk (also when memory had forgotten it already: its row may remain).
    /// True if memory held a record.
    pub(crate) fn remove(&self, key: &str) -> bool {
        let fp = self.fingerprint(key);
        let mut shard = self.shard(fp);
        let existed = self.forget(&mut shard, fp).is_some();
        if self.key_text == KeyText::WhileDirty {
            shard.dirty.entry(fp).or_insert_with(|| key.into());
        }
        existed
    }

    /// Takes `fp`'s record out of the shard and out of the counts.
    fn forget(&self, shard: &mut Shard<R::Packed>, fp: u128) -> Option<R::Packed> {
        let old = shard.map.remove(&fp)?;
        shard.names.remove(&fp);
        self.len.fetch_sub(1, Ordering::Relaxed);
        if R::pending_since(&old).is_some() {
            self.left_pending(shard, 1);
        }
        Some(old)
    }

    /// `n` records of the shard stopped being pending (their queue entries went stale).
    fn left_pending(&self, shard: &mut Shard<R::Packed>, n: usize) {
        shard.pending -= n;
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// Compacts the shard's queue once it has grown past `compact_at` (see there).
    fn maybe_compact(&self, shard: &mut Shard<R::Packed>) {
        if shard.queue.len() <= shard.compact_at {
            return;
        }
        let Shard { map, queue, .. } = shard;
        queue.retain(
            |key| self.fingerprint(key),
            |first_seen, fp| map.get(&fp).and_then(R::pending_since) == Some(first_seen),
        );
        if queue.len() < shard.compact_at / 4 {
            queue.shrink();
        }
        shard.compact_at = (2 * queue.len()).max(COMPACT_MIN);
    }

    /// `update_tracked` without what it inserted.
    #[cfg(test)]
    pub(crate) fn update(&self, parts: &[&str], f: &dyn Fn(Option<&R>) -> Option<R>) -> Option<R> {
        self.update_tracked(parts, f).0
    }

    /// Applies `f` to the record of the key whose text is `parts` joined by NUL (one part:
    /// the key itself) and returns the record as it was, and what it inserted if it did (a
    /// new record: the store may be over its cap now). The key's text is built only where it
    /// is kept: `names` when a key is new, `dirty` when a record changes, the eviction queue
    /// (embedded backend) when a record becomes pending.
    pub(crate) fn update_tracked(
        &self,
        parts: &[&str],
        f: &dyn Fn(Option<&R>) -> Option<R>,
    ) -> (Option<R>, Option<Inserted>) {
        let fp = self.fingerprint_parts(parts);
        let text = || -> Box<str> { parts.join("\0").into() };
        let mut shard = self.shard(fp);
        let shard = &mut *shard;
        // One probe of the map (a cache miss on a large one).
        let (old, changed, pending) = match shard.map.entry(fp) {
            hash_map::Entry::Occupied(mut slot) => {
                let old = R::unpack(slot.get());
                let new = f(Some(&old)).filter(|new| *new != old);
                let mut pending = None;
                if let Some(new) = new {
                    let packed = new.pack();
                    pending = Some((R::pending_since(slot.get()), R::pending_since(&packed)));
                    *slot.get_mut() = packed;
                }
                (Some(old), new.is_some(), pending)
            }
            hash_map::Entry::Vacant(slot) => {
                let new = f(None);
                let mut pending = None;
                if let Some(new) = new {
                    let packed = new.pack();
                    pending = Some((None, R::pending_since(&packed)));
                    slot.insert(packed);
                    self.len.fetch_add(1, Ordering::Relaxed);
                    if self.key_text == KeyText::Always {
                        shard.names.insert(fp, text());
                    }
                }
                (None, new.is_some(), pending)
            }
        };
        match pending {
            // Pending before and after, since the same first sighting: its entry stands.
            Some((was, now)) if was != now => {
                if was.is_some() {
                    self.left_pending(shard, 1);
                }
                if let Some(first_seen) = now {
                    shard.pending += 1;
                    self.pending.fetch_add(1, Ordering::Relaxed);
                    if self.queued {
                        shard.queue.push(first_seen, fp, text);
                    }
                }
                if self.queued {
                    self.maybe_compact(shard);
                }
            }
            _ => {}
        }
        if changed && self.key_text == KeyText::WhileDirty {
            shard.dirty.entry(fp).or_insert_with(text);
        }
        let inserted = match (&old, pending) {
            (None, Some((_, now))) => Some(Inserted {
                fp,
                pending: now.is_some(),
            }),
            _ => None,
        };
        (old, inserted)
    }

    /// Evicts an old pending record, about the oldest by first sighting: the front of one
    /// of two shard queues, the inserting shard's (`start`, whose lock the insert just
    /// released) and the next shard of a rotating cursor, whichever was first seen earlier.
    /// Each queue is in first-sighting order and keys spread evenly over the shards, so a
    /// front is about as old as the oldest of all; taking the older of two makes shards
    /// whose fronts lag behind catch up (the cursor reaches every shard within `SHARDS`
    /// evictions), where one shard alone would let the fronts drift apart as its own
    /// inserts come and go. `spare` (the record whose insert put the store over its cap,
    /// when it is pending) is left alone. Stale entries met on the way are dropped, each
    /// once: O(1) amortised, three short shard locks. Only when both queues are empty
    /// (pending records fewer than about the shards) does it look at every shard. False
    /// when no pending record other than `spare` was found.
    pub(crate) fn evict_pending(&self, start: usize, spare: Option<u128>) -> bool {
        // Only the spare (or nothing) left: looking further is a scan for nothing.
        let only_spare = || self.pending() <= usize::from(spare.is_some());
        if only_spare() {
            return false;
        }
        let other = self.next_shard();
        let age = |i: usize| {
            let mut guard = lock(&self.shards[i]);
            self.live_front(&mut guard, spare)
                .map(|(first_seen, _)| first_seen)
        };
        let first = match (age(start), age(other)) {
            (Some(a), Some(b)) if b < a => other,
            (None, Some(_)) => other,
            _ => start,
        };
        if self.evict_front(first, spare) {
            return true;
        }
        // Both queues were empty: pending records are few (fewer than shards, about), so
        // the oldest front of all is worth a look at every shard.
        for _ in 0..2 {
            if only_spare() {
                return false;
            }
            let oldest = (0..SHARDS)
                .filter_map(|i| age(i).map(|first_seen| (first_seen, i)))
                .min();
            if let Some((_, i)) = oldest
                && self.evict_front(i, spare)
            {
                return true;
            }
        }
        false
    }

    /// The first live entry of the shard's queue (stale ones before it are dropped), unless
    /// it is `spare`'s.
    fn live_front(&self, shard: &mut Shard<R::Packed>, spare: Option<u128>) -> Option<(u32, u128)> {
        while let Some((first_seen, fp)) = shard.queue.front(|key| self.fingerprint(key)) {
            if shard.map.get(&fp).and_then(R::pending_since) == Some(first_seen) {
                return (spare != Some(fp)).then_some((first_seen, fp));
            }
            shard.queue.pop_front();
        }
        None
    }

    /// Evicts the record at the front of shard `i`'s queue; false if there is none (or it is
    /// `spare`'s).
    fn evict_front(&self, i: usize, spare: Option<u128>) -> bool {
        let mut guard = lock(&self.shards[i]);
        let shard = &mut *guard;
        let Some((_, fp)) = self.live_front(shard, spare) else {
            return false;
        };
        let text = shard.queue.pop_front();
        self.evict_locked(shard, fp, text);
        true
    }

    /// Evicts a record that is not pending (a passed triplet, a client group), about the
    /// least recently seen: the least recently seen of two shards, `start`'s (`None`: the
    /// next shard of the rotating cursor) and the cursor's next one, other than `spare` (the
    /// record just inserted, when it is one of those). It looks at every record of those
    /// shards: this happens only when nothing pending is left to evict, a store whose cap is
    /// too small for the records it must keep.
    pub(crate) fn evict_kept(&self, start: Option<usize>, spare: Option<u128>) -> bool {
        let none_left =
            || self.len().saturating_sub(self.pending()) <= usize::from(spare.is_some());
        if none_left() {
            return false;
        }
        let start = start.unwrap_or_else(|| self.next_shard());
        let least_recent = |i: usize| {
            let shard = lock(&self.shards[i]);
            shard
                .map
                .iter()
                .filter(|(fp, p)| R::pending_since(p).is_none() && spare != Some(**fp))
                .min_by_key(|(_, p)| R::last_seen(p))
                .map(|(fp, p)| (R::last_seen(p), *fp))
        };
        let other = self.next_shard();
        let victim = match (least_recent(start), least_recent(other)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some((_, fp)) = victim
            && self.evict_kept_fp(fp)
        {
            return true;
        }
        // Neither shard had one: such records are few (fewer than shards, about), so the
        // least recently seen of all is worth a look at every shard.
        for _ in 0..2 {
            if none_left() {
                return false;
            }
            let least = (0..SHARDS).filter_map(least_recent).min();
            if let Some((_, fp)) = least
                && self.evict_kept_fp(fp)
            {
                return true;
            }
        }
        false
    }

    /// Evicts `fp` if memory holds it and it is not pending (it may have changed since it
    /// was chosen, between two locks).
    fn evict_kept_fp(&self, fp: u128) -> bool {
        let mut guard = self.shard(fp);
        if guard
            .map
            .get(&fp)
            .is_none_or(|p| R::pending_since(p).is_some())
        {
            return false;
        }
        self.evict_locked(&mut guard, fp, None);
        true
    }

    /// Evicts `fp` itself (the last resort: nothing else was left).
    pub(crate) fn evict_fp(&self, fp: u128) -> Option<Evicted> {
        let mut guard = self.shard(fp);
        let was = *guard.map.get(&fp)?;
        self.evict_locked(&mut guard, fp, None);
        Some(match R::pending_since(&was) {
            Some(_) => Evicted::Pending,
            None => Evicted::Kept,
        })
    }

    /// Takes `fp`'s record out of memory as a removal would. The embedded backend's next
    /// commit deletes its row: by its key text (`text`, or the text of a change already
    /// awaiting the commit), else by fingerprint ([`HotMap::take_orphans`]).
    fn evict_locked(&self, shard: &mut Shard<R::Packed>, fp: u128, text: Option<Box<str>>) {
        self.forget(shard, fp);
        if self.key_text == KeyText::WhileDirty {
            match (shard.dirty.entry(fp), text) {
                (hash_map::Entry::Occupied(_), _) => {}
                (hash_map::Entry::Vacant(slot), Some(text)) => {
                    slot.insert(text);
                }
                (hash_map::Entry::Vacant(_), None) => lock(&self.orphans).push(fp),
            }
        }
    }

    /// Takes the fingerprints of evicted records whose rows must be found by walking the
    /// file (see `orphans`).
    pub(crate) fn take_orphans(&self) -> Vec<u128> {
        std::mem::take(&mut *lock(&self.orphans))
    }

    /// Puts orphans back after a failed commit.
    pub(crate) fn restore_orphans(&self, fps: Vec<u128>) {
        lock(&self.orphans).extend(fps);
    }

    /// Whether memory holds a record of `fp`.
    pub(crate) fn contains_fp(&self, fp: u128) -> bool {
        self.shard(fp).map.contains_key(&fp)
    }

    /// Sweeps whole shards from where the last call stopped until about `max_scan` records
    /// were looked at. Expired records leave memory only: their rows on disk carry their
    /// own `expires_at`, and the embedded store deletes them with a sweep of its own.
    pub(crate) fn expire(&self, now: u64, max_scan: usize) -> ExpireStep {
        let mut step = ExpireStep::default();
        let mut scanned = 0;
        let now = secs(now);
        for _ in 0..SHARDS {
            let i = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
            let mut guard = lock(&self.shards[i]);
            let shard = &mut *guard;
            let Shard { map, names, .. } = shard;
            scanned += map.len().max(1);
            let (mut removed, mut pending) = (0, 0);
            map.retain(|fp, rec| {
                let keep = R::unpack(rec).expires_at() >= u64::from(now);
                if !keep {
                    removed += 1;
                    pending += usize::from(R::pending_since(rec).is_some());
                    names.remove(fp);
                }
                keep
            });
            step.removed += removed;
            self.len.fetch_sub(removed, Ordering::Relaxed);
            if pending > 0 {
                self.left_pending(shard, pending);
            }
            if self.queued {
                self.maybe_compact(shard);
            }
            drop(guard);
            if i == SHARDS - 1 {
                step.cycle_done = true;
                break;
            }
            if scanned >= max_scan {
                break;
            }
        }
        step
    }

    /// Takes the changes since the last call.
    pub(crate) fn take_dirty(&self) -> Vec<Change<R>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let Shard { map, dirty, .. } = &mut *shard;
            out.reserve(dirty.len());
            // Drained, not replaced: the table keeps its size for the next interval's
            // changes instead of growing again from nothing every commit.
            out.extend(
                dirty
                    .drain()
                    .map(|(fp, key)| (key, map.get(&fp).map(R::unpack))),
            );
        }
        out
    }

    /// Puts changes back after a failed write, unless newer ones are pending already.
    pub(crate) fn restore_dirty(&self, changes: Vec<Change<R>>) {
        for (key, _) in changes {
            let fp = self.fingerprint(&key);
            self.shard(fp).dirty.entry(fp).or_insert(key);
        }
    }

    /// Walks the records in (shard, key) order, starting after position `after`, giving
    /// `visit` each key and record until it returns false or `budget` records were looked
    /// at. Returns the position of the last record looked at, or `None` when the walk passed
    /// the last shard. Keys never change shards, so the order is stable for this map's life.
    /// Needs `KeyText::Always`.
    pub(crate) fn walk(
        &self,
        after: Option<(usize, &str)>,
        budget: usize,
        visit: &mut dyn FnMut(&str, R) -> bool,
    ) -> Option<(usize, String)> {
        debug_assert_eq!(self.key_text, KeyText::Always);
        let (first, mut from) = after.map_or((0, None), |(i, k)| (i, Some(k)));
        let mut seen = 0;
        for i in first..SHARDS {
            // Copied out under the lock and sorted outside it: requests wait for a copy of
            // one small shard at most.
            let mut rows: Vec<(Box<str>, R::Packed)> = {
                let shard = lock(&self.shards[i]);
                shard
                    .names
                    .iter()
                    .filter(|(_, name)| from.is_none_or(|f| &***name > f))
                    .filter_map(|(fp, name)| Some((name.clone(), *shard.map.get(fp)?)))
                    .collect()
            };
            from = None;
            rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (name, packed) in rows {
                seen += 1;
                if !visit(&name, R::unpack(&packed)) || seen >= budget {
                    return Some((i, name.into()));
                }
            }
        }
        None
    }

    /// Calls `f` on every record, one shard lock at a time.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&R)) {
        for shard in self.shards.iter() {
            for v in lock(shard).map.values() {
                f(&R::unpack(v));
            }
        }
    }

    /// Entries in the eviction queues, live and stale, and the pending records the shards
    /// count: tests check both against the maps.
    #[cfg(test)]
    pub(crate) fn queue_stats(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(q, p), shard| {
            let shard = lock(shard);
            (q + shard.queue.len(), p + shard.pending)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key given in parts is the key joined by NUL: updates by parts and reads, removals
    /// and scans by the joined text meet the same record.
    #[test]
    fn parts_fingerprint_as_their_joined_text() {
        let map: HotMap<Triplet> = HotMap::new(KeyText::Always);
        for parts in [
            ["192.0.2.0/24", "a@example.net", "b@example.org"],
            ["", "", ""],
            ["spf:example.net", "<>", "x"],
        ] {
            let joined = parts.join("\0");
            assert_eq!(map.fingerprint_parts(&parts), map.fingerprint(&joined));
            let t = Triplet {
                first_seen: 10,
                last_seen: 10,
                expires_at: 100,
                attempts: 1,
                passes: 0,
                passed: false,
            };
            assert!(map.update(&parts, &|_| Some(t)).is_none());
            assert_eq!(map.get(&joined), Some(t));
            let mut names = Vec::new();
            map.walk(None, usize::MAX, &mut |k, _| {
                names.push(k.to_owned());
                true
            });
            assert!(names.contains(&joined), "{names:?}");
            assert!(map.remove(&joined));
            assert_eq!(map.get(&joined), None);
        }
        // Different splits of the same bytes are different keys only through the NULs.
        assert_ne!(
            map.fingerprint_parts(&["ab", "c"]),
            map.fingerprint_parts(&["a", "bc"])
        );
    }

    /// The embedded backend's dirty keys carry the joined text, for the commit.
    #[test]
    fn dirty_keys_are_joined_text() {
        let map: HotMap<ClientRecord> = HotMap::new(KeyText::WhileDirty);
        let c = ClientRecord {
            passes: 1,
            last_counted: 5,
            last_seen: 5,
            expires_at: 50,
        };
        map.update(&["a", "b"], &|_| Some(c));
        let dirty = map.take_dirty();
        assert_eq!(dirty.len(), 1);
        assert_eq!(&*dirty[0].0, "a\0b");
        assert_eq!(dirty[0].1, Some(c));
    }
}
