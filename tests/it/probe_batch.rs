//! `greygate probe --file`: one destinations file, many real servers on loopback at once —
//! greygate and postgrey (each behind Postfix) greylisting, smtp-sink accepting, Postfix
//! rejecting, a closed port — and the politeness bounds as the servers see them.
//!
//! Every server is on 127.0.0.1 with its own port, so each line names its server
//! (`RECIPIENT 127.0.0.1:PORT`). Some servers sit behind a counting relay: a listener that
//! forwards each connection to the real server and counts the sessions open at once, for
//! itself and over all relays. A session counts from its accept until the client's QUIT
//! (or its hang-up): the client reads QUIT's reply, through the relay, before it closes
//! and before its next connection to that server may start, so a relay never sees the end
//! of one session late and the next one early.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::dns::have;
use crate::harness::postfix::{self, Policy, Postfix, free_port};
use crate::harness::postgrey::Postgrey;
use crate::harness::{read_some, run_cli};
use crate::outbound::{DELAY, greygate_site};

/// How long a relay holds each connection before the server's banner: sessions overlap
/// for sure when the prober lets them.
const HOLD: Duration = Duration::from_millis(300);

/// Sessions open now, at most, and in all.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn reset(&self) {
        assert_eq!(
            self.now.load(Ordering::SeqCst),
            0,
            "a session is still open"
        );
        self.peak.store(0, Ordering::SeqCst);
        self.total.store(0, Ordering::SeqCst);
    }
}

/// One relayed session in the gauges, until `leave` or drop.
struct Open<'a> {
    gauges: [&'a Gauge; 2],
    open: bool,
}

