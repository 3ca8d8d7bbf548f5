//! A bounded cache of DNS results with per-entry expiry, for the facts gatherer.
//!
//! Time is a value: callers pass `now`, so tests step it. Entries past their expiry are
//! never returned; when the cache is full, expired entries go first, then the entries that
//! would expire soonest (they have the least life left to give), an eighth of the capacity
//! at a time.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest time any answer is kept, whatever its TTL says: a DNS list that delists a
/// client, or a domain that fixes its SPF, is heard of within this time.
pub const MAX_TTL: Duration = Duration::from_secs(300);

/// How long "does not exist" answers without a usable negative TTL are kept.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Key-value entries, each with its expiry instant; at most `capacity` of them.
pub struct TtlCache<K, V> {
    capacity: usize,
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    /// A cache of at most `capacity` entries; 0 keeps nothing.
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The live value of `key` at `now` (asked by any borrowed form of the key: a `&str`
    /// for a `String` key needs no allocation).
    pub fn get<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some((v, expires)) if *expires > now => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` until `now + ttl`, with `ttl` capped at [`MAX_TTL`]. A zero TTL keeps
    /// nothing.
    pub fn insert(&self, key: K, value: V, ttl: Duration, now: Instant) {
        let ttl = ttl.min(MAX_TTL);
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, expires)| *expires > now);
            if map.len() >= self.capacity {
                // Full of live entries: make room for the next inserts too (an eighth of
                // the capacity), so that the linear pass is paid once per that many
                // inserts, not on every one (a busy MX can add thousands a second).
                let batch = (self.capacity / 8).max(1);
                let mut by_expiry: Vec<(Instant, K)> =
                    map.iter().map(|(k, (_, e))| (*e, k.clone())).collect();
                by_expiry.select_nth_unstable_by_key(batch - 1, |(e, _)| *e);
                for (_, k) in &by_expiry[..batch] {
                    map.remove(k);
                }
            }
        }
        map.insert(key, (value, now + ttl));
    }

    /// Entries held, live or not yet swept.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_at_their_ttl() {
        let c = TtlCache::new(10);
        let t0 = Instant::now();
        c.insert("a", 1, Duration::from_secs(30), t0);
        assert_eq!(c.get(&"a", t0), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(29)), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(30)), None);
        // An expired entry is dropped when read.
        assert!(c.is_empty());
    }

    #[test]
    fn ttls_are_capped() {
        let c = TtlCache::new(10);
        let t0 = Instant::now();
        c.insert("a", 1, Duration::from_secs(86_400), t0);
        assert_eq!(c.get(&"a", t0 + MAX_TTL - Duration::from_secs(1)), Some(1));
        assert_eq!(c.get(&"a", t0 + MAX_TTL), None);
    }

    #[test]
    fn zero_capacity_or_ttl_keeps_nothing() {
        let t0 = Instant::now();
        let none = TtlCache::new(0);
        none.insert("a", 1, Duration::from_secs(30), t0);
        assert_eq!(none.get(&"a", t0), None);
        let c = TtlCache::new(10);
        c.insert("a", 1, Duration::ZERO, t0);
        assert_eq!(c.get(&"a", t0), None);
    }

    #[test]
    fn a_full_cache_drops_expired_then_the_soonest_to_expire() {
        let c = TtlCache::new(2);
        let t0 = Instant::now();
        c.insert("short", 1, Duration::from_secs(10), t0);
        c.insert("long", 2, Duration::from_secs(100), t0);
        c.insert("new", 3, Duration::from_secs(50), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"short", t0), None);
        assert_eq!(c.get(&"long", t0), Some(2));
        assert_eq!(c.get(&"new", t0), Some(3));

        // Later, both old entries have expired: they go, not the live ones.
        let t1 = t0 + Duration::from_secs(60);
        c.insert("later", 4, Duration::from_secs(10), t1);
        assert_eq!(c.get(&"long", t1), Some(2));
        assert_eq!(c.get(&"later", t1), Some(4));
        assert_eq!(c.len(), 2);

        // Replacing an entry of a full cache evicts nothing else.
        c.insert("long", 5, Duration::from_secs(10), t1);
        assert_eq!(c.get(&"long", t1), Some(5));
        assert_eq!(c.get(&"later", t1), Some(4));
    }

    #[test]
    fn a_full_cache_makes_room_an_eighth_at_a_time() {
        let c = TtlCache::new(16);
        let t0 = Instant::now();
        for i in 0..16u64 {
            c.insert(i, i, Duration::from_secs(100 + i), t0);
        }
        // The two soonest to expire go, and the next insert needs no eviction.
        c.insert(100, 100, Duration::from_secs(200), t0);
        assert_eq!(c.len(), 15);
        assert_eq!(
            (c.get(&0, t0), c.get(&1, t0), c.get(&2, t0)),
            (None, None, Some(2))
        );
        c.insert(101, 101, Duration::from_secs(200), t0);
        assert_eq!(c.len(), 16);
        assert_eq!(c.get(&2, t0), Some(2));
    }
}
