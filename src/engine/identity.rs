//! Client identity: which "client" a greylisting key names — an IP prefix, an SPF-authorised
//! sender domain, or the organisation behind a forward-confirmed host name — chosen purely
//! from facts that a DNS layer (or a simulator) found out before the engine runs.
//!
//! Big senders retry from another address of a pool, often in another /24, so a key on the
//! IP prefix never matches the retry. When the sender's SPF authorises the address, or the
//! host's name is forward-confirmed and not a residential pool, the retry from any pool
//! member carries the same identity. Missing, failed or timed-out facts never block mail:
//! they only make the choice fall back to the prefix, today's behaviour.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::normalize::{canonical_ip, strip_envelope};

/// The kinds of identity, in the words of the configuration (`[identity] order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// `spf:<domain>`: the envelope sender's domain publishes SPF that passes for the IP.
    Spf,
    /// `org:<registrable domain>` of a forward-confirmed, non-dynamic host name.
    Org,
    /// The IP prefix (`192.0.2.0/24`, `2001:db8::/64`): always available, always last.
    Prefix,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Spf => "spf",
            IdentityKind::Org => "org",
            IdentityKind::Prefix => "prefix",
        }
    }

    /// Whether the identity rests on verified DNS facts (SPF or FCrDNS), not just the address.
    pub fn is_verified(self) -> bool {
        self != IdentityKind::Prefix
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default order: SPF first (it names who *authorised* the address), then the host's
/// organisation, then the prefix. Without DNS facts every request ends at the prefix.
pub const DEFAULT_ORDER: [IdentityKind; 3] =
    [IdentityKind::Spf, IdentityKind::Org, IdentityKind::Prefix];

/// RFC 7208 results, plus `Timeout` for a check the DNS budget cut short and `PassAny` for
/// a pass that says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    Pass,
    /// The record passes, but would pass addresses nobody can sensibly authorise too
    /// (`+all`, `ip4:0.0.0.0/0`, ...): it names no pool, so it gives no identity. Identities
    /// earn auto-allow, so `spf:<domain>` must never stand for "anyone who says so".
    #[serde(rename = "pass-any")]
    PassAny,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
    Timeout,
}

impl SpfResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::PassAny => "pass-any",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
            SpfResult::Timeout => "timeout",
        }
    }
}

/// The SPF check of (domain, client IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpfFact {
    /// The domain checked: the envelope sender's domain.
    pub domain: String,
    pub result: SpfResult,
}

/// What forward-confirmed reverse DNS found for the client IP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostName {
    /// Not looked up (or the front end had nothing to say).
    #[default]
    Unknown,
    /// A PTR name whose A/AAAA records contain the client IP (Postfix's `client_name`).
    Verified(String),
    /// No PTR, or no PTR name that resolves back to the IP.
    Unverified,
    /// The lookups failed or ran out of budget.
    Timeout,
}

/// What the configured DNS lists said about the client IP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Zones that list the client.
    pub hits: Vec<String>,
    /// Every configured zone answered (listed or not); false when one failed or timed out,
    /// so "not listed" cannot be claimed.
    pub complete: bool,
}

impl Listing {
    /// Listed by at least one zone.
    pub fn listed(&self) -> bool {
        !self.hits.is_empty()
    }

    /// Every zone answered and none lists the client.
    pub fn clean(&self) -> bool {
        self.complete && self.hits.is_empty()
    }
}

/// Everything the engine may use to identify a client and adjust its treatment, gathered
/// outside the engine before it runs. A request without facts (DNS off) is keyed on the
/// IP prefix exactly as before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityFacts {
    /// The SPF check of the envelope sender's domain; `None` when not made (null sender,
    /// SPF not wanted).
    pub spf: Option<SpfFact>,
    pub name: HostName,
    pub dnswl: Listing,
    pub dnsbl: Listing,
}

