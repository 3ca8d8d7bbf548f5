//! Configuration parsing and validation tests.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use std::time::Duration;

use super::*;
use crate::admin::TokenSource;
use crate::dur::Dur;
use crate::engine::{
    Classified, IdentityKind, Policy, Request, Rule, Selective, VerifiedTreatment,
};
use crate::proto::policy::Limits;
use crate::server::ListenAddr;
use crate::server::replies::DeferAction;
use crate::store::StoreKind;

const NAME: &str = "greygate.toml";

fn source(text: &str) -> Source<'_> {
    Source { name: NAME, text }
}

/// Parses and validates `text` as the file `greygate.toml`.
fn check(text: &str) -> Result<Config, ConfigErrors> {
    let src = source(text);
    RawConfig::parse(&src)?.validate(Some(&src))
}

fn valid(text: &str) -> Config {
    check(text).unwrap_or_else(|e| panic!("config should be valid:\n{text}\n---\n{e}"))
}

fn errors(text: &str) -> Vec<ConfigError> {
    match check(text) {
        Ok(_) => panic!("config should be invalid:\n{text}"),
        Err(ConfigErrors(list)) => list,
    }
}

/// The only error of `text`.
fn single_error(text: &str) -> ConfigError {
    let mut list = errors(text);
    assert_eq!(
        list.len(),
        1,
        "one error expected for:\n{text}\ngot {list:?}"
    );
    list.remove(0)
}

/// `greygate.toml:LINE:` — the part of a location that names file and line.
fn at_line(line: usize) -> String {
    format!("{NAME}:{line}:")
}

fn temp_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write temp file");
    f
}

/// Path of a temp file as written in TOML (a literal string, no escapes needed).
fn toml_path(f: &tempfile::NamedTempFile) -> String {
    f.path().display().to_string()
}

fn rcpt(recipient: &str) -> Request {
    Request {
        stage: "RCPT".into(),
        client_ip: Some("203.0.113.9".parse().expect("ip")),
        client_name: "unknown".into(),
        sender: "someone@sender.example".into(),
        recipient: recipient.into(),
        ..Request::default()
    }
}

fn rule_for(config: &Config, req: &Request) -> Option<Rule> {
    match config.engine.classify(req, 0) {
        Classified::Decided(d) => Some(d.rule),
        Classified::Lookup(_) => None,
    }
}

// ---------------------------------------------------------------------------------------
// Defaults and a full sample
// ---------------------------------------------------------------------------------------

fn assert_default_config(c: &Config) {
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.engine.policy, Policy::default());
    assert_eq!(
        c.policy.listen,
        vec![ListenAddr::Tcp("127.0.0.1:10023".parse().expect("addr"))]
    );
    assert_eq!(c.store.kind, StoreKind::Embedded(DEFAULT_DB_PATH.into()));
    assert_eq!(c.replies.defer_action, DeferAction::DeferIfPermit);
    assert!(c.replies.defer_text.contains("{remaining}"));
    assert!(c.replies.header_host.is_some());
    assert_eq!(c.policy.socket_mode, 0o666);
    assert_eq!(c.policy.limits.codec, Limits::default());
    // A Postfix host's 100 smtpd processes per service fit one peer's share twice over.
    assert_eq!(
        (
            c.policy.limits.max_connections,
            c.policy.limits.max_connections_per_peer
        ),
        (512, 256)
    );
    assert_eq!(c.milter.limits.max_connections_per_peer, 256);
    assert_eq!(
        (c.admin.max_connections, c.admin.max_connections_per_peer),
        (64, 16)
    );
    assert_eq!(c.fail_mode, FailMode::Open);
    assert_eq!(c.store.flush_interval, Duration::from_secs(1));
    assert_eq!(c.store.timeout, Duration::from_secs(1));
    assert_eq!(c.store.max_entries, 2_000_000);
    assert_eq!((c.log.level.as_str(), c.log.json), ("info", false));
    // DNS is on, with the system's resolver: identities are tried in the default order
    // (spf, org, prefix); the host name is the MTA's, never looked up.
    assert_eq!(c.engine.selective, Selective::default());
    assert_eq!(
        c.dns,
        DnsSettings {
            enabled: true,
            budget: Duration::from_millis(300),
            resolver: None,
            cache_size: 200_000,
            ptr_lookup: false,
            dnswl_zones: vec![],
            dnsbl_zones: vec![],
        }
    );
    assert!(!c.hostname.is_empty(), "defaults to the system host name");
    // Only postmaster@ and abuse@ are allow-listed.
    assert_eq!(c.engine.allow.counts(), (0, 2, 0));
    for allowed in ["postmaster@rcpt.example", "Abuse+x@Other.Example"] {
        assert_eq!(
            rule_for(c, &rcpt(allowed)),
            Some(Rule::AllowRecipient),
            "{allowed}"
        );
    }
    assert_eq!(rule_for(c, &rcpt("bob@rcpt.example")), None);
}

#[test]
fn built_in_defaults_validate() {
    let c = RawConfig::default()
        .validate(None)
        .expect("defaults are valid");
    assert_default_config(&c);
}

#[test]
fn empty_and_comment_only_files_give_the_defaults() {
    for text in [
        "",
        "# nothing here\n\n",
        "[greylist]\n[policy]\n[store]\n[allow]\n[log]\n",
    ] {
        assert_default_config(&valid(text));
    }
}

