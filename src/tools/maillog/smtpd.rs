//! smtpd's events, the receiving side `replay` reads: a client whose message got a queue id
//! (`QUEUEID: client=name[ip]`, with `, sasl_username=...` when it authenticated) and a
//! RCPT refused before any queue id existed (`NOQUEUE: reject: RCPT from name[ip]: 450
//! 4.7.1 <...>: ...; from=<...> to=<...> proto=ESMTP helo=<...>`, also `milter-reject`).

use std::net::IpAddr;

use super::{Event, find, memchr, rfind};

/// smtpd accepted a message from a client: the queue id starts here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client<'a> {
    pub name: &'a [u8],
    pub ip: IpAddr,
    /// The client authenticated (submission).
    pub sasl: bool,
}

/// smtpd refused a RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject<'a> {
    pub name: &'a [u8],
    pub ip: IpAddr,
    /// The SMTP reply code (450, 554, ...).
    pub code: u16,
    pub from: &'a [u8],
    pub to: &'a [u8],
}

/// Whether smtpd's line with this queue id and text is one of its own events (rather than
/// a queue event, parsed as anyone else's).
pub(super) fn is_own(queue_id: &[u8], body: &[u8]) -> bool {
    queue_id == b"NOQUEUE" || body.starts_with(b"client=")
}

/// The event of one of smtpd's own lines (see [`is_own`]).
pub(super) fn event<'a>(queue_id: &[u8], body: &'a [u8]) -> Option<Event<'a>> {
    if queue_id == b"NOQUEUE" {
        return reject(body).map(Event::Reject);
    }
    let (name, ip, after) = name_ip(body.strip_prefix(b"client=")?)?;
    Some(Event::Client(Client {
        name,
        ip,
        sasl: find(after, b"sasl_username=").is_some(),
    }))
}

/// `name[ip]` and what follows the `]`.
fn name_ip(v: &[u8]) -> Option<(&[u8], IpAddr, &[u8])> {
    let open = memchr(b'[', v)?;
    let close = open + memchr(b']', &v[open..])?;
    let ip = std::str::from_utf8(&v[open + 1..close]).ok()?;
    let ip = ip.strip_prefix("IPv6:").unwrap_or(ip);
    Some((&v[..open], ip.parse().ok()?, &v[close + 1..]))
}

/// `reject: RCPT from name[ip]: 450 ...; from=<a> to=<b> proto=...`.
fn reject(body: &[u8]) -> Option<Reject<'_>> {
    let rest = body
        .strip_prefix(b"reject: RCPT from ")
        .or_else(|| body.strip_prefix(b"milter-reject: RCPT from "))?;
    let (name, ip, after) = name_ip(rest)?;
    let reply = after.strip_prefix(b": ")?;
    let code = reply.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || !matches!(code[0], b'4' | b'5') {
        return None;
    }
    let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    // The reply text may quote addresses: the envelope comes after the last "; from=<".
    let at = rfind(reply, b"; from=<")?;
    let env = &reply[at + 8..];
    let end = memchr(b'>', env)?;
    let from = &env[..end];
    let to_at = find(&env[end..], b" to=<")? + end + 5;
    let to_v = &env[to_at..];
    let to = &to_v[..memchr(b'>', to_v)?];
    Some(Reject {
        name,
        ip,
        code,
        from,
        to,
    })
}
