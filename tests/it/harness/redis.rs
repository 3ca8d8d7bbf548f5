//! A private `redis-server` per test: a free loopback port, a temp directory, no
//! persistence unless asked for. It can be killed and restarted on the same port, or paused (SIGSTOP) to
//! play a server that stopped answering. Stopped on drop; never the system's service.
//! [`Redis::start_on`] runs one on a host of a multi-host test bed instead (`netns.rs`),
//! listening on that host's address.
//!
//! Without `redis-server` the tests that need it skip with a printed reason under plain
//! `cargo test` and fail under the README's test command (`GREYGATE_REQUIRE_PEERS=1`).

use std::io::Write;
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
    /// More arguments for `redis-server` (a replica, a cluster node, TLS).
    extra: Vec<String>,
    /// A sentinel: `redis-server <this file> --sentinel`.
    sentinel_conf: Option<PathBuf>,
    /// The TLS port (the plain `port` is then 0).
    pub tls_port: Option<u16>,
    /// How `cli` reaches the server (`-p <port>`, or the TLS port with its CA) and logs in.
    cli_args: Vec<String>,
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
        Self::start_full(test, false, Vec::new(), None, None, Some(host))
    }

    fn start_with(test: &str, persistent: bool) -> Option<Redis> {
        Self::start_full(test, persistent, Vec::new(), None, None, None)
    }

    /// A server started with more `redis-server` arguments (e.g. `--replicaof`).
    pub fn start_args(test: &str, extra: &[String]) -> Option<Redis> {
        Self::start_full(test, false, extra.to_vec(), None, None, None)
    }

    /// A cluster node (cluster-enabled, its bus on a free port of its own); the cluster
    /// is made with `redis-cli --cluster create` (see `RedisCluster`).
    pub fn start_cluster_node(test: &str) -> Option<Redis> {
        Self::start_args(test, &Self::cluster_args())
    }

    /// The arguments of a cluster node.
    pub fn cluster_args() -> Vec<String> {
        [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--cluster-port",
            &free_port().to_string(),
        ]
        .map(String::from)
        .into()
    }

    /// A server answering TLS only (`tls-port`, plain port 0) with `cert`/`key`.
    pub fn start_tls(test: &str, cert: &Path, key: &Path, ca: &Path) -> Option<Redis> {
        Self::start_tls_with(test, cert, key, ca, &[])
    }

    /// As `start_tls`, with more `redis-server` arguments.
    pub fn start_tls_with(
        test: &str,
        cert: &Path,
        key: &Path,
        ca: &Path,
        more: &[String],
    ) -> Option<Redis> {
        let port = free_port();
        let mut extra = vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-ca-cert-file".into(),
            ca.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        extra.extend_from_slice(more);
        let mut r = Self::start_full(test, false, extra, None, Some(port), None)?;
        r.cli_args = ["-p", &port.to_string(), "--tls", "--cacert"]
            .map(String::from)
            .into();
        r.cli_args.push(ca.display().to_string());
        Some(r)
    }

    /// `cli` logs in with `password` from now on.
    pub fn cli_password(&mut self, password: &str) {
        self.cli_args
            .extend(["-a", password, "--no-auth-warning"].map(String::from));
    }

    /// A sentinel watching `master_port` as `mymaster` (quorum 2), quick to act:
    /// down after 500 ms, failover timeout 3 s.
    pub fn start_sentinel(test: &str, master_port: u16) -> Option<Redis> {
        let conf = format!(
            "sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds mymaster 500\n\
             sentinel failover-timeout mymaster 3000\n\
             sentinel parallel-syncs mymaster 1\n"
        );
        Self::start_full(test, false, Vec::new(), Some(conf), None, None)
    }

    /// A sentinel on a TLS port watching the TLS master at `master_port` as `mymaster`
    /// (quorum 1), reaching it over TLS (`tls-replication`).
    pub fn start_sentinel_tls(
        test: &str,
        master_port: u16,
        cert: &Path,
        key: &Path,
        ca: &Path,
    ) -> Option<Redis> {
        let conf = format!("sentinel monitor mymaster 127.0.0.1 {master_port} 1\n");
        let port = free_port();
        let extra = [
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert.display().to_string(),
            "--tls-key-file",
            &key.display().to_string(),
            "--tls-ca-cert-file",
            &ca.display().to_string(),
            "--tls-auth-clients",
            "no",
            "--tls-replication",
            "yes",
        ]
        .map(String::from)
        .into();
        let mut r = Self::start_full(test, false, extra, Some(conf), Some(port), None)?;
        r.cli_args = ["-p", &port.to_string(), "--tls", "--cacert"]
            .map(String::from)
            .into();
        r.cli_args.push(ca.display().to_string());
        Some(r)
    }

    fn start_full(
        test: &str,
        persistent: bool,
        extra: Vec<String>,
        sentinel_conf: Option<String>,
        tls_port: Option<u16>,
        on: Option<&Host>,
    ) -> Option<Redis> {
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
        // Sentinel rewrites its file: it lives beside the server's other files.
        let sentinel_conf = sentinel_conf.map(|c| {
            let path = dir.path().join("sentinel.conf");
            std::fs::write(&path, c).expect("sentinel.conf");
            path
        });
        let mut r = Redis {
            port: if on.is_some() {
                6379
            } else if tls_port.is_some() {
                0
            } else {
                free_port()
            },
            bin,
            child: None,
            dir,
            persistent,
            host: on.map_or(Ipv4Addr::LOCALHOST, |h| h.addr),
            netns: on.map(|h| h.ns.clone()),
            extra,
            sentinel_conf,
            tls_port,
            cli_args: Vec::new(),
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
        if let Some(conf) = &self.sentinel_conf {
            cmd.arg(conf).arg("--sentinel");
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
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ready() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server is up: answers PING, or (TLS only) says so in its log.
    fn ready(&self) -> bool {
        if self.tls_port.is_some() {
            return std::fs::read_to_string(self.dir.path().join("redis.log"))
                // A sentinel says who it is instead.
                .is_ok_and(|l| {
                    l.contains("Ready to accept connections") || l.contains("Sentinel ID is")
                });
        }
        self.answers()
    }

    /// Runs `redis-cli -p <port> <args>` (or over TLS, see `cli_args`) and returns its
    /// output.
    pub fn cli(&self, args: &[&str]) -> String {
        // Bounded: `--cluster create` waits for the cluster to join as long as it takes.
        let mut cmd = Command::new("/usr/bin/timeout");
        cmd.args(["30", "/usr/bin/redis-cli", "-h", "127.0.0.1"]);
        if self.cli_args.is_empty() {
            cmd.args(["-p", &self.port.to_string()]);
        } else {
            cmd.args(&self.cli_args);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
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
            && super::read_some(&mut s, &mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
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