#[test]
fn full_sample_with_every_field_parses() {
    let clients = temp_file("192.0.2.0/24\n.partner.example\n");
    let recipients = temp_file("@rcpt.example\n");
    let senders = temp_file("@trusted.example\n");
    let text = format!(
        r#"
mode = "learn"
hostname = "mx1.rcpt.example"

[greylist]
delay = "10m"
retry_window = "1d"
max_age = "60d"
auto_allow_after = 3
auto_allow_lifetime = "30d"
ipv4_prefix = 28
ipv6_prefix = 56
recipient_delimiter = "+-"
x_greylist_header = false
new_triplets_per_client = 50
new_triplets_window = "10m"

[policy]
listen = ["127.0.0.1:10023", "[::1]:10024", "unix:/run/greygate/policy.sock"]
defer_action = "451 4.7.1"
defer_text = "Come back in {{remaining}}s"
socket_mode = "0660"
max_connections = 64
idle_timeout = "2m"
io_timeout = 5
max_line_length = 2048
max_attributes = 64

[store]
backend = "memory"
path = "/tmp/unused.redb"
flush_interval = "250ms"
timeout = "2s"
fail_mode = "closed"
max_entries = 20000

[allow]
clients = ["198.51.100.7", "/^mx[0-9]+\\.big\\.example$/"]
client_files = ['{clients}']
recipients = ["postmaster@"]
recipient_files = ['{recipients}']
senders = ["ceo@partner.example"]
sender_files = ['{senders}']

[log]
level = "debug"
format = "json"
"#,
        clients = toml_path(&clients),
        recipients = toml_path(&recipients),
        senders = toml_path(&senders),
    );
    let c = valid(&text);
    assert_eq!(c.mode, Mode::Learn);
    assert_eq!(c.hostname, "mx1.rcpt.example");
    assert_eq!(
        c.engine.policy,
        Policy {
            delay: 600,
            retry_window: 86_400,
            max_age: 60 * 86_400,
            auto_allow_after: 3,
            auto_allow_lifetime: 30 * 86_400,
            ipv4_prefix: 28,
            ipv6_prefix: 56,
            recipient_delimiter: "+-".into(),
            new_triplets_per_client: 50,
            new_triplets_window: 600,
        }
    );
    assert!(c.replies.header_host.is_none());
    assert_eq!(
        c.policy.listen,
        vec![
            ListenAddr::Tcp("127.0.0.1:10023".parse().expect("addr")),
            ListenAddr::Tcp("[::1]:10024".parse().expect("addr")),
            ListenAddr::Unix("/run/greygate/policy.sock".into()),
        ]
    );
    assert_eq!(
        c.replies.defer_action,
        DeferAction::Code("451 4.7.1".into())
    );
    assert_eq!(c.replies.defer_text, "Come back in {remaining}s");
    assert_eq!(c.policy.socket_mode, 0o660);
    assert_eq!(c.policy.limits.max_connections, 64);
    assert_eq!(c.policy.limits.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.policy.limits.io_timeout, Duration::from_secs(5));
    assert_eq!(
        c.policy.limits.codec,
        Limits {
            max_line: 2048,
            max_attributes: 64
        }
    );
    assert_eq!(c.store.kind, StoreKind::Memory);
    assert_eq!(c.store.flush_interval, Duration::from_millis(250));
    assert_eq!(c.store.timeout, Duration::from_secs(2));
    assert_eq!(c.store.max_entries, 20_000);
    assert_eq!(c.fail_mode, FailMode::Closed);
    assert_eq!((c.log.level.as_str(), c.log.json), ("debug", true));
    // Inline entries and file entries are both loaded: 2+2 clients, 1+1 recipients, 1+1 senders.
    assert_eq!(c.engine.allow.counts(), (4, 2, 2));
    let from = |ip: &str, name: &str, sender: &str, recipient: &str| Request {
        client_ip: Some(ip.parse::<IpAddr>().expect("ip")),
        client_name: name.into(),
        sender: sender.into(),
        ..rcpt(recipient)
    };
    #[rustfmt::skip]
    let cases = [
        (from("192.0.2.9", "unknown", "a@b.example", "x@y.example"), Some(Rule::AllowClientAddress)),
        (from("203.0.113.1", "mx7.big.example", "a@b.example", "x@y.example"), Some(Rule::AllowClientName)),
        (from("203.0.113.1", "out.partner.example", "a@b.example", "x@y.example"), Some(Rule::AllowClientName)),
        (from("203.0.113.1", "unknown", "a@b.example", "bob@rcpt.example"), Some(Rule::AllowRecipient)),
        (from("203.0.113.1", "unknown", "a@b.example", "abuse@y.example"), None),
        (from("203.0.113.1", "unknown", "x@trusted.example", "x@y.example"), Some(Rule::AllowSender)),
        (from("203.0.113.1", "unknown", "ceo@partner.example", "x@y.example"), Some(Rule::AllowSender)),
    ];
    for (req, want) in cases {
        assert_eq!(rule_for(&c, &req), want, "{req:?}");
    }
}

#[test]
fn setting_recipients_replaces_the_default_allow_list() {
    let c = valid("[allow]\nrecipients = []\n");
    assert_eq!(c.engine.allow.counts(), (0, 0, 0));
    assert_eq!(rule_for(&c, &rcpt("postmaster@rcpt.example")), None);
}

// ---------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------

#[test]
fn durations_are_integers_or_humantime() {
    #[rustfmt::skip]
    let cases = [
        ("300", Duration::from_secs(300)),
        ("0", Duration::ZERO),
        ("\"300\"", Duration::from_secs(300)),
        ("\"5m\"", Duration::from_secs(300)),
        ("\"2d\"", Duration::from_secs(2 * 86_400)),
        ("\"1h 30m\"", Duration::from_secs(5_400)),
        ("\"500ms\"", Duration::from_millis(500)),
        ("\" 5s \"", Duration::from_secs(5)),
    ];
    for (value, want) in cases {
        let raw = RawConfig::parse(&source(&format!("[store]\ntimeout = {value}\n")))
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(raw.store.timeout.0, want, "{value}");
    }
    // Through validation into the policy (whole seconds).
    let c = valid("[greylist]\ndelay = \"5m\"\nretry_window = \"2d\"\nmax_age = 3024000\n");
    assert_eq!(
        (
            c.engine.policy.delay,
            c.engine.policy.retry_window,
            c.engine.policy.max_age
        ),
        (300, 172_800, 3_024_000)
    );
}

#[test]
fn bad_durations_are_errors_at_their_line() {
    for (value, hint) in [
        ("\"5x\"", "5x"),
        ("\"soon\"", "soon"),
        ("\"\"", "bad duration"),
        ("-5", ""),
        ("1.5", ""),
        ("true", ""),
    ] {
        let text = format!("# comment\n[greylist]\ndelay = {value}\n");
        let e = single_error(&text);
        assert!(
            e.location.starts_with(&at_line(3)),
            "{value}: {}",
            e.location
        );
        assert!(e.message.contains(hint), "{value}: {}", e.message);
    }
}

#[test]
fn dur_from_str_and_display() {
    assert_eq!("90".parse::<Dur>(), Ok(Dur(Duration::from_secs(90))));
    assert_eq!("1m 30s".parse::<Dur>(), Ok(Dur(Duration::from_secs(90))));
    assert!("ninety".parse::<Dur>().is_err());
    assert_eq!(Dur(Duration::from_secs(2 * 86_400)).to_string(), "2days");
    // Display output parses back to the same duration.
    for d in [0, 1, 299, 3_600, 172_800] {
        let dur = Dur(Duration::from_secs(d));
        assert_eq!(dur.to_string().parse::<Dur>(), Ok(dur), "{dur}");
    }
}

// ---------------------------------------------------------------------------------------
// Where errors are reported
// ---------------------------------------------------------------------------------------

#[test]
fn toml_syntax_error_reports_line_and_column() {
    let e = single_error("[greylist]\ndelay = 300\nretry_window = = 5\n");
    assert!(e.location.starts_with(&at_line(3)), "{}", e.location);
    let col = e.location.rsplit(':').next().expect("column");
    assert!(col.parse::<usize>().is_ok_and(|c| c > 1), "{}", e.location);
    // Unterminated table header on line 2.
    let e = single_error("mode = \"enforce\"\n[greylist\ndelay = 300\n");
    assert!(e.location.starts_with(&at_line(2)), "{}", e.location);
}

#[test]
fn unknown_key_is_an_error_at_its_line() {
    let e = single_error("[greylist]\ndelay = 300\ndealy = 5\n");
    assert_eq!(e.location, format!("{NAME}:3:1"));
    assert!(e.message.contains("dealy"), "{}", e.message);
    assert!(
        e.message.contains("delay"),
        "suggests the known keys: {}",
        e.message
    );

    let e = single_error("mode = \"enforce\"\n\n[greylsit]\ndelay = 300\n");
    assert!(e.location.starts_with(&at_line(3)), "{}", e.location);
    assert!(e.message.contains("greylsit"), "{}", e.message);
}

#[test]
fn type_error_is_reported_at_its_line() {
    #[rustfmt::skip]
    let cases = [
        ("\n[greylist]\ndelay = true\n", 3),
        ("[greylist]\nauto_allow_after = \"five\"\n", 2),
        ("[greylist]\nipv4_prefix = 300\n", 2),
        ("[greylist]\nx_greylist_header = \"yes\"\n", 2),
        ("mode = \"observe\"\n", 1),
        ("\n\n[policy]\nlisten = \"127.0.0.1:10023\"\n", 4),
        ("[store]\nfail_mode = \"ajar\"\n", 2),
        ("[allow]\nclients = [1, 2]\n", 2),
    ];
    for (text, line) in cases {
        let e = single_error(text);
        assert!(
            e.location.starts_with(&at_line(line)),
            "{text:?}: {}",
            e.location
        );
    }
}

