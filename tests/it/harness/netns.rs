//! A multi-host test bed on one machine: four network namespaces (`mx1`, `mx2`, `mx3` and
//! `store`), each with its own address on a private /24, joined by a Linux bridge that
//! lives in a fifth namespace of its own (the "switch"). Nothing is added to the machine's
//! own namespace: every interface of the bed is created directly inside the bed's
//! namespaces, so its traffic can go nowhere else, and two beds (parallel tests) never see
//! each other even when their addresses are alike.
//!
//! ```text
//!   mx1 eth0 10.201.N.11 ─┐
//!   mx2 eth0 10.201.N.12 ─┤ veth ── port `mx2` ─ br0 (switch namespace)
//!   mx3 eth0 10.201.N.13 ─┤
//! store eth0 10.201.N.20 ─┘
//! ```
//!
//! A process runs inside a host with [`enter`] (its `Command` joins the namespace before
//! `exec`; its children stay there), and test code talks from inside one with [`run_in`]
//! (a thread that joins the namespace: sockets it opens belong there, whichever thread
//! uses them later). [`Bed::cut`] takes a host's switch port down, as a pulled cable or a
//! dead switch port would: the host keeps its address and routes, and what it sends is
//! lost without an answer, so open connections hang rather than fail; [`Bed::restore`]
//! brings the port back.
//!
//! Namespace names carry the test process's id (`ggtb-PID-N-HOST`): dropping the bed
//! deletes its namespaces (with any process still in them) even when the test failed, and
//! the first bed of a run deletes those left by a run that was killed, whose process is
//! gone. Needs root and iproute2's `ip`; without them the tests skip with a printed reason
//! under plain `cargo test` and fail under the README's test command
//! (`GREYGATE_REQUIRE_PEERS=1`).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::peers_required;

/// Every namespace of every bed starts with this.
const PREFIX: &str = "ggtb-";
/// The hosts of a bed and the last byte of their addresses.
const HOSTS: [(&str, u8); 4] = [("mx1", 11), ("mx2", 12), ("mx3", 13), ("store", 20)];

/// Beds made by this process so far (part of each bed's names and subnet).
static BEDS: AtomicU32 = AtomicU32::new(0);
static STALE: Once = Once::new();

fn ip_bin() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Opens the namespace file of `ns` (made by `ip netns add`).
fn ns_file(ns: &str) -> OwnedFd {
    let path = format!("/run/netns/{ns}");
    OwnedFd::from(File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}")))
}

/// Makes `cmd` run inside the network namespace `ns`: the child joins it before `exec`,
/// so the program and everything it starts live there.
pub fn enter(cmd: &mut Command, ns: &str) {
    use std::os::unix::process::CommandExt;
    let fd = ns_file(ns);
    // SAFETY: setns(2) is a plain system call, async-signal-safe; the descriptor is owned
    // by the closure, so it stays open until the child has joined.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Runs `f` on a thread inside the network namespace `ns` and returns what it returns.
/// Sockets it opens belong to that namespace for good.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let fd = ns_file(ns);
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on this thread only (a network namespace is per thread).
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            drop(fd);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A TCP connection to `to` made from inside `ns`.
pub fn connect(ns: &str, to: SocketAddr) -> TcpStream {
    run_in(ns, || TcpStream::connect(to)).unwrap_or_else(|e| panic!("connect {to} in {ns}: {e}"))
}

/// A TCP connection attempt from inside `ns` that gives up after `timeout`.
pub fn try_connect(ns: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    run_in(ns, || TcpStream::connect_timeout(&to, timeout))
}

/// Runs `ip ARGS`; panics with its output when it fails.
fn ip(bin: &str, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS` and returns its standard output; failures give "".
fn ip_out(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Kills every process still in namespace `ns` (by the ids `ip netns pids` gives), then
/// deletes the namespace, and with it its interfaces.
fn remove_ns(bin: &str, ns: &str) {
    for pid in ip_out(bin, &["netns", "pids", ns])
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a process inside a namespace this harness made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new(bin)
        .args(["netns", "del", ns])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Deletes the namespaces of beds whose test process is gone (a run killed before its
/// beds were dropped), with the processes still in them. Beds of live processes, this
/// one's included, are left alone. The first bed of a run calls it.
pub fn clean_stale() {
    let Some(bin) = ip_bin() else {
        return;
    };
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let own = std::process::id();
    for name in dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(pid_i) = i32::try_from(pid) else {
            continue;
        };
        if pid != own && !alive(pid_i) {
            eprintln!("removing stale test namespace {name}");
            remove_ns(bin, &name);
        }
    }
}

/// [`clean_stale`], the first time this process calls it (every bed does); returns once
/// that cleanup is over, whichever thread ran it.
pub fn clean_stale_once() {
    STALE.call_once(clean_stale);
}

/// Whether this machine can build a bed (root, iproute2): false (after printing why) when
/// the test should be skipped; panics instead when real peers are required.
pub fn available(test: &str) -> bool {
    let why = match ip_bin() {
        None => "iproute2's ip is not installed (scripts/test installs iproute2)",
        Some(_) if !is_root() => "network namespaces need root",
        Some(_) => return true,
    };
    assert!(
        !peers_required(),
        "{test}: a multi-host test bed needs {why}"
    );
    eprintln!("skipped {test}: {why}");
    false
}

/// One host of the bed.
pub struct Host {
    /// `mx1`, `mx2`, `mx3` or `store`.
    pub name: &'static str,
    /// Its namespace (`ggtb-PID-N-NAME`).
    pub ns: String,
    /// Its address on the bed's /24.
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` as a command that runs on this host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, &self.ns);
        cmd
    }

    /// Runs `f` on this host (see [`run_in`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.ns, f)
    }
}

