//! Identity tests: dynamic-name detection on real-world-looking names, registrable domains,
//! and the choice of identity from facts.

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP address")
}

#[test]
fn residential_and_dynamic_names_are_dynamic() {
    #[rustfmt::skip]
    let cases: &[(&str, &str)] = &[
        // Comcast, Charter/Spectrum, Verizon FiOS, Cox, BT: the address in dashes.
        ("c-73-15-208-11.hsd1.ma.comcast.net", "73.15.208.11"),
        ("cpe-74-64-33-22.nyc.res.rr.com", "74.64.33.22"),
        ("pool-71-105-12-34.lsanca.fios.verizon.net", "71.105.12.34"),
        ("ip68-100-10-5.ri.ri.cox.net", "68.100.10.5"),
        ("host86-155-1-1.range86-155.btcentralplus.com", "86.155.1.1"),
        // Free, OTE, Telefónica Spain (reversed, last octet first).
        ("91-160-1-1.subs.proxad.net", "91.160.1.1"),
        ("ppp-94-66-1-1.home.otenet.gr", "94.66.1.1"),
        ("181.red-83-33-1.dynamicip.rima-tde.net", "83.33.1.181"),
        // Vodafone Germany: zero-padded octets.
        ("dslb-092-078-001-002.092.078.pools.vodafone-ip.de", "92.78.1.2"),
        // Deutsche Telekom and Telefónica Germany: the address in hex.
        ("p5b0a1b2c.dip0.t-ipconnect.de", "91.10.27.44"),
        ("x4d0a1b2c.dyn.telefonica.de", "77.10.27.44"),
        // Orange France: only the network half, then a line number.
        ("lfbn-idf1-1-1234-56.w86-246.abo.wanadoo.fr", "86.246.1.2"),
        // IPv4-mapped clients count as IPv4.
        ("c-73-15-208-11.hsd1.ma.comcast.net", "::ffff:73.15.208.11"),
        // IPv6 groups in the name.
        ("2a02-8108-1-2-3-4-5-6.dyn6.example.net", "2a02:8108:1:2:3:4:5:6"),
        // Another address than the client's, and pool words without an address.
        ("1-2-3-4.customers.example.net", "198.51.100.7"),
        ("dhcp-host.example.net", "198.51.100.7"),
        ("adsl.example.net", "198.51.100.7"),
        ("dynamic.example.net", "198.51.100.7"),
        ("cable-modem.example.net", "198.51.100.7"),
        ("ppp0.example.net", "198.51.100.7"),
        ("dialup7.example.net", "198.51.100.7"),
        ("cpe.example.net", "198.51.100.7"),
        ("broadband.example.net", "198.51.100.7"),
        ("customer.example.net", "198.51.100.7"),
        ("client-7.example.net", "198.51.100.7"),
        // Generic words count next to numbers.
        ("static-123-45.example.net", "198.51.100.7"),
        ("host-12-34.example.net", "198.51.100.7"),
        // Unknown suffix: the whole name is read.
        ("pool-1.isp.invalidtld", "198.51.100.7"),
    ];
    for &(name, addr) in cases {
        assert!(
            dynamic_name(name, ip(addr)).is_some(),
            "{name} ({addr}) should look dynamic"
        );
    }
}

#[test]
fn mail_servers_of_big_senders_are_not_dynamic() {
    #[rustfmt::skip]
    let cases: &[(&str, &str)] = &[
        ("mail-sor-f41.google.com", "209.85.220.41"),
        ("mail-oi1-f176.google.com", "209.85.167.176"),
        ("mail-yw1-f170.google.com", "209.85.128.170"),
        ("mail-dm6nam10on2071.outbound.protection.outlook.com", "40.107.93.71"),
        ("mail-eopbgr80072.outbound.protection.outlook.com", "40.107.8.72"),
        // SES names the host half of its address: that alone is not a pool.
        ("a8-1.smtp-out.amazonses.com", "54.240.8.1"),
        ("a48-110.smtp-out.amazonses.com", "54.240.48.110"),
        ("mail135-1.atl141.mcdlv.net", "198.2.135.1"),
        ("o1678912x123.outbound-mail.sendgrid.net", "149.72.1.2"),
        ("mx.example.org", "192.0.2.25"),
        ("mail.example.co.uk", "192.0.2.25"),
        ("static.example.org", "192.0.2.25"),
        ("mta7.example.com", "192.0.2.25"),
        ("outbound.mailhop.org", "192.0.2.25"),
        // Pool words in the registrable domain itself do not count.
        ("smtp.dynect.net", "192.0.2.25"),
        ("example.com", "192.0.2.25"),
        ("mx.example.org", "2001:db8::25"),
    ];
    for &(name, addr) in cases {
        assert_eq!(
            dynamic_name(name, ip(addr)),
            None,
            "{name} ({addr}) should not look dynamic"
        );
    }
}

