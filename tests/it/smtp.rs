//! The SMTP front end end to end: swaks or a raw socket talks SMTP to greygate's own
//! listener, which greylists at RCPT and relays what passes to a private Postfix (the
//! backend, which trusts greygate's XCLIENT), which relays to smtp-sink; what arrives is
//! read back from smtp-sink's dump files. Other addresses of 127/8 stand in for other hosts.
//!
//! Tests that need Postfix or swaks skip without them under plain `cargo test` and fail
//! under `GREYGATE_REQUIRE_PEERS=1`; the others need only the daemon. Every wait is bounded.
//! The tests follow the "done when" list of issue 17 (the SMTP front), in its order.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::admin::{Http, scrape};
use crate::harness::postfix::assert_x_greylist;
use crate::harness::postfix::{self, Policy, Postfix, Swaks, SwaksResult, free_port};
use crate::harness::{
    Daemon, DaemonConfig, connect_from, raise_own_nofile, rcpt_request, read_some, tool_available,
};

/// The greylisting delay of tests that wait for a retry to pass: two seconds, so that an
/// early retry a moment after the first attempt is early even when the two fall either
/// side of a second's boundary on a loaded machine.
const DELAY: u64 = 2;
/// The delay of tests that only look at deferrals: no retry in the test can pass.
const LONG: u64 = 300;
/// Every loopback client skips greylisting: for tests about relaying, not deferring.
const ALLOW_LOOPBACK: &str = "[allow]\nclients = [\"127.0.0.0/8\"]\n";
/// The host name greygate uses in its banner and headers.
const HOSTNAME: &str = "gw.test.invalid";

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// greygate's configuration: `sections` (e.g. `[allow]`) and `[smtp]` settings. The
/// pregreet test is off unless `smtp` sets its wait: it would slow every other test down.
fn greygate_toml(delay: u64, smtp: &str, sections: &str) -> String {
    let pregreet = if smtp.contains("pregreet_wait") {
        ""
    } else {
        "pregreet_wait = \"0s\"\n"
    };
    format!(
        "hostname = \"{HOSTNAME}\"\n\n[greylist]\ndelay = {delay}\n\n{sections}\n\
         [smtp]\n{pregreet}{smtp}\n"
    )
}

/// A daemon with an SMTP front (and its policy and admin listeners) relaying to `backend`.
fn start_greygate(dir: &Path, toml: &str, backend: &str) -> Daemon {
    DaemonConfig::new(dir)
        .toml(toml)
        .smtp(&["127.0.0.1:0"], backend)
        .start()
}

/// greygate's SMTP front in front of a private Postfix.
struct Site {
    greygate: Daemon,
    postfix: Postfix,
    dir: tempfile::TempDir,
}

impl Site {
    /// `None` (after saying why) when Postfix or swaks is missing and peers are optional.
    fn start(test: &str, toml: &str, postfix_main: &[&str]) -> Option<Site> {
        if !postfix::available(test) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let postfix = Postfix::start(Policy::None, postfix_main);
        let backend = format!("127.0.0.1:{}", postfix.smtp_port);
        let greygate = start_greygate(dir.path(), toml, &backend);
        Some(Site {
            greygate,
            postfix,
            dir,
        })
    }

    /// swaks towards greygate's SMTP front.
    fn swaks(&self) -> Swaks {
        Swaks::at(&self.greygate.smtp().to_string())
    }

    /// A file in the test's directory.
    /// Backend sessions greygate opened and pooled sessions it reused, from its metrics.
    fn backend_sessions(&self) -> (f64, f64) {
        (
            metric(&self.greygate, "greygate_smtp_backend_connections_total{}"),
            metric(&self.greygate, "greygate_smtp_backend_reuses_total{}"),
        )
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A message as written to a file for `swaks --data @FILE`: CRLF line ends, no line that
/// holds swaks' `%TOKEN%`s or `\n`, and no line end at the very end (swaks adds the CRLF
/// before the final dot). swaks dot-stuffs lines that start with a dot.
struct Message {
    headers: String,
    body: Vec<u8>,
}

impl Message {
    fn new(subject: &str, from: &str, to: &str, body_lines: usize) -> Message {
        let headers = format!(
            "Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n\
             From: Sender <{from}>\r\n\
             To: Recipient <{to}>\r\n\
             Subject: {subject}\r\n\
             Message-ID: <{subject}@client.example.net>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n"
        );
        let mut body = Vec::with_capacity(body_lines * 80);
        for i in 0..body_lines {
            match i % 100 {
                // Lines that would end the message or lose a dot if either side got
                // transparency (RFC 5321 §4.5.2) wrong: swaks doubles their dot.
                7 => body.extend_from_slice(b".\r\n"),
                8 => body.extend_from_slice(b"..two dots, then a line with one\r\n"),
                // 78 characters and CRLF: a line of a typical base64 attachment's length.
                _ => {
                    let _ = write!(
                        body,
                        "line {i:010} of the test body {:>47}\r\n",
                        "x".repeat(i % 40)
                    );
                }
            }
        }
        body.extend_from_slice(b"the end");
        Message { headers, body }
    }

    /// Writes the message to `path` for `--data @path`; returns `@path`.
    fn write(&self, path: &Path) -> String {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        f.write_all(self.headers.as_bytes()).unwrap();
        f.write_all(b"\r\n").unwrap();
        f.write_all(&self.body).unwrap();
        f.flush().unwrap();
        format!("@{}", path.display())
    }

    /// The body as the server receives it (swaks ends the last line before the dot).
    fn sent_body(&self) -> Vec<u8> {
        let mut b = self.body.clone();
        b.extend_from_slice(b"\r\n");
        b
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A delivered message (smtp-sink's dump) split into its header lines and its body.
struct Delivered {
    headers: Vec<String>,
    body: Vec<u8>,
}

impl Delivered {
    fn parse(text: &str) -> Delivered {
        let (head, body) = text
            .split_once("\r\n\r\n")
            .or_else(|| text.split_once("\n\n"))
            .unwrap_or_else(|| panic!("no end of headers in the delivered message:\n{text}"));
        let headers = head.lines().map(str::to_string).collect();
        Delivered {
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    /// The message body as received, less the empty line smtp-sink ends each dump with
    /// (smtp-sink writes LF line ends: compare with [`lf`] of what was sent).
    fn body(&self) -> &[u8] {
        self.body.strip_suffix(b"\n").unwrap_or(&self.body)
    }

    fn header(&self, prefix: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|l| l.starts_with(prefix))
            .map(String::as_str)
    }

    /// Where greygate's `Received:` header starts (its first line names greygate on the
    /// next line, `by HOST (greygate)`).
    fn greygate_received(&self) -> usize {
        self.headers
            .windows(2)
            .position(|w| w[0].starts_with("Received: ") && w[1].contains("(greygate)"))
            .unwrap_or_else(|| panic!("no Received: header of greygate in {:#?}", self.headers))
    }

    /// Greygate's `Received:` header, folded lines joined.
    fn greygate_received_text(&self) -> String {
        let at = self.greygate_received();
        let mut text = self.headers[at].clone();
        for l in &self.headers[at + 1..] {
            if !l.starts_with([' ', '\t']) {
                break;
            }
            text.push(' ');
            text.push_str(l.trim());
        }
        text
    }
}

/// Waits (bounded) until smtp-sink holds the whole message whose headers contain `marker`
/// and whose body ends with `tail`: the dump is written as the message arrives.
fn delivered_whole(pf: &Postfix, marker: &str, tail: &[u8]) -> Delivered {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = Delivered::parse(&pf.delivered(marker));
        if d.body().ends_with(tail) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "message {marker:?} never reached smtp-sink whole ({} body bytes, ending {:?})",
            d.body.len(),
            String::from_utf8_lossy(&d.body[d.body.len().saturating_sub(200)..])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Line ends as smtp-sink writes them (LF).
fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Waits until a retry of a triplet first seen now may pass.
fn wait_delay() {
    std::thread::sleep(Duration::from_millis(DELAY * 1000 + 300));
}

/// A raw SMTP client: what a test sends and receives byte for byte.
struct Smtp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Smtp {
    /// Connects from `from` without reading anything.
    fn connect(from: Ipv4Addr, to: SocketAddr) -> Smtp {
        let stream = connect_from(from, to);
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Smtp { stream, reader }
    }

    /// Connects from `from` and reads the banner, which must be `220 `.
    fn greeted(from: Ipv4Addr, to: SocketAddr) -> Smtp {
        let mut c = Smtp::connect(from, to);
        let banner = c.reply();
        assert!(banner.starts_with("220 "), "banner: {banner:?}");
        c
    }

    /// One line (CRLF stripped); `None` at the end of the stream.
    fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => Some(l.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no reply line within the read timeout; partial {l:?}")
            }
            Err(_) => None,
        }
    }

    /// One whole (multi-line) reply, its lines joined by `\n`.
    fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let Some(l) = self.line() else {
                panic!("connection closed after {lines:?}")
            };
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l);
            if last {
                return lines.join("\n");
            }
        }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\r\n").unwrap();
    }

    /// Sends a command and reads its reply.
    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.reply()
    }

    /// Reads until the server closes the connection, within `limit`; what came before the
    /// close, or `None` if it stayed open.
    fn closed_within(&mut self, limit: Duration) -> Option<String> {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match read_some(&mut self.reader, &mut buf) {
                Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
            }
        }
        None
    }
}