#[test]
fn semantic_errors_point_at_the_bad_setting() {
    // (config text, 1-based line of the bad value, a fragment of the message)
    #[rustfmt::skip]
    let cases: &[(&str, usize, &str)] = &[
        ("[greylist]\ndelay = 600\nretry_window = 300\n", 3, "retry_window"),
        ("[greylist]\nretry_window = \"1m\"\n", 2, "retry_window"),
        ("[greylist]\nmax_age = 0\n", 2, "max_age"),
        ("# x\n[greylist]\nipv4_prefix = 33\n", 3, "ipv4_prefix 33"),
        ("[greylist]\n\nipv6_prefix = 129\n", 3, "ipv6_prefix 129"),
        ("[greylist]\nrecipient_delimiter = \"+@\"\n", 2, "recipient_delimiter"),
        ("[greylist]\nrecipient_delimiter = \"+ \"\n", 2, "recipient_delimiter"),
        ("[policy]\nlisten = [\"127.0.0.1:10023\"]\ndefer_action = \"REJECT\"\n", 3, "REJECT"),
        ("[policy]\ndefer_action = \"550 5.7.1\"\n", 2, "550 5.7.1"),
        ("\n[policy]\nlisten = [\"nonsense\"]\n", 3, "nonsense"),
        ("[policy]\nlisten = []\n", 2, "at least one"),
        ("[policy]\nlisten = [\"unix:relative.sock\"]\n", 2, "absolute"),
        ("[policy]\nsocket_mode = \"999\"\n", 2, "999"),
        ("[policy]\nsocket_mode = \"rw-rw-rw-\"\n", 2, "rw-rw-rw-"),
        ("[policy]\nsocket_mode = \"01777\"\n", 2, "01777"),
        ("[policy]\ndefer_text = \"\"\n", 2, "defer_text"),
        ("[policy]\ndefer_text = \"two\\nlines\"\n", 2, "defer_text"),
        ("[policy]\nmax_connections = 0\n", 2, "max_connections"),
        ("[policy]\nmax_connections_per_peer = 0\n", 2, "max_connections_per_peer"),
        ("[milter]\nmax_connections_per_peer = 0\n", 2, "max_connections_per_peer"),
        ("[admin]\nmax_connections_per_peer = 0\n", 2, "max_connections_per_peer"),
        ("[policy]\nidle_timeout = 0\n", 2, "idle_timeout"),
        ("[policy]\nio_timeout = \"0s\"\n", 2, "io_timeout"),
        ("[policy]\nmax_line_length = 100\n", 2, "max_line_length"),
        ("[policy]\nmax_attributes = 10\n", 2, "max_attributes"),
        ("[store]\nbackend = \"sqlite\"\n", 2, "sqlite"),
        ("[log]\nformat = \"xml\"\n", 2, "xml"),
        ("hostname = \"mx 1\"\n", 1, "host name"),
        ("hostname = \"\"\n", 1, "host name"),
        ("[allow]\nclients = [\"192.0.2.0/24\", \"300.1.2.3\"]\n", 2, "300.1.2.3"),
        ("[allow]\n\nrecipients = [\"nobody\"]\n", 3, "nobody"),
        ("[allow]\nsenders = [\"@\"]\n", 2, "@"),
        // A bad element of a multi-line array is reported at its own line.
        ("[policy]\nlisten = [\n  \"127.0.0.1:10023\",\n  \"nonsense\",\n]\n", 4, "nonsense"),
        ("[allow]\nclients = [\n  \"192.0.2.0/24\",\n\n  \"300.1.2.3\",\n]\n", 5, "300.1.2.3"),
        ("[greylist]\ndelay = \"500ms\"\n", 2, "whole seconds"),
        ("[greylist]\nauto_allow_lifetime = 0\n", 2, "auto_allow_lifetime"),
        ("[policy]\nsocket_mode = \"+660\"\n", 2, "+660"),
        ("[policy]\nsocket_mode = \"0o0o660\"\n", 2, "0o0o660"),
        ("[store]\nflush_interval = 0\n", 2, "flush_interval"),
        ("[milter]\nmax_macros = 10\n", 2, "max_macros"),
        ("[milter]\nmax_macro_bytes = 1000\n", 2, "max_macro_bytes"),
    ];
    for &(text, line, fragment) in cases {
        let e = single_error(text);
        assert!(
            e.location.starts_with(&at_line(line)),
            "{text:?}: location {} (want line {line})",
            e.location
        );
        assert!(
            e.message.contains(fragment),
            "{text:?}: message {:?} lacks {fragment:?}",
            e.message
        );
    }
}

#[test]
fn identity_and_dns_sections_parse() {
    let c = valid(
        r#"
[greylist]
delay = "5m"

[identity]
order = ["org", "spf"]
verified_delay = "1m"

[dns]
enabled = true
budget = "250ms"
resolver = "127.0.0.1"
cache_size = 0

[dnswl]
zones = ["List.DNSWL.org."]

[dnsbl]
zones = ["zen.spamhaus.org", "bl.example.net"]
delay = "1h"
"#,
    );
    assert_eq!(
        c.engine.selective,
        Selective {
            identity_order: vec![IdentityKind::Org, IdentityKind::Spf, IdentityKind::Prefix],
            dnsbl_delay: Some(3_600),
            verified: VerifiedTreatment::Delay(60),
        }
    );
    assert_eq!(
        c.dns,
        DnsSettings {
            enabled: true,
            budget: Duration::from_millis(250),
            resolver: Some("127.0.0.1:53".parse().expect("addr")),
            cache_size: 0,
            ptr_lookup: false,
            dnswl_zones: vec!["list.dnswl.org".into()],
            dnsbl_zones: vec!["zen.spamhaus.org".into(), "bl.example.net".into()],
        }
    );
    let c = valid(
        r#"
[identity]
order = ["prefix"]
verified_skip = true
[dns]
enabled = true
resolver = "[::1]:5353"
"#,
    );
    assert_eq!(
        c.engine.selective.identity_order,
        vec![IdentityKind::Prefix]
    );
    assert_eq!(c.engine.selective.verified, VerifiedTreatment::Skip);
    assert_eq!(c.dns.resolver, Some("[::1]:5353".parse().expect("addr")));
    let c = valid("[identity]\norder = []\n");
    assert_eq!(
        c.engine.selective.identity_order,
        vec![IdentityKind::Prefix]
    );
}