impl Open<'_> {
    fn leave(&mut self) {
        if std::mem::take(&mut self.open) {
            self.gauges.iter().for_each(|g| g.leave());
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A counting relay in front of a real server. Stopped on drop.
struct Relay {
    port: u16,
    gauge: Arc<Gauge>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(upstream: u16, all: &Arc<Gauge>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let gauge = Arc::new(Gauge::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (g, a, s) = (gauge.clone(), all.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let (g, a) = (g.clone(), a.clone());
                std::thread::spawn(move || relay(client, upstream, [&g, &a]));
            }
        });
        Relay {
            port,
            gauge,
            stop,
            accept: Some(accept),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Forwards one connection, counting it open from now until the client's QUIT.
fn relay(client: TcpStream, upstream: u16, gauges: [&Gauge; 2]) {
    gauges.iter().for_each(|g| g.enter());
    let mut open = Open { gauges, open: true };
    std::thread::sleep(HOLD);
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    for s in [&client, &up] {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    }
    let (Ok(mut up_r), Ok(mut client_w)) = (up.try_clone(), client.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
    });
    let mut client_r = client;
    let mut buf = [0u8; 4096];
    loop {
        let n = match read_some(&mut client_r, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The prober writes one command per write: QUIT starts its chunk.
        if buf[..n].len() >= 4 && buf[..4].eq_ignore_ascii_case(b"QUIT") {
            open.leave();
        }
        if up.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    open.leave();
    let _ = up.shutdown(Shutdown::Write);
    let _ = back.join();
}

/// A standalone smtp-sink that accepts every recipient. Killed on drop.
struct Sink {
    port: u16,
    child: Child,
}

impl Sink {
    fn start() -> Sink {
        let port = free_port();
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "postfix"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("50")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink");
        let sink = Sink { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        sink
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `greygate probe --helo probe.example.net --timeout 10s ARGS`, optionally with stdin.
fn probe(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut all = vec!["probe", "--helo", "probe.example.net", "--timeout", "10s"];
    all.extend_from_slice(args);
    let Some(input) = stdin else {
        return run_cli(&all);
    };
    let mut child = Command::new(crate::harness::greygate_bin())
        .args(&all)
        .env_remove("GREYGATE_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run greygate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn row<'a>(v: &'a serde_json::Value, rcpt: &str) -> &'a serde_json::Value {
    v["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["recipient"] == rcpt)
        .unwrap_or_else(|| panic!("{rcpt} missing: {v:#}"))
}

#[test]
fn probe_batch_file_many_servers_politely() {
    if !postfix::available("probe_batch") || !have("probe_batch", "/usr/sbin/postgrey", "postgrey")
    {
        return;
    }
    let (_gg, grey, _dir) = greygate_site(DELAY);
    let pg = Postgrey::start(DELAY);
    let pg_pf = Postfix::start(Policy::Service(format!("inet:127.0.0.1:{}", pg.port)), &[]);
    let rejecting = Postfix::start(Policy::None, &["smtpd_recipient_restrictions = reject"]);
    let sink = Sink::start();
    let closed = free_port();
    let all = Arc::new(Gauge::default());
    // Two relays to the one smtp-sink: two servers as the prober sees them.
    let (s1, s2) = (Relay::start(sink.port, &all), Relay::start(sink.port, &all));
    let rej = Relay::start(rejecting.smtp_port, &all);

    let relayed = format!(
        "# accepting: a bare domain (postmaster@a1.test) and addresses, two servers
a1.test           {s1}
u@a2.test         {s1}
u@a3.test         {s1}
u@b1.test         {s2}
u@b2.test         {s2}
u@b3.test         {s2}

# rejecting
u@r1.test {rej}   # Postfix with smtpd_recipient_restrictions = reject
u@r2.test {rej}
u@r3.test {rej}
",
        s1 = s1.addr(),
        s2 = s2.addr(),
        rej = rej.addr()
    );
    let tmp = tempfile::tempdir().unwrap();
    let list = tmp.path().join("destinations.txt");
    let file = list.to_str().unwrap();

    // Bad lines: all reported with their numbers, and not one connection made.
    std::fs::write(
        &list,
        format!(
            "{relayed}bad@ {s1}\nu@x.test {s1} extra\nu@y.test 127.0.0.1:0\n",
            s1 = s1.addr()
        ),
    )
    .unwrap();
    let (code, out, err) = probe(&["--file", file], None);
    assert_eq!(code, 2, "{out}\n{err}");
    for n in [13, 14, 15] {
        assert!(err.contains(&format!("destinations.txt:{n}: ")), "{err}");
    }
    assert!(err.contains("nothing was probed"), "{err}");
    assert_eq!(all.total(), 0, "connections made for a bad file");
    let (code, _, err) = probe(&["--file", "-"], Some("# nothing yet\n\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no destinations"), "{err}");
    // Absurd input: refused without reading it all.
    let huge = tmp.path().join("huge.txt");
    std::fs::write(&huge, "u@example.org\n".repeat(3 << 20 >> 4)).unwrap();
    let (code, _, err) = probe(&["--file", huge.to_str().unwrap()], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("larger than 2 MiB"), "{err}");

    // Everything at once, greylisting destinations retried until accepted.
    let greylisting = format!(
        "dave@grey.test 127.0.0.1:{}\nerin@pg.test 127.0.0.1:{}\nu@closed.test 127.0.0.1:{closed}\n",
        grey.smtp_port, pg_pf.smtp_port
    );
    std::fs::write(&list, format!("{greylisting}{relayed}")).unwrap();
    let html = tmp.path().join("report.html");
    let started = Instant::now();
    let (code, out, err) = probe(
        &[
            "--json",
            "--retry-every",
            "1s",
            "--until",
            "6s",
            "--html",
            html.to_str().unwrap(),
            "--file",
            file,
        ],
        None,
    );
    let took = started.elapsed();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}\n{err}"));
    // The closed port is the most severe result.
    assert_eq!(code, 7, "{v:#}\n{err}");
    for rcpt in ["dave@grey.test", "erin@pg.test"] {
        let r = row(&v, rcpt);
        assert_eq!(r["status"], "accepted", "{r:#}");
        assert_eq!(r["was_greylisted"], true, "{r:#}");
        assert_eq!(r["attempts"][0]["status"], "greylisted", "{r:#}");
        let t = r["time_to_accept_secs"].as_f64().expect("time to accept");
        assert!(
            (DELAY as f64 - 1.0..6.0).contains(&t),
            "{rcpt}: accepted after {t} s for a {DELAY} s delay: {r:#}"
        );
        assert!(r["attempt_count"].as_u64().unwrap() >= 2, "{r:#}");
    }
    let evidence = |rcpt| {
        row(&v, rcpt)["attempts"][0]["reply"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(evidence("dave@grey.test").starts_with("450 4.7.1"), "{v:#}");
    assert!(evidence("erin@pg.test").starts_with("450 4.2.0"), "{v:#}");
    for rcpt in [
        "postmaster@a1.test",
        "u@a2.test",
        "u@a3.test",
        "u@b1.test",
        "u@b2.test",
        "u@b3.test",
    ] {
        let r = row(&v, rcpt);
        assert_eq!(r["status"], "accepted", "{r:#}");
        assert_eq!(r["attempt_count"], 1, "{r:#}");
        assert_eq!(r["time_to_accept_secs"], serde_json::Value::Null);
    }
    for rcpt in ["u@r1.test", "u@r2.test", "u@r3.test"] {
        let r = row(&v, rcpt);
        assert_eq!(r["status"], "rejected", "{r:#}");
        assert_eq!(r["attempt_count"], 1, "{r:#}");
        assert!(
            r["attempts"][0]["reply"]
                .as_str()
                .unwrap()
                .starts_with("554 5.7.1"),
            "{r:#}"
        );
    }
    let down = row(&v, "u@closed.test");
    assert_eq!(down["status"], "no_connection", "{down:#}");
    assert!(down.to_string().contains("refused"), "{down:#}");
    // Retried every second for six seconds after its first try: 7 tries.
    assert_eq!(down["attempt_count"], 7, "{down:#}");
    assert_eq!(down["line"], 3);
    let t = &v["totals"];
    assert_eq!(t["destinations"], 12, "{t:#}");
    assert_eq!(t["accepted"], 8, "{t:#}");
    assert_eq!(t["greylisted_then_accepted"], 2, "{t:#}");
    assert_eq!(t["rejected"], 3, "{t:#}");
    assert_eq!(t["no_connection"], 1, "{t:#}");
    // Politeness, as the servers saw it: one session at a time on each relayed server
    // (three each), all three servers at once.
    for (name, r) in [("s1", &s1), ("s2", &s2), ("rej", &rej)] {
        assert_eq!(r.gauge.total(), 3, "{name}");
        assert_eq!(r.gauge.peak(), 1, "{name}: sessions at once");
    }
    assert_eq!(all.peak(), 3, "relayed sessions at once over all servers");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(!page.contains("<script"), "{page}");
    assert!(
        page.contains("accepted after greylisting") && page.contains("dave@grey.test"),
        "{page}"
    );
    assert!(page.contains("&lt;u@r1.test&gt;"), "{page}");

    // A run-wide bound of 2 over the three relayed servers: never three at once. From
    // stdin, as text: the table.
    for g in [&all, &s1.gauge, &s2.gauge, &rej.gauge] {
        g.reset();
    }
    let (code, out, err) = probe(&["--concurrency", "2", "--file", "-"], Some(&relayed));
    assert_eq!(code, 6, "{out}\n{err}");
    assert_eq!(all.peak(), 2, "sessions at once with --concurrency 2");
    for (name, r) in [("s1", &s1), ("s2", &s2), ("rej", &rej)] {
        assert_eq!(r.gauge.total(), 3, "{name}");
        assert_eq!(r.gauge.peak(), 1, "{name}: sessions at once");
    }
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("DESTINATION"), "{out}");
    assert!(
        lines[1].starts_with(&format!("postmaster@a1.test via {}", s1.addr()))
            && lines[1].contains(" accepted "),
        "{out}"
    );
    assert!(
        lines[7].contains(" rejected ") && lines[7].contains("554 5.7.1"),
        "{out}"
    );
    assert_eq!(
        lines[10],
        "9 destinations: 6 accepted, 0 greylisted, 0 temporary failure, 3 rejected, 0 no connection",
        "{out}"
    );
}
