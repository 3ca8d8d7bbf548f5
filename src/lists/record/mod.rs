//! SPF records (RFC 7208) as `greygate lists update` needs them: parsed into terms, and the
//! domain-specs that depend only on the domain (`%{d}`, `%{o}`) expanded. Pure, bounded
//! (records longer than [`MAX_RECORD_LEN`] are refused) and panic-free on any input
//! (`fuzz/fuzz_targets/spf_record.rs`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Longest record accepted, in bytes: real records fit a DNS answer of 512 bytes or a few
/// TXT strings of 255; this bounds parsing and the terms of one record.
pub const MAX_RECORD_LEN: usize = 4096;

/// Longest domain name (RFC 7208 7.3: longer expansions lose labels on the left).
const MAX_DOMAIN_LEN: usize = 253;

/// A directive's qualifier: only `Pass` (`+`, the default) lets a matching client through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

/// A mechanism (RFC 7208 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include(DomainSpec),
    /// `a[:domain][/len4][//len6]`.
    A {
        domain: Option<DomainSpec>,
        v4: u8,
        v6: u8,
    },
    /// `mx[:domain][/len4][//len6]`.
    Mx {
        domain: Option<DomainSpec>,
        v4: u8,
        v6: u8,
    },
    Ptr(Option<DomainSpec>),
    Ip4(Ipv4Net),
    Ip6(Ipv6Net),
    Exists(DomainSpec),
}

impl Mechanism {
    /// Whether evaluating it queries DNS: it counts against the limit of 10 (RFC 7208 4.6.4).
    pub fn queries_dns(&self) -> bool {
        !matches!(self, Mechanism::All | Mechanism::Ip4(_) | Mechanism::Ip6(_))
    }
}

/// One term of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Directive(Qualifier, Mechanism),
    /// `redirect=`: the record of another domain decides when no mechanism matched.
    Redirect(DomainSpec),
    /// `exp=` and unknown modifiers: no effect on which clients pass.
    Other,
}

/// A parsed record: its terms in order, at most one `redirect`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub terms: Vec<Term>,
}

impl Record {
    /// The `redirect=` target, which applies only when the record has no `all` mechanism
    /// (RFC 7208 6.1).
    pub fn redirect(&self) -> Option<&DomainSpec> {
        let has_all = self
            .terms
            .iter()
            .any(|t| matches!(t, Term::Directive(_, Mechanism::All)));
        if has_all {
            return None;
        }
        self.terms.iter().find_map(|t| match t {
            Term::Redirect(d) => Some(d),
            _ => None,
        })
    }
}

/// Why a record is not a valid SPF record (an SPF `permerror`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record longer than {MAX_RECORD_LEN} bytes")]
    TooLong,
    #[error("not an SPF record (no \"v=spf1\" version)")]
    NotSpf,
    #[error("bad term {term:?}: {why}")]
    BadTerm { term: String, why: String },
    #[error("{0}= appears twice")]
    Duplicate(&'static str),
}

/// Whether a TXT string is an SPF record: `v=spf1` alone or followed by a space.
pub fn is_spf(txt: &str) -> bool {
    let b = txt.as_bytes();
    b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"v=spf1") && (b.len() == 6 || b[6] == b' ')
}

/// Parses an SPF record (the TXT strings joined).
pub fn parse(txt: &str) -> Result<Record, RecordError> {
    if txt.len() > MAX_RECORD_LEN {
        return Err(RecordError::TooLong);
    }
    if !is_spf(txt) {
        return Err(RecordError::NotSpf);
    }
    let mut record = Record::default();
    let (mut redirect, mut exp) = (false, false);
    for term in txt[6..].split(' ').filter(|t| !t.is_empty()) {
        let bad = |why: &str| RecordError::BadTerm {
            term: clip(term),
            why: why.to_string(),
        };
        let name_len = term
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
            .unwrap_or(term.len());
        if term.as_bytes().get(name_len) == Some(&b'=') {
            // A modifier: name = macro-string.
            let name = &term[..name_len];
            let value = &term[name_len + 1..];
            if name.is_empty() || !name.as_bytes()[0].is_ascii_alphabetic() {
                return Err(bad("a modifier's name starts with a letter"));
            }
            if name.eq_ignore_ascii_case("redirect") {
                if redirect {
                    return Err(RecordError::Duplicate("redirect"));
                }
                redirect = true;
                record.terms.push(Term::Redirect(
                    DomainSpec::parse(value).map_err(|w| bad(&w))?,
                ));
            } else {
                if name.eq_ignore_ascii_case("exp") {
                    if exp {
                        return Err(RecordError::Duplicate("exp"));
                    }
                    exp = true;
                }
                check_macro_string(value, true).map_err(|w| bad(&w))?;
                record.terms.push(Term::Other);
            }
            continue;
        }
        let (qualifier, rest) = match term.as_bytes()[0] {
            b'+' => (Qualifier::Pass, &term[1..]),
            b'-' => (Qualifier::Fail, &term[1..]),
            b'~' => (Qualifier::SoftFail, &term[1..]),
            b'?' => (Qualifier::Neutral, &term[1..]),
            _ => (Qualifier::Pass, term),
        };
        let mechanism = parse_mechanism(rest).map_err(|w| bad(&w))?;
        record.terms.push(Term::Directive(qualifier, mechanism));
    }
    Ok(record)
}

