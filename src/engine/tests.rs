//! Engine tests: every rule, normalisation through the key, boundaries, learn mode, properties.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::*;

/// An arbitrary "now" far from zero, so `now - x` never saturates by accident.
const T: u64 = 1_700_000_000;
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;
/// The recipient allow list `config` installs by default.
const DEFAULT_RECIPIENTS: &[&str] = &["postmaster@", "abuse@"];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP address")
}

fn origin(entry: &str) -> Origin {
    Origin {
        source: Arc::from("test"),
        line: 0,
        entry: entry.into(),
    }
}

/// Static allow-list entries for one test case.
#[derive(Clone, Copy)]
struct Lists {
    clients: &'static [&'static str],
    recipients: &'static [&'static str],
    senders: &'static [&'static str],
}

/// The default installation: only postmaster@ and abuse@ are allowed.
const DEFAULTS: Lists = Lists {
    clients: &[],
    recipients: DEFAULT_RECIPIENTS,
    senders: &[],
};

impl Lists {
    fn clients(clients: &'static [&'static str]) -> Lists {
        Lists {
            clients,
            ..DEFAULTS
        }
    }
    fn recipients(recipients: &'static [&'static str]) -> Lists {
        Lists {
            recipients,
            ..DEFAULTS
        }
    }
    fn senders(senders: &'static [&'static str]) -> Lists {
        Lists {
            senders,
            ..DEFAULTS
        }
    }

    fn build(self) -> AllowLists {
        let mut a = AllowLists::default();
        for c in self.clients {
            a.add_client(c, origin(c)).expect("client entry");
        }
        for r in self.recipients {
            a.add_recipient(r, origin(r)).expect("recipient entry");
        }
        for s in self.senders {
            a.add_sender(s, origin(s)).expect("sender entry");
        }
        a
    }
}

fn engine_with(policy: Policy, lists: Lists) -> Engine {
    Engine::new(policy, lists.build())
}

fn engine() -> Engine {
    engine_with(Policy::default(), DEFAULTS)
}

/// A plain RCPT-stage request from an unauthenticated client without a verified name.
fn rcpt(client: &str, sender: &str, recipient: &str) -> Request {
    Request {
        stage: "RCPT".into(),
        client_ip: Some(ip(client)),
        client_name: "unknown".into(),
        helo: "mx.sender.example".into(),
        sender: sender.into(),
        recipient: recipient.into(),
        sasl_username: String::new(),
        reverse_client_name: "unknown".into(),
        facts: None,
        tls: false,
    }
}

fn base_request() -> Request {
    rcpt("198.51.100.10", "alice@sender.example", "bob@rcpt.example")
}

fn pending(first_seen: u64, attempts: u32) -> Triplet {
    Triplet {
        first_seen,
        last_seen: first_seen,
        expires_at: first_seen + Policy::default().retry_window,
        attempts,
        passes: 0,
        passed: false,
    }
}

fn passed(first_seen: u64, last_seen: u64) -> Triplet {
    Triplet {
        first_seen,
        last_seen,
        expires_at: last_seen + Policy::default().max_age,
        attempts: 1,
        passes: 1,
        passed: true,
    }
}

fn client_rec(passes: u32, last_seen: u64) -> ClientRecord {
    ClientRecord {
        passes,
        last_counted: last_seen,
        last_seen,
        expires_at: last_seen + Policy::default().auto_allow_lifetime,
    }
}

fn state(client: Option<ClientRecord>, triplet: Option<Triplet>) -> State {
    State {
        client,
        triplet,
        new_triplets: None,
    }
}

const NO_STATE: State = State {
    client: None,
    triplet: None,
    new_triplets: None,
};

// ---------------------------------------------------------------------------------------
// 1. Rules and their order
// ---------------------------------------------------------------------------------------

struct RuleCase {
    name: &'static str,
    tweak: fn(&mut Request),
    lists: Lists,
    state: State,
    verdict: Verdict,
    rule: Rule,
}

fn same(_: &mut Request) {}

