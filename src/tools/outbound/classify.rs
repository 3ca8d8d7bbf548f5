//! SMTP replies and their classification: accepted, greylisted (with the evidence that
//! says so), other temporary failure, or rejected. Pure; shared by `probe` (live replies)
//! and `track` (the `said: ...` part of Postfix log lines), so both tools agree.

use std::fmt;

/// Longest reply text kept (bytes). Replies are attacker-chosen; log lines and transcripts
/// stay bounded.
pub const MAX_REPLY_TEXT: usize = 2048;

/// One SMTP reply: the three-digit code, the enhanced status code if the text starts with
/// one (RFC 3463), and the text of all lines joined with spaces (as Postfix logs them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<String>,
    /// The reply as the server sent it, lines joined with a space, e.g.
    /// `450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted`.
    pub text: String,
}

impl Reply {
    /// Parses one reply from its lines (`250-first`, `250 last`) or from the single-line form
    /// Postfix logs (`450 4.7.1 text`, continuation lines already joined). `None` when the
    /// text does not start with a three-digit code.
    pub fn parse(text: &str) -> Option<Reply> {
        let text = text.trim();
        let b = text.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&b[0]) {
            return None;
        }
        if b.len() > 3 && !matches!(b[3], b' ' | b'-' | b'\r' | b'\n') {
            return None;
        }
        let code =
            u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
        // Continuation lines repeat the code (`450-4.7.1 a`, `450 4.7.1 b`); keep each line's
        // text once.
        let mut joined = String::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if !joined.is_empty() {
                joined.push(' ');
            }
            joined.push_str(line);
        }
        let mut end = joined.len().min(MAX_REPLY_TEXT);
        while !joined.is_char_boundary(end) {
            end -= 1;
        }
        joined.truncate(end);
        let after = joined.get(4..).unwrap_or("");
        let enhanced = after
            .split_whitespace()
            .next()
            .filter(|t| is_enhanced(t, b[0]))
            .map(str::to_string);
        Some(Reply {
            code,
            enhanced,
            text: joined,
        })
    }

    /// The code class: 2, 3, 4 or 5.
    pub fn class_digit(&self) -> u16 {
        self.code / 100
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `4.7.1`: class digit matching the reply code, then two numbers of 1-3 digits.
fn is_enhanced(token: &str, class: u8) -> bool {
    let mut parts = token.split('.');
    let (Some(c), Some(s), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let num = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    c.as_bytes() == [class] && num(s) && num(d)
}

/// What a reply means for the mail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Class {
    /// 2xx (or 3xx, the positive intermediate reply to MAIL/RCPT never happens; DATA is
    /// never sent).
    Accepted,
    /// 4xx that looks like greylisting; `evidence` says why we think so.
    Greylisted { evidence: String },
    /// Any other 4xx: the server is busy, misconfigured, or temporarily refusing us.
    TempFail,
    /// 5xx: permanent.
    Rejected,
}

impl Class {
    /// Short lower-case name for tables and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Class::Accepted => "accepted",
            Class::Greylisted { .. } => "greylisted",
            Class::TempFail => "temporary failure",
            Class::Rejected => "rejected",
        }
    }
}

/// Text that names greylisting (matched case-insensitively). "deferred" alone is weak but
/// postgrey-style and Exim greylisters use it for exactly this.
const GREYLIST_WORDS: &[&str] = &[
    "greylist",
    "graylist",
    "grey-list",
    "gray-list",
    "try again later",
    "please retry later",
    "deferred",
];

/// Postfix temporary rejections that share 450 4.7.1 with greylisting but are about DNS or
/// address verification; they must not count as greylisting evidence by code alone.
const NOT_GREYLISTING: &[&str] = &[
    "cannot find your",
    "host not found",
    "unverified address",
    "address verification",
    "domain not found",
    "helo command rejected",
    "rate limit",
    "too many",
];