/// A sample of the daemon's `/metrics` (labels sorted, as `admin::scrape` keys them).
fn metric(d: &Daemon, key: &str) -> f64 {
    let m = scrape(&Http::new(d));
    *m.get(key)
        .unwrap_or_else(|| panic!("no metric {key}; have {:?}", m.keys().collect::<Vec<_>>()))
}

/// Waits (bounded) until `/metrics` shows `key` at `want` or more; returns the value.
fn wait_metric(d: &Daemon, key: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(d, key);
        if v >= want {
            return v;
        }
        assert!(Instant::now() < deadline, "{key} is {v}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_code(r: &SwaksResult, code: i32, what: &str) {
    assert_eq!(r.code, code, "{what}: swaks exit code:\n{}", r.transcript);
}

// Done when 1: Greylisting at RCPT, then the message relayed unchanged but for greygate's headers.
#[test]
fn smtp_front_greylists_then_relays_the_message_unchanged_with_trace_headers() {
    let toml = greygate_toml(DELAY, "", "");
    let Some(s) = Site::start("smtp_front_greylists_then_relays", &toml, &[]) else {
        return;
    };
    let msg = Message::new(
        "front-greylist",
        "alice@example.net",
        "bob@example.org",
        200,
    );
    let data = msg.write(&s.path("message.eml"));
    let attempt = |rcpt_only: bool| {
        let mut w = s
            .swaks()
            .from("alice@example.net")
            .to("bob@example.org")
            .arg("--data", &data);
        if rcpt_only {
            w = w.rcpt_only();
        }
        w.run()
    };
    let first = attempt(false);
    assert_code(&first, 24, "first attempt");
    assert!(
        first.rcpt_reply().contains("451 4.7.1"),
        "first attempt: {}",
        first.transcript
    );
    let early = attempt(true);
    assert_code(&early, 24, "early retry");
    assert!(
        early.rcpt_reply().contains("451 4.7.1"),
        "early retry: {}",
        early.transcript
    );
    s.greygate.expect_log("rule=\"early-retry\"");

    wait_delay();
    let retry = attempt(false);
    assert_code(&retry, 0, "retry after the delay");
    assert!(
        retry.rcpt_reply().contains("250"),
        "retry: {}",
        retry.transcript
    );

    let got = delivered_whole(&s.postfix, "Subject: front-greylist", b"the end\n");
    let sent = lf(&msg.sent_body());
    assert_eq!(
        sha256(got.body()),
        sha256(&sent),
        "the body arrives byte for byte ({} bytes sent, {} delivered)",
        sent.len(),
        got.body().len()
    );
    // greygate's headers come right before the client's, which are unchanged and in order.
    let at = got.greygate_received();
    let received = got.greygate_received_text();
    assert!(
        received.starts_with("Received: from client.example.net (unknown [127.0.0.1])"),
        "{received}"
    );
    assert!(
        received.contains(&format!("by {HOSTNAME} (greygate) with ESMTP;")),
        "{received}"
    );
    let x_greylist = got
        .header("X-Greylist: ")
        .unwrap_or_else(|| panic!("X-Greylist header in {:#?}", got.headers));
    assert_x_greylist(x_greylist, DELAY, Some(HOSTNAME));
    let sent: Vec<&str> = msg.headers.lines().collect();
    let start = got
        .headers
        .iter()
        .position(|l| l == sent[0])
        .unwrap_or_else(|| panic!("the client's first header in {:#?}", got.headers));
    assert!(
        start > at,
        "greygate's headers go first: {:#?}",
        got.headers
    );
    assert_eq!(
        got.headers[start..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        sent,
        "the client's headers arrive unchanged"
    );
    assert!(
        got.headers[at..start]
            .iter()
            .any(|l| l.starts_with("X-Greylist: ")),
        "X-Greylist is greygate's, before the client's headers: {:#?}",
        got.headers
    );
}

// Done when 2: XCLIENT: the backend logs the real client, not greygate.
#[test]
fn backend_logs_the_real_client_address_through_xclient() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("backend_logs_the_real_client_address", &toml, &[]) else {
        return;
    };
    let r = s
        .swaks()
        .local("127.0.0.2")
        .from("alice@example.net")
        .to("bob@example.org")
        .subject("xclient-addr")
        .run();
    assert_code(&r, 0, "relayed");
    let got = delivered_whole(&s.postfix, "Subject: xclient-addr", b"");
    let received = got.greygate_received_text();
    assert!(received.contains("(unknown [127.0.0.2])"), "{received}");
    let log = s.postfix.maillog();
    let connect = log
        .lines()
        .find(|l| l.contains("smtpd") && l.contains("connect from "))
        .unwrap_or_else(|| panic!("Postfix logged no connection:\n{log}"));
    assert!(
        connect.contains("[127.0.0.1]"),
        "the connection itself is greygate's: {connect}"
    );
    let client = log
        .lines()
        .find(|l| l.contains(": client="))
        .unwrap_or_else(|| panic!("Postfix logged no client= line:\n{log}"));
    assert!(
        client.contains("client=unknown[127.0.0.2]"),
        "Postfix logs the real client: {client}\n{log}"
    );
}

// Done when 3: The backend's refusal of a recipient reaches the client as it was.
#[test]
fn backend_550_for_an_unknown_user_reaches_the_client() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let refuse = "smtpd_recipient_restrictions = check_recipient_access \
                  inline:{ { unknown@example.org = 550 5.1.1 unknown user } }, \
                  reject_unauth_destination";
    let Some(s) = Site::start("backend_550_for_an_unknown_user", &toml, &[refuse]) else {
        return;
    };
    let r = s
        .swaks()
        .from("alice@example.net")
        .to("unknown@example.org")
        .subject("unknown-user")
        .run();
    assert_code(&r, 24, "the only recipient refused");
    let reply = r.rcpt_reply();
    assert!(
        reply.contains("550 5.1.1") && reply.contains("unknown user"),
        "the backend's reply: {reply}\n{}",
        r.transcript
    );
    // The same client's mail to a known user still goes through.
    let ok = s
        .swaks()
        .from("alice@example.net")
        .to("bob@example.org")
        .subject("known-user")
        .run();
    assert_code(&ok, 0, "a known recipient");
    delivered_whole(&s.postfix, "Subject: known-user", b"");
    let log = s.postfix.maillog();
    assert!(log.contains("550 5.1.1 <unknown@example.org>"), "{log}");
}

// Done when 4: No backend: a temporary failure at RCPT, and the daemon goes on.
#[test]
fn backend_down_defers_at_rcpt_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let backend = format!("127.0.0.1:{}", free_port());
    let toml = greygate_toml(LONG, "backend_connect_timeout = \"5s\"\n", ALLOW_LOOPBACK);
    let d = start_greygate(dir.path(), &toml, &backend);
    d.expect_log("SMTP backend does not answer");
    for round in ["first client", "next client"] {
        let mut c = Smtp::greeted(LOCAL, d.smtp());
        assert!(c.ask("EHLO client.example.net").starts_with("250"));
        assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
        let rcpt = c.ask("RCPT TO:<bob@example.org>");
        assert!(rcpt.starts_with("451 4.4."), "{round}: {rcpt}");
        let data = c.ask("DATA");
        assert!(
            data.starts_with("554 5.5.1"),
            "{round}: no recipient, no message: {data}"
        );
        assert!(c.ask("QUIT").starts_with("221"), "{round}");
    }
    assert_eq!(metric(&d, "greygate_smtp_backend_failures_total{}"), 2.0);
    assert_eq!(metric(&d, "greygate_smtp_messages_total{}"), 0.0);
    d.expect_log("backend unavailable");
}

// Done when 5: RFC 2920 pipelining, greylisted and then relayed.
#[test]
fn pipelined_session_is_greylisted_then_relayed() {
    let toml = greygate_toml(DELAY, "", "");
    let Some(s) = Site::start("pipelined_session", &toml, &[]) else {
        return;
    };
    let attempt = || {
        s.swaks()
            .flag("--pipeline")
            .from("carol@example.net")
            .to("dave@example.org,erin@example.org")
            .subject("pipelined")
            .run()
    };
    let first = attempt();
    assert_code(&first, 24, "first pipelined attempt");
    assert!(
        first.transcript.matches("451 4.7.1").count() >= 2,
        "both recipients greylisted:\n{}",
        first.transcript
    );
    wait_delay();
    let retry = attempt();
    assert_code(&retry, 0, "pipelined retry");
    // swaks sent MAIL, both RCPTs and DATA before reading a reply.
    let t = &retry.transcript;
    let mail = t.find("-> MAIL FROM:").expect("MAIL in the transcript");
    let data = t[mail..].find("-> DATA").expect("DATA in the transcript") + mail;
    assert!(
        !t[mail..data].contains("<-"),
        "commands went out together:\n{t}"
    );
    let got = delivered_whole(&s.postfix, "Subject: pipelined", b"");
    assert_x_greylist(
        got.header("X-Greylist: ").expect("X-Greylist header"),
        DELAY,
        Some(HOSTNAME),
    );
    // smtp-sink writes one X-Rcpt-Args header per recipient it got.
    let rcpts: Vec<&String> = got
        .headers
        .iter()
        .filter(|l| l.starts_with("X-Rcpt-Args: "))
        .collect();
    for r in ["dave@example.org", "erin@example.org"] {
        assert!(
            rcpts.iter().any(|l| l.contains(&format!("<{r}>"))),
            "{r} relayed: {rcpts:?}"
        );
    }
}

