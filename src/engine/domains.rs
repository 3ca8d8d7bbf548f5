//! Per-recipient-domain policy: sections that match recipient domains and addresses and
//! change how their mail is greylisted — not at all (`off`), recorded but never deferred
//! (`learn`), or enforced with their own delays.
//!
//! Sections are kept in the order they were written; the first whose pattern matches a
//! recipient applies. Matching is a few hash lookups (the address, the domain, each parent
//! domain for `*.` patterns), whatever the number of sections: a hosting provider's file of
//! thousands of customer domains costs no more per request than one section.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::VerifiedTreatment;
use super::normalize::{normalize_recipient, strip_envelope};

/// How a section greylists its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainMode {
    /// Not greylisted: accepted at once (rule `domain-off`).
    Off,
    /// Decided and recorded as if enforcing, but never deferred.
    Learn,
    /// Greylisted, even when the global `mode` is `learn`.
    Enforce,
}

impl DomainMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainMode::Off => "off",
            DomainMode::Learn => "learn",
            DomainMode::Enforce => "enforce",
        }
    }

    /// The inverse of [`DomainMode::as_str`].
    pub fn parse(s: &str) -> Option<DomainMode> {
        match s {
            "off" => Some(DomainMode::Off),
            "learn" => Some(DomainMode::Learn),
            "enforce" => Some(DomainMode::Enforce),
            _ => None,
        }
    }
}

/// Shared text (a section's name, where it was written): decisions carry it without copying.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedStr(pub Arc<str>);

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(Arc::from(s))
    }
}

impl Serialize for SharedStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SharedStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| SharedStr(Arc::from(s)))
    }
}

/// The section that applied to a request, as decisions, logs and explanations name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainApplied {
    /// The section's `name`.
    pub name: SharedStr,
    /// `file:line` for a line of a section's domain file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SharedStr>,
    /// The section's mode; `None` inherits the global one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<DomainMode>,
}

/// One section's settings, each `None` when it inherits the global setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSection {
    pub applied: DomainApplied,
    /// Replaces `[greylist] delay` for its recipients.
    pub delay: Option<u64>,
    /// Replaces `[identity] verified_delay`/`verified_skip` for its recipients.
    pub verified: Option<VerifiedTreatment>,
}

impl DomainSection {
    pub fn name(&self) -> &str {
        &self.applied.name
    }

    pub fn mode(&self) -> Option<DomainMode> {
        self.applied.mode
    }
}

/// What a recipient pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternKind {
    /// `user@example.org`: that address (after its extension is stripped).
    Address,
    /// `example.com` (or `@example.com`): addresses at that domain.
    Domain,
    /// `*.example.net`: addresses at any subdomain of it (not at it itself).
    Subdomains,
}

/// The longest recipient matched without allocating; longer ones are lower-cased on the heap.
const STACK_ADDRESS: usize = 320;

/// The sections, in precedence order, and their patterns hashed for lookup.
#[derive(Debug, Default, Clone)]
pub struct DomainPolicies {
    sections: Vec<DomainSection>,
    /// Lower-cased pattern → index of the first section that lists it.
    addresses: HashMap<Box<str>, u32>,
    domains: HashMap<Box<str>, u32>,
    /// `*.example.net` is kept as `example.net`.
    subdomains: HashMap<Box<str>, u32>,
}

impl DomainPolicies {
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// The sections, in precedence order.
    pub fn sections(&self) -> &[DomainSection] {
        &self.sections
    }

    /// Appends a section (after every earlier one: it applies only where they do not);
    /// returns its index for [`DomainPolicies::add_pattern`].
    pub fn push(&mut self, section: DomainSection) -> usize {
        self.sections.push(section);
        self.sections.len() - 1
    }

    /// Checks a recipient pattern and says what it matches, lower-cased (`*.` removed).
    pub fn parse_pattern(pattern: &str) -> Result<(PatternKind, String), String> {
        let p = pattern.trim().to_lowercase();
        let bad = || {
            format!(
                "{pattern:?} is not a recipient pattern (write example.com, *.example.com or \
                 user@example.com)"
            )
        };
        if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (kind, rest) = if let Some((local, domain)) = p.rsplit_once('@') {
            if local.is_empty() {
                (PatternKind::Domain, domain.to_string())
            } else {
                check_domain(domain).map_err(|_| bad())?;
                return Ok((PatternKind::Address, p));
            }
        } else if let Some(parent) = p.strip_prefix("*.") {
            (PatternKind::Subdomains, parent.to_string())
        } else {
            (PatternKind::Domain, p)
        };
        check_domain(&rest).map_err(|_| bad())?;
        Ok((kind, rest))
    }

    /// Lets section `index` match `pattern`. A pattern an earlier section already lists
    /// stays with it (the first match wins); the answer says whether this one got it.
    pub fn add_pattern(&mut self, index: usize, pattern: &str) -> Result<bool, String> {
        let (kind, key) = Self::parse_pattern(pattern)?;
        let index = u32::try_from(index).map_err(|_| "too many sections".to_string())?;
        let map = match kind {
            PatternKind::Address => &mut self.addresses,
            PatternKind::Domain => &mut self.domains,
            PatternKind::Subdomains => &mut self.subdomains,
        };
        let got = map.entry(key.into_boxed_str()).or_insert(index);
        Ok(*got == index)
    }

