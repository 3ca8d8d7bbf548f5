//! Storage failures with the real daemon: a store file that cannot be read, and a disk that
//! fills and frees again. Mail keeps flowing, the daemon says why, nothing is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::admin::Http;
use crate::harness::disk::SmallDisk;
use crate::harness::{Daemon, DaemonConfig, rcpt_request, run_cli};

/// A preloaded store file of `triplets` live triplets.
fn preloaded(dir: &Path, triplets: u32) -> PathBuf {
    let db = dir.join("greygate.redb");
    let (code, out, err) = run_cli(&[
        "bench",
        "--preload",
        &triplets.to_string(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    db
}

/// A deterministic stand-in for random bytes (xorshift).
fn noise(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Ways to damage a file, as a failing disk or a stray write would.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Random 4 KiB blocks over the pages.
    RandomBlocks,
    /// Single bytes flipped all over the file.
    FlippedBytes,
    /// The file cut to half its length.
    Truncated,
    /// The header page overwritten.
    Header,
}

fn damage(path: &Path, how: Damage) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    match how {
        Damage::RandomBlocks => {
            let pages = len / 4096;
            for page in (2..pages).step_by(4) {
                let mut block = [0u8; 4096];
                for chunk in block.chunks_mut(8) {
                    chunk.copy_from_slice(&noise(&mut seed).to_le_bytes());
                }
                f.seek(SeekFrom::Start(page * 4096)).unwrap();
                f.write_all(&block).unwrap();
            }
        }
        Damage::FlippedBytes => {
            for _ in 0..2000 {
                let at = 4096 + noise(&mut seed) % (len - 4096);
                let mut b = [0u8];
                f.seek(SeekFrom::Start(at)).unwrap();
                f.read_exact(&mut b).unwrap();
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(&[b[0] ^ 0xff]).unwrap();
            }
        }
        Damage::Truncated => f.set_len(len / 2).unwrap(),
        Damage::Header => {
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(&[0x5a; 4096]).unwrap();
        }
    }
    f.sync_all().unwrap();
}

fn set_aside_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("greygate.redb.corrupt-"))
        .collect()
}

/// Starts a daemon on the store in `dir` and asks it about a new triplet.
fn serve_and_ask(dir: &Path) -> (Daemon, String) {
    let d = DaemonConfig::new(dir)
        .toml("[greylist]\ndelay = 300\n")
        .listen(&["127.0.0.1:0"])
        .start();
    let reply = d
        .client()
        .ask(&rcpt_request("192.0.2.1", "a@example.net", "b@example.org"));
    (d, reply)
}

#[test]
fn a_store_file_that_cannot_be_read_is_set_aside_and_the_daemon_answers_at_once() {
    for how in [
        Damage::RandomBlocks,
        Damage::FlippedBytes,
        Damage::Truncated,
        Damage::Header,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db = preloaded(dir.path(), 20_000);
        let original = std::fs::read(&db).unwrap();
        let (code, out, err) = run_cli(&["check-store", "--db", db.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("OK, 20000 triplets"), "{out}");
        damage(&db, how);
        // Checked offline first: it says what the daemon will do, and touches nothing.
        let (code, out, err) = run_cli(&["check-store", "--db", db.to_str().unwrap()]);
        assert_eq!(code, 1, "{how:?}: {out}{err}");
        assert!(
            out.contains("cannot be read") && out.contains("would set it aside"),
            "{how:?}: {out}"
        );
        assert!(!err.contains("panicked"), "{how:?}: {err}");
        let damaged = std::fs::read(&db).unwrap();
        assert_ne!(original, damaged, "{how:?} changed nothing");

        let started = Instant::now();
        let (d, reply) = serve_and_ask(dir.path());
        let took = started.elapsed();
        assert!(reply.starts_with("DEFER_IF_PERMIT"), "{how:?}: {reply}");
        assert!(
            took < Duration::from_secs(1),
            "{how:?}: first answer after {took:?}"
        );
        let log = d.log();
        assert!(
            log.contains("store file cannot be read") && log.contains("set_aside="),
            "{how:?}: the log says why:\n{log}"
        );
        assert!(
            !log.contains("panicked"),
            "{how:?}: no panic report:\n{log}"
        );
        // Kept untouched for a look, under a name that says what it is.
        let aside = set_aside_files(dir.path());
        assert_eq!(aside.len(), 1, "{how:?}: {aside:?}");
        assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), damaged);
        let http = Http::new(&d);
        let metrics = http.get("/metrics").1;
        assert!(
            metrics.contains("greygate_store_file_set_aside 1"),
            "{how:?}:\n{metrics}"
        );
        let stats = http.get_json("/api/stats");
        let shown = stats["store_health"]["set_aside"]["path"].as_str().unwrap();
        assert!(shown.ends_with(&aside[0]), "{how:?}: {stats}");
        // The new store in its place works and persists.
        let (status, _) = d.terminate();
        assert!(status.success(), "{how:?}");
        let d = DaemonConfig::new(dir.path())
            .toml("[greylist]\ndelay = 300\n")
            .listen(&["127.0.0.1:0"])
            .start();
        assert!(!d.log().contains("cannot be read"), "{how:?}:\n{}", d.log());
        d.terminate();
    }
}

