//! A private Postfix instance per test: generated `main.cf`/`master.cf` in a temp directory,
//! its own queue and data directories, `chroot = n`, smtpd on a free loopback port, XCLIENT
//! allowed from 127.0.0.1, and accepted mail relayed to Postfix's `smtp-sink`, which dumps
//! every message to a file. Also: swaks, to drive it.
//!
//! Postfix must run as root (its `postfix` command refuses otherwise). Without root or the
//! packages, tests skip with a printed reason under plain `cargo test` and fail under the
//! README's test command (`GREYGATE_REQUIRE_PEERS=1`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::peers_required;

/// A free TCP port on 127.0.0.1 (bound, then released for the peer to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Why Postfix tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    for bin in ["/usr/sbin/postfix", "/usr/sbin/smtp-sink", "/usr/bin/swaks"] {
        if !Path::new(bin).exists() {
            return Some(format!(
                "{bin} is not installed (scripts/test installs postfix and swaks)"
            ));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("Postfix instances need root".into());
    }
    None
}

/// Returns false (after printing why) when the test should be skipped; panics instead when
/// real peers are required.
pub fn available(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if peers_required() => panic!("{test}: real Postfix required but {why}"),
        Some(why) => {
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

/// A running private Postfix with its smtp-sink. Stopped on drop.
pub struct Postfix {
    pub dir: PathBuf,
    pub smtp_port: u16,
    sink: Child,
    _tmp: tempfile::TempDir,
}

/// How the instance asks greygate.
pub enum Policy {
    /// `check_policy_service` on `inet:` or `unix:` (absolute path), with `default_action=DUNNO`.
    Service(String),
    /// `smtpd_milters` (`inet:HOST:PORT` or `unix:/path`), with `milter_default_action = accept`.
    Milter(String),
    /// No policy service (plain relay).
    None,
}

impl Postfix {
    /// Creates and starts an instance whose recipient restrictions end with `policy`.
    /// `extra_main` lines are appended to main.cf.
    pub fn start(policy: Policy, extra_main: &[&str]) -> Postfix {
        let tmp = tempfile::Builder::new()
            .prefix("gg-postfix-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        // smtpd and smtp-sink run as `postfix` and must reach files below this directory.
        set_mode(&dir, 0o755);
        for sub in ["etc", "queue", "data", "log", "sink"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        chown_postfix(&dir.join("data"));
        chown_postfix(&dir.join("sink"));

        let smtp_port = free_port();
        let sink_port = free_port();
        let d = dir.display();
        let restrictions = match &policy {
            Policy::Service(endpoint) => format!(
                "reject_unauth_destination, check_policy_service {{ {endpoint}, default_action=DUNNO }}"
            ),
            Policy::Milter(_) | Policy::None => "reject_unauth_destination".into(),
        };
        let milters = match &policy {
            Policy::Milter(endpoint) => format!(
                "smtpd_milters = {endpoint}\nmilter_default_action = accept\nmilter_protocol = 6\n"
            ),
            _ => String::new(),
        };
        let mut main = format!(
            "compatibility_level = 3.6
config_directory = {d}/etc
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
maillog_file = {d}/log/maillog
maillog_file_prefixes = {d}
myhostname = mx.test.invalid
mydomain = test.invalid
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = all
mydestination =
local_recipient_maps =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relay_domains = static:ALL
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtpd_authorized_xclient_hosts = 127.0.0.1
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = {restrictions}
smtpd_policy_service_timeout = 5s
smtpd_policy_service_try_limit = 1
smtpd_policy_service_retry_delay = 1s
biff = no
{milters}"
        );
        for line in extra_main {
            main.push_str(line);
            main.push('\n');
        }
        let master = format!(
            "127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
        );
        for (name, text) in [("main.cf", main), ("master.cf", master)] {
            let path = dir.join("etc").join(name);
            std::fs::write(&path, text).expect("write postfix config");
            // Postfix re-reads a main.cf younger than a second, in 300 ms steps: backdate it.
            let old = SystemTime::now() - Duration::from_secs(120);
            std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(old))
                .expect("backdate config");
        }

        let sink = Command::new("/usr/sbin/smtp-sink")
            .arg("-u")
            .arg("postfix")
            .arg("-d")
            .arg(format!("{d}/sink/msg."))
            .arg(format!("127.0.0.1:{sink_port}"))
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");

        let pf = Postfix {
            dir,
            smtp_port,
            sink,
            _tmp: tmp,
        };
        // `check` creates the queue directories with the right owners.
        pf.postfix(&["check"]);
        pf.postfix(&["start"]);
        wait_port(smtp_port);
        wait_port(sink_port);
        pf
    }

    fn postfix(&self, args: &[&str]) {
        let out = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run postfix");
        assert!(
            out.status.success(),
            "postfix {args:?} failed: {}{}\nmaillog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.maillog()
        );
    }

    /// The instance's log so far.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/maillog")).unwrap_or_default()
    }

    /// Waits for the message whose headers contain `marker` to reach smtp-sink; returns it.
    pub fn delivered(&self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(entries) = std::fs::read_dir(self.dir.join("sink")) {
                for e in entries.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    if text.contains(marker) {
                        return text;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "message {marker:?} never reached smtp-sink; maillog:\n{}",
                self.maillog()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a message whose headers contain `marker` has reached smtp-sink by now.
    pub fn delivered_now(&self, marker: &str) -> bool {
        std::fs::read_dir(self.dir.join("sink")).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|text| text.contains(marker)))
        })
    }

    /// A swaks conversation with this instance.
    pub fn swaks(&self) -> Swaks {
        Swaks::at(&format!("127.0.0.1:{}", self.smtp_port))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .arg("stop")
            .stdin(Stdio::null())
            .output();
        let _ = self.sink.kill();
        let _ = self.sink.wait();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_postfix(path: &Path) {
    let status = Command::new("chown")
        .arg("postfix")
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown postfix {}", path.display());
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One swaks run.
pub struct Swaks {
    server: String,
    args: Vec<String>,
}

/// What swaks saw.
#[derive(Debug)]
pub struct SwaksResult {
    /// swaks' exit code: 0 accepted; 24 no recipient accepted; others see swaks(1).
    pub code: i32,
    pub transcript: String,
}

impl SwaksResult {
    /// The server's reply lines to RCPT TO (`<** 450 ...` or `<- 250 ...`).
    pub fn rcpt_reply(&self) -> String {
        self.reply_to("RCPT TO:")
    }

    /// The first server line after the first client line containing `command`.
    pub fn reply_to(&self, command: &str) -> String {
        let mut lines = self
            .transcript
            .lines()
            .skip_while(|l| !l.contains(command))
            .skip(1)
            .skip_while(|l| !l.starts_with('<'));
        lines.next().unwrap_or("").to_string()
    }
}

impl Swaks {
    /// A conversation with the SMTP server at `server` (`host:port`).
    pub fn at(server: &str) -> Self {
        Swaks {
            server: server.to_string(),
            args: vec![
                "--helo".into(),
                "client.example.net".into(),
                "--timeout".into(),
                "20".into(),
            ],
        }
    }

    pub fn arg(mut self, k: &str, v: &str) -> Self {
        self.args.push(k.into());
        self.args.push(v.into());
        self
    }

    /// An option without a value (`--pipeline`, `--tls`).
    pub fn flag(mut self, k: &str) -> Self {
        self.args.push(k.into());
        self
    }

    /// Connects from this local address (another loopback address stands in for another
    /// host).
    pub fn local(self, addr: &str) -> Self {
        self.arg("--local-interface", addr)
    }

    /// Presents the client as `addr` (IPv4, or IPv6 written plainly) named `name` via XCLIENT.
    pub fn client(self, addr: &str, name: &str) -> Self {
        let addr = if addr.contains(':') {
            format!("IPV6:{addr}")
        } else {
            addr.to_string()
        };
        self.arg("--xclient-addr", &addr)
            .arg("--xclient-name", name)
    }

    pub fn from(self, a: &str) -> Self {
        self.arg("--from", a)
    }

    pub fn to(self, a: &str) -> Self {
        self.arg("--to", a)
    }

    /// A unique Subject to find the delivered message by.
    pub fn subject(self, s: &str) -> Self {
        self.arg("--header", &format!("Subject: {s}"))
    }

    /// Stop after RCPT: enough to see the greylisting answer, nothing sent.
    pub fn rcpt_only(mut self) -> Self {
        self.args.push("--quit-after".into());
        self.args.push("RCPT".into());
        self
    }

    pub fn run(self) -> SwaksResult {
        let out = Command::new("/usr/bin/swaks")
            .arg("--server")
            .arg(&self.server)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .expect("run swaks");
        SwaksResult {
            code: out.status.code().unwrap_or(-1),
            transcript: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// Asserts `X-Greylist: delayed N seconds by greygate-... at HOST; ...` with N plausible for
/// `delay` (and the host, when given).
pub fn assert_x_greylist(header: &str, delay: u64, host: Option<&str>) {
    let n: u64 = header
        .strip_prefix("X-Greylist: delayed ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("malformed header {header:?}"));
    assert!(
        (delay..=delay + 15).contains(&n),
        "delayed {n} s for a {delay} s delay: {header}"
    );
    assert!(header.contains(" seconds by greygate-"), "{header}");
    if let Some(host) = host {
        assert!(header.contains(&format!(" at {host}; ")), "{header}");
    }
}

/// A standalone `smtp-sink` on a free port of 127.0.0.1, as a destination for an MTA under
/// test: it takes every message (and throws it away) unless `args` say otherwise (`-f
/// RCPT`: 5xx at RCPT; `-r RCPT`: 4xx). Stopped on drop. Needs root (it runs as `postfix`).
pub struct SmtpSink {
    pub port: u16,
    child: Child,
}

impl SmtpSink {
    pub fn start(args: &[&str]) -> SmtpSink {
        let port = free_port();
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "postfix"])
            .args(args)
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");
        wait_port(port);
        SmtpSink { port, child }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
