//! Test harness: starts the real daemon on free loopback ports and temp Unix sockets, reads
//! its log, and speaks the policy protocol to it. Later peers (Postfix, Redis, ...) get their
//! starters here too, so every test group shares one way of running them.

#![allow(dead_code)]

pub mod disk;
pub mod dns;
pub mod exim;
pub mod netns;
pub mod postfix;
pub mod postgres;
pub mod postgrey;
pub mod redis;
pub mod shared;
pub mod sqlgrey;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the greygate binary under test.
pub fn greygate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_greygate")
}

/// Runs `greygate ARGS` to completion and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(greygate_bin())
        .args(args)
        .env_remove("GREYGATE_LOG")
        .output()
        .expect("run greygate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `toml` with `[dns] enabled = false` added unless it has a `[dns]` table of its own:
/// DNS is on by default, with the system's resolver, which tests must never query. A test
/// of DNS writes its own `[dns]` with a resolver on loopback.
pub fn without_dns(toml: &str) -> String {
    if toml.lines().any(|l| l.trim() == "[dns]") {
        toml.to_string()
    } else {
        format!("{toml}\n[dns]\nenabled = false\n")
    }
}

/// A running daemon. Killed on drop.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Policy listener addresses as the daemon reported them (`127.0.0.1:PORT`, `unix:/path`).
    pub listeners: Vec<String>,
    /// Milter listener addresses as reported.
    pub milter_listeners: Vec<String>,
    /// SMTP front listener addresses as reported.
    pub smtp_listeners: Vec<String>,
    /// Admin listener (`127.0.0.1:PORT`), when one was started.
    pub admin: Option<SocketAddr>,
    pub dir: PathBuf,
    /// The network namespace it runs in (a host of a [`netns::Bed`]); its loopback
    /// listeners are reached from inside it.
    pub netns: Option<String>,
}

/// How to start a daemon.
pub struct DaemonConfig {
    /// Directory for the config file, the store and sockets.
    pub dir: PathBuf,
    /// TOML written to `dir/greygate.toml` (the listen list is added by the harness).
    pub toml: String,
    /// Listen addresses; default one TCP listener on a free port.
    pub listen: Vec<String>,
    /// Milter listen addresses; default none.
    pub milter_listen: Vec<String>,
    /// SMTP front listen addresses (`--smtp-listen`); default none.
    pub smtp_listen: Vec<String>,
    /// The SMTP front's backend (`--smtp-backend`, `host:port`).
    pub smtp_backend: Option<String>,
    pub extra_args: Vec<String>,
    /// The daemon's `RLIMIT_NOFILE` (soft, hard), set in the child before it starts.
    pub nofile: Option<(u64, u64)>,
    /// `GREYGATE_LOG` of the daemon (default `debug`).
    pub log_filter: String,
    /// The network namespace to run in (default: the test's own).
    pub netns: Option<String>,
}

impl DaemonConfig {
    pub fn new(dir: &Path) -> Self {
        DaemonConfig {
            dir: dir.to_path_buf(),
            toml: String::new(),
            listen: vec!["127.0.0.1:0".into()],
            milter_listen: Vec::new(),
            smtp_listen: Vec::new(),
            smtp_backend: None,
            extra_args: Vec::new(),
            nofile: None,
            log_filter: "debug".into(),
            netns: None,
        }
    }

