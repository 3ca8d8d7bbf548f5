//! Static allow lists: client IP/CIDR, client host name (exact, `.suffix`, `/regex/`),
//! recipient and sender (`user@domain`, `@domain`, `user@`).
//!
//! Lists are built once from config and files, then only read; every entry remembers where
//! it came from so an explanation can say "allowed by /etc/greygate/allow-clients:12".

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

use super::normalize::{canonical_ip, strip_envelope};

/// Where an allow entry was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File path, or `config` for entries written in the configuration file.
    pub source: Arc<str>,
    /// 1-based line number in a file; 0 for config entries.
    pub line: usize,
    /// The entry as written.
    pub entry: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{:?} ({})", self.entry, self.source)
        } else {
            write!(f, "{:?} ({}:{})", self.entry, self.source, self.line)
        }
    }
}

/// An allow entry that could not be parsed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{source_name}{}: {message}", line_suffix(*.line))]
pub struct AllowError {
    pub source_name: String,
    pub line: usize,
    pub message: String,
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// Longest regex source accepted; keeps compiled automata small.
const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Default)]
struct AddressList {
    full: HashSet<String>,
    domains: HashSet<String>,
    locals: HashSet<String>,
    origins: Vec<(String, Origin)>,
}

impl AddressList {
    fn add(&mut self, entry: &str, origin: Origin) -> Result<(), String> {
        let e = entry.trim().to_lowercase();
        let Some(at) = e.rfind('@') else {
            return Err(format!(
                "{entry:?} is not an address entry (use user@domain, @domain or user@)"
            ));
        };
        let (local, domain) = (&e[..at], &e[at + 1..]);
        match (local.is_empty(), domain.is_empty()) {
            (true, true) => return Err("\"@\" alone matches nothing".into()),
            (true, false) => self.domains.insert(domain.to_string()),
            (false, true) => self.locals.insert(local.to_string()),
            (false, false) => self.full.insert(e.clone()),
        };
        self.origins.push((e, origin));
        Ok(())
    }

    /// `addr` is already normalised (lower-case, extension stripped).
    fn find(&self, addr: &str) -> Option<&Origin> {
        let (local, domain) = addr.rsplit_once('@').unwrap_or((addr, ""));
        let hit = if self.full.contains(addr) {
            addr.to_string()
        } else if !domain.is_empty() && self.domains.contains(domain) {
            format!("@{domain}")
        } else if !local.is_empty() && self.locals.contains(local) {
            format!("{local}@")
        } else {
            return None;
        };
        self.origins.iter().find(|(e, _)| *e == hit).map(|(_, o)| o)
    }

    fn len(&self) -> usize {
        self.origins.len()
    }
}

/// Which list matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowKind {
    ClientAddress,
    ClientName,
    Recipient,
    Sender,
}

/// The static allow lists.
#[derive(Debug, Default)]
pub struct AllowLists {
    nets: Vec<(IpNet, Origin)>,
    names: Vec<(String, Origin)>,
    suffixes: Vec<(String, Origin)>,
    regexes: Vec<(Regex, Origin)>,
    recipients: AddressList,
    senders: AddressList,
}

