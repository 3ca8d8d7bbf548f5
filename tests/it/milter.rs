//! The milter front end end to end: miltertest (Lua scripts in `tests/milter/`) and a real
//! Postfix with `smtpd_milters` drive the real daemon.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::postfix::{self, Policy, Postfix};
use crate::harness::{DaemonConfig, peers_required};

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
        let n = std::io::Read::read(&mut c, &mut buf).unwrap_or(0);
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
    let n = std::io::Read::read(&mut keep, &mut buf).unwrap();
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
