//! Connection slots under attack, against the real daemon: floods of connections that send
//! nothing useful, trickling requests, one address taking too much, running out of file
//! descriptors, and how much each of them writes to the log.
//!
//! Other addresses of 127/8 stand in for other hosts (every one of them is this machine).
//! Every loop is bounded in count and in time.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use greygate::proto::milter::{Command, DEFAULT_MAX_FRAME, Decoded, Family, Reply, decode_reply};

use crate::harness::{Daemon, DaemonConfig, PolicyClient, connect_from, rcpt_request, read_some};

/// The address the floods come from (Postfix on the same host would be here too).
const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Another host.
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A new client must be answered this fast while the flood holds its connections.
const PROMPT: Duration = Duration::from_millis(100);

const FLOOD: usize = 512;

/// `GET path` over a new connection from `from`; the status, or `None` when the
/// connection was closed without an answer. Gives up (panics) after `limit`.
fn http_get(from: Ipv4Addr, to: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(limit)).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = Vec::new();
    match s.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("no answer and no close within {limit:?}")
        }
        Err(_) if answer.is_empty() => return None,
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

/// The value of the first sample of `name` whose labels contain `labels`, from the
/// daemon's `/metrics`.
fn metric(d: &Daemon, name: &str, labels: &str) -> f64 {
    let mut s = TcpStream::connect(d.admin.expect("admin listener")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} with {labels} in:\n{body}"))
}