    /// The first section that matches `recipient` (as received: angle brackets, any case,
    /// an extension after one of `delimiters`).
    pub fn find(&self, recipient: &str, delimiters: &str) -> Option<&DomainSection> {
        if self.sections.is_empty() {
            return None;
        }
        let mut buf = [0u8; STACK_ADDRESS];
        let addr: Cow<'_, str> = match lower_on_stack(recipient, delimiters, &mut buf) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(normalize_recipient(recipient, delimiters)),
        };
        let domain = addr.rsplit_once('@').map_or("", |(_, d)| d);
        let mut best: Option<u32> = None;
        let mut consider = |hit: Option<&u32>| {
            if let Some(&i) = hit {
                best = Some(best.map_or(i, |b| b.min(i)));
            }
        };
        if !self.addresses.is_empty() {
            consider(self.addresses.get(&*addr));
        }
        if !domain.is_empty() {
            consider(self.domains.get(domain));
            if !self.subdomains.is_empty() {
                for (i, b) in domain.bytes().enumerate() {
                    if b == b'.' {
                        consider(self.subdomains.get(&domain[i + 1..]));
                    }
                }
            }
        }
        best.map(|i| &self.sections[i as usize])
    }
}

/// The recipient lower-cased and its extension stripped in `buf`, when it is ASCII and fits
/// (the same text as `normalize_recipient` makes on the heap).
fn lower_on_stack<'b>(recipient: &str, delimiters: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    let raw = strip_envelope(recipient);
    if !raw.is_ascii() || raw.len() > buf.len() {
        return None;
    }
    let local_len = raw.rfind('@').unwrap_or(raw.len());
    let local = &raw[..local_len];
    let kept = match local.find(|c| delimiters.contains(c)) {
        Some(i) if i > 0 => i,
        _ => local_len,
    };
    let rest = &raw[local_len..];
    let len = kept + rest.len();
    buf[..kept].copy_from_slice(&raw.as_bytes()[..kept]);
    buf[kept..len].copy_from_slice(rest.as_bytes());
    buf[..len].make_ascii_lowercase();
    std::str::from_utf8(&buf[..len]).ok()
}

/// A domain name as patterns write it: labels of letters, digits, `-` and `_` (or any
/// non-ASCII, for internationalised names), no empty label.
fn check_domain(d: &str) -> Result<(), ()> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        });
    if ok { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(name: &str) -> DomainSection {
        DomainSection {
            applied: DomainApplied {
                name: name.into(),
                source: None,
                mode: None,
            },
            delay: None,
            verified: None,
        }
    }

    fn policies(sections: &[(&str, &[&str])]) -> DomainPolicies {
        let mut d = DomainPolicies::default();
        for (name, patterns) in sections {
            let i = d.push(section(name));
            for p in *patterns {
                d.add_pattern(i, p).unwrap();
            }
        }
        d
    }

    #[test]
    fn pattern_matching_table() {
        let d = policies(&[
            ("ceo", &["CEO@Example.org"]),
            ("org", &["example.org", "@example.com"]),
            ("net-subs", &["*.example.net"]),
            ("deep", &["a.b.example.net"]),
        ]);
        let cases: &[(&str, Option<&str>)] = &[
            ("ceo@example.org", Some("ceo")),
            ("<CEO+news@EXAMPLE.ORG>", Some("ceo")),
            ("other@example.org", Some("org")),
            ("x@example.com", Some("org")),
            ("x@sub.example.org", None),
            ("x@example.net", None),
            ("x@mx.example.net", Some("net-subs")),
            // An earlier `*.` section outranks a later exact domain.
            ("x@a.b.example.net", Some("net-subs")),
            ("x@notexample.net", None),
            ("example.org", None),
            ("", None),
            ("x@", None),
            ("x@éxample.org", None),
        ];
        for (rcpt, want) in cases {
            let got = d.find(rcpt, "+").map(DomainSection::name);
            assert_eq!(got, *want, "{rcpt:?}");
        }
    }

    #[test]
    fn first_section_in_order_wins_whatever_the_pattern_kind() {
        // A domain section written before an address section wins for that address too.
        let d = policies(&[
            ("domain", &["example.org"]),
            ("address", &["a@example.org"]),
        ]);
        assert_eq!(d.find("a@example.org", "+").unwrap().name(), "domain");
        let d = policies(&[
            ("address", &["a@example.org"]),
            ("domain", &["example.org"]),
        ]);
        assert_eq!(d.find("a@example.org", "+").unwrap().name(), "address");
        assert_eq!(d.find("b@example.org", "+").unwrap().name(), "domain");
        // The same pattern in a later section stays with the first.
        let mut d = policies(&[("first", &["example.org"])]);
        let i = d.push(section("second"));
        assert_eq!(d.add_pattern(i, "EXAMPLE.org"), Ok(false));
        assert_eq!(d.find("a@example.org", "+").unwrap().name(), "first");
    }

    #[test]
    fn long_and_non_ascii_recipients_match_like_short_ones() {
        let local = "l".repeat(400);
        let d = policies(&[("long", &["example.org"]), ("idn", &["bücher.example"])]);
        let long = format!("{local}+ext@Example.ORG");
        assert_eq!(d.find(&long, "+").unwrap().name(), "long");
        assert_eq!(d.find("Kunde@BÜCHER.example", "+").unwrap().name(), "idn");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "   ",
            "*.",
            "@",
            "a@",
            "exa mple.org",
            "example..org",
            ".example.org",
            "*",
            "a@b@",
            "x@*.example.org",
        ] {
            assert!(DomainPolicies::parse_pattern(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            DomainPolicies::parse_pattern(" Example.ORG ").unwrap(),
            (PatternKind::Domain, "example.org".into())
        );
        assert_eq!(
            DomainPolicies::parse_pattern("*.Example.net").unwrap(),
            (PatternKind::Subdomains, "example.net".into())
        );
        assert_eq!(
            DomainPolicies::parse_pattern("U@Example.net").unwrap(),
            (PatternKind::Address, "u@example.net".into())
        );
    }
}