#[test]
fn identity_and_dns_errors_point_at_the_bad_setting() {
    const ON: &str = "[dns]\nenabled = true\n";
    const OFF: &str = "[dns]\nenabled = false\n";
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("[identity]\norder = [\"spf\", \"spf\"]\n{ON}"),
            2,
            "twice",
        ),
        (
            format!("[identity]\norder = [\"prefix\", \"org\"]\n{ON}"),
            2,
            "never be used",
        ),
        (
            format!("[identity]\nverified_skip = true\nverified_delay = 60\n{ON}"),
            3,
            "exclude each other",
        ),
        (
            format!("[identity]\nverified_delay = \"3d\"\n{ON}"),
            2,
            "retry_window",
        ),
        (
            format!("[identity]\nverified_delay = \"1500ms\"\n{ON}"),
            2,
            "whole seconds",
        ),
        (format!("[dnsbl]\ndelay = \"3d\"\n{ON}"), 2, "retry_window"),
        (
            format!("[dnsbl]\nzones = [\"zen.spamhaus.org\", \"bad zone\"]\n{ON}"),
            2,
            "bad zone",
        ),
        (
            format!("[dnswl]\nzones = [\"localhost\"]\n{ON}"),
            2,
            "localhost",
        ),
        (
            format!("[dnswl]\nzones = [\"a.example\", \"A.example.\"]\n{ON}"),
            2,
            "twice",
        ),
        ("[dns]\nenabled = true\nbudget = 0\n".into(), 3, "budget"),
        (
            "[dns]\nenabled = true\nbudget = \"1m\"\n".into(),
            3,
            "at most",
        ),
        (
            "[dns]\nenabled = true\nresolver = \"dns.example\"\n".into(),
            3,
            "dns.example",
        ),
        // Settings that only DNS facts could trigger are refused while DNS is off.
        (
            format!("[dnsbl]\nzones = [\"zen.spamhaus.org\"]\n{OFF}"),
            2,
            "[dns] enabled",
        ),
        (
            format!("[dnswl]\nzones = [\"list.dnswl.org\"]\n{OFF}"),
            2,
            "[dns] enabled",
        ),
        (
            format!("[dnsbl]\ndelay = \"1h\"\n{OFF}"),
            2,
            "[dns] enabled",
        ),
        (
            format!("[identity]\nverified_skip = true\n{OFF}"),
            2,
            "[dns] enabled",
        ),
        (
            format!("[identity]\nverified_delay = 0\n{OFF}"),
            2,
            "[dns] enabled",
        ),
        (
            "[dns]\nenabled = false\nptr_lookup = true\n".into(),
            3,
            "[dns] enabled",
        ),
    ];
    for (text, line, fragment) in cases {
        let e = single_error(&text);
        assert!(
            e.location.starts_with(&at_line(line)),
            "{text:?}: location {} (want line {line})",
            e.location
        );
        assert!(
            e.message.contains(fragment),
            "{text:?}: message {:?} lacks {fragment:?}",
            e.message
        );
    }
    // ... except `[dnsbl] delay` beside the SMTP front: its pregreet suspects serve it.
    let c = valid(&format!(
        "[dnsbl]\ndelay = \"1h\"\n{OFF}[smtp]\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"127.0.0.1:25\"\n"
    ));
    assert_eq!(c.engine.selective.dnsbl_delay, Some(3600));
    // An unknown identity kind is a type error at its line.
    let e = single_error("[identity]\norder = [\"spf\", \"helo\"]\n");
    assert!(e.location.starts_with(&at_line(2)), "{}", e.location);
    assert!(e.message.contains("helo"), "{}", e.message);
}

#[test]
fn semantic_error_column_points_at_the_value() {
    let e = single_error("[greylist]\ndelay = 600\nretry_window = 300\n");
    assert_eq!(e.location, format!("{NAME}:3:16"));
    assert_eq!(
        e.to_string(),
        format!("{NAME}:3:16: retry_window (5m) must not be shorter than delay (10m)")
    );
}

#[test]
fn zero_store_timeout_points_at_its_key() {
    let e = single_error("mode = \"enforce\"\n\n[store]\nbackend = \"memory\"\ntimeout = 0\n");
    assert!(e.location.starts_with(&at_line(5)), "{}", e.location);
    assert!(e.message.contains("timeout"), "{}", e.message);
}

/// `max_entries` caps the stores that hold records in this process; a shared store's server
/// bounds its own, so a cap there would be a setting that does nothing.
#[test]
fn max_entries_is_for_the_memory_and_embedded_stores() {
    assert_eq!(
        valid(
            "[store]
backend = \"memory\"\n"
        )
        .store
        .max_entries,
        2_000_000
    );
    assert_eq!(
        valid(
            "[store]
max_entries = 0
"
        )
        .store
        .max_entries,
        0
    );
    assert_eq!(
        valid(
            "[store]
max_entries = 500
"
        )
        .store
        .max_entries,
        500
    );
    let redis = "[store]
backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n";
    assert_eq!(
        valid(redis).store.max_entries,
        0,
        "redis: uncapped, not an error"
    );
    assert_eq!(
        valid(&format!("{redis}max_entries = 0\n"))
            .store
            .max_entries,
        0
    );
    let e = single_error(&format!("{redis}max_entries = 1000\n"));
    assert!(e.location.starts_with(&at_line(4)), "{}", e.location);
    assert!(e.message.contains("maxmemory"), "{}", e.message);
    let pg = "[store]
backend = \"postgres\"\nurl = \"postgres://g@db/g\"\nmax_entries = 9\n";
    assert!(single_error(pg).message.contains("max_entries caps"));
}

#[test]
fn new_triplets_limit_needs_a_window_unless_off() {
    let c = valid(
        "[greylist]
new_triplets_per_client = 0
new_triplets_window = 0
",
    );
    assert_eq!(c.engine.policy.new_triplets_per_client, 0);
    let c = valid("");
    assert_eq!(
        (
            c.engine.policy.new_triplets_per_client,
            c.engine.policy.new_triplets_window
        ),
        (1000, 3600)
    );
    let e = single_error(
        "[greylist]
new_triplets_per_client = 5
new_triplets_window = 0
",
    );
    assert!(e.location.starts_with(&at_line(3)), "{}", e.location);
    assert!(e.message.contains("positive"), "{}", e.message);
    let e = single_error(
        "[greylist]
new_triplets_window = \"1500ms\"\n",
    );
    assert!(e.message.contains("whole seconds"), "{}", e.message);
}

#[test]
fn a_bad_duration_type_says_what_a_duration_looks_like() {
    let e = single_error("[greylist]\ndelay = true\n");
    assert!(e.location.starts_with(&at_line(2)), "{}", e.location);
    assert!(e.message.contains("whole seconds"), "{}", e.message);
}

#[test]
fn explicit_defer_codes_are_normalised() {
    let c = valid("[policy]\ndefer_action = \"  451   4.7.1 \"\n");
    assert_eq!(
        c.replies.defer_action,
        DeferAction::Code("451 4.7.1".into())
    );
}

#[test]
fn errors_found_by_validate_without_a_source_name_the_setting() {
    let mut raw = RawConfig::default();
    raw.greylist.ipv4_prefix = 40;
    raw.policy.defer_action = "nope".into();
    let ConfigErrors(list) = raw.validate(None).expect_err("invalid");
    let locations: Vec<&str> = list.iter().map(|e| e.location.as_str()).collect();
    assert_eq!(locations, ["greylist.ipv4_prefix", "policy.defer_action"]);
}

#[test]
fn several_problems_are_reported_at_once() {
    let text = "\
[greylist]
delay = 600
retry_window = 300
ipv4_prefix = 33

[policy]
listen = [\"nonsense\"]
defer_action = \"REJECT\"
socket_mode = \"999\"

[log]
format = \"xml\"
";
    let list = errors(text);
    let mut lines: Vec<usize> = list
        .iter()
        .map(|e| {
            let rest = e.location.strip_prefix(NAME).expect("file name first");
            rest.split(':')
                .nth(1)
                .expect("line")
                .parse()
                .expect("number")
        })
        .collect();
    lines.sort_unstable();
    assert_eq!(lines, [3, 4, 7, 8, 9, 12], "{list:?}");
    // The Display form prints one problem per line.
    assert_eq!(ConfigErrors(list).to_string().lines().count(), 6);
}

// ---------------------------------------------------------------------------------------
// Allow-list files
// ---------------------------------------------------------------------------------------

#[test]
fn allow_file_errors_name_path_and_line_of_each_bad_line() {
    let clients = temp_file(
        "# trusted relays\n192.0.2.0/24\nnot a host\n\n.partner.example  # all of them\n300.0.0.1\n/^mx[0-9]+$/\n/unterminated\n",
    );
    let recipients = temp_file("@rcpt.example\nnobody\npostmaster@\n");
    let senders = temp_file("ceo@partner.example\n\n\n@\n");
    let text = format!(
        "[allow]\nclient_files = ['{}']\nrecipient_files = ['{}']\nsender_files = ['{}']\n",
        toml_path(&clients),
        toml_path(&recipients),
        toml_path(&senders),
    );
    let list = errors(&text);
    let locations: Vec<String> = list.iter().map(|e| e.location.clone()).collect();
    let want = [
        format!("{}:3", toml_path(&clients)),
        format!("{}:6", toml_path(&clients)),
        format!("{}:8", toml_path(&clients)),
        format!("{}:2", toml_path(&recipients)),
        format!("{}:4", toml_path(&senders)),
    ];
    assert_eq!(locations, want, "{list:?}");
    assert!(
        list[0].message.contains("not a host"),
        "{}",
        list[0].message
    );
    assert!(list[1].message.contains("300.0.0.1"), "{}", list[1].message);
}

#[test]
fn allow_file_errors_come_with_config_errors() {
    let clients = temp_file("bad entry\n");
    let text = format!(
        "[greylist]\nipv4_prefix = 33\n[allow]\nclient_files = ['{}']\n",
        toml_path(&clients)
    );
    let list = errors(&text);
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list[0].location.starts_with(&at_line(2)), "{list:?}");
    assert_eq!(list[1].location, format!("{}:1", toml_path(&clients)));
}

