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

use std::collections::{HashMap, hash_map};
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

struct Shard<P> {
    map: FpMap<P>,
    /// The text of every key in `map` (`KeyText::Always` only).
    names: FpMap<Box<str>>,
    /// Changed since the last commit, with the key's text (`None` in the map: removed).
    dirty: FpMap<Box<str>>,
    /// Rows read at start-up, built into `map` in one go by `finish_loading`.
    loading: Vec<(u128, P)>,
}

/// Which keys' text a map keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyText {
    /// Every record's, so records can be listed (the memory backend).
    Always,
    /// A key's text only while its change awaits the group commit (the embedded backend,
    /// whose file holds every key's text).
    WhileDirty,
}

pub(crate) struct HotMap<R: Packed> {
    shards: Box<[Mutex<Shard<R::Packed>>]>,
    // Attackers choose senders and recipients: fingerprints are keyed hashes (SipHash-1-3
    // with 128-bit output, one pass over the key), random per process, so no one can aim
    // for a collision (odds for 10^7 keys: about 10^-25).
    sip_keys: (u64, u64),
    key_text: KeyText,
    sweep_cursor: AtomicUsize,
}

/// A changed key and its value now (`None`: removed).
pub(crate) type Change<R> = (Box<str>, Option<R>);

impl<R: Packed> HotMap<R> {
    pub(crate) fn new(key_text: KeyText) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: FpMap::default(),
                    names: FpMap::default(),
                    dirty: FpMap::default(),
                    loading: Vec::new(),
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
            sweep_cursor: AtomicUsize::new(0),
        }
    }

    fn fingerprint(&self, key: &str) -> u128 {
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

    fn shard(&self, fp: u128) -> std::sync::MutexGuard<'_, Shard<R::Packed>> {
        lock(&self.shards[((fp >> 64) as usize) % SHARDS])
    }

    pub(crate) fn get(&self, key: &str) -> Option<R> {
        let fp = self.fingerprint(key);
        self.shard(fp).map.get(&fp).map(R::unpack)
    }

    /// Queues a record read at start-up (not dirty); `finish_loading` builds the maps.
    pub(crate) fn load(&self, key: &str, value: R) {
        let fp = self.fingerprint(key);
        self.shard(fp).loading.push((fp, value.pack()));
    }

    /// Builds each shard's map from its queued rows in one go: inserting rows in file order
    /// instead jumps across every shard's table and was most of a large store's start-up.
    /// The shards are independent, so every core builds its share (start-up of a large
    /// store is mostly this and the scan).
    pub(crate) fn finish_loading(&self) {
        let build = |shards: &[Mutex<Shard<R::Packed>>]| {
            for shard in shards {
                let mut shard = lock(shard);
                let rows = std::mem::take(&mut shard.loading);
                shard.map.reserve(rows.len());
                shard.map.extend(rows);
            }
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
        let existed = shard.map.remove(&fp).is_some();
        match self.key_text {
            KeyText::Always => {
                shard.names.remove(&fp);
            }
            KeyText::WhileDirty => {
                shard.dirty.entry(fp).or_insert_with(|| key.into());
            }
        }
        existed
    }

    /// Applies `f` to the record of the key whose text is `parts` joined by NUL (one part:
    /// the key itself) and returns the record as it was. The key's text is built only where it is
    /// kept: `names` when a key is new, `dirty` when a record changes.
    pub(crate) fn update(&self, parts: &[&str], f: &dyn Fn(Option<&R>) -> Option<R>) -> Option<R> {
        let fp = self.fingerprint_parts(parts);
        let text = || -> Box<str> { parts.join("\0").into() };
        let mut shard = self.shard(fp);
        let Shard {
            map, names, dirty, ..
        } = &mut *shard;
        // One probe of the map (a cache miss on a large one).
        let (old, changed) = match map.entry(fp) {
            hash_map::Entry::Occupied(mut slot) => {
                let old = R::unpack(slot.get());
                let new = f(Some(&old)).filter(|new| *new != old);
                if let Some(new) = new {
                    *slot.get_mut() = new.pack();
                }
                (Some(old), new.is_some())
            }
            hash_map::Entry::Vacant(slot) => {
                let new = f(None);
                if let Some(new) = new {
                    slot.insert(new.pack());
                    if self.key_text == KeyText::Always {
                        names.insert(fp, text());
                    }
                }
                (None, new.is_some())
            }
        };
        if changed && self.key_text == KeyText::WhileDirty {
            dirty.entry(fp).or_insert_with(text);
        }
        old
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
            let mut shard = lock(&self.shards[i]);
            let Shard { map, names, .. } = &mut *shard;
            scanned += map.len().max(1);
            map.retain(|fp, rec| {
                let keep = R::unpack(rec).expires_at() >= u64::from(now);
                if !keep {
                    step.removed += 1;
                    names.remove(fp);
                }
                keep
            });
            drop(shard);
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
