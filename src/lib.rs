//! greygate: a greylisting gateway for Postfix and other MTAs.
//!
//! Layers, in one direction: `server` (listeners, connections) → `proto` (pure codecs) →
//! `service` (engine + store + failure policy) → `engine` (pure decisions) and `store`.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod dur;
pub mod engine;
pub mod logfmt;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
pub mod store;
pub mod tools;

/// Locks `m`, also when another thread panicked while holding it: the data behind the
/// crate's mutexes is plain (counters, buffers, map shards) and still consistent, so serving
/// on beats failing every later request.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The allocator of everything built from this crate: per-thread heaps, so memory freed on
/// another tokio worker than the one that allocated it costs no lock. With glibc's malloc
/// the two workers of a busy daemon waited on each other's arena locks (most of its futex
/// calls; BENCHMARKS.md, session 3).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns memory the allocator holds freed to the system now, instead of after its purge
/// delay (after a large start-up load, whose temporary buffers are gone).
pub fn release_free_memory() {
    unsafe extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: mimalloc's own entry point (linked in as the global allocator above); it
    // takes no pointers and only releases free memory.
    unsafe { mi_collect(true) };
}
