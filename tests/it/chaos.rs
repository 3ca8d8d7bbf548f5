//! Chaos: a steady load of deferrals and passes while the daemon is killed with SIGKILL and
//! started again, the disk under its embedded store fills and frees, and (with the redis
//! backend) the store server is killed and restarted. Checked at the end: no request
//! waited longer than `store.timeout` + 1 s, and no triplet that passed before a kill is
//! lost (the embedded store loses at most its `flush_interval` to a SIGKILL, so the check
//! covers what passed earlier than that). Every phase is bounded in time.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::failures::wait_for;
use crate::harness::disk::SmallDisk;
use crate::harness::redis::Redis;
use crate::harness::{Daemon, DaemonConfig, rcpt_request, read_some};

/// The store timeout of these daemons; no request may take longer than this plus 1 s.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// Greylisting delay: retries after this pass.
const DELAY: Duration = Duration::from_secs(1);

/// One policy request over a fresh connection; `None` when the daemon cannot be reached
/// (it is down) or closed without an answer.
fn ask(socket: &Path, request: &str) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\n\n") {
        let n = read_some(&mut s, &mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got).ok()?;
    Some(text.trim_end().strip_prefix("action=")?.to_string())
}

fn triplet(i: u32) -> String {
    rcpt_request(
        &format!("10.{}.{}.1", (i >> 8) & 0xff, i & 0xff),
        "sender@example.net",
        &format!("rcpt{i}@example.org"),
    )
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Triplets that passed greylisting (a retry answered with the X-Greylist header),
    /// with when.
    passed: Vec<(u32, Instant)>,
    /// Answers that let mail through without greylisting it: the store was unavailable.
    failed_open: u64,
    answered: u64,
    unreachable: u64,
    slowest: Duration,
}