/// The four hosts and their switch. Dropping it removes every namespace it made.
pub struct Bed {
    ip: &'static str,
    /// The switch's namespace, where the bridge and the hosts' ports are.
    switch: String,
    pub hosts: Vec<Host>,
    /// The bed's network, `10.201.N.0/24`.
    pub subnet: String,
}

impl Bed {
    /// Builds a bed, or returns `None` (after printing why) when this machine cannot and
    /// real peers are not required; panics when they are.
    pub fn start(test: &str) -> Option<Bed> {
        if !available(test) {
            return None;
        }
        let bin = ip_bin().expect("available");
        clean_stale_once();

        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        // Beds cannot reach each other whatever their addresses; a subnet per bed only
        // keeps logs of parallel tests apart.
        let net = u8::try_from(n % 250 + 1).expect("below 251");
        let bed = Bed {
            ip: bin,
            switch: format!("{base}-sw"),
            hosts: HOSTS
                .iter()
                .map(|&(name, last)| Host {
                    name,
                    ns: format!("{base}-{name}"),
                    addr: Ipv4Addr::new(10, 201, net, last),
                })
                .collect(),
            subnet: format!("10.201.{net}.0/24"),
        };
        // From here on a failure drops `bed`, which removes whatever was made.
        let sw = bed.switch.clone();
        ip(bin, &["netns", "add", &sw]);
        ip(bin, &["-n", &sw, "link", "set", "dev", "lo", "up"]);
        ip(
            bin,
            &[
                "-n",
                &sw,
                "link",
                "add",
                "name",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        );
        ip(bin, &["-n", &sw, "link", "set", "dev", "br0", "up"]);
        for h in &bed.hosts {
            ip(bin, &["netns", "add", &h.ns]);
            // The host's end is made directly in its namespace, the switch's end in the
            // switch's: nothing ever appears in the machine's own namespace.
            ip(
                bin,
                &[
                    "-n", &sw, "link", "add", "name", h.name, "type", "veth", "peer", "name",
                    "eth0", "netns", &h.ns,
                ],
            );
            ip(
                bin,
                &["-n", &sw, "link", "set", "dev", h.name, "master", "br0"],
            );
            ip(bin, &["-n", &sw, "link", "set", "dev", h.name, "up"]);
            let cidr = format!("{}/24", h.addr);
            ip(bin, &["-n", &h.ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(bin, &["-n", &h.ns, "link", "set", "dev", "eth0", "up"]);
            ip(bin, &["-n", &h.ns, "link", "set", "dev", "lo", "up"]);
        }
        for h in &bed.hosts {
            bed.wait_carrier(h, true);
        }
        Some(bed)
    }

    /// The host called `name` (`mx1`, `mx2`, `mx3`, `store`).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the bed"))
    }

    /// Takes `name`'s switch port down: the host is cut off from every other host.
    pub fn cut(&self, name: &str) {
        let h = self.host(name);
        ip(
            self.ip,
            &["-n", &self.switch, "link", "set", "dev", h.name, "down"],
        );
        self.wait_carrier(h, false);
    }

    /// Brings `name`'s switch port back up.
    pub fn restore(&self, name: &str) {
        let h = self.host(name);
        ip(
            self.ip,
            &["-n", &self.switch, "link", "set", "dev", h.name, "up"],
        );
        self.wait_carrier(h, true);
    }

    /// Waits (bounded) until the host's `eth0` has, or has lost, its carrier.
    fn wait_carrier(&self, h: &Host, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let link = ip_out(self.ip, &["-n", &h.ns, "-o", "link", "show", "dev", "eth0"]);
            if link.contains("LOWER_UP") == up && !link.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: eth0 carrier never became {}: {link}",
                h.ns,
                if up { "up" } else { "down" }
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The namespaces of this bed that exist now (for checking the cleanup).
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.ns.clone())
            .chain([self.switch.clone()])
            .collect()
    }
}

/// Whether namespace `ns` exists.
pub fn exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

impl Drop for Bed {
    fn drop(&mut self) {
        for ns in self.namespaces() {
            remove_ns(self.ip, &ns);
        }
    }
}