impl IdentityFacts {
    /// Some lookup ran out of time or failed: the explanation says so.
    pub fn timed_out(&self) -> bool {
        self.spf
            .as_ref()
            .is_some_and(|s| matches!(s.result, SpfResult::Timeout | SpfResult::TempError))
            || self.name == HostName::Timeout
    }
}

/// The chosen identity's kind and why, as decisions and explanations carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReason {
    pub kind: IdentityKind,
    /// Human text: what was chosen from which fact, and why earlier kinds were passed over.
    pub reason: Cow<'static, str>,
}

/// A client identity: the key string and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `192.0.2.0/24`, `spf:example.com` or `org:outlook.com`.
    pub key: String,
    pub why: IdentityReason,
}

/// The reason of every choice made without facts: static, so the hot path allocates nothing.
const NO_FACTS: &str = "IP prefix: no DNS facts";

/// Applies `order` to the facts; the prefix (built by `prefix` only when chosen) ends every
/// order. `sender` is the envelope sender as received: SPF facts count only when they are
/// for its domain, so facts gathered for another request cannot leak in.
pub fn choose(
    order: &[IdentityKind],
    ip: IpAddr,
    sender: &str,
    facts: Option<&IdentityFacts>,
    prefix: impl FnOnce() -> String,
) -> Identity {
    let Some(facts) = facts else {
        return Identity {
            key: prefix(),
            why: IdentityReason {
                kind: IdentityKind::Prefix,
                reason: Cow::Borrowed(NO_FACTS),
            },
        };
    };
    // Why earlier kinds were passed over, written straight into one buffer as they are.
    let mut passed_over = String::with_capacity(128);
    for &kind in order {
        let mark = passed_over.len();
        passed_over.push_str(if mark == 0 { "" } else { "; not " });
        passed_over.push_str(kind.as_str());
        passed_over.push_str(": ");
        let found = match kind {
            IdentityKind::Spf => spf_identity(sender, facts.spf.as_ref(), &mut passed_over),
            IdentityKind::Org => org_identity(ip, &facts.name, &mut passed_over),
            IdentityKind::Prefix => {
                passed_over.truncate(mark);
                break;
            }
        };
        if let Some((key, reason)) = found {
            passed_over.truncate(mark);
            return Identity {
                key,
                why: IdentityReason {
                    kind,
                    reason: Cow::Owned(with_passed_over(reason, &passed_over)),
                },
            };
        }
    }
    // `IP prefix (not ...)` written around the reasons already in the buffer: no second
    // string (most requests of most sites end here).
    let reason = if passed_over.is_empty() {
        Cow::Borrowed("IP prefix")
    } else {
        passed_over.insert_str(0, "IP prefix (not ");
        passed_over.push(')');
        Cow::Owned(passed_over)
    };
    Identity {
        key: prefix(),
        why: IdentityReason {
            kind: IdentityKind::Prefix,
            reason,
        },
    }
}

/// `reason (not KIND: WHY; not KIND: WHY)`, or `reason` when nothing was passed over.
fn with_passed_over(mut reason: String, passed_over: &str) -> String {
    if !passed_over.is_empty() {
        reason.reserve(passed_over.len() + 6);
        reason.push_str(" (not ");
        reason.push_str(passed_over);
        reason.push(')');
    }
    reason
}

/// The domain part of an envelope sender, or `None` for the null sender and bare names.
fn sender_domain(sender: &str) -> Option<&str> {
    let (_, domain) = strip_envelope(sender).rsplit_once('@')?;
    (!domain.is_empty()).then_some(domain)
}

