//! The queue events of a Postfix log, the lines `track` follows and `replay` reads the
//! envelope from: cleanup's `message-id=`, qmgr's `from=`, expiry and `removed`, and the
//! delivery agents' one line per recipient and attempt (`to=<...>, relay=..., status=...`).

use super::{Event, field, find, memchr, rfind, trim_angle, until};

/// Fields of a delivery attempt line.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<'a> {
    pub to: &'a [u8],
    /// `orig_to=<...>`: the address given at RCPT before aliasing, when Postfix logs it.
    pub orig_to: Option<&'a [u8]>,
    pub relay: &'a [u8],
    /// `delay=`: seconds since the message arrived.
    pub delay: Option<f64>,
    /// `delays=a/b/c/d`.
    pub delays: &'a [u8],
    pub dsn: &'a [u8],
    pub status: DeliveryStatus,
    /// The parenthesised text after the status, without the outer parentheses.
    pub detail: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Sent,
    Deferred,
    Bounced,
    Expired,
    /// Address verification probes and other rarer words.
    Other,
}

impl DeliveryStatus {
    pub fn name(self) -> &'static str {
        match self {
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Deferred => "deferred",
            DeliveryStatus::Bounced => "bounced",
            DeliveryStatus::Expired => "expired",
            DeliveryStatus::Other => "other",
        }
    }
}

/// The event of a queue-id line's text after `QUEUEID: ` (`line`: the whole line, for
/// `orig_to`).
pub(super) fn event<'a>(body: &'a [u8], line: &'a [u8]) -> Option<Event<'a>> {
    if let Some(v) = body.strip_prefix(b"message-id=") {
        return Some(Event::MessageId(trim_angle(until(v, b' '))));
    }
    if body == b"removed" {
        return Some(Event::Removed);
    }
    if let Some(v) = body.strip_prefix(b"from=<") {
        let end = memchr(b'>', v)?;
        if find(&v[end..], b"status=expired").is_some() {
            return Some(Event::Expired);
        }
        return Some(Event::From(&v[..end]));
    }
    if body.starts_with(b"to=<") {
        return delivery(body, line).map(Event::Delivery);
    }
    None
}

fn delivery<'a>(body: &'a [u8], line: &'a [u8]) -> Option<Delivery<'a>> {
    let v = &body[4..];
    let end = memchr(b'>', v)?;
    let to = &v[..end];
    let status_at = find(body, b", status=")?;
    // Named fields come before the status: the detail after it is the remote server's text
    // and may say anything.
    let fields = &body[..status_at];
    let named = |name: &[u8]| field(fields, name).unwrap_or_default();
    // Unlike the fields above, `orig_to` is looked for in the whole line, as replay always
    // has: Postfix logs it before the status, so only a line Postfix never writes could
    // tell the difference, and keeping it keeps replay's results as they were.
    let orig_to = find(line, b", orig_to=<").and_then(|i| {
        let v = &line[i + 11..];
        memchr(b'>', v).map(|e| &v[..e])
    });
    let after = &body[status_at + 9..];
    let word = until(after, b' ');
    let status = match word {
        b"sent" => DeliveryStatus::Sent,
        b"deferred" => DeliveryStatus::Deferred,
        b"bounced" => DeliveryStatus::Bounced,
        b"expired" => DeliveryStatus::Expired,
        _ => DeliveryStatus::Other,
    };
    let detail = after[word.len()..].trim_ascii();
    let detail = detail
        .strip_prefix(b"(")
        .and_then(|d| d.strip_suffix(b")"))
        .unwrap_or(detail);
    Some(Delivery {
        to,
        orig_to,
        relay: named(b"relay"),
        delay: std::str::from_utf8(named(b"delay"))
            .ok()
            .and_then(|s| s.parse().ok()),
        delays: named(b"delays"),
        dsn: named(b"dsn"),
        status,
        detail,
    })
}

/// The remote server's reply inside a deferral detail (Postfix: `host X[ip] said: 450 ...
/// (in reply to RCPT TO command)`; Exim: `SMTP error from remote mail server after RCPT
/// TO:<...>: 451 ...`), when there is one. Only cuts the text out: what the reply means is
/// `outbound::classify`'s business.
pub fn remote_reply(detail: &[u8]) -> Option<&[u8]> {
    if detail.starts_with(b"SMTP error from remote ") {
        return super::exim::remote_reply(detail);
    }
    let at = find(detail, b" said: ")?;
    let reply = &detail[at + 7..];
    Some(match rfind(reply, b" (in reply to ") {
        Some(end) => &reply[..end],
        None => reply,
    })
}
