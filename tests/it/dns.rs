//! DNS facts end to end: the daemon resolves SPF, forward-confirmed reverse DNS and DNS
//! lists through a real DNS server on loopback (dnsmasq with records for test domains), or
//! through one that never answers; and, with the defaults, a pool sender's retry through a
//! real Postfix (policy service and milter).

use std::time::{Duration, Instant};

use crate::harness::dns::{Dnsmasq, SilentDns, dnsmasq_available};
use crate::harness::postfix::{self, Policy, Postfix};
use crate::harness::{Daemon, DaemonConfig, request_with, run_cli};

/// Greylisting delay where a retry must pass.
const DELAY: u64 = 2;

/// The test zone: a pool sender's SPF, hosts with and without confirming names, DNS lists.
fn zone() -> Vec<String> {
    [
        "--local=/example.net/",
        "--local=/in-addr.arpa/",
        "--local=/ip6.arpa/",
        // A sending service whose pool spans two /24s.
        "--txt-record=pool.test,v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all",
        // A domain that authorises everybody: its pass must give no identity.
        "--txt-record=open.test,v=spf1 +all",
        // Forward-confirmed (host-record makes the PTR too).
        "--host-record=mta7.example.net,192.0.2.7",
        // A PTR whose name does not resolve back.
        "--ptr-record=8.2.0.192.in-addr.arpa,liar.example.net",
        // Forward-confirmed, but a residential pool's name.
        "--host-record=dyn-192-0-2-9.example.net,192.0.2.9",
        // DNS lists: listed, a Spamhaus "query refused" code, an allow-list entry.
        "--address=/66.2.0.192.bl.test/127.0.0.2",
        "--address=/67.2.0.192.bl.test/127.255.255.254",
        "--address=/68.2.0.192.wl.test/127.0.10.2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn toml(resolver: &str, budget: &str, extra: &str) -> String {
    format!(
        "hostname = \"gw.test.invalid\"\n\
         [greylist]\ndelay = {DELAY}\n\
         [dns]\nenabled = true\nresolver = \"{resolver}\"\nbudget = \"{budget}\"\n{extra}"
    )
}

/// A daemon asking `resolver`. The budget is generous where DNS answers: a loaded CI
/// machine must not turn a test of answers into one of timeouts.
fn daemon(dir: &std::path::Path, resolver: &str, budget: &str, extra: &str) -> Daemon {
    DaemonConfig::new(dir)
        .toml(&toml(resolver, budget, extra))
        .args(&["--memory"])
        .start()
}

/// A request as a front end that knows no host name sends it (a milter without macros):
/// the daemon looks the name up itself.
fn nameless(client: &str, sender: &str, recipient: &str) -> String {
    request_with(client, sender, recipient, &[])
        .replace("client_name=unknown\n", "")
        .replace("reverse_client_name=unknown\n", "")
}

#[test]
fn dns_spf_pool_sender_retrying_from_another_slash24_passes() {
    if !dnsmasq_available("dns_spf_pool") {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &dns.addr(), "2s", "");
    let mut c = d.client();
    let first = c.ask(&request_with(
        "198.51.100.7",
        "news@pool.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(first.starts_with("DEFER_IF_PERMIT"), "{first}\n{}", d.log());
    d.expect_log("group=\"spf:pool.test\"");
    d.expect_log("SPF of pool.test passes for the client address");
    std::thread::sleep(Duration::from_millis(DELAY * 1000 + 300));
    // The retry comes from the other /24 of the pool: same identity, so it passes.
    let retry = c.ask(&request_with(
        "203.0.113.9",
        "news@pool.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(
        retry.starts_with("PREPEND X-Greylist: delayed"),
        "{retry}\n{}",
        d.log()
    );
    d.expect_log("rule=\"delayed\"");

    // An address outside the record: SPF fails, the key is the prefix.
    let other = c.ask(&request_with(
        "192.0.2.200",
        "news@pool.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(other.starts_with("DEFER_IF_PERMIT"), "{other}");
    d.expect_log("group=\"192.0.2.0/24\"");
    d.expect_log("not spf: fail for pool.test");

    // `+all` passes everybody: no spf: identity may come of it.
    let open = c.ask(&request_with(
        "198.51.100.7",
        "x@open.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(open.starts_with("DEFER_IF_PERMIT"), "{open}");
    d.expect_log("SPF of open.test passes any address, so it names no pool");
    assert!(!d.log().contains("group=\"spf:open.test\""), "{}", d.log());
}

#[test]
fn dns_forward_confirmed_names_when_the_front_end_gives_none() {
    if !dnsmasq_available("dns_fcrdns") {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    let dir = tempfile::tempdir().unwrap();
    // Off by default: org: comes from the MTA's verified name without a query.
    let d = daemon(dir.path(), &dns.addr(), "2s", "ptr_lookup = true\n");
    let mut c = d.client();
    // No SPF record for the sender's domain: the host's organisation is the identity.
    let started = Instant::now();
    let r = c.ask(&nameless("192.0.2.7", "a@nospf.test", "bob@rcpt.test"));
    let uncached = started.elapsed();
    assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    d.expect_log("group=\"org:example.net\"");
    d.expect_log("forward-confirmed host mta7.example.net belongs to example.net");
    // Another recipient of the same message: every fact comes from the cache.
    let started = Instant::now();
    c.ask(&nameless("192.0.2.7", "a@nospf.test", "carol@rcpt.test"));
    let cached = started.elapsed();
    eprintln!("SPF + PTR + A through dnsmasq: {uncached:?} uncached, {cached:?} cached");

    // A PTR that does not resolve back, and a residential pool's name: the prefix.
    c.ask(&nameless("192.0.2.8", "a@nospf.test", "bob@rcpt.test"));
    d.expect_log("not org: no forward-confirmed host name");
    c.ask(&nameless("192.0.2.9", "a@nospf.test", "bob@rcpt.test"));
    d.expect_log("dyn-192-0-2-9.example.net looks dynamic");

    // Postfix's attributes say the same without a lookup: `unknown` means not confirmed,
    // even for the host whose name would confirm.
    let before = d.log().matches("group=\"org:example.net\"").count();
    c.ask(&request_with(
        "192.0.2.7",
        "b@nospf.test",
        "bob@rcpt.test",
        &[],
    ));
    d.expect_log("group=\"192.0.2.0/24\"");
    assert_eq!(
        d.log().matches("group=\"org:example.net\"").count(),
        before,
        "{}",
        d.log()
    );
    // ... and a name Postfix confirmed is used as it is.
    c.ask(&request_with(
        "192.0.2.99",
        "c@nospf.test",
        "bob@rcpt.test",
        &[
            ("client_name", "out.mailer.example.org"),
            ("reverse_client_name", "out.mailer.example.org"),
        ],
    ));
    d.expect_log("group=\"org:example.org\"");
}

#[test]
fn dns_lists_lengthen_skip_or_leave_the_delay() {
    if !dnsmasq_available("dns_lists") {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        dir.path(),
        &dns.addr(),
        "2s",
        "[dnsbl]\nzones = [\"bl.test\"]\ndelay = \"1h\"\n[dnswl]\nzones = [\"wl.test\"]\n",
    );
    let mut c = d.client();
    let listed = c.ask(&request_with(
        "192.0.2.66",
        "a@nospf.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(
        listed.starts_with("DEFER_IF_PERMIT") && listed.contains("3600 seconds"),
        "{listed}\n{}",
        d.log()
    );
    d.expect_log("listed by bl.test");

    // 127.255.255.254 is the zone refusing the query, not a listing: the configured delay.
    let refused = c.ask(&request_with(
        "192.0.2.67",
        "a@nospf.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(
        refused.starts_with("DEFER_IF_PERMIT") && refused.contains(&format!("{DELAY} seconds")),
        "{refused}\n{}",
        d.log()
    );

    let allowed = c.ask(&request_with(
        "192.0.2.68",
        "a@nospf.test",
        "bob@rcpt.test",
        &[],
    ));
    assert_eq!(allowed, "DUNNO", "{}", d.log());
    d.expect_log("rule=\"dnswl\"");
    d.expect_log("listed by wl.test");
}

#[test]
fn dns_that_never_answers_falls_back_to_the_prefix_within_the_budget() {
    let silent = SilentDns::start();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        dir.path(),
        &silent.addr().to_string(),
        "300ms",
        "ptr_lookup = true\n[dnsbl]\nzones = [\"bl.test\"]\n",
    );
    let mut c = d.client();
    let mut took = Vec::new();
    for (i, ip) in ["198.51.100.7", "198.51.100.8", "203.0.113.9"]
        .iter()
        .enumerate()
    {
        let started = Instant::now();
        let r = c.ask(&nameless(ip, &format!("n{i}@pool.test"), "bob@rcpt.test"));
        let elapsed = started.elapsed();
        // Deferred by greylisting as without DNS, never because DNS failed.
        assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
        assert!(
            r.contains(&format!("{DELAY} seconds")),
            "the configured delay: {r}"
        );
        took.push(elapsed);
    }
    eprintln!("answers with a silent DNS server, 300 ms budget: {took:?}");
    for t in &took {
        assert!(
            *t >= Duration::from_millis(290) && *t < Duration::from_millis(800),
            "{took:?}"
        );
    }
    d.expect_log("group=\"198.51.100.0/24\"");
    d.expect_log("dns=\"DNS timed out after 3");
    d.expect_log("spf (timed out), host name (timed out), dnsbl bl.test (timed out)");

    // A request the allow lists decide asks no DNS at all: answered at once.
    let started = Instant::now();
    let r = c.ask(&request_with(
        "198.51.100.7",
        "a@pool.test",
        "bob@rcpt.test",
        &[("sasl_username", "alice")],
    ));
    assert_eq!(r, "DUNNO");
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[test]
fn dns_settings_change_on_sighup() {
    if !dnsmasq_available("dns_reload") {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    let silent = SilentDns::start();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &silent.addr().to_string(), "200ms", "");
    let mut c = d.client();
    let ask = |c: &mut crate::harness::PolicyClient, rcpt: &str| {
        c.ask(&request_with("198.51.100.7", "news@pool.test", rcpt, &[]))
    };
    ask(&mut c, "one@rcpt.test");
    d.expect_log("DNS timed out after 2");
    d.expect_log("group=\"198.51.100.0/24\"");

    // Another resolver: the reload builds a new gatherer, and the next request uses it.
    let config = dir.path().join("greygate.toml");
    std::fs::write(&config, toml(&dns.addr(), "2s", "")).unwrap();
    d.hup();
    d.expect_log("configuration reloaded");
    ask(&mut c, "two@rcpt.test");
    d.expect_log("group=\"spf:pool.test\"");
    assert!(!d.log().contains("after a restart"), "{}", d.log());

    // DNS off: back to the prefix, no lookups.
    std::fs::write(
        &config,
        format!(
            "hostname = \"gw.test.invalid\"\n[greylist]\ndelay = {DELAY}\n[dns]\nenabled = false\n"
        ),
    )
    .unwrap();
    d.hup();
    assert!(
        d.wait_log_count("configuration reloaded", 2, Duration::from_secs(5)),
        "{}",
        d.log()
    );
    ask(&mut c, "three@rcpt.test");
    assert!(
        d.wait_log_count("group=\"198.51.100.0/24\"", 2, Duration::from_secs(5)),
        "{}",
        d.log()
    );
}

#[test]
fn dns_explain_gathers_the_facts_it_explains() {
    if !dnsmasq_available("dns_explain") {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    let dir = tempfile::tempdir().unwrap();
    // A daemon with the defaults (only the resolver set) and the embedded store sees the
    // pool's first attempt, then stops.
    let cfg = DaemonConfig::new(dir.path()).toml(&defaults(&dns.addr()));
    let d = cfg.start();
    let r = d.client().ask(&request_with(
        "198.51.100.7",
        "news@pool.test",
        "bob@rcpt.test",
        &[],
    ));
    assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");

    let config = dir.path().join("greygate.toml");
    let (code, out, err) = run_cli(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--db",
        cfg.db_path().to_str().unwrap(),
        "--client",
        "203.0.113.9",
        "--from",
        "news@pool.test",
        "--to",
        "bob@rcpt.test",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    // The retry from the pool's other /24 finds the first attempt's record.
    assert!(out.contains("client spf:pool.test"), "{out}");
    assert!(out.contains("record:     pending"), "{out}");
    assert!(out.contains("dns facts:  spf pass (pool.test)"), "{out}");
    // No name given and no PTR lookup by default: org: would need the MTA's name.
    assert!(out.contains("host name not looked up"), "{out}");
}

/// A configuration file with nothing but where DNS is: everything else is the default, as
/// in a fresh installation (the delay comes from `serve --delay`).
fn defaults(resolver: &str) -> String {
    format!("[dns]\nresolver = \"{resolver}\"\n")
}

fn default_daemon(dir: &std::path::Path, resolver: &str, milter: bool) -> Daemon {
    let cfg = DaemonConfig::new(dir).toml(&defaults(resolver)).args(&[
        "--memory",
        "--delay",
        &DELAY.to_string(),
    ]);
    if milter {
        cfg.listen(&[]).milter(&["127.0.0.1:0"]).start()
    } else {
        cfg.start()
    }
}

/// With the defaults, a pool sender deferred from one /24 is accepted on its retry from
/// another /24 of its SPF range: through a real Postfix, as a policy service and as a
/// milter.
#[test]
fn dns_defaults_postfix_pool_sender_retry_from_another_slash24_is_accepted() {
    let test = "dns_defaults_postfix_pool";
    if !postfix::available(test) || !dnsmasq_available(test) {
        return;
    }
    let dns = Dnsmasq::start(&zone());
    for milter in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let gg = default_daemon(dir.path(), &dns.addr(), milter);
        let policy = if milter {
            Policy::Milter(format!("inet:{}", gg.milter_tcp()))
        } else {
            Policy::Service(format!("inet:{}", gg.tcp()))
        };
        let pf = Postfix::start(policy, &[]);
        let rcpt = |ip: &str, name: &str| {
            pf.swaks()
                .client(ip, name)
                .from("news@pool.test")
                .to("eve@example.org")
                .rcpt_only()
                .run()
        };
        let first = rcpt("198.51.100.7", "out-7.mailer.example.net");
        assert_eq!(
            first.code, 24,
            "milter {milter}, deferred:\n{}",
            first.transcript
        );
        assert!(first.rcpt_reply().contains("4.7.1"), "{}", first.transcript);
        gg.expect_log("group=\"spf:pool.test\"");
        std::thread::sleep(Duration::from_millis(DELAY * 1000 + 300));
        let retry = rcpt("203.0.113.9", "out-9.mailer.example.net");
        assert_eq!(
            retry.code,
            0,
            "milter {milter}: the pool's retry from another /24 is accepted:\n{}\n{}",
            retry.transcript,
            gg.log()
        );
        // Without DNS facts the same retry would be a new triplet (another /24).
        let stranger = rcpt("192.0.2.50", "out-50.mailer.example.net");
        assert_eq!(stranger.code, 24, "{}", stranger.transcript);
        // The MTA's names were used as they came: no PTR query.
        assert!(!gg.log().contains("host name ("), "{}", gg.log());
    }
}

/// An HTTP GET on the daemon's admin listener; the body.
fn admin_get(d: &Daemon, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(d.admin.expect("admin listener")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// With the defaults and a resolver that never answers: every request answers within the
/// budget (plus scheduling), as the prefix would decide it; after a few such requests the
/// resolver's breaker opens, and requests stop waiting on it altogether. `explain --live`
/// and the metrics say so.
#[test]
fn dns_defaults_with_a_dead_resolver_cost_at_most_the_budget_then_nothing() {
    const BUDGET: Duration = Duration::from_millis(300);
    let silent = SilentDns::start();
    let dir = tempfile::tempdir().unwrap();
    let d = default_daemon(dir.path(), &silent.addr().to_string(), false);
    let mut c = d.client();
    let ask = |c: &mut crate::harness::PolicyClient, i: usize| {
        let started = Instant::now();
        let r = c.ask(&request_with(
            &format!("198.51.100.{}", 10 + i),
            &format!("n{i}@pool.test"),
            "bob@rcpt.test",
            &[],
        ));
        // Deferred by greylisting as without DNS, for the configured delay.
        assert!(
            r.starts_with("DEFER_IF_PERMIT") && r.contains(&format!("{DELAY} seconds")),
            "{r}"
        );
        started.elapsed()
    };
    let i = greygate::dns::breaker::OPEN_AFTER as usize;
    let waited: Vec<Duration> = (0..i).map(|i| ask(&mut c, i)).collect();
    d.expect_log("DNS resolver not answering; requests stop asking it");
    eprintln!("before the breaker opened: {waited:?}");
    for t in &waited {
        // The budget, plus a margin for a loaded test machine.
        assert!(*t >= BUDGET - Duration::from_millis(10), "{waited:?}");
        assert!(*t < BUDGET + Duration::from_millis(150), "{waited:?}");
    }
    d.expect_log("group=\"198.51.100.0/24\"");
    d.expect_log("dns=\"DNS timed out after 3");

    // Open: no request waits on the resolver, background probes included.
    let mut open = Vec::new();
    for k in 0..40 {
        open.push(ask(&mut c, i + k));
        std::thread::sleep(Duration::from_millis(10));
    }
    open.sort();
    eprintln!(
        "with the breaker open: median {:?}, max {:?}",
        open[20], open[39]
    );
    assert!(open[20] < Duration::from_millis(30), "{open:?}");
    assert!(open[39] < BUDGET / 2, "{open:?}");
    d.expect_log("DNS resolver not answering for 0 s (breaker open), not asked: spf");

    let metrics = admin_get(&d, "/metrics");
    assert!(
        metrics.contains("greygate_dns_resolver_down 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("greygate_dns_breaker_opened_total 1"),
        "{metrics}"
    );
    let (code, out, err) = run_cli(&[
        "explain",
        "--live",
        "--admin",
        &format!("http://{}", d.admin.unwrap()),
        "--client",
        "203.0.113.9",
        "--from",
        "news@pool.test",
        "--to",
        "bob@rcpt.test",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("client 203.0.113.0/24"), "{out}");
    assert!(
        out.contains("DNS resolver not answering for") && out.contains("(breaker open)"),
        "{out}"
    );
}