/// A self-signed certificate for `localhost`, made with openssl in `dir`: (cert, key).
fn test_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    test_certificate_named(dir, "localhost")
}

/// A self-signed certificate whose subject is `CN=cn`, made with openssl in `dir`.
fn test_certificate_named(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let subject = format!("/CN={cn}");
    crate::harness::tls::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &subject,
        "-days",
        "2",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

// Done when 6: STARTTLS towards the client; greygate's Received header records it.
#[test]
fn starttls_session_is_relayed_with_an_esmtps_received_header() {
    if !postfix::available("starttls_session")
        || !tool_available("starttls_session", "/usr/bin/openssl")
    {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(certs.path());
    let smtp = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        cert.display(),
        key.display()
    );
    let toml = greygate_toml(LONG, &smtp, ALLOW_LOOPBACK);
    let Some(s) = Site::start("starttls_session", &toml, &[]) else {
        return;
    };
    let r = s
        .swaks()
        .flag("--tls")
        .from("alice@example.net")
        .to("bob@example.org")
        .subject("over-tls")
        .run();
    assert_code(&r, 0, "relayed over TLS");
    assert!(
        r.transcript.contains("STARTTLS") && r.transcript.contains("TLS started"),
        "{}",
        r.transcript
    );
    let got = delivered_whole(&s.postfix, "Subject: over-tls", b"");
    let received = got.greygate_received_text();
    assert!(
        received.contains(&format!("by {HOSTNAME} (greygate) with ESMTPS")),
        "{received}"
    );
    assert!(received.contains("version=TLS"), "{received}");
    wait_metric(&s.greygate, "greygate_smtp_tls_sessions_total{}", 1.0);
}

/// The subject of the certificate greygate's SMTP front presents after STARTTLS, as
/// `openssl s_client` prints it.
fn presented_subject(addr: SocketAddr) -> String {
    let out = std::process::Command::new("timeout")
        .args(["20", "openssl", "s_client", "-starttls", "smtp", "-connect"])
        .arg(addr.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no certificate presented: {text}"))
        .to_string()
}

// Scope, TLS: the operator's certificate is read again on SIGHUP (a renewal needs no
// restart); a reload with an unreadable one keeps the running certificate.
#[test]
fn renewed_certificate_is_presented_after_sighup() {
    if !tool_available("renewed_certificate", "/usr/bin/openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let (cert, key) = test_certificate_named(&live, "mx-old.test");
    let d = without_backend(
        dir.path(),
        &greygate_toml(
            LONG,
            &format!("tls_cert = {cert:?}\ntls_key = {key:?}\n"),
            "",
        ),
    );
    assert!(presented_subject(d.smtp()).contains("mx-old.test"));
    // A broken renewal: the running certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    d.hup();
    assert!(d.wait_log("configuration reload refused", Duration::from_secs(10)));
    assert!(
        d.log()
            .contains(&format!("no certificate in {}", cert.display())),
        "the refusal names the file"
    );
    assert!(presented_subject(d.smtp()).contains("mx-old.test"));
    // The renewed pair moved into place, then SIGHUP.
    let renewed = dir.path().join("renewed");
    std::fs::create_dir(&renewed).unwrap();
    let (new_cert, new_key) = test_certificate_named(&renewed, "mx-new.test");
    std::fs::rename(new_key, &key).unwrap();
    std::fs::rename(new_cert, &cert).unwrap();
    d.hup();
    assert!(d.wait_log("configuration reloaded", Duration::from_secs(10)));
    assert!(presented_subject(d.smtp()).contains("mx-new.test"));
}

// Done when 7: A big message streams through: the daemon never holds it.
#[test]
fn fifty_megabyte_message_streams_through_without_growing_the_daemon() {
    const MAX: &str = "104857600";
    let toml = greygate_toml(LONG, &format!("max_message_size = {MAX}\n"), ALLOW_LOOPBACK);
    let Some(s) = Site::start(
        "fifty_megabyte_message_streams_through",
        &toml,
        &[
            &format!("message_size_limit = {MAX}"),
            "mailbox_size_limit = 0",
        ],
    ) else {
        return;
    };
    // 655,360 lines of 80 bytes: 50 MiB.
    let msg = Message::new(
        "big-message",
        "alice@example.net",
        "bob@example.org",
        655_360,
    );
    assert!(msg.body.len() >= 50 << 20);
    let data = msg.write(&s.path("big.eml"));
    let before = s.greygate.status_kib("VmRSS");
    let started = Instant::now();
    let r = s
        .swaks()
        .from("alice@example.net")
        .to("bob@example.org")
        .arg("--data", &data)
        .flag("--suppress-data")
        .arg("--timeout", "120")
        .run();
    assert_code(&r, 0, "the 50 MiB message accepted");
    let took = started.elapsed();
    let after = s.greygate.status_kib("VmRSS");
    let peak = s.greygate.status_kib("VmHWM");
    eprintln!("50 MiB in {took:?}: RSS {before} KiB before, {after} KiB after, peak {peak} KiB");
    assert!(
        after.saturating_sub(before) < 10 * 1024,
        "RSS {before} KiB before, {after} KiB after the message"
    );
    assert!(
        peak.saturating_sub(before) < 10 * 1024,
        "RSS {before} KiB before, peak {peak} KiB"
    );
    let got = delivered_whole(&s.postfix, "Subject: big-message", b"the end\n");
    let sent = lf(&msg.sent_body());
    assert_eq!(got.body().len(), sent.len(), "took {took:?}");
    assert_eq!(sha256(got.body()), sha256(&sent));
    wait_metric(
        &s.greygate,
        "greygate_smtp_message_bytes_total{}",
        (50 << 20) as f64,
    );
}

/// A daemon with an SMTP front whose backend is a free port: for tests that never get as
/// far as relaying.
fn without_backend(dir: &Path, toml: &str) -> Daemon {
    start_greygate(dir, toml, &format!("127.0.0.1:{}", free_port()))
}

// Done when 8: Postscreen's pregreet test.
#[test]
fn client_talking_before_the_banner_is_rejected_and_a_patient_one_is_greeted() {
    const WAIT: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    // DNS is off (as in every test): `[dnsbl] delay` is for pregreet suspects here.
    let d = without_backend(
        dir.path(),
        &greygate_toml(
            LONG,
            "pregreet_wait = \"2s\"\n",
            "[dnsbl]\ndelay = \"7h\"\n",
        ),
    );

    // A bot: talks as soon as the first banner line is there.
    let mut bot = Smtp::connect(LOCAL, d.smtp());
    let first = bot.line().expect("the banner's first line");
    assert!(first.starts_with("220-"), "{first}");
    bot.send("EHLO x");
    let rest = bot
        .closed_within(Duration::from_secs(5))
        .expect("the bot's connection is closed");
    assert!(rest.starts_with("554 5.5.1"), "{rest:?}");
    assert!(
        !rest.contains("220 "),
        "no final banner line for the bot: {rest:?}"
    );
    assert_eq!(wait_metric(&d, "greygate_smtp_pregreets_total{}", 1.0), 1.0);
    d.expect_log("rule=\"pregreet\"");

    // A port check (another network) that hangs up during the wait did not talk: not
    // counted, and its network is not suspect.
    let checker = Ipv4Addr::new(127, 0, 1, 1);
    let mut check = Smtp::connect(checker, d.smtp());
    assert!(check.line().expect("first banner line").starts_with("220-"));
    drop(check);
    std::thread::sleep(WAIT + Duration::from_millis(500));
    assert_eq!(metric(&d, "greygate_smtp_pregreets_total{}"), 1.0);

    // A real mail server (the same network) waits for the last banner line, gets it after
    // the wait, and goes on.
    let patient = Ipv4Addr::new(127, 0, 1, 2);
    let started = Instant::now();
    let mut mta = Smtp::connect(patient, d.smtp());
    let banner = mta.reply();
    let waited = started.elapsed();
    assert!(
        banner.ends_with(&format!("220 {HOSTNAME} ESMTP")),
        "{banner}"
    );
    assert!(
        waited >= WAIT - Duration::from_millis(200) && waited < WAIT + Duration::from_secs(3),
        "the banner ended after {waited:?}"
    );
    let ehlo = mta.ask("EHLO mx.example.net");
    assert!(
        ehlo.starts_with("250-") && ehlo.contains("PIPELINING"),
        "{ehlo}"
    );
    assert!(mta.ask("NOOP").starts_with("250"));
    assert!(mta.ask("QUIT").starts_with("221"));
    // Having passed, it is not made to wait again.
    let started = Instant::now();
    let _again = Smtp::greeted(patient, d.smtp());
    assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
    assert_eq!(metric(&d, "greygate_smtp_pregreets_total{}"), 1.0);
    // Its network was never made suspect: its recipients get the ordinary delay.
    let mut mta = Smtp::greeted(patient, d.smtp());
    assert!(mta.ask("EHLO mx.example.net").starts_with("250"));
    assert!(mta.ask("MAIL FROM:<a@example.net>").starts_with("250"));
    let rcpt = mta.ask("RCPT TO:<b@example.org>");
    assert!(rcpt.starts_with("451 4.7.1"), "{rcpt}");
    let ordinary = d.log_line("rule=\"new\" client=127.0.1.2");
    assert!(
        ordinary.contains(&format!("remaining={LONG}")),
        "{ordinary}"
    );
    assert!(
        !d.log().contains("listed by pregreet"),
        "the checker's hang-up made no one suspect"
    );
    // The bot's network is suspect: when it comes back and waits, its recipients are
    // greylisted as listed by `pregreet`.
    let mut back = Smtp::connect(Ipv4Addr::new(127, 0, 0, 9), d.smtp());
    let banner = back.reply();
    assert!(
        banner.ends_with(&format!("220 {HOSTNAME} ESMTP")),
        "{banner}"
    );
    assert!(back.ask("EHLO x").starts_with("250"));
    assert!(back.ask("MAIL FROM:<a@example.net>").starts_with("250"));
    assert!(back.ask("RCPT TO:<b@example.org>").starts_with("451 4.7.1"));
    // ... for `[dnsbl] delay`, not the ordinary one.
    let suspect = d.log_line("listed by pregreet");
    assert!(suspect.contains("remaining=25200"), "{suspect}");
}

// Done when 9: A greytrap denies its sender on every front end, the policy service's too.
#[test]
fn greytrap_hit_denies_the_client_on_the_policy_front_end_too() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = "traps = [\"trap@example.org\"]\n";
    let d = without_backend(dir.path(), &greygate_toml(DELAY, smtp, ""));
    let mut policy = d.client();
    let trapped = rcpt_request("127.0.0.3", "news@example.net", "bob@example.org");
    let control = rcpt_request("127.0.0.4", "news@example.net", "carol@example.org");
    for req in [&trapped, &control] {
        let a = policy.ask(req);
        assert!(a.starts_with("DEFER_IF_PERMIT"), "first attempt: {a}");
    }
    wait_delay();

    let mut c = Smtp::greeted(Ipv4Addr::new(127, 0, 0, 3), d.smtp());
    assert!(c.ask("EHLO spam.example.com").starts_with("250"));
    assert!(c.ask("MAIL FROM:<spam@example.com>").starts_with("250"));
    let rcpt = c.ask("RCPT TO:<Trap@Example.org>");
    assert!(rcpt.starts_with("451 4.7.1"), "{rcpt}");
    assert!(c.ask("QUIT").starts_with("221"));
    d.expect_log("rule=\"greytrap\"");
    assert_eq!(metric(&d, "greygate_smtp_trap_hits_total{}"), 1.0);

    let listed = Http::new(&d).get_json("/api/runtime");
    let entries = listed["entries"].as_array().expect("entries");
    assert!(
        entries.iter().any(|e| e["list"] == "deny"
            && e["target"] == "client"
            && e["value"] == "127.0.0.3"
            && e["comment"]
                .as_str()
                .unwrap_or("")
                .contains("Trap@Example.org")),
        "a runtime deny entry for the client: {listed}"
    );

    // The triplet has served its delay, but its client is denied now.
    let a = policy.ask(&trapped);
    assert!(a.starts_with("DEFER_IF_PERMIT"), "trapped client: {a}");
    d.expect_log("rule=\"deny\"");
    // Its neighbour's triplet, as old, passes: the entry is the client's alone.
    let a = policy.ask(&control);
    assert!(a.starts_with("PREPEND X-Greylist:"), "control: {a}");
}

// Done when 10: Deferred clients are answered slowly.
#[test]
fn deferred_client_gets_its_later_replies_at_the_tarpit_rate() {
    const RATE: f64 = 20.0;
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(dir.path(), &greygate_toml(LONG, "tarpit_rate = 20\n", ""));
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    // Before any deferral: at full speed.
    let started = Instant::now();
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "untarpitted replies took {:?}",
        started.elapsed()
    );
    let rcpt = c.ask("RCPT TO:<bob@example.org>");
    assert!(rcpt.starts_with("451 4.7.1"), "{rcpt}");
    assert_eq!(metric(&d, "greygate_smtp_tarpitted_total{}"), 1.0);
    // A reply of known length, after the deferral.
    let started = Instant::now();
    let help = c.ask("HELP");
    let took = started.elapsed().as_secs_f64();
    let bytes = (help.len() + 2) as f64;
    assert!(help.starts_with("214 "), "{help}");
    let expected = bytes / RATE;
    assert!(
        took >= expected * 0.8 && took <= expected * 1.5 + 1.0,
        "{bytes} bytes took {took:.2} s; at {RATE} bytes/s: {expected:.2} s"
    );
}

// Tarpit: at most tarpit_max_sessions sessions are slowed at once (tarpitting can never
// hold the daemon's sessions); a later deferred client gets its replies at full speed, and
// once the tarpitted session ends, its permit serves the next.
#[test]
fn tarpit_slows_at_most_tarpit_max_sessions_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(
        dir.path(),
        &greygate_toml(LONG, "tarpit_rate = 20\ntarpit_max_sessions = 1\n", ""),
    );
    let deferred = |from: Ipv4Addr| {
        let mut c = Smtp::greeted(from, d.smtp());
        assert!(c.ask("EHLO mx.example.net").starts_with("250"));
        assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
        assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("451 4.7.1"));
        c
    };
    let timed = |c: &mut Smtp| {
        let started = Instant::now();
        assert!(c.ask("NOOP").starts_with("250"));
        started.elapsed()
    };
    let mut first = deferred(Ipv4Addr::new(127, 0, 6, 1));
    let mut second = deferred(Ipv4Addr::new(127, 0, 6, 2));
    assert_eq!(metric(&d, "greygate_smtp_tarpitted_total{}"), 1.0);
    // "250 2.0.0 Ok" and CRLF at 20 bytes/s: more than half a second.
    assert!(timed(&mut first) > Duration::from_millis(500));
    assert!(timed(&mut second) < Duration::from_millis(300));
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let mut third = deferred(Ipv4Addr::new(127, 0, 6, 3));
    assert_eq!(metric(&d, "greygate_smtp_tarpitted_total{}"), 2.0);
    assert!(timed(&mut third) > Duration::from_millis(500));
    drop(second);
}