fn parse_mechanism(s: &str) -> Result<Mechanism, String> {
    let end = s.find([':', '/']).unwrap_or(s.len());
    let (name, arg) = s.split_at(end);
    let name = name.to_ascii_lowercase();
    let domain_arg = || -> Result<DomainSpec, String> {
        match arg.strip_prefix(':') {
            Some(d) => DomainSpec::parse(d),
            None => Err(format!("{name} needs \":domain\"")),
        }
    };
    let optional_domain = || -> Result<Option<DomainSpec>, String> {
        match arg.strip_prefix(':') {
            Some(d) => DomainSpec::parse(d).map(Some),
            None if arg.is_empty() => Ok(None),
            None => Err(format!("{name} takes \":domain\", not {arg:?}")),
        }
    };
    match name.as_str() {
        "all" if arg.is_empty() => Ok(Mechanism::All),
        "all" => Err("all takes no argument".into()),
        "include" => domain_arg().map(Mechanism::Include),
        "exists" => domain_arg().map(Mechanism::Exists),
        "ptr" => optional_domain().map(Mechanism::Ptr),
        "a" | "mx" => {
            // [":" domain-spec] ["/" ip4-cidr] ["//" ip6-cidr]; a domain name has no '/'.
            let (spec, cidr) = match arg.find('/') {
                Some(i) => arg.split_at(i),
                None => (arg, ""),
            };
            let domain = match spec.strip_prefix(':') {
                Some(d) => Some(DomainSpec::parse(d)?),
                None if spec.is_empty() => None,
                None => return Err(format!("{name} takes \":domain\", not {spec:?}")),
            };
            let (v4, v6) = dual_cidr(cidr)?;
            Ok(if name == "a" {
                Mechanism::A { domain, v4, v6 }
            } else {
                Mechanism::Mx { domain, v4, v6 }
            })
        }
        "ip4" => {
            let value = arg.strip_prefix(':').ok_or("ip4 needs \":address\"")?;
            let (addr, len) = split_cidr(value, 32)?;
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
            Ok(Mechanism::Ip4(
                Ipv4Net::new(addr, len).map_err(|e| e.to_string())?.trunc(),
            ))
        }
        "ip6" => {
            let value = arg.strip_prefix(':').ok_or("ip6 needs \":address\"")?;
            let (addr, len) = split_cidr(value, 128)?;
            let addr: Ipv6Addr = addr
                .parse()
                .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
            Ok(Mechanism::Ip6(
                Ipv6Net::new(addr, len).map_err(|e| e.to_string())?.trunc(),
            ))
        }
        _ => Err("unknown mechanism".into()),
    }
}

/// `ADDR[/LEN]`, LEN at most `max` (no leading zeros, as RFC 7208's ABNF).
fn split_cidr(value: &str, max: u8) -> Result<(&str, u8), String> {
    match value.split_once('/') {
        None => Ok((value, max)),
        Some((addr, len)) => Ok((addr, cidr_length(len, max)?)),
    }
}

fn cidr_length(len: &str, max: u8) -> Result<u8, String> {
    let ok = !len.is_empty()
        && len.len() <= 3
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len == "0" || !len.starts_with('0'));
    match len.parse::<u8>() {
        Ok(n) if ok && n <= max => Ok(n),
        _ => Err(format!("{len:?} is not a prefix length from 0 to {max}")),
    }
}

/// `""`, `/N`, `//M` or `/N//M`.
fn dual_cidr(s: &str) -> Result<(u8, u8), String> {
    if s.is_empty() {
        return Ok((32, 128));
    }
    if let Some(v6) = s.strip_prefix("//") {
        return Ok((32, cidr_length(v6, 128)?));
    }
    let rest = s.strip_prefix('/').unwrap_or(s);
    match rest.split_once("//") {
        Some((v4, v6)) => Ok((cidr_length(v4, 32)?, cidr_length(v6, 128)?)),
        None => Ok((cidr_length(rest, 32)?, 128)),
    }
}

/// A domain-spec as written (macros checked, not expanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec(String);

impl fmt::Display for DomainSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a domain-spec cannot be expanded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expand {
    /// It uses a macro that depends on the connecting client (`%{i}`, `%{s}`, ...): no
    /// list can hold what it names.
    Dynamic(char),
    /// The expansion is not a domain name.
    NotADomain(String),
}