    /// Runs the daemon inside network namespace `ns` (a host of a [`netns::Bed`]): its
    /// listeners, on that namespace's loopback unless told otherwise, are reached from
    /// inside it ([`Daemon::client`] does).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Starts the daemon with this file descriptor limit (soft, hard).
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Another `GREYGATE_LOG` (a flood test keeps its decision lines out of the log it reads).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.to_string();
        self
    }

    pub fn toml(mut self, toml: &str) -> Self {
        self.toml = toml.to_string();
        self
    }

    pub fn listen(mut self, addrs: &[&str]) -> Self {
        self.listen = addrs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Adds milter listeners (on top of the policy listeners).
    pub fn milter(mut self, addrs: &[&str]) -> Self {
        self.milter_listen = addrs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Adds an SMTP front listening on `addrs` (on top of the policy listeners) that
    /// relays to `backend` (`host:port`).
    pub fn smtp(mut self, addrs: &[&str], backend: &str) -> Self {
        self.smtp_listen = addrs.iter().map(|s| s.to_string()).collect();
        self.smtp_backend = Some(backend.to_string());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("greygate.redb")
    }

    pub fn start(&self) -> Daemon {
        let config = self.dir.join("greygate.toml");
        std::fs::write(&config, without_dns(&self.toml)).expect("write config");
        let mut cmd = Command::new(greygate_bin());
        cmd.arg("serve").arg("--config").arg(&config);
        // `--db` forces the embedded store: not when the config names its own backend.
        if !self
            .extra_args
            .iter()
            .any(|a| a == "--memory" || a == "--db")
            && !self.toml.contains("backend =")
        {
            cmd.arg("--db").arg(self.db_path());
        }
        for l in &self.listen {
            cmd.arg("--listen").arg(l);
        }
        for l in &self.milter_listen {
            cmd.arg("--milter-listen").arg(l);
        }
        for l in &self.smtp_listen {
            cmd.arg("--smtp-listen").arg(l);
        }
        if let Some(b) = &self.smtp_backend {
            cmd.arg("--smtp-backend").arg(b);
        }
        // Never the default port: tests run side by side. Explicit admin arguments decide
        // for themselves.
        let own_admin = self
            .extra_args
            .iter()
            .any(|a| a == "--admin-listen" || a == "--no-admin");
        if !own_admin {
            cmd.arg("--admin-listen").arg("127.0.0.1:0");
        }
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the struct it is given.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        if let Some(ns) = &self.netns {
            netns::enter(&mut cmd, ns);
        }
        cmd.args(&self.extra_args)
            .env("GREYGATE_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn greygate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut d = Daemon {
            child,
            log,
            listeners: Vec::new(),
            milter_listeners: Vec::new(),
            smtp_listeners: Vec::new(),
            admin: None,
            dir: self.dir.clone(),
            netns: self.netns.clone(),
        };
        let want_admin = !self.extra_args.iter().any(|a| a == "--no-admin");
        let deadline = Instant::now() + Duration::from_secs(20);
        while d.listeners.len() < self.listen.len()
            || d.milter_listeners.len() < self.milter_listen.len()
            || d.smtp_listeners.len() < self.smtp_listen.len()
            || (want_admin && d.admin.is_none())
        {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("greygate exited early ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "greygate did not report its listeners:\n{}",
                d.log()
            );
            let log = d.log();
            let ready = |kind: &str| -> Vec<String> {
                log.lines()
                    .filter(|l| l.contains(&format!("{kind} listener ready")))
                    .filter_map(|l| l.split("listener=").nth(1))
                    .filter_map(|rest| rest.split_whitespace().next())
                    .map(str::to_string)
                    .collect()
            };
            d.listeners = ready("policy");
            d.milter_listeners = ready("milter");
            d.smtp_listeners = ready("smtp");
            d.admin = ready("admin").first().and_then(|a| a.parse().ok());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Daemon {
    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; returns whether it did within `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits until `needle` occurs at least `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Asserts that the log comes to contain `needle` (log lines arrive through a pipe,
    /// a little after the reply they belong to).
    #[track_caller]
    pub fn expect_log(&self, needle: &str) {
        assert!(
            self.wait_log(needle, Duration::from_secs(5)),
            "log never contained {needle:?}:\n{}",
            self.log()
        );
    }

    /// The first log line that contains `needle`, once there is one (as
    /// [`Daemon::expect_log`]).
    #[track_caller]
    pub fn log_line(&self, needle: &str) -> String {
        self.expect_log(needle);
        self.log()
            .lines()
            .find(|l| l.contains(needle))
            .expect("logged")
            .to_string()
    }

    /// The first TCP listener.
    pub fn tcp(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find_map(|l| l.parse().ok())
            .expect("a TCP listener")
    }

    /// The first TCP milter listener.
    pub fn milter_tcp(&self) -> SocketAddr {
        self.milter_listeners
            .iter()
            .find_map(|l| l.parse().ok())
            .expect("a TCP milter listener")
    }

    /// The first SMTP front listener.
    pub fn smtp(&self) -> SocketAddr {
        self.smtp_listeners
            .iter()
            .find_map(|l| l.parse().ok())
            .expect("an SMTP listener")
    }

    /// A field of `/proc/PID/status` given in kB (`VmRSS`, `VmHWM`), in KiB.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    /// A connected policy client on the first TCP listener (from inside the daemon's
    /// network namespace when it has one).
    pub fn client(&self) -> PolicyClient {
        match &self.netns {
            Some(ns) => PolicyClient::from_tcp(netns::connect(ns, self.tcp())),
            None => PolicyClient::tcp(self.tcp()),
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// The admin API's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.expect("an admin listener"))
    }

    /// SIGHUP: reload the configuration.
    pub fn hup(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own; no memory is shared.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.wait(Duration::from_secs(15));
        (status, self.log())
    }

    /// SIGKILL: no chance to flush.
    pub fn kill9(mut self) -> String {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(15));
        self.log()
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the log reader drain the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "greygate did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A policy request for a triplet at RCPT stage, with Postfix's usual attributes.
pub fn rcpt_request(client: &str, sender: &str, recipient: &str) -> String {
    request_with(client, sender, recipient, &[])
}

/// Like [`rcpt_request`] with extra or overriding attributes.
pub fn request_with(client: &str, sender: &str, recipient: &str, extra: &[(&str, &str)]) -> String {
    let mut attrs: Vec<(String, String)> = [
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", client),
        ("client_name", "unknown"),
        ("reverse_client_name", "unknown"),
        ("helo_name", "helo.example.net"),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", "1234.5678.9.0"),
        ("size", "0"),
        ("sasl_method", ""),
        ("sasl_username", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        match attrs.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => attrs.push((k.to_string(), v.to_string())),
        }
    }
    let mut s = String::new();
    for (k, v) in attrs {
        s.push_str(&format!("{k}={v}\n"));
    }
    s.push('\n');
    s
}

/// The captured Postfix 3.7 request from `tests/fixtures`.
pub fn fixture_request() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/postfix-3.7-rcpt-request.txt"
    ))
    .expect("read fixture");
    // The fixture ends with the empty line that ends the request, then a `----` marker.
    let end = text.find("\n\n").expect("fixture has an empty line") + 2;
    text[..end].to_string()
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A blocking policy protocol client.
pub struct PolicyClient {
    conn: Conn,
}

impl PolicyClient {
    pub fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect to greygate");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        PolicyClient { conn: Conn::Tcp(s) }
    }

    /// A client on a TCP connection made elsewhere (from another loopback address, say).
    pub fn from_tcp(s: TcpStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        PolicyClient { conn: Conn::Tcp(s) }
    }

    pub fn unix(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect to greygate socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        PolicyClient {
            conn: Conn::Unix(s),
        }
    }

    pub fn set_read_timeout(&self, t: Duration) {
        match &self.conn {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.conn {
            Conn::Tcp(s) => s.write_all(bytes),
            Conn::Unix(s) => s.write_all(bytes),
        }
    }

    fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.conn {
            Conn::Tcp(s) => read_some(s, buf),
            Conn::Unix(s) => read_some(s, buf),
        }
    }

    /// Reads `n` replies; returns their `action=` values.
    pub fn read_replies(&mut self, n: usize) -> Vec<String> {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        while count_replies(&data) < n {
            let got = self.read_some(&mut buf).expect("read reply");
            assert!(
                got > 0,
                "connection closed; got {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buf[..got]);
        }
        String::from_utf8(data)
            .expect("utf-8 reply")
            .split("\n\n")
            .filter(|r| !r.is_empty())
            .map(|r| {
                r.strip_prefix("action=")
                    .unwrap_or_else(|| panic!("reply without action=: {r:?}"))
                    .to_string()
            })
            .collect()
    }

    /// Sends one request and returns its `action=` value.
    pub fn ask(&mut self, request: &str) -> String {
        self.send(request.as_bytes()).expect("send request");
        self.read_replies(1).remove(0)
    }

    /// Sends one request; returns its `action=` value, or `None` if the server closed the
    /// connection instead of answering.
    pub fn try_ask(&mut self, request: &str) -> Option<String> {
        self.send(request.as_bytes()).ok()?;
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        while count_replies(&data) < 1 {
            match self.read_some(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&data);
        text.strip_prefix("action=")
            .map(|r| r.trim_end().to_string())
    }

    /// Whether the server closes the connection within `timeout` (reading and discarding).
    /// Returns the bytes received before the close, or `None` if it stayed open.
    pub fn closed_within(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        self.set_read_timeout(Duration::from_millis(100));
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.read_some(&mut buf) {
                Ok(0) => return Some(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                // A reset also means closed (the server dropped unread input).
                Err(_) => return Some(got),
            }
        }
        None
    }
}

fn count_replies(data: &[u8]) -> usize {
    data.windows(2).filter(|w| w == b"\n\n").count()
}

/// A TCP connection to `to` from the loopback address `from`.
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only: {to}")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the TcpStream at once (closed on any panic below);
    // bind and connect read the address structs we pass.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        let rc = libc::bind(fd, (&raw const local).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, (&raw const remote).cast(), len);
        assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
        stream
    }
}

/// One `read`, again when a signal interrupted it. The test process gets signals (children
/// of parallel tests come and go), and a socket read with a timeout (`SO_RCVTIMEO`) is not
/// restarted after one: `EINTR` is no answer from the server, and not a closed connection.
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (within the hard limit);
/// returns the soft limit now in force. Tests that hold thousands of connections need it.
pub fn raise_own_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

/// Whether the program `bin` (an absolute path) a test needs is installed: false (after
/// printing why) when the test should be skipped; panics instead when real peers are
/// required, as [`postfix::available`] does.
pub fn tool_available(test: &str, bin: &str) -> bool {
    if Path::new(bin).exists() {
        return true;
    }
    assert!(
        !peers_required(),
        "{test}: {bin} required but not installed"
    );
    eprintln!("skipped {test}: {bin} is not installed");
    false
}

/// True when the variable that makes missing peers fatal is set (the README's test command
/// sets it); plain `cargo test` skips such tests with a printed reason instead.
pub fn peers_required() -> bool {
    std::env::var_os("GREYGATE_REQUIRE_PEERS").is_some_and(|v| v == "1")
}
