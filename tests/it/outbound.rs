//! `greygate probe` and `greygate track` against real peers on loopback: Postfix asking
//! greygate or postgrey, Postfix that rejects, smtp-sink, a closed port, dnsmasq serving MX
//! records; and track reading the log of a real Postfix that relayed through greylisting.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::dns::{Dnsmasq, have};
use crate::harness::postfix::{self, Policy, Postfix, free_port};
use crate::harness::postgrey::Postgrey;
use crate::harness::{DaemonConfig, run_cli};

/// Greylisting delay of greygate and postgrey where a retry must pass.
pub(crate) const DELAY: u64 = 2;

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn probe(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec![
        "probe",
        "--json",
        "--timeout",
        "10s",
        "--helo",
        "probe.example.net",
    ];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(&all);
    let v = json(&out);
    (code, v, err)
}

/// A greygate daemon (delay `delay`) with a Postfix asking it.
pub(crate) fn greygate_site(delay: u64) -> (crate::harness::Daemon, Postfix, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let gg = DaemonConfig::new(dir.path())
        .toml(&format!(
            "hostname = \"gw.test.invalid\"\n[greylist]\ndelay = {delay}\n"
        ))
        .start();
    let pf = Postfix::start(Policy::Service(format!("inet:{}", gg.tcp())), &[]);
    (gg, pf, dir)
}

fn one(v: &serde_json::Value) -> &serde_json::Value {
    &v["recipients"][0]
}

