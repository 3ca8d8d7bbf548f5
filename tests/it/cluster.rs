//! Several real greygate daemons sharing one trust database on a real Redis and, separately,
//! a real PostgreSQL, as the MX hosts of one site would: shared greylisting and
//! auto-allow, simultaneous first sightings, and the server dying under load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use greygate::engine::TripletKey;
use greygate::store::{PostgresStore, RedisStore, Store};

use crate::harness::shared::{Kind, Server};
use crate::harness::{Daemon, DaemonConfig, PolicyClient, rcpt_request, run_cli};

/// The store timeout the daemons run with: every answer during an outage must come
/// within it (plus scheduling slack).
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

impl Server {
    /// The store as a daemon sees it, for checking records directly.
    fn store(&self) -> Arc<dyn Store> {
        let second = Duration::from_secs(1);
        match self {
            Server::Redis(r) => Arc::new(RedisStore::new(&r.url(), second, 5 * second).unwrap()),
            Server::Postgres(p) => {
                Arc::new(PostgresStore::new(&p.url(), 2, second, 5 * second).unwrap())
            }
        }
    }

    /// A daemon on this server: delay 2 s, auto-allow after one pass, the usual store
    /// timeout.
    fn daemon(&self, dir: &std::path::Path) -> Daemon {
        self.daemon_with_timeout(dir, STORE_TIMEOUT)
    }

    fn daemon_with_timeout(&self, dir: &std::path::Path, timeout: Duration) -> Daemon {
        DaemonConfig::new(dir)
            .toml(&format!(
                "[greylist]\ndelay = 2\nauto_allow_after = 1\n\n[store]\nbackend = \"{}\"\n\
                 url = \"{}\"\ntimeout = \"{}ms\"\n",
                self.backend(),
                self.url(),
                timeout.as_millis()
            ))
            .start()
    }
}

fn is_defer(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT ")
}

/// How many decision lines with `rule` the daemons logged.
fn count_rule(daemons: &[&Daemon], rule: &str) -> usize {
    let needle = format!("rule=\"{rule}\"");
    daemons
        .iter()
        .map(|d| d.log().matches(&needle).count())
        .sum()
}

