//! The `memory` backend: the reference store for tests and for sites that accept losing
//! the database on restart.

use async_trait::async_trait;

use super::hot::HotMap;
use super::{Counts, ExpireStep, Store, StoreError, UpdateFn};
use crate::engine::{ClientRecord, Triplet, TripletKey};

/// Records in process memory only.
pub struct MemoryStore {
    pub(crate) triplets: HotMap<Triplet>,
    pub(crate) clients: HotMap<ClientRecord>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_dirty_tracking(false)
    }

    pub(crate) fn with_dirty_tracking(track: bool) -> Self {
        MemoryStore {
            triplets: HotMap::new(track),
            clients: HotMap::new(track),
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

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        Ok(self.triplets.get(&key.joined()))
    }

    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        Ok(self.triplets.update(&key.joined(), f))
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.clients.get(client))
    }

    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.clients.update(client, f))
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
}
