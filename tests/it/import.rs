//! `greygate import`: the real postgrey and the real sqlgrey (on SQLite and on a private
//! PostgreSQL) greylist a set of triplets until some pass and a client is auto-allowed;
//! they are stopped, their databases imported, and a greygate daemon on the store must
//! then pass what they passed, pass pending triplets whose delay has run since their first
//! sighting, keep fresh ones pending, and defer what they never saw.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::dns::have;
use crate::harness::postgres::Postgres;
use crate::harness::postgrey::Postgrey;
use crate::harness::redis::Redis;
use crate::harness::sqlgrey::{self, Sqlgrey, SqlgreyDb};
use crate::harness::{Daemon, DaemonConfig, PolicyClient, request_with, run_cli};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

/// `greygate import ARGS --json`: (exit code, report, stderr).
fn import(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = run_cli(&all);
    let v = if code == 0 {
        json(&out)
    } else {
        serde_json::Value::Null
    };
    (code, v, err)
}

/// The report's table `name`.
fn table<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no table {name} in {r:#}"))
}

fn skipped(t: &serde_json::Value, why: &str) -> u64 {
    t["skipped"][why].as_u64().unwrap_or(0)
}

/// A policy client on a loopback port.
fn client(port: u16) -> PolicyClient {
    PolicyClient::tcp(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Seconds of a `... please try again in N seconds` deferral.
fn wait_of(reply: &str) -> u64 {
    assert!(
        reply.starts_with("DEFER_IF_PERMIT"),
        "not a deferral: {reply}"
    );
    reply
        .split("try again in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no wait in {reply:?}"))
}

/// Checks the daemon's answers to one request per expected rule, in order.
fn expect_rules(d: &Daemon, cases: &[(&str, &str, &str, &str)]) {
    let mut c = d.client();
    for (i, (ip, from, to, rule)) in cases.iter().enumerate() {
        let reply = c.ask(&request_with(ip, from, to, &[]));
        match *rule {
            "known" | "auto-allow" => assert_eq!(reply, "DUNNO", "{ip} {from} {to}"),
            "delayed" => assert!(reply.starts_with("PREPEND X-Greylist: delayed"), "{reply}"),
            "new" => assert_eq!(wait_of(&reply), 300, "{ip} {from} {to}"),
            "early-retry" => {
                let w = wait_of(&reply);
                assert!(w > 0 && w < 300, "{ip} {from} {to}: {reply}");
            }
            other => panic!("no rule {other}"),
        }
        let line = format!("rule=\"{rule}\"");
        assert!(
            d.wait_log_count("verdict=", i + 1, Duration::from_secs(5)),
            "{}",
            d.log()
        );
        let logged = d
            .log()
            .lines()
            .filter(|l| l.contains("verdict="))
            .nth(i)
            .map(str::to_string)
            .unwrap_or_default();
        assert!(
            logged.contains(&line),
            "case {i} ({ip} {from} {to}): {logged}"
        );
    }
}

#[test]
fn postgrey_import_passes_what_postgrey_passed() {
    let test = "postgrey_import_passes_what_postgrey_passed";
    if !have(test, "/usr/sbin/postgrey", "postgrey")
        || !have(test, "/usr/bin/db5.3_dump", "db5.3-util")
    {
        return;
    }
    // postgrey honours `policy_test_time` for "now": the triplets get their ages from it.
    let now = unix_now();
    let pg = Postgrey::start_with(300, &["--auto-whitelist-clients=3"]);
    let mut c = client(pg.port);
    let mut n = 0;
    let mut ask = |ip: &str, from: &str, to: &str, ago: u64| {
        let at = (now - ago).to_string();
        // A message of its own each time: postgrey adds its header once per instance.
        n += 1;
        let instance = format!("{n}.1.1");
        c.ask(&request_with(
            ip,
            from,
            to,
            &[("policy_test_time", &at), ("instance", &instance)],
        ))
    };
    let defer = |r: String| assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    let pass = |r: String| assert!(r.starts_with("PREPEND X-Greylist"), "{r}");
    // 192.0.2.10 passes with three senders two hours apart: whitelisted (3 passes).
    for (i, ago) in [7 * 3600, 5 * 3600, 3 * 3600].into_iter().enumerate() {
        let from = format!("s{i}@a.example");
        defer(ask("192.0.2.10", &from, "r@example.org", ago));
        pass(ask("192.0.2.10", &from, "r@example.org", ago - 400));
    }
    assert_eq!(
        ask(
            "192.0.2.10",
            "other@z.example",
            "r@example.org",
            3 * 3600 - 600
        ),
        "DUNNO",
        "postgrey whitelisted the client"
    );
    // A bounce to an address with an extension, passed a day ago (one pass: not whitelisted).
    defer(ask(
        "198.51.100.20",
        "",
        "Carol+Lists@Example.org",
        25 * 3600,
    ));
    pass(ask(
        "198.51.100.20",
        "",
        "Carol+Lists@Example.org",
        25 * 3600 - 600,
    ));
    // IPv6, a BATV sender with an extension, passed an hour ago.
    let batv = "prvs=1234567890=Judy+x@Example.NET";
    defer(ask("2001:db8:5::25", batv, "kim@example.org", 3600));
    pass(ask("2001:db8:5::25", batv, "kim@example.org", 3000));
    // Pending: first seen 20 minutes ago, 10 seconds ago, and 3 days ago.
    defer(ask(
        "203.0.113.30",
        "dave@example.net",
        "erin@example.org",
        1200,
    ));
    defer(ask(
        "198.18.0.40",
        "frank@example.net",
        "gina@example.org",
        10,
    ));
    defer(ask(
        "100.64.0.5",
        "hank@example.net",
        "ivan@example.org",
        3 * 86_400,
    ));
    drop(c);
    let dbdir = pg.stop();
    let dbdir = dbdir.path().to_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path());
    let db = cfg.db_path();
    let db = db.to_str().unwrap();
    let postgrey_args = |extra: &[&'static str]| {
        let mut a = vec![
            "postgrey",
            dbdir,
            "--db",
            db,
            "--auto-whitelist-clients",
            "3",
        ];
        a.extend_from_slice(extra);
        a
    };

    // A dry run reports and writes nothing.
    let (code, dry, err) = import(&postgrey_args(&["--dry-run"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(dry["dry_run"], true);
    assert!(
        !std::path::Path::new(db).exists(),
        "a dry run created the store"
    );

    let (code, r, err) = import(&postgrey_args(&[]));
    assert_eq!(code, 0, "{err}");
    let t = table(&r, "postgrey.db");
    assert_eq!(
        (t["read"].as_u64(), t["merged"].as_u64()),
        (Some(8), Some(7)),
        "{r:#}"
    );
    assert_eq!(skipped(t, "expired"), 1, "{r:#}");
    assert_eq!(r["triplets"]["new"], 7, "{r:#}");
    assert_eq!(r["triplets"]["passed"], 5, "{r:#}");
    let c = table(&r, "postgrey_clients.db");
    assert_eq!(
        (c["read"].as_u64(), c["merged"].as_u64()),
        (Some(3), Some(3)),
        "{r:#}"
    );
    assert_eq!(r["clients"]["new"], 3, "{r:#}");
    assert_eq!(r["clients"]["auto_allowed"], 1, "{r:#}");
    assert_eq!(dry["tables"], r["tables"], "the dry run said the same");

    let d = cfg.start();
    // The daemon holds the embedded store: the import refuses (exit 3).
    let (code, _, err) = import(&postgrey_args(&[]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("stop the daemon first"), "{err}");
    expect_rules(
        &d,
        &[
            // The whitelisted client's group: anything from it passes.
            ("192.0.2.99", "new@z.example", "x@example.org", "auto-allow"),
            // Passed triplets pass at once, under greygate's normalisation.
            ("198.51.100.20", "", "carol@example.org", "known"),
            (
                "2001:db8:5::99",
                "judy@example.net",
                "kim@example.org",
                "known",
            ),
            // Pending: the delay ran 20 minutes ago; 10 seconds ago it began.
            (
                "203.0.113.31",
                "dave@example.net",
                "erin@example.org",
                "delayed",
            ),
            (
                "198.18.0.40",
                "frank@example.net",
                "gina@example.org",
                "early-retry",
            ),
            // Past greygate's retry window, and never seen: new.
            ("100.64.0.5", "hank@example.net", "ivan@example.org", "new"),
            ("198.51.100.20", "new@z.example", "carol@example.org", "new"),
        ],
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");

    // Again: greygate's records are as new or newer now; nothing is merged twice.
    let (code, again, err) = import(&postgrey_args(&[]));
    assert_eq!(code, 0, "{err}");
    let merged: u64 = again["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["merged"].as_u64().unwrap())
        .sum();
    assert_eq!(merged, 0, "{again:#}");
    assert_eq!(
        skipped(table(&again, "postgrey.db"), "existing-newer")
            + skipped(table(&again, "postgrey_clients.db"), "existing-newer"),
        10,
        "{again:#}"
    );

    // The same into Redis: `explain` reads what the daemons would decide.
    let Some(redis) = Redis::start(test) else {
        return;
    };
    let config = dir.path().join("redis.toml");
    std::fs::write(
        &config,
        crate::harness::without_dns(&format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        )),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, r, err) = import(&[
        "postgrey",
        dbdir,
        "--config",
        config,
        "--auto-whitelist-clients",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["triplets"]["new"], 7, "{r:#}");
    assert_eq!(r["clients"]["auto_allowed"], 1, "{r:#}");
    for (ip, from, to, rule) in [
        ("192.0.2.99", "new@z.example", "x@example.org", "auto-allow"),
        ("198.51.100.20", "", "carol@example.org", "known"),
        (
            "203.0.113.31",
            "dave@example.net",
            "erin@example.org",
            "delayed",
        ),
        ("198.51.100.20", "new@z.example", "carol@example.org", "new"),
    ] {
        let (code, out, err) = run_cli(&[
            "explain", "--config", config, "--client", ip, "--from", from, "--to", to, "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            json(&out)["decision"]["rule"],
            rule,
            "{ip} {from} {to}: {out}"
        );
    }
}

/// postgrey killed hard leaves records only in its database environment's cache, not yet
/// in `postgrey.db`: the import reads them all the same (db_dump joins the environment).
#[test]
fn postgrey_import_reads_what_a_killed_postgrey_left_in_its_cache() {
    let test = "postgrey_import_reads_what_a_killed_postgrey_left_in_its_cache";
    if !have(test, "/usr/sbin/postgrey", "postgrey")
        || !have(test, "/usr/bin/db5.3_dump", "db5.3-util")
    {
        return;
    }
    let pg = Postgrey::start(300);
    let mut c = client(pg.port);
    for i in 1..=20 {
        let ip = format!("192.0.2.{i}");
        let r = c.ask(&request_with(
            &ip,
            &format!("s{i}@a.example"),
            "r@example.org",
            &[],
        ));
        assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    }
    drop(c);
    let dbdir = pg.kill9();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.redb");
    let (code, r, err) = import(&[
        "postgrey",
        dbdir.path().to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let t = table(&r, "postgrey.db");
    assert_eq!(
        (t["read"].as_u64(), t["merged"].as_u64()),
        (Some(20), Some(20)),
        "{r:#}"
    );
}

/// Drives sqlgrey on `db`, ages two pending rows with `age(sender name, seconds)`, imports
/// `url` and checks a daemon on the result. `store_toml`: a greygate configuration naming
/// a shared store, into which the import runs while the daemon serves from it; `None`: an
/// embedded store, imported before the daemon starts.
fn sqlgrey_scenario(
    test: &str,
    db: SqlgreyDb,
    url: &str,
    age: impl Fn(&str, u64),
    store_toml: Option<&str>,
) {
    let sq = Sqlgrey::start(&db);
    let mut c = client(sq.port);
    let mut ask = |ip: &str, name: &str, from: &str, to: &str| {
        c.ask(&request_with(ip, from, to, &[("client_name", name)]))
    };
    let mut first = Vec::new();
    // 192.0.2.10 has a host name: keyed by 192.0.2 (class C). Five senders pass.
    for i in 1..=5 {
        first.push((
            "192.0.2.10",
            "mx1.example.net",
            format!("u{i}@d{i}.example"),
            "r@example.org",
        ));
    }
    // No host name: keyed by the whole address. A sender with an extension.
    first.push((
        "198.51.100.20",
        "unknown",
        "Alice+news@Example.NET".into(),
        "bob@example.org",
    ));
    // Two senders of one domain: sqlgrey moves them to domain_awl.
    first.push((
        "203.0.113.30",
        "mx.bulk.example",
        "x@bulk.example".into(),
        "r@example.org",
    ));
    first.push((
        "203.0.113.30",
        "mx.bulk.example",
        "y@bulk.example".into(),
        "r@example.org",
    ));
    for (ip, name, from, to) in &first {
        let r = ask(ip, name, from, to);
        assert!(r.starts_with("defer_if_permit"), "{r}\n{}", sq.log());
    }
    // Pending, never retried (aged below: 10 minutes, and 3 days).
    for (ip, from, to) in [
        ("2001:db8:5::25", "dave@example.net", "erin@example.org"),
        ("198.18.0.40", "frank@example.net", "gina@example.org"),
        ("100.64.0.5", "hank@example.net", "ivan@example.org"),
    ] {
        let r = ask(ip, "unknown", from, to);
        assert!(r.starts_with("defer_if_permit"), "{r}\n{}", sq.log());
    }
    // reconnect_delay = 0: a retry a second later passes.
    std::thread::sleep(Duration::from_millis(1500));
    for (ip, name, from, to) in &first {
        let r = ask(ip, name, from, to);
        assert!(
            r.starts_with("PREPEND X-Greylist: delayed"),
            "{r}\n{}",
            sq.log()
        );
    }
    drop(c);
    sq.stop();
    age("dave", 600);
    age("hank", 3 * 86_400);

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DaemonConfig::new(dir.path());
    let store = cfg.db_path().display().to_string();
    let config = dir.path().join("greygate.toml");
    let config = config.to_str().unwrap();
    let mut daemon = None;
    let target = match store_toml {
        Some(toml) => {
            // A shared store: the import merges while the daemon serves from it.
            cfg = cfg.toml(toml);
            daemon = Some(cfg.start());
            ["--config", config]
        }
        None => ["--db", store.as_str()],
    };
    let (code, r, err) = import(&["sqlgrey", url, target[0], target[1]]);
    assert_eq!(code, 0, "{test}: {err}");
    let fa = table(&r, "from_awl");
    assert_eq!(
        (fa["read"].as_u64(), fa["merged"].as_u64()),
        (Some(6), Some(6)),
        "{r:#}"
    );
    let da = table(&r, "domain_awl");
    assert_eq!(
        (da["read"].as_u64(), da["merged"].as_u64()),
        (Some(1), Some(1)),
        "{r:#}"
    );
    // Left in connect: Alice's row (sqlgrey matches from_awl without the extension, so
    // the row stays), and the three never retried.
    let cn = table(&r, "connect");
    assert_eq!(
        (cn["read"].as_u64(), cn["merged"].as_u64()),
        (Some(4), Some(3)),
        "{r:#}"
    );
    assert_eq!(skipped(cn, "expired"), 1, "{r:#}");
    assert_eq!(r["triplets"]["new"], 3, "{r:#}");
    assert_eq!(
        r["triplets"]["passed"], 1,
        "Alice's, covered by from_awl: {r:#}"
    );
    assert_eq!(r["clients"]["new"], 3, "{r:#}");
    assert_eq!(r["clients"]["auto_allowed"], 1, "{r:#}");

    let d = daemon.unwrap_or_else(|| cfg.start());
    expect_rules(
        &d,
        &[
            // Five senders passed from 192.0.2/24: greygate's auto_allow_after (5).
            ("192.0.2.99", "new@z.example", "x@example.org", "auto-allow"),
            (
                "198.51.100.20",
                "alice@example.net",
                "bob@example.org",
                "known",
            ),
            (
                "2001:db8:5::25",
                "dave@example.net",
                "erin@example.org",
                "delayed",
            ),
            (
                "198.18.0.40",
                "frank@example.net",
                "gina@example.org",
                "early-retry",
            ),
            ("100.64.0.5", "hank@example.net", "ivan@example.org", "new"),
            // One pass of 198.51.100.20's group, one of 203.0.113's: not auto-allowed (a
            // sender sqlgrey's domain_awl would pass is greylisted once more).
            ("198.51.100.20", "new@z.example", "bob@example.org", "new"),
            ("203.0.113.30", "z@bulk.example", "r@example.org", "new"),
        ],
    );
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlgrey_import_from_sqlite() {
    let test = "sqlgrey_import_from_sqlite";
    let dbdir = Sqlgrey::dir_for_db();
    let path = dbdir.path().join("sqlgrey.db");
    let db = SqlgreyDb::Sqlite(path.clone());
    if !sqlgrey::available(test, &db) {
        return;
    }
    let url = format!("sqlite:{}", path.display());
    sqlgrey_scenario(
        test,
        db,
        &url,
        |name, secs| {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let n = conn
                .execute(
                    "UPDATE connect SET first_seen = first_seen - ?1 WHERE sender_name = ?2",
                    rusqlite::params![i64::try_from(secs).unwrap(), name],
                )
                .unwrap();
            assert_eq!(n, 1, "{name}");
        },
        None,
    );
}

/// Runs SQL statements on a PostgreSQL database.
fn pg_exec(url: &str, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
    });
}

#[test]
fn sqlgrey_import_from_postgres() {
    let test = "sqlgrey_import_from_postgres";
    let probe = SqlgreyDb::Postgres {
        port: 0,
        dbname: String::new(),
    };
    if !sqlgrey::available(test, &probe) {
        return;
    }
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    // sqlgrey's timestamps are local times of the server's TimeZone: one far from UTC
    // shows whether the import reads them as the instants they are.
    pg_exec(&pg.url(), "CREATE DATABASE sqlgrey");
    pg_exec(
        &pg.url(),
        "ALTER DATABASE sqlgrey SET timezone TO 'America/New_York'",
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/sqlgrey", pg.port);
    let db = SqlgreyDb::Postgres {
        port: pg.port,
        dbname: "sqlgrey".into(),
    };
    let age = |name: &str, secs: u64| {
        pg_exec(
            &url,
            &format!(
                "UPDATE connect SET first_seen = first_seen - interval '{secs} seconds' \
                 WHERE sender_name = '{name}'"
            ),
        );
    };
    // Into greygate's own PostgreSQL store (another database on the same server), while
    // a daemon serves from it.
    pg_exec(&pg.url(), "CREATE DATABASE greygate");
    let store = format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{}/greygate\"\n",
        pg.port
    );
    sqlgrey_scenario(test, db, &url, age, Some(&store));
}

/// What the import cannot use is refused before anything is written.
#[test]
fn import_refuses_what_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.redb");
    let db = db.to_str().unwrap();
    let (code, _, err) = import(&["sqlgrey", "mysql://sqlgrey@db/sqlgrey", "--db", db]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("MySQL") && err.contains("not supported"),
        "{err}"
    );
    let (code, _, err) = import(&["sqlgrey", "redis://127.0.0.1", "--db", db]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = import(&["sqlgrey", "sqlite:/nonexistent/sqlgrey.db", "--db", db]);
    assert_eq!(code, 1, "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = import(&[
        "postgrey",
        empty.path().to_str().unwrap(),
        "--db",
        db,
        "--db-dump",
        "/bin/false",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("holds no postgrey.db"), "{err}");
    assert!(
        !std::path::Path::new(db).exists(),
        "a failed import created the store"
    );
    // The memory store lives only in a daemon.
    let config = dir.path().join("memory.toml");
    std::fs::write(&config, "[store]\nbackend = \"memory\"\n").unwrap();
    std::fs::write(empty.path().join("postgrey.db"), "").unwrap();
    let (code, _, err) = import(&[
        "postgrey",
        empty.path().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--db-dump",
        "/bin/false",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("memory store"), "{err}");
}