fn shared_greylisting_and_auto_allow(kind: Kind, test: &str) {
    let Some(server) = Server::start(kind, test) else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (server.daemon(da.path()), server.daemon(db.path()));
    let (mut ca, mut cb) = (a.client(), b.client());

    let t1 = rcpt_request("192.0.2.10", "alice@example.net", "bob@example.org");
    let t2 = rcpt_request("203.0.113.7", "carol@example.net", "dave@example.org");
    assert!(is_defer(&ca.ask(&t1)), "first sighting via A deferred");
    assert!(
        is_defer(&cb.ask(&t1)),
        "retry via B before the delay deferred"
    );
    b.expect_log("rule=\"early-retry\""); // B saw A's record: not a new triplet
    assert!(is_defer(&ca.ask(&t2)));

    // `explain` reads the shared store while the daemons run.
    let config = da.path().join("greygate.toml");
    let (code, out, err) = run_cli(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--client",
        "192.0.2.10",
        "--from",
        "alice@example.net",
        "--to",
        "bob@example.org",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rule: early-retry"), "{out}");

    std::thread::sleep(Duration::from_millis(2200));
    let pass = cb.ask(&t1);
    assert!(
        pass.starts_with("PREPEND X-Greylist: delayed "),
        "first seen via A passes via B after the delay: {pass}"
    );
    let pass = ca.ask(&t2);
    assert!(pass.starts_with("PREPEND X-Greylist:"), "{pass}");

    // That pass via A auto-allowed 203.0.113.0/24 (auto_allow_after = 1): B lets a new
    // triplet from the group through at once.
    let t3 = rcpt_request("203.0.113.99", "erin@example.net", "frank@example.org");
    assert_eq!(cb.ask(&t3), "DUNNO");
    b.expect_log("rule=\"auto-allow\"");
}

#[test]
fn redis_daemons_share_greylisting_and_auto_allow() {
    shared_greylisting_and_auto_allow(
        Kind::Redis,
        "redis_daemons_share_greylisting_and_auto_allow",
    );
}

#[test]
fn postgres_daemons_share_greylisting_and_auto_allow() {
    shared_greylisting_and_auto_allow(
        Kind::Postgres,
        "postgres_daemons_share_greylisting_and_auto_allow",
    );
}

fn simultaneous_first_sightings(kind: Kind, test: &str) {
    const PER_DAEMON: usize = 32;
    let Some(server) = Server::start(kind, test) else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Correctness, not latency, is tested here: a generous timeout keeps a slow machine
    // from turning lock waits into fail-open answers.
    let (a, b) = (
        server.daemon_with_timeout(da.path(), Duration::from_secs(10)),
        server.daemon_with_timeout(db.path(), Duration::from_secs(10)),
    );
    let request = rcpt_request("198.51.100.20", "Race+tag@Example.NET", "rcpt@example.org");
    let started = greygate::service::unix_now();

    // All connections open first, then every request leaves at the same moment.
    let barrier = Arc::new(Barrier::new(2 * PER_DAEMON));
    let mut threads = Vec::new();
    for d in [&a, &b] {
        for _ in 0..PER_DAEMON {
            let mut client = d.client();
            let (barrier, request) = (barrier.clone(), request.clone());
            threads.push(std::thread::spawn(move || {
                barrier.wait();
                client.ask(&request)
            }));
        }
    }
    for t in threads {
        let reply = t.join().expect("client thread");
        assert!(
            is_defer(&reply),
            "every simultaneous attempt deferred: {reply}"
        );
    }
    let finished = greygate::service::unix_now();

    // Exactly one of the 64 decisions saw a new triplet, across both daemons.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_rule(&[&a, &b], "new") + count_rule(&[&a, &b], "early-retry") < 2 * PER_DAEMON
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count_rule(&[&a, &b], "new"), 1, "one first sighting");
    assert_eq!(count_rule(&[&a, &b], "early-retry"), 2 * PER_DAEMON - 1);

    // One record, every attempt counted, one first_seen.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let record = rt.block_on(async {
        let key = TripletKey {
            client: "198.51.100.0/24".into(),
            sender: "race@example.net".into(),
            recipient: "rcpt@example.org".into(),
        };
        server.store().get_triplet(&key).await.unwrap()
    });
    let t = record.expect("the triplet is stored");
    assert_eq!(t.attempts as usize, 2 * PER_DAEMON, "{t:?}");
    assert!((started..=finished).contains(&t.first_seen), "{t:?}");
    assert!(!t.passed);
}

#[test]
fn redis_simultaneous_first_sightings_make_one_record() {
    simultaneous_first_sightings(
        Kind::Redis,
        "redis_simultaneous_first_sightings_make_one_record",
    );
}

#[test]
fn postgres_simultaneous_first_sightings_make_one_record() {
    simultaneous_first_sightings(
        Kind::Postgres,
        "postgres_simultaneous_first_sightings_make_one_record",
    );
}

/// One reply seen by a load thread.
struct Seen {
    at: Instant,
    took: Duration,
    reply: Option<String>,
}