// Tarpit: a client of a group caught pregreeting gets every reply slowly from its first;
// a client of another group at full speed.
#[test]
fn pregreet_suspects_are_tarpitted_from_their_first_reply() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(
        dir.path(),
        &greygate_toml(LONG, "pregreet_wait = \"1s\"\ntarpit_rate = 50\n", ""),
    );
    let mut bot = Smtp::connect(Ipv4Addr::new(127, 0, 7, 1), d.smtp());
    assert!(bot.line().unwrap().starts_with("220-"));
    bot.send("EHLO x");
    assert!(bot.closed_within(Duration::from_secs(5)).is_some());
    let ehlo_time = |from: Ipv4Addr| {
        let mut c = Smtp::connect(from, d.smtp());
        let banner = c.reply();
        assert!(banner.contains("220 "), "{banner}");
        let started = Instant::now();
        let ehlo = c.ask("EHLO mx.example.net");
        assert!(ehlo.starts_with("250"), "{ehlo}");
        (started.elapsed(), ehlo.len())
    };
    // Same /24 as the bot: suspect.
    let (slow, bytes) = ehlo_time(Ipv4Addr::new(127, 0, 7, 2));
    let expected = Duration::from_secs_f64(bytes as f64 / 50.0);
    assert!(
        slow >= expected.mul_f64(0.8),
        "a suspect's {bytes}-byte EHLO reply took {slow:?} (at 50 bytes/s: {expected:?})"
    );
    let (fast, _) = ehlo_time(Ipv4Addr::new(127, 0, 8, 2));
    assert!(fast < Duration::from_millis(500), "{fast:?}");
    assert_eq!(metric(&d, "greygate_smtp_tarpitted_total{}"), 1.0);
}

// Done when 11: Bad input: junk commands up to the error limit.
#[test]
fn junk_commands_get_500_until_max_errors_then_421_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(dir.path(), &greygate_toml(LONG, "max_errors = 5\n", ""));
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    for junk in ["FOO", "\u{1}\u{2}\u{7f}", "GET / HTTP/1.1", "MAILFROM"] {
        let r = c.ask(junk);
        assert!(r.starts_with("500 5.5.2"), "{junk:?}: {r}");
    }
    // The session goes on between errors.
    assert!(c.ask("NOOP").starts_with("250"));
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    c.send("XYZZY");
    let rest = c
        .closed_within(Duration::from_secs(5))
        .expect("closed after the fifth error");
    assert!(
        rest.starts_with("500 5.5.2") && rest.contains("\r\n421 4.7.0"),
        "{rest:?}"
    );
    assert_eq!(metric(&d, "greygate_smtp_error_disconnects_total{}"), 1.0);
    // Others are still served.
    let mut next = Smtp::greeted(LOCAL, d.smtp());
    assert!(next.ask("NOOP").starts_with("250"));
}

// Done when 11: Bad input: a 1 MB command line.
#[test]
fn megabyte_command_line_gets_500_and_the_next_command_works() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(dir.path(), &greygate_toml(LONG, "", ""));
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    let long = format!("EHLO {}", "x".repeat(1 << 20));
    let r = c.ask(&long);
    assert_eq!(r, "500 5.5.2 Line too long");
    let ehlo = c.ask("EHLO mx.example.net");
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("QUIT").starts_with("221"));
}