/// Sends new triplets and, once their delay is over, their retries, until stopped: a
/// steady mix of deferrals and passes, each request timed.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(socket: PathBuf) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut waiting: std::collections::VecDeque<(u32, Instant)> = Default::default();
            let mut next = 0u32;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let retry = waiting
                    .front()
                    .is_some_and(|(_, first)| first.elapsed() > DELAY + Duration::from_millis(200));
                let (i, first) = if retry {
                    waiting.pop_front().expect("a retry is waiting")
                } else {
                    next += 1;
                    (next, Instant::now())
                };
                let started = Instant::now();
                let reply = ask(&socket, &triplet(i));
                let took = started.elapsed();
                let mut s = seen2.lock().unwrap();
                s.slowest = s.slowest.max(took);
                match reply {
                    None => {
                        s.unreachable += 1;
                        drop(s);
                        // The daemon is down: try again shortly, as an MTA would.
                        if !retry {
                            waiting.push_back((i, first));
                        } else {
                            waiting.push_front((i, first));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Some(r) => {
                        s.answered += 1;
                        match (r.starts_with("DEFER"), retry) {
                            (true, false) => waiting.push_back((i, first)),
                            // Deferred again: a store that lost it sees a new sighting.
                            (true, true) => waiting.push_back((i, Instant::now())),
                            (false, true) if r.starts_with("PREPEND X-Greylist") => {
                                s.passed.push((i, Instant::now()));
                            }
                            // Through without greylisting: the store was unavailable.
                            (false, _) => s.failed_open += 1,
                        }
                        drop(s);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
        Load {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn passed_before(&self, t: Instant) -> Vec<u32> {
        let s = self.seen.lock().unwrap();
        s.passed
            .iter()
            .filter(|(_, at)| *at < t)
            .map(|(i, _)| *i)
            .collect()
    }

    fn passes(&self) -> usize {
        self.seen.lock().unwrap().passed.len()
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("load thread");
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Waits until the load has seen `more` passes beyond now.
fn wait_for_passes(load: &Load, more: usize) {
    let want = load.passes() + more;
    wait_for("passes under load", Duration::from_secs(30), || {
        load.passes() >= want
    });
}

fn assert_still_pass(socket: &Path, triplets: &[u32], what: &str) {
    assert!(!triplets.is_empty(), "{what}: nothing passed before it");
    for &i in triplets {
        let reply = ask(socket, &triplet(i)).expect("the daemon answers");
        assert!(
            !reply.starts_with("DEFER"),
            "{what}: triplet {i} passed before it and was forgotten ({reply})"
        );
    }
}

#[test]
fn the_embedded_store_survives_sigkill_and_a_full_disk_under_load() {
    let Some(disk) = SmallDisk::mount(8) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("policy.sock");
    let db = disk.path().join("greygate.redb");
    let start = || -> Daemon {
        DaemonConfig::new(state.path())
            .toml("[greylist]\ndelay = 1\n[store]\nflush_interval = \"200ms\"\ntimeout = 1\n")
            .listen(&[&format!("unix:{}", socket.display())])
            .args(&["--db", db.to_str().unwrap()])
            .start()
    };
    let daemon = start();
    let load = Load::start(socket.clone());
    wait_for_passes(&load, 50);
    // Long enough for those passes to be committed; the load goes on meanwhile.
    std::thread::sleep(Duration::from_millis(800));

    // SIGKILL under load, and straight back.
    let killed_at = Instant::now();
    daemon.kill9();
    let daemon = start();
    // Lost to the kill at most: one flush interval, and the time the kill took to land.
    let durable = load.passed_before(killed_at - Duration::from_millis(500));
    wait_for_passes(&load, 50);
    assert_still_pass(&socket, &durable, "SIGKILL");

    // The disk fills: answers go on from memory; it frees again: writes resume.
    // redb may still have free pages inside its file: the load's new triplets use them up
    // until a commit must grow the file, and fails.
    let filler = disk.fill();
    assert!(
        daemon.wait_log("store flush failed", Duration::from_secs(30)),
        "no commit failed on the full disk:\n{}",
        daemon.log()
    );
    wait_for_passes(&load, 50);
    std::fs::remove_file(filler).unwrap();
    assert!(
        daemon.wait_log("store writes succeed again", Duration::from_secs(30)),
        "writes never resumed:\n{}",
        daemon.log()
    );
    wait_for_passes(&load, 50);

    let seen = load.finish();
    let everything: Vec<u32> = seen.passed.iter().map(|(i, _)| *i).collect();
    assert_eq!(seen.failed_open, 0, "the embedded store never failed open");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        seen.slowest <= STORE_TIMEOUT + Duration::from_secs(1),
        "a request waited {:?}",
        seen.slowest
    );
    // After a clean stop nothing is lost, the passes during the full disk included.
    let daemon = start();
    assert_still_pass(&socket, &everything, "the full disk and the restart");
    eprintln!(
        "chaos (embedded): {} answered, {} while down, {} passed, slowest {:?}",
        seen.answered,
        seen.unreachable,
        everything.len(),
        seen.slowest
    );
    daemon.terminate();
}

#[test]
fn the_redis_store_server_killed_and_restarted_under_load_costs_no_hang_and_no_pass() {
    let Some(mut redis) =
        Redis::start_persistent("the_redis_store_server_killed_and_restarted_under_load")
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("policy.sock");
    let toml = format!(
        "[greylist]\ndelay = 1\n[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = 1\n\
         connect_timeout = 1\n",
        redis.url()
    );
    let daemon = DaemonConfig::new(state.path())
        .toml(&toml)
        .listen(&[&format!("unix:{}", socket.display())])
        .start();
    let load = Load::start(socket.clone());
    wait_for_passes(&load, 50);

    // The store server dies: requests fail open at once (the breaker), none hangs.
    let killed_at = Instant::now();
    redis.kill();
    let before = load.passed_before(killed_at);
    std::thread::sleep(Duration::from_secs(2));
    redis.restart();
    // Greylisting resumes: triplets pass by their retry again, through the store.
    wait_for_passes(&load, 50);
    let seen = load.finish();
    assert!(
        seen.slowest <= STORE_TIMEOUT + Duration::from_secs(1),
        "a request waited {:?}",
        seen.slowest
    );
    // What Redis acknowledged before it died is there after it restarted.
    assert_still_pass(&socket, &before, "the Redis kill");
    eprintln!(
        "chaos (redis): {} answered, {} passed, {} failed open, slowest {:?}",
        seen.answered,
        seen.passed.len(),
        seen.failed_open,
        seen.slowest
    );
    daemon.terminate();
}