#[test]
fn good_allow_files_are_loaded_with_their_origin() {
    let clients = temp_file("# comment\n\n192.0.2.0/24\n");
    let text = format!("[allow]\nclient_files = ['{}']\n", toml_path(&clients));
    let c = valid(&text);
    let req = Request {
        client_ip: Some("192.0.2.200".parse().expect("ip")),
        ..rcpt("bob@rcpt.example")
    };
    let Classified::Decided(d) = c.engine.classify(&req, 0) else {
        panic!("client should be allow-listed");
    };
    assert_eq!(d.rule, Rule::AllowClientAddress);
    let detail = d.detail.expect("origin");
    assert!(
        detail.contains(&format!("{}:3", toml_path(&clients))),
        "{detail}"
    );
}

#[test]
fn missing_allow_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-allow-file");
    let text = format!(
        "[allow]\nclients = [\"192.0.2.1\"]\nrecipient_files = ['{}']\n",
        missing.display()
    );
    let e = single_error(&text);
    assert!(e.location.starts_with(&at_line(3)), "{}", e.location);
    assert!(
        e.message.contains(&missing.display().to_string()),
        "{}",
        e.message
    );
}

// ---------------------------------------------------------------------------------------
// Loading the file
// ---------------------------------------------------------------------------------------

#[test]
fn load_raw_reads_a_file_and_names_it_in_errors() {
    let good = temp_file("mode = \"learn\"\n");
    let (raw, text) = load_raw(good.path(), true).expect("readable");
    assert_eq!(raw.mode, Mode::Learn);
    assert_eq!(text.as_deref(), Some("mode = \"learn\"\n"));

    let bad = temp_file("\nmode = 5\n");
    let ConfigErrors(list) = load_raw(bad.path(), true).expect_err("type error");
    assert!(
        list[0]
            .location
            .starts_with(&format!("{}:2:", bad.path().display())),
        "{list:?}"
    );
}

#[test]
fn missing_config_file_is_fine_only_when_not_named_explicitly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("greygate.toml");
    let (raw, text) = load_raw(&missing, false).expect("defaults");
    assert!(text.is_none());
    assert_default_config(&raw.validate(None).expect("defaults are valid"));

    let ConfigErrors(list) = load_raw(&missing, true).expect_err("named file must exist");
    assert_eq!(list[0].location, missing.display().to_string());
}

// ---------------------------------------------------------------------------------------
// defer_action and listen
// ---------------------------------------------------------------------------------------

#[test]
fn defer_action_parsing_table() {
    #[rustfmt::skip]
    let cases: &[(&str, Option<DeferAction>)] = &[
        ("DEFER_IF_PERMIT", Some(DeferAction::DeferIfPermit)),
        ("defer_if_permit", Some(DeferAction::DeferIfPermit)),
        ("DEFER", Some(DeferAction::Defer)),
        ("defer", Some(DeferAction::Defer)),
        (" defer ", Some(DeferAction::Defer)),
        ("451 4.7.1", Some(DeferAction::Code("451 4.7.1".into()))),
        ("450", Some(DeferAction::Code("450".into()))),
        ("421 4.3.2", None), // 421 ends the session instead of deferring one recipient
        ("550 5.7.1", None),
        ("550", None),
        ("451 5.7.1", None),
        ("451 4.7", None),
        ("451 4.7.x", None),
        ("451 4..1", None),
        ("45 4.7.1", None),
        ("4511", None),
        ("45a", None),
        ("451 4.7.1 extra", None),
        ("REJECT", None),
        ("DUNNO", None),
        ("", None),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<DeferAction>().ok(), *want, "{text:?}");
    }
}

#[test]
fn defer_action_reply_and_store_failure_override() {
    let code = DeferAction::Code("451 4.7.1".into());
    let bare = DeferAction::Code("450".into());
    #[rustfmt::skip]
    let cases = [
        (&DeferAction::DeferIfPermit, None, "DEFER_IF_PERMIT Greylisted"),
        (&DeferAction::DeferIfPermit, Some("4.3.0"), "DEFER_IF_PERMIT 4.3.0 Greylisted"),
        (&DeferAction::Defer, None, "DEFER Greylisted"),
        (&DeferAction::Defer, Some("4.3.0"), "DEFER 4.3.0 Greylisted"),
        (&code, None, "451 4.7.1 Greylisted"),
        (&code, Some("4.3.0"), "451 4.3.0 Greylisted"),
        (&bare, None, "450 Greylisted"),
        (&bare, Some("4.3.0"), "450 4.3.0 Greylisted"),
    ];
    for (action, dsn, want) in cases {
        assert_eq!(action.reply("Greylisted", dsn), want, "{action:?} {dsn:?}");
    }
}

#[test]
fn listen_address_parsing_table() {
    let tcp = |s: &str| Some(ListenAddr::Tcp(s.parse::<SocketAddr>().expect("addr")));
    let unix = |s: &str| Some(ListenAddr::Unix(s.into()));
    #[rustfmt::skip]
    let cases: &[(&str, Option<ListenAddr>)] = &[
        ("127.0.0.1:10023", tcp("127.0.0.1:10023")),
        ("0.0.0.0:0", tcp("0.0.0.0:0")),
        ("[::1]:10023", tcp("[::1]:10023")),
        ("unix:/run/x.sock", unix("/run/x.sock")),
        ("/run/x.sock", unix("/run/x.sock")),
        ("unix:relative", None),
        ("unix:", None),
        ("relative.sock", None),
        // std's SocketAddr does not resolve names: host names are refused.
        ("localhost:25", None),
        ("127.0.0.1", None),
        ("::1:10023", None),
        ("127.0.0.1:99999", None),
        ("nonsense", None),
        ("", None),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<ListenAddr>().ok(), *want, "{text:?}");
    }
}

#[test]
fn listen_address_display_parses_back() {
    for text in ["127.0.0.1:10023", "[::1]:10023", "unix:/run/x.sock"] {
        let addr: ListenAddr = text.parse().expect("valid");
        assert_eq!(addr.to_string(), text);
        assert_eq!(addr.to_string().parse::<ListenAddr>(), Ok(addr));
    }
    let bare: ListenAddr = "/run/x.sock".parse().expect("valid");
    assert_eq!(bare.to_string(), "unix:/run/x.sock");
}

#[test]
fn socket_mode_spellings() {
    for (text, want) in [
        ("0660", 0o660),
        ("660", 0o660),
        ("0o600", 0o600),
        ("0777", 0o777),
    ] {
        let c = valid(&format!("[policy]\nsocket_mode = \"{text}\"\n"));
        assert_eq!(c.policy.socket_mode, want, "{text}");
    }
}

