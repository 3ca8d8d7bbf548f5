//! The milter front end end to end: miltertest (Lua scripts in `tests/milter/`) and a real
//! Postfix with `smtpd_milters` drive the real daemon.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::postfix::{self, Policy, Postfix};
use crate::harness::{DaemonConfig, peers_required, read_some};

const MILTERTEST: &str = "/usr/bin/miltertest";

fn miltertest_available(test: &str) -> bool {
    if Path::new(MILTERTEST).exists() {
        return true;
    }
    let why = "miltertest is not installed (scripts/test installs it)";
    assert!(!peers_required(), "{test}: {why}");
    eprintln!("skipped {test}: {why}");
    false
}

/// Runs a script from `tests/milter/` with `-D name=value` globals; returns (ok, output).
fn miltertest(script: &str, globals: &[(&str, String)]) -> (bool, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/milter")
        .join(script);
    let mut cmd = Command::new(MILTERTEST);
    for (k, v) in globals {
        cmd.arg("-D").arg(format!("{k}={v}"));
    }
    let out = cmd
        .arg("-s")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run miltertest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn miltertest_greylists_then_accepts_with_a_header() {
    if !miltertest_available("miltertest_greylists_then_accepts_with_a_header") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 2\n[milter]\nreply_code = \"451 4.7.1\"\n")
        .listen(&[])
        .milter(&["127.0.0.1:0"])
        .start();
    let port = d.milter_tcp().port().to_string();
    let (ok, out) = miltertest("greylist.lua", &[("port", port), ("delay", "2".into())]);
    assert!(ok, "miltertest failed:\n{out}\ngreygate log:\n{}", d.log());
    assert!(out.contains("X-Greylist: delayed "), "{out}");
    d.expect_log("rule=\"new\"");
    d.expect_log("rule=\"early-retry\"");
    d.expect_log("rule=\"delayed\"");
}

#[test]
fn miltertest_allow_listed_and_authenticated_clients_continue() {
    if !miltertest_available("miltertest_allow_listed_and_authenticated_clients_continue") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[allow]\nclients = [\"198.51.100.0/24\"]\n")
        .listen(&[])
        .milter(&["127.0.0.1:0"])
        .start();
    let port = d.milter_tcp().port().to_string();
    let (ok, out) = miltertest("skip.lua", &[("port", port)]);
    assert!(ok, "miltertest failed:\n{out}\ngreygate log:\n{}", d.log());
    d.expect_log("rule=\"allow-client-address\"");
    d.expect_log("rule=\"authenticated\"");
}

#[test]
fn bad_milter_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[milter]\nmax_frame = 4096\nio_timeout = \"1s\"\n")
        .listen(&[])
        .milter(&["127.0.0.1:0"])
        .start();
    let addr = d.milter_tcp();
    let mut keep = std::net::TcpStream::connect(addr).unwrap();
    for junk in [
        &b"\x00\x00\x00\x05Zjunk"[..],      // unknown command
        &b"\x7f\xff\xff\xff"[..],           // oversized
        &b"\x00\x00\x00\x00"[..],           // empty frame
        &b"\x00\x00\x00\x09C\x00Xjunk"[..], // bad connect family
        &b"\x00\x00\x00\x20O"[..],          // truncated: times out
    ] {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(&mut c, junk).unwrap();
        let mut buf = [0u8; 64];
        let n = read_some(&mut c, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without a reply to {junk:?}");
    }
    d.expect_log("malformed milter frame");
    d.expect_log("exceeds the limit of 4096");
    d.expect_log("milter frame not completed within io_timeout");
    // The daemon still negotiates on a connection opened before the junk.
    let mut neg = Vec::new();
    greygate::proto::milter::Command::OptNeg {
        version: 6,
        actions: 0x1ff,
        protocol: 0x1fffff,
    }
    .encode(&mut neg);
    std::io::Write::write_all(&mut keep, &neg).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = read_some(&mut keep, &mut buf).unwrap();
    assert!(
        n >= 17 && buf[4] == b'O',
        "negotiation answered: {:?}",
        &buf[..n]
    );
}

#[test]
fn postfix_smtpd_milters_defers_then_delivers_with_x_greylist() {
    if !postfix::available("postfix_smtpd_milters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("hostname = \"gw.test.invalid\"\n[greylist]\ndelay = 2\n")
        .listen(&[])
        .milter(&["127.0.0.1:0"])
        .start();
    let pf = Postfix::start(Policy::Milter(format!("inet:{}", d.milter_tcp())), &[]);
    let mail = |subject: &str| {
        pf.swaks()
            .client("192.0.2.80", "mail.example.net")
            .from("erin@example.net")
            .to("frank@example.org")
            .subject(subject)
            .run()
    };
    let first = mail("milter-1");
    assert_eq!(first.code, 24, "{}", first.transcript);
    let reply = first.rcpt_reply();
    assert!(
        reply.contains("451 4.7.1 Greylisted, please try again in"),
        "{reply}"
    );
    std::thread::sleep(Duration::from_millis(2300));
    let retry = mail("milter-2");
    assert_eq!(
        retry.code,
        0,
        "{}\nmaillog:\n{}",
        retry.transcript,
        pf.maillog()
    );
    let msg = pf.delivered("Subject: milter-2");
    let header = msg
        .lines()
        .find(|l| l.starts_with("X-Greylist: "))
        .unwrap_or_else(|| panic!("X-Greylist in the delivered message:\n{msg}"));
    assert!(
        header.contains(" seconds by greygate-") && header.contains(" at gw.test.invalid; "),
        "{header}"
    );
}