// Done when 11: Bad input: a client that stops in the middle of DATA.
#[test]
fn client_gone_mid_data_delivers_nothing_and_others_are_served() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("client_gone_mid_data", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    let rcpt = c.ask("RCPT TO:<bob@example.org>");
    assert!(
        rcpt.starts_with("250"),
        "the backend takes the recipient: {rcpt}"
    );
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(b"Subject: abandoned-mid-data\r\n\r\nhalf a message\r\n")
        .unwrap();
    c.stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    s.greygate.expect_log("during DATA");

    let r = s
        .swaks()
        .from("alice@example.net")
        .to("bob@example.org")
        .subject("after-the-abandoned-one")
        .run();
    assert_code(&r, 0, "the next client");
    delivered_whole(&s.postfix, "Subject: after-the-abandoned-one", b"");
    // Postfix saw its client go in the middle of the message and queued nothing of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.postfix.maillog().contains("lost connection after DATA") {
        assert!(
            Instant::now() < deadline,
            "Postfix never saw the session end mid-DATA:\n{}",
            s.postfix.maillog()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sink = s.postfix.dir.join("sink");
    for e in std::fs::read_dir(&sink).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        assert!(
            !text.contains("abandoned-mid-data"),
            "the half message was delivered:\n{text}"
        );
    }
    assert_eq!(metric(&s.greygate, "greygate_smtp_messages_total{}"), 1.0);
}

// Done when 11: Bad input: thousands of idle connections do not keep a real client out.
#[test]
fn two_thousand_idle_connections_and_a_client_still_completes_its_session() {
    const IDLE: usize = 2000;
    let toml = greygate_toml(
        LONG,
        "max_connections = 4096\nmax_connections_per_peer = 4096\n",
        ALLOW_LOOPBACK,
    );
    let Some(s) = Site::start("two_thousand_idle_connections", &toml, &[]) else {
        return;
    };
    let limit = raise_own_nofile(IDLE as u64 + 512);
    assert!(
        limit >= IDLE as u64 + 256,
        "this test needs {} descriptors; the hard limit allows {limit}",
        IDLE + 256
    );
    let addr = s.greygate.smtp();
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 2, (i % 250) as u8 + 1), addr))
        .collect();
    // Every one is served its banner, and then sends nothing.
    for (i, conn) in idle.iter().enumerate() {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        assert!(line.starts_with("220 "), "idle connection {i}: {line:?}");
    }
    let open = scrape(&Http::new(&s.greygate))
        .iter()
        .filter(|(k, _)| k.starts_with("greygate_connections_open{") && k.contains("protocol=smtp"))
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert!(open >= IDLE as f64, "{open} SMTP connections open");

    let started = Instant::now();
    let r = s
        .swaks()
        .local("127.0.0.2")
        .from("alice@example.net")
        .to("bob@example.org")
        .subject("among-the-idle")
        .run();
    let took = started.elapsed();
    assert_code(&r, 0, "a client among 2,000 idle connections");
    assert!(took < Duration::from_secs(10), "the session took {took:?}");
    delivered_whole(&s.postfix, "Subject: among-the-idle", b"");
    drop(idle);
}

/// CPU time (nanoseconds) of each of the daemon's threads named `gg-smtp-N`, by name.
fn smtp_thread_cpu(d: &Daemon) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let name = name.trim();
        if name.starts_with("gg-smtp-") {
            let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
            let ns = stat
                .split_whitespace()
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap();
            out.insert(name.to_string(), ns);
        }
    }
    out
}

// `serve --smtp-listen` without `--listen`: a daemon in front of a mail server only, no
// policy listener (as `serve --help` says).
#[test]
fn smtp_listen_alone_starts_no_policy_listener() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(&greygate_toml(LONG, "", ""))
        .listen(&[])
        .smtp(&["127.0.0.1:0"], &format!("127.0.0.1:{}", free_port()))
        .start();
    assert!(d.listeners.is_empty(), "{:?}", d.listeners);
    assert!(!d.log().contains("policy listener ready"), "{}", d.log());
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    assert!(c.ask("QUIT").starts_with("221"));
}

// `[smtp] threads`: sessions on threads of the front's own, a socket each (SO_REUSEPORT);
// the address's connection limits hold across them.
#[test]
fn smtp_front_runs_on_its_threads_and_keeps_one_limit_across_their_sockets() {
    const PER_PEER: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(
        dir.path(),
        &greygate_toml(
            LONG,
            &format!(
                "threads = 2
max_connections_per_peer = {PER_PEER}
"
            ),
            "",
        ),
    );
    let before = smtp_thread_cpu(&d);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["gg-smtp-0", "gg-smtp-1"],
        "the front's threads"
    );
    // Sessions from many source ports: the kernel spreads them over both sockets, and
    // every one is served (greylisted at RCPT: this front has no backend to reach).
    let addr = d.smtp();
    for i in 0..60 {
        let mut c = Smtp::greeted(Ipv4Addr::new(127, 0, 3, (i % 50) as u8 + 1), addr);
        assert!(c.ask("EHLO client.example").starts_with("250"));
        assert!(c.ask("MAIL FROM:<a@example.net>").starts_with("250"));
        let r = c.ask(&format!("RCPT TO:<user{i}@example.org>"));
        assert!(r.starts_with("451 4.7.1"), "session {i}: {r}");
        quit_and_wait(c);
    }
    let after = smtp_thread_cpu(&d);
    for (name, ns) in &after {
        assert!(
            *ns > before[name],
            "{name} ran nothing of 60 sessions: {before:?} -> {after:?}"
        );
    }
    // One client's connections count against one per-peer limit whichever socket they
    // came in on: of 4 × PER_PEER, only PER_PEER stay open (the idle longest make room).
    let from = Ipv4Addr::new(127, 0, 4, 1);
    let mut conns: Vec<Smtp> = (0..4 * PER_PEER)
        .map(|_| {
            let mut c = Smtp::connect(from, addr);
            let _ = c.line();
            c
        })
        .collect();
    let ends: Vec<Option<String>> = conns
        .iter_mut()
        .map(|c| c.closed_within(Duration::from_secs(2)))
        .collect();
    let closed = ends.iter().filter(|e| e.is_some()).count();
    assert_eq!(
        closed,
        3 * PER_PEER,
        "connections from one client beyond max_connections_per_peer = {PER_PEER}: {ends:?}\n{}",
        d.log()
            .lines()
            .filter(|l| l.contains("127.0.4.1"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// SMTP smuggling (CVE-2023-51764 and kin): a bare LF before a dot must not end the message
/// at the backend while greygate reads on. The would-be second message stays text of the
/// first; the backend gets exactly one message, with the line endings made CRLF.
#[test]
fn bare_line_endings_cannot_smuggle_a_second_message_past_greylisting() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("bare_line_endings_smuggling", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(
            b"Subject: smuggling-carrier\r\n\r\nfirst\n.\r\nMAIL FROM:<ceo@example.org>\r\n\
              RCPT TO:<smuggled@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n",
        )
        .unwrap();
    let end = c.reply();
    assert!(end.starts_with("250"), "the carrier is accepted: {end}");
    assert!(c.ask("QUIT").starts_with("221"));
    let got = delivered_whole(&s.postfix, "Subject: smuggling-carrier", b"");
    let body = String::from_utf8_lossy(&got.body).into_owned();
    assert!(
        body.contains("first\r\n.\r\nMAIL FROM:<ceo@example.org>")
            || body.contains("first\n.\nMAIL FROM:<ceo@example.org>"),
        "the would-be commands stay text of the message: {body:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let log = s.postfix.maillog();
    assert!(
        !log.contains("smuggled@example.org"),
        "the backend took a second message:\n{log}"
    );
    s.greygate.expect_log("bare_line_endings=1");
}

// Scope, listener: BDAT/CHUNKING (RFC 3030), offered when the backend offers it (Postfix
// does): chunks pass on as they are — no dot-stuffing, a line's leading dots kept, a chunk
// ending mid-line — and the backend's reply to each chunk reaches the client.
#[test]
fn bdat_chunks_are_relayed_byte_for_byte() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("bdat_chunks", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    let ehlo = c.ask("EHLO mx.example.net");
    assert!(
        ehlo.lines().any(|l| l[4..].starts_with("CHUNKING")),
        "{ehlo}"
    );
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    let first: &[u8] =
        b"Subject: bdat-chunks\r\n\r\n.a line that starts with a dot\r\n..two dots\r\nhalf a ";
    let second: &[u8] = b"line, ended in the second chunk\r\n.\r\nthe line above is one dot\r\n";
    c.stream
        .write_all(format!("BDAT {}\r\n", first.len()).as_bytes())
        .unwrap();
    c.stream.write_all(first).unwrap();
    let r = c.reply();
    assert!(r.starts_with("250"), "first chunk: {r}");
    c.stream
        .write_all(format!("BDAT {} LAST\r\n", second.len()).as_bytes())
        .unwrap();
    c.stream.write_all(second).unwrap();
    let r = c.reply();
    assert!(r.starts_with("250"), "last chunk: {r}");
    // A second transaction on the session, by DATA.
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(b"Subject: after-bdat\r\n\r\nby DATA\r\n.\r\n")
        .unwrap();
    assert!(c.reply().starts_with("250"));
    assert!(c.ask("QUIT").starts_with("221"));
    let mut sent = first.to_vec();
    sent.extend_from_slice(second);
    let body_sent = &sent[sent.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let got = delivered_whole(&s.postfix, "Subject: bdat-chunks", b"one dot\n");
    assert_eq!(got.body(), lf(body_sent), "the chunks as sent");
    got.greygate_received();
    delivered_whole(&s.postfix, "Subject: after-bdat", b"by DATA\n");
}

// Scope, limits: a message over max_message_size gets 552 5.3.4 and nothing of it is
// delivered; a MAIL whose SIZE is over the limit is refused at once; a session past
// max_recipients gets 452.
#[test]
fn message_and_recipient_limits_are_enforced() {
    let toml = greygate_toml(
        LONG,
        "max_message_size = 65536\nmax_recipients = 100\n",
        ALLOW_LOOPBACK,
    );
    let Some(s) = Site::start("message_and_recipient_limits", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    let ehlo = c.ask("EHLO mx.example.net");
    assert!(ehlo.contains("SIZE 65536"), "{ehlo}");
    let big = c.ask("MAIL FROM:<alice@example.net> SIZE=100000");
    assert!(big.starts_with("552 5.3.4"), "{big}");
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    for i in 0..100 {
        let r = c.ask(&format!("RCPT TO:<user{i}@example.org>"));
        assert!(r.starts_with("250"), "recipient {i}: {r}");
    }
    let over = c.ask("RCPT TO:<user100@example.org>");
    assert!(over.starts_with("452 4.5.3"), "{over}");
    assert!(c.ask("DATA").starts_with("354"));
    let line = "x".repeat(998);
    c.stream.write_all(b"Subject: too-big\r\n\r\n").unwrap();
    for _ in 0..100 {
        c.send(&line);
    }
    c.stream.write_all(b".\r\n").unwrap();
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4"), "{r}");
    // The session goes on: a message within the limit passes.
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(b"Subject: within-limit\r\n\r\nsmall\r\n.\r\n")
        .unwrap();
    assert!(c.reply().starts_with("250"));
    assert!(c.ask("QUIT").starts_with("221"));
    delivered_whole(&s.postfix, "Subject: within-limit", b"small\n");
    assert!(
        !s.postfix.delivered_now("Subject: too-big"),
        "nothing of the message over the limit was delivered"
    );
}

// Scope, limits: RFC 5321 §4.5.3.2's wait for the next command is for the whole line —
// a client that trickles a byte now and then is closed when it runs out, as a silent one
// is — and a session gets max_commands commands.
#[test]
fn silent_trickling_and_chatty_sessions_are_closed_at_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(
        dir.path(),
        &greygate_toml(LONG, "command_timeout = \"2s\"\nmax_commands = 10\n", ""),
    );
    let addr = d.smtp();
    let mut silent = Smtp::greeted(LOCAL, addr);
    // A byte every 250 ms, for up to 8 s: never 2 s without one.
    let mut trickling = Smtp::greeted(LOCAL, addr);
    trickling
        .stream
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "a client trickling a command a byte at a time is still connected"
        );
        if trickling.stream.write_all(b"N").is_err() {
            // Closed between two bytes: its last words may still be unread.
            let at = started.elapsed();
            got.extend(
                trickling
                    .closed_within(Duration::from_secs(1))
                    .unwrap_or_default()
                    .bytes(),
            );
            break at;
        }
        let mut buf = [0u8; 512];
        match read_some(&mut trickling.reader, &mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break started.elapsed(),
        }
    };
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("421 4.4.2"), "trickling: {got:?}");
    assert!(
        closed_after < Duration::from_millis(3500),
        "closed {closed_after:?} after its line began (command_timeout 2 s)"
    );
    let got = silent
        .closed_within(Duration::from_secs(5))
        .expect("the silent client is still connected");
    assert!(got.contains("421 4.4.2"), "silent: {got:?}");

    let mut chatty = Smtp::greeted(LOCAL, addr);
    for i in 0..10 {
        assert!(chatty.ask("NOOP").starts_with("250"), "command {i}");
    }
    let r = chatty.ask("NOOP");
    assert!(r.starts_with("421 4.7.0"), "{r}");
    assert!(chatty.closed_within(Duration::from_secs(5)).is_some());
    assert!(d.wait_log("client timed out", Duration::from_secs(5)));
}

/// A backend that answers the end of every message with `final_reply` (and each command
/// as Postfix would): for replies a real server gives only when it is failing.
fn scripted_backend(final_reply: &'static str) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // The daemon's start-up check, then the client's session.
        for _ in 0..2 {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            w.write_all(b"220 scripted ESMTP\r\n").unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let reply: &[u8] = match verb.as_str() {
                    "EHLO" => b"250-scripted\r\n250 PIPELINING\r\n",
                    "DATA" => b"354 go on\r\n",
                    "QUIT" => b"221 bye\r\n",
                    _ => b"250 ok\r\n",
                };
                w.write_all(reply).unwrap();
                if verb == "DATA" {
                    let mut data = String::new();
                    while r.read_line(&mut data).is_ok_and(|n| n > 0)
                        && !data.ends_with("\r\n.\r\n")
                    {}
                    w.write_all(final_reply.as_bytes()).unwrap();
                    break;
                }
                line.clear();
            }
        }
    });
    (addr, server)
}