#[test]
fn admin_defaults_follow_the_store() {
    let c = valid("[store]\npath = \"/srv/gg/greylist.redb\"\n");
    assert_eq!(c.admin.listen, vec!["127.0.0.1:9025".parse().unwrap()]);
    assert_eq!(
        c.admin.token,
        TokenSource::File("/srv/gg/admin.token".into())
    );
    assert_eq!(
        c.admin.entries_file,
        Some("/srv/gg/greylist.redb.entries.json".into())
    );
    assert_eq!(c.admin.url().as_deref(), Some("http://127.0.0.1:9025"));
    let m = valid("[store]\nbackend = \"memory\"\n[admin]\nlisten = [\"0.0.0.0:9999\"]\n");
    assert_eq!(m.admin.token, TokenSource::None);
    assert_eq!(m.admin.entries_file, None);
    assert_eq!(m.admin.url().as_deref(), Some("http://127.0.0.1:9999"));
    let off = valid("[admin]\nlisten = []\ntoken = \"0123456789abcdef-x\"\n");
    assert!(off.admin.listen.is_empty() && off.admin.url().is_none());
    assert_eq!(
        off.admin.token,
        TokenSource::Inline("0123456789abcdef-x".into())
    );
}

#[test]
fn admin_errors_point_at_the_value() {
    let e = single_error("[admin]\nlisten = [\"localhost:9025\"]\n");
    assert_eq!(e.location, format!("{NAME}:2:11"));
    assert!(e.message.contains("not an IP address and port"), "{e}");
    let e = single_error("[admin]\ntoken = \"short\"\n");
    assert!(e.message.contains("16 characters"), "{e}");
    let e = single_error(
        "[admin]\ntoken = \"0123456789abcdef-x\"\ntoken_file = \"/etc/greygate/token\"\n",
    );
    assert!(e.message.contains("not both"), "{e}");
    let e = single_error("[admin]\nrequest_timeout = 0\n");
    assert!(e.message.contains("positive"), "{e}");
    let e = single_error("[admin]\nbogus = 1\n");
    assert!(e.message.contains("bogus"), "{e}");
}

#[test]
fn a_reload_names_the_sections_that_need_a_restart() {
    let base = valid("[policy]\nlisten = [\"127.0.0.1:10023\"]\n");
    // Replies, delays, allow lists and the mode are swapped in by a reload.
    let swapped = valid(
        "mode = \"learn\"\n[policy]\nlisten = [\"127.0.0.1:10023\"]\ndefer_text = \"later\"\n\
         [greylist]\ndelay = 60\n[allow]\nclients = [\"192.0.2.1\"]\n",
    );
    assert!(base.needs_restart(&swapped).is_empty());
    // Listeners and their limits, the store and logging were built at start.
    let rebuilt = valid(
        "[policy]\nlisten = [\"127.0.0.1:10023\"]\nmax_connections = 7\n\
         [milter]\nlisten = [\"127.0.0.1:10024\"]\n[store]\nbackend = \"memory\"\n\
         [log]\nformat = \"json\"\n[admin]\nlisten = []\n",
    );
    assert_eq!(
        base.needs_restart(&rebuilt),
        ["policy", "milter", "store", "admin", "log"]
    );
}

#[test]
fn milter_macro_limits_reach_the_listener() {
    let c = valid(
        "[milter]\nlisten = [\"127.0.0.1:10024\"]\nmax_macros = 200\nmax_macro_bytes = 8192\n",
    );
    assert_eq!(
        (c.milter.limits.max_macros, c.milter.limits.max_macro_bytes),
        (200, 8192)
    );
    let d = valid("");
    assert_eq!(
        (d.milter.limits.max_macros, d.milter.limits.max_macro_bytes),
        (
            crate::server::milter::DEFAULT_MAX_MACROS,
            crate::server::milter::DEFAULT_MAX_MACRO_BYTES
        )
    );
}

#[test]
fn smtp_section_reaches_the_front_end() {
    let traps = temp_file("# traps\nspam@trap.example\n@honeypot.example\n");
    let c = valid(&format!(
        r#"
hostname = "mx1.example"
[smtp]
listen = ["0.0.0.0:25", "[::]:25"]
backend = "exchange.internal:2525"
max_connections = 300
max_connections_per_peer = 20
max_line_length = 2048
max_commands = 500
max_errors = 5
max_recipients = 200
max_message_size = 20000000
command_timeout = "2m"
data_timeout = "1m"
backend_connect_timeout = 5
backend_timeout = "1m"
backend_xclient = false
backend_proxy = "v2"
backend_starttls = true
backend_pool = 4
backend_idle = "30s"
pregreet_wait = "3s"
pregreet_action = "defer"
pregreet_suspect_for = "12h"
pregreet_pass_for = "2d"
tarpit_rate = 10
tarpit_max_sessions = 8
traps = ["trap@example.org"]
traps_file = "{}"
trap_deny_for = "6h"
threads = 2
"#,
        toml_path(&traps)
    ));
    let s = &c.smtp;
    assert_eq!(s.listen.len(), 2);
    assert_eq!(s.backend.as_deref(), Some("exchange.internal:2525"));
    assert_eq!(
        s.hostname, "mx1.example",
        "the daemon's host name by default"
    );
    assert_eq!(
        (s.limits.max_connections, s.limits.max_connections_per_peer),
        (300, 20)
    );
    assert_eq!(
        (
            s.limits.max_line_length,
            s.limits.max_commands,
            s.limits.max_errors,
            s.limits.max_recipients
        ),
        (2048, 500, 5, 200)
    );
    assert_eq!(s.limits.max_message_size, 20_000_000);
    assert_eq!(s.limits.command_timeout, Duration::from_secs(120));
    assert_eq!(s.limits.data_timeout, Duration::from_secs(60));
    assert!(!s.backend_options.xclient && s.backend_options.starttls);
    assert_eq!(
        s.backend_options.proxy,
        crate::server::smtp::ProxyProtocol::V2
    );
    assert_eq!(s.backend_options.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        (s.backend_options.pool, s.backend_options.pool_idle),
        (4, Duration::from_secs(30))
    );
    assert_eq!(s.pregreet.wait, Duration::from_secs(3));
    assert_eq!(
        s.pregreet.action,
        crate::server::smtp::PregreetAction::Defer
    );
    assert_eq!(s.pregreet.pass_for, Duration::from_secs(2 * 86400));
    assert_eq!((s.tarpit.rate, s.tarpit.max_sessions), (10, 8));
    assert_eq!(s.traps.deny_for, Duration::from_secs(6 * 3600));
    assert_eq!(s.threads, 2);
    let t = crate::server::smtp::Traps::load(&s.traps).unwrap();
    assert!(t.catches("trap@example.org") && t.catches("SPAM@trap.example"));
    assert!(t.catches("x@honeypot.example") && !t.catches("x@example.org"));
    // SMTP alone is enough of a listener; no SMTP by default.
    let only = valid(
        "[policy]\nlisten = []\n[smtp]\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"[::1]:25\"\n",
    );
    assert!(only.policy.listen.is_empty());
    assert!(valid("").smtp.listen.is_empty());
    let d = valid("").smtp.backend_options;
    assert_eq!((d.pool, d.pool_idle), (32, Duration::from_secs(5)));
    assert_eq!(valid("").smtp.threads, 1);
}

