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
pub mod import;
pub mod lists;
pub mod logfmt;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod tools;

/// Locks `m`, also when another thread panicked while holding it: the data behind the
/// crate's mutexes is plain (counters, buffers, map shards) and still consistent, so serving
/// on beats failing every later request.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` and turns a panic inside it into `Err` with the panic's message, without the
/// panic report on stderr: for calls into a library that panics on bad data instead of
/// returning an error (redb on a damaged file). The report of a panic anywhere else is
/// unchanged.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    use std::cell::Cell;
    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into())
    })
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
