//! `greygate lists update` against a real DNS server (a private dnsmasq answering for
//! `.test`): include chains, loops, the lookup limits, a failed update keeping the previous
//! file, and the daemon letting a client of the written ranges pass after `--reload`.

use std::path::Path;
use std::time::Duration;

use crate::harness::dns::{Dnsmasq, dnsmasq_available};
use crate::harness::{DaemonConfig, rcpt_request, run_cli};

fn txt(name: &str, record: &str) -> String {
    format!("--txt-record={name},{record}")
}

/// The records every test here asks about.
fn records() -> Vec<String> {
    let mut r = vec![
        // A three-level include chain, with a, mx, ip6, a redirect, and ranges that do
        // not pass (-ip4, inside -include).
        txt(
            "chain.test",
            "v=spf1 ip4:192.0.2.0/25 include:l1.chain.test -include:bad.chain.test -all",
        ),
        txt(
            "l1.chain.test",
            "v=spf1 ip4:192.0.2.128/25 -ip4:203.0.113.0/24 include:l2.chain.test ~all",
        ),
        txt(
            "l2.chain.test",
            "v=spf1 a:host.chain.test/28 mx:chain.test ip6:2001:DB8:3::/48 include:l3.chain.test ?all",
        ),
        txt(
            "l3.chain.test",
            "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:3:1::/64 redirect=%{d}.last.test",
        ),
        txt("l3.chain.test.last.test", "v=spf1 ip4:100.64.7.0/24 -all"),
        txt("bad.chain.test", "v=spf1 ip4:203.0.114.0/24 -all"),
        "--host-record=host.chain.test,100.64.1.1,2001:db8:9::1".into(),
        "--mx-host=chain.test,mx1.chain.test,10".into(),
        "--host-record=mx1.chain.test,100.64.2.2".into(),
        // Another domain overlapping the chain's ranges.
        txt(
            "other.test",
            "v=spf1 ip4:192.0.2.0/24 ip4:100.64.9.0/24 -all",
        ),
        // A loop.
        txt("loop.test", "v=spf1 ip4:192.0.2.1 include:a.loop.test -all"),
        txt("a.loop.test", "v=spf1 include:b.loop.test"),
        txt("b.loop.test", "v=spf1 redirect=loop.test"),
        // Void lookups: two are allowed, the third is an error.
        txt(
            "void.test",
            "v=spf1 a:nothing.void.test ip4:192.0.2.77 mx:nothing.void.test -all",
        ),
        txt(
            "voids.test",
            "v=spf1 a:nothing.void.test mx:nothing.void.test a:none.void.test ip4:192.0.2.78 -all",
        ),
        txt("noinclude.test", "v=spf1 include:missing.test -all"),
        // Two SPF records, and a syntax error.
        txt("twice.test", "v=spf1 -all"),
        txt("twice.test", "v=spf1 ip4:192.0.2.9 -all"),
        txt("broken.test", "v=spf1 ip4:192.0.2.300 -all"),
        // What no list can hold, and a range far too wide.
        txt(
            "dyn.test",
            "v=spf1 ptr exists:%{i}.x.dyn.test include:%{ir}.y.dyn.test ip4:0.0.0.0/1 ip4:192.0.2.99 -all",
        ),
    ];
    // An mx with 11 names (the limit is 10).
    for i in 0..11 {
        r.push(format!("--mx-host=manymx.test,mx{i}.manymx.test,{i}"));
    }
    r.push(txt("manymx.test", "v=spf1 mx -all"));
    // Chains of 10 includes (the limit) and 11 (over it).
    for (zone, depth) in [("ten.test", 10), ("eleven.test", 11)] {
        for i in 0..depth {
            let name = if i == 0 {
                zone.to_string()
            } else {
                format!("n{i}.{zone}")
            };
            r.push(txt(
                &name,
                &format!(
                    "v=spf1 ip4:10.{depth}.{i}.0/24 include:n{}.{zone} -all",
                    i + 1
                ),
            ));
        }
        r.push(txt(
            &format!("n{depth}.{zone}"),
            &format!("v=spf1 ip4:10.{depth}.{depth}.0/24 -all"),
        ));
    }
    r
}

/// `greygate lists update --resolver DNS --output FILE --config CONFIG --domain D...`.
fn update(dns: &Dnsmasq, out: &Path, config: &Path, domains: &[&str]) -> (i32, String, String) {
    let (dns, out, config) = (
        dns.addr(),
        out.display().to_string(),
        config.display().to_string(),
    );
    let mut args = vec![
        "lists",
        "update",
        "--resolver",
        &dns,
        "--output",
        &out,
        "--config",
        &config,
    ];
    for d in domains {
        args.extend(["--domain", d]);
    }
    run_cli(&args)
}