#[test]
fn smtp_errors_point_at_the_bad_setting() {
    let e = single_error("[smtp]\nlisten = [\"127.0.0.1:2525\"]\n");
    assert!(e.message.contains("needs a backend"), "{e}");
    for (line, bad, says) in [
        (
            2,
            "listen = [\"unix:/x\"]\nbackend = \"h:25\"",
            "TCP address",
        ),
        (2, "backend = \"no-port\"", "host:port"),
        (2, "backend = \"h:0\"", "host:port"),
        (2, "pregreet_action = \"drop\"", "reject"),
        (2, "backend_proxy = \"v3\"", "v1"),
        (2, "max_line_length = 100", "512"),
        (2, "max_recipients = 10", "at least 100"),
        (2, "pregreet_wait = \"2m\"", "60 s"),
        (2, "traps = [\"nobody\"]", "address or @domain"),
        (2, "tls_cert = \"/nonexistent.pem\"", "set both"),
        (2, "command_timeout = 0", "positive"),
        (2, "backend_pool = 100000", "backend_pool"),
        (2, "backend_idle = \"10m\"", "5 minutes"),
        (2, "threads = 0", "between 1 and 64"),
        (2, "threads = 65", "between 1 and 64"),
    ] {
        let e = single_error(&format!("[smtp]\n{bad}\n"));
        assert!(e.location.starts_with(&at_line(line)), "{bad}: {e}");
        assert!(e.message.contains(says), "{bad}: {e}");
    }
    let e = single_error(
        "[smtp]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
    );
    assert!(e.message.contains("/nonexistent/c.pem"), "{e}");
}

#[test]
fn smtp_traps_reload_but_its_listeners_need_a_restart() {
    let base = valid("[smtp]\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"127.0.0.1:25\"\n");
    let traps = valid(
        "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"127.0.0.1:25\"\ntraps = [\"t@example.org\"]\n",
    );
    assert!(base.needs_restart(&traps).is_empty());
    let moved = valid("[smtp]\nlisten = [\"127.0.0.1:2526\"]\nbackend = \"127.0.0.1:25\"\n");
    assert_eq!(base.needs_restart(&moved), ["smtp"]);
    let threads =
        valid("[smtp]\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"127.0.0.1:25\"\nthreads = 2\n");
    assert_eq!(base.needs_restart(&threads), ["smtp"]);
}

/// The section that applies to `recipient`, its mode and delay (None: inherited).
fn section_for(c: &Config, recipient: &str) -> Option<(String, Option<&'static str>, Option<u64>)> {
    c.engine
        .domain_section(recipient)
        .map(|s| (s.name().to_string(), s.mode().map(|m| m.as_str()), s.delay))
}

#[test]
fn domain_sections_and_their_files() {
    let file = temp_file(
        "# customers of the hosting platform\n\
         a.example off\n\
         \n\
         b.example   learn delay=10m   # trial\n\
         c@d.example mode=enforce\n\
         *.e.example\n",
    );
    let c = valid(&format!(
        "[greylist]\ndelay = 300\n\n\
         [[domains]]\nrecipients = [\"VIP@a.example\", \"x.example\"]\nmode = \"enforce\"\ndelay = \"20m\"\n\n\
         [[domains]]\nname = \"customers\"\nfiles = [\"{}\"]\ndelay = 600\n\n\
         [[domains]]\nname = \"late\"\nrecipients = [\"a.example\"]\nmode = \"learn\"\n",
        toml_path(&file)
    ));
    let vip = Some(("vip@a.example".to_string(), Some("enforce"), Some(1200)));
    assert_eq!(section_for(&c, "vip@a.example"), vip);
    assert_eq!(section_for(&c, "bob@x.example"), vip);
    let customers = |mode, delay| Some(("customers".to_string(), mode, Some(delay)));
    assert_eq!(
        section_for(&c, "bob@a.example"),
        customers(Some("off"), 600)
    );
    assert_eq!(
        section_for(&c, "bob@b.example"),
        customers(Some("learn"), 600)
    );
    assert_eq!(
        section_for(&c, "c@d.example"),
        customers(Some("enforce"), 600)
    );
    assert_eq!(section_for(&c, "x@d.example"), None);
    assert_eq!(section_for(&c, "x@mx.e.example"), customers(None, 600));
    let s = c.engine.domain_section("bob@b.example").unwrap();
    let source = s.applied.source.as_deref().unwrap();
    assert_eq!(source, format!("{}:4", file.path().display()));
    // Three sections, the file's four lines each a section of their own after theirs;
    // "late" lists a.example after the file did: the file's line applied above.
    let names: Vec<&str> = c
        .engine
        .domains
        .sections()
        .iter()
        .map(|s| s.name())
        .collect();
    assert_eq!(
        names,
        [
            "vip@a.example",
            "customers",
            "customers",
            "customers",
            "customers",
            "customers",
            "late"
        ]
    );
}

#[test]
fn domain_section_errors_name_their_line() {
    let cases: &[(&str, usize, &str)] = &[
        (
            "[[domains]]\nrecipients = [\"a.example\"]\nmode = \"sometimes\"\n",
            3,
            "unknown variant",
        ),
        (
            "[[domains]]\nrecipients = [\"a.example\", \"not a domain\"]\n",
            2,
            "not a recipient pattern",
        ),
        (
            "[[domains]]\nmode = \"off\"\n",
            1,
            "needs recipients or files",
        ),
        (
            "[[domains]]\nrecipients = [\"a.example\"]\n\n[[domains]]\nname = \"a.example\"\nrecipients = [\"b.example\"]\n",
            5,
            "appears twice",
        ),
        (
            "[[domains]]\nrecipients = [\"a.example\"]\ndelay = \"3d\"\n",
            3,
            "longer than [greylist] retry_window",
        ),
        (
            "[[domains]]\nrecipients = [\"a.example\"]\nmode = \"off\"\ndelay = 60\n",
            4,
            "no effect with mode \"off\"",
        ),
        (
            "[dns]\nenabled = false\n[[domains]]\nrecipients = [\"a.example\"]\nverified_skip = true\n",
            5,
            "unless [dns] enabled",
        ),
        (
            "[dns]\nenabled = true\n[[domains]]\nrecipients = [\"a.example\"]\nverified_skip = true\nverified_delay = 5\n",
            6,
            "exclude each other",
        ),
        (
            "[[domains]]\nrecipients = [\"a.example\"]\nlevel = 3\n",
            3,
            "unknown field",
        ),
    ];
    for (text, line, want) in cases {
        let e = single_error(text);
        assert!(e.location.starts_with(&at_line(*line)), "{text}\n{e}");
        assert!(e.message.contains(want), "{text}\n{e}");
    }
}

#[test]
fn domain_file_errors_name_file_and_line() {
    let file = temp_file(
        "ok.example learn\n\
         bad..example off\n\
         c.example sometimes\n\
         d.example delay=3d\n\
         e.example off delay=5m\n\
         f.example learn off\n\
         g.example colour=blue\n\
         h.example verified_skip=true\n",
    );
    let list = errors(&format!(
        "[dns]\nenabled = false\n[[domains]]\nname = \"f\"\nfiles = [\"{}\", \"/nonexistent/greygate-domains\"]\n",
        toml_path(&file)
    ));
    let shown = file.path().display().to_string();
    assert!(list[0].location.starts_with(&at_line(5)), "{}", list[0]);
    let got: Vec<&str> = list[1..].iter().map(|e| e.location.as_str()).collect();
    let want: Vec<String> = (2..=8).map(|n| format!("{shown}:{n}")).collect();
    assert_eq!(got, want, "{list:?}");
    assert!(
        list[0]
            .message
            .contains("cannot read /nonexistent/greygate-domains")
    );
    for (i, part) in [
        "not a recipient pattern",
        "not a mode",
        "longer than [greylist] retry_window",
        "no effect with mode \"off\"",
        "given twice",
        "unknown setting \"colour\"",
        "unless [dns] enabled",
    ]
    .iter()
    .enumerate()
    {
        assert!(list[i + 1].message.contains(part), "{}", list[i + 1]);
    }
}

