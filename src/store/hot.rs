//! A sharded in-memory map of records: the memory backend, and the embedded backend's hot state.
//!
//! Many small shards keep every lock short, including an expiry sweep of one shard. The
//! embedded backend turns on dirty tracking so a group commit writes only what changed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::record::Record;

use super::ExpireStep;

const SHARDS: usize = 1024;

struct Shard<R> {
    map: HashMap<Box<str>, R>,
    dirty: HashSet<Box<str>>,
}

pub(crate) struct HotMap<R> {
    shards: Box<[Mutex<Shard<R>>]>,
    // Attackers choose senders and recipients: shard choice uses a randomly keyed hash too.
    hasher: RandomState,
    track_dirty: bool,
    sweep_cursor: AtomicUsize,
}

/// A changed key and its value now (`None`: removed).
pub(crate) type Change<R> = (Box<str>, Option<R>);

impl<R: Record> HotMap<R> {
    pub(crate) fn new(track_dirty: bool) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::new(),
                    dirty: HashSet::new(),
                })
            })
            .collect();
        HotMap {
            shards,
            hasher: RandomState::new(),
            track_dirty,
            sweep_cursor: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard<R>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        lock(&self.shards[i])
    }

    pub(crate) fn get(&self, key: &str) -> Option<R> {
        self.shard(key).map.get(key).copied()
    }

    /// Loads a record without marking it dirty (start-up from disk).
    pub(crate) fn load(&self, key: &str, value: R) {
        self.shard(key).map.insert(key.into(), value);
    }

    /// Records that `key` is gone, so the next flush deletes it on disk.
    pub(crate) fn mark_removed(&self, key: &str) {
        let mut shard = self.shard(key);
        shard.map.remove(key);
        if self.track_dirty {
            shard.dirty.insert(key.into());
        }
    }

    pub(crate) fn update(&self, key: &str, f: &dyn Fn(Option<&R>) -> Option<R>) -> Option<R> {
        let mut shard = self.shard(key);
        let old = shard.map.get(key).copied();
        if let Some(new) = f(old.as_ref())
            && Some(new) != old
        {
            shard.map.insert(key.into(), new);
            if self.track_dirty {
                shard.dirty.insert(key.into());
            }
        }
        old
    }

    /// Sweeps whole shards from where the last call stopped until about `max_scan` records
    /// were looked at.
    pub(crate) fn expire(&self, now: u64, max_scan: usize) -> ExpireStep {
        let mut step = ExpireStep::default();
        let mut scanned = 0;
        for _ in 0..SHARDS {
            let i = self.sweep_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
            let mut shard = lock(&self.shards[i]);
            let Shard { map, dirty } = &mut *shard;
            scanned += map.len().max(1);
            map.retain(|key, rec| {
                let keep = rec.expires_at() >= now;
                if !keep {
                    step.removed += 1;
                    if self.track_dirty {
                        dirty.insert(key.clone());
                    }
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
            let dirty = std::mem::take(&mut shard.dirty);
            out.extend(dirty.into_iter().map(|k| {
                let v = shard.map.get(&k).copied();
                (k, v)
            }));
        }
        out
    }

    /// Puts changes back after a failed write, unless newer ones are pending already.
    pub(crate) fn restore_dirty(&self, changes: Vec<Change<R>>) {
        for (key, _) in changes {
            self.shard(&key).dirty.insert(key);
        }
    }

    /// Calls `f` on every record, one shard lock at a time.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&str, &R)) {
        for shard in self.shards.iter() {
            for (k, v) in lock(shard).map.iter() {
                f(k, v);
            }
        }
    }
}

/// A poisoned shard only means another thread panicked mid-update of plain data; the data
/// is still a consistent record, so keep serving rather than failing every request.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
