//! Runtime allow/deny entries kept in a shared store (Redis, and separately PostgreSQL):
//! two real daemons on one server, an entry made through either applies on both within
//! seconds, its removal and expiry too, a restart keeps them, and a daemon that loses the
//! store keeps the entries it had and keeps answering.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin::{Http, TOKEN};
use crate::harness::postfix::free_port;
use crate::harness::shared::{Kind, Server};
use crate::harness::{Daemon, DaemonConfig, PolicyClient, connect_from, rcpt_request, run_cli};

/// The most an entry may take to reach the other daemon (the figure); the daemons
/// poll every second (the default `[admin] entries_poll`).
const PROPAGATION: Duration = Duration::from_secs(5);
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

/// The configuration of a daemon on `server`: entries file in `dir`, admin token, `extra`.
fn site_toml(server: &Server, dir: &Path, extra: &str) -> String {
    format!(
        "hostname = \"mx.test.invalid\"\n\n[greylist]\ndelay = 300\n\n[store]\n\
         backend = \"{}\"\nurl = \"{}\"\ntimeout = \"{}ms\"\n\n[admin]\ntoken = \"{TOKEN}\"\n\
         entries_file = \"{}\"\n\n{extra}",
        server.backend(),
        server.url(),
        STORE_TIMEOUT.as_millis(),
        dir.join("entries.json").display()
    )
}

/// A daemon on `server` with the usual configuration.
fn start_daemon(server: &Server, dir: &Path) -> Daemon {
    DaemonConfig::new(dir)
        .toml(&site_toml(server, dir, ""))
        .start()
}

/// How long `cond` took to hold, asked every 100 ms; `None` if not within `limit`.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if cond() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Asks `c` until the answer is `DUNNO` (a pass without greylisting).
fn passes_within(c: &mut PolicyClient, req: &str, limit: Duration) -> Option<Duration> {
    within(limit, || c.ask(req) == "DUNNO")
}

/// Asks `d` until it logs one more decision by `rule` than before.
fn decided_by_within(
    d: &Daemon,
    c: &mut PolicyClient,
    req: &str,
    rule: &str,
    limit: Duration,
) -> Option<Duration> {
    let needle = format!("rule=\"{rule}\"");
    let before = d.log().matches(&needle).count();
    within(limit, || {
        let answer = c.ask(req);
        // The log line arrives through a pipe a little after the answer.
        d.wait_log_count(&needle, before + 1, Duration::from_millis(300))
            && answer.starts_with("DEFER_IF_PERMIT")
    })
}

fn add(http: &Http, list: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, entry) = http.post(&format!("/api/runtime/{list}"), Some(TOKEN), &body);
    assert_eq!(status, 201, "{entry}");
    entry
}

