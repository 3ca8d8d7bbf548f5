//! End to end through a real Postfix 3.7 (Debian package): swaks talks SMTP to a private
//! Postfix whose `check_policy_service` asks the real greygate daemon; accepted mail is
//! relayed to smtp-sink and read back from its dump files.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::postfix::{self, Policy, Postfix, assert_x_greylist};
use crate::harness::{Daemon, DaemonConfig};

/// The delay of tests that wait for a retry to pass.
const DELAY: u64 = 2;
/// The delay of tests that only look at deferrals: long enough that no retry in the test
/// can pass, however slowly the machine runs.
const LONG: u64 = 300;

fn greygate_toml(delay: u64, extra: &str) -> String {
    format!("hostname = \"gw.test.invalid\"\n[greylist]\ndelay = {delay}\n{extra}")
}

/// A greygate daemon and a Postfix that asks it over TCP.
struct Site {
    greygate: Daemon,
    postfix: Postfix,
    _dir: tempfile::TempDir,
}

fn site(
    test: &str,
    delay: u64,
    greylist_extra: &str,
    sections: &str,
    args: &[&str],
) -> Option<Site> {
    if !postfix::available(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let greygate = DaemonConfig::new(dir.path())
        .toml(&format!(
            "{}{sections}",
            greygate_toml(delay, greylist_extra)
        ))
        .args(args)
        .start();
    let postfix = Postfix::start(Policy::Service(format!("inet:{}", greygate.tcp())), &[]);
    Some(Site {
        greygate,
        postfix,
        _dir: dir,
    })
}

fn wait_delay() {
    std::thread::sleep(Duration::from_millis(DELAY * 1000 + 300));
}

#[test]
fn first_attempt_is_greylisted_and_an_early_retry_too() {
    let Some(s) = site("first_attempt_is_greylisted", LONG, "", "", &[]) else {
        return;
    };
    let attempt = || {
        s.postfix
            .swaks()
            .client("192.0.2.10", "mail.example.net")
            .from("alice@example.net")
            .to("bob@example.org")
            .rcpt_only()
            .run()
    };
    for round in ["first", "early retry"] {
        let r = attempt();
        assert_eq!(
            r.code, 24,
            "{round}: no recipient accepted:\n{}",
            r.transcript
        );
        let reply = r.rcpt_reply();
        assert!(
            reply.contains("450 4.7.1 <bob@example.org>: Recipient address rejected: Greylisted"),
            "{round}: greylisting reply: {reply}"
        );
    }
    let log = s.postfix.maillog();
    assert!(
        log.contains("NOQUEUE: reject: RCPT from mail.example.net[192.0.2.10]: 450 4.7.1"),
        "{log}"
    );
    s.greygate.expect_log("rule=\"early-retry\"");
}

#[test]
fn retry_after_the_delay_is_delivered_with_x_greylist() {
    let Some(s) = site("retry_after_the_delay", DELAY, "", "", &[]) else {
        return;
    };
    let mail = |subject: &str| {
        s.postfix
            .swaks()
            .client("192.0.2.20", "mail.example.net")
            .from("carol@example.net")
            .to("dave@example.org")
            .subject(subject)
            .run()
    };
    let first = mail("retry-1");
    assert_eq!(first.code, 24, "{}", first.transcript);
    wait_delay();
    let retry = mail("retry-2");
    assert_eq!(retry.code, 0, "retry accepted:\n{}", retry.transcript);
    assert!(retry.rcpt_reply().contains("250"), "{}", retry.transcript);
    let msg = s.postfix.delivered("Subject: retry-2");
    let header = msg
        .lines()
        .find(|l| l.starts_with("X-Greylist: "))
        .unwrap_or_else(|| panic!("X-Greylist header in the delivered message:\n{msg}"));
    assert_x_greylist(header, DELAY, None);
    assert!(header.contains(" at gw.test.invalid; "), "{header}");
    // Later mail of the same triplet passes without another header.
    let again = mail("retry-3");
    assert_eq!(again.code, 0, "{}", again.transcript);
    let msg = s.postfix.delivered("Subject: retry-3");
    assert!(!msg.contains("X-Greylist:"), "{msg}");
}

#[test]
fn retries_count_per_client_network_ipv4_24_and_ipv6_64() {
    let Some(s) = site("retries_count_per_client_network", DELAY, "", "", &[]) else {
        return;
    };
    let rcpt = |ip: &str| {
        s.postfix
            .swaks()
            .client(ip, "pool.example.net")
            .from("news@example.net")
            .to("eve@example.org")
            .rcpt_only()
            .run()
    };
    assert_eq!(rcpt("192.0.2.30").code, 24, "IPv4 first attempt");
    assert_eq!(rcpt("2001:db8:1:2::30").code, 24, "IPv6 first attempt");
    wait_delay();
    let same24 = rcpt("192.0.2.231");
    assert_eq!(
        same24.code, 0,
        "same /24 retries successfully:\n{}",
        same24.transcript
    );
    let other24 = rcpt("192.0.3.30");
    assert_eq!(
        other24.code, 24,
        "another /24 is a new triplet:\n{}",
        other24.transcript
    );
    let same64 = rcpt("2001:db8:1:2::ffff");
    assert_eq!(
        same64.code, 0,
        "same /64 retries successfully:\n{}",
        same64.transcript
    );
    let other64 = rcpt("2001:db8:1:3::30");
    assert_eq!(
        other64.code, 24,
        "another /64 is a new triplet:\n{}",
        other64.transcript
    );
    s.greygate.expect_log("group=\"2001:db8:1:2::/64\"");
}

#[test]
fn auto_allowed_client_group_is_accepted_on_first_try() {
    let Some(s) = site(
        "auto_allowed_client_group",
        DELAY,
        "auto_allow_after = 1\n",
        "",
        &[],
    ) else {
        return;
    };
    let rcpt = |ip: &str, from: &str, to: &str| {
        s.postfix
            .swaks()
            .client(ip, "relay.example.net")
            .from(from)
            .to(to)
            .rcpt_only()
            .run()
    };
    assert_eq!(
        rcpt("198.51.100.40", "a@example.net", "b@example.org").code,
        24
    );
    wait_delay();
    assert_eq!(
        rcpt("198.51.100.40", "a@example.net", "b@example.org").code,
        0
    );
    let fresh = rcpt("198.51.100.41", "someone-new@example.com", "c@example.org");
    assert_eq!(
        fresh.code, 0,
        "new triplet from an auto-allowed /24:\n{}",
        fresh.transcript
    );
    s.greygate.expect_log("rule=\"auto-allow\"");
    let stranger = rcpt("203.0.113.41", "someone-new@example.com", "c@example.org");
    assert_eq!(stranger.code, 24, "other networks still greylisted");
}

#[test]
fn allow_lists_and_authenticated_clients_skip_greylisting() {
    let allow = "[allow]\nclients = [\"198.51.100.0/24\", \".trusted.example\"]\n";
    let Some(s) = site(
        "allow_lists_and_authenticated_clients",
        LONG,
        "",
        allow,
        &[],
    ) else {
        return;
    };
    let cases = [
        (
            "by CIDR",
            "198.51.100.7",
            "unknown",
            "x@example.net",
            "y@example.org",
            None,
        ),
        (
            "by host name suffix",
            "203.0.113.5",
            "mx1.trusted.example",
            "x@example.net",
            "y@example.org",
            None,
        ),
        (
            "postmaster@",
            "203.0.113.6",
            "unknown",
            "x@example.net",
            "postmaster@example.org",
            None,
        ),
        (
            "SASL via XCLIENT LOGIN",
            "203.0.113.7",
            "unknown",
            "x@example.net",
            "y@example.org",
            Some("alice"),
        ),
    ];
    for (what, ip, name, from, to, login) in cases {
        let mut run = s
            .postfix
            .swaks()
            .client(ip, name)
            .from(from)
            .to(to)
            .rcpt_only();
        if let Some(user) = login {
            run = run.arg("--xclient-login", user);
        }
        let r = run.run();
        assert_eq!(
            r.code, 0,
            "{what}: accepted on first try:\n{}",
            r.transcript
        );
    }
    for rule in [
        "allow-client-address",
        "allow-client-name",
        "allow-recipient",
        "authenticated",
    ] {
        s.greygate.expect_log(&format!("rule=\"{rule}\""));
    }
    // The control: the same mail from an ordinary client is greylisted.
    let r = s
        .postfix
        .swaks()
        .client("203.0.113.8", "unknown")
        .from("x@example.net")
        .to("y@example.org")
        .rcpt_only()
        .run();
    assert_eq!(r.code, 24, "{}", r.transcript);
}

#[test]
fn mail_flows_when_greygate_is_down_or_its_store_fails() {
    if !postfix::available("mail_flows_when_greygate_is_down") {
        return;
    }
    // greygate stopped: Postfix's default_action=DUNNO accepts.
    let dir = tempfile::tempdir().unwrap();
    let gg = DaemonConfig::new(dir.path())
        .toml(&greygate_toml(DELAY, ""))
        .start();
    let pf = Postfix::start(Policy::Service(format!("inet:{}", gg.tcp())), &[]);
    let (status, _) = gg.terminate();
    assert!(status.success());
    let r = pf
        .swaks()
        .client("192.0.2.50", "mail.example.net")
        .from("a@example.net")
        .to("b@example.org")
        .subject("greygate-down")
        .run();
    assert_eq!(
        r.code, 0,
        "accepted while greygate is down:\n{}",
        r.transcript
    );
    pf.delivered("Subject: greygate-down");
    let log = pf.maillog();
    assert!(
        log.contains("problem talking to server"),
        "Postfix notes the unreachable policy service:\n{log}"
    );

    // greygate running, its store failing: fail-open, and the log says why.
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml(&greygate_toml(LONG, ""));
    let _lock = redb::Database::create(cfg.db_path()).expect("hold the store lock");
    let gg = cfg.start();
    let pf = Postfix::start(Policy::Service(format!("inet:{}", gg.tcp())), &[]);
    let r = pf
        .swaks()
        .client("192.0.2.51", "mail.example.net")
        .from("a@example.net")
        .to("b@example.org")
        .subject("store-down")
        .run();
    assert_eq!(
        r.code, 0,
        "accepted while the store fails:\n{}",
        r.transcript
    );
    pf.delivered("Subject: store-down");
    gg.expect_log("rule=\"store-fail-open\"");
    gg.expect_log("locked by another process");
}

#[test]
fn learn_mode_accepts_everything_and_logs_what_it_would_do() {
    let Some(s) = site("learn_mode", LONG, "", "", &["--learn"]) else {
        return;
    };
    for ip in ["192.0.2.60", "192.0.2.61"] {
        let r = s
            .postfix
            .swaks()
            .client(ip, "mail.example.net")
            .from(&format!("u{ip}@example.net"))
            .to("b@example.org")
            .rcpt_only()
            .run();
        assert_eq!(r.code, 0, "learn mode accepts:\n{}", r.transcript);
    }
    s.greygate.expect_log("would=\"defer\"");
    s.greygate.expect_log("rule=\"new\"");
}

#[test]
fn policy_service_over_a_unix_socket() {
    if !postfix::available("policy_service_over_a_unix_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // smtpd runs as `postfix` and must reach the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("policy.sock");
    let gg = DaemonConfig::new(dir.path())
        .toml(&greygate_toml(DELAY, ""))
        .listen(&[&format!("unix:{}", sock.display())])
        .start();
    let pf = Postfix::start(Policy::Service(format!("unix:{}", sock.display())), &[]);
    let mail = |subject: &str| {
        pf.swaks()
            .client("192.0.2.70", "mail.example.net")
            .from("a@example.net")
            .to("b@example.org")
            .subject(subject)
            .run()
    };
    let first = mail("unix-1");
    assert_eq!(first.code, 24, "{}", first.transcript);
    assert!(
        first.rcpt_reply().contains("450 4.7.1"),
        "{}",
        first.transcript
    );
    wait_delay();
    assert_eq!(mail("unix-2").code, 0);
    assert!(
        pf.delivered("Subject: unix-2")
            .contains("X-Greylist: delayed")
    );
    gg.expect_log("rule=\"delayed\"");
}
