//! The policy server end to end: the real daemon over TCP and Unix sockets, driven with raw
//! protocol bytes.

use std::time::{Duration, Instant};

use crate::harness::{DaemonConfig, PolicyClient, fixture_request, rcpt_request, request_with};

/// For tests that wait for a retry to pass.
const SHORT: &str = "[greylist]\ndelay = 2\n";
/// For tests that only look at deferrals: no retry in the test can pass, however slow.
const LONG: &str = "[greylist]\ndelay = 300\n";

fn is_defer(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT ")
}

#[test]
fn defer_then_early_retry_then_pass_after_delay() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(SHORT).start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.10", "alice@example.net", "bob@example.org");

    let first = c.ask(&req);
    assert_eq!(
        first,
        "DEFER_IF_PERMIT Greylisted, please try again in 2 seconds"
    );
    let early = c.ask(&req);
    assert!(is_defer(&early), "early retry deferred again: {early}");

    std::thread::sleep(Duration::from_millis(2200));
    let pass = c.ask(&req);
    let delayed: u64 = pass
        .strip_prefix("PREPEND X-Greylist: delayed ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pass after the delay adds the header: {pass}"));
    assert!((2..=15).contains(&delayed), "{pass}");
    assert!(pass.contains(" seconds by greygate-"), "{pass}");
    assert!(pass.contains(" at ") && pass.ends_with("+0000"), "{pass}");
    assert_eq!(
        c.ask(&req),
        "DUNNO",
        "known triplet passes without a header"
    );

    for rule in [
        "rule=\"new\"",
        "rule=\"early-retry\"",
        "rule=\"delayed\"",
        "rule=\"known\"",
    ] {
        d.expect_log(rule);
    }
}

#[test]
fn several_listeners_tcp_and_unix_share_one_database() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("policy.sock");
    let unix = format!("unix:{}", sock.display());
    let d = DaemonConfig::new(dir.path())
        .toml(SHORT)
        .listen(&["127.0.0.1:0", &unix])
        .start();
    assert!(d.listeners.contains(&unix), "{:?}", d.listeners);

    let req = rcpt_request("198.51.100.20", "carol@example.net", "dave@example.org");
    let mut over_unix = PolicyClient::unix(&sock);
    assert!(
        is_defer(&over_unix.ask(&req)),
        "first attempt over the Unix socket deferred"
    );
    std::thread::sleep(Duration::from_millis(2200));
    let mut over_tcp = d.client();
    let pass = over_tcp.ask(&req);
    assert!(
        pass.starts_with("PREPEND X-Greylist:"),
        "retry over TCP passes: {pass}"
    );

    let (status, _) = d.terminate();
    assert!(status.success());
    assert!(!sock.exists(), "socket file removed at shutdown");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(LONG).start();
    let mut c = d.client();
    let mut batch = String::new();
    batch += &rcpt_request("203.0.113.5", "a@example.net", "x@example.org");
    batch += &rcpt_request("203.0.113.5", "a@example.net", "postmaster@example.org");
    batch += &request_with(
        "203.0.113.5",
        "a@example.net",
        "y@example.org",
        &[("protocol_state", "DATA")],
    );
    batch += "request=junk_policy\nfoo=bar\n\n";
    batch += &request_with(
        "203.0.113.5",
        "a@example.net",
        "z@example.org",
        &[("sasl_username", "joe")],
    );
    batch += &rcpt_request("203.0.113.5", "a@example.net", "x@example.org");
    c.send(batch.as_bytes()).unwrap();
    let replies = c.read_replies(6);
    assert!(is_defer(&replies[0]), "{replies:?}");
    assert_eq!(
        &replies[1..5],
        ["DUNNO", "DUNNO", "DUNNO", "DUNNO"],
        "{replies:?}"
    );
    assert!(
        is_defer(&replies[5]),
        "repeat of the first is an early retry: {replies:?}"
    );
    for rule in [
        "allow-recipient",
        "not-rcpt-stage",
        "authenticated",
        "early-retry",
    ] {
        d.expect_log(&format!("rule=\"{rule}\""));
    }
}