fn outage_under_load(kind: Kind, test: &str) {
    const THREADS: usize = 4;
    // Bounds the load whatever happens: at most this many requests per thread.
    const MAX_REQUESTS: usize = 50_000;
    let Some(mut server) = Server::start(kind, test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = server.daemon(dir.path());
    let addr = d.tcp();

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut client = PolicyClient::tcp(addr);
                let mut seen = Vec::new();
                for n in 0..MAX_REQUESTS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Always a new triplet: deferred when the store works, accepted
                    // (fail-open) when it does not.
                    let req = rcpt_request(
                        &format!("192.0.{t}.1"),
                        &format!("s{n}@example.net"),
                        "r@example.org",
                    );
                    let at = Instant::now();
                    let reply = client.try_ask(&req);
                    let failed = reply.is_none();
                    seen.push(Seen {
                        at,
                        took: at.elapsed(),
                        reply,
                    });
                    if failed {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                seen
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(1));
    let crashed = Instant::now();
    server.crash();
    std::thread::sleep(Duration::from_secs(3));
    let revived = Instant::now();
    server.revive();
    // Back to greylisting: wait for the daemon to defer again, then a little longer.
    let mut probe = d.client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    let back = loop {
        n += 1;
        let req = rcpt_request("203.0.113.1", &format!("probe{n}@x"), "r@example.org");
        if is_defer(&probe.ask(&req)) {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "greylisting did not resume after the server came back:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = load
        .into_iter()
        .flat_map(|t| t.join().expect("load thread"))
        .collect();

    let slack = STORE_TIMEOUT + Duration::from_secs(1);
    for s in &seen {
        let reply = s.reply.as_deref().unwrap_or_else(|| {
            panic!(
                "a connection got no answer (closed) during the outage:\n{}",
                d.log()
            )
        });
        assert!(
            reply == "DUNNO" || is_defer(reply),
            "only greylisting or fail-open answers: {reply}"
        );
        assert!(s.took < slack, "answered in {:?} (limit {slack:?})", s.took);
    }
    let before: Vec<&Seen> = seen.iter().filter(|s| s.at + s.took < crashed).collect();
    assert!(
        !before.is_empty() && before.iter().all(|s| is_defer(s.reply.as_deref().unwrap())),
        "deferred while the server was up"
    );
    // From a second after the crash until the restart, every answer is a fail-open.
    let down: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > crashed + Duration::from_secs(1) && s.at + s.took < revived)
        .collect();
    assert!(
        down.len() > 20,
        "load went on during the outage ({})",
        down.len()
    );
    assert!(
        down.iter().all(|s| s.reply.as_deref() == Some("DUNNO")),
        "fail-open while the server was down"
    );
    let after: Vec<&Seen> = seen.iter().filter(|s| s.at > back).collect();
    assert!(
        !after.is_empty() && after.iter().all(|s| is_defer(s.reply.as_deref().unwrap())),
        "greylisting again once the server is back"
    );
    d.expect_log("rule=\"store-fail-open\"");
    d.expect_log("greylisting resumes");
    eprintln!(
        "{test}: {} requests, {} during the outage, greylisting back {:?} after the restart",
        seen.len(),
        down.len(),
        back - revived
    );
}

#[test]
fn redis_killed_under_load_fails_open_and_recovers() {
    outage_under_load(
        Kind::Redis,
        "redis_killed_under_load_fails_open_and_recovers",
    );
}

#[test]
fn postgres_killed_under_load_fails_open_and_recovers() {
    outage_under_load(
        Kind::Postgres,
        "postgres_killed_under_load_fails_open_and_recovers",
    );
}

fn starts_while_server_is_down(kind: Kind, test: &str) {
    let Some(mut server) = Server::start(kind, test) else {
        return;
    };
    server.crash();
    let dir = tempfile::tempdir().unwrap();
    let d = server.daemon(dir.path());
    let mut c = d.client();
    let t = Instant::now();
    assert_eq!(
        c.ask(&rcpt_request("192.0.2.1", "a@example.net", "b@example.org")),
        "DUNNO",
        "fail-open while the server is down"
    );
    assert!(t.elapsed() < STORE_TIMEOUT + Duration::from_secs(1));
    server.revive();
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0.. {
        let req = rcpt_request("192.0.2.1", &format!("s{n}@example.net"), "b@example.org");
        if is_defer(&c.ask(&req)) {
            break;
        }
        assert!(Instant::now() < deadline, "never greylisted:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_daemon_starts_while_redis_is_down() {
    starts_while_server_is_down(Kind::Redis, "redis_daemon_starts_while_redis_is_down");
}

#[test]
fn postgres_daemon_starts_while_postgres_is_down() {
    starts_while_server_is_down(
        Kind::Postgres,
        "postgres_daemon_starts_while_postgres_is_down",
    );
}

fn check_config_connect(kind: Kind, test: &str) {
    let Some(mut server) = Server::start(kind, test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    let backend = server.backend();
    let write = |url: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[store]\nbackend = \"{backend}\"\nurl = \"{url}\"\nconnect_timeout = \"1s\"\n"
            ),
        )
        .unwrap();
    };
    let cfg_arg = cfg.to_str().unwrap();

    write(&server.url());
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    let who = match kind {
        Kind::Redis => "store server answered: Redis 7",
        Kind::Postgres => "store server answered: PostgreSQL ",
    };
    assert!(out.contains(who), "{out}");

    // Without --connect nothing is contacted; with it, a dead server is a runtime failure
    // whose message names the server but not the password.
    server.crash();
    let with_password = server.url().replacen("://", "://greygate:s3cret@", 1);
    let with_password = match kind {
        Kind::Redis => with_password,
        // The postgres URL already has a user: give it a password instead.
        Kind::Postgres => server.url().replacen("postgres@", "postgres:s3cret@", 1),
    };
    write(&with_password);
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(":***@"), "password hidden: {out}");
    let t = Instant::now();
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg, "--connect"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("cannot use the store"), "{err}");
    assert!(!format!("{out}{err}").contains("s3cret"), "{out}{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A URL of the other kind is a configuration error at its line.
    let other = match kind {
        Kind::Redis => "postgres://u@127.0.0.1/db",
        Kind::Postgres => "redis://127.0.0.1/",
    };
    write(other);
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("greygate.toml:3:"),
        "points at the url line: {err}"
    );
}

