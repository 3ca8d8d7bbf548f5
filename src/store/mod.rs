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
pub mod postgres;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::engine::{ClientRecord, Triplet, TripletKey};

pub use embedded::{EmbeddedReader, EmbeddedStore};
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use redis::RedisStore;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub triplets_pending: u64,
    pub triplets_passed: u64,
    pub clients: u64,
}

/// A greylisting database backend. Every method is safe to call concurrently; updates of one
/// key are atomic, also across hosts for shared backends.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for logs, e.g. `embedded /var/lib/greygate/greygate.redb`.
    fn describe(&self) -> String;

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

    async fn counts(&self) -> Result<Counts, StoreError>;
}