impl AllowLists {
    /// Adds one client entry: an IP address, a CIDR network, a host name, a `.suffix` or a `/regex/`.
    pub fn add_client(&mut self, entry: &str, origin: Origin) -> Result<(), String> {
        let e = entry.trim();
        if let Some(body) = e.strip_prefix('/') {
            let Some(pattern) = body.strip_suffix('/') else {
                return Err(format!("regex entry {e:?} must end with '/'"));
            };
            if pattern.len() > MAX_REGEX_LEN {
                return Err(format!("regex longer than {MAX_REGEX_LEN} characters"));
            }
            let re = RegexBuilder::new(pattern)
                .case_insensitive(true)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|err| format!("bad regex {pattern:?}: {err}"))?;
            self.regexes.push((re, origin));
        } else if let Ok(ip) = e.parse::<IpAddr>() {
            let ip = canonical_ip(ip);
            self.nets.push((IpNet::from(ip), origin));
        } else if let Ok(net) = e.parse::<IpNet>() {
            self.nets.push((canonical_net(net), origin));
        } else if e.contains('/')
            || e.contains(':')
            || e.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(format!("{e:?} is neither an IP address nor a CIDR network"));
        } else if let Some(suffix) = e.strip_prefix('.') {
            // Client names are compared without a trailing root dot; so are entries.
            let suffix = suffix.trim_end_matches('.');
            check_host_name(suffix, e)?;
            self.suffixes
                .push((format!(".{}", suffix.to_ascii_lowercase()), origin));
        } else {
            let name = e.trim_end_matches('.');
            check_host_name(name, e)?;
            self.names.push((name.to_ascii_lowercase(), origin));
        }
        Ok(())
    }

    /// Adds a recipient entry: `user@domain`, `@domain` or `user@`.
    pub fn add_recipient(&mut self, entry: &str, origin: Origin) -> Result<(), String> {
        self.recipients.add(entry, origin)
    }

    /// Adds a sender entry: `user@domain`, `@domain` or `user@`.
    pub fn add_sender(&mut self, entry: &str, origin: Origin) -> Result<(), String> {
        self.senders.add(entry, origin)
    }

    /// Reads a file of entries, one per line; `#` starts a comment. Every bad line is reported.
    pub fn add_file(
        &mut self,
        path: &Path,
        text: &str,
        add: fn(&mut Self, &str, Origin) -> Result<(), String>,
    ) -> Result<(), Vec<AllowError>> {
        let source: Arc<str> = Arc::from(path.display().to_string());
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let entry = strip_comment(raw).trim();
            if entry.is_empty() {
                continue;
            }
            let origin = Origin {
                source: source.clone(),
                line: i + 1,
                entry: entry.to_string(),
            };
            if let Err(message) = add(self, entry, origin) {
                errors.push(AllowError {
                    source_name: source.to_string(),
                    line: i + 1,
                    message,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Matches the client by address, then by verified host name (`unknown` never matches).
    pub fn match_client(&self, ip: IpAddr, name: &str) -> Option<(AllowKind, &Origin)> {
        let ip = canonical_ip(ip);
        if let Some((_, o)) = self.nets.iter().find(|(net, _)| net.contains(&ip)) {
            return Some((AllowKind::ClientAddress, o));
        }
        if name.is_empty() || name.eq_ignore_ascii_case("unknown") {
            return None;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let found = self
            .names
            .iter()
            .find(|(n, _)| *n == name)
            .or_else(|| self.suffixes.iter().find(|(s, _)| name.ends_with(s)))
            .map(|(_, o)| o)
            .or_else(|| {
                self.regexes
                    .iter()
                    .find(|(re, _)| re.is_match(&name))
                    .map(|(_, o)| o)
            });
        found.map(|o| (AllowKind::ClientName, o))
    }

    /// Matches a recipient by its normalised form (what the key uses) or, failing that,
    /// as received (lower-cased), so an entry written with an extension still matches.
    pub fn match_recipient(&self, normalised: &str, raw: &str) -> Option<&Origin> {
        find_either(&self.recipients, normalised, raw)
    }

    /// Matches a sender like [`AllowLists::match_recipient`]; `raw` keeps VERP numbers,
    /// extensions and BATV tags that normalisation removes.
    pub fn match_sender(&self, normalised: &str, raw: &str) -> Option<&Origin> {
        find_either(&self.senders, normalised, raw)
    }

    /// Number of entries per list: (clients, recipients, senders).
    pub fn counts(&self) -> (usize, usize, usize) {
        let clients = self.nets.len() + self.names.len() + self.suffixes.len() + self.regexes.len();
        (clients, self.recipients.len(), self.senders.len())
    }
}

fn find_either<'a>(list: &'a AddressList, normalised: &str, raw: &str) -> Option<&'a Origin> {
    if list.len() == 0 {
        return None;
    }
    list.find(normalised).or_else(|| {
        // Most addresses normalise to themselves lower-cased: no second look for those.
        let raw = strip_envelope(raw);
        if raw.eq_ignore_ascii_case(normalised) {
            return None;
        }
        list.find(&raw.to_lowercase())
    })
}

/// IPv4-mapped IPv6 networks (`::ffff:192.0.2.0/120`) become IPv4 networks, since client
/// addresses are matched in their IPv4 form; host bits are cleared.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n.trunc());
    }
    net.trunc()
}

