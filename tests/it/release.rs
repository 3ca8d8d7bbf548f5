//! `greygate release` and `POST /api/release` against the real daemon: a released pending
//! triplet passes at its next retry, before its delay, with rule `released`, and is audited
//! in the log; without the admin token nothing is released; a recipient's release takes
//! all its pending triplets and no other recipient's; what is not pending is said so.

use serde_json::{Value, json};

use crate::admin::{Http, TOKEN, admin_toml, scrape};
use crate::harness::dns::{Dnsmasq, dnsmasq_available};
use crate::harness::{Daemon, DaemonConfig, rcpt_request, run_cli};

/// `greygate ARGS --config DIR/greygate.toml --admin URL`, as an operator's shell runs it.
fn cli(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap(), "--admin", &url]);
    run_cli(&all)
}

fn deferred(reply: &str) -> bool {
    reply.starts_with("DEFER_IF_PERMIT")
}

/// The pass that ends greylisting: accepted, with the header that says how long it took.
fn passed_at_last(reply: &str) -> bool {
    reply.starts_with("PREPEND X-Greylist: delayed ")
}

/// The triplets of `list --json`, as (state, client, sender, recipient).
fn listed(d: &Daemon) -> Vec<(bool, String, String, String)> {
    let (code, out, err) = cli(d, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut all: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let k = &e["key"];
            (
                e["record"]["passed"].as_bool().unwrap(),
                k["client"].as_str().unwrap().to_string(),
                k["sender"].as_str().unwrap().to_string(),
                k["recipient"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    all.sort();
    all
}

#[test]
fn a_triplet_released_through_the_cli_passes_at_its_next_retry() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.70", "alice@example.net", "bob@example.org");
    assert!(deferred(&c.ask(&req)));
    assert!(deferred(&c.ask(&req)), "early retry, 300 s delay");

    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.70",
            "--sender",
            "alice@example.net",
            "--recipient",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 1 pending triplet"), "{out}");
    assert!(
        out.contains("192.0.2.0/24 / alice@example.net / bob@example.org"),
        "{out}"
    );

    let (code, out, err) = cli(&d, &["list", "--client", "192.0.2.70"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 192.0.2.0/24"), "{out}");
    let (code, out, err) = cli(
        &d,
        &[
            "explain",
            "--live",
            "--client",
            "192.0.2.70",
            "--from",
            "alice@example.net",
            "--to",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decision:   pass (rule: released)"), "{out}");
    assert!(
        out.contains("record:     released by an operator, not retried since"),
        "{out}"
    );

    // The retry seconds later, far before the delay, passes with the rule that says why.
    let reply = c.ask(&req);
    assert!(passed_at_last(&reply), "{reply}");
    d.expect_log("rule=\"released\"");
    // The audit line: who (the token, from which peer, for which local user), when, what.
    let line = d.log_line("released who=\"admin token from 127.0.0.1:");
    let uid = unsafe { libc::getuid() };
    assert!(line.contains(&format!("uid {uid}")), "{line}");
    assert!(line.contains("at=") && line.contains("count=1"), "{line}");
    assert!(
        line.contains("triplets=\"192.0.2.0/24 / alice@example.net / bob@example.org\""),
        "{line}"
    );
    // Then an ordinary passed triplet.
    assert_eq!(c.ask(&req), "DUNNO");
    d.expect_log("rule=\"known\"");
    assert_eq!(
        listed(&d),
        vec![(
            true,
            "192.0.2.0/24".into(),
            "alice@example.net".into(),
            "bob@example.org".into()
        )]
    );
    let m = scrape(&Http::new(&d));
    assert_eq!(m["greygate_released_triplets_total{}"], 1.0);
    assert_eq!(
        m["greygate_decisions_total{rule=released,verdict=pass}"],
        1.0
    );

    // Released again: already passed, said so, exit 4.
    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.70",
            "--sender",
            "alice@example.net",
            "--recipient",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("already passed"), "{out}");
    assert!(err.contains("nothing released"), "{err}");
    // Never seen: nothing to release, exit 4.
    let (code, _, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.70",
            "--sender",
            "nobody@example.net",
            "--recipient",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("nothing released: no pending triplet 192.0.2.0/24 / nobody@example.net"),
        "{err}"
    );
    // The null sender is named `<>`, as keys and listings write it.
    let bounce = rcpt_request("192.0.2.71", "", "bob@example.org");
    assert!(deferred(&c.ask(&bounce)));
    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.71",
            "--sender",
            "<>",
            "--recipient",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("192.0.2.0/24 / <> / bob@example.org"), "{out}");
    assert!(passed_at_last(&c.ask(&bounce)));
    // A client without a sender names no triplet: usage error.
    let (code, _, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.70",
            "--recipient",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--sender"), "{err}");
}

#[test]
fn the_api_releases_nothing_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let mut c = d.client();
    let req = rcpt_request("198.51.100.7", "carol@example.net", "dave@example.org");
    assert!(deferred(&c.ask(&req)));
    let body = json!({
        "client": "198.51.100.7",
        "sender": "carol@example.net",
        "recipient": "dave@example.org"
    });
    for token in [None, Some("wrong-token-0123456789")] {
        let (s, b) = http.post("/api/release", token, &body);
        assert_eq!(s, 401, "{b}");
    }
    // The CLI with a wrong token is refused the same way and says how to give the token.
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let (code, _, err) = run_cli(&[
        "release",
        "--recipient",
        "dave@example.org",
        "--config",
        config.to_str().unwrap(),
        "--admin",
        &url,
        "--token",
        "wrong-token-123456789",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("wrong admin token"), "{err}");
    assert!(
        deferred(&c.ask(&req)),
        "still pending: nothing was released"
    );
    assert!(!d.log().contains("released who="), "{}", d.log());
    assert!(!listed(&d)[0].0, "still pending");

    // With the token: the typed answer.
    let (s, r) = http.post("/api/release", Some(TOKEN), &body);
    assert_eq!(s, 200, "{r}");
    let r: greygate::admin::wire::ReleaseReport = serde_json::from_value(r).unwrap();
    assert_eq!((r.count, r.complete), (1, true));
    let reply = c.ask(&req);
    assert!(passed_at_last(&reply), "{reply}");
    // A request that names no triplet is refused with the reason.
    let (s, r) = http.post(
        "/api/release",
        Some(TOKEN),
        &json!({"client": "198.51.100.7", "recipient": "dave@example.org"}),
    );
    assert_eq!(s, 400, "{r}");
    assert!(r["error"].as_str().unwrap().contains("sender"), "{r}");
}

#[test]
fn a_recipient_release_takes_all_its_pending_triplets_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let mut c = d.client();
    let bobs = [
        rcpt_request("192.0.2.80", "a@example.net", "bob@example.org"),
        rcpt_request("198.51.100.80", "b@example.net", "bob+lists@example.org"),
        rcpt_request("203.0.113.80", "", "bob@example.org"),
    ];
    let others = [
        rcpt_request("192.0.2.80", "a@example.net", "erin@example.org"),
        // Holds bob@example.org in its text: only the whole recipient counts.
        rcpt_request("192.0.2.80", "a@example.net", "jimbob@example.org"),
    ];
    for r in bobs.iter().chain(&others) {
        assert!(deferred(&c.ask(r)), "{r}");
    }

    // Sender and recipient as the engine keys them (case, extension).
    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--sender",
            "B@Example.NET",
            "--recipient",
            "Bob+x@Example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 1 pending triplet"), "{out}");
    assert!(
        out.contains("198.51.100.0/24 / b@example.net / bob@example.org"),
        "{out}"
    );

    let (code, out, err) = cli(&d, &["release", "--recipient", "bob@example.org"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 2 pending triplet"), "{out}");
    assert!(
        out.contains("192.0.2.0/24 / a@example.net / bob@example.org"),
        "{out}"
    );
    assert!(
        out.contains("203.0.113.0/24 / <> / bob@example.org"),
        "{out}"
    );

    for r in &bobs {
        let reply = c.ask(r);
        assert!(passed_at_last(&reply), "{reply}: {r}");
    }
    for r in &others {
        assert!(
            deferred(&c.ask(r)),
            "another recipient's triplet stays pending: {r}"
        );
    }
    d.expect_log("count=2");

    // Nothing of the recipient is pending any more: exit 4.
    let (code, _, err) = cli(&d, &["release", "--recipient", "bob@example.org"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("nothing released: no pending triplet to bob@example.org"),
        "{err}"
    );
    // A client key as `list` shows it names the triplet too.
    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "192.0.2.0/24",
            "--sender",
            "a@example.net",
            "--recipient",
            "erin@example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 1"), "{out}");
    assert!(passed_at_last(&c.ask(&others[0])));
    assert!(deferred(&c.ask(&others[1])));
}

#[test]
fn the_cli_releases_in_the_store_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gg.redb");
    // An admin address nothing listens on: the command falls back to the store.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let toml = format!(
        "[greylist]\ndelay = 300\n[store]\nbackend = \"embedded\"\npath = {db:?}\n[admin]\nlisten = [\"127.0.0.1:{port}\"]\ntoken = \"{TOKEN}\"\n"
    );
    let start = || {
        DaemonConfig::new(dir.path())
            .toml(&toml)
            .args(&["--admin-listen", "127.0.0.1:0"])
            .start()
    };
    let req = rcpt_request("192.0.2.90", "f@example.net", "g@example.org");
    let d = start();
    assert!(deferred(&d.client().ask(&req)));
    let (status, _) = d.terminate();
    assert!(status.success());

    let config = dir.path().join("greygate.toml");
    let cfg = config.to_str().unwrap();
    let (code, out, err) = run_cli(&["release", "--recipient", "g@example.org", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("released 1"), "{out}");
    // No daemon log: the audit line goes to stderr, naming the local user.
    let uid = unsafe { libc::getuid() };
    assert!(
        err.contains("released who=\"local user")
            && err.contains(&format!("uid {uid}"))
            && err.contains("store opened directly\"")
            && err.contains("triplets=\"192.0.2.0/24 / f@example.net / g@example.org\""),
        "{err}"
    );

    let d = start();
    assert!(passed_at_last(&d.client().ask(&req)));
    d.expect_log("rule=\"released\"");
}

/// With DNS facts the engine keys a pool sender by `spf:<domain>`, not by the address's
/// /24: a release naming the client IP releases the key the engine computes for it now,
/// so the pool's retry from its other /24 passes at once.
#[test]
fn a_client_ip_releases_the_identity_the_engine_keys_it_by() {
    if !dnsmasq_available("release_spf_identity") {
        return;
    }
    let dns = Dnsmasq::start(&[
        "--local=/in-addr.arpa/".to_string(),
        "--txt-record=pool.test,v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all".to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[greylist]\ndelay = 300\n[dns]\nenabled = true\nresolver = \"{}\"\nbudget = \"2s\"\n\
         [admin]\ntoken = \"{TOKEN}\"\n",
        dns.addr()
    );
    let d = DaemonConfig::new(dir.path()).toml(&toml).start();
    let mut c = d.client();
    let first = rcpt_request("198.51.100.7", "news@pool.test", "bob@rcpt.test");
    assert!(deferred(&c.ask(&first)), "{}", d.log());
    d.expect_log("group=\"spf:pool.test\"");

    // Named by another address of the pool, as the operator may know it from the log.
    let (code, out, err) = cli(
        &d,
        &[
            "release",
            "--client",
            "203.0.113.9",
            "--sender",
            "news@pool.test",
            "--recipient",
            "bob@rcpt.test",
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", d.log());
    assert!(
        out.contains("released 1 pending triplet")
            && out.contains("spf:pool.test / news@pool.test / bob@rcpt.test"),
        "{out}"
    );
    let retry = c.ask(&rcpt_request(
        "203.0.113.9",
        "news@pool.test",
        "bob@rcpt.test",
    ));
    assert!(passed_at_last(&retry), "{retry}\n{}", d.log());
    d.expect_log("rule=\"released\"");
}