#[test]
fn captured_postfix_request_is_greylisted_per_ipv6_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(LONG).start();
    let mut c = d.client();
    let fixture = fixture_request();
    assert!(is_defer(&c.ask(&fixture)));
    assert!(
        d.wait_log("group=\"2001:db8::/64\"", Duration::from_secs(2)),
        "client grouped per /64:\n{}",
        d.log()
    );
    // Another host of the same /64 with the same sender (its +extension differs) is the
    // same triplet: an early retry, not a new one.
    let sibling = fixture
        .replace("client_address=2001:db8::25", "client_address=2001:db8::99")
        .replace("sender=bounce+x@example.net", "sender=Bounce+y@Example.NET");
    assert!(is_defer(&c.ask(&sibling)));
    assert!(
        d.wait_log("rule=\"early-retry\"", Duration::from_secs(2)),
        "{}",
        d.log()
    );
}

#[test]
fn oversized_line_closes_the_connection_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[policy]\nmax_line_length = 1024\n")
        .start();
    let mut c = d.client();
    let mut req = rcpt_request("192.0.2.1", "a@example.net", "b@example.org");
    req.insert_str(0, &format!("ccert_subject={}\n", "A".repeat(5000)));
    let _ = c.send(req.as_bytes());
    let got = c
        .closed_within(Duration::from_secs(5))
        .expect("connection closed");
    assert!(got.is_empty(), "no reply to a bad request: {got:?}");
    d.expect_log("malformed policy request");
    d.expect_log("line longer than 1024 bytes");
    d.expect_log("peer=\"127.0.0.1:");
    let mut again = d.client();
    assert!(is_defer(&again.ask(&rcpt_request(
        "192.0.2.1",
        "a@example.net",
        "b@example.org"
    ))));
}

#[test]
fn binary_junk_and_truncated_requests_are_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).start();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let junk: Vec<u8> = (0..3000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    for bytes in [
        junk.as_slice(),
        b"\x00\x01\x02\n\n",
        b"no equals sign here\n\n",
        b"=value\n\n",
    ] {
        let mut c = d.client();
        let _ = c.send(bytes);
        let got = c
            .closed_within(Duration::from_secs(5))
            .expect("connection closed");
        assert!(got.is_empty(), "no reply to junk: {got:?}");
    }
    // A request cut off by the client closing is dropped quietly.
    let mut c = d.client();
    c.send(b"request=smtpd_access_policy\nprotocol_state=RC")
        .unwrap();
    drop(c);
    let mut c = d.client();
    assert!(is_defer(&c.ask(&rcpt_request(
        "192.0.2.77",
        "a@example.net",
        "b@example.org"
    ))));
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.log().matches("malformed policy request").count() < 4 {
        assert!(
            Instant::now() < deadline,
            "each junk connection logged:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_and_stalled_connections_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[policy]\nidle_timeout = \"1s\"\nio_timeout = \"1s\"\n")
        .start();
    let mut idle = d.client();
    assert!(is_defer(&idle.ask(&rcpt_request(
        "192.0.2.3",
        "a@example.net",
        "b@example.org"
    ))));
    let t = Instant::now();
    assert!(
        idle.closed_within(Duration::from_secs(5)).is_some(),
        "idle connection closed"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "not before the idle timeout"
    );

    let mut stalled = d.client();
    stalled
        .send(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        .unwrap();
    assert!(
        stalled.closed_within(Duration::from_secs(5)).is_some(),
        "stalled request closed"
    );
    assert!(
        d.wait_log(
            "request not completed within io_timeout",
            Duration::from_secs(2)
        ),
        "{}",
        d.log()
    );
}

#[test]
fn connections_over_the_limit_are_closed_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[policy]\nmax_connections = 2\n")
        .start();
    let req = rcpt_request("192.0.2.4", "a@example.net", "b@example.org");
    let mut a = d.client();
    let mut b = d.client();
    assert!(is_defer(&a.ask(&req)));
    assert!(is_defer(&b.ask(&req)));
    let mut over = d.client();
    assert!(
        over.closed_within(Duration::from_secs(5)).is_some(),
        "third connection closed at once"
    );
    assert!(
        d.wait_log("connection limit reached", Duration::from_secs(2)),
        "{}",
        d.log()
    );
    assert!(is_defer(&a.ask(&req)), "existing connections unaffected");
    drop(b);
    // The freed slot is usable once the server has noticed the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(reply) = d.client().try_ask(&req) {
            assert!(is_defer(&reply), "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn state_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml("[greylist]\ndelay = 1\n");
    let req = rcpt_request("192.0.2.50", "restart@example.net", "b@example.org");
    let d = cfg.start();
    let mut c = d.client();
    assert!(is_defer(&c.ask(&req)));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(c.ask(&req).starts_with("PREPEND X-Greylist:"));
    drop(c);
    let (status, log) = d.terminate();
    assert!(status.success(), "clean exit on SIGTERM:\n{log}");
    assert!(log.contains("store flushed"), "{log}");

    let d = cfg.start();
    assert!(d.log().contains("triplets=1"), "{}", d.log());
    assert_eq!(
        d.client().ask(&req),
        "DUNNO",
        "passed triplet still passes after restart"
    );
}

#[test]
fn kill_9_after_flush_interval_loses_nothing_and_the_file_opens_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 2\n[store]\nflush_interval = \"1s\"\n");
    let req = rcpt_request("192.0.2.60", "crash@example.net", "b@example.org");
    let d = cfg.start();
    assert!(is_defer(&d.client().ask(&req)));
    std::thread::sleep(Duration::from_millis(2300));
    let log = d.kill9();
    assert!(
        !log.contains("store flushed"),
        "no shutdown flush after kill -9"
    );

    let d = cfg.start();
    assert!(
        d.log().contains("triplets=1"),
        "pending triplet kept:\n{}",
        d.log()
    );
    let pass = d.client().ask(&req);
    assert!(
        pass.starts_with("PREPEND X-Greylist:"),
        "retry passes: the first sighting survived: {pass}"
    );
}

