//! Threads of a front end's own, each running a single-threaded runtime.
//!
//! The SMTP front's sessions run here rather than on the daemon's work-stealing runtime.
//! An SMTP session is a chain of short steps, each woken by the client or the backend;
//! on a multi-threaded runtime each wake-up may hand the task to the other worker and wake
//! that one too. Kept on one thread, a message costs greygate about a quarter less CPU and
//! the front relays some 10 % more messages a second on two cores (BENCHMARKS.md, "The
//! SMTP front"). More than one thread: each has listening sockets of its own (`SO_REUSEPORT`),
//! so the kernel spreads connections and none crosses threads.

use std::io;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Running threads, each with its runtime; they stop when this is dropped (after the
/// tasks on them have ended: the daemon drops it once every connection is closed).
pub struct Threads {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Threads {
    /// Starts `n` threads named `name-0`, `name-1`, …
    ///
    /// # Errors
    ///
    /// A runtime or a thread could not be created.
    pub fn start(n: usize, name: &str) -> io::Result<Threads> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    rt.block_on(stop.cancelled());
                    // Whatever is left (a courtesy QUIT to a backend) gets a moment.
                    rt.shutdown_timeout(Duration::from_secs(1));
                })?;
        }
        Ok(Threads { handles, stop })
    }

    /// The runtimes' handles, one per thread.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_named_threads_until_dropped() {
        let threads = Threads::start(2, "gg-test").unwrap();
        let mut names = Vec::new();
        for h in threads.handles() {
            let name = h
                .spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap();
            names.push(name.unwrap());
        }
        assert_eq!(names, ["gg-test-0", "gg-test-1"]);
        let h = threads.handles()[0].clone();
        drop(threads);
        // The runtime shuts down: what is spawned on it now never runs to completion.
        let late = h.spawn(std::future::pending::<()>());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), late)
                .await
                .expect("a stopped runtime cancels its tasks")
                .unwrap_err()
                .is_cancelled()
        );
    }
}
