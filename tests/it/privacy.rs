//! `[store] hash_addresses` against the real daemon and each backend: after mail went
//! through, the store holds no sender or recipient address — Redis keys and values
//! (`redis-cli --scan` + `GET`), the PostgreSQL tables (`psql`), the embedded file's bytes —
//! while list, explain, release and purge by address still find the records; a store
//! written in plain mode refuses to start in hashed mode, naming the setting.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admin::TOKEN;
use crate::harness::postgres::Postgres;
use crate::harness::redis::Redis;
use crate::harness::{Daemon, DaemonConfig, greygate_bin, rcpt_request, run_cli, tool_available};

const SECRET: &str = "privacy-test-secret-0123456789abcdef";
/// Every address this test sends; none may reach the store as text.
const ALICE: &str = "Alice.Privacy@Sender.example";
const BOB: &str = "bob.privacy@rcpt.example";
const CAROL: &str = "carol.privacy@sender2.example";
const DAVE: &str = "dave.privacy@rcpt2.example";
const ERIN: &str = "erin.privacy@sender3.example";
const FRANK: &str = "frank.privacy@rcpt3.example";

/// The config of one backend (`store` is the rest of `[store]`), hashed or not.
fn config(dir: &Path, store: &str, hashed: bool) -> String {
    let secret = dir.join("hash.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let hashing = if hashed {
        format!(
            "hash_addresses = true\nhash_secret_file = \"{}\"\n",
            secret.display()
        )
    } else {
        String::new()
    };
    format!(
        "[greylist]\ndelay = 300\n\n[dns]\nenabled = false\n\n[admin]\ntoken = \"{TOKEN}\"\n\n\
         [store]\n{store}\n{hashing}"
    )
}

fn cli(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap(), "--admin", &url]);
    run_cli(&all)
}

/// The triplets `list --json ARGS` gives, as (client, sender, recipient).
fn listed(d: &Daemon, args: &[&str]) -> Vec<(String, String, String)> {
    let mut all = vec!["list", "--json"];
    all.extend(args);
    let (code, out, err) = cli(d, &all);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let k = &e["key"];
            let s = |f: &str| k[f].as_str().unwrap().to_string();
            (s("client"), s("sender"), s("recipient"))
        })
        .collect()
}