/// Enhanced codes greylisters use: 4.2.0 (postgrey), 4.7.1 (greygate, Postfix
/// DEFER_IF_PERMIT), 4.7.0 (Exim, others).
const GREYLIST_ENHANCED: &[&str] = &["4.2.0", "4.7.1", "4.7.0"];

/// Classifies a reply.
///
/// Greylisted means a 4xx with evidence: the reply text names greylisting ("greylist",
/// "graylist", "try again later", "deferred", case-insensitive), or the code is 450/451
/// with enhanced code 4.2.0/4.7.1/4.7.0 and the text is not one of Postfix's other
/// temporary rejections that use the same codes (unknown hostname, unverified address).
pub fn classify(reply: &Reply) -> Class {
    match reply.class_digit() {
        2 | 3 => Class::Accepted,
        5 => Class::Rejected,
        4 => match greylist_evidence(reply) {
            Some(evidence) => Class::Greylisted { evidence },
            None => Class::TempFail,
        },
        _ => Class::TempFail,
    }
}

fn greylist_evidence(reply: &Reply) -> Option<String> {
    let lower = reply.text.to_ascii_lowercase();
    if let Some(word) = GREYLIST_WORDS.iter().find(|w| lower.contains(*w)) {
        return Some(format!("{} reply text says {word:?}", reply.code));
    }
    let enhanced = reply.enhanced.as_deref()?;
    if matches!(reply.code, 450 | 451)
        && GREYLIST_ENHANCED.contains(&enhanced)
        && !NOT_GREYLISTING.iter().any(|w| lower.contains(w))
    {
        return Some(format!(
            "code {} with enhanced status {enhanced}, as greylisters answer",
            reply.code
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> &'static str {
        classify(&Reply::parse(text).unwrap()).name()
    }

    #[test]
    fn table() {
        let cases = [
            ("250 2.1.5 Ok", "accepted"),
            ("250 Ok", "accepted"),
            // greygate via Postfix DEFER_IF_PERMIT
            (
                "450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, please try again in 300 seconds",
                "greylisted",
            ),
            // postgrey
            (
                "450 4.2.0 <dave@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html",
                "greylisted",
            ),
            // Exim-style
            (
                "451 4.7.0 Temporary rejection, try again later",
                "greylisted",
            ),
            ("451 Graylisted: please come back later", "greylisted"),
            ("450 4.7.1 please come back", "greylisted"),
            (
                "451 4.3.5 Server configuration problem",
                "temporary failure",
            ),
            (
                "450 4.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.1]",
                "temporary failure",
            ),
            ("452 4.5.3 Error: too many recipients", "temporary failure"),
            ("421 4.3.2 Service shutting down", "temporary failure"),
            (
                "554 5.7.1 <x@y>: Recipient address rejected: Access denied",
                "rejected",
            ),
            (
                "550 5.1.1 <x@y>: Recipient address rejected: User unknown",
                "rejected",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(class(text), want, "{text}");
        }
    }

    #[test]
    fn parses_multiline_and_enhanced() {
        let r = Reply::parse("450-4.7.1 first\r\n450 4.7.1 second\r\n").unwrap();
        assert_eq!(r.code, 450);
        assert_eq!(r.enhanced.as_deref(), Some("4.7.1"));
        assert_eq!(r.text, "450-4.7.1 first 450 4.7.1 second");
        // Enhanced class must match the code's class.
        assert_eq!(Reply::parse("450 5.7.1 x").unwrap().enhanced, None);
        assert!(Reply::parse("hello").is_none());
        assert!(Reply::parse("4500 x").is_none());
        assert!(Reply::parse("").is_none());
        assert!(Reply::parse("45").is_none());
        assert_eq!(Reply::parse("250").unwrap().code, 250);
    }

    #[test]
    fn bounded_text() {
        let long = format!("450 {}", "é".repeat(5000));
        let r = Reply::parse(&long).unwrap();
        assert!(r.text.len() <= MAX_REPLY_TEXT);
    }
}