#[test]
fn postfix_accepts_mail_when_the_milter_is_down() {
    if !postfix::available("postfix_accepts_mail_when_the_milter_is_down") {
        return;
    }
    let port = postfix::free_port();
    let pf = Postfix::start(Policy::Milter(format!("inet:127.0.0.1:{port}")), &[]);
    let r = pf
        .swaks()
        .client("192.0.2.81", "mail.example.net")
        .from("a@example.net")
        .to("b@example.org")
        .subject("milter-down")
        .run();
    assert_eq!(
        r.code, 0,
        "milter_default_action = accept:\n{}",
        r.transcript
    );
    pf.delivered("Subject: milter-down");
}

/// The daemon's resident memory (`VmRSS` in `/proc/PID/status`), in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Sends `cmd` and, when `answer`, reads one reply frame.
fn milter_ask(
    c: &mut std::net::TcpStream,
    cmd: &greygate::proto::milter::Command,
    answer: bool,
) -> Option<greygate::proto::milter::Reply> {
    use greygate::proto::milter::{DEFAULT_MAX_FRAME, Decoded, decode_reply};
    use std::io::Write;
    let mut out = Vec::new();
    cmd.encode(&mut out);
    c.write_all(&out).unwrap();
    if !answer {
        return None;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Decoded::Frame(r, _) = decode_reply(&buf, DEFAULT_MAX_FRAME).unwrap() {
            return Some(r);
        }
        let n = read_some(c, &mut chunk).unwrap();
        assert!(n > 0, "milter closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connections the attack below opens at once.
const ATTACK_CONNECTIONS: usize = 100;
/// What those connections may add to the daemon's resident memory: each keeps at most
/// `[milter] max_macro_bytes` (64 KiB) of macros and a 16 KiB read buffer, about 10 MiB for
/// 100; the rest is room for the allocator's caches of the frames in flight. Before the
/// bound, each kept up to 64 macros of a whole frame (16 MiB): 1.65 GB for 100.
const ATTACK_RSS_BOUND: u64 = 64 << 20;

/// The attack that found the unbounded macros, against the real daemon: 100 milter
/// connections, each sending 64 macros of a whole frame (256 KiB) over all stages and a
/// frame of 10,000 small ones, then holding the connection open. The daemon's RSS grows by
/// less than [`ATTACK_RSS_BOUND`] while they are held, and it says it dropped macros.
#[test]
fn maximal_macros_on_100_connections_keep_the_daemon_small() {
    use greygate::proto::milter::{Command, DEFAULT_MAX_FRAME, Family, Reply};
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .listen(&[])
        .milter(&["127.0.0.1:0"])
        .args(&["--memory"])
        .start();
    let addr = d.milter_tcp();
    let before = rss(d.pid());
    // Frames made once (the macros are per connection, so all may send the same): names
    // and values that fill a frame, over all stages, then 10,000 small names.
    let value = "v".repeat(DEFAULT_MAX_FRAME - 64);
    let stages = [b'C', b'H', b'M', b'R', b'T', b'E', b'N'];
    let mut frames = Vec::new();
    for m in 0..64 {
        Command::Macros {
            for_cmd: stages[m % stages.len()],
            pairs: vec![(format!("{{m{m}}}"), value.clone())],
        }
        .encode(&mut frames);
    }
    Command::Macros {
        for_cmd: b'N',
        pairs: (0..10_000).map(|k| (format!("n{k}"), "v".into())).collect(),
    }
    .encode(&mut frames);
    let started = std::time::Instant::now();
    let conns: Vec<std::net::TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..ATTACK_CONNECTIONS)
            .map(|_| {
                let frames = &frames;
                scope.spawn(move || {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    let neg = Command::OptNeg {
                        version: 6,
                        actions: 0x1ff,
                        protocol: 0x1fffff,
                    };
                    let r = milter_ask(&mut c, &neg, true);
                    assert!(matches!(r, Some(Reply::OptNeg { .. })), "{r:?}");
                    let connect = Command::Connect {
                        hostname: "[192.0.2.1]".into(),
                        family: Family::Inet,
                        port: 25,
                        address: "192.0.2.1".into(),
                    };
                    assert_eq!(milter_ask(&mut c, &connect, true), Some(Reply::Continue));
                    std::io::Write::write_all(&mut c, frames).unwrap();
                    // A header is answered and clears no stage: every macro frame before it
                    // has been taken in once the answer is here.
                    let header = Command::Header {
                        name: "Subject".into(),
                        value: "x".into(),
                    };
                    assert_eq!(milter_ask(&mut c, &header, true), Some(Reply::Continue));
                    c
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(conns.len(), ATTACK_CONNECTIONS);
    // The allocator hands freed frames back after a short delay.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss(d.pid());
    let grown = after.saturating_sub(before);
    eprintln!(
        "{ATTACK_CONNECTIONS} connections of maximal macros in {:?}: RSS {} -> {} MiB",
        started.elapsed(),
        before >> 20,
        after >> 20
    );
    assert!(
        grown < ATTACK_RSS_BOUND,
        "RSS grew by {} MiB (bound {} MiB)",
        grown >> 20,
        ATTACK_RSS_BOUND >> 20
    );
    d.expect_log("milter macros over the connection's limits were dropped");
    drop(conns);
}