#[test]
fn domain_files_are_read_again_by_each_load() {
    // A reload validates the configuration anew: the file's current lines apply.
    let file = temp_file("a.example off\n");
    let text = format!(
        "[[domains]]\nname = \"hosted\"\nfiles = [\"{}\"]\n",
        toml_path(&file)
    );
    let before = valid(&text);
    assert_eq!(
        rule_for(&before, &rcpt("bob@a.example")),
        Some(Rule::DomainOff)
    );
    std::fs::write(file.path(), "b.example off\na.example learn\n").expect("rewrite");
    let after = valid(&text);
    assert_eq!(rule_for(&after, &rcpt("bob@a.example")), None);
    assert_eq!(
        section_for(&after, "bob@a.example"),
        Some(("hosted".into(), Some("learn"), None))
    );
    assert_eq!(
        rule_for(&after, &rcpt("bob@b.example")),
        Some(Rule::DomainOff)
    );
}

#[test]
fn a_sections_inline_recipients_come_before_its_files_lines() {
    let file = temp_file("a.example off\nb.example off\n");
    let c = valid(&format!(
        "[[domains]]\nname = \"s\"\nrecipients = [\"a.example\"]\nmode = \"learn\"\nfiles = [\"{}\"]\n",
        toml_path(&file)
    ));
    assert_eq!(
        section_for(&c, "x@a.example"),
        Some(("s".into(), Some("learn"), None))
    );
    assert_eq!(
        section_for(&c, "x@b.example"),
        Some(("s".into(), Some("off"), None))
    );
}

#[test]
fn a_sections_verified_keys_replace_both_global_ones() {
    let c = valid(
        "[dns]\nenabled = true\n[identity]\nverified_delay = 60\n\n\
         [[domains]]\nrecipients = [\"no-skip.example\"]\nverified_skip = false\n\n\
         [[domains]]\nrecipients = [\"skip.example\"]\nverified_skip = true\n\n\
         [[domains]]\nrecipients = [\"short.example\"]\nverified_delay = \"10s\"\n\n\
         [[domains]]\nrecipients = [\"inherit.example\"]\ndelay = 600\n",
    );
    let verified = |d: &str| c.engine.domain_section(&format!("x@{d}")).unwrap().verified;
    assert_eq!(
        verified("no-skip.example"),
        Some(VerifiedTreatment::Greylist)
    );
    assert_eq!(verified("skip.example"), Some(VerifiedTreatment::Skip));
    assert_eq!(
        verified("short.example"),
        Some(VerifiedTreatment::Delay(10))
    );
    assert_eq!(verified("inherit.example"), None);
}

// ---------------------------------------------------------------------------------------
// [lists]
// ---------------------------------------------------------------------------------------

#[test]
fn lists_default_to_the_built_in_domains_and_their_file() {
    let c = valid("");
    assert_eq!(c.lists, crate::lists::ListsSettings::default());
    assert!(c.lists.domains.contains(&"_spf.google.com".to_string()));
    assert_eq!(
        c.lists.output,
        std::path::Path::new(crate::lists::DEFAULT_OUTPUT)
    );
    assert_eq!(
        built_in_comment("amazonses.com"),
        Some("Amazon SES (every region)")
    );
    let c =
        valid("[lists]\ndomains = ['A.example.', 'b.example']\nextra_domains = ['c.example']\n");
    assert_eq!(c.lists.domains, ["a.example", "b.example", "c.example"]);
}

#[test]
fn lists_domains_must_be_names_each_once() {
    let list = errors(
        "[lists]\ndomains = ['a.example', 'not a domain']\nextra_domains = ['A.example']\noutput = ''\n",
    );
    let messages: Vec<&str> = list.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(list[0].location.starts_with(&at_line(2)), "{list:?}");
    assert!(messages[0].contains("not a domain name"), "{messages:?}");
    assert!(list[1].location.starts_with(&at_line(3)), "{list:?}");
    assert!(messages[1].contains("appears twice"), "{messages:?}");
    assert!(messages[2].contains("needs a path"), "{messages:?}");
}

#[test]
fn lists_output_is_a_client_allow_list_when_it_exists() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("big-senders");
    let text = format!("[lists]\noutput = '{}'\n", out.display());
    // Missing: no entries, no error.
    assert_eq!(valid(&text).engine.allow.counts(), (0, 2, 0));
    std::fs::write(&out, "# generated\n192.0.2.0/24  # a.example\n").expect("write");
    let c = valid(&text);
    assert_eq!(c.engine.allow.counts(), (1, 2, 0));
    let req = Request {
        client_ip: Some("192.0.2.9".parse().expect("ip")),
        ..rcpt("bob@rcpt.example")
    };
    let Classified::Decided(d) = c.engine.classify(&req, 0) else {
        panic!("client should be allow-listed");
    };
    assert_eq!(d.rule, Rule::AllowClientAddress);
    assert!(
        d.detail
            .expect("origin")
            .contains(&format!("{}:2", out.display()))
    );
    // A damaged file is reported at its line, as any allow list.
    std::fs::write(&out, "192.0.2.0/24\nnot an entry\n").expect("write");
    let e = single_error(&text);
    assert_eq!(e.location, format!("{}:2", out.display()));
}

#[test]
fn hashed_addresses_need_one_good_secret() {
    let plain = valid("[store]\nbackend = \"memory\"\n");
    assert!(!plain.engine.addresses.is_hashed());
    assert_eq!(plain.store.addresses, "plain");

    let hashed = valid(
        "[store]\nbackend = \"memory\"\nhash_addresses = true\nhash_secret = \"0123456789abcdef\"\n",
    );
    assert!(hashed.engine.addresses.is_hashed());
    assert!(hashed.store.addresses.starts_with("hmac-sha256:"));
    assert_eq!(hashed.store.addresses, hashed.engine.addresses.store_mode());
    assert!(
        !format!("{hashed:?}").contains("0123456789abcdef"),
        "the secret is never printed"
    );

    let e = single_error("[store]\nhash_addresses = true\n");
    assert!(e.message.contains("needs a secret"), "{}", e.message);
    let e = single_error("[store]\nhash_addresses = true\nhash_secret = \"short\"\n");
    assert!(e.message.contains("at least 16"), "{}", e.message);
    assert!(e.location.starts_with(&at_line(3)), "{}", e.location);
    let e = single_error("[store]\nhash_secret = \"0123456789abcdef\"\n");
    assert!(
        e.message.contains("hash_addresses is false"),
        "{}",
        e.message
    );
    let e = single_error(
        "[store]\nhash_addresses = true\nhash_secret = \"0123456789abcdef\"\n\
         hash_secret_file = \"/nonexistent\"\n",
    );
    assert!(e.message.contains("not both"), "{}", e.message);

    // From a file: private, its trailing newline trimmed (the same key as inline).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "0123456789abcdef\r\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let from_file = valid(&format!(
        "[store]\nbackend = \"memory\"\nhash_addresses = true\nhash_secret_file = {:?}\n",
        file.display().to_string()
    ));
    assert_eq!(from_file.engine.addresses, hashed.engine.addresses);
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o604)).unwrap();
    let e = single_error(&format!(
        "[store]\nhash_addresses = true\nhash_secret_file = {:?}\n",
        file.display().to_string()
    ));
    assert!(e.message.contains("chmod 600"), "{}", e.message);
}

#[test]
fn entries_poll_is_bounded_and_shared_stores_default_to_a_file_to_import() {
    let c = valid("[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1/\"\n");
    assert_eq!(c.admin.entries_poll, Duration::from_secs(1));
    assert_eq!(
        c.admin.entries_file,
        Some("/var/lib/greygate/runtime-entries.json".into())
    );
    let c = valid("[admin]\nentries_poll = \"250ms\"\n");
    assert_eq!(c.admin.entries_poll, Duration::from_millis(250));
    for bad in ["\"50ms\"", "\"2m\"", "0"] {
        let e = single_error(&format!("[admin]\nentries_poll = {bad}\n"));
        assert!(
            e.message
                .contains("entries_poll must be between 100ms and 60s"),
            "{bad}: {}",
            e.message
        );
    }
}