/// The `spf:` identity and why, or `None` with the reason it is not one written to
/// `why_not`.
fn spf_identity(
    sender: &str,
    spf: Option<&SpfFact>,
    why_not: &mut String,
) -> Option<(String, String)> {
    let Some(domain) = sender_domain(sender) else {
        why_not.push_str("null sender, no domain to check");
        return None;
    };
    let Some(fact) = spf else {
        why_not.push_str("not checked");
        return None;
    };
    let checked = fact.domain.trim_end_matches('.');
    if !checked.eq_ignore_ascii_case(domain) {
        let _ = write!(why_not, "result is for {checked}, not {domain}");
        return None;
    }
    if fact.result == SpfResult::PassAny {
        let _ = write!(
            why_not,
            "SPF of {checked} passes any address, so it names no pool"
        );
        return None;
    }
    if fact.result != SpfResult::Pass {
        why_not.push_str(fact.result.as_str());
        why_not.push_str(" for ");
        why_not.push_str(checked);
        return None;
    }
    let domain = checked.to_ascii_lowercase();
    let reason = format!("SPF of {domain} passes for the client address");
    Some((format!("spf:{domain}"), reason))
}

/// The `org:` identity and why, or `None` with the reason it is not one written to
/// `why_not`.
fn org_identity(ip: IpAddr, name: &HostName, why_not: &mut String) -> Option<(String, String)> {
    let name = match name {
        HostName::Verified(n) => n,
        HostName::Unknown => {
            why_not.push_str("host name not looked up");
            return None;
        }
        HostName::Unverified => {
            why_not.push_str("no forward-confirmed host name");
            return None;
        }
        HostName::Timeout => {
            why_not.push_str("reverse DNS timed out");
            return None;
        }
    };
    // The front ends hand names over lower-cased already: no copy then.
    let trimmed = name.trim_end_matches('.');
    let lower: Cow<'_, str> = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    };
    // The suffix first: a name under no known one is never an identity, dynamic or not,
    // and the dynamic checks read only the labels left of the registrable domain.
    let Some(domain) = registrable_domain(&lower) else {
        why_not.push_str(&lower);
        why_not.push_str(" is not under a known public suffix");
        return None;
    };
    if let Some(why) = dynamic_host(host_part(&lower, domain), ip) {
        let _ = write!(why_not, "{lower} looks dynamic ({why})");
        return None;
    }
    let reason = format!("forward-confirmed host {lower} belongs to {domain}");
    Some((format!("org:{domain}"), reason))
}

/// The registrable domain (public suffix plus one label) of a host name, when its suffix is
/// on the public suffix list; `None` for bare suffixes, unknown TLDs and malformed names.
pub fn registrable_domain(name: &str) -> Option<&str> {
    let name = name.trim_end_matches('.');
    if !is_host_name(name) {
        return None;
    }
    let domain = psl::domain(name.as_bytes())?;
    if !domain.suffix().is_known() {
        return None;
    }
    std::str::from_utf8(domain.as_bytes()).ok()
}

/// LDH labels (and `_`, seen in the wild), 1–63 bytes each, at most 253 in all; ASCII only
/// (A-labels), since the list lookup is byte-wise.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Words that name residential or dynamic address pools; a host label (digits stripped
/// from its end) starting with one marks the name as dynamic.
const DYNAMIC_PREFIXES: &[&str] = &[
    "dyn",
    "dhcp",
    "pool",
    "dsl",
    "adsl",
    "vdsl",
    "xdsl",
    "sdsl",
    "cable",
    "ppp",
    "dial",
    "client",
    "cpe",
    "broadband",
    "cust",
    "resid",
    "subscriber",
];

/// Words that are generic only next to numbers: `static-12-34.isp.example` is a customer
/// line, `static.example.org` may be anything. They count with two or more digit runs.
const WEAK_WORDS: &[&str] = &["static", "host", "ip", "res", "dip", "home", "user", "nat"];

/// Why `name` looks like a dynamic or residential pool host, or `None`. `name` must be
/// lower-case. Only the labels left of the registrable domain are read, so an ISP's own
/// domain (`dynect.net`) does not count against it. A false "dynamic" only keeps the IP
/// prefix as identity (today's behaviour); a missed one would group a whole ISP's
/// customers under one `org:` identity, so the checks lean towards "dynamic".
pub fn dynamic_name(name: &str, ip: IpAddr) -> Option<&'static str> {
    let name = name.trim_end_matches('.');
    match registrable_domain(name) {
        Some(domain) => dynamic_host(host_part(name, domain), ip),
        None => dynamic_host(name, ip),
    }
}