/// `#` starts a comment at the start of a line or after white space, so a regex such as
/// `/^mx#1\./` keeps its `#`.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn check_host_name(name: &str, entry: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{entry:?} is not a host name, .suffix, /regex/, IP address or CIDR network"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(entry: &str) -> Origin {
        Origin {
            source: Arc::from("test"),
            line: 1,
            entry: entry.into(),
        }
    }

    fn lists(clients: &[&str], recipients: &[&str]) -> AllowLists {
        let mut a = AllowLists::default();
        for c in clients {
            a.add_client(c, origin(c)).unwrap();
        }
        for r in recipients {
            a.add_recipient(r, origin(r)).unwrap();
        }
        a
    }

    #[test]
    fn client_matching_table() {
        let a = lists(
            &[
                "192.0.2.0/24",
                "198.51.100.7",
                "2001:db8:1::/48",
                "mail.example.com",
                ".example.net",
                "/^mx[0-9]+\\.example\\.org$/",
            ],
            &[],
        );
        type Case<'a> = (&'a str, &'a str, Option<(AllowKind, &'a str)>);
        let cases: &[Case] = &[
            (
                "192.0.2.200",
                "unknown",
                Some((AllowKind::ClientAddress, "192.0.2.0/24")),
            ),
            (
                "::ffff:192.0.2.1",
                "unknown",
                Some((AllowKind::ClientAddress, "192.0.2.0/24")),
            ),
            ("192.0.3.1", "unknown", None),
            (
                "198.51.100.7",
                "x",
                Some((AllowKind::ClientAddress, "198.51.100.7")),
            ),
            ("198.51.100.8", "x", None),
            (
                "2001:db8:1:ff::1",
                "",
                Some((AllowKind::ClientAddress, "2001:db8:1::/48")),
            ),
            ("2001:db8:2::1", "", None),
            (
                "203.0.113.1",
                "MAIL.example.com",
                Some((AllowKind::ClientName, "mail.example.com")),
            ),
            (
                "203.0.113.1",
                "mail.example.com.",
                Some((AllowKind::ClientName, "mail.example.com")),
            ),
            ("203.0.113.1", "other.example.com", None),
            (
                "203.0.113.1",
                "a.b.example.net",
                Some((AllowKind::ClientName, ".example.net")),
            ),
            ("203.0.113.1", "example.net", None),
            ("203.0.113.1", "badexample.net", None),
            (
                "203.0.113.1",
                "mx12.example.org",
                Some((AllowKind::ClientName, "/^mx[0-9]+\\.example\\.org$/")),
            ),
            ("203.0.113.1", "mx.example.org", None),
            ("203.0.113.1", "unknown", None),
        ];
        for (ip, name, want) in cases {
            let got = a
                .match_client(ip.parse().unwrap(), name)
                .map(|(k, o)| (k, o.entry.as_str()));
            assert_eq!(got, *want, "{ip} {name}");
        }
    }

    #[test]
    fn address_matching_table() {
        let a = lists(&[], &["postmaster@", "@partner.example", "ceo@example.com"]);
        let cases = [
            ("postmaster@anything.example", Some("postmaster@")),
            ("bob@partner.example", Some("@partner.example")),
            ("bob@sub.partner.example", None),
            ("ceo@example.com", Some("ceo@example.com")),
            ("cfo@example.com", None),
            ("postmaster", Some("postmaster@")),
        ];
        for (addr, want) in cases {
            assert_eq!(
                a.match_recipient(addr, addr).map(|o| o.entry.as_str()),
                want,
                "{addr}"
            );
            assert!(a.match_sender(addr, addr).is_none());
        }
    }

    #[test]
    fn address_entries_match_as_written_or_normalised() {
        let mut a = AllowLists::default();
        for e in [
            "newsletter-2024@partner.example",
            "bob+tag@x.example",
            "ceo@y.example",
        ] {
            a.add_sender(e, origin(e)).unwrap();
            a.add_recipient(e, origin(e)).unwrap();
        }
        // (normalised form the key uses, as received, expected entry)
        let cases = [
            (
                "newsletter-#@partner.example",
                "Newsletter-2024@Partner.example",
                Some("newsletter-2024@partner.example"),
            ),
            (
                "newsletter-#@partner.example",
                "newsletter-2025@partner.example",
                None,
            ),
            (
                "bob@x.example",
                "<bob+tag@x.example>",
                Some("bob+tag@x.example"),
            ),
            ("bob@x.example", "bob+other@x.example", None),
            (
                "ceo@y.example",
                "ceo+board@y.example",
                Some("ceo@y.example"),
            ),
        ];
        for (normalised, raw, want) in cases {
            let got = a.match_sender(normalised, raw).map(|o| o.entry.as_str());
            assert_eq!(got, want, "sender {raw}");
            let got = a.match_recipient(normalised, raw).map(|o| o.entry.as_str());
            assert_eq!(got, want, "recipient {raw}");
        }
    }

    #[test]
    fn ipv4_mapped_networks_match_ipv4_clients() {
        let a = lists(&["::ffff:192.0.2.0/120"], &[]);
        for ip in ["192.0.2.1", "::ffff:192.0.2.255"] {
            assert!(a.match_client(ip.parse().unwrap(), "").is_some(), "{ip}");
        }
        assert!(a.match_client("192.0.3.1".parse().unwrap(), "").is_none());
    }

    #[test]
    fn bad_entries_are_rejected_with_a_reason() {
        let mut a = AllowLists::default();
        for bad in [
            "192.0.2.0/33",
            "300.1.2.3",
            "/unterminated",
            "/(/",
            "host name",
            "fe80::zz",
        ] {
            assert!(a.add_client(bad, origin(bad)).is_err(), "{bad}");
        }
        for bad in ["nobody", "@"] {
            assert!(a.add_recipient(bad, origin(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_report_every_bad_line() {
        let mut a = AllowLists::default();
        let text = "# partners\n192.0.2.0/24  # office\n\nnot a host\n.example.com\n300.0.0.1\n/^mx#1\\./ # hash in a regex\nmail.example.org.\n";
        let errs = a
            .add_file(Path::new("clients"), text, AllowLists::add_client)
            .unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 6]);
        assert!(errs[0].to_string().starts_with("clients:4: "));
        assert_eq!(a.counts().0, 4);
        assert!(
            a.match_client("192.0.3.1".parse().unwrap(), "mx#1.x")
                .is_some()
        );
        assert!(
            a.match_client("192.0.3.1".parse().unwrap(), "mail.example.org")
                .is_some()
        );
    }
}