#[test]
fn redis_check_config_connects() {
    check_config_connect(Kind::Redis, "redis_check_config_connects");
}

#[test]
fn postgres_check_config_connects() {
    check_config_connect(Kind::Postgres, "postgres_check_config_connects");
}

#[test]
fn check_config_explains_store_setting_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    for (text, line, fragment) in [
        (
            "[store]\nbackend = \"redis\"\n",
            2,
            "needs the server's url",
        ),
        (
            "[store]\nurl = \"redis://127.0.0.1/\"\n",
            2,
            "backend = \"redis\"",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://u@h/d\"\npool_size = 0\n",
            4,
            "pool_size",
        ),
        (
            "[store]\nbackend = \"redis\"\nurl = \"redis://h/\"\nconnect_timeout = 0\n",
            4,
            "connect_timeout",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (code, out, err) = run_cli(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{text:?}: {out}{err}");
        assert!(
            err.contains(&format!("greygate.toml:{line}:")) && err.contains(fragment),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn store_urls_are_shown_without_passwords() {
    let shown = |url: &str| {
        greygate::store::ServerStore {
            redis: greygate::store::RedisTopology::Single,
            url: url.into(),
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
            tls_ca_file: None,
        }
        .to_string()
    };
    assert_eq!(
        shown("redis://:s3cret@redis.example:6379/0"),
        "redis://:***@redis.example:6379/0"
    );
    assert_eq!(
        shown("postgres://gg:s3cret@db1,db2/gg?target_session_attrs=read-write"),
        "postgres://gg:***@db1,db2/gg?target_session_attrs=read-write"
    );
    assert_eq!(
        shown("host=/run/postgresql user=gg password=s3cret"),
        "host=/run/postgresql user=gg password=***"
    );
    assert_eq!(shown("redis://127.0.0.1/"), "redis://127.0.0.1/");
    let debug = format!(
        "{:?}",
        greygate::store::ServerStore {
            redis: greygate::store::RedisTopology::Single,
            url: "postgres://gg:s3cret@db/gg".into(),
            pool_size: 1,
            connect_timeout: Duration::from_secs(1),
            tls_ca_file: None,
        }
    );
    assert!(!debug.contains("s3cret"), "{debug}");
}