#[test]
fn an_empty_store_file_is_reported_and_taken_as_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greygate.redb"), b"").unwrap();
    let (d, reply) = serve_and_ask(dir.path());
    assert!(reply.starts_with("DEFER_IF_PERMIT"), "{reply}");
    d.expect_log("store file was empty (0 bytes)");
    assert!(set_aside_files(dir.path()).is_empty());
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_disk_holds_changes_in_memory_until_space_returns_and_none_is_lost() {
    let Some(disk) = SmallDisk::mount(8) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let db = disk.path().join("greygate.redb");
    let start = || {
        DaemonConfig::new(state.path())
            .toml("[greylist]\ndelay = 1\n[store]\nflush_interval = \"200ms\"\n")
            .listen(&["127.0.0.1:0"])
            .args(&["--db", db.to_str().unwrap()])
            .start()
    };
    let d = start();
    let http = Http::new(&d);
    let mut client = d.client();
    let filler = disk.fill();

    // During the outage: a burst of first sightings that must make the file grow, and
    // twenty triplets that pass (first attempt, then a retry after the delay).
    for i in 0..5000u32 {
        let r = rcpt_request(
            &format!("10.{}.{}.1", i / 250, i % 250),
            "bulk@example.net",
            "b@example.org",
        );
        assert!(client.ask(&r).starts_with("DEFER_IF_PERMIT"));
    }
    wait_for("the failed commit to show", Duration::from_secs(10), || {
        http.get("/healthz") == (503, "store writes failing\n".to_string())
    });
    let regular: Vec<String> = (0..20)
        .map(|i| {
            rcpt_request(
                &format!("192.0.{i}.1"),
                "friend@example.net",
                &format!("b{i}@example.org"),
            )
        })
        .collect();
    for r in &regular {
        assert!(client.ask(r).starts_with("DEFER_IF_PERMIT"));
    }
    std::thread::sleep(Duration::from_millis(1100));
    for r in &regular {
        let reply = client.ask(r);
        assert!(reply.starts_with("PREPEND X-Greylist"), "{reply}");
    }
    let metrics = http.get("/metrics").1;
    assert!(
        metrics.contains("greygate_store_writes_failing 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("greygate_store_failed_commits_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("greygate_store_available 0"), "{metrics}");
    let stats = http.get_json("/api/stats");
    assert_eq!(stats["store_health"]["writes_failing"], true, "{stats}");

    // Space comes back: writes resume by themselves, and the log says so.
    std::fs::remove_file(filler).unwrap();
    wait_for("writes to resume", Duration::from_secs(10), || {
        http.get("/healthz").0 == 200
    });
    assert!(d.wait_log("store writes succeed again", Duration::from_secs(5)));
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");

    // Nothing that passed during the outage is lost.
    let d = start();
    let mut client = d.client();
    for r in &regular {
        let reply = client.ask(r);
        assert_eq!(
            reply, "DUNNO",
            "a triplet passed during the outage was forgotten"
        );
    }
}