// Scope, relay: a backend that says 421 (closing) in answer to the end of a message took
// nothing; the client is told to try again later (451 4.4.2), not that the channel closes.
#[test]
fn backend_closing_at_the_end_of_a_message_defers_it() {
    let (backend, server) = scripted_backend("421 4.3.0 scripted server closing\r\n");
    let dir = tempfile::tempdir().unwrap();
    let d = start_greygate(
        dir.path(),
        &greygate_toml(LONG, "backend_xclient = false\n", ALLOW_LOOPBACK),
        &backend.to_string(),
    );
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(b"Subject: closing\r\n\r\nbody\r\n.\r\n")
        .unwrap();
    let r = c.reply();
    assert!(r.starts_with("451 4.4.2"), "{r}");
    assert!(
        c.ask("NOOP").starts_with("250"),
        "the client's session goes on"
    );
    assert!(c.ask("QUIT").starts_with("221"));
    assert_eq!(
        wait_metric(&d, "greygate_smtp_backend_failures_total{}", 1.0),
        1.0
    );
    server.join().unwrap();
}

// Scope, relay: a backend that takes the connection and then says nothing (hung) costs
// the client backend_timeout, then 451 4.4.1; nothing is accepted.
#[test]
fn silent_backend_defers_at_rcpt_after_backend_timeout() {
    // Connections complete in the kernel's backlog; nobody ever answers them.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = start_greygate(
        dir.path(),
        &greygate_toml(LONG, "backend_timeout = \"1s\"\n", ALLOW_LOOPBACK),
        &hung.local_addr().unwrap().to_string(),
    );
    let mut c = Smtp::greeted(LOCAL, d.smtp());
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    let started = Instant::now();
    let r = c.ask("RCPT TO:<bob@example.org>");
    let took = started.elapsed();
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?} (backend_timeout 1 s)"
    );
    let data = c.ask("DATA");
    assert!(data.starts_with('5') || data.starts_with('4'), "{data}");
    assert!(c.ask("QUIT").starts_with("221"));
    drop(hung);
}

// Scope, listener: IPv4 and IPv6, several `--smtp-listen` addresses; an IPv6 client is
// named to the backend by XCLIENT and in `Received:` as an RFC 5321 address literal.
#[test]
fn ipv6_and_ipv4_listeners_relay_and_name_the_client() {
    if !postfix::available("ipv6_and_ipv4_listeners") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let postfix = Postfix::start(Policy::None, &[]);
    let greygate = DaemonConfig::new(dir.path())
        .toml(&greygate_toml(
            LONG,
            "",
            "[allow]\nclients = [\"127.0.0.0/8\", \"::1/128\"]\n",
        ))
        .smtp(
            &["127.0.0.1:0", "[::1]:0"],
            &format!("127.0.0.1:{}", postfix.smtp_port),
        )
        .start();
    let addrs: Vec<SocketAddr> = greygate
        .smtp_listeners
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    for (addr, subject) in [(addrs[0], "over-ipv4"), (addrs[1], "over-ipv6")] {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Smtp { stream, reader };
        assert!(c.reply().starts_with("220 "));
        transaction(&mut c, subject);
        assert!(c.ask("QUIT").starts_with("221"));
    }
    assert!(addrs[1].is_ipv6());
    let v4 = delivered_whole(&postfix, "Subject: over-ipv4", b"");
    assert!(
        v4.greygate_received_text()
            .contains("(unknown [127.0.0.1])"),
        "{}",
        v4.greygate_received_text()
    );
    let v6 = delivered_whole(&postfix, "Subject: over-ipv6", b"");
    assert!(
        v6.greygate_received_text().contains("(unknown [IPv6:::1])"),
        "{}",
        v6.greygate_received_text()
    );
    // Postfix took the IPv6 client's address from XCLIENT.
    let lines = wait_log_lines(&postfix, &["client=unknown[::1]"], 1);
    assert!(!lines.is_empty());
}