#[test]
fn registrable_domain_table() {
    #[rustfmt::skip]
    let cases: &[(&str, Option<&str>)] = &[
        ("mail-sor-f41.google.com", Some("google.com")),
        ("mail-dm6nam10on2071.outbound.protection.outlook.com", Some("outlook.com")),
        ("a8-1.smtp-out.amazonses.com", Some("amazonses.com")),
        ("mx.example.co.uk", Some("example.co.uk")),
        ("mx.example.com.", Some("example.com")),
        ("example.com", Some("example.com")),
        ("co.uk", None),
        ("com", None),
        ("host.invalidtld", None),
        ("", None),
        ("bad..name.com", None),
        ("spaced name.com", None),
        ("ünïcode.example.com", None),
    ];
    for &(name, want) in cases {
        assert_eq!(registrable_domain(name), want, "{name}");
    }
}

fn spf(domain: &str, result: SpfResult) -> Option<SpfFact> {
    Some(SpfFact {
        domain: domain.into(),
        result,
    })
}

fn verified(name: &str) -> HostName {
    HostName::Verified(name.into())
}

const ALL: &[IdentityKind] = &DEFAULT_ORDER;
const ORG_FIRST: &[IdentityKind] = &[IdentityKind::Org, IdentityKind::Spf];
const PREFIX_ONLY: &[IdentityKind] = &[IdentityKind::Prefix];

struct ChooseCase {
    name: &'static str,
    order: &'static [IdentityKind],
    client: &'static str,
    sender: &'static str,
    facts: Option<IdentityFacts>,
    key: &'static str,
    kind: IdentityKind,
    /// Words the reason must contain.
    reason: &'static [&'static str],
}

#[test]
fn choose_applies_the_order_and_falls_back_to_the_prefix() {
    use IdentityKind::{Org, Prefix, Spf};
    let facts = |spf: Option<SpfFact>, name: HostName| {
        Some(IdentityFacts {
            spf,
            name,
            ..IdentityFacts::default()
        })
    };
    let google = "mail-sor-f41.google.com";
    const COMCAST: &str = "c-73-15-208-11.hsd1.ma.comcast.net";
    #[rustfmt::skip]
    let cases = [
        ChooseCase { name: "no facts: prefix", order: ALL, client: "209.85.220.41", sender: "a@gmail.com", facts: None, key: "209.85.220.0/24", kind: Prefix, reason: &["no DNS facts"] },
        ChooseCase { name: "SPF pass", order: ALL, client: "209.85.220.41", sender: "a@gmail.com", facts: facts(spf("gmail.com", SpfResult::Pass), verified(google)), key: "spf:gmail.com", kind: Spf, reason: &["SPF of gmail.com passes"] },
        ChooseCase { name: "SPF domain is compared without case and trailing dot", order: ALL, client: "209.85.220.41", sender: "<A@GMail.com>", facts: facts(spf("GMAIL.COM.", SpfResult::Pass), HostName::Unknown), key: "spf:gmail.com", kind: Spf, reason: &["gmail.com"] },
        ChooseCase { name: "SPF fail: org", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::Fail), verified(google)), key: "org:google.com", kind: Org, reason: &["belongs to google.com", "not spf: fail for example.com"] },
        ChooseCase { name: "SPF softfail: org", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::SoftFail), verified(google)), key: "org:google.com", kind: Org, reason: &["softfail"] },
        ChooseCase { name: "SPF none: org", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::None), verified(google)), key: "org:google.com", kind: Org, reason: &["none for example.com"] },
        ChooseCase { name: "SPF neutral: org", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::Neutral), verified(google)), key: "org:google.com", kind: Org, reason: &["neutral"] },
        ChooseCase { name: "SPF temperror: org", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::TempError), verified(google)), key: "org:google.com", kind: Org, reason: &["temperror"] },
        ChooseCase { name: "SPF permerror: prefix", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::PermError), HostName::Unverified), key: "209.85.220.0/24", kind: Prefix, reason: &["permerror", "no forward-confirmed host name"] },
        ChooseCase { name: "SPF that passes any address gives no identity", order: ALL, client: "198.51.100.7", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::PassAny), HostName::Unverified), key: "198.51.100.0/24", kind: Prefix, reason: &["passes any address", "names no pool"] },
        ChooseCase { name: "SPF for another domain does not count", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("gmail.com", SpfResult::Pass), HostName::Unverified), key: "209.85.220.0/24", kind: Prefix, reason: &["result is for gmail.com, not example.com"] },
        ChooseCase { name: "null sender has no SPF identity", order: ALL, client: "209.85.220.41", sender: "", facts: facts(spf("gmail.com", SpfResult::Pass), verified(google)), key: "org:google.com", kind: Org, reason: &["null sender"] },
        ChooseCase { name: "SPF not checked", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(None, verified(google)), key: "org:google.com", kind: Org, reason: &["spf: not checked"] },
        ChooseCase { name: "dynamic name is no org", order: ALL, client: "73.15.208.11", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::None), verified(COMCAST)), key: "73.15.208.0/24", kind: Prefix, reason: &["looks dynamic", COMCAST] },
        ChooseCase { name: "name under no known suffix is no org", order: ALL, client: "192.0.2.25", sender: "a@example.com", facts: facts(None, verified("mx.corp.internal")), key: "192.0.2.0/24", kind: Prefix, reason: &["not under a known public suffix"] },
        ChooseCase { name: "name is compared lower-case", order: ALL, client: "40.107.93.71", sender: "a@example.com", facts: facts(None, verified("MAIL-DM6NAM10ON2071.OUTBOUND.PROTECTION.OUTLOOK.COM.")), key: "org:outlook.com", kind: Org, reason: &["outlook.com"] },
        ChooseCase { name: "reverse DNS timeout: prefix", order: ALL, client: "209.85.220.41", sender: "a@example.com", facts: facts(spf("example.com", SpfResult::Timeout), HostName::Timeout), key: "209.85.220.0/24", kind: Prefix, reason: &["spf: timeout", "reverse DNS timed out"] },
        ChooseCase { name: "order puts org first", order: ORG_FIRST, client: "209.85.220.41", sender: "a@gmail.com", facts: facts(spf("gmail.com", SpfResult::Pass), verified(google)), key: "org:google.com", kind: Org, reason: &["google.com"] },
        ChooseCase { name: "order without prefix still ends there", order: ORG_FIRST, client: "2001:db8:1:2::25", sender: "a@gmail.com", facts: facts(None, HostName::Unverified), key: "2001:db8:1:2::/64", kind: Prefix, reason: &["IP prefix"] },
        ChooseCase { name: "prefix only ignores every fact", order: PREFIX_ONLY, client: "209.85.220.41", sender: "a@gmail.com", facts: facts(spf("gmail.com", SpfResult::Pass), verified(google)), key: "209.85.220.0/24", kind: Prefix, reason: &["IP prefix"] },
    ];
    for c in cases {
        let addr = ip(c.client);
        let id = choose(c.order, addr, c.sender, c.facts.as_ref(), || {
            crate::engine::normalize::client_group(addr, 24, 64)
        });
        assert_eq!(
            (id.key.as_str(), id.why.kind),
            (c.key, c.kind),
            "{}",
            c.name
        );
        for word in c.reason {
            assert!(
                id.why.reason.contains(word),
                "{}: reason {:?} lacks {word:?}",
                c.name,
                id.why.reason
            );
        }
    }
}

