//! Three MX hosts and a store host on one machine (`harness/netns.rs`): three real greygate
//! daemons in namespaces `mx1`..`mx3` share one real Redis, and separately one real
//! PostgreSQL, in namespace `store`, over a bridge. What is shown is what crosses that
//! network: shared greylisting, a host cut off from the store failing open within
//! `[store] timeout` while the others keep greylisting, and its rejoining on its own.
//!
//! Each daemon's listeners (policy and admin) are on its namespace's loopback, and the test
//! talks to them from inside that namespace: the only traffic between hosts is the store's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin::{Http, TOKEN, scrape};
use crate::harness::netns::{self, Bed};
use crate::harness::postgres::Postgres;
use crate::harness::redis::Redis;
use crate::harness::shared::{Kind, Server};
use crate::harness::{Daemon, DaemonConfig, PolicyClient, rcpt_request};

/// The daemons' `[store] timeout`: no answer may wait longer (plus [`SLACK`]).
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// Scheduling slack on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(1);
/// The greylisting delay.
const DELAY: Duration = Duration::from_secs(2);
/// How long mx2 stays cut off.
const PARTITION: Duration = Duration::from_secs(3);
/// The store breaker retries at least every 2 s: after the link returns, greylisting is back
/// within that, one store timeout and slack.
const REJOIN_LIMIT: Duration = Duration::from_secs(5);

/// A bed with its store server and a daemon on each MX host. Fields drop in order: the
/// daemons, then the server, then the bed's namespaces.
struct Site {
    mx: Vec<Daemon>,
    _server: Server,
    _dirs: Vec<tempfile::TempDir>,
    bed: Bed,
}

impl Site {
    fn start(kind: Kind, test: &str) -> Option<Site> {
        let bed = Bed::start(test)?;
        let store = bed.host("store");
        let server = match kind {
            Kind::Redis => Server::Redis(Redis::start_on(test, store)?),
            Kind::Postgres => Server::Postgres(Postgres::start_on(test, store, &bed.subnet)?),
        };
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mx = ["mx1", "mx2", "mx3"]
            .iter()
            .zip(&dirs)
            .map(|(name, dir)| {
                let toml = format!(
                    "[greylist]\ndelay = {}\nauto_allow_after = 0\n\n[store]\nbackend = \"{}\"\n\
                     url = \"{}\"\ntimeout = \"{}ms\"\nconnect_timeout = \"{}ms\"\n\n[admin]\n\
                     token = \"{TOKEN}\"\nentries_file = {:?}\n",
                    DELAY.as_secs(),
                    server.backend(),
                    server.url(),
                    STORE_TIMEOUT.as_millis(),
                    STORE_TIMEOUT.as_millis(),
                    dir.path().join("runtime-entries.json"),
                );
                DaemonConfig::new(dir.path())
                    .toml(&toml)
                    .netns(&bed.host(name).ns)
                    .start()
            })
            .collect();
        Some(Site {
            mx,
            _server: server,
            _dirs: dirs,
            bed,
        })
    }

    /// The daemon on `mx1`, `mx2` or `mx3` (1, 2, 3).
    fn mx(&self, n: usize) -> &Daemon {
        &self.mx[n - 1]
    }

    /// `f` with an admin client of mx`n`, run inside its namespace.
    fn admin<T: Send>(&self, n: usize, f: impl FnOnce(&Http) -> T + Send) -> T {
        let d = self.mx(n);
        netns::run_in(d.netns.as_deref().expect("in a namespace"), || {
            f(&Http::new(d))
        })
    }

    fn metrics(&self, n: usize) -> HashMap<String, f64> {
        self.admin(n, scrape)
    }
}

fn is_defer(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT ")
}

fn rule_count(d: &Daemon, rule: &str) -> usize {
    d.log().matches(&format!("rule=\"{rule}\"")).count()
}

/// Asks and times one request.
fn timed(c: &mut PolicyClient, req: &str) -> (String, Duration) {
    let t = Instant::now();
    let reply = c.ask(req);
    (reply, t.elapsed())
}

