//! A private Exim 4 per test: a generated configuration (`-C`) in a temp directory with its
//! own spool and logs, a daemon in the foreground (`-bdf`) listening on a free loopback
//! port, and routes that send each domain list to a port on 127.0.0.1 (`manualroute`).
//! Tests submit over SMTP (swaks) or with [`Exim::command`], force queue runs
//! ([`Exim::queue_run`]) and read [`Exim::mainlog`].
//!
//! Debian's `exim4-daemon-light` conflicts with Postfix, which the suite needs too, so
//! `scripts/test` unpacks the package into [`CACHE`] instead of installing it (and installs
//! the libraries it needs and creates its `Debian-exim` user). An Exim given `-C` gives up
//! root: the daemon and its deliveries run as `Debian-exim`, which owns the spool and log
//! directories here. Without Exim, tests skip with a printed reason under plain `cargo
//! test` and fail under `GREYGATE_REQUIRE_PEERS=1`.
//!
//! For ACL tests (greygate's policy recipe asked through `readsocket`, say):
//! [`EximConfig::rcpt_acl`] replaces the `accept` that ends the RCPT ACL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::peers_required;
use super::postfix::{Swaks, free_port};

/// Where `scripts/test` unpacks Debian's `exim4-daemon-light`.
pub const CACHE: &str = "/var/cache/greygate-tests/exim4";

/// The Exim binary: `$GREYGATE_EXIM`, the tree `scripts/test` unpacks, or an installed one.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GREYGATE_EXIM") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    [format!("{CACHE}/usr/sbin/exim4"), "/usr/sbin/exim4".into()]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The user Debian's Exim runs as (compiled in: it must exist).
const USER: &str = "Debian-exim";