impl DomainSpec {
    fn parse(s: &str) -> Result<DomainSpec, String> {
        if s.is_empty() {
            return Err("empty domain".into());
        }
        check_macro_string(s, false)?;
        Ok(DomainSpec(s.to_string()))
    }

    /// Expands the spec for the record of `current` found while checking `sender_domain`
    /// (`%{d}` and `%{o}`; RFC 7208 7.3 truncation on the left), lower-cased, without a
    /// trailing dot.
    pub fn expand(&self, current: &str, sender_domain: &str) -> Result<String, Expand> {
        let mut out = String::new();
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find('%') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            match after.as_bytes().first() {
                Some(b'%') => {
                    out.push('%');
                    rest = &after[1..];
                }
                Some(b'_') => {
                    out.push(' ');
                    rest = &after[1..];
                }
                Some(b'-') => {
                    out.push_str("%20");
                    rest = &after[1..];
                }
                Some(b'{') => {
                    // Checked by `parse`: a letter, digits, an optional r, delimiters, '}'.
                    let close = after.find('}').unwrap_or(after.len());
                    let body = &after[1..close.max(1)];
                    let letter = body.chars().next().unwrap_or('?');
                    let value = match letter.to_ascii_lowercase() {
                        'd' => current,
                        'o' => sender_domain,
                        _ => return Err(Expand::Dynamic(letter.to_ascii_lowercase())),
                    };
                    out.push_str(&transform(value, &body[letter.len_utf8()..]));
                    rest = after.get(close + 1..).unwrap_or("");
                }
                _ => rest = after,
            }
        }
        out.push_str(rest);
        let mut name = out.trim_end_matches('.').to_ascii_lowercase();
        while name.len() > MAX_DOMAIN_LEN {
            match name.split_once('.') {
                Some((_, right)) => name = right.to_string(),
                None => break,
            }
        }
        if is_domain_name(&name) {
            Ok(name)
        } else {
            Err(Expand::NotADomain(clip(&name)))
        }
    }
}

/// A macro's transformers and delimiters (RFC 7208 7.3): split on the delimiters (default
/// '.'), reverse with `r`, keep the rightmost N parts, join with '.'.
fn transform(value: &str, spec: &str) -> String {
    let digits: String = spec.chars().take_while(char::is_ascii_digit).collect();
    let rest = &spec[digits.len()..];
    let (reverse, delimiters) = match rest.strip_prefix(['r', 'R']) {
        Some(d) => (true, d),
        None => (false, rest),
    };
    let delimiters: Vec<char> = if delimiters.is_empty() {
        vec!['.']
    } else {
        delimiters.chars().collect()
    };
    let mut parts: Vec<&str> = value.split(delimiters.as_slice()).collect();
    if reverse {
        parts.reverse();
    }
    if let Ok(n) = digits.parse::<usize>()
        && n > 0
        && n < parts.len()
    {
        parts.drain(..parts.len() - n);
    }
    parts.join(".")
}

/// Checks macro-string syntax (RFC 7208 7.1). `explanation`: the letters `c`, `r`, `t`
/// are allowed (only in `exp=` text).
fn check_macro_string(s: &str, explanation: bool) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match b.get(i + 1) {
                Some(b'%' | b'_' | b'-') => i += 2,
                Some(b'{') => {
                    let close = s[i..]
                        .find('}')
                        .map(|c| i + c)
                        .ok_or("a macro \"%{\" without \"}\"")?;
                    let body = &b[i + 2..close];
                    let letter = body.first().map(u8::to_ascii_lowercase);
                    let letters: &[u8] = if explanation {
                        b"slodiphcrtv"
                    } else {
                        b"slodiphv"
                    };
                    match letter {
                        Some(l) if letters.contains(&l) => {}
                        _ => return Err("unknown macro letter".into()),
                    }
                    let mut j = 1;
                    while j < body.len() && body[j].is_ascii_digit() {
                        j += 1;
                    }
                    if j > 4 {
                        return Err("macro transformer too long".into());
                    }
                    if j < body.len() && matches!(body[j], b'r' | b'R') {
                        j += 1;
                    }
                    if !body[j..].iter().all(|c| b".-+,/_=".contains(c)) {
                        return Err("bad macro delimiter".into());
                    }
                    i = close + 1;
                }
                _ => return Err("'%' must start %{...}, %%, %_ or %-".into()),
            },
            0x21..=0x7e => i += 1,
            _ => return Err("only visible ASCII is allowed".into()),
        }
    }
    Ok(())
}

/// LDH-ish labels (underscores allowed: `_spf.example.com`), 1–63 bytes, 253 in all.
pub fn is_domain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DOMAIN_LEN
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// At most 80 bytes of `s` for an error message, cut on a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests;