fn entries_reach_every_daemon(kind: Kind, test: &str) {
    let Some(server) = Server::start_persistent(kind, test) else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_daemon(&server, da.path());
    let mut b = start_daemon(&server, db.path());
    let (ha, hb) = (Http::new(&a), Http::new(&b));
    let (mut ca, mut cb) = (a.client(), b.client());

    // An allow entry made on A: B lets the client through without greylisting.
    let partner = rcpt_request("192.0.2.77", "news@partner.example", "bob@example.org");
    assert!(cb.ask(&partner).starts_with("DEFER_IF_PERMIT"), "before");
    let allow = add(
        &ha,
        "allow",
        json!({"target": "client", "value": "192.0.2.0/24", "comment": "partner"}),
    );
    let took = passes_within(&mut cb, &partner, PROPAGATION)
        .unwrap_or_else(|| panic!("allow added on A not applied on B:\n{}", b.log()));
    b.expect_log("rule=\"runtime-allow\"");
    eprintln!("{test}: allow entry applied on the other daemon after {took:?}");

    // A deny entry made on B: A defers the sender's mail by the deny rule.
    let deny = add(
        &hb,
        "deny",
        json!({"target": "sender", "value": "@spam.example"}),
    );
    assert_ne!(allow["id"], deny["id"], "ids unique across daemons");
    let spam = rcpt_request("198.51.100.5", "bulk@spam.example", "bob@example.org");
    let took = decided_by_within(&a, &mut ca, &spam, "deny", PROPAGATION)
        .unwrap_or_else(|| panic!("deny added on B not applied on A:\n{}", a.log()));
    eprintln!("{test}: deny entry applied on the other daemon after {took:?}");
    let listed = ha.get_json("/api/runtime");
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2, "{listed}");

    // Removal on B: A greylists the partner again.
    assert!(passes_within(&mut ca, &partner, PROPAGATION).is_some());
    let (status, gone) = hb.delete(&format!("/api/runtime/allow/{}", allow["id"]), Some(TOKEN));
    assert_eq!(status, 200, "{gone}");
    within(PROPAGATION, || {
        ca.ask(&partner).starts_with("DEFER_IF_PERMIT")
    })
    .unwrap_or_else(|| panic!("removal on B not applied on A:\n{}", a.log()));

    // An entry with a TTL applies on both, then expires on both.
    let brief = rcpt_request("203.0.113.9", "x@brief.example", "bob@example.org");
    add(
        &ha,
        "allow",
        json!({"target": "client", "value": "203.0.113.9", "ttl": "3s"}),
    );
    assert!(passes_within(&mut cb, &brief, PROPAGATION).is_some());
    assert!(passes_within(&mut ca, &brief, PROPAGATION).is_some());
    for (c, name) in [(&mut ca, "A"), (&mut cb, "B")] {
        within(Duration::from_secs(6), || {
            c.ask(&brief).starts_with("DEFER_IF_PERMIT")
        })
        .unwrap_or_else(|| panic!("entry with a TTL still applies on {name}"));
    }
    // ... and leaves the store (whichever daemon removed it).
    let gone = within(Duration::from_secs(3), || {
        let (code, out, err) = run_cli(&[
            "allow",
            "list",
            "--offline",
            "--json",
            "--config",
            da.path().join("greygate.toml").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        !out.contains("203.0.113.9")
    });
    assert!(gone.is_some(), "expired entry still in the store");

    // Without a daemon the CLI changes the store itself, and the daemons pick it up.
    let config = db.path().join("greygate.toml");
    let (code, out, err) = run_cli(&[
        "allow",
        "add",
        "--offline",
        "--config",
        config.to_str().unwrap(),
        "--comment",
        "from the CLI",
        "192.0.2.200",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let cli = rcpt_request("192.0.2.200", "a@cli.example", "bob@example.org");
    assert!(passes_within(&mut ca, &cli, PROPAGATION).is_some());
    let (code, out, err) = run_cli(&[
        "deny",
        "list",
        "--offline",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("@spam.example"), "{out}");

    // A restarted daemon has the entries before its first request.
    let (status, _) = b.terminate();
    assert!(status.success());
    b = start_daemon(&server, db.path());
    let mut cb = b.client();
    assert_eq!(cb.ask(&cli), "DUNNO", "allow kept across the restart");
    cb.ask(&spam);
    b.expect_log("rule=\"deny\"");
}

#[test]
fn redis_runtime_entries_reach_every_daemon() {
    entries_reach_every_daemon(Kind::Redis, "redis_runtime_entries_reach_every_daemon");
}

#[test]
fn postgres_runtime_entries_reach_every_daemon() {
    entries_reach_every_daemon(
        Kind::Postgres,
        "postgres_runtime_entries_reach_every_daemon",
    );
}

fn store_down_keeps_the_entries(kind: Kind, test: &str) {
    let Some(mut server) = Server::start_persistent(kind, test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(&server, dir.path());
    let http = Http::new(&d);
    let mut c = d.client();
    add(
        &http,
        "allow",
        json!({"target": "client", "value": "192.0.2.77"}),
    );
    let partner = rcpt_request("192.0.2.77", "news@partner.example", "bob@example.org");
    assert_eq!(c.ask(&partner), "DUNNO");

    server.crash();
    assert!(
        d.wait_log(
            "cannot read the runtime entries in the store",
            Duration::from_secs(10)
        ),
        "{}",
        d.log()
    );
    // The entry still applies, and other mail is answered per fail_mode (open), each
    // within the store timeout (with slack for scheduling).
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(
            c.ask(&partner),
            "DUNNO",
            "entry kept while the store is down"
        );
        let other = c.ask(&rcpt_request("198.51.100.8", "a@b.example", "c@d.example"));
        assert!(!other.starts_with("DEFER"), "fail-open: {other}");
        assert!(
            started.elapsed() < STORE_TIMEOUT * 2 + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // The admin API still lists what the daemon has.
    let listed = http.get_json("/api/runtime");
    assert_eq!(listed["entries"].as_array().unwrap().len(), 1, "{listed}");
    // Changes wait for the store, and say so.
    let (status, body) = http.post(
        "/api/runtime/allow",
        Some(TOKEN),
        &json!({"target": "client", "value": "192.0.2.78"}),
    );
    assert_eq!(status, 503, "{body}");

    server.revive();
    assert!(
        d.wait_log(
            "runtime entries readable in the store again",
            Duration::from_secs(40)
        ),
        "{}",
        d.log()
    );
    assert_eq!(c.ask(&partner), "DUNNO");
}

#[test]
fn redis_down_keeps_the_runtime_entries() {
    store_down_keeps_the_entries(Kind::Redis, "redis_down_keeps_the_runtime_entries");
}

#[test]
fn postgres_down_keeps_the_runtime_entries() {
    store_down_keeps_the_entries(Kind::Postgres, "postgres_down_keeps_the_runtime_entries");
}

/// One SMTP reply (all its lines).
fn smtp_reply(r: &mut BufReader<std::net::TcpStream>) -> String {
    let mut all = String::new();
    for _ in 0..100 {
        let mut l = String::new();
        assert!(r.read_line(&mut l).unwrap() > 0, "closed after {all:?}");
        all.push_str(&l);
        if l.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    all
}

fn smtp_ask(
    w: &mut std::net::TcpStream,
    r: &mut BufReader<std::net::TcpStream>,
    cmd: &str,
) -> String {
    w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    smtp_reply(r)
}

/// A greytrap hit on A's SMTP front defers that client on B's policy front end.
#[test]
fn redis_greytrap_on_one_daemon_denies_on_the_other() {
    let Some(server) = Server::start_persistent(
        Kind::Redis,
        "redis_greytrap_on_one_daemon_denies_on_the_other",
    ) else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let smtp = "[smtp]\npregreet_wait = \"0s\"\ntraps = [\"trap@example.org\"]\n";
    let a = DaemonConfig::new(da.path())
        .toml(&site_toml(&server, da.path(), smtp))
        .smtp(&["127.0.0.1:0"], &format!("127.0.0.1:{}", free_port()))
        .start();
    let b = start_daemon(&server, db.path());
    let mut cb = b.client();

    let trapped = Ipv4Addr::new(127, 0, 0, 3);
    let to: SocketAddr = a.smtp();
    let stream = connect_from(trapped, to);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    assert!(smtp_reply(&mut r).starts_with("220"));
    assert!(smtp_ask(&mut w, &mut r, "EHLO spam.example.com").starts_with("250"));
    assert!(smtp_ask(&mut w, &mut r, "MAIL FROM:<spam@example.com>").starts_with("250"));
    let rcpt = smtp_ask(&mut w, &mut r, "RCPT TO:<trap@example.org>");
    assert!(rcpt.starts_with("451"), "{rcpt}");
    a.expect_log("rule=\"greytrap\"");

    let req = rcpt_request("127.0.0.3", "other@example.net", "bob@example.org");
    let took = decided_by_within(&b, &mut cb, &req, "deny", PROPAGATION)
        .unwrap_or_else(|| panic!("greytrap deny not applied on B:\n{}", b.log()));
    eprintln!("greytrap entry applied on the other daemon after {took:?}");
    let listed = Http::new(&b).get_json("/api/runtime");
    assert!(
        listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["value"] == "127.0.0.3" && e["list"] == "deny"),
        "{listed}"
    );
}

/// A daemon switching to a shared store imports its old entries file once, when the store
/// has no entries yet; another daemon's file is left alone once the store has some.
#[test]
fn redis_imports_an_old_entries_file_into_an_empty_store_once() {
    use greygate::engine::{ListKind, Target};
    use greygate::service::RuntimeEntries;
    let Some(server) = Server::start_persistent(
        Kind::Redis,
        "redis_imports_an_old_entries_file_into_an_empty_store_once",
    ) else {
        return;
    };
    let now = greygate::service::unix_now();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, value) in [(&da, "192.0.2.77"), (&db, "192.0.2.88")] {
        RuntimeEntries::load(&dir.path().join("entries.json"))
            .unwrap()
            .add(
                ListKind::Allow,
                Target::Client,
                value,
                None,
                "old file",
                now,
            )
            .unwrap();
    }
    let a = start_daemon(&server, da.path());
    a.expect_log("runtime entries file imported into the store");
    assert!(da.path().join("entries.json.imported").exists());
    assert!(!da.path().join("entries.json").exists());
    let b = start_daemon(&server, db.path());
    b.expect_log("runtime entries file ignored");
    assert!(db.path().join("entries.json").exists(), "left alone");
    let mut cb = b.client();
    assert_eq!(
        cb.ask(&rcpt_request("192.0.2.77", "a@b.example", "c@d.example")),
        "DUNNO",
        "A's imported entry applies on B"
    );
    assert!(
        cb.ask(&rcpt_request("192.0.2.88", "a@b.example", "c@d.example"))
            .starts_with("DEFER_IF_PERMIT"),
        "B's file was not imported"
    );
}