/// The ranges of a written list, with their comments.
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn lists_update_follows_includes_and_keeps_rfc_7208_limits() {
    if !dnsmasq_available("lists_update_follows_includes_and_keeps_rfc_7208_limits") {
        return;
    }
    let dns = Dnsmasq::start(&records());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("greygate.toml");
    std::fs::write(&config, "").unwrap();
    let out = dir.path().join("big-senders");

    // The three-level chain, merged with another domain's ranges.
    let (code, stdout, err) = update(&dns, &out, &config, &["chain.test", "other.test"]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(
        stdout.contains("chain.test: 9 ranges, 7 DNS lookups"),
        "{stdout}"
    );
    assert!(stdout.contains("wrote 8 ranges from 2 domains"), "{stdout}");
    assert_eq!(
        lines(&out),
        [
            "100.64.1.0/28  # chain.test",
            "100.64.2.2/32  # chain.test",
            "100.64.7.0/24  # chain.test",
            "100.64.9.0/24  # other.test",
            // Two /25s of two levels, and other.test's /24: one range, both domains.
            "192.0.2.0/24  # chain.test, other.test",
            "198.51.100.0/24  # chain.test",
            // The /64 lies inside the /48.
            "2001:db8:3::/48  # chain.test",
            "2001:db8:9::1/128  # chain.test",
        ]
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("# chain.test: 9 ranges, 7 DNS lookups"),
        "{text}"
    );
    // -ip4 and the ranges of a -include do not pass.
    assert!(!text.contains("203.0.11"), "{text}");

    // Exactly 10 lookups is allowed; 11 is an error.
    let (code, stdout, err) = update(&dns, &out, &config, &["ten.test"]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(
        stdout.contains("ten.test: 11 ranges, 10 DNS lookups"),
        "{stdout}"
    );
    assert!(lines(&out).contains(&"10.10.10.0/24  # ten.test".to_string()));

    let before = std::fs::read(&out).unwrap();
    let cases: [(&str, &str); 8] = [
        (
            "manymx.test",
            "manymx.test: mx finds 11 MX names, more than 10 (RFC 7208 4.6.4)",
        ),
        (
            "eleven.test",
            "eleven.test: more than 10 DNS lookups (RFC 7208 4.6.4), the 11th at include:n11.eleven.test in n10.eleven.test's record",
        ),
        (
            "loop.test",
            "loop.test: include loop: loop.test -> a.loop.test -> b.loop.test -> loop.test",
        ),
        (
            "voids.test",
            "voids.test: more than 2 lookups that found nothing (RFC 7208 4.6.4), the last for none.void.test",
        ),
        (
            "noinclude.test",
            "noinclude.test: missing.test has no SPF record",
        ),
        (
            "nothere.test",
            "nothere.test: nothere.test has no SPF record",
        ),
        ("twice.test", "twice.test: twice.test has 2 SPF records"),
        (
            "broken.test",
            "broken.test: broken.test's SPF record is invalid: bad term \"ip4:192.0.2.300\"",
        ),
    ];
    for (domain, want) in cases {
        // A failing domain fails the whole update, the good one beside it included.
        let (code, stdout, err) = update(&dns, &out, &config, &["void.test", domain]);
        assert_eq!(code, 1, "{domain}: {stdout}{err}");
        assert!(err.contains(want), "{domain}: {err}");
        assert!(
            err.contains("1 of 2 domains failed: nothing written"),
            "{domain}: {err}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), before, "{domain}: file kept");
    }

    // Two void lookups are allowed: what is left is written. Without --resolver, the
    // configuration's [dns] resolver is asked, and [lists] domains.
    let configured = dir.path().join("configured.toml");
    std::fs::write(
        &configured,
        format!(
            "[dns]\nresolver = \"{}\"\n[lists]\ndomains = [\"void.test\"]\noutput = {:?}\n",
            dns.addr(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let (code, stdout, err) =
        run_cli(&["lists", "update", "--config", configured.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("wrote 1 ranges from 1 domains"), "{stdout}");
    assert_eq!(lines(&out), ["192.0.2.77/32  # void.test"]);

    // ptr, exists and client macros are left out and said so; a huge range is a warning.
    let (code, stdout, err) = update(&dns, &out, &config, &["dyn.test"]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(
        stdout.contains("dyn.test: 2 ranges, 3 DNS lookups"),
        "{stdout}"
    );
    for note in [
        "left out: dyn.test: ptr depends on the client",
        "left out: dyn.test: exists:%{i}.x.dyn.test depends on the client",
        "left out: dyn.test: include:%{ir}.y.dyn.test depends on the client",
    ] {
        assert!(stdout.contains(note), "{note}: {stdout}");
    }
    assert!(
        err.contains(
            "warning: dyn.test: left out 0.0.0.0/1 (from dyn.test's record): wider than /8"
        ),
        "{err}"
    );
    assert_eq!(lines(&out), ["192.0.2.99/32  # dyn.test"]);

    // A damaged file is not read: the update replaces it.
    std::fs::write(&out, "not an allow-list entry\n").unwrap();
    let (code, stdout, err) = update(&dns, &out, &config, &["void.test"]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert_eq!(lines(&out), ["192.0.2.77/32  # void.test"]);

    // A DNS server that does not answer: an error, the previous file stays.
    let before = std::fs::read(&out).unwrap();
    let silent = crate::harness::dns::SilentDns::start();
    let (code, stdout, err) = run_cli(&[
        "lists",
        "update",
        "--resolver",
        &silent.addr().to_string(),
        "--output",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--domain",
        "chain.test",
        "--timeout",
        "2s",
    ]);
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(err.contains("chain.test: "), "{err}");
    assert!(err.contains("nothing written"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn lists_update_reload_makes_the_daemon_pass_a_client_of_the_ranges() {
    if !dnsmasq_available("lists_update_reload_makes_the_daemon_pass_a_client_of_the_ranges") {
        return;
    }
    let dns = Dnsmasq::start(&records());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big-senders");
    let token = "lists-test-token-0123456789";
    let cfg = DaemonConfig::new(dir.path()).toml(&format!(
        "[greylist]\ndelay = 300\n[admin]\ntoken = \"{token}\"\n[lists]\noutput = {:?}\n",
        out.display().to_string()
    ));
    // No file yet: no entries, and no error.
    let d = cfg.start();
    let mut c = d.client();
    let ask = |c: &mut crate::harness::PolicyClient, ip: &str| {
        c.ask(&rcpt_request(ip, "news@pool.example", "bob@example.org"))
    };
    assert!(ask(&mut c, "100.64.2.2").starts_with("DEFER_IF_PERMIT"));

    let config = dir.path().join("greygate.toml");
    let url = d.admin_url();
    let (code, stdout, err) = run_cli(&[
        "lists",
        "update",
        "--config",
        config.to_str().unwrap(),
        "--resolver",
        &dns.addr(),
        "--domain",
        "chain.test",
        "--reload",
        "--admin",
        &url,
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("configuration reloaded"), "{stdout}");
    assert!(out.exists());
    d.expect_log("allow_clients=7");

    // The MX host's address, another of the pool's (the /28 of `a`), and an IPv6 one pass;
    // an address outside the ranges is still greylisted.
    for ip in ["100.64.2.2", "100.64.1.9", "2001:db8:3:77::25"] {
        assert_eq!(ask(&mut c, ip), "DUNNO", "{ip}");
    }
    assert!(ask(&mut c, "203.0.113.5").starts_with("DEFER_IF_PERMIT"));
    let (code, stdout, err) = run_cli(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--live",
        "--admin",
        &url,
        "--client",
        "100.64.1.9",
        "--from",
        "a@pool.example",
        "--to",
        "bob@example.org",
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains(&out.display().to_string()), "{stdout}");

    // A failed update with --reload writes nothing and asks for no reload.
    let (code, stdout, err) = run_cli(&[
        "lists",
        "update",
        "--config",
        config.to_str().unwrap(),
        "--resolver",
        &dns.addr(),
        "--domain",
        "loop.test",
        "--reload",
        "--admin",
        &url,
    ]);
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(!stdout.contains("reloaded"), "{stdout}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.log().matches("configuration reloaded").count(), 1);
    assert_eq!(ask(&mut c, "100.64.2.2"), "DUNNO");

    // No daemon answers the reload: the file is written all the same, the exit code says so.
    drop(d);
    std::fs::remove_file(&out).unwrap();
    let (code, stdout, err) = run_cli(&[
        "lists",
        "update",
        "--config",
        config.to_str().unwrap(),
        "--resolver",
        &dns.addr(),
        "--domain",
        "void.test",
        "--reload",
        "--admin",
        &url,
    ]);
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(err.contains("no daemon to reload"), "{err}");
    assert_eq!(lines(&out), ["192.0.2.77/32  # void.test"]);
}

#[test]
fn lists_domains_prints_the_set_with_who_sends_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("greygate.toml");
    std::fs::write(&config, "").unwrap();
    let (code, out, err) = run_cli(&["lists", "domains", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let google = out
        .lines()
        .find(|l| l.starts_with("_spf.google.com "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        google.ends_with("# Google: Gmail and Google Workspace"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("amazonses.com ")),
        "{out}"
    );

    std::fs::write(
        &config,
        "[lists]\ndomains = [\"amazonses.com\"]\nextra_domains = [\"partner.example\"]\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["lists", "domains", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "amazonses.com    # Amazon SES (every region)\npartner.example\n"
    );
}
