//! DNS servers on loopback for tests: a private dnsmasq answering only from records given on
//! its command line, and a "server" that never answers.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::peers_required;
use super::postfix::free_port;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Whether `bin` exists; otherwise skip (or fail under GREYGATE_REQUIRE_PEERS=1).
pub fn have(test: &str, bin: &str, package: &str) -> bool {
    if Path::new(bin).exists() {
        return true;
    }
    let why = format!("{bin} is not installed (Debian package {package})");
    assert!(!peers_required(), "{test}: real peer required but {why}");
    eprintln!("skipped {test}: {why}");
    false
}

/// Whether dnsmasq can be started (see [`have`]).
pub fn dnsmasq_available(test: &str) -> bool {
    have(test, DNSMASQ, "dnsmasq-base")
}

/// A private dnsmasq answering from command-line records only. Killed on drop.
pub struct Dnsmasq {
    pub port: u16,
    child: Child,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 with `records` (`--txt-record=...`, `--host-record=...`,
    /// `--local=/zone/` for zones whose missing names must be NXDOMAIN rather than refused).
    pub fn start(records: &[String]) -> Dnsmasq {
        let port = free_port();
        let mut child = Command::new(DNSMASQ)
            .args([
                "--no-daemon",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",
                // Answer for .test from the records given (NODATA, NXDOMAIN) instead of
                // refusing for want of an upstream server.
                "--local=/test/",
            ])
            .arg(format!("--port={port}"))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("started") => break,
                Some(Ok(_)) => {}
                _ => panic!("dnsmasq did not start"),
            }
            assert!(Instant::now() < deadline, "dnsmasq did not start");
        }
        // Keep draining so dnsmasq never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Dnsmasq { port, child }
    }

    /// `127.0.0.1:PORT`, for `[dns] resolver` and `--resolver`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bound UDP port that reads nothing and answers nothing: a DNS server that is down or
/// cut off. Closed on drop.
pub struct SilentDns {
    sock: UdpSocket,
}

impl SilentDns {
    pub fn start() -> SilentDns {
        SilentDns {
            sock: UdpSocket::bind("127.0.0.1:0").expect("bind UDP"),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local address")
    }
}