/// The labels of `name` left of its registrable domain `domain` (a suffix of it): empty
/// when `name` is the registrable domain itself.
fn host_part<'n>(name: &'n str, domain: &str) -> &'n str {
    if domain.len() < name.len() {
        &name[..name.len() - domain.len() - 1]
    } else {
        ""
    }
}

/// [`dynamic_name`]'s checks of the labels `host` (empty: nothing to suspect).
fn dynamic_host(host: &str, ip: IpAddr) -> Option<&'static str> {
    if host.is_empty() {
        return None;
    }
    if embeds_address(host, canonical_ip(ip)) {
        return Some("its labels embed the client address");
    }
    let digit_runs: Vec<&str> = host
        .split(|c: char| !c.is_ascii_digit())
        .filter(|r| !r.is_empty())
        .collect();
    if digit_runs.windows(4).any(|w| {
        w.iter()
            .all(|r| r.len() <= 3 && r.parse::<u16>().is_ok_and(|n| n <= 255))
    }) {
        return Some("its labels hold an IPv4 address");
    }
    for word in host.split(|c: char| !c.is_ascii_alphanumeric()) {
        let stem = word.trim_end_matches(|c: char| c.is_ascii_digit());
        if DYNAMIC_PREFIXES.iter().any(|p| stem.starts_with(p)) {
            return Some("a label names an address pool");
        }
        if digit_runs.len() >= 2 && WEAK_WORDS.contains(&stem) {
            return Some("a generic label with numbers");
        }
    }
    None
}

/// Whether `host` spells the address: three consecutive octets in either order as digit
/// runs (`c-73-15-208-11`, `dslb-092-078-001-002`, `181.red-83-33-1`), the first two in
/// order, all four as eight hex digits (`p5b0a1b2c.dip0`), or for IPv6 four consecutive
/// groups of the address.
fn embeds_address(host: &str, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            // Longer runs stay in place as a value no octet has, so that the runs on
            // either side of a serial number are not taken for neighbours.
            let runs: Vec<u16> = host
                .split(|c: char| !c.is_ascii_digit())
                .filter(|r| !r.is_empty())
                .map(|r| {
                    if r.len() <= 3 {
                        r.parse().unwrap_or(u16::MAX)
                    } else {
                        u16::MAX
                    }
                })
                .collect();
            let forward = |w: &[u16]| {
                o.windows(3)
                    .any(|t| t.iter().zip(w).all(|(a, b)| u16::from(*a) == *b))
            };
            let backward = |w: &[u16]| {
                o.windows(3)
                    .any(|t| t.iter().rev().zip(w).all(|(a, b)| u16::from(*a) == *b))
            };
            if runs.windows(3).any(|w| forward(w) || backward(w)) {
                return true;
            }
            // The network half alone (`w86-246.abo.wanadoo.fr`) names a pool too. The host
            // half alone does not: Amazon SES names `a8-1.smtp-out.amazonses.com` after it.
            let net = [u16::from(o[0]), u16::from(o[1])];
            if runs.windows(2).any(|w| w == net) {
                return true;
            }
            let hex = format!("{:08x}", u32::from(v4));
            host.contains(&hex)
        }
        IpAddr::V6(v6) => {
            let groups: Vec<String> = v6.segments().iter().map(|s| format!("{s:x}")).collect();
            let words: Vec<&str> = host
                .split(|c: char| !c.is_ascii_hexdigit())
                .filter(|w| !w.is_empty())
                .map(|w| w.trim_start_matches('0'))
                .map(|w| if w.is_empty() { "0" } else { w })
                .collect();
            words.windows(4).any(|w| {
                groups
                    .windows(4)
                    .any(|g| g.iter().zip(w).all(|(a, b)| a == b))
            })
        }
    }
}

#[cfg(test)]
mod tests;
