//! The record parser and macro expansion, table-driven.

use super::*;

fn terms(txt: &str) -> Vec<Term> {
    parse(txt).unwrap_or_else(|e| panic!("{txt:?}: {e}")).terms
}

fn net4(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn version_must_come_first_and_alone() {
    assert!(is_spf("v=spf1"));
    assert!(is_spf("V=SPF1 -all"));
    assert!(!is_spf("v=spf10 -all"));
    assert!(!is_spf("v=spf2.0/pra -all"));
    assert!(!is_spf(" v=spf1"));
    assert_eq!(parse("hello"), Err(RecordError::NotSpf));
    assert_eq!(terms("v=spf1"), vec![]);
}

#[test]
fn mechanisms_with_their_qualifiers() {
    let t = terms(
        "v=spf1 ip4:192.0.2.1/24  -ip4:198.51.100.7 ~a ?mx:mx.example.com/28//64 include:_spf.example.com -all",
    );
    assert_eq!(
        t,
        vec![
            // Host bits cleared: the mechanism matches the network.
            Term::Directive(Qualifier::Pass, Mechanism::Ip4(net4("192.0.2.0/24"))),
            Term::Directive(Qualifier::Fail, Mechanism::Ip4(net4("198.51.100.7/32"))),
            Term::Directive(
                Qualifier::SoftFail,
                Mechanism::A {
                    domain: None,
                    v4: 32,
                    v6: 128
                }
            ),
            Term::Directive(
                Qualifier::Neutral,
                Mechanism::Mx {
                    domain: Some(DomainSpec("mx.example.com".into())),
                    v4: 28,
                    v6: 64
                }
            ),
            Term::Directive(
                Qualifier::Pass,
                Mechanism::Include(DomainSpec("_spf.example.com".into()))
            ),
            Term::Directive(Qualifier::Fail, Mechanism::All),
        ]
    );
}

#[test]
fn ip6_and_dual_cidr_forms() {
    let t = terms("v=spf1 ip6:2001:DB8::1/48 ip6:::ffff:192.0.2.0/120 a//96 a/20 a:x.example");
    assert_eq!(
        t[0],
        Term::Directive(
            Qualifier::Pass,
            Mechanism::Ip6("2001:db8::/48".parse().unwrap())
        )
    );
    assert_eq!(
        t[1],
        Term::Directive(
            Qualifier::Pass,
            Mechanism::Ip6("::ffff:192.0.2.0/120".parse().unwrap())
        )
    );
    let a = |domain: Option<&str>, v4, v6| {
        Term::Directive(
            Qualifier::Pass,
            Mechanism::A {
                domain: domain.map(|d| DomainSpec(d.into())),
                v4,
                v6,
            },
        )
    };
    assert_eq!(t[2], a(None, 32, 96));
    assert_eq!(t[3], a(None, 20, 128));
    assert_eq!(t[4], a(Some("x.example"), 32, 128));
}

#[test]
fn redirect_applies_only_without_all() {
    let r = parse("v=spf1 ip4:192.0.2.0/24 redirect=_spf.example.com").unwrap();
    assert_eq!(r.redirect(), Some(&DomainSpec("_spf.example.com".into())));
    let r = parse("v=spf1 redirect=_spf.example.com ~all").unwrap();
    assert_eq!(r.redirect(), None);
    assert_eq!(
        parse("v=spf1 redirect=a.example redirect=b.example"),
        Err(RecordError::Duplicate("redirect"))
    );
    // exp= and unknown modifiers parse and change nothing.
    assert_eq!(
        terms("v=spf1 exp=explain.%{d} moo.cow-far_out=man:dog/cat a= -all").len(),
        4
    );
}

#[test]
fn bad_records_are_errors_not_panics() {
    for bad in [
        "v=spf1 ip4:192.0.2.0/33",
        "v=spf1 ip4:192.0.2.0/024",
        "v=spf1 ip4:192.0.2",
        "v=spf1 ip4:2001:db8::/32",
        "v=spf1 ip6:192.0.2.1",
        "v=spf1 ip6:2001:db8::/129",
        "v=spf1 ip4",
        "v=spf1 include",
        "v=spf1 include:",
        "v=spf1 all:x",
        "v=spf1 a:example.com/",
        "v=spf1 a:example.com//",
        "v=spf1 +",
        "v=spf1 foo:bar",
        "v=spf1 include:%{z}.example",
        "v=spf1 include:%{d",
        "v=spf1 include:%x.example",
        "v=spf1 include:ex\u{e9}mple.com",
        "v=spf1 exists:%{i99999}.example",
        "v=spf1 =x",
    ] {
        assert!(
            matches!(parse(bad), Err(RecordError::BadTerm { .. })),
            "{bad:?}: {:?}",
            parse(bad)
        );
    }
    let long = format!("v=spf1 {}", "ip4:192.0.2.1 ".repeat(400));
    assert_eq!(parse(&long), Err(RecordError::TooLong));
}

#[test]
fn macros_of_the_domain_expand_others_are_dynamic() {
    let spec = |s: &str| DomainSpec::parse(s).unwrap();
    let cases: [(&str, Result<&str, Expand>); 8] = [
        ("_spf.%{d}", Ok("_spf.mail.example.com")),
        ("%{d2}._spf.example.net", Ok("example.com._spf.example.net")),
        ("%{dr}.rev.example", Ok("com.example.mail.rev.example")),
        ("%{d1r}.x.example", Ok("mail.x.example")),
        ("%{o}.senders.example", Ok("top.example.senders.example")),
        ("%{D}.example.", Ok("mail.example.com.example")),
        ("%{ir}.%{v}._spf.example", Err(Expand::Dynamic('i'))),
        ("%{l}.example", Err(Expand::Dynamic('l'))),
    ];
    for (s, want) in cases {
        assert_eq!(
            spec(s).expand("mail.example.com", "top.example"),
            want.map(str::to_string),
            "{s}"
        );
    }
    assert!(matches!(
        spec("a..b").expand("x", "y"),
        Err(Expand::NotADomain(_))
    ));
    // RFC 7208 7.3: too long for a name, labels go from the left.
    let long = format!("{}example.com", "%{d}.".repeat(30));
    let got = spec(&long).expand("abcdefghij.example", "o").unwrap();
    assert!(got.len() <= 253 && got.ends_with(".example.com"), "{got}");
}

proptest::proptest! {
    /// Records made of SPF-looking pieces: no panic; what parses keeps its bounds, and a
    /// domain-spec expands to a domain name or says why not.
    #[test]
    fn any_record_parses_or_fails_within_bounds(
        terms in proptest::collection::vec(
            "[+~?-]?(ip4:[0-9./]{0,20}|ip6:[0-9a-f:./]{0,45}|a|mx|ptr|all|include:|exists:|redirect=|exp=|[a-z]{1,4}=)(%\\{[dolsiphvcrt][0-9]{0,3}r?[.+-]?\\}|[a-z0-9._/%-]){0,12}",
            0..12,
        ),
    ) {
        let txt = format!("v=spf1 {}", terms.join(" "));
        if let Ok(rec) = parse(&txt) {
            for t in &rec.terms {
                let spec = match t {
                    Term::Directive(_, Mechanism::Ip4(n)) => {
                        proptest::prop_assert_eq!(*n, n.trunc());
                        None
                    }
                    Term::Directive(_, Mechanism::A { domain, v4, v6 } | Mechanism::Mx { domain, v4, v6 }) => {
                        proptest::prop_assert!(*v4 <= 32 && *v6 <= 128);
                        domain.as_ref()
                    }
                    Term::Directive(_, Mechanism::Include(d) | Mechanism::Exists(d)) | Term::Redirect(d) => Some(d),
                    _ => None,
                };
                if let Some(spec) = spec
                    && let Ok(name) = spec.expand("mail.example.com", "example.com")
                {
                    proptest::prop_assert!(is_domain_name(&name), "{} -> {}", spec, name);
                }
            }
        }
    }
}