/// Why Exim tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    if binary().is_none() {
        return Some(format!(
            "no Exim (scripts/test unpacks Debian's exim4-daemon-light into {CACHE})"
        ));
    }
    if !user_exists(USER) {
        return Some(format!("no {USER} user (scripts/test creates it)"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("a private Exim needs root (its spool belongs to Debian-exim)".into());
    }
    None
}

fn user_exists(name: &str) -> bool {
    let c = std::ffi::CString::new(name).expect("no NUL in a user name");
    // SAFETY: getpwnam reads the NUL-terminated name; only the null-ness of its static
    // result is looked at.
    !unsafe { libc::getpwnam(c.as_ptr()) }.is_null()
}

/// Returns false (after printing why) when the test should be skipped; panics instead when
/// real peers are required.
pub fn available(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if peers_required() => panic!("{test}: real Exim required but {why}"),
        Some(why) => {
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

/// How to start an Exim.
pub struct EximConfig {
    /// (Exim domain list, port on 127.0.0.1): one manualroute router each, in order.
    routes: Vec<(String, u16)>,
    rcpt_acl: String,
    main: Vec<String>,
    retry: String,
}

impl Default for EximConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl EximConfig {
    /// Accepts every recipient, routes nothing (add [`EximConfig::route`]s), retries every
    /// second for two hours (`* * F,2h,1s`).
    pub fn new() -> Self {
        EximConfig {
            routes: Vec::new(),
            rcpt_acl: "accept".into(),
            main: Vec::new(),
            retry: "* * F,2h,1s".into(),
        }
    }

    /// Mail for `domains` (an Exim domain list: `a.example : b.example`) goes to
    /// 127.0.0.1:`port` over SMTP. Other domains are unrouteable.
    pub fn route(mut self, domains: &str, port: u16) -> Self {
        self.routes.push((domains.to_string(), port));
        self
    }

    /// The body of the RCPT ACL (default `accept`), e.g. a `defer` with a `readsocket`
    /// condition before the `accept`.
    pub fn rcpt_acl(mut self, acl: &str) -> Self {
        self.rcpt_acl = acl.to_string();
        self
    }

    /// A line for the main section (after the harness's own; Exim takes the last setting).
    pub fn main(mut self, line: &str) -> Self {
        self.main.push(line.to_string());
        self
    }

    /// The retry rules (default `* * F,2h,1s`).
    pub fn retry(mut self, rules: &str) -> Self {
        self.retry = rules.to_string();
        self
    }

    /// Writes the configuration and starts the daemon; returns once it listens.
    pub fn start(&self) -> Exim {
        let bin = binary().expect("Exim binary (call exim::available first)");
        let tmp = tempfile::Builder::new()
            .prefix("gg-exim-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        // Exim drops root for `-C`: Debian-exim must reach the configuration and own the
        // spool and the logs.
        set_mode(&dir, 0o755);
        for sub in ["spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
            chown_exim(&dir.join(sub));
        }
        let port = free_port();
        let config = dir.join("exim.conf");
        std::fs::write(&config, self.text(&bin, &dir, port)).expect("write exim.conf");
        let stderr = std::fs::File::create(dir.join("daemon.stderr")).expect("stderr file");
        let daemon = Command::new(&bin)
            .arg("-C")
            .arg(&config)
            .args(["-bdf", "-oX", &port.to_string(), "-oP"])
            .arg(dir.join("exim.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start exim");
        let mut exim = Exim {
            dir,
            port,
            config,
            bin,
            daemon,
            _tmp: tmp,
        };
        exim.wait_listening();
        exim
    }

    fn text(&self, bin: &Path, dir: &Path, port: u16) -> String {
        let (bin, d) = (bin.display(), dir.display());
        let mut text = format!(
            "primary_hostname = exim.test.invalid
qualify_domain = exim.test.invalid
exim_path = {bin}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
keep_environment =
log_selector = +pid +millisec +queue_time +deliver_time +outgoing_port +queue_time_overall
log_timezone = true
local_interfaces = <; 127.0.0.1
daemon_smtp_ports = {port}
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt
"
        );
        for line in &self.main {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("\nbegin acl\n\nacl_check_rcpt:\n");
        for line in self.rcpt_acl.lines() {
            text.push_str("  ");
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("\nbegin routers\n\n");
        for (i, (domains, port)) in self.routes.iter().enumerate() {
            text.push_str(&format!(
                "route{i}:
  driver = manualroute
  domains = {domains}
  transport = remote_smtp
  route_list = * 127.0.0.1::{port}
  self = send

"
            ));
        }
        text.push_str(&format!(
            "begin transports

remote_smtp:
  driver = smtp
  allow_localhost
  hosts_avoid_tls = *
  hosts_try_chunking =
  hosts_try_prdr =

begin retry

{}
",
            self.retry
        ));
        text
    }
}

/// A running private Exim daemon. Stopped on drop.
pub struct Exim {
    pub dir: PathBuf,
    /// The daemon's SMTP port on 127.0.0.1.
    pub port: u16,
    /// The configuration file (`-C`).
    pub config: PathBuf,
    bin: PathBuf,
    daemon: Child,
    _tmp: tempfile::TempDir,
}

impl Exim {
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.daemon.try_wait() {
                panic!("exim exited early ({status}):\n{}", self.diagnostics());
            }
            assert!(
                Instant::now() < deadline,
                "exim never listened on {}:\n{}",
                self.port,
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `exim -C CONFIG`, to add arguments to.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-C").arg(&self.config).stdin(Stdio::null());
        cmd
    }

    /// Runs `exim -C CONFIG ARGS`; panics (with the logs) when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command().args(args).output().expect("run exim");
        assert!(
            out.status.success(),
            "exim {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        out
    }

    /// One forced queue run over every message, frozen ones too (`-qff`), to its end.
    pub fn queue_run(&self) {
        self.run(&["-qff"]);
    }

    /// Messages in the queue (`-bpc`).
    pub fn queue_count(&self) -> usize {
        let out = self.run(&["-bpc"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("exim -bpc prints a count")
    }

    /// The main log's path.
    pub fn mainlog_path(&self) -> PathBuf {
        self.dir.join("log/mainlog")
    }

    /// The main log so far.
    pub fn mainlog(&self) -> String {
        std::fs::read_to_string(self.mainlog_path()).unwrap_or_default()
    }

    /// Waits until the main log contains `needle`; returns whether it did within `timeout`.
    pub fn wait_mainlog(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.mainlog().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The main log, the panic and reject logs and the daemon's stderr, for failure
    /// messages.
    pub fn diagnostics(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "mainlog:\n{}\npaniclog:\n{}\nrejectlog:\n{}\ndaemon stderr:\n{}",
            self.mainlog(),
            read("log/paniclog"),
            read("log/rejectlog"),
            read("daemon.stderr")
        )
    }

    /// A swaks conversation with the daemon.
    pub fn swaks(&self) -> Swaks {
        Swaks::at(&format!("127.0.0.1:{}", self.port))
    }
}

impl Drop for Exim {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; SIGTERM lets the daemon remove its pid
        // file. Deliveries it started end by themselves.
        unsafe {
            libc::kill(self.daemon.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_exim(path: &Path) {
    let status = Command::new("chown")
        .arg(format!("{USER}:"))
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {USER} {}", path.display());
}