#[test]
fn choosing_without_facts_allocates_no_reason() {
    let id = choose(ALL, ip("192.0.2.1"), "a@b.example", None, || "p".into());
    assert!(matches!(id.why.reason, Cow::Borrowed(_)));
}

#[test]
fn listings_and_timeouts() {
    let clean = Listing {
        hits: vec![],
        complete: true,
    };
    let listed = Listing {
        hits: vec!["zen.spamhaus.org".into()],
        complete: true,
    };
    let unknown = Listing {
        hits: vec![],
        complete: false,
    };
    assert!(clean.clean() && !clean.listed());
    assert!(listed.listed() && !listed.clean());
    assert!(!unknown.clean() && !unknown.listed());
    assert!(!IdentityFacts::default().timed_out());
    let timed_out = IdentityFacts {
        name: HostName::Timeout,
        ..IdentityFacts::default()
    };
    assert!(timed_out.timed_out());
}

proptest::proptest! {
    /// Any name and address: no panic, the registrable domain ends the name, and `org` is
    /// only ever chosen for a name that does not look dynamic.
    #[test]
    fn org_is_never_a_dynamic_name(
        name in "[a-z0-9.-]{0,40}(\\.com|\\.co\\.uk|\\.net|\\.invalidtld)?",
        v4 in proptest::prelude::any::<[u8; 4]>(),
    ) {
        let ip = IpAddr::from(v4);
        let dynamic = dynamic_name(&name, ip);
        if let Some(domain) = registrable_domain(&name) {
            proptest::prop_assert!(name.trim_end_matches('.').ends_with(domain));
        }
        let facts = IdentityFacts { name: HostName::Verified(name.clone()), ..IdentityFacts::default() };
        let id = choose(ALL, ip, "", Some(&facts), || "prefix".into());
        if id.why.kind == IdentityKind::Org {
            proptest::prop_assert!(dynamic.is_none());
        } else {
            proptest::prop_assert_eq!(id.key, "prefix");
        }
    }
}