// Scope, listener: MAIL's SIZE, BODY=8BITMIME and SMTPUTF8 go on to the backend; an
// internationalised sender and 8-bit text arrive as sent; parameters greygate cannot pass
// on are refused.
#[test]
fn mail_parameters_and_eight_bit_text_reach_the_backend() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("mail_parameters", &toml, &["smtputf8_enable = yes"]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    let ehlo = c.ask("EHLO mx.example.net");
    for ext in ["8BITMIME", "SMTPUTF8", "SIZE"] {
        assert!(ehlo.contains(ext), "{ext} offered: {ehlo}");
    }
    // 8-bit text, declared: delivered as sent, and Postfix passes the declaration on.
    let body = "Grüße aus Köln, ünïcödé\r\n";
    let message = format!("Subject: eight-bit\r\n\r\n{body}");
    let mail = c.ask(&format!(
        "MAIL FROM:<alice@example.net> SIZE={} BODY=8BITMIME",
        message.len()
    ));
    assert!(mail.starts_with("250"), "{mail}");
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream.write_all(message.as_bytes()).unwrap();
    c.stream.write_all(b".\r\n").unwrap();
    assert!(c.reply().starts_with("250"));
    // An internationalised sender with SMTPUTF8: Postfix takes it from greygate as an
    // SMTPUTF8 message (and, relaying it on to smtp-sink, which does not offer SMTPUTF8,
    // says that it is one).
    let mail = c.ask("MAIL FROM:<jörg@example.net> SMTPUTF8");
    assert!(mail.starts_with("250"), "{mail}");
    assert!(c.ask("RCPT TO:<zoë@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all("Subject: utf8-sender\r\n\r\nhallo\r\n.\r\n".as_bytes())
        .unwrap();
    assert!(c.reply().starts_with("250"));
    // What greygate cannot pass on as asked is refused, not dropped: binary content and
    // a hold were never offered.
    for refused in ["BODY=BINARYMIME", "HOLDFOR=600"] {
        let r = c.ask(&format!("MAIL FROM:<alice@example.net> {refused}"));
        assert!(r.starts_with("555 5.5.4"), "{refused}: {r}");
    }
    assert!(c.ask("QUIT").starts_with("221"));
    // SMTPUTF8 is offered in an EHLO reply only: after HELO it is refused.
    let mut helo = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(helo.ask("HELO mx.example.net").starts_with("250"));
    let r = helo.ask("MAIL FROM:<jörg@example.net> SMTPUTF8");
    assert!(r.starts_with("555 5.5.4"), "{r}");
    assert!(helo.ask("QUIT").starts_with("221"));

    let got = delivered_whole(&s.postfix, "Subject: eight-bit", "ünïcödé\n".as_bytes());
    assert_eq!(got.body(), lf(body.as_bytes()));
    let args = got.header("X-Mail-Args:").unwrap_or_default().to_string();
    assert!(args.contains("BODY=8BITMIME"), "{args}");
    let log = wait_log_lines(
        &s.postfix,
        &["to=<zoë@example.org>", "SMTPUTF8 is required"],
        1,
    );
    assert!(!log.is_empty());
    assert!(s.postfix.maillog().contains("from=<jörg@example.net>"));
}

// Scope, relay: with `backend_proxy`, the client's address reaches a backend that takes
// the PROXY protocol (Postfix's smtpd_upstream_proxy_protocol = haproxy), v1 and v2.
#[test]
fn proxy_protocol_v1_and_v2_name_the_client_to_postfix() {
    if !postfix::available("proxy_protocol") {
        return;
    }
    let postfix = Postfix::start(Policy::None, &["smtpd_upstream_proxy_protocol = haproxy"]);
    let backend = format!("127.0.0.1:{}", postfix.smtp_port);
    for (version, client) in [
        ("v1", Ipv4Addr::new(127, 0, 5, 1)),
        ("v2", Ipv4Addr::new(127, 0, 5, 2)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = start_greygate(
            dir.path(),
            &greygate_toml(
                LONG,
                &format!("backend_proxy = \"{version}\"\nbackend_xclient = false\n"),
                ALLOW_LOOPBACK,
            ),
            &backend,
        );
        let mut c = Smtp::greeted(client, d.smtp());
        let subject = format!("proxy-{version}");
        transaction(&mut c, &subject);
        assert!(c.ask("QUIT").starts_with("221"));
        delivered_whole(&postfix, &format!("Subject: {subject}"), b"");
        let connects = wait_log_lines(&postfix, &[&format!("connect from unknown[{client}]")], 1);
        assert!(!connects.is_empty(), "{version}");
    }
}

// Scope, TLS: `backend_starttls` encrypts the relay to a backend that offers STARTTLS.
#[test]
fn backend_starttls_encrypts_the_relay_to_postfix() {
    if !postfix::available("backend_starttls")
        || !tool_available("backend_starttls", "/usr/bin/openssl")
    {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(certs.path());
    let toml = greygate_toml(LONG, "backend_starttls = true\n", ALLOW_LOOPBACK);
    let tls = [
        "smtpd_tls_security_level = may".to_string(),
        format!("smtpd_tls_cert_file = {}", cert.display()),
        format!("smtpd_tls_key_file = {}", key.display()),
        "smtpd_tls_loglevel = 1".to_string(),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let Some(s) = Site::start("backend_starttls", &toml, &tls) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    transaction(&mut c, "tls-to-backend");
    assert!(c.ask("QUIT").starts_with("221"));
    delivered_whole(&s.postfix, "Subject: tls-to-backend", b"");
    let lines = wait_log_lines(&s.postfix, &["TLS connection established from"], 1);
    assert!(!lines.is_empty());
}

// Bad input: a client that stops sending in mid-message but keeps the connection is
// closed after data_timeout; the backend discards the part it has, others are served.
#[test]
fn client_stalled_mid_data_is_closed_after_data_timeout_and_nothing_is_delivered() {
    let toml = greygate_toml(LONG, "data_timeout = \"1s\"\n", ALLOW_LOOPBACK);
    let Some(s) = Site::start("client_stalled_mid_data", &toml, &[]) else {
        return;
    };
    let mut stalled = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(stalled.ask("EHLO mx.example.net").starts_with("250"));
    assert!(
        stalled
            .ask("MAIL FROM:<alice@example.net>")
            .starts_with("250")
    );
    assert!(stalled.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(stalled.ask("DATA").starts_with("354"));
    stalled
        .stream
        .write_all(b"Subject: stalled\r\n\r\nthe first half, and then nothing")
        .unwrap();
    let started = Instant::now();
    // Meanwhile another client is served.
    relay_one(
        Ipv4Addr::new(127, 0, 0, 3),
        s.greygate.smtp(),
        "while-one-stalls",
    );
    assert!(
        stalled.closed_within(Duration::from_secs(5)).is_some(),
        "the stalled client is still connected"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    delivered_whole(&s.postfix, "Subject: while-one-stalls", b"");
    s.greygate.expect_log("during DATA");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!s.postfix.delivered_now("Subject: stalled"));
}

// Pregreet with `pregreet_action = "defer"`: the talker gets 421 4.7.1 and is closed.
#[test]
fn pregreet_defer_action_defers_the_talker() {
    let dir = tempfile::tempdir().unwrap();
    let d = without_backend(
        dir.path(),
        &greygate_toml(
            LONG,
            "pregreet_wait = \"1s\"\npregreet_action = \"defer\"\n",
            "",
        ),
    );
    let mut bot = Smtp::connect(LOCAL, d.smtp());
    assert!(bot.line().unwrap().starts_with("220-"));
    bot.send("EHLO x");
    let rest = bot
        .closed_within(Duration::from_secs(5))
        .expect("the talker's connection is closed");
    assert!(rest.starts_with("421 4.7.1"), "{rest:?}");
    assert_eq!(wait_metric(&d, "greygate_smtp_pregreets_total{}", 1.0), 1.0);
}

/// A quoted local part reaches the backend quoted, `<postmaster>` as postmaster, and an
/// address that would read as more parameters is refused.
#[test]
fn quoted_local_parts_and_postmaster_reach_the_backend_as_written() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start("quoted_local_parts", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(c.ask("EHLO mx.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    let quoted = c.ask("RCPT TO:<\"john smith\"@example.org>");
    assert!(quoted.starts_with("250"), "{quoted}");
    // Relayed as `<>`, Postfix would answer 501 (bad recipient syntax).
    let pm = c.ask("RCPT TO:<Postmaster>");
    assert!(!pm.starts_with("501"), "postmaster relayed as <>: {pm}");
    let injected = c.ask("RCPT TO:<x@example.org> NOTIFY=NEVER>");
    assert!(injected.starts_with('5'), "{injected}");
    assert!(c.ask("DATA").starts_with("354"));
    c.stream
        .write_all(b"Subject: quoted-local-part\r\n\r\nhi\r\n.\r\n")
        .unwrap();
    assert!(c.reply().starts_with("250"));
    assert!(c.ask("QUIT").starts_with("221"));
    let got = delivered_whole(&s.postfix, "Subject: quoted-local-part", b"");
    assert!(
        got.headers
            .iter()
            .any(|h| h.contains("\"john smith\"@example.org")),
        "{:?}",
        got.headers
    );
}

/// Lines of the backend Postfix's log that contain all of `words`.
fn log_lines(pf: &Postfix, words: &[&str]) -> Vec<String> {
    pf.maillog()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until the backend Postfix has logged `want` lines with all of `words`.
fn wait_log_lines(pf: &Postfix, words: &[&str], want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines = log_lines(pf, words);
        if lines.len() >= want {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} log lines with {words:?}:\n{}",
            lines.len(),
            pf.maillog()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One whole transaction on a raw connection, ended by QUIT.
fn relay_one(from: Ipv4Addr, to: SocketAddr, subject: &str) {
    let mut c = Smtp::greeted(from, to);
    transaction(&mut c, subject);
    quit_and_wait(c);
}

/// QUIT, then wait for greygate to close the connection: the session is over, its backend
/// session given back to the pool or closed.
fn quit_and_wait(mut c: Smtp) {
    assert!(c.ask("QUIT").starts_with("221"));
    assert!(
        c.closed_within(Duration::from_secs(10)).is_some(),
        "greygate closes the connection after QUIT"
    );
}

fn transaction(c: &mut Smtp, subject: &str) {
    assert!(c.ask("EHLO client.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    let rcpt = c.ask("RCPT TO:<bob@example.org>");
    assert!(rcpt.starts_with("250"), "{subject}: {rcpt}");
    assert!(c.ask("DATA").starts_with("354"));
    let end = c.ask(&format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n."));
    assert!(end.starts_with("250"), "{subject}: {end}");
}

/// The count of `connect from` lines of the backend Postfix's smtpd once greygate's
/// start-up check (EHLO, QUIT) is over: what the test's own sessions add to.
fn connects_after_the_check(pf: &Postfix) -> usize {
    wait_log_lines(pf, &["smtpd", "disconnect from", "quit=1"], 1);
    connects(pf)
}

fn connects(pf: &Postfix) -> usize {
    log_lines(pf, &["smtpd", "connect from"])
        .iter()
        .filter(|l| !l.contains("disconnect from"))
        .count()
}

/// No XCLIENT towards the backend: its sessions name no client and can be shared.
const NO_XCLIENT: &str = "backend_xclient = false\nbackend_idle = \"60s\"\n";

// Backend pool: later client sessions reuse an idle backend session.
#[test]
fn pooled_backend_session_serves_later_clients() {
    let toml = greygate_toml(LONG, NO_XCLIENT, ALLOW_LOOPBACK);
    let Some(s) = Site::start("pooled_backend_session_serves_later_clients", &toml, &[]) else {
        return;
    };
    let before = connects_after_the_check(&s.postfix);
    let clients = [2u8, 3, 4].map(|i| Ipv4Addr::new(127, 0, 0, i));
    for (i, from) in clients.iter().enumerate() {
        relay_one(*from, s.greygate.smtp(), &format!("pooled-{i}"));
    }
    assert_eq!(
        s.backend_sessions(),
        (1.0, 2.0),
        "one backend session for three client sessions"
    );
    wait_log_lines(&s.postfix, &["smtpd", ": client="], 3);
    assert_eq!(
        connects(&s.postfix) - before,
        1,
        "the backend saw one connection:\n{}",
        s.postfix.maillog()
    );
    // Each message carries its own client's Received: header.
    for (i, from) in clients.iter().enumerate() {
        let got = delivered_whole(&s.postfix, &format!("Subject: pooled-{i}"), b"");
        let received = got.greygate_received_text();
        assert!(
            received.contains(&format!("(unknown [{from}])")),
            "{received}"
        );
    }
}

// Backend pool: a session that named its client by XCLIENT is never shared (Postfix would
// refuse a second XCLIENT on it, and the next client would pass as the last).
#[test]
fn backend_session_that_named_its_client_by_xclient_is_never_shared() {
    let toml = greygate_toml(LONG, "backend_idle = \"60s\"\n", ALLOW_LOOPBACK);
    let Some(s) = Site::start("backend_session_that_named_its_client", &toml, &[]) else {
        return;
    };
    let before = connects_after_the_check(&s.postfix);
    let clients = [2u8, 3, 4].map(|i| Ipv4Addr::new(127, 0, 0, i));
    for (i, from) in clients.iter().enumerate() {
        relay_one(*from, s.greygate.smtp(), &format!("xclient-{i}"));
    }
    let lines = wait_log_lines(&s.postfix, &["smtpd", ": client="], 3);
    for (line, from) in lines.iter().zip(clients) {
        assert!(
            line.contains(&format!("client=unknown[{from}]")),
            "each message under its own client ({from}): {line}\n{}",
            s.postfix.maillog()
        );
    }
    assert_eq!(connects(&s.postfix) - before, 3, "{}", s.postfix.maillog());
    assert_eq!(s.backend_sessions(), (3.0, 0.0));
}

// Backend pool: a pooled session the backend closed meanwhile is replaced unnoticed.
#[test]
fn pooled_backend_session_the_backend_closed_is_replaced_transparently() {
    let toml = greygate_toml(LONG, NO_XCLIENT, ALLOW_LOOPBACK);
    let Some(s) = Site::start(
        "pooled_backend_session_the_backend_closed",
        &toml,
        &["smtpd_timeout = 1s"],
    ) else {
        return;
    };
    relay_one(LOCAL, s.greygate.smtp(), "before-timeout");
    // Postfix gives up on the idle pooled session (421, then closes).
    wait_log_lines(&s.postfix, &["smtpd", "timeout after"], 1);
    relay_one(LOCAL, s.greygate.smtp(), "after-timeout");
    delivered_whole(&s.postfix, "Subject: after-timeout", b"");
    assert_eq!(s.backend_sessions().0, 2.0);
    assert_eq!(
        metric(&s.greygate, "greygate_smtp_backend_failures_total{}"),
        0.0,
        "the closed session never reached a client"
    );
}

// Backend pool: bounded in size, and idle sessions closed after backend_idle.
#[test]
fn backend_pool_keeps_at_most_backend_pool_sessions_and_closes_idle_ones() {
    let toml = greygate_toml(
        LONG,
        "backend_xclient = false\nbackend_pool = 1\nbackend_idle = \"2s\"\n",
        ALLOW_LOOPBACK,
    );
    let Some(s) = Site::start("backend_pool_keeps_at_most", &toml, &[]) else {
        return;
    };
    connects_after_the_check(&s.postfix);
    let base = log_lines(&s.postfix, &["smtpd", "disconnect from"]).len();
    // Two clients at once: two backend sessions.
    let mut a = Smtp::greeted(LOCAL, s.greygate.smtp());
    let mut b = Smtp::greeted(Ipv4Addr::new(127, 0, 0, 2), s.greygate.smtp());
    transaction(&mut a, "bounded-a");
    transaction(&mut b, "bounded-b");
    quit_and_wait(a);
    quit_and_wait(b);
    // The pool keeps one of them; the other is closed at once.
    let ended = Instant::now();
    wait_log_lines(&s.postfix, &["smtpd", "disconnect from"], base + 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        log_lines(&s.postfix, &["smtpd", "disconnect from"]).len(),
        base + 1,
        "one backend session kept idle:\n{}",
        s.postfix.maillog()
    );
    // ... until backend_idle (2 s) has passed.
    wait_log_lines(&s.postfix, &["smtpd", "disconnect from"], base + 2);
    let idle = ended.elapsed();
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(6),
        "closed after {idle:?}"
    );
    assert_eq!(s.backend_sessions().0, 2.0);
    // A client after that opens a new one.
    relay_one(LOCAL, s.greygate.smtp(), "bounded-c");
    assert_eq!(s.backend_sessions(), (3.0, 0.0));
}

// The client's 354 goes out before the backend's: a backend that refuses DATA gets no
// message data, and its refusal is the client's answer to the end of the message.
#[test]
fn backend_refusing_data_answers_the_end_of_the_message_and_nothing_is_delivered() {
    let toml = greygate_toml(LONG, "", ALLOW_LOOPBACK);
    let Some(s) = Site::start(
        "backend_refusing_data_answers",
        &toml,
        &["smtpd_data_restrictions = reject"],
    ) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(c.ask("EHLO client.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    // Lines that would be commands, were they taken for any: they are message data.
    let end = c.ask("Subject: refused-data\r\n\r\nRSET\r\nQUIT\r\n.");
    assert!(end.starts_with("554"), "the backend's refusal: {end}");
    // The session goes on: the next message of the client reaches the backend's DATA
    // again (and is refused again), and the daemon still answers.
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    assert!(c.ask("DATA").starts_with("354"));
    assert!(
        c.ask("Subject: refused-again\r\n\r\nbody\r\n.")
            .starts_with("554")
    );
    assert!(c.ask("QUIT").starts_with("221"));
    let rejects = wait_log_lines(&s.postfix, &["reject: DATA"], 2);
    assert_eq!(rejects.len(), 2, "{}", s.postfix.maillog());
    assert!(
        log_lines(&s.postfix, &["cleanup"]).is_empty(),
        "no message reached the backend's queue:\n{}",
        s.postfix.maillog()
    );
    // Had the message's lines reached the backend as commands, its session summary
    // would count an RSET.
    let summaries = wait_log_lines(&s.postfix, &["smtpd", "disconnect from", "data=0/1"], 1);
    assert!(
        summaries.iter().all(|l| !l.contains("rset=")),
        "{summaries:?}"
    );
    assert_eq!(metric(&s.greygate, "greygate_smtp_messages_total{}"), 0.0);
}

// Backend pool: a backend session left in a transaction (the client quit after RCPT) is
// reset before the next client session uses it.
#[test]
fn backend_session_left_in_a_transaction_is_reset_before_it_is_reused() {
    let toml = greygate_toml(LONG, NO_XCLIENT, ALLOW_LOOPBACK);
    let Some(s) = Site::start("backend_session_left_in_a_transaction", &toml, &[]) else {
        return;
    };
    let mut c = Smtp::greeted(LOCAL, s.greygate.smtp());
    assert!(c.ask("EHLO client.example.net").starts_with("250"));
    assert!(c.ask("MAIL FROM:<alice@example.net>").starts_with("250"));
    assert!(c.ask("RCPT TO:<bob@example.org>").starts_with("250"));
    quit_and_wait(c);
    // Had the backend still been in that transaction, this MAIL would be a nested one.
    relay_one(LOCAL, s.greygate.smtp(), "after-reset");
    delivered_whole(&s.postfix, "Subject: after-reset", b"");
    assert_eq!(s.backend_sessions(), (1.0, 1.0));
}
