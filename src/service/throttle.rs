//! The count of new triplets per client group behind `[greylist] new_triplets_per_client`:
//! a table of fixed size, so a flood from ever more client groups costs no more memory.
//!
//! The engine decides (`Engine::throttled`, `Engine::count_new_triplet`, pure over a
//! [`NewTriplets`] and `now`); this table only keeps each group's window. It lives in the
//! daemon's memory, not in the store: a restart forgets the counts (the store's cap still
//! bounds what a flood can leave behind), and MX hosts sharing a store each count their own.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock};

use crate::engine::NewTriplets;
use crate::lock;

/// Client groups tracked at most: 64 Ki groups in 1 MiB.
pub const TRACKED_GROUPS: usize = SETS * WAYS;
const SETS: usize = 8192;
/// Groups per set: a group can only be dropped by one of the few others hashed to its set.
const WAYS: usize = 8;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// A keyed 64-bit hash of the group (0: empty). Two groups sharing one needs a
    /// collision of a random per-process key; they would then share a count.
    tag: u64,
    window_start: u32,
    count: u32,
}

/// Windows of new triplets per client group, for at most [`TRACKED_GROUPS`] groups: a set
/// that is full drops the group whose window began longest ago (most likely over, and the
/// least active). A dropped group starts counting again from zero.
pub struct Throttle {
    // Allocated at the first new triplet counted: a daemon with the limit off never pays.
    sets: OnceLock<Box<[Mutex<[Slot; WAYS]>]>>,
    hasher: RandomState,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            sets: OnceLock::new(),
            hasher: RandomState::new(),
        }
    }
}

/// Unix seconds in a slot (until 2106; later ones saturate, which only shortens a window).
fn secs(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

impl Throttle {
    fn tag(&self, group: &str) -> (usize, u64) {
        let h = self.hasher.hash_one(group);
        // The low bits pick the set, so the tag keeps the whole hash; 0 marks empty slots.
        ((h as usize) % SETS, h.max(1))
    }

    fn sets(&self) -> &[Mutex<[Slot; WAYS]>] {
        self.sets.get_or_init(|| {
            (0..SETS)
                .map(|_| Mutex::new([Slot::default(); WAYS]))
                .collect()
        })
    }

    /// The group's window, if it is tracked.
    pub fn get(&self, group: &str) -> Option<NewTriplets> {
        let sets = self.sets.get()?;
        let (set, tag) = self.tag(group);
        let slots = lock(&sets[set]);
        slots.iter().find(|s| s.tag == tag).map(|s| NewTriplets {
            window_start: s.window_start.into(),
            count: s.count,
        })
    }

    /// Replaces the group's window with `step` of it (tracking the group if it is not).
    pub fn update(&self, group: &str, step: impl FnOnce(Option<&NewTriplets>) -> NewTriplets) {
        let (set, tag) = self.tag(group);
        let mut slots = lock(&self.sets()[set]);
        let found = slots.iter().position(|s| s.tag == tag);
        let old = found.map(|i| NewTriplets {
            window_start: slots[i].window_start.into(),
            count: slots[i].count,
        });
        let new = step(old.as_ref());
        let i = found.unwrap_or_else(|| {
            // An empty slot has tag 0 and window_start 0: it is the oldest.
            (0..WAYS)
                .min_by_key(|&i| (slots[i].tag != 0, slots[i].window_start))
                .unwrap_or(0)
        });
        slots[i] = Slot {
            tag,
            window_start: secs(new.window_start),
            count: new.count,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, Policy};

    fn engine(limit: u32, window: u64) -> Engine {
        Engine::new(
            Policy {
                new_triplets_per_client: limit,
                new_triplets_window: window,
                ..Policy::default()
            },
            Default::default(),
        )
    }

    /// The limit holds within a window and lifts when it ends; other groups are counted
    /// apart (stepped `now`, as the service counts).
    #[test]
    fn counts_per_group_and_window() {
        let e = engine(3, 600);
        let t = Throttle::default();
        let t0 = 1_700_000_000;
        assert_eq!(
            t.get("192.0.2.0/24"),
            None,
            "nothing allocated or tracked yet"
        );
        for i in 0..3 {
            let now = t0 + i * 10;
            assert_eq!(e.throttled(t.get("192.0.2.0/24").as_ref(), now), None);
            t.update("192.0.2.0/24", |w| e.count_new_triplet(w, now));
        }
        let w = t.get("192.0.2.0/24").expect("tracked");
        assert_eq!((w.window_start, w.count), (t0, 3));
        // The fourth within the window waits for its end.
        assert_eq!(e.throttled(Some(&w), t0 + 100), Some(500));
        assert_eq!(e.throttled(Some(&w), t0 + 599), Some(1));
        // Another group is not affected.
        assert_eq!(
            e.throttled(t.get("198.51.100.0/24").as_ref(), t0 + 100),
            None
        );
        // At the window's end a new one begins.
        assert_eq!(e.throttled(Some(&w), t0 + 600), None);
        t.update("192.0.2.0/24", |w| e.count_new_triplet(w, t0 + 600));
        let w = t.get("192.0.2.0/24").expect("tracked");
        assert_eq!((w.window_start, w.count), (t0 + 600, 1));
        // Off: never throttled, whatever the count.
        assert_eq!(engine(0, 600).throttled(Some(&w), t0 + 601), None);
    }

    /// At most `TRACKED_GROUPS` groups are kept; a full set drops the oldest window, so
    /// memory stays fixed however many groups send.
    #[test]
    fn tracks_a_bounded_number_of_groups_dropping_the_oldest() {
        let e = engine(1, 3600);
        let t = Throttle::default();
        let t0 = 1_700_000_000;
        // The first group's window is the oldest of all.
        t.update("first", |w| e.count_new_triplet(w, t0));
        let n = 4 * TRACKED_GROUPS;
        for i in 0..n {
            let group = format!("g{i}");
            t.update(&group, |w| e.count_new_triplet(w, t0 + 1 + i as u64));
        }
        let sets = t.sets.get().expect("allocated");
        assert_eq!(sets.len() * WAYS, TRACKED_GROUPS);
        let tracked: usize = sets
            .iter()
            .map(|s| lock(s).iter().filter(|s| s.tag != 0).count())
            .sum();
        assert!(tracked <= TRACKED_GROUPS, "{tracked}");
        assert_eq!(t.get("first"), None, "the oldest window was dropped");
        // The most recent groups are still tracked.
        for i in n - 100..n {
            assert!(t.get(&format!("g{i}")).is_some(), "g{i}");
        }
    }
}