/// Waits (at most 10 s) until the daemon holds `n` connections on its `protocol` listener.
fn wait_open(d: &Daemon, protocol: &str, n: usize) {
    let labels = format!("protocol=\"{protocol}\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = metric(d, "greygate_connections_open", &labels);
        if open >= n as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "{open} of {n} connections open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks `req` on a new connection from `from`; the answer, how long connect and answer
/// took, and the connection (still open).
fn timed_ask(
    from: Ipv4Addr,
    to: SocketAddr,
    req: &str,
) -> (Option<String>, Duration, PolicyClient) {
    let t = Instant::now();
    let mut c = PolicyClient::from_tcp(connect_from(from, to));
    let answer = c.try_ask(req);
    (answer, t.elapsed(), c)
}

/// Whether the peer closed `s` (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match read_some(s, &mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Sends `piece` every `every` until the peer closes the connection; how long that took,
/// or `None` if it stayed open for `limit`.
fn trickle_until_closed(
    s: &mut TcpStream,
    piece: &[u8],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if s.write_all(piece).is_err() || closed_within(s, every) {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
fn blank_line_keepalives_on_every_policy_slot_do_not_lock_others_out() {
    let dir = tempfile::tempdir().unwrap();
    // One peer may fill the listener here: the test is about the listener being full.
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 300\n[policy]\nmax_connections_per_peer = 512\n")
        .start();
    let addr = d.tcp();
    let mut flood: Vec<TcpStream> = (0..FLOOD).map(|_| connect_from(LOCAL, addr)).collect();
    wait_open(&d, "policy", FLOOD);
    for _ in 0..3 {
        for s in &mut flood {
            let _ = s.write_all(b"\n");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // From the flood's own address and from another: answered at once. They stay open, so
    // each one needs a slot of its own.
    let mut kept = Vec::new();
    for (i, from) in [LOCAL, OTHER, LOCAL].into_iter().enumerate() {
        let req = rcpt_request("192.0.2.80", "a@example.net", &format!("r{i}@example.org"));
        let (answer, took, c) = timed_ask(from, addr, &req);
        kept.push(c);
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with("DEFER_IF_PERMIT")),
            "from {from}: {answer:?}\n{}",
            d.log()
        );
        assert!(took < PROMPT, "from {from}: answered after {took:?}");
    }
    // The flood's oldest connections made room; the listener stays at its limit.
    assert!(
        closed_within(&mut flood[0], Duration::from_secs(2)),
        "the longest-idle connection was closed"
    );
    d.expect_log("connection limit reached; closed the longest-idle connection to make room");
    let evicted = metric(
        &d,
        "greygate_connections_evicted_total",
        "protocol=\"policy\"",
    );
    assert!(evicted >= 3.0, "{evicted}");
}

/// A milter client speaking raw frames.
struct Mta {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Mta {
    fn connect(from: Ipv4Addr, to: SocketAddr) -> Mta {
        let s = connect_from(from, to);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Mta { s, buf: Vec::new() }
    }

    fn send(&mut self, cmd: Command) -> std::io::Result<()> {
        let mut out = Vec::new();
        cmd.encode(&mut out);
        self.s.write_all(&out)
    }

    fn ask(&mut self, cmd: Command) -> Option<Reply> {
        self.send(cmd).ok()?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Ok(Decoded::Frame(r, used)) = decode_reply(&self.buf, DEFAULT_MAX_FRAME) {
                self.buf.drain(..used);
                return Some(r);
            }
            match read_some(&mut self.s, &mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn optneg() -> Command {
    Command::OptNeg {
        version: 6,
        actions: 0x1ff,
        protocol: 0x1fffff,
    }
}

fn no_op() -> Command {
    Command::Macros {
        for_cmd: b'C',
        pairs: vec![("j".into(), "mx.example.org".into())],
    }
}

#[test]
fn no_op_frames_on_every_milter_slot_do_not_lock_others_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 300\n[milter]\nmax_connections_per_peer = 512\n")
        .milter(&["127.0.0.1:0"])
        .start();
    let addr = d.milter_tcp();
    let mut flood: Vec<Mta> = (0..FLOOD).map(|_| Mta::connect(LOCAL, addr)).collect();
    for m in &mut flood {
        let _ = m.send(optneg());
    }
    wait_open(&d, "milter", FLOOD);
    for _ in 0..3 {
        for m in &mut flood {
            let _ = m.send(no_op());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, from) in [LOCAL, OTHER].into_iter().enumerate() {
        let t = Instant::now();
        let mut mta = Mta::connect(from, addr);
        assert!(matches!(mta.ask(optneg()), Some(Reply::OptNeg { .. })));
        let connect = Command::Connect {
            hostname: "[192.0.2.81]".into(),
            family: Family::Inet,
            port: 25,
            address: "192.0.2.81".into(),
        };
        assert_eq!(mta.ask(connect), Some(Reply::Continue));
        assert_eq!(
            mta.ask(Command::Helo("client.example.net".into())),
            Some(Reply::Continue)
        );
        assert_eq!(
            mta.ask(Command::Mail(vec!["<a@example.net>".into()])),
            Some(Reply::Continue)
        );
        let rcpt = mta.ask(Command::Rcpt(vec![format!("<r{i}@example.org>")]));
        let took = t.elapsed();
        assert!(
            matches!(&rcpt, Some(Reply::ReplyCode(c)) if c.starts_with("451 4.7.1")),
            "from {from}: {rcpt:?}"
        );
        assert!(took < PROMPT, "from {from}: session took {took:?}");
    }
    assert!(
        closed_within(&mut flood[0].s, Duration::from_secs(2)),
        "the longest-idle connection was closed"
    );
    d.expect_log("closed the longest-idle connection to make room");
}

#[test]
fn keepalives_do_not_restart_the_idle_timer() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[policy]\nidle_timeout = \"1s\"\n[milter]\nidle_timeout = \"1s\"\n")
        .milter(&["127.0.0.1:0"])
        .start();
    let mut policy = connect_from(LOCAL, d.tcp());
    let took = trickle_until_closed(
        &mut policy,
        b"\n",
        Duration::from_millis(100),
        Duration::from_secs(5),
    )
    .expect("blank lines every 100 ms: closed at the idle timeout");
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&took),
        "{took:?}"
    );

    let mut mta = Mta::connect(LOCAL, d.milter_tcp());
    assert!(matches!(mta.ask(optneg()), Some(Reply::OptNeg { .. })));
    let mut frame = Vec::new();
    no_op().encode(&mut frame);
    let took = trickle_until_closed(
        &mut mta.s,
        &frame,
        Duration::from_millis(100),
        Duration::from_secs(5),
    )
    .expect("macro frames every 100 ms: closed at the idle timeout");
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&took),
        "{took:?}"
    );
}

#[test]
fn a_slow_header_flood_does_not_lock_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    // Defaults: 64 admin connections, 16 per address.
    let d = DaemonConfig::new(dir.path()).start();
    let admin = d.admin.expect("admin listener");
    // Four addresses hold 16 heads each that never end: every slot taken. The first
    // address also comes back for more, as a reconnecting client does.
    let mut flood = Vec::new();
    for host in [1, 3, 4, 5, 1] {
        for _ in 0..16 {
            let mut s = connect_from(Ipv4Addr::new(127, 0, 0, host), admin);
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
            flood.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3 {
        for s in &mut flood {
            let _ = s.write_all(b"x");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for from in [LOCAL, OTHER] {
        let t = Instant::now();
        let status = http_get(from, admin, "/healthz", Duration::from_secs(5));
        let took = t.elapsed();
        assert_eq!(status, Some(200), "from {from}:\n{}", d.log());
        assert!(took < Duration::from_secs(1), "from {from}: {took:?}");
    }
    d.expect_log("protocol=\"admin\"");
    d.expect_log("closed the longest-idle connection to make room");
}

#[test]
fn a_trickled_request_is_closed_at_io_timeout_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(
            "[policy]\nio_timeout = \"1s\"\n[milter]\nio_timeout = \"1s\"\n\
             [admin]\nrequest_timeout = \"1s\"\n",
        )
        .milter(&["127.0.0.1:0"])
        .start();
    let window = Duration::from_millis(900)..Duration::from_millis(2500);
    let every = Duration::from_millis(100);
    let limit = Duration::from_secs(5);

    // Policy: a whole attribute line every 100 ms, never the blank line that ends it.
    let mut policy = connect_from(LOCAL, d.tcp());
    policy.write_all(b"request=smtpd_access_policy\n").unwrap();
    let took = trickle_until_closed(&mut policy, b"a=b\n", every, limit).expect("closed");
    assert!(window.contains(&took), "policy: {took:?}");
    d.expect_log("request not completed within io_timeout");

    // Milter: a frame of 1,000 bytes, one byte every 100 ms.
    let mut mta = Mta::connect(LOCAL, d.milter_tcp());
    mta.s.write_all(&1000u32.to_be_bytes()).unwrap();
    mta.s.write_all(b"U").unwrap();
    let took = trickle_until_closed(&mut mta.s, b"x", every, limit).expect("closed");
    assert!(window.contains(&took), "milter: {took:?}");
    d.expect_log("milter frame not completed within io_timeout");

    // Admin: a header line every 100 ms, never the blank line.
    let mut http = connect_from(LOCAL, d.admin.expect("admin listener"));
    http.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let took = trickle_until_closed(&mut http, b"X-Slow: x\r\n", every, limit).expect("closed");
    assert!(window.contains(&took), "admin: {took:?}");
}

#[test]
fn the_per_peer_limit_turns_one_address_away_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 300\n[policy]\nmax_connections_per_peer = 4\n")
        .start();
    let addr = d.tcp();
    // Four connections from one address, each asking again as soon as it is answered: none
    // of them is idle, so none may be closed to make room.
    let stop = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicUsize::new(0));
    let busy: Vec<_> = (0..4)
        .map(|i| {
            let mut c = PolicyClient::from_tcp(connect_from(OTHER, addr));
            let (stop, asked) = (stop.clone(), asked.clone());
            std::thread::spawn(move || {
                let req = rcpt_request("192.0.2.90", "a@example.net", &format!("b{i}@example.org"));
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut answered = 0;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    if c.try_ask(&req).is_none() {
                        return Err(format!(
                            "busy connection {i} closed after {answered} answers"
                        ));
                    }
                    answered += 1;
                    asked.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(answered)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked.load(Ordering::SeqCst) < 8 {
        assert!(Instant::now() < deadline, "busy clients not answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The fifth from that address: closed at once, unanswered.
    let mut fifth = PolicyClient::from_tcp(connect_from(OTHER, addr));
    let got = fifth
        .closed_within(Duration::from_secs(2))
        .expect("the fifth connection is closed");
    assert!(got.is_empty(), "{got:?}");
    // Another address is served meanwhile.
    let (answer, _, _) = timed_ask(
        LOCAL,
        addr,
        &rcpt_request("192.0.2.91", "a@example.net", "c@example.org"),
    );
    assert!(answer.is_some(), "{}", d.log());
    d.expect_log("per-peer connection limit reached and every connection of the peer busy");
    stop.store(true, Ordering::SeqCst);
    for t in busy {
        let answered = t.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(answered >= 2);
    }
}

/// `greygate serve` with `--memory` (no store file to count) and the given descriptor limit.
fn with_nofile(dir: &std::path::Path, soft: u64, hard: u64) -> Daemon {
    DaemonConfig::new(dir)
        .toml("[greylist]\ndelay = 300\n")
        .args(&["--memory"])
        .nofile(soft, hard)
        .start()
}

/// The daemon's soft descriptor limit, from /proc.
fn soft_nofile(d: &Daemon) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn the_descriptor_limit_is_raised_to_what_the_limits_need() {
    let dir = tempfile::tempdir().unwrap();
    let d = with_nofile(dir.path(), 64, 4096);
    let line = d.log_line("file descriptor limit raised");
    assert!(line.contains("from=64"), "{line}");
    // One policy listener of 512, one admin of 64, and the rest.
    let to: u64 = line
        .split("to=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(to >= 512 + 64, "{line}");
    assert_eq!(soft_nofile(&d), to);
}

#[test]
fn out_of_descriptors_new_clients_are_refused_at_once_not_left_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let d = with_nofile(dir.path(), 64, 64);
    d.expect_log("file descriptor limit below what the connection limits need");
    assert_eq!(soft_nofile(&d), 64);
    let addr = d.tcp();
    // Answered connections stay open and hold a descriptor each, until there is none left.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..100 {
        let req = rcpt_request("192.0.2.95", "a@example.net", &format!("h{i}@example.org"));
        let t = Instant::now();
        let mut c = PolicyClient::from_tcp(connect_from(LOCAL, addr));
        match c.try_ask(&req) {
            Some(_) => held.push(c),
            None => {
                let took = t.elapsed();
                assert!(took < Duration::from_secs(1), "refused after {took:?}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 3, "descriptors never ran out, {} held", held.len());
    assert!(held.len() >= 10, "only {} served before", held.len());
    // The admin listener is out of descriptors too: its clients are refused as promptly.
    let t = Instant::now();
    let status = http_get(LOCAL, d.admin.unwrap(), "/healthz", Duration::from_secs(5));
    assert_eq!(status, None, "{}", d.log());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    d.expect_log("out of file descriptors; closing new connections at once");
    // Descriptors free again: served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let req = rcpt_request("192.0.2.96", "a@example.net", "again@example.org");
        if timed_ask(LOCAL, addr, &req).0.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "not served again:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `count=` of a summary line.
fn count_of(line: &str) -> u64 {
    line.split("count=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

#[test]
fn a_thousand_refused_connections_are_a_handful_of_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml("[greylist]\ndelay = 300\n[policy]\nmax_connections = 1\n")
        .start();
    let addr = d.tcp();
    // The one slot answers a request every 20 ms: never idle, so every newcomer is refused.
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let mut c = PolicyClient::from_tcp(connect_from(LOCAL, addr));
        let stop = stop.clone();
        std::thread::spawn(move || {
            let req = rcpt_request("192.0.2.97", "a@example.net", "b@example.org");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                assert!(c.try_ask(&req).is_some(), "the holder is never closed");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..1000 {
        drop(connect_from(OTHER, addr));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &d,
        "greygate_connections_refused_total",
        "protocol=\"policy\"",
    ) < 1000.0
    {
        assert!(Instant::now() < deadline, "not all refused yet");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The first refusal has its line; the rest are one count when the interval ends.
    assert!(
        d.wait_log(
            "connection limit reached; new connections closed: ",
            Duration::from_secs(15)
        ),
        "no summary:\n{}",
        d.log()
    );
    stop.store(true, Ordering::SeqCst);
    holder.join().unwrap();
    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection limit reached"))
        .collect();
    assert!(lines.len() <= 4, "{lines:#?}");
    let first = lines
        .iter()
        .filter(|l| l.contains("closing new connection"))
        .count() as u64;
    let counted: u64 = lines
        .iter()
        .filter(|l| l.contains("new connections closed: "))
        .map(|l| count_of(l))
        .sum();
    assert_eq!(first + counted, 1000, "{lines:#?}");
}

#[test]
fn fail_open_answers_log_one_warning_then_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml("[greylist]\ndelay = 300\n");
    // The store file locked by someone else: every request is answered per fail_mode.
    let lock = redb::Database::create(cfg.db_path()).expect("test opens the store file");
    let d = cfg.start();
    let mut c = d.client();
    for i in 0..200 {
        let req = rcpt_request("192.0.2.98", "a@example.net", &format!("f{i}@example.org"));
        assert_eq!(c.ask(&req), "DUNNO");
    }
    assert!(
        d.wait_log("store still failing: ", Duration::from_secs(15)),
        "no summary:\n{}",
        d.log()
    );
    drop(lock);
    let log = d.log();
    // Each request keeps its decision line, at INFO.
    let decisions = log
        .lines()
        .filter(|l| l.contains("rule=\"store-fail-open\"") && l.contains(" decision "))
        .collect::<Vec<_>>();
    assert_eq!(decisions.len(), 200);
    assert!(
        decisions.iter().all(|l| l.contains(" INFO ")),
        "{decisions:#?}"
    );
    // One warning, then the count of the others.
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN greygate::decision"))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(
        warnings[0].contains("store failed; answering per fail_mode"),
        "{}",
        warnings[0]
    );
    assert_eq!(count_of(warnings[1]), 199, "{}", warnings[1]);
}