/// Sends mail, then lists, explains, releases and purges by address; returns the digest
/// of ALICE as the store holds it (for the dumps' positive control).
fn mail_and_queries(d: &Daemon) -> String {
    let mut c = d.client();
    for (ip, from, to) in [
        ("192.0.2.10", ALICE, BOB),
        ("192.0.2.11", CAROL, DAVE),
        ("192.0.2.12", ERIN, FRANK),
    ] {
        let req = rcpt_request(ip, from, to);
        assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));
        assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"), "early retry");
    }

    let all = listed(d, &[]);
    assert_eq!(all.len(), 3, "{all:?}");
    for (client, sender, recipient) in &all {
        assert!(
            client.starts_with("192.0.2."),
            "the client group stays: {client}"
        );
        assert!(
            sender.starts_with("h:") && recipient.starts_with("h:"),
            "listed as digests: {sender} {recipient}"
        );
    }
    // By address: the query is normalised and hashed as the keys were.
    let alice = listed(d, &["--sender", &ALICE.to_uppercase()]);
    assert_eq!(alice.len(), 1, "{alice:?}");
    let by_rcpt = listed(d, &["--recipient", BOB]);
    assert_eq!(by_rcpt, alice);
    // A digest matches a whole address, not a part of one.
    assert!(listed(d, &["--sender", "alice.privacy@"]).is_empty());

    let (code, out, err) = cli(
        d,
        &[
            "explain",
            "--live",
            "--client",
            "192.0.2.10",
            "--from",
            ALICE,
            "--to",
            BOB,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("early-retry"), "the record is found: {out}");

    // Release by recipient: ERIN's pending triplet passes at its next retry.
    let (code, out, err) = cli(d, &["release", "--recipient", FRANK]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 1 pending triplet"), "{out}");
    let reply = c.ask(&rcpt_request("192.0.2.12", ERIN, FRANK));
    assert!(!reply.starts_with("DEFER"), "released: {reply}");

    // Purge by sender: CAROL's triplet goes, the others stay.
    let (code, out, err) = cli(d, &["purge", "--sender", CAROL]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 1"), "{out}");
    assert!(listed(d, &["--sender", CAROL]).is_empty());
    assert_eq!(listed(d, &[]).len(), 2);
    alice[0].1.clone()
}

/// The addresses (and their local parts) that must not be in `dump`.
fn assert_no_addresses(what: &str, dump: &[u8], digest: &str) {
    let text = String::from_utf8_lossy(dump).to_lowercase();
    assert!(
        text.contains(digest),
        "{what}: the positive control (ALICE's digest {digest}) is missing, so the dump \
         proves nothing:\n{text}"
    );
    for addr in [ALICE, BOB, CAROL, DAVE, ERIN, FRANK] {
        let addr = addr.to_lowercase();
        let local = addr.split('@').next().unwrap();
        assert!(!text.contains(&addr), "{what} holds {addr}:\n{text}");
        assert!(!text.contains(local), "{what} holds {local}:\n{text}");
    }
}

/// Starts `greygate serve` on `toml` expecting a refusal; returns its output.
fn refused_start(dir: &Path, toml: &str, extra: &[&str]) -> String {
    let config = dir.join("refused.toml");
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(greygate_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("greygate kept running on a store of the other mode");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

fn assert_refusal(err: &str) {
    assert!(
        err.contains("hash_addresses") && err.contains("plain text"),
        "a refusal that names the setting: {err}"
    );
}

#[test]
fn embedded_store_holds_no_address_when_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("greygate.redb");
    let store = format!("backend = \"embedded\"\npath = \"{}\"", db.display());
    let cfg = DaemonConfig::new(dir.path())
        .toml(&config(dir.path(), &store, true))
        .listen(&["127.0.0.1:0"]);
    let d = cfg.start();
    let digest = mail_and_queries(&d);
    // A reload that turns hashing off keeps the mode the store was opened in until a
    // restart: ALICE's triplet is still found (an early retry, not a new triplet).
    std::fs::write(
        d.dir.join("greygate.toml"),
        config(dir.path(), &store, false),
    )
    .unwrap();
    d.hup();
    assert!(d.wait_log("configuration reloaded", Duration::from_secs(10)));
    let before = d.log().matches("rule=\"early-retry\"").count();
    assert!(
        d.client()
            .ask(&rcpt_request("192.0.2.10", ALICE, BOB))
            .starts_with("DEFER")
    );
    assert!(
        d.wait_log_count("rule=\"early-retry\"", before + 1, Duration::from_secs(10)),
        "{}",
        d.log()
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert_no_addresses("the embedded file", &std::fs::read(&db).unwrap(), &digest);
    std::fs::write(
        dir.path().join("greygate.toml"),
        config(dir.path(), &store, true),
    )
    .unwrap();

    // Explain without a daemon reads the file, hashing its query.
    let config_path = dir.path().join("greygate.toml");
    let (code, out, err) = run_cli(&[
        "explain",
        "--config",
        config_path.to_str().unwrap(),
        "--client",
        "192.0.2.10",
        "--from",
        ALICE,
        "--to",
        BOB,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("early-retry"), "{out}");

    // A store written in plain mode refuses to start hashed, and the other way round.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain_db = plain_dir.path().join("plain.redb");
    let plain_store = format!("backend = \"embedded\"\npath = \"{}\"", plain_db.display());
    let d = DaemonConfig::new(plain_dir.path())
        .toml(&config(plain_dir.path(), &plain_store, false))
        .listen(&["127.0.0.1:0"])
        .start();
    assert!(
        d.client()
            .ask(&rcpt_request("192.0.2.20", ALICE, BOB))
            .starts_with("DEFER")
    );
    d.terminate();
    let err = refused_start(
        plain_dir.path(),
        &config(plain_dir.path(), &plain_store, true),
        &[],
    );
    assert_refusal(&err);
    let err = refused_start(dir.path(), &config(dir.path(), &store, false), &[]);
    assert!(err.contains("hashed addresses"), "{err}");
    // Commands that read the file refuse it too.
    let plain_config = dir.path().join("refused.toml");
    let (code, _, err) = run_cli(&[
        "explain",
        "--config",
        plain_config.to_str().unwrap(),
        "--client",
        "192.0.2.10",
        "--from",
        ALICE,
        "--to",
        BOB,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("hash_addresses"), "{err}");
}

#[test]
fn redis_store_holds_no_address_when_hashing() {
    let Some(redis) = Redis::start("redis_store_holds_no_address_when_hashing") else {
        return;
    };
    if !tool_available(
        "redis_store_holds_no_address_when_hashing",
        "/usr/bin/redis-cli",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("backend = \"redis\"\nurl = \"{}\"", redis.url());
    let d = DaemonConfig::new(dir.path())
        .toml(&config(dir.path(), &store, true))
        .listen(&["127.0.0.1:0"])
        .start();
    let digest = mail_and_queries(&d);
    let port = redis.port.to_string();
    let redis_cli = |args: &[&str]| -> Vec<u8> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let keys = redis_cli(&["--scan"]);
    let mut dump = keys.clone();
    for key in String::from_utf8(keys).unwrap().lines() {
        dump.extend(redis_cli(&["GET", key]));
    }
    assert!(
        String::from_utf8_lossy(&dump).contains("gg:meta:addresses"),
        "the mode is recorded"
    );
    assert_no_addresses("redis keys and values", &dump, &digest);
    d.terminate();

    // The same server in plain mode: refused while it holds hashed triplets.
    let err = refused_start(dir.path(), &config(dir.path(), &store, false), &[]);
    assert!(
        err.contains("hash_addresses") && err.contains("hashed addresses"),
        "{err}"
    );
    let refused = dir.path().join("refused.toml");
    let (code, out, err) = run_cli(&[
        "check-config",
        "--connect",
        "--config",
        refused.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        format!("{out}{err}").contains("hash_addresses"),
        "{out}{err}"
    );
}

#[test]
fn postgres_store_holds_no_address_when_hashing() {
    let Some(pg) = Postgres::start("postgres_store_holds_no_address_when_hashing") else {
        return;
    };
    if !tool_available(
        "postgres_store_holds_no_address_when_hashing",
        "/usr/bin/psql",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("backend = \"postgres\"\nurl = \"{}\"", pg.url());
    let d = DaemonConfig::new(dir.path())
        .toml(&config(dir.path(), &store, true))
        .listen(&["127.0.0.1:0"])
        .start();
    let digest = mail_and_queries(&d);
    let psql = |sql: &str| -> Vec<u8> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-A", "-t", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let mut dump = Vec::new();
    // Every column as psql shows it, and the byte columns decoded to text.
    for table in ["greygate_triplets", "greygate_clients", "greygate_meta"] {
        dump.extend(psql(&format!("SELECT * FROM {table}")));
    }
    dump.extend(psql(
        "SELECT encode(key, 'escape'), encode(record, 'escape'), \
         encode(key_text, 'escape') FROM greygate_triplets",
    ));
    dump.extend(psql(
        "SELECT encode(record, 'escape') FROM greygate_clients",
    ));
    let hex: Vec<String> = [ALICE, BOB, CAROL, DAVE, ERIN, FRANK]
        .iter()
        .map(|a| {
            a.to_lowercase()
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect();
    let text = String::from_utf8_lossy(&dump).to_lowercase();
    for h in hex {
        assert!(
            !text.contains(&h),
            "an address in hex in the tables:\n{text}"
        );
    }
    assert_no_addresses("the postgres tables", &dump, &digest);
    d.terminate();

    let err = refused_start(dir.path(), &config(dir.path(), &store, false), &[]);
    assert!(
        err.contains("hash_addresses") && err.contains("hashed addresses"),
        "{err}"
    );
}

/// The secret file must be private and long enough; `check-config` says why not.
#[test]
fn secret_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    let toml = dir.path().join("g.toml");
    std::fs::write(
        &toml,
        format!(
            "[store]\nbackend = \"memory\"\nhash_addresses = true\nhash_secret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let check = || run_cli(&["check-config", "--config", toml.to_str().unwrap()]);
    let set = |text: &str, mode: u32| {
        std::fs::write(&secret, text).unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
    };
    set(&format!("{SECRET}\n"), 0o640);
    let (code, out, err) = check();
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("chmod 600"), "{err}");
    set("short\n", 0o600);
    let (code, _, err) = check();
    assert_ne!(code, 0);
    assert!(err.contains("at least 16"), "{err}");
    set(&format!("{SECRET}\n"), 0o600);
    let (code, out, err) = check();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("addresses stored as keyed digests (hmac-sha256:"),
        "{out}"
    );
}