#[test]
fn probe_greygate_greylists_then_accepts_after_the_delay() {
    if !postfix::available("probe_greygate") {
        return;
    }
    let (_gg, pf, _dir) = greygate_site(DELAY);
    let server = format!("127.0.0.1:{}", pf.smtp_port);
    let (code, v, _) = probe(&["--server", &server, "dave@example.org"]);
    assert_eq!(code, 4, "{v:#}");
    let r = one(&v);
    assert_eq!(r["status"], "greylisted", "{v:#}");
    let a = &r["attempts"][0];
    assert_eq!(a["stage"], "rcpt_to");
    assert!(
        a["reply"]
            .as_str()
            .unwrap()
            .starts_with("450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted"),
        "{v:#}"
    );
    assert!(
        a["evidence"].as_str().unwrap().contains("greylist"),
        "{v:#}"
    );

    // A new recipient, so the clock starts now: greylisted, then accepted after the delay.
    let started = Instant::now();
    let (code, v, err) = probe(&[
        "--server",
        &server,
        "--retry-every",
        "1s",
        "--until",
        "20s",
        "erin@example.org",
    ]);
    assert_eq!(code, 0, "{v:#}\n{err}");
    let r = one(&v);
    assert_eq!(r["status"], "accepted");
    assert_eq!(r["attempts"][0]["status"], "greylisted");
    let t = r["time_to_accept_secs"].as_f64().expect("time to accept");
    // greygate counts whole seconds: a retry 1.997 s after the first attempt may fall two
    // whole seconds later and pass a 2 s delay. Never a second or more early.
    assert!(
        t > DELAY as f64 - 1.0 && t < 10.0,
        "accepted after {t} s for a {DELAY} s delay: {v:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // The text form, for people.
    let (code, out, _) = run_cli(&["probe", "--server", &server, "frank@example.org"]);
    assert_eq!(code, 4);
    assert!(
        out.contains("frank@example.org: GREYLISTED by 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("reply to RCPT TO: 450 4.7.1"), "{out}");
    assert!(out.contains("evidence: "), "{out}");
}

#[test]
fn probe_postgrey_is_recognised_as_greylisting() {
    if !postfix::available("probe_postgrey")
        || !have("probe_postgrey", "/usr/sbin/postgrey", "postgrey")
    {
        return;
    }
    let pg = Postgrey::start(60);
    let pf = Postfix::start(Policy::Service(format!("inet:127.0.0.1:{}", pg.port)), &[]);
    let (code, v, _) = probe(&[
        "--server",
        &format!("127.0.0.1:{}", pf.smtp_port),
        "dave@example.org",
    ]);
    assert_eq!(code, 4, "{v:#}\nmaillog:\n{}", pf.maillog());
    let a = &one(&v)["attempts"][0];
    assert!(
        a["reply"]
            .as_str()
            .unwrap()
            .starts_with("450 4.2.0 <dave@example.org>: Recipient address rejected: Greylisted"),
        "{v:#}"
    );
}

#[test]
fn probe_smtp_sink_accepts() {
    if !postfix::available("probe_smtp_sink") {
        return;
    }
    let port = free_port();
    let mut sink = Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "postfix"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("10")
        .stdin(Stdio::null())
        .spawn()
        .expect("smtp-sink");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "smtp-sink never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, v, _) = probe(&[
        "--server",
        &format!("127.0.0.1:{port}"),
        "--from",
        "carol@example.net",
        "dave@example.org",
        "erin@example.org",
    ]);
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(code, 0, "{v:#}");
    for r in v["recipients"].as_array().unwrap() {
        assert_eq!(r["status"], "accepted", "{v:#}");
        let transcript = r["attempts"][0]["transcript"].to_string();
        assert!(!transcript.contains("DATA"), "{transcript}");
        assert!(
            transcript.contains("MAIL FROM:<carol@example.net>"),
            "{transcript}"
        );
    }
}

#[test]
fn probe_rejecting_postfix_is_rejected() {
    if !postfix::available("probe_rejecting_postfix") {
        return;
    }
    // A later main.cf line overrides the harness's restrictions.
    let pf = Postfix::start(Policy::None, &["smtpd_recipient_restrictions = reject"]);
    let (code, v, _) = probe(&[
        "--server",
        &format!("127.0.0.1:{}", pf.smtp_port),
        "dave@example.org",
    ]);
    assert_eq!(code, 6, "{v:#}");
    let a = &one(&v)["attempts"][0];
    assert_eq!(one(&v)["status"], "rejected");
    assert!(
        a["reply"].as_str().unwrap().starts_with("554 5.7.1"),
        "{v:#}"
    );
}

#[test]
fn probe_closed_port_is_no_connection() {
    let port = free_port();
    let (code, v, _) = probe(&["--server", &format!("127.0.0.1:{port}"), "dave@example.org"]);
    assert_eq!(code, 7, "{v:#}");
    assert_eq!(one(&v)["status"], "no_connection");
    assert!(
        one(&v)["attempts"][0]["tried"][0]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{v:#}"
    );
    let (code, _, err) = run_cli(&["probe", "not-an-address"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn probe_resolves_mx_with_a_dns_server_on_loopback() {
    if !postfix::available("probe_mx") || !have("probe_mx", "/usr/sbin/dnsmasq", "dnsmasq-base") {
        return;
    }
    let pf = Postfix::start(Policy::None, &[]);
    let dns = Dnsmasq::start(&[
        // The preferred MX is down (nothing listens on 127.0.0.2 at that port): the probe
        // must move on to the next, as an MTA does.
        "--mx-host=example.test,down.example.test,5".into(),
        "--mx-host=example.test,mx.example.test,10".into(),
        "--host-record=down.example.test,127.0.0.2".into(),
        "--host-record=mx.example.test,127.0.0.1".into(),
        // No MX: the domain's own address is the implicit MX (RFC 5321 5.1).
        "--host-record=plain.test,127.0.0.1".into(),
    ]);
    let resolver = format!("127.0.0.1:{}", dns.port);
    let port = pf.smtp_port.to_string();
    let (code, v, err) = probe(&[
        "--resolver",
        &resolver,
        "--port",
        &port,
        "dave@example.test",
        "erin@plain.test",
    ]);
    assert_eq!(code, 0, "{v:#}\n{err}");
    let r = &v["recipients"];
    assert_eq!(
        r[0]["attempts"][0]["server"],
        format!("mx.example.test [127.0.0.1]:{port}"),
        "{v:#}"
    );
    assert!(
        r[0]["attempts"][0]["tried"][0]
            .as_str()
            .unwrap()
            .starts_with("down.example.test [127.0.0.2]"),
        "{v:#}"
    );
    assert_eq!(
        r[1]["attempts"][0]["server"],
        format!("plain.test [127.0.0.1]:{port}"),
        "{v:#}"
    );
    // A domain that does not exist: no connection, with the DNS answer as the reason.
    let (code, v, _) = probe(&["--resolver", &resolver, "x@nowhere.test"]);
    assert_eq!(code, 7, "{v:#}");
}

/// Flushes `pf`'s queue until its log has `n` `status=sent` lines.
/// A relay that sends example.org to the Postfix on `org_port` and example.com to the one
/// on `com_port`, retrying deferred mail every second or two.
fn relay_to(org_port: u16, com_port: u16) -> Postfix {
    let transport = format!(
        "transport_maps = inline:{{ example.org=smtp:[127.0.0.1]:{org_port}, example.com=smtp:[127.0.0.1]:{com_port} }}"
    );
    Postfix::start(
        Policy::None,
        &[
            &transport,
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
        ],
    )
}

fn wait_sent(pf: &Postfix, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = pf.maillog();
        if log.matches("status=sent").count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never delivered; maillog:\n{log}"
        );
        let _ = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(pf.dir.join("etc"))
            .arg("-f")
            .stdin(Stdio::null())
            .output();
        std::thread::sleep(Duration::from_millis(700));
    }
}

#[test]
fn track_reads_a_relay_log_with_greygate_and_postgrey_deferrals() {
    if !postfix::available("track_relay_log")
        || !have("track_relay_log", "/usr/sbin/postgrey", "postgrey")
    {
        return;
    }
    let (_gg, grey_b, _dir) = greygate_site(DELAY);
    let pg = Postgrey::start(DELAY);
    let pg_b = Postfix::start(Policy::Service(format!("inet:127.0.0.1:{}", pg.port)), &[]);
    // The relay: example.org goes to the greygate site, example.com to the postgrey one.
    let relay = relay_to(grey_b.smtp_port, pg_b.smtp_port);
    let sent = relay
        .swaks()
        .from("carol@example.net")
        .to("dave@example.org,erin@example.com")
        .subject("track-1")
        .run();
    assert_eq!(sent.code, 0, "{}", sent.transcript);
    wait_sent(&relay, 2);
    let log = relay.maillog();
    assert!(log.contains("status=deferred"), "{log}");

    let path = relay.dir.join("log/maillog");
    let (code, out, err) = run_cli(&["track", "--json", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let domains = v["domains"].as_array().unwrap();
    for name in ["example.org", "example.com"] {
        let d = domains
            .iter()
            .find(|d| d["domain"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {v:#}\n{log}"));
        assert_eq!(d["messages"], 1, "{d:#}");
        assert_eq!(d["greylisted"], 1, "{d:#}\n{log}");
        assert_eq!(d["still_queued"], 0, "{d:#}");
        assert_eq!(d["bounced"], 0, "{d:#}");
        let added = d["added_delay_median"].as_f64().unwrap();
        assert!(
            (DELAY as f64 - 1.0..30.0).contains(&added),
            "{name}: added {added} s for a {DELAY} s delay: {d:#}"
        );
    }

    // Per message, by recipient.
    let (code, out, _) = run_cli(&["track", "--to", "dave@example.org", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("deferred (greylisting)"), "{out}");
    assert!(out.contains("=> delivered; greylisting added"), "{out}");

    // Rotated: the first half gzipped as maillog.1.gz, the rest plain, named in the wrong
    // order; and the same through stdin.
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let (old, new) = lines.split_at(lines.len() / 2);
    let gz = tmp.path().join("maillog.1.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all((old.join("\n") + "\n").as_bytes()).unwrap();
    enc.finish().unwrap();
    let plain = tmp.path().join("maillog");
    std::fs::write(&plain, new.join("\n") + "\n").unwrap();
    let (code, out2, err) = run_cli(&[
        "track",
        "--json",
        plain.to_str().unwrap(),
        gz.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out2)["domains"], v["domains"]);

    let html = tmp.path().join("report.html");
    let (code, _, _) = run_cli(&[
        "track",
        "--html",
        html.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let page = std::fs::read_to_string(html).unwrap();
    assert!(page.contains("<svg") && page.contains("example.org"));
}

#[test]
fn track_reads_stdin_and_gzip_fixture() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/track/maillog");
    let text = std::fs::read_to_string(fixture).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let gz = tmp.path().join("maillog.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(text.as_bytes()).unwrap();
    enc.finish().unwrap();
    let (code, out, err) = run_cli(&["track", gz.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut child = Command::new(crate::harness::greygate_bin())
        .args(["track", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let from_stdin = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&from_stdin.stdout), out);
    // example.org: greylisted (greygate 4.7.1), 5m 05s added; example.com: postgrey 4.2.0.
    let first = out.lines().nth(1).unwrap();
    assert!(first.starts_with("example.org"), "{out}");
    assert!(first.contains("5m 05s"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("example.com") && l.contains("  1  ")),
        "{out}"
    );
}

#[test]
fn probe_starttls_upgrades_before_mail_from() {
    if !postfix::available("probe_starttls")
        || !have("probe_starttls", "/usr/bin/openssl", "openssl")
    {
        return;
    }
    // A self-signed certificate, as many MX hosts have: the probe reports, it does not judge.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let status = Command::new("/usr/bin/openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=mx.test.invalid",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req failed");
    let cert_line = format!("smtpd_tls_cert_file = {}", cert.display());
    let key_line = format!("smtpd_tls_key_file = {}", key.display());
    let pf = Postfix::start(
        Policy::None,
        &["smtpd_tls_security_level = may", &cert_line, &key_line],
    );
    let server = format!("127.0.0.1:{}", pf.smtp_port);
    let (code, v, _) = probe(&["--server", &server, "--starttls", "dave@example.org"]);
    assert_eq!(code, 0, "{v:#}\nmaillog:\n{}", pf.maillog());
    let transcript = one(&v)["attempts"][0]["transcript"].to_string();
    assert!(transcript.contains("> STARTTLS"), "{transcript}");
    assert!(
        transcript.contains("TLS established: TLSv1_3")
            || transcript.contains("TLS established: TLSv1_2"),
        "{transcript}"
    );
    let after_tls = transcript.split("TLS established").nth(1).unwrap_or("");
    assert!(
        after_tls.contains("> EHLO") && after_tls.contains("> RCPT TO:<dave@example.org>"),
        "{transcript}"
    );
    // smtpd logs the session's summary when it has seen the QUIT: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pf.maillog().contains(" starttls=1 ") {
        assert!(Instant::now() < deadline, "{}", pf.maillog());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A server without STARTTLS: the probe says so instead of talking in the clear.
    let plain = Postfix::start(Policy::None, &[]);
    let server = format!("127.0.0.1:{}", plain.smtp_port);
    let (code, v, _) = probe(&["--server", &server, "--starttls", "dave@example.org"]);
    assert_eq!(code, 7, "{v:#}");
    assert!(v.to_string().contains("does not offer STARTTLS"), "{v:#}");
}

/// Every `status=sent` line across the relay's log pieces (the rotated ones too).
fn sent_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .map(|t| t.matches("status=sent").count())
        .sum()
}

/// Waits (flushing the relay's queue) until `n` deliveries are logged across the pieces.
fn wait_sent_in(relay: &Postfix, n: usize) {
    let logs = relay.dir.join("log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent_in(&logs) < n {
        assert!(
            Instant::now() < deadline,
            "never delivered {n}; maillog:\n{}",
            relay.maillog()
        );
        let _ = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(relay.dir.join("etc"))
            .arg("-f")
            .stdin(Stdio::null())
            .output();
        std::thread::sleep(Duration::from_millis(700));
    }
}

/// `name{domain="d"} value` from a Prometheus text page.
fn metric(page: &str, name: &str, domain: &str) -> Option<u64> {
    let prefix = format!("{name}{{domain=\"{domain}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

#[test]
fn track_follow_keeps_metrics_current_across_both_rotations() {
    if !postfix::available("track_follow") {
        return;
    }
    let (_gg, grey_b, _dir) = greygate_site(DELAY);
    let plain_b = Postfix::start(Policy::None, &[]);
    let relay = relay_to(grey_b.smtp_port, plain_b.smtp_port);
    let logs = relay.dir.join("log");
    let maillog = logs.join("maillog");
    let port = free_port();
    let mut follower = Command::new(crate::harness::greygate_bin())
        .args(["track", "--json", "--follow", "--summary-every", "1s"])
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg(&maillog)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start track --follow");
    let scrape = || -> Option<String> {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    };
    let send = |batch: usize| {
        let sent = relay
            .swaks()
            .from(&format!("carol{batch}@example.net"))
            .to("dave@example.org,erin@example.com")
            .subject(&format!("follow-{batch}"))
            .run();
        assert_eq!(sent.code, 0, "{}", sent.transcript);
    };
    let postfix_cmd = |what: &str| {
        let out = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(relay.dir.join("etc"))
            .arg(what)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "postfix {what}");
    };

    send(1);
    wait_sent_in(&relay, 2);
    // Rotation by rename, as `postfix logrotate` does: the log daemon reopens on reload.
    std::fs::rename(&maillog, logs.join("maillog.1")).unwrap();
    postfix_cmd("reload");
    send(2);
    wait_sent_in(&relay, 4);
    // copytruncate, with the relay idle (lines written between the copy and the
    // truncation would be in neither file for any reader).
    std::fs::copy(&maillog, logs.join("maillog.0")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&maillog)
        .unwrap()
        .set_len(0)
        .unwrap();
    send(3);
    wait_sent_in(&relay, 6);

    // What a full track of the final logs says (read oldest first whatever the order).
    let pieces: Vec<String> = ["maillog", "maillog.0", "maillog.1"]
        .iter()
        .map(|n| logs.join(n).display().to_string())
        .collect();
    let mut args = vec!["track", "--json"];
    args.extend(pieces.iter().map(String::as_str));
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "{err}");
    let full = json(&out);
    let messages = full["messages"].as_u64().unwrap();
    assert_eq!(messages, 3, "{full:#}");
    let org = full["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "example.org")
        .unwrap_or_else(|| panic!("{full:#}"));
    assert_eq!(org["greylisted"], 3, "{full:#}");

    // The follower's metrics come to say the same (they are computed once a second).
    let differences = |page: &str| -> Vec<String> {
        let mut bad = Vec::new();
        for d in full["domains"].as_array().unwrap() {
            let name = d["domain"].as_str().unwrap();
            for (metric_name, field) in [
                ("greygate_track_messages_total", "messages"),
                ("greygate_track_greylisted_total", "greylisted"),
                ("greygate_track_deferred_other_total", "deferred_other"),
                ("greygate_track_bounced_total", "bounced"),
                ("greygate_track_still_queued", "still_queued"),
            ] {
                if metric(page, metric_name, name) != d[field].as_u64() {
                    bad.push(format!("{metric_name} of {name}: want {}", d[field]));
                }
            }
            let count = format!("greygate_track_added_delay_seconds_count{{domain=\"{name}\"}} ");
            let delivered = page
                .lines()
                .find_map(|l| l.strip_prefix(&count))
                .and_then(|v| v.parse::<u64>().ok());
            let want = if name == "example.org" { 3 } else { 0 };
            if delivered != Some(want) {
                bad.push(format!("{count}: want {want}"));
            }
        }
        if !page.contains(&format!("greygate_track_log_messages_total {messages}\n")) {
            bad.push("greygate_track_log_messages_total".into());
        }
        bad
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let page = scrape().unwrap_or_default();
        let bad = differences(&page);
        if bad.is_empty() {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "{bad:?}\n{page}\nfull track: {full:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.contains("greygate_track_rotations_total 2\n"),
        "a rename and a truncation:\n{page}"
    );

    // SIGTERM: the final report, the same as the full track's.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "track --follow ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = follower.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Summaries (one a second) went to stderr, standard output has just the JSON report.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("== ") && stderr.contains("example.org"),
        "{stderr}"
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["domains"], full["domains"]);
}

#[test]
fn track_follow_needs_a_file_and_its_options_need_follow() {
    let (code, _, err) = run_cli(&["track", "--follow", "-"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--follow needs a log file"), "{err}");
    let (code, _, err) = run_cli(&["track", "--metrics-listen", "127.0.0.1:0", "x.log"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_cli(&["track", "--follow", "--to", "a@b.example", "x.log"]);
    assert_eq!(code, 2, "{err}");
}
