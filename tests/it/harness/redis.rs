//! A private `redis-server` per test: a free loopback port, a temp directory, no
//! persistence unless asked for. It can be killed and restarted on the same port, or paused (SIGSTOP) to
//! play a server that stopped answering. Stopped on drop; never the system's service.
//! [`Redis::start_on`] runs one on a host of a multi-host test bed instead (`netns.rs`),
//! listening on that host's address.
//!
//! Without `redis-server` the tests that need it skip with a printed reason under plain
//! `cargo test` and fail under the README's test command (`GREYGATE_REQUIRE_PEERS=1`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::{self, Host};
use super::peers_required;
use super::postfix::free_port;

fn binary() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running private Redis.
pub struct Redis {
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Keeps an append-only file synced at every write, so that a killed server comes
    /// back with everything it acknowledged.
    persistent: bool,
    /// The address it listens on: 127.0.0.1, or its bed host's address.
    host: Ipv4Addr,
    /// The network namespace it runs in, when on a bed host.
    netns: Option<String>,
}

impl Redis {
    /// Starts one, or returns `None` (after printing why) when `redis-server` is missing
    /// and real peers are not required; panics when they are.
    pub fn start(test: &str) -> Option<Redis> {
        Self::start_with(test, false)
    }

    /// As `start`, with an append-only file synced at every write.
    pub fn start_persistent(test: &str) -> Option<Redis> {
        Self::start_with(test, true)
    }

    /// One on `host` of a multi-host test bed, listening on the host's address and port
    /// 6379 (the namespace is its own), or `None` as for `start`.
    pub fn start_on(test: &str, host: &Host) -> Option<Redis> {
        Self::start_at(test, false, Some(host))
    }

    fn start_with(test: &str, persistent: bool) -> Option<Redis> {
        Self::start_at(test, persistent, None)
    }

    fn start_at(test: &str, persistent: bool, on: Option<&Host>) -> Option<Redis> {
        let Some(bin) = binary() else {
            let why = "redis-server not installed (scripts/test installs redis-server)";
            assert!(!peers_required(), "{test}: real Redis required but {why}");
            eprintln!("skipped {test}: {why}");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("gg-redis-")
            .tempdir()
            .expect("temp dir");
        let mut r = Redis {
            port: if on.is_some() { 6379 } else { free_port() },
            bin,
            child: None,
            dir,
            persistent,
            host: on.map_or(Ipv4Addr::LOCALHOST, |h| h.addr),
            netns: on.map(|h| h.ns.clone()),
        };
        r.spawn();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host, self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("log file");
        let mut cmd = Command::new(&self.bin);
        if let Some(ns) = &self.netns {
            netns::enter(&mut cmd, ns);
        }
        let child = cmd
            .args(["--port", &self.port.to_string()])
            .args(["--bind", &self.host.to_string()])
            .args(["--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers PING.
    pub fn answers(&self) -> bool {
        let addr = SocketAddr::from((self.host, self.port));
        let conn = match &self.netns {
            Some(ns) => netns::try_connect(ns, addr, Duration::from_millis(500)),
            None => TcpStream::connect(addr),
        };
        let Ok(mut s) = conn else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Kills the server hard (SIGKILL): its clients see the connection drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty unless it is persistent).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("redis running").id();
        // SAFETY: kill(2) on a child we own; no memory is shared.
        let rc = unsafe { libc::kill(i32::try_from(pid).expect("pid fits i32"), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server must be woken to die promptly.
            self.signal(libc::SIGCONT);
        }
        self.kill();
    }
}