fn hold_store_lock(path: &std::path::Path) -> redb::Database {
    redb::Database::create(path).expect("test opens the store file")
}

#[test]
fn store_failure_fails_open_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml(SHORT);
    let lock = hold_store_lock(&cfg.db_path());
    let d = cfg.start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.70", "a@example.net", "b@example.org");
    assert_eq!(c.ask(&req), "DUNNO", "store down: mail accepted");
    d.expect_log("rule=\"store-fail-open\"");
    d.expect_log("locked by another process");

    drop(lock);
    assert!(
        d.wait_log("store is available again", Duration::from_secs(10)),
        "store reopened:\n{}",
        d.log()
    );
    assert!(
        is_defer(&c.ask(&req)),
        "greylisting resumes once the store is back"
    );
}

#[test]
fn store_failure_fails_closed_with_4_3_0_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml("[store]\nfail_mode = \"closed\"\n");
    let _lock = hold_store_lock(&cfg.db_path());
    let d = cfg.start();
    let mut c = d.client();
    let reply = c.ask(&rcpt_request(
        "192.0.2.71",
        "a@example.net",
        "b@example.org",
    ));
    assert_eq!(
        reply,
        "DEFER_IF_PERMIT 4.3.0 Greylisting is temporarily unavailable, please try again later"
    );
    d.expect_log("rule=\"store-fail-closed\"");
    // Static rules need no store and still answer normally.
    assert_eq!(
        c.ask(&rcpt_request(
            "192.0.2.71",
            "a@example.net",
            "postmaster@example.org"
        )),
        "DUNNO"
    );
}

#[test]
fn learn_mode_accepts_everything_and_logs_the_would_be_decision() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(LONG)
        .args(&["--learn"])
        .start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.80", "a@example.net", "b@example.org");
    assert_eq!(c.ask(&req), "DUNNO");
    assert_eq!(c.ask(&req), "DUNNO");
    d.expect_log("would=\"defer\"");
    d.expect_log("rule=\"new\"");
    d.expect_log("rule=\"early-retry\"");
}

#[test]
fn auto_allow_lets_a_proven_client_group_through_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 1\nauto_allow_after = 1\n")
        .start();
    let mut c = d.client();
    let first = rcpt_request("192.0.2.90", "a@example.net", "b@example.org");
    assert!(is_defer(&c.ask(&first)));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(c.ask(&first).starts_with("PREPEND"));
    let other = rcpt_request("192.0.2.91", "new@example.com", "c@example.org");
    assert_eq!(
        c.ask(&other),
        "DUNNO",
        "same /24, new triplet, auto-allowed"
    );
    d.expect_log("rule=\"auto-allow\"");
    let elsewhere = rcpt_request("192.0.3.91", "new@example.com", "c@example.org");
    assert!(is_defer(&c.ask(&elsewhere)), "another /24 is not");
}

#[test]
fn configured_defer_action_and_text_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(
            "[policy]\ndefer_action = \"451 4.7.1\"\ndefer_text = \"Come back in {remaining}s\"\n",
        )
        .start();
    let reply = d.client().ask(&rcpt_request(
        "192.0.2.95",
        "a@example.net",
        "b@example.org",
    ));
    assert_eq!(reply, "451 4.7.1 Come back in 300s");
}