fn partition_and_rejoin(kind: Kind, test: &str) {
    let Some(site) = Site::start(kind, test) else {
        return;
    };
    let (m1, m2, m3) = (site.mx(1), site.mx(2), site.mx(3));
    let (mut c1, mut c2, mut c3) = (m1.client(), m2.client(), m3.client());

    // Shared greylisting across the network: first seen on mx1, retried on mx2.
    let t1 = rcpt_request("192.0.2.10", "alice@example.net", "bob@example.org");
    assert!(is_defer(&c1.ask(&t1)), "first sighting on mx1 deferred");
    m1.expect_log("rule=\"new\"");
    assert!(is_defer(&c2.ask(&t1)), "early retry on mx2 deferred");
    m2.expect_log("rule=\"early-retry\"");
    std::thread::sleep(DELAY + Duration::from_millis(200));
    let pass = c2.ask(&t1);
    assert!(
        pass.starts_with("PREPEND X-Greylist: delayed "),
        "first seen on mx1, passes on mx2 after the delay: {pass}"
    );
    // mx3 finds the pass in the store.
    assert!(!is_defer(&c3.ask(&t1)), "mx3 knows the triplet passed");
    m3.expect_log("rule=\"known\"");

    // Cut mx2 off. Every host gets new triplets for the whole partition: mx2 fails open
    // within the store timeout, mx1 and mx3 keep greylisting through the store.
    let cut = Instant::now();
    site.bed.cut("mx2");
    let (new1, new3) = (rule_count(m1, "new"), rule_count(m3, "new"));
    let mut mx2_answers: Vec<(String, Duration)> = Vec::new();
    let mut others: Vec<(String, Duration)> = Vec::new();
    for n in 0..100 {
        if cut.elapsed() >= PARTITION {
            break;
        }
        let req = |host: &str| {
            rcpt_request(
                "198.51.100.7",
                &format!("cut{n}-{host}@example.net"),
                "rcpt@example.org",
            )
        };
        mx2_answers.push(timed(&mut c2, &req("mx2")));
        others.push(timed(&mut c1, &req("mx1")));
        others.push(timed(&mut c3, &req("mx3")));
        std::thread::sleep(Duration::from_millis(50));
    }
    let limit = STORE_TIMEOUT + SLACK;
    let slowest = mx2_answers.iter().map(|a| a.1).max().expect("answers");
    assert!(mx2_answers.len() >= 5, "{} answers", mx2_answers.len());
    for (reply, took) in &mx2_answers {
        assert_eq!(reply, "DUNNO", "mx2 fails open while cut off");
        assert!(*took < limit, "mx2 answered in {took:?} (limit {limit:?})");
    }
    for (reply, took) in &others {
        assert!(is_defer(reply), "mx1/mx3 keep greylisting: {reply}");
        assert!(*took < limit, "mx1/mx3 answered in {took:?}");
    }
    // The cut loses packets without a word (no reset, no unreachable): the first request
    // on mx2 had to wait out the store timeout; later ones are refused by the breaker.
    assert!(
        mx2_answers[0].1 >= STORE_TIMEOUT - Duration::from_millis(50),
        "the first answer after the cut came in {:?}, before the store timeout",
        mx2_answers[0].1
    );
    let fail_opens = mx2_answers.len();
    assert!(
        m2.wait_log_count(
            "rule=\"store-fail-open\"",
            fail_opens,
            Duration::from_secs(5)
        ),
        "{}",
        m2.log()
    );
    m2.expect_log("store server unreachable");
    let per_host = mx2_answers.len();
    assert!(m1.wait_log_count("rule=\"new\"", new1 + per_host, Duration::from_secs(5)));
    assert!(m3.wait_log_count("rule=\"new\"", new3 + per_host, Duration::from_secs(5)));
    let m = site.metrics(2);
    assert_eq!(
        m["greygate_store_available{}"], 0.0,
        "mx2 says the store is gone"
    );
    let health = site.admin(2, |http| http.get("/healthz"));
    assert_eq!(health, (503, "store server unreachable\n".to_string()));
    assert_eq!(
        m["greygate_fail_open_total{}"], fail_opens as f64,
        "mx2 counted each fail-open answer"
    );
    assert_eq!(site.metrics(1)["greygate_fail_open_total{}"], 0.0);
    assert_eq!(site.metrics(3)["greygate_store_available{}"], 1.0);

    // The link returns: mx2 greylists through the store again, on its own.
    site.bed.restore("mx2");
    let restored = Instant::now();
    let mut n = 0;
    let rejoin = loop {
        n += 1;
        let req = rcpt_request(
            "203.0.113.5",
            &format!("back{n}@example.net"),
            "rcpt@example.org",
        );
        let (reply, took) = timed(&mut c2, &req);
        assert!(took < limit, "mx2 answered in {took:?} while rejoining");
        if is_defer(&reply) {
            break (restored.elapsed(), req);
        }
        assert_eq!(reply, "DUNNO");
        assert!(
            restored.elapsed() < REJOIN_LIMIT,
            "mx2 did not rejoin within {REJOIN_LIMIT:?}:\n{}",
            m2.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (rejoined_after, req) = rejoin;
    m2.expect_log("greylisting resumes");
    // That triplet is in the shared store: mx1 sees a retry, not a first sighting.
    let early = rule_count(m1, "early-retry");
    assert!(is_defer(&c1.ask(&req)));
    assert!(
        m1.wait_log_count("rule=\"early-retry\"", early + 1, Duration::from_secs(5)),
        "mx2's triplet after the rejoin reached the store"
    );
    // What mx2 let through while cut off is not asserted either way: a write it had sent
    // (a first sighting goes out as one `SET NX`, without a read first) sits in its TCP
    // send queue during the cut and may land when the link returns. That record is true
    // (the triplet was seen then) and harmless: the mail was accepted, nobody retries it.
    assert_eq!(site.metrics(2)["greygate_store_available{}"], 1.0);
    assert_eq!(site.admin(2, |http| http.get("/healthz")).0, 200);

    eprintln!(
        "{test}: mx2 cut off for {:?}: {} fail-open answers, slowest {slowest:?}, first {:?} \
         (store timeout {STORE_TIMEOUT:?}); mx2 greylisting again {rejoined_after:?} after \
         the link returned",
        PARTITION,
        mx2_answers.len(),
        mx2_answers[0].1,
    );
}

#[test]
fn redis_mx_cut_off_from_the_store_fails_open_and_rejoins() {
    partition_and_rejoin(
        Kind::Redis,
        "redis_mx_cut_off_from_the_store_fails_open_and_rejoins",
    );
}

#[test]
fn postgres_mx_cut_off_from_the_store_fails_open_and_rejoins() {
    partition_and_rejoin(
        Kind::Postgres,
        "postgres_mx_cut_off_from_the_store_fails_open_and_rejoins",
    );
}

/// An allow entry added through mx3's admin API applies on mx1 within 5 s. Needs runtime
/// entries kept in the shared store: with entries in a file beside each daemon it fails.
fn allow_entry_reaches_other_hosts(kind: Kind, test: &str) {
    const WITHIN: Duration = Duration::from_secs(5);
    let Some(site) = Site::start(kind, test) else {
        return;
    };
    let (m1, m3) = (site.mx(1), site.mx(3));
    let (mut c1, mut c3) = (m1.client(), m3.client());
    let req = |n: usize| {
        rcpt_request(
            "198.51.100.7",
            &format!("s{n}@example.net"),
            "r@example.org",
        )
    };
    assert!(is_defer(&c1.ask(&req(0))), "greylisted on mx1 before");

    let (status, body) = site.admin(3, |http| {
        http.post(
            "/api/runtime/allow",
            Some(TOKEN),
            &json!({"value": "198.51.100.0/24", "comment": "partner relay"}),
        )
    });
    assert_eq!(status, 201, "{body}");
    let added = Instant::now();
    assert_eq!(c3.ask(&req(1)), "DUNNO", "applies at once on mx3");

    let mut n = 1;
    let took = loop {
        n += 1;
        if c1.ask(&req(n)) == "DUNNO" {
            break added.elapsed();
        }
        assert!(
            added.elapsed() < WITHIN,
            "the allow entry added on mx3 did not apply on mx1 within {WITHIN:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    m1.expect_log("rule=\"runtime-allow\"");
    eprintln!("{test}: the allow entry added on mx3 applied on mx1 after {took:?}");
}

#[test]
fn redis_allow_entry_added_on_mx3_applies_on_mx1_within_5s() {
    allow_entry_reaches_other_hosts(
        Kind::Redis,
        "redis_allow_entry_added_on_mx3_applies_on_mx1_within_5s",
    );
}

#[test]
fn postgres_allow_entry_added_on_mx3_applies_on_mx1_within_5s() {
    allow_entry_reaches_other_hosts(
        Kind::Postgres,
        "postgres_allow_entry_added_on_mx3_applies_on_mx1_within_5s",
    );
}

/// The bed itself: hosts reach each other over the bridge, a cut host reaches nobody and
/// is reached by nobody until restored, and dropping the bed removes every namespace.
#[test]
fn test_bed_links_cuts_and_cleans_up() {
    let Some(bed) = Bed::start("test_bed_links_cuts_and_cleans_up") else {
        return;
    };
    let store = bed.host("store");
    let listener = store.run(|| std::net::TcpListener::bind((store.addr, 7000)).unwrap());
    let to = listener.local_addr().unwrap();
    let reach =
        |host: &str| netns::try_connect(&bed.host(host).ns, to, Duration::from_millis(500)).is_ok();
    for h in ["mx1", "mx2", "mx3"] {
        assert!(reach(h), "{h} reaches the store");
    }
    // Each namespace has only its own loopback and its bed address.
    let out = std::process::Command::new("ip")
        .args(["-n", &bed.host("mx1").ns, "-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(
        addrs.contains("127.0.0.1/8") && addrs.contains(&format!("{}/24", bed.host("mx1").addr))
    );
    assert_eq!(addrs.lines().count(), 2, "{addrs}");

    bed.cut("mx2");
    assert!(!reach("mx2"), "mx2 cut off");
    assert!(
        reach("mx1") && reach("mx3"),
        "the others still reach the store"
    );
    bed.restore("mx2");
    // As on a real network, the first packets may wait for ARP to find the store again
    // (it retries every second): back within a few attempts.
    let restored = Instant::now();
    while !reach("mx2") {
        assert!(
            restored.elapsed() < Duration::from_secs(5),
            "mx2 never reached the store again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "mx2 reached the store again {:?} after the restore",
        restored.elapsed()
    );

    let names = bed.namespaces();
    assert_eq!(names.len(), 5);
    assert!(names.iter().all(|n| netns::exists(n)));
    drop(listener);
    drop(bed);
    assert!(names.iter().all(|n| !netns::exists(n)), "{names:?} removed");
}

/// A run killed before dropping its beds leaves namespaces, and processes in them: the
/// next run removes both, and leaves the beds of live test processes alone.
#[test]
fn stale_namespaces_of_a_killed_run_are_removed() {
    let test = "stale_namespaces_of_a_killed_run_are_removed";
    if !netns::available(test) {
        return;
    }
    // The run's own cleanup, which the first bed starts, must not take the stale
    // namespace made below before this test has looked.
    netns::clean_stale_once();
    // The id of a process that has exited stands for the killed run.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = format!("ggtb-{}-0-mx1", gone.id());
    let live = format!("ggtb-{}-999-mx1", std::process::id());
    for ns in [&stale, &live] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", ns])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {ns}");
    }
    let mut left = std::process::Command::new("sleep");
    left.arg("30");
    netns::enter(&mut left, &stale);
    let mut left = left.spawn().unwrap();

    netns::clean_stale();
    let stale_gone = !netns::exists(&stale);
    let live_kept = netns::exists(&live);
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &live])
        .status();
    assert!(stale_gone, "{stale} removed");
    assert!(live_kept, "{live} (a live process's) kept");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = left.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = left.kill();
            panic!("the process left in {stale} was not killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}