#[test]
fn every_rule_decides_in_spec_order() {
    use Rule::*;
    use Verdict::{Defer, Pass, Skip};
    let auto_allowed = Some(client_rec(5, T - 60));
    let early = Some(pending(T - 100, 1));
    #[rustfmt::skip]
    let cases = [
        // Rule 1: only the RCPT stage is greylisted, in any letter case.
        RuleCase { name: "RCPT is greylisted", tweak: same, lists: DEFAULTS, state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "lower-case rcpt is RCPT", tweak: |r| r.stage = "rcpt".into(), lists: DEFAULTS, state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "mixed-case Rcpt is RCPT", tweak: |r| r.stage = "Rcpt".into(), lists: DEFAULTS, state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "DATA is skipped", tweak: |r| r.stage = "DATA".into(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "END-OF-MESSAGE is skipped", tweak: |r| r.stage = "END-OF-MESSAGE".into(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "MAIL is skipped", tweak: |r| r.stage = "MAIL".into(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "empty stage is skipped", tweak: |r| r.stage.clear(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "RCPTX is not RCPT", tweak: |r| r.stage = "RCPTX".into(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "stage beats authentication", tweak: |r| { r.stage = "DATA".into(); r.sasl_username = "alice".into() }, lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "stage beats client allow list", tweak: |r| r.stage = "DATA".into(), lists: Lists::clients(&["198.51.100.0/24"]), state: NO_STATE, verdict: Skip, rule: NotRcptStage },
        RuleCase { name: "stage beats a passed triplet", tweak: |r| r.stage = "DATA".into(), lists: DEFAULTS, state: state(None, Some(passed(T - DAY, T - 60))), verdict: Skip, rule: NotRcptStage },
        // Rule 2: SASL.
        RuleCase { name: "authenticated client skips", tweak: |r| r.sasl_username = "alice".into(), lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: Authenticated },
        RuleCase { name: "SASL beats client allow list", tweak: |r| r.sasl_username = "alice".into(), lists: Lists::clients(&["198.51.100.10"]), state: NO_STATE, verdict: Skip, rule: Authenticated },
        RuleCase { name: "SASL beats recipient allow list", tweak: |r| { r.sasl_username = "alice".into(); r.recipient = "postmaster@rcpt.example".into() }, lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: Authenticated },
        RuleCase { name: "SASL beats a missing client address", tweak: |r| { r.sasl_username = "alice".into(); r.client_ip = None }, lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: Authenticated },
        RuleCase { name: "SASL beats a pending triplet", tweak: |r| r.sasl_username = "alice".into(), lists: DEFAULTS, state: state(None, early), verdict: Skip, rule: Authenticated },
        // No client address: nothing to key on.
        RuleCase { name: "no client address skips", tweak: |r| r.client_ip = None, lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NoClientAddress },
        RuleCase { name: "no client address is decided before allow lists", tweak: |r| { r.client_ip = None; r.recipient = "postmaster@rcpt.example".into() }, lists: DEFAULTS, state: NO_STATE, verdict: Skip, rule: NoClientAddress },
        // Rule 3a: client address.
        RuleCase { name: "client in IPv4 CIDR", tweak: same, lists: Lists::clients(&["198.51.100.0/24"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        RuleCase { name: "client equals a single IPv4 entry", tweak: same, lists: Lists::clients(&["198.51.100.10"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        RuleCase { name: "neighbour of a single IPv4 entry is greylisted", tweak: |r| r.client_ip = Some(ip("198.51.100.11")), lists: Lists::clients(&["198.51.100.10"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "client outside IPv4 CIDR is greylisted", tweak: |r| r.client_ip = Some(ip("198.51.101.10")), lists: Lists::clients(&["198.51.100.0/24"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "client in IPv6 network", tweak: |r| r.client_ip = Some(ip("2001:db8:1:2::25")), lists: Lists::clients(&["2001:db8:1::/48"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        RuleCase { name: "client outside IPv6 network is greylisted", tweak: |r| r.client_ip = Some(ip("2001:db8:2::25")), lists: Lists::clients(&["2001:db8:1::/48"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "IPv4-mapped client matches IPv4 CIDR", tweak: |r| r.client_ip = Some(ip("::ffff:198.51.100.10")), lists: Lists::clients(&["198.51.100.0/24"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        RuleCase { name: "IPv4 client matches IPv4-mapped single entry", tweak: same, lists: Lists::clients(&["::ffff:198.51.100.10"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        // Rule 3b: client host name.
        RuleCase { name: "exact client name, any case", tweak: |r| r.client_name = "MX1.Sender.Example".into(), lists: Lists::clients(&["mx1.sender.example"]), state: NO_STATE, verdict: Pass, rule: AllowClientName },
        RuleCase { name: "exact client name does not match a subdomain", tweak: |r| r.client_name = "a.mx1.sender.example".into(), lists: Lists::clients(&["mx1.sender.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: ".suffix matches a subdomain", tweak: |r| r.client_name = "out-7.mail.sender.example".into(), lists: Lists::clients(&[".sender.example"]), state: NO_STATE, verdict: Pass, rule: AllowClientName },
        RuleCase { name: ".suffix does not match the bare domain", tweak: |r| r.client_name = "sender.example".into(), lists: Lists::clients(&[".sender.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: ".suffix does not match a lookalike", tweak: |r| r.client_name = "evilsender.example".into(), lists: Lists::clients(&[".sender.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "/regex/ matches", tweak: |r| r.client_name = "mail-abc12.outbound.example".into(), lists: Lists::clients(&[r"/^mail-[a-z]+\d*\.outbound\.example$/"]), state: NO_STATE, verdict: Pass, rule: AllowClientName },
        RuleCase { name: "/regex/ does not match", tweak: |r| r.client_name = "smtp.outbound.example".into(), lists: Lists::clients(&[r"/^mail-[a-z]+\d*\.outbound\.example$/"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "unknown never matches a catch-all regex", tweak: same, lists: Lists::clients(&["/.*/"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "unknown never matches an entry named unknown", tweak: |r| r.client_name = "UNKNOWN".into(), lists: Lists::clients(&["unknown"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "empty name never matches a catch-all regex", tweak: |r| r.client_name.clear(), lists: Lists::clients(&["/.*/"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "client address beats client name", tweak: |r| r.client_name = "mx1.sender.example".into(), lists: Lists::clients(&["mx1.sender.example", "198.51.100.0/24"]), state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        // Rule 3c: recipient.
        RuleCase { name: "recipient user@domain, case and +ext ignored", tweak: |r| r.recipient = "Bob+Folder@RCPT.example".into(), lists: Lists::recipients(&["bob@rcpt.example"]), state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "recipient user@domain needs the same user", tweak: |r| r.recipient = "carol@rcpt.example".into(), lists: Lists::recipients(&["bob@rcpt.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "recipient @domain", tweak: same, lists: Lists::recipients(&["@rcpt.example"]), state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "recipient @domain does not cover subdomains", tweak: |r| r.recipient = "bob@sub.rcpt.example".into(), lists: Lists::recipients(&["@rcpt.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "recipient user@ in any domain", tweak: |r| r.recipient = "sales@elsewhere.example".into(), lists: Lists::recipients(&["sales@"]), state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "default postmaster@", tweak: |r| r.recipient = "postmaster@rcpt.example".into(), lists: DEFAULTS, state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "default postmaster@ with case, +ext, brackets", tweak: |r| r.recipient = "<PostMaster+x@Rcpt.Example>".into(), lists: DEFAULTS, state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "default abuse@", tweak: |r| r.recipient = "abuse@other.example".into(), lists: DEFAULTS, state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "postmaster as sender is not allowed", tweak: |r| r.sender = "postmaster@sender.example".into(), lists: DEFAULTS, state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "client allow beats recipient allow", tweak: |r| r.recipient = "postmaster@rcpt.example".into(), lists: Lists { clients: &["198.51.100.0/24"], ..DEFAULTS }, state: NO_STATE, verdict: Pass, rule: AllowClientAddress },
        // Rule 3d: sender.
        RuleCase { name: "sender @domain, case and +ext ignored", tweak: |r| r.sender = "Newsletter+x@Partner.Example".into(), lists: Lists::senders(&["@partner.example"]), state: NO_STATE, verdict: Pass, rule: AllowSender },
        RuleCase { name: "sender user@domain", tweak: |r| r.sender = "alice@sender.example".into(), lists: Lists::senders(&["alice@sender.example"]), state: NO_STATE, verdict: Pass, rule: AllowSender },
        RuleCase { name: "SRS-forwarded sender matches its original", tweak: |r| r.sender = "SRS0=HHH=TT=partner.example=bob@fwd.example".into(), lists: Lists::senders(&["@partner.example"]), state: NO_STATE, verdict: Pass, rule: AllowSender },
        RuleCase { name: "sender entry does not allow a recipient", tweak: |r| r.recipient = "alice@sender.example".into(), lists: Lists::senders(&["bob@rcpt.example"]), state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "recipient allow beats sender allow", tweak: |r| r.recipient = "postmaster@rcpt.example".into(), lists: Lists { senders: &["@sender.example"], ..DEFAULTS }, state: NO_STATE, verdict: Pass, rule: AllowRecipient },
        // Rule 4: auto-allow.
        RuleCase { name: "auto-allowed client group", tweak: same, lists: DEFAULTS, state: state(auto_allowed, None), verdict: Pass, rule: AutoAllow },
        RuleCase { name: "auto-allow from another host of the group", tweak: |r| r.client_ip = Some(ip("198.51.100.250")), lists: DEFAULTS, state: state(auto_allowed, None), verdict: Pass, rule: AutoAllow },
        RuleCase { name: "auto-allow beats an early retry", tweak: same, lists: DEFAULTS, state: state(auto_allowed, early), verdict: Pass, rule: AutoAllow },
        RuleCase { name: "static allow beats auto-allow", tweak: |r| r.recipient = "abuse@rcpt.example".into(), lists: DEFAULTS, state: state(auto_allowed, None), verdict: Pass, rule: AllowRecipient },
        RuleCase { name: "SASL beats auto-allow", tweak: |r| r.sasl_username = "alice".into(), lists: DEFAULTS, state: state(auto_allowed, None), verdict: Skip, rule: Authenticated },
        RuleCase { name: "too few passes is not auto-allowed", tweak: same, lists: DEFAULTS, state: state(Some(client_rec(4, T - 60)), None), verdict: Defer, rule: New },
        // Rule 5: the triplet.
        RuleCase { name: "unknown triplet", tweak: same, lists: DEFAULTS, state: NO_STATE, verdict: Defer, rule: New },
        RuleCase { name: "retry before the delay", tweak: same, lists: DEFAULTS, state: state(None, early), verdict: Defer, rule: EarlyRetry },
        RuleCase { name: "retry after the delay", tweak: same, lists: DEFAULTS, state: state(None, Some(pending(T - 600, 2))), verdict: Pass, rule: Delayed },
        RuleCase { name: "passed triplet", tweak: same, lists: DEFAULTS, state: state(None, Some(passed(T - 10 * DAY, T - DAY))), verdict: Pass, rule: Known },
    ];
    for case in &cases {
        let engine = engine_with(Policy::default(), case.lists);
        let mut req = base_request();
        (case.tweak)(&mut req);
        let (d, _) = engine.decide(&req, &case.state, T);
        assert_eq!(
            (d.verdict, d.rule),
            (case.verdict, case.rule),
            "case {:?}: {d:?}",
            case.name
        );
    }
}

#[test]
fn allow_decisions_name_the_entry_that_matched() {
    let lists = Lists {
        clients: &["198.51.100.0/24", ".sender.example"],
        recipients: &["@rcpt.example"],
        senders: &["@partner.example"],
    };
    let engine = engine_with(Policy::default(), lists);
    let cases: [(Request, Rule, &str); 4] = [
        (base_request(), Rule::AllowClientAddress, "198.51.100.0/24"),
        (
            Request {
                client_name: "mx.sender.example".into(),
                ..rcpt("203.0.113.1", "x@y.example", "z@z.example")
            },
            Rule::AllowClientName,
            ".sender.example",
        ),
        (
            rcpt("203.0.113.1", "x@y.example", "bob@rcpt.example"),
            Rule::AllowRecipient,
            "@rcpt.example",
        ),
        (
            rcpt("203.0.113.1", "x@partner.example", "z@z.example"),
            Rule::AllowSender,
            "@partner.example",
        ),
    ];
    for (req, rule, entry) in cases {
        let Classified::Decided(d) = engine.classify(&req, 0) else {
            panic!("{req:?} was not decided by an allow list");
        };
        assert_eq!(d.rule, rule, "{req:?}");
        let detail = d.detail.expect("allow decisions carry a detail");
        assert!(detail.contains(entry), "{rule}: {detail:?} lacks {entry:?}");
    }
}

#[test]
fn decisions_without_the_store_leave_the_state_untouched() {
    let engine = engine();
    let prior = state(Some(client_rec(2, T - HOUR)), Some(pending(T - 100, 1)));
    let requests = [
        Request {
            stage: "DATA".into(),
            ..base_request()
        },
        Request {
            sasl_username: "alice".into(),
            ..base_request()
        },
        Request {
            client_ip: None,
            ..base_request()
        },
        rcpt(
            "198.51.100.10",
            "alice@sender.example",
            "postmaster@x.example",
        ),
    ];
    for req in requests {
        let (d, next) = engine.decide(&req, &prior, T);
        assert_ne!(d.verdict, Verdict::Defer, "{req:?}");
        assert_eq!(next, prior, "{req:?} changed the state");
        assert_eq!(d.key, None, "{req:?} has no key");
    }
}

#[test]
fn classify_yields_the_key_when_the_store_must_decide() {
    let engine = engine();
    let req = rcpt("192.0.2.77", "Alice+x@Sender.Example", "<Bob@Rcpt.Example>");
    let want = TripletKey {
        client: "192.0.2.0/24".into(),
        sender: "alice@sender.example".into(),
        recipient: "bob@rcpt.example".into(),
    };
    let no_facts = IdentityReason {
        kind: IdentityKind::Prefix,
        reason: "IP prefix: no DNS facts".into(),
    };
    let configured = Delay {
        seconds: 300,
        reason: DelayReason::Configured,
    };
    assert_eq!(
        engine.classify(&req, 0),
        Classified::Lookup(Lookup {
            key: want.clone(),
            delay: configured,
            identity: no_facts.clone(),
            detail: None,
            domain: None,
        })
    );
    let (d, next) = engine.decide(&req, &NO_STATE, T);
    assert_eq!(d.key, Some(want));
    assert_eq!(d.remaining, Some(300));
    assert_eq!(
        next.triplet,
        Some(Triplet {
            first_seen: T,
            last_seen: T,
            expires_at: T + 2 * DAY,
            attempts: 1,
            passes: 0,
            passed: false,
        })
    );
}

// ---------------------------------------------------------------------------------------
// 2. Normalisation through Engine::key
// ---------------------------------------------------------------------------------------

/// (client IP, sender, recipient)
type Side = (&'static str, &'static str, &'static str);

/// Adjusts the default policy for one test case.
type PolicyTweak = fn(&mut Policy);

struct KeyCase {
    name: &'static str,
    policy: PolicyTweak,
    a: Side,
    b: Side,
    same_key: bool,
}

fn defaults(_: &mut Policy) {}
fn exact_hosts(p: &mut Policy) {
    p.ipv4_prefix = 32;
    p.ipv6_prefix = 128;
}
fn v4_16(p: &mut Policy) {
    p.ipv4_prefix = 16;
}
fn plus_and_minus(p: &mut Policy) {
    p.recipient_delimiter = "+-".into();
}

const IP: &str = "192.0.2.1";
const RCPT: &str = "bob@rcpt.example";
const SENDER: &str = "alice@sender.example";

#[test]
fn key_normalisation_follows_spec() {
    #[rustfmt::skip]
    let cases = [
        // Sender.
        KeyCase { name: "sender case and +extension", policy: defaults, a: (IP, "Bounce+X@Example.NET", RCPT), b: (IP, "bounce@example.net", RCPT), same_key: true },
        KeyCase { name: "sender angle brackets and spaces", policy: defaults, a: (IP, " <Alice@Sender.Example> ", RCPT), b: (IP, SENDER, RCPT), same_key: true },
        KeyCase { name: "different senders differ", policy: defaults, a: (IP, "alice@sender.example", RCPT), b: (IP, "alicia@sender.example", RCPT), same_key: false },
        KeyCase { name: "same user, other domain differs", policy: defaults, a: (IP, "alice@sender.example", RCPT), b: (IP, "alice@sender.example.net", RCPT), same_key: false },
        KeyCase { name: "BATV prvs=TAG=user", policy: defaults, a: (IP, "prvs=1234abcdef=user@d.example", RCPT), b: (IP, "user@d.example", RCPT), same_key: true },
        KeyCase { name: "BATV prvs=user=TAG", policy: defaults, a: (IP, "prvs=user=1234abcdef@d.example", RCPT), b: (IP, "user@d.example", RCPT), same_key: true },
        KeyCase { name: "BATV tags change per message", policy: defaults, a: (IP, "prvs=0111aaaaaa=user@d.example", RCPT), b: (IP, "PRVS=0222bbbbbb=User@D.Example", RCPT), same_key: true },
        KeyCase { name: "BATV of different users differ", policy: defaults, a: (IP, "prvs=1234abcdef=ann@d.example", RCPT), b: (IP, "prvs=1234abcdef=bob@d.example", RCPT), same_key: false },
        KeyCase { name: "SRS0 keys like the original", policy: defaults, a: (IP, "SRS0=HHH=TT=example.org=john@forwarder.net", RCPT), b: (IP, "john@example.org", RCPT), same_key: true },
        KeyCase { name: "SRS0 with another hash and time", policy: defaults, a: (IP, "SRS0=abcd=T1=example.org=john@forwarder.net", RCPT), b: (IP, "srs0=wxyz=Q9=example.org=john@forwarder.net", RCPT), same_key: true },
        KeyCase { name: "SRS1 keys like the original", policy: defaults, a: (IP, "SRS1=XXX=fw1.example==HHH=TT=example.org=john@fw2.example", RCPT), b: (IP, "john@example.org", RCPT), same_key: true },
        KeyCase { name: "SRS0 of different originals differ", policy: defaults, a: (IP, "SRS0=HHH=TT=example.org=john@fw.example", RCPT), b: (IP, "SRS0=HHH=TT=example.com=john@fw.example", RCPT), same_key: false },
        KeyCase { name: "VERP digit runs", policy: defaults, a: (IP, "list-12345@x.example", RCPT), b: (IP, "list-999@x.example", RCPT), same_key: true },
        KeyCase { name: "VERP keeps the list name", policy: defaults, a: (IP, "list-12345@x.example", RCPT), b: (IP, "other-12345@x.example", RCPT), same_key: false },
        KeyCase { name: "null sender: empty and <>", policy: defaults, a: (IP, "", RCPT), b: (IP, "<>", RCPT), same_key: true },
        KeyCase { name: "null sender is not MAILER-DAEMON", policy: defaults, a: (IP, "", RCPT), b: (IP, "MAILER-DAEMON@sender.example", RCPT), same_key: false },
        KeyCase { name: "null sender is not postmaster", policy: defaults, a: (IP, "<>", RCPT), b: (IP, "postmaster@sender.example", RCPT), same_key: false },
        KeyCase { name: "null sender is not a bare local part", policy: defaults, a: (IP, "<>", RCPT), b: (IP, "mailer-daemon", RCPT), same_key: false },
        KeyCase { name: "configured delimiters strip -ext too", policy: plus_and_minus, a: (IP, "alice-news@sender.example", RCPT), b: (IP, SENDER, RCPT), same_key: true },
        KeyCase { name: "default delimiter keeps -ext", policy: defaults, a: (IP, "alice-news@sender.example", RCPT), b: (IP, SENDER, RCPT), same_key: false },
        // Recipient.
        KeyCase { name: "recipient case and +extension", policy: defaults, a: (IP, SENDER, "Bob+Folder@RCPT.Example"), b: (IP, SENDER, RCPT), same_key: true },
        KeyCase { name: "recipient angle brackets", policy: defaults, a: (IP, SENDER, "<bob@rcpt.example>"), b: (IP, SENDER, RCPT), same_key: true },
        KeyCase { name: "recipient digits are not VERP", policy: defaults, a: (IP, SENDER, "user-1@rcpt.example"), b: (IP, SENDER, "user-2@rcpt.example"), same_key: false },
        KeyCase { name: "recipient is not BATV-unwrapped", policy: defaults, a: (IP, SENDER, "prvs=1234abcdef=bob@rcpt.example"), b: (IP, SENDER, RCPT), same_key: false },
        KeyCase { name: "sender and recipient are not interchangeable", policy: defaults, a: (IP, "x@a.example", "y@b.example"), b: (IP, "y@b.example", "x@a.example"), same_key: false },
        // Client group.
        KeyCase { name: "IPv4 /24 groups a network", policy: defaults, a: ("192.0.2.1", SENDER, RCPT), b: ("192.0.2.254", SENDER, RCPT), same_key: true },
        KeyCase { name: "IPv4 /24 separates the next network", policy: defaults, a: ("192.0.2.1", SENDER, RCPT), b: ("192.0.3.1", SENDER, RCPT), same_key: false },
        KeyCase { name: "IPv6 /64 groups a network", policy: defaults, a: ("2001:db8:1:2::1", SENDER, RCPT), b: ("2001:db8:1:2:ffff:ffff:ffff:ffff", SENDER, RCPT), same_key: true },
        KeyCase { name: "IPv6 /64 separates the next network", policy: defaults, a: ("2001:db8:1:2::1", SENDER, RCPT), b: ("2001:db8:1:3::1", SENDER, RCPT), same_key: false },
        KeyCase { name: "IPv4-mapped IPv6 is IPv4", policy: defaults, a: ("::ffff:192.0.2.7", SENDER, RCPT), b: ("192.0.2.200", SENDER, RCPT), same_key: true },
        KeyCase { name: "IPv4-compatible IPv6 is not IPv4", policy: defaults, a: ("::192.0.2.7", SENDER, RCPT), b: ("192.0.2.7", SENDER, RCPT), same_key: false },
        KeyCase { name: "/32 means exact host", policy: exact_hosts, a: ("192.0.2.1", SENDER, RCPT), b: ("192.0.2.2", SENDER, RCPT), same_key: false },
        KeyCase { name: "/32 same host", policy: exact_hosts, a: ("192.0.2.1", SENDER, RCPT), b: ("::ffff:192.0.2.1", SENDER, RCPT), same_key: true },
        KeyCase { name: "/128 means exact host", policy: exact_hosts, a: ("2001:db8::1", SENDER, RCPT), b: ("2001:db8::2", SENDER, RCPT), same_key: false },
        KeyCase { name: "/128 same host, other spelling", policy: exact_hosts, a: ("2001:db8::1", SENDER, RCPT), b: ("2001:0db8:0:0:0:0:0:1", SENDER, RCPT), same_key: true },
        KeyCase { name: "/16 groups across /24s", policy: v4_16, a: ("192.0.2.1", SENDER, RCPT), b: ("192.0.200.1", SENDER, RCPT), same_key: true },
        KeyCase { name: "/16 separates the next /16", policy: v4_16, a: ("192.0.2.1", SENDER, RCPT), b: ("192.1.2.1", SENDER, RCPT), same_key: false },
    ];
    for case in &cases {
        let mut policy = Policy::default();
        (case.policy)(&mut policy);
        let engine = engine_with(policy, DEFAULTS);
        let key = |(client, sender, recipient): Side| engine.key(ip(client), sender, recipient);
        let (a, b) = (key(case.a), key(case.b));
        assert_eq!(
            a == b,
            case.same_key,
            "case {:?}: {a:?} vs {b:?}",
            case.name
        );
    }
}

#[test]
fn client_group_renders_network_or_exact_host() {
    #[rustfmt::skip]
    let cases: [(PolicyTweak, &str, &str); 6] = [
        (defaults, "192.0.2.77", "192.0.2.0/24"),
        (defaults, "::ffff:192.0.2.77", "192.0.2.0/24"),
        (defaults, "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        (exact_hosts, "192.0.2.77", "192.0.2.77"),
        (exact_hosts, "2001:db8::25", "2001:db8::25"),
        (v4_16, "192.0.2.77", "192.0.0.0/16"),
    ];
    for (tweak, client, want) in cases {
        let mut policy = Policy::default();
        tweak(&mut policy);
        let engine = engine_with(policy, DEFAULTS);
        assert_eq!(
            engine.key(ip(client), SENDER, RCPT).client,
            want,
            "{client}"
        );
    }
}

#[test]
fn null_sender_key_is_its_own_value() {
    let engine = engine();
    for sender in ["", "<>", " <> "] {
        assert_eq!(engine.key(ip(IP), sender, RCPT).sender, "<>", "{sender:?}");
    }
}

#[test]
fn triplet_key_joins_and_splits() {
    let key = engine().key(ip(IP), "Alice@Sender.Example", RCPT);
    assert_eq!(TripletKey::split(&key.joined()), Some(key.clone()));
    assert_eq!(
        key.to_string(),
        "192.0.2.0/24 / alice@sender.example / bob@rcpt.example"
    );
    assert_eq!(TripletKey::split("only-one-part"), None);
}

// ---------------------------------------------------------------------------------------
// 3. Boundaries
// ---------------------------------------------------------------------------------------

struct Boundary {
    name: &'static str,
    policy: PolicyTweak,
    state: State,
    now: u64,
    verdict: Verdict,
    rule: Rule,
    remaining: Option<u64>,
    delayed: Option<u64>,
}

fn no_auto_allow(p: &mut Policy) {
    p.auto_allow_after = 0;
}

#[test]
fn time_boundaries_decide_as_spec_says() {
    use Rule::*;
    use Verdict::{Defer, Pass};
    let p = Policy::default();
    let (delay, window, max_age, life) =
        (p.delay, p.retry_window, p.max_age, p.auto_allow_lifetime);
    let first = Some(pending(T, 1));
    let done = Some(passed(T - DAY, T));
    #[rustfmt::skip]
    let cases = [
        Boundary { name: "retry in the same second", policy: defaults, state: state(None, first), now: T, verdict: Defer, rule: EarlyRetry, remaining: Some(delay), delayed: None },
        Boundary { name: "retry at delay-1", policy: defaults, state: state(None, first), now: T + delay - 1, verdict: Defer, rule: EarlyRetry, remaining: Some(1), delayed: None },
        Boundary { name: "retry at exactly delay", policy: defaults, state: state(None, first), now: T + delay, verdict: Pass, rule: Delayed, remaining: None, delayed: Some(delay) },
        Boundary { name: "retry at exactly retry_window", policy: defaults, state: state(None, first), now: T + window, verdict: Pass, rule: Delayed, remaining: None, delayed: Some(window) },
        Boundary { name: "retry at retry_window+1 starts over", policy: defaults, state: state(None, first), now: T + window + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
        Boundary { name: "window counts from first sighting, not last retry", policy: defaults, state: state(None, Some(Triplet { last_seen: T + delay - 1, attempts: 5, ..pending(T, 1) })), now: T + window + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
        Boundary { name: "clock skew: now before first_seen never passes", policy: defaults, state: state(None, first), now: T - 10 * delay, verdict: Defer, rule: EarlyRetry, remaining: Some(delay), delayed: None },
        Boundary { name: "passed, seen at exactly max_age", policy: defaults, state: state(None, done), now: T + max_age, verdict: Pass, rule: Known, remaining: None, delayed: None },
        Boundary { name: "passed, seen at max_age+1 starts over", policy: defaults, state: state(None, done), now: T + max_age + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
        Boundary { name: "max_age counts from last_seen, not first_seen", policy: defaults, state: state(None, Some(passed(T - 10 * max_age, T))), now: T + max_age, verdict: Pass, rule: Known, remaining: None, delayed: None },
        Boundary { name: "auto-allow at exactly the threshold", policy: defaults, state: state(Some(client_rec(5, T)), None), now: T + 1, verdict: Pass, rule: AutoAllow, remaining: None, delayed: None },
        Boundary { name: "auto-allow above the threshold", policy: defaults, state: state(Some(client_rec(50, T)), None), now: T + 1, verdict: Pass, rule: AutoAllow, remaining: None, delayed: None },
        Boundary { name: "one pass short of auto-allow", policy: defaults, state: state(Some(client_rec(4, T)), None), now: T + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
        Boundary { name: "auto-allow at exactly its lifetime", policy: defaults, state: state(Some(client_rec(5, T)), None), now: T + life, verdict: Pass, rule: AutoAllow, remaining: None, delayed: None },
        Boundary { name: "auto-allow at lifetime+1 is gone", policy: defaults, state: state(Some(client_rec(5, T)), None), now: T + life + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
        Boundary { name: "auto_allow_after = 0 disables auto-allow", policy: no_auto_allow, state: state(Some(client_rec(1_000, T)), None), now: T + 1, verdict: Defer, rule: New, remaining: Some(delay), delayed: None },
    ];
    for case in &cases {
        let mut policy = Policy::default();
        (case.policy)(&mut policy);
        let engine = engine_with(policy, DEFAULTS);
        let (d, _) = engine.decide(&base_request(), &case.state, case.now);
        assert_eq!(
            (d.verdict, d.rule, d.remaining, d.delayed),
            (case.verdict, case.rule, case.remaining, case.delayed),
            "case {:?}",
            case.name
        );
    }
}

#[test]
fn early_retries_keep_first_seen_and_count_attempts() {
    let engine = engine();
    let req = base_request();
    let (d, mut st) = engine.decide(&req, &NO_STATE, T);
    assert_eq!((d.rule, d.remaining), (Rule::New, Some(300)));
    for (offset, remaining, attempts) in [(100, 200, 2), (200, 100, 3), (299, 1, 4)] {
        let (d, next) = engine.decide(&req, &st, T + offset);
        assert_eq!((d.rule, d.remaining), (Rule::EarlyRetry, Some(remaining)));
        let t = next.triplet.expect("record kept");
        assert_eq!((t.first_seen, t.attempts), (T, attempts), "at +{offset}");
        assert_eq!(t.last_seen, T + offset);
        assert!(!t.passed);
        st = next;
    }
    let (d, next) = engine.decide(&req, &st, T + 300);
    assert_eq!((d.rule, d.delayed), (Rule::Delayed, Some(300)));
    assert_eq!(
        d.record, st.triplet,
        "the decision shows the record before it"
    );
    let t = next.triplet.expect("record kept");
    assert!(t.passed);
    assert_eq!((t.first_seen, t.attempts, t.passes), (T, 4, 1));
    assert_eq!(t.expires_at, T + 300 + engine.policy.max_age);
}

#[test]
fn expired_record_is_replaced_by_a_fresh_one() {
    let engine = engine();
    let now = T + engine.policy.retry_window + 1;
    let old = Triplet {
        attempts: 7,
        ..pending(T, 7)
    };
    let (d, next) = engine.decide(&base_request(), &state(None, Some(old)), now);
    assert_eq!(d.rule, Rule::New);
    assert_eq!(d.record, Some(old));
    let t = next.triplet.expect("fresh record");
    assert_eq!(
        (t.first_seen, t.last_seen, t.attempts, t.passes, t.passed),
        (now, now, 1, 0, false)
    );
    assert_eq!(t.expires_at, now + engine.policy.retry_window);

    let stale = passed(T - DAY, T);
    let now = T + engine.policy.max_age + 1;
    let (outcome, t) = engine.triplet_step(Some(&stale), now, engine.policy.delay);
    assert_eq!(outcome, TripletOutcome::New);
    assert_eq!((t.first_seen, t.passed), (now, false));
}

#[test]
fn known_refreshes_last_seen_so_monthly_mail_lives_on() {
    let engine = engine();
    let req = base_request();
    let mut st = state(None, Some(passed(T - DAY, T)));
    for month in 1..=12 {
        let now = T + month * 30 * DAY;
        let (d, next) = engine.decide(&req, &st, now);
        assert_eq!(d.rule, Rule::Known, "month {month}");
        let t = next.triplet.expect("record kept");
        assert_eq!(t.last_seen, now);
        assert_eq!(t.expires_at, now + engine.policy.max_age);
        assert_eq!(t.passes, 1 + u32::try_from(month).expect("small"));
        // Only the triplet is threaded: monthly passes would auto-allow the group by month 6.
        st = state(None, next.triplet);
    }
    // The same record left alone for 36 days is forgotten.
    let last = st.triplet.expect("record").last_seen;
    let (d, _) = engine.decide(&req, &st, last + 36 * DAY);
    assert_eq!(d.rule, Rule::New);
}

#[test]
fn passes_count_once_per_hour_per_client_group() {
    let engine = engine();
    let life = engine.policy.auto_allow_lifetime;
    let first = engine.count_pass(None, T).expect("enabled");
    assert_eq!(
        first,
        ClientRecord {
            passes: 1,
            last_counted: T,
            last_seen: T,
            expires_at: T + life
        }
    );
    let same_hour = engine
        .count_pass(Some(&first), T + HOUR - 1)
        .expect("enabled");
    assert_eq!((same_hour.passes, same_hour.last_counted), (1, T), "t+3599");
    assert_eq!(same_hour.last_seen, T + HOUR - 1);
    assert_eq!(same_hour.expires_at, T + HOUR - 1 + life);
    let next_hour = engine
        .count_pass(Some(&same_hour), T + HOUR)
        .expect("enabled");
    assert_eq!(
        (next_hour.passes, next_hour.last_counted),
        (2, T + HOUR),
        "t+3600"
    );
    // A clock that went backwards counts nothing.
    let skewed = engine.count_pass(Some(&next_hour), T).expect("enabled");
    assert_eq!(skewed.passes, 2);
    // A record past its lifetime starts over.
    let dead = engine
        .count_pass(Some(&client_rec(40, T)), T + life + 1)
        .expect("enabled");
    assert_eq!((dead.passes, dead.last_counted), (1, T + life + 1));
}

#[test]
fn passes_in_one_hour_through_decide_count_once() {
    let engine = engine();
    let mut client = None;
    // Three different triplets of one /24, each already passed, used within one hour.
    for (i, offset) in [0, 1_800, HOUR - 1].into_iter().enumerate() {
        let req = rcpt(
            &format!("198.51.100.{}", i + 1),
            &format!("s{i}@sender.example"),
            RCPT,
        );
        let st = state(client, Some(passed(T - DAY, T - 60)));
        let (d, next) = engine.decide(&req, &st, T + offset);
        assert_eq!(d.rule, Rule::Known);
        client = next.client;
    }
    assert_eq!(client.map(|c| c.passes), Some(1));
    let (d, next) = engine.decide(
        &base_request(),
        &state(client, Some(passed(T - DAY, T))),
        T + HOUR,
    );
    assert_eq!(d.rule, Rule::Known);
    assert_eq!(next.client.map(|c| c.passes), Some(2));
}

#[test]
fn deferrals_do_not_count_towards_auto_allow() {
    let engine = engine();
    let prior = Some(client_rec(3, T - 2 * HOUR));
    for st in [state(prior, None), state(prior, Some(pending(T - 10, 1)))] {
        let (d, next) = engine.decide(&base_request(), &st, T);
        assert_eq!(d.verdict, Verdict::Defer);
        assert_eq!(next.client, prior);
    }
}

#[test]
fn auto_allow_can_be_disabled() {
    let engine = engine_with(
        Policy {
            auto_allow_after: 0,
            ..Policy::default()
        },
        DEFAULTS,
    );
    let huge = client_rec(u32::MAX, T);
    assert!(!engine.auto_allow_enabled());
    assert!(!engine.client_allowed(Some(&huge), T));
    assert_eq!(engine.count_pass(None, T), None);
    assert_eq!(engine.count_pass(Some(&huge), T + DAY), None);
    assert_eq!(engine.client_seen(Some(&huge), T), None);
    // A pass writes no client record at all.
    let (d, next) = engine.decide(&base_request(), &state(None, Some(passed(T, T))), T + 1);
    assert_eq!(d.rule, Rule::Known);
    assert_eq!(next.client, None);
}

#[test]
fn auto_allow_refreshes_the_group_but_not_its_count() {
    let engine = engine();
    let life = engine.policy.auto_allow_lifetime;
    let rec = client_rec(5, T);
    let now = T + life;
    let seen = engine.client_seen(Some(&rec), now).expect("allowed");
    assert_eq!(
        seen,
        ClientRecord {
            passes: 5,
            last_counted: T,
            last_seen: now,
            expires_at: now + life
        }
    );
    assert_eq!(engine.client_seen(Some(&client_rec(4, T)), T), None);
    assert_eq!(engine.client_seen(Some(&rec), T + life + 1), None);
    assert_eq!(engine.client_seen(None, T), None);

    // Through decide: the triplet store is not touched, the group stays allowed.
    let (d, next) = engine.decide(&base_request(), &state(Some(rec), None), now);
    assert_eq!(d.rule, Rule::AutoAllow);
    assert_eq!(d.client_record, Some(rec));
    assert_eq!(next, state(Some(seen), None));
    let (d, _) = engine.decide(&base_request(), &next, now + life);
    assert_eq!(d.rule, Rule::AutoAllow, "kept alive by use");
}

// ---------------------------------------------------------------------------------------
// 4. A scenario through a tiny in-memory store
// ---------------------------------------------------------------------------------------

/// What a store would hold, updated with the state `decide` returns.
#[derive(Default)]
struct MiniStore {
    triplets: HashMap<TripletKey, Triplet>,
    clients: HashMap<String, ClientRecord>,
}

impl MiniStore {
    fn check(&mut self, engine: &Engine, req: &Request, now: u64) -> Decision {
        let Some(client_ip) = req.client_ip else {
            return engine.decide(req, &State::default(), now).0;
        };
        let (key, _) =
            engine.identified_key(client_ip, &req.sender, &req.recipient, req.facts.as_ref());
        let before = State {
            client: self.clients.get(&key.client).copied(),
            triplet: self.triplets.get(&key).copied(),
            new_triplets: None,
        };
        let (d, after) = engine.decide(req, &before, now);
        if let Some(t) = after.triplet {
            self.triplets.insert(key.clone(), t);
        }
        if let Some(c) = after.client {
            self.clients.insert(key.client.clone(), c);
        }
        d
    }
}

#[test]
fn scenario_defer_retry_pass_then_auto_allow_the_group() {
    let engine = engine();
    let mut store = MiniStore::default();
    let verdict_rule = |d: &Decision| (d.verdict, d.rule);

    // One triplet: deferred, retried too early, passed, then known.
    let req = rcpt("203.0.113.5", "news@sender.example", "bob@rcpt.example");
    let d = store.check(&engine, &req, T);
    assert_eq!(verdict_rule(&d), (Verdict::Defer, Rule::New));
    let d = store.check(&engine, &req, T + 60);
    assert_eq!(
        (verdict_rule(&d), d.remaining),
        ((Verdict::Defer, Rule::EarlyRetry), Some(240))
    );
    let d = store.check(&engine, &req, T + 400);
    assert_eq!(
        (verdict_rule(&d), d.delayed),
        ((Verdict::Pass, Rule::Delayed), Some(400))
    );
    let d = store.check(&engine, &req, T + 500);
    assert_eq!(verdict_rule(&d), (Verdict::Pass, Rule::Known));
    let group = "203.0.113.0/24";
    assert_eq!(store.clients[group].passes, 1, "two passes in one hour");

    // Four more senders from other hosts of the /24, each passing in a later hour.
    for i in 1..=4u64 {
        let start = T + i * 2 * HOUR;
        let req = rcpt(
            &format!("203.0.113.{}", 10 + i),
            &format!("sender{i}@sender.example"),
            "carol@rcpt.example",
        );
        let d = store.check(&engine, &req, start);
        assert_eq!(verdict_rule(&d), (Verdict::Defer, Rule::New), "sender {i}");
        let d = store.check(&engine, &req, start + 300);
        assert_eq!(
            verdict_rule(&d),
            (Verdict::Pass, Rule::Delayed),
            "sender {i}"
        );
        assert_eq!(
            store.clients[group].passes,
            u32::try_from(i + 1).expect("small")
        );
        if i == 3 {
            // Four counted passes are not enough yet.
            let probe = rcpt("203.0.113.99", "probe@other.example", "dan@rcpt.example");
            let d = store.check(&engine, &probe, start + 301);
            assert_eq!(verdict_rule(&d), (Verdict::Defer, Rule::New));
        }
    }

    // A brand-new triplet from yet another host of the /24 passes on its first try...
    let fresh = rcpt(
        "203.0.113.200",
        "first@elsewhere.example",
        "erin@rcpt.example",
    );
    let now = T + 10 * 2 * HOUR;
    let d = store.check(&engine, &fresh, now);
    assert_eq!(verdict_rule(&d), (Verdict::Pass, Rule::AutoAllow));
    let fresh_key = engine.key(ip("203.0.113.200"), &fresh.sender, &fresh.recipient);
    assert!(
        !store.triplets.contains_key(&fresh_key),
        "auto-allow writes no triplet"
    );
    assert_eq!(store.clients[group].last_seen, now);
    // ...while the same mail from the neighbouring /24 is greylisted.
    let neighbour = rcpt(
        "203.0.114.200",
        "first@elsewhere.example",
        "erin@rcpt.example",
    );
    let d = store.check(&engine, &neighbour, now);
    assert_eq!(verdict_rule(&d), (Verdict::Defer, Rule::New));
}

// ---------------------------------------------------------------------------------------
// 5. Learn mode
// ---------------------------------------------------------------------------------------

#[test]
fn store_failure_decisions_follow_fail_mode() {
    let open = Decision::store_failure(true, "timeout".into());
    assert_eq!(
        (open.verdict, open.rule),
        (Verdict::Pass, Rule::StoreFailOpen)
    );
    let closed = Decision::store_failure(false, "timeout".into());
    assert_eq!(
        (closed.verdict, closed.rule),
        (Verdict::Defer, Rule::StoreFailClosed)
    );
    assert_eq!(closed.detail.as_deref(), Some("timeout"));
}

// ---------------------------------------------------------------------------------------
// 6. Properties over random request sequences
// ---------------------------------------------------------------------------------------

/// A small policy so short sequences reach every branch.
fn small_policy() -> Policy {
    Policy {
        delay: 300,
        retry_window: 3_000,
        max_age: 10_000,
        auto_allow_after: 3,
        auto_allow_lifetime: 20_000,
        ..Policy::default()
    }
}

const SENDERS: &[&str] = &["a@s.example", "b@s.example", "c@t.example"];
const RECIPIENTS: &[&str] = &["x@r.example", "y@r.example"];
/// Five hosts spread over three /24s.
const CLIENTS: &[&str] = &[
    "192.0.2.1",
    "192.0.2.77",
    "198.51.100.5",
    "198.51.100.6",
    "203.0.113.9",
];

/// One request: (sender, recipient, client) indices and the seconds since the previous one.
type Step = (usize, usize, usize, u64);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let advance = prop_oneof![
        8 => 0..=600u64,
        1 => 3_000..=3_100u64,  // just past retry_window
        1 => 10_000..=10_100u64, // just past max_age
    ];
    prop::collection::vec(
        (
            0..SENDERS.len(),
            0..RECIPIENTS.len(),
            0..CLIENTS.len(),
            advance,
        ),
        1..=200,
    )
}

/// Runs a sequence through `decide` like a store would, checks the properties, and returns
/// the rules that decided.
fn check_sequence(steps: &[Step]) -> Result<Vec<Rule>, TestCaseError> {
    let engine = engine_with(small_policy(), DEFAULTS);
    let delay = engine.policy.delay;
    let mut store = MiniStore::default();
    // Independent bookkeeping: earlier request times per key, passes per client group.
    let mut requests: HashMap<TripletKey, Vec<u64>> = HashMap::new();
    let mut pass_times: HashMap<String, Vec<u64>> = HashMap::new();
    // When the current greylisting round of each key began (its last `New`).
    let mut round_start: HashMap<TripletKey, u64> = HashMap::new();
    let mut rules = Vec::new();
    let mut now = T;
    for &(s, r, c, advance) in steps {
        now += advance;
        let req = rcpt(CLIENTS[c], SENDERS[s], RECIPIENTS[r]);
        let key = engine.key(ip(CLIENTS[c]), SENDERS[s], RECIPIENTS[r]);
        let d = store.check(&engine, &req, now);
        rules.push(d.rule);
        prop_assert_eq!(d.key.as_ref(), Some(&key));
        let earlier = requests.entry(key.clone()).or_default();
        match d.rule {
            Rule::Delayed | Rule::Known => {
                prop_assert_eq!(d.verdict, Verdict::Pass);
                prop_assert!(
                    earlier.iter().any(|&t| now - t >= delay),
                    "{:?} pass at {} without a request {}s before: {:?}",
                    d.rule,
                    now,
                    delay,
                    earlier
                );
                let started = round_start.get(&key).copied();
                prop_assert!(
                    started.is_some_and(|t| now - t >= delay),
                    "{:?} pass at {} in a round that began at {:?}",
                    d.rule,
                    now,
                    started
                );
                if let Some(by) = d.delayed {
                    prop_assert!(by >= delay, "delayed {} < {}", by, delay);
                    prop_assert!(by <= engine.policy.retry_window);
                }
                prop_assert_eq!(d.delayed.is_some(), d.rule == Rule::Delayed);
                pass_times.entry(key.client.clone()).or_default().push(now);
            }
            Rule::AutoAllow => {
                prop_assert_eq!(d.verdict, Verdict::Pass);
                let passes = pass_times.get(&key.client).map_or(&[][..], Vec::as_slice);
                let hourly = hour_separated(passes);
                prop_assert!(
                    hourly >= engine.policy.auto_allow_after as usize,
                    "auto-allow of {} after {} hour-separated passes: {:?}",
                    key.client,
                    hourly,
                    passes
                );
            }
            Rule::New | Rule::EarlyRetry => {
                if d.rule == Rule::New {
                    round_start.insert(key.clone(), now);
                }
                prop_assert_eq!(d.verdict, Verdict::Defer);
                let remaining = d.remaining.expect("defers say how long");
                prop_assert!((1..=delay).contains(&remaining));
            }
            other => return Err(TestCaseError::fail(format!("unexpected rule {other}"))),
        }
        earlier.push(now);
    }
    Ok(rules)
}

/// The most passes that could have counted when each counts only an hour after the last
/// counted one (earliest-first greedy gives the longest such chain).
fn hour_separated(times: &[u64]) -> usize {
    let mut last: Option<u64> = None;
    let mut n = 0;
    for &t in times {
        if last.is_none_or(|l| t - l >= HOUR) {
            n += 1;
            last = Some(t);
        }
    }
    n
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn passes_need_a_served_delay_and_auto_allow_needs_passes(steps in steps()) {
        check_sequence(&steps)?;
    }
}

/// Guards the property test against a generator that silently stops reaching a branch.
#[test]
fn random_sequences_reach_every_triplet_and_auto_allow_rule() {
    let mut runner = TestRunner::deterministic();
    let mut seen = Vec::new();
    for _ in 0..64 {
        let tree = steps().new_tree(&mut runner).expect("strategy");
        let rules = check_sequence(&tree.current()).expect("property holds");
        seen.extend(rules);
    }
    for rule in [
        Rule::New,
        Rule::EarlyRetry,
        Rule::Delayed,
        Rule::Known,
        Rule::AutoAllow,
    ] {
        assert!(seen.contains(&rule), "no sequence reached {rule}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Client identity and selective greylisting
// ---------------------------------------------------------------------------------------

const GMAIL_HOST: &str = "mail-sor-f41.google.com";

fn spf_pass(domain: &str) -> Option<SpfFact> {
    Some(SpfFact {
        domain: domain.into(),
        result: SpfResult::Pass,
    })
}

fn listing(hits: &[&str]) -> Listing {
    Listing {
        hits: hits.iter().map(|h| (*h).to_string()).collect(),
        complete: true,
    }
}

/// Facts that every lookup answered: SPF result, FCrDNS name, list hits.
fn facts(spf: Option<SpfFact>, name: HostName, dnswl: &[&str], dnsbl: &[&str]) -> IdentityFacts {
    IdentityFacts {
        spf,
        name,
        dnswl: listing(dnswl),
        dnsbl: listing(dnsbl),
    }
}

fn with_facts(mut req: Request, f: IdentityFacts) -> Request {
    req.facts = Some(f);
    req
}

fn selective_engine(selective: Selective) -> Engine {
    engine().with_selective(selective)
}

fn verified(treatment: VerifiedTreatment) -> Selective {
    Selective {
        verified: treatment,
        ..Selective::default()
    }
}

struct SelectiveCase {
    name: &'static str,
    selective: Selective,
    facts: Option<IdentityFacts>,
    verdict: Verdict,
    rule: Rule,
    client: &'static str,
    /// `remaining` of a first sighting (deferrals only).
    remaining: Option<u64>,
    detail: Option<&'static str>,
}

#[test]
fn dns_facts_choose_identity_rule_and_delay() {
    use Verdict::{Defer, Pass};
    let gmail = || HostName::Verified(GMAIL_HOST.into());
    let dnsbl_hour = Selective {
        dnsbl_delay: Some(3_600),
        ..Selective::default()
    };
    let incomplete = IdentityFacts {
        dnsbl: Listing {
            hits: vec![],
            complete: false,
        },
        ..facts(spf_pass("gmail.com"), gmail(), &[], &[])
    };
    #[rustfmt::skip]
    let cases = [
        SelectiveCase { name: "no facts: prefix, configured delay", selective: Selective::default(), facts: None, verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(300), detail: None },
        SelectiveCase { name: "SPF pass: spf identity, configured delay", selective: Selective::default(), facts: Some(facts(spf_pass("gmail.com"), gmail(), &[], &[])), verdict: Defer, rule: Rule::New, client: "spf:gmail.com", remaining: Some(300), detail: None },
        SelectiveCase { name: "FCrDNS: org identity", selective: Selective::default(), facts: Some(facts(None, gmail(), &[], &[])), verdict: Defer, rule: Rule::New, client: "org:google.com", remaining: Some(300), detail: None },
        SelectiveCase { name: "DNSWL listed: pass", selective: Selective::default(), facts: Some(facts(None, HostName::Unverified, &["list.dnswl.org"], &[])), verdict: Pass, rule: Rule::Dnswl, client: "209.85.220.0/24", remaining: None, detail: Some("listed by list.dnswl.org") },
        SelectiveCase { name: "DNSWL beats DNSBL", selective: dnsbl_hour.clone(), facts: Some(facts(None, HostName::Unverified, &["list.dnswl.org"], &["zen.spamhaus.org"])), verdict: Pass, rule: Rule::Dnswl, client: "209.85.220.0/24", remaining: None, detail: Some("list.dnswl.org") },
        SelectiveCase { name: "DNSBL listed: longer delay", selective: dnsbl_hour.clone(), facts: Some(facts(None, HostName::Unverified, &[], &["zen.spamhaus.org", "bl.example"])), verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(3_600), detail: Some("listed by zen.spamhaus.org, bl.example") },
        SelectiveCase { name: "DNSBL listed without its own delay: configured", selective: Selective::default(), facts: Some(facts(None, HostName::Unverified, &[], &["zen.spamhaus.org"])), verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(300), detail: Some("zen.spamhaus.org") },
        SelectiveCase { name: "DNSBL listed and verified: still the DNSBL delay", selective: Selective { verified: VerifiedTreatment::Skip, ..dnsbl_hour.clone() }, facts: Some(facts(spf_pass("gmail.com"), gmail(), &[], &["zen.spamhaus.org"])), verdict: Defer, rule: Rule::New, client: "spf:gmail.com", remaining: Some(3_600), detail: Some("zen.spamhaus.org") },
        SelectiveCase { name: "verified, unlisted: shorter delay", selective: verified(VerifiedTreatment::Delay(60)), facts: Some(facts(spf_pass("gmail.com"), gmail(), &[], &[])), verdict: Defer, rule: Rule::New, client: "spf:gmail.com", remaining: Some(60), detail: None },
        SelectiveCase { name: "verified, unlisted: skip", selective: verified(VerifiedTreatment::Skip), facts: Some(facts(None, gmail(), &[], &[])), verdict: Pass, rule: Rule::VerifiedUnlisted, client: "org:google.com", remaining: None, detail: Some("not listed") },
        SelectiveCase { name: "verified but a DNSBL did not answer: configured delay", selective: verified(VerifiedTreatment::Skip), facts: Some(incomplete), verdict: Defer, rule: Rule::New, client: "spf:gmail.com", remaining: Some(300), detail: None },
        SelectiveCase { name: "unverified, unlisted: configured delay", selective: verified(VerifiedTreatment::Skip), facts: Some(facts(None, HostName::Unverified, &[], &[])), verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(300), detail: None },
        SelectiveCase { name: "dynamic name is not verified", selective: verified(VerifiedTreatment::Skip), facts: Some(facts(None, HostName::Verified("209-85-220-41.dyn.example.net".into()), &[], &[])), verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(300), detail: None },
        SelectiveCase { name: "prefix-only order: facts only change lists", selective: Selective { identity_order: vec![IdentityKind::Prefix], ..verified(VerifiedTreatment::Skip) }, facts: Some(facts(spf_pass("gmail.com"), gmail(), &[], &[])), verdict: Defer, rule: Rule::New, client: "209.85.220.0/24", remaining: Some(300), detail: None },
    ];
    for c in cases {
        let engine = selective_engine(c.selective);
        let mut req = rcpt("209.85.220.41", "alice@gmail.com", "bob@rcpt.example");
        req.facts = c.facts;
        let (d, _) = engine.decide(&req, &NO_STATE, T);
        assert_eq!((d.verdict, d.rule), (c.verdict, c.rule), "{}", c.name);
        let key = d.key.as_ref().expect("every case has a key");
        assert_eq!(key.client, c.client, "{}", c.name);
        assert_eq!(d.remaining, c.remaining, "{}", c.name);
        let identity = d
            .identity
            .as_ref()
            .expect("every keyed decision names its identity");
        assert!(!identity.reason.is_empty(), "{}", c.name);
        match c.detail {
            Some(want) => {
                let detail = d.detail.as_deref().unwrap_or_default();
                assert!(detail.contains(want), "{}: {detail:?}", c.name);
            }
            None => assert_eq!(d.detail, None, "{}", c.name),
        }
    }
}

#[test]
fn static_allow_lists_come_before_dns_lists() {
    let engine = selective_engine(verified(VerifiedTreatment::Skip));
    let req = with_facts(
        rcpt(
            "209.85.220.41",
            "alice@gmail.com",
            "postmaster@rcpt.example",
        ),
        facts(None, HostName::Unverified, &["list.dnswl.org"], &[]),
    );
    let (d, _) = engine.decide(&req, &NO_STATE, T);
    assert_eq!(d.rule, Rule::AllowRecipient);
}

#[test]
fn a_dnsbl_listed_client_serves_the_longer_delay() {
    let engine = selective_engine(Selective {
        dnsbl_delay: Some(3_600),
        ..Selective::default()
    });
    let listed = with_facts(
        rcpt("203.0.113.5", "x@spam.example", "bob@rcpt.example"),
        facts(None, HostName::Unverified, &[], &["zen.spamhaus.org"]),
    );
    let mut store = MiniStore::default();
    let d = store.check(&engine, &listed, T);
    assert_eq!((d.rule, d.remaining), (Rule::New, Some(3_600)));
    assert_eq!(
        d.delay,
        Some(Delay {
            seconds: 3_600,
            reason: DelayReason::Dnsbl
        })
    );
    // Past the configured delay, a listed client is still early.
    let d = store.check(&engine, &listed, T + 600);
    assert_eq!((d.rule, d.remaining), (Rule::EarlyRetry, Some(3_000)));
    let d = store.check(&engine, &listed, T + 3_600);
    assert_eq!((d.rule, d.delayed), (Rule::Delayed, Some(3_600)));
}

#[test]
fn a_verified_clean_client_may_serve_no_delay_but_must_retry() {
    let engine = selective_engine(verified(VerifiedTreatment::Delay(0)));
    let req = with_facts(
        rcpt("209.85.220.41", "alice@gmail.com", "bob@rcpt.example"),
        facts(spf_pass("gmail.com"), HostName::Unverified, &[], &[]),
    );
    let mut store = MiniStore::default();
    let d = store.check(&engine, &req, T);
    assert_eq!((d.verdict, d.remaining), (Verdict::Defer, Some(0)));
    let d = store.check(&engine, &req, T + 1);
    assert_eq!((d.rule, d.delayed), (Rule::Delayed, Some(1)));
}

/// Issue 9: the retry of a pool sender comes from another /24; with its SPF passing, it
/// carries the same identity and ends greylisting. Keyed on the prefix, it starts over.
#[test]
fn issue_9_pool_sender_retrying_from_another_network_passes_with_spf() {
    let first = with_facts(
        rcpt("209.85.220.41", "Alice@Gmail.com", "bob@rcpt.example"),
        facts(
            spf_pass("gmail.com"),
            HostName::Verified(GMAIL_HOST.into()),
            &[],
            &[],
        ),
    );
    let retry = with_facts(
        rcpt("74.125.82.50", "Alice@Gmail.com", "bob@rcpt.example"),
        facts(
            spf_pass("gmail.com"),
            HostName::Verified("mail-wm1-f50.google.com".into()),
            &[],
            &[],
        ),
    );

    let engine = selective_engine(Selective::default());
    let mut store = MiniStore::default();
    let d = store.check(&engine, &first, T);
    assert_eq!((d.verdict, d.rule), (Verdict::Defer, Rule::New));
    let d = store.check(&engine, &retry, T + 400);
    assert_eq!((d.verdict, d.rule), (Verdict::Pass, Rule::Delayed));
    assert_eq!(d.key.map(|k| k.client).as_deref(), Some("spf:gmail.com"));

    let prefix_only = selective_engine(Selective {
        identity_order: vec![IdentityKind::Prefix],
        ..Selective::default()
    });
    let mut store = MiniStore::default();
    let d = store.check(&prefix_only, &first, T);
    assert_eq!((d.verdict, d.rule), (Verdict::Defer, Rule::New));
    let d = store.check(&prefix_only, &retry, T + 400);
    assert_eq!(
        (d.verdict, d.rule),
        (Verdict::Defer, Rule::New),
        "another /24 is another client"
    );
}

/// Facts in which every lookup failed or timed out: nothing is known.
fn troubled_facts() -> impl Strategy<Value = IdentityFacts> {
    let spf = prop_oneof![
        Just(None),
        Just(Some(SpfResult::Timeout)),
        Just(Some(SpfResult::TempError)),
        Just(Some(SpfResult::None)),
        Just(Some(SpfResult::Neutral)),
        Just(Some(SpfResult::Fail)),
    ];
    let name = prop_oneof![
        Just(HostName::Unknown),
        Just(HostName::Unverified),
        Just(HostName::Timeout),
        Just(HostName::Verified(
            "c-198-51-100-10.pool.example.net".into()
        )),
    ];
    (spf, name).prop_map(|(spf, name)| IdentityFacts {
        spf: spf.map(|result| SpfFact {
            domain: "sender.example".into(),
            result,
        }),
        name,
        dnswl: Listing {
            hits: vec![],
            complete: false,
        },
        dnsbl: Listing {
            hits: vec![],
            complete: false,
        },
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// DNS trouble never changes a decision by itself: with facts that say nothing, every
    /// request is decided as without facts, whatever the stored state and settings.
    #[test]
    fn dns_trouble_decides_as_no_facts(
        f in troubled_facts(),
        skip in any::<bool>(),
        age in 0..1_000u64,
        passed_before in any::<bool>(),
    ) {
        let engine = selective_engine(Selective {
            dnsbl_delay: Some(3_600),
            verified: if skip { VerifiedTreatment::Skip } else { VerifiedTreatment::Delay(10) },
            ..Selective::default()
        });
        let triplet = if passed_before { passed(T - age, T - age) } else { pending(T - age, 1) };
        let prior = state(None, Some(triplet));
        let plain = base_request();
        let troubled = with_facts(base_request(), f);
        let (want, want_next) = engine.decide(&plain, &prior, T);
        let (got, got_next) = engine.decide(&troubled, &prior, T);
        prop_assert_eq!(got_next, want_next);
        prop_assert_eq!(
            (got.verdict, got.rule, got.key, got.remaining, got.delayed, got.delay),
            (want.verdict, want.rule, want.key, want.remaining, want.delayed, want.delay)
        );
        prop_assert_eq!(got.identity.map(|i| i.kind), Some(IdentityKind::Prefix));
    }
}

// ---------------------------------------------------------------------------------------
// The limit on new triplets per client group
// ---------------------------------------------------------------------------------------

/// A group at its limit gets `throttled` for a new triplet (stored state unchanged); under
/// it, a new triplet counts one more; known, passed and auto-allowed ones never count or
/// wait; a window that ended counts from zero (stepped `now`).
#[test]
fn new_triplets_are_throttled_per_group_and_window() {
    let engine = Engine::new(
        Policy {
            new_triplets_per_client: 2,
            new_triplets_window: 600,
            ..Policy::default()
        },
        AllowLists::default(),
    );
    let req = base_request();
    let full = NewTriplets {
        window_start: T,
        count: 2,
    };
    let with = |triplet, client, new_triplets| State {
        client,
        triplet,
        new_triplets,
    };
    // Under the limit: new, counted.
    let (d, next) = engine.decide(&req, &with(None, None, None), T);
    assert_eq!(d.rule, Rule::New);
    assert_eq!(
        next.new_triplets,
        Some(NewTriplets {
            window_start: T,
            count: 1
        })
    );
    let one = next.new_triplets;
    let (_, next) = engine.decide(&req, &with(None, None, one), T + 5);
    assert_eq!(
        next.new_triplets,
        Some(NewTriplets {
            window_start: T,
            count: 2
        })
    );
    // At the limit: throttled, nothing to store, told when a retry could pass.
    let before = with(None, None, Some(full));
    let (d, next) = engine.decide(&req, &before, T + 100);
    assert_eq!((d.rule, d.verdict), (Rule::Throttled, Verdict::Defer));
    assert_eq!(d.remaining, Some(500 + engine.policy.delay));
    assert!(
        d.detail
            .as_deref()
            .is_some_and(|t| t.contains("2 new triplets")),
        "{d:?}"
    );
    assert_eq!(next, before, "nothing changes");
    // A dead record is no live one: its triplet is new, so it is throttled too.
    let dead = pending(T - 3 * 86_400, 1);
    assert_eq!(
        engine
            .decide(&req, &with(Some(dead), None, Some(full)), T + 100)
            .0
            .rule,
        Rule::Throttled
    );
    // Known triplets are not affected.
    let early = pending(T + 50, 1);
    let (d, next) = engine.decide(&req, &with(Some(early), None, Some(full)), T + 100);
    assert_eq!(d.rule, Rule::EarlyRetry);
    assert_eq!(next.new_triplets, Some(full), "not counted");
    let p = passed(T - 1000, T - 10);
    assert_eq!(
        engine
            .decide(&req, &with(Some(p), None, Some(full)), T + 100)
            .0
            .rule,
        Rule::Known
    );
    let allowed = client_rec(engine.policy.auto_allow_after, T - 10);
    assert_eq!(
        engine
            .decide(&req, &with(None, Some(allowed), Some(full)), T + 100)
            .0
            .rule,
        Rule::AutoAllow
    );
    // The window ended: a new one starts with this triplet.
    let (d, next) = engine.decide(&req, &before, T + 600);
    assert_eq!(d.rule, Rule::New);
    assert_eq!(
        next.new_triplets,
        Some(NewTriplets {
            window_start: T + 600,
            count: 1
        })
    );
    // Off: no count is kept or read.
    let off = Engine::new(
        Policy {
            new_triplets_per_client: 0,
            ..Policy::default()
        },
        AllowLists::default(),
    );
    let (d, next) = off.decide(&req, &before, T + 100);
    assert_eq!((d.rule, next.new_triplets), (Rule::New, Some(full)));
}

// ---------------------------------------------------------------------------------------
// 8. Per-recipient-domain sections
// ---------------------------------------------------------------------------------------

/// A section's own settings; `None` inherits.
#[derive(Clone, Copy, Default)]
struct Sec {
    mode: Option<DomainMode>,
    delay: Option<u64>,
    verified: Option<VerifiedTreatment>,
}

/// An engine whose sections are `(name, patterns, settings)`, in this order.
fn domain_engine(selective: Selective, sections: &[(&str, &[&str], Sec)]) -> Engine {
    let mut d = DomainPolicies::default();
    for (name, patterns, s) in sections {
        let i = d.push(DomainSection {
            applied: DomainApplied {
                name: (*name).into(),
                source: None,
                mode: s.mode,
            },
            delay: s.delay,
            verified: s.verified,
        });
        for p in *patterns {
            d.add_pattern(i, p).expect("test pattern");
        }
    }
    engine().with_selective(selective).with_domains(d)
}

const OFF: Sec = Sec {
    mode: Some(DomainMode::Off),
    delay: None,
    verified: None,
};
const LEARN: Sec = Sec {
    mode: Some(DomainMode::Learn),
    delay: None,
    verified: None,
};
const ENFORCE: Sec = Sec {
    mode: Some(DomainMode::Enforce),
    delay: None,
    verified: None,
};
const SLOW: Sec = Sec {
    mode: None,
    delay: Some(1_800),
    verified: None,
};

struct DomainCase {
    name: &'static str,
    recipient: &'static str,
    global: Mode,
    /// The section that should apply.
    section: Option<&'static str>,
    verdict: Verdict,
    rule: Rule,
    /// Whether the verdict is enforced (false: learn, the MTA is told to accept).
    enforced: bool,
    /// `remaining` of a first sighting, and the delay's reason.
    delay: Option<(u64, DelayReason)>,
}

#[test]
fn domain_sections_decide_mode_delay_and_precedence() {
    use DelayReason::{Configured, Domain};
    use Mode::{Enforce, Learn};
    use Verdict::{Defer, Pass};
    let sections: &[(&str, &[&str], Sec)] = &[
        ("vip", &["ceo@slow.example"], OFF),
        ("off", &["off.example"], OFF),
        ("learning", &["learn.example", "*.learn.example"], LEARN),
        ("strict", &["strict.example"], ENFORCE),
        ("slow", &["slow.example"], SLOW),
        // Later than "slow": never applies to its addresses.
        ("shadowed", &["boss@slow.example", "slow.example"], OFF),
        ("inherits", &["plain.example"], Sec::default()),
    ];
    let engine = domain_engine(Selective::default(), sections);
    #[rustfmt::skip]
    let cases = [
        DomainCase { name: "no section: global enforce", recipient: "bob@other.example", global: Enforce, section: None, verdict: Defer, rule: Rule::New, enforced: true, delay: Some((300, Configured)) },
        DomainCase { name: "no section: global learn", recipient: "bob@other.example", global: Learn, section: None, verdict: Defer, rule: Rule::New, enforced: false, delay: Some((300, Configured)) },
        DomainCase { name: "off: accepted, not greylisted", recipient: "bob@off.example", global: Enforce, section: Some("off"), verdict: Pass, rule: Rule::DomainOff, enforced: true, delay: None },
        DomainCase { name: "off under global learn", recipient: "<Bob+x@OFF.example>", global: Learn, section: Some("off"), verdict: Pass, rule: Rule::DomainOff, enforced: true, delay: None },
        DomainCase { name: "learn: decided, not enforced", recipient: "bob@learn.example", global: Enforce, section: Some("learning"), verdict: Defer, rule: Rule::New, enforced: false, delay: Some((300, Configured)) },
        DomainCase { name: "learn by a subdomain pattern", recipient: "bob@eu.learn.example", global: Enforce, section: Some("learning"), verdict: Defer, rule: Rule::New, enforced: false, delay: Some((300, Configured)) },
        DomainCase { name: "enforce beats global learn", recipient: "bob@strict.example", global: Learn, section: Some("strict"), verdict: Defer, rule: Rule::New, enforced: true, delay: Some((300, Configured)) },
        DomainCase { name: "own delay, mode inherited", recipient: "bob@slow.example", global: Enforce, section: Some("slow"), verdict: Defer, rule: Rule::New, enforced: true, delay: Some((1_800, Domain)) },
        DomainCase { name: "own delay, global learn inherited", recipient: "bob@slow.example", global: Learn, section: Some("slow"), verdict: Defer, rule: Rule::New, enforced: false, delay: Some((1_800, Domain)) },
        DomainCase { name: "earlier address section beats the domain", recipient: "CEO@slow.example", global: Enforce, section: Some("vip"), verdict: Pass, rule: Rule::DomainOff, enforced: true, delay: None },
        DomainCase { name: "later address section never applies", recipient: "boss@slow.example", global: Enforce, section: Some("slow"), verdict: Defer, rule: Rule::New, enforced: true, delay: Some((1_800, Domain)) },
        DomainCase { name: "empty section inherits everything", recipient: "bob@plain.example", global: Enforce, section: Some("inherits"), verdict: Defer, rule: Rule::New, enforced: true, delay: Some((300, Configured)) },
        DomainCase { name: "static allow list still applies, section named", recipient: "postmaster@learn.example", global: Enforce, section: Some("learning"), verdict: Pass, rule: Rule::AllowRecipient, enforced: false, delay: None },
    ];
    for c in cases {
        let req = rcpt("198.51.100.10", "alice@sender.example", c.recipient);
        let (d, next) = engine.decide(&req, &NO_STATE, T);
        assert_eq!((d.verdict, d.rule), (c.verdict, c.rule), "{}", c.name);
        assert_eq!(d.domain.as_ref().map(|s| &*s.name), c.section, "{}", c.name);
        assert_eq!(d.enforced(c.global), c.enforced, "{}", c.name);
        assert_eq!(
            d.delay.map(|d| (d.seconds, d.reason)),
            c.delay,
            "{}",
            c.name
        );
        assert_eq!(d.remaining, c.delay.map(|d| d.0), "{}", c.name);
        if c.rule == Rule::DomainOff {
            assert_eq!(next, NO_STATE, "{}: off stores nothing", c.name);
            let detail = d.detail.as_deref().unwrap_or_default();
            assert!(detail.contains(c.section.unwrap()), "{}: {detail}", c.name);
        }
    }
}

#[test]
fn a_section_delay_is_served_by_the_retry() {
    let engine = domain_engine(Selective::default(), &[("slow", &["rcpt.example"], SLOW)]);
    let req = base_request();
    let (d, s1) = engine.decide(&req, &NO_STATE, T);
    assert_eq!(d.rule, Rule::New);
    // The global delay (300 s) has passed, the section's (1800 s) has not.
    let (d, s2) = engine.decide(&req, &s1, T + 600);
    assert_eq!((d.rule, d.remaining), (Rule::EarlyRetry, Some(1_200)));
    let (d, _) = engine.decide(&req, &s2, T + 1_800);
    assert_eq!((d.rule, d.delayed), (Rule::Delayed, Some(1_800)));
    assert_eq!(d.domain.map(|s| s.name), Some("slow".into()));
    // An auto-allowed client group still names the section.
    let allowed = State {
        client: Some(client_rec(engine.policy.auto_allow_after, T - 10)),
        ..NO_STATE
    };
    let (d, _) = engine.decide(&req, &allowed, T);
    assert_eq!(d.rule, Rule::AutoAllow);
    assert_eq!(d.domain.map(|s| s.name), Some("slow".into()));
}

#[test]
fn a_section_sets_its_own_verified_treatment() {
    let gmail = || HostName::Verified(GMAIL_HOST.into());
    let verified_facts = || facts(spf_pass("gmail.com"), gmail(), &[], &[]);
    let sections: &[(&str, &[&str], Sec)] = &[
        (
            "skip",
            &["skip.example"],
            Sec {
                verified: Some(VerifiedTreatment::Skip),
                ..Sec::default()
            },
        ),
        (
            "short",
            &["short.example"],
            Sec {
                verified: Some(VerifiedTreatment::Delay(60)),
                delay: Some(900),
                ..Sec::default()
            },
        ),
        (
            "greylist",
            &["greylist.example"],
            Sec {
                verified: Some(VerifiedTreatment::Greylist),
                ..Sec::default()
            },
        ),
        ("slow", &["slow.example"], SLOW),
    ];
    // Globally: verified identities wait 120 s; listed clients an hour.
    let global = Selective {
        verified: VerifiedTreatment::Delay(120),
        dnsbl_delay: Some(3_600),
        ..Selective::default()
    };
    let engine = domain_engine(global, sections);
    let cases: &[(&str, IdentityFacts, Verdict, Rule, Option<u64>)] = &[
        (
            "skip.example",
            verified_facts(),
            Verdict::Pass,
            Rule::VerifiedUnlisted,
            None,
        ),
        (
            "short.example",
            verified_facts(),
            Verdict::Defer,
            Rule::New,
            Some(60),
        ),
        // Unverified: the section's own delay.
        (
            "short.example",
            facts(None, HostName::Unverified, &[], &[]),
            Verdict::Defer,
            Rule::New,
            Some(900),
        ),
        (
            "greylist.example",
            verified_facts(),
            Verdict::Defer,
            Rule::New,
            Some(300),
        ),
        // Inherited: the global verified_delay.
        (
            "slow.example",
            verified_facts(),
            Verdict::Defer,
            Rule::New,
            Some(120),
        ),
        (
            "other.example",
            verified_facts(),
            Verdict::Defer,
            Rule::New,
            Some(120),
        ),
        // A DNSBL listing keeps its delay whatever the section says.
        (
            "skip.example",
            facts(spf_pass("gmail.com"), gmail(), &[], &["zen.spamhaus.org"]),
            Verdict::Defer,
            Rule::New,
            Some(3_600),
        ),
    ];
    for (domain, f, verdict, rule, remaining) in cases {
        let rcpt_to = format!("bob@{domain}");
        let req = with_facts(
            rcpt("209.85.220.41", "alice@gmail.com", &rcpt_to),
            f.clone(),
        );
        let (d, _) = engine.decide(&req, &NO_STATE, T);
        assert_eq!(
            (d.verdict, d.rule, d.remaining),
            (*verdict, *rule, *remaining),
            "{domain} {f:?}"
        );
    }
}

#[test]
fn runtime_deny_still_defers_an_off_section() {
    let mut engine = domain_engine(Selective::default(), &[("off", &["rcpt.example"], OFF)]);
    let (lists, bad) = RuntimeLists::build(
        vec![RuntimeEntry {
            id: 1,
            list: ListKind::Deny,
            target: Target::Sender,
            value: "@sender.example".into(),
            added_at: T,
            expires_at: None,
            comment: String::new(),
        }],
        T,
    );
    assert!(bad.is_empty());
    engine.runtime = Arc::new(lists);
    let (d, _) = engine.decide(&base_request(), &NO_STATE, T);
    assert_eq!((d.verdict, d.rule), (Verdict::Defer, Rule::Deny));
    assert_eq!(d.domain.map(|s| s.name), Some("off".into()));
    let other = rcpt("198.51.100.10", "x@elsewhere.example", "bob@rcpt.example");
    assert_eq!(engine.decide(&other, &NO_STATE, T).0.rule, Rule::DomainOff);
}

#[test]
fn runtime_allow_and_dnswl_accept_mail_to_any_section() {
    let mut engine = domain_engine(
        Selective::default(),
        &[
            ("strict", &["rcpt.example"], ENFORCE),
            ("slow", &["slow.example"], SLOW),
        ],
    );
    let (lists, _) = RuntimeLists::build(
        vec![RuntimeEntry {
            id: 1,
            list: ListKind::Allow,
            target: Target::Client,
            value: "198.51.100.0/24".into(),
            added_at: T,
            expires_at: None,
            comment: String::new(),
        }],
        T,
    );
    engine.runtime = Arc::new(lists);
    let (d, _) = engine.decide(&base_request(), &NO_STATE, T);
    assert_eq!((d.verdict, d.rule), (Verdict::Pass, Rule::RuntimeAllow));
    assert_eq!(d.domain.map(|s| s.name), Some("strict".into()));
    let listed = with_facts(
        rcpt("209.85.220.41", "alice@gmail.com", "bob@slow.example"),
        facts(None, HostName::Unverified, &["list.dnswl.org"], &[]),
    );
    let (d, _) = engine.decide(&listed, &NO_STATE, T);
    assert_eq!((d.verdict, d.rule), (Verdict::Pass, Rule::Dnswl));
    assert_eq!(d.domain.map(|s| s.name), Some("slow".into()));
}

#[test]
fn stage_auth_and_missing_client_skip_before_any_section() {
    let engine = domain_engine(Selective::default(), &[("off", &["rcpt.example"], OFF)]);
    let mut req = base_request();
    req.stage = "DATA".into();
    let (d, _) = engine.decide(&req, &NO_STATE, T);
    assert_eq!((d.rule, d.domain), (Rule::NotRcptStage, None));
    let mut req = base_request();
    req.client_ip = None;
    assert_eq!(
        engine.decide(&req, &NO_STATE, T).0.rule,
        Rule::NoClientAddress
    );
}

/// A released pending triplet passes at its next retry, before its delay, with rule
/// `released`; after that it is the record an ordinary pass leaves, and answers `known`.
#[test]
fn a_released_triplet_passes_at_once_then_is_an_ordinary_pass() {
    let engine = engine();
    let req = base_request();
    let delay = engine.policy.delay;
    // Deferred at T, released 10 s later: far before the delay ends.
    let (_, first) = engine.triplet_step(None, T, delay);
    let (outcome, released) = engine.release_step(Some(&first), T + 10);
    assert_eq!(outcome, ReleaseOutcome::Released);
    let released = released.expect("a pending record is released");
    assert_eq!(
        (
            released.first_seen,
            released.attempts,
            released.passed,
            released.passes
        ),
        (T, 1, true, 0)
    );
    assert!(engine.triplet_alive(&released, T + 20));

    let (d, next) = engine.decide(&req, &state(None, Some(released)), T + 20);
    assert_eq!((d.verdict, d.rule), (Verdict::Pass, Rule::Released));
    assert_eq!(d.delayed, Some(20), "delayed since the first attempt");
    assert_eq!(d.record, Some(released));
    let after = next.triplet.expect("record written");
    assert!(
        next.client.is_some_and(|c| c.passes == 1),
        "the pass counts"
    );

    // The same record as a pass after the delay would leave, but for its times.
    let (_, delayed_pass) = engine.triplet_step(Some(&first), T + 20 + delay, 0);
    assert_eq!(
        after,
        Triplet {
            last_seen: T + 20,
            expires_at: T + 20 + engine.policy.max_age,
            ..delayed_pass
        }
    );
    let (d, again) = engine.decide(&req, &state(None, Some(after)), T + 30);
    assert_eq!(d.rule, Rule::Known);
    assert_eq!(again.triplet.map(|t| t.passes), Some(2));

    // Nothing else is released: passed (also released) records, dead or missing ones.
    for (old, at, want) in [
        (Some(after), T + 30, ReleaseOutcome::AlreadyPassed),
        (Some(released), T + 30, ReleaseOutcome::AlreadyPassed),
        (None, T, ReleaseOutcome::NotFound),
        (
            Some(first),
            T + engine.policy.retry_window + 1,
            ReleaseOutcome::NotFound,
        ),
    ] {
        assert_eq!(
            engine.release_step(old.as_ref(), at),
            (want, None),
            "{old:?}"
        );
    }
    // A released record lives as a passed one does, from its last attempt.
    assert_eq!(released.expires_at, T + engine.policy.max_age);
    let (d, _) = engine.decide(
        &req,
        &state(None, Some(released)),
        T + engine.policy.max_age + 1,
    );
    assert_eq!(d.rule, Rule::New, "a release never retried is forgotten");
}
