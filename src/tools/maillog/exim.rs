//! Exim 4's `mainlog`: one line per event of a message, keyed by Exim's message id.
//!
//! `2026-12-04 16:23:09.200 +0100 [20405] 1xZW3q-0005IX-0u => dave@example.org R=... C="250 ..."`:
//! the timestamp (`.mmm` with `log_selector = +millisec`, the zone with `log_timezone`),
//! `[pid]` with `+pid`, the message id (`1xZW3q-0005IX-0u`, 6-6-2 base 62, or the 6-11-4
//! ids of Exim 4.97 and later), then what happened:
//!
//! - `<= sender ... S=size id=MESSAGE-ID`: arrival ([`Event::Arrival`]; `<>` is the null
//!   sender). `(=` (an arrival the client was told was rejected) is read the same way.
//! - `=> addr [(parent)] [<original>] R=router T=transport H=host [ip]:port ... C="250 ..."
//!   QT=time DT=time`: delivered; `->` another address of the same delivery, `>>` a
//!   cutthrough delivery: [`DeliveryStatus::Sent`]. `*>`: delivery suppressed (`-N`):
//!   [`DeliveryStatus::Other`].
//! - `== addr ... defer (errno) H=host [ip]: SMTP error from remote mail server after RCPT
//!   TO:<addr>: 451 ...`: deferred, the reason after the first `: `. `retry time not
//!   reached` lines are no delivery attempt and are skipped.
//! - `** addr ...: reason`: bounced; `retry timeout exceeded` (and `retry time not reached
//!   for any host after a long failure period`) are bounces of a message that ran out of
//!   retry time: [`DeliveryStatus::Expired`].
//! - `Completed`: the message left the queue ([`Event::Removed`]).
//!
//! Every other line (queue runs, connections, frozen messages, rejections) is `None`.
//! Exim logs no DSN code: [`Delivery::dsn`] is the enhanced status code of the reply, when
//! it has one; [`Delivery::delay`] is `QT=` (`+queue_time`), [`Delivery::delays`] stays
//! empty.

use super::time::exim_timestamp;
use super::{Delivery, DeliveryStatus, Event, Line, find, memchr, rfind, until};

/// What [`Line::program`] is for Exim lines: the mainlog has no syslog tag.
pub const PROGRAM: &[u8] = b"exim";

/// Parses one Exim mainlog line (without its newline). `None`: not an Exim line with an
/// event we understand.
pub fn parse_line(line: &[u8]) -> Option<Line<'_>> {
    let (ts, rest) = exim_timestamp(line)?;
    let mut rest = rest.strip_prefix(b" ")?;
    if let Some(r) = rest.strip_prefix(b"[") {
        let close = memchr(b']', r)?;
        if close == 0 || !r[..close].iter().all(u8::is_ascii_digit) {
            return None;
        }
        rest = r[close + 1..].strip_prefix(b" ")?;
    }
    let sp = memchr(b' ', rest)?;
    let queue_id = &rest[..sp];
    if !is_message_id(queue_id) {
        return None;
    }
    let event = event(&rest[sp + 1..])?;
    Some(Line {
        ts,
        program: PROGRAM,
        queue_id,
        event,
    })
}

/// `1xZW3q-0005IX-0u` (6-6-2) or `1xZW3q-00000000Ivm-2pVT` (6-11-4, Exim 4.97+): base 62
/// parts.
fn is_message_id(id: &[u8]) -> bool {
    let dashes = match id.len() {
        16 => (6, 13),
        23 => (6, 18),
        _ => return false,
    };
    id.iter().enumerate().all(|(i, b)| {
        if i == dashes.0 || i == dashes.1 {
            *b == b'-'
        } else {
            b.is_ascii_alphanumeric()
        }
    })
}

/// The event of the text after the message id.
fn event(body: &[u8]) -> Option<Event<'_>> {
    if body == b"Completed" || body.starts_with(b"Completed ") {
        return Some(Event::Removed);
    }
    let marker = body.get(..2)?;
    let rest = body.get(2..)?.strip_prefix(b" ")?;
    let status = match marker {
        b"<=" | b"(=" => return arrival(rest),
        b"=>" | b"->" | b">>" => DeliveryStatus::Sent,
        b"*>" => DeliveryStatus::Other,
        b"==" => DeliveryStatus::Deferred,
        b"**" => DeliveryStatus::Bounced,
        _ => return None,
    };
    delivery(status, rest).map(Event::Delivery)
}

/// `sender H=... P=esmtp S=123 id=MESSAGE-ID T="..."`.
fn arrival(rest: &[u8]) -> Option<Event<'_>> {
    let sender = until(rest, b' ');
    if sender.is_empty() {
        return None;
    }
    let from = if sender == b"<>" {
        &sender[..0]
    } else {
        sender
    };
    // `id=` follows `S=`: looking after it keeps a HELO name in `H=(...)` out.
    let after_size = find(rest, b" S=").map_or(rest, |i| &rest[i..]);
    let message_id = find(after_size, b" id=")
        .map(|i| until(&after_size[i + 4..], b' '))
        .filter(|id| !id.is_empty());
    Some(Event::Arrival { from, message_id })
}

/// A delivery line after its marker: `addr [(parent)] [<original>] fields[: reason]`.
fn delivery(status: DeliveryStatus, rest: &[u8]) -> Option<Delivery<'_>> {
    let word = until(rest, b' ');
    // `** addr: reason` when no router took the address.
    let (to, mut after) = match word.strip_suffix(b":") {
        Some(to) => (to, &rest[word.len() - 1..]),
        None => (word, &rest[word.len()..]),
    };
    if to.is_empty() || to.starts_with(b"<") {
        return None;
    }
    // `(parent)` with `+all_parents`, then `<original>` when aliasing changed the address.
    if let Some(v) = after.strip_prefix(b" (") {
        after = &v[memchr(b')', v)? + 1..];
    }
    let mut orig_to = None;
    if let Some(v) = after.strip_prefix(b" <") {
        let end = memchr(b'>', v)?;
        orig_to = Some(&v[..end]);
        after = &v[end + 1..];
    }
    let (fields, reason) = match status {
        // Only failures have a reason; a confirmation may hold `: ` of its own.
        DeliveryStatus::Sent | DeliveryStatus::Other => (after, &after[after.len()..]),
        _ => match find(after, b": ") {
            Some(i) => (&after[..i], &after[i + 2..]),
            None => (after, &after[after.len()..]),
        },
    };
    let (detail, delay) = match status {
        DeliveryStatus::Sent | DeliveryStatus::Other => (
            confirmation(fields),
            rfind(fields, b" QT=").and_then(|i| duration(until(&fields[i + 4..], b' '))),
        ),
        _ => (strip_times(reason), None),
    };
    if status == DeliveryStatus::Deferred && detail.starts_with(b"retry time not reached") {
        // Exim did not try: no attempt.
        return None;
    }
    let status = if status == DeliveryStatus::Bounced
        && (detail.starts_with(b"retry timeout exceeded")
            || detail.starts_with(b"retry time not reached for any host after a long failure"))
    {
        DeliveryStatus::Expired
    } else {
        status
    };
    let reply = match status {
        DeliveryStatus::Sent | DeliveryStatus::Other => Some(detail),
        _ => remote_reply(detail),
    };
    Some(Delivery {
        to,
        orig_to,
        relay: relay(fields),
        delay,
        delays: &fields[..0],
        dsn: reply.map_or(&fields[..0], enhanced_code),
        status,
        detail,
    })
}

/// `H=host [ip]` with its `:port` (`+outgoing_port`), or empty.
fn relay(fields: &[u8]) -> &[u8] {
    let at = match find(fields, b" H=") {
        Some(i) => i + 3,
        None if fields.starts_with(b"H=") => 2,
        None => return &fields[..0],
    };
    let v = &fields[at..];
    let name = until(v, b' ').len();
    let ip = v.get(name + 1..).map_or(&v[..0], |r| until(r, b' '));
    match memchr(b']', ip).filter(|_| ip.starts_with(b"[")) {
        // `[ip]` and, with `+outgoing_port`, `:port`.
        Some(close) => {
            let port = ip[close + 1..]
                .strip_prefix(b":")
                .map_or(0, |p| p.iter().take_while(|b| b.is_ascii_digit()).count());
            let end = close + 1 + if port > 0 { port + 1 } else { 0 };
            &v[..name + 1 + end]
        }
        None => &v[..name],
    }
}

/// The text of `C="..."` (the remote server's confirmation), or empty.
fn confirmation(fields: &[u8]) -> &[u8] {
    let Some(at) = find(fields, b" C=\"") else {
        return &fields[..0];
    };
    let v = &fields[at + 4..];
    match rfind(v, b"\"") {
        Some(end) => &v[..end],
        None => v,
    }
}

/// `reason` without the ` DT=...`/` QT=...` timings Exim may append after it.
fn strip_times(mut reason: &[u8]) -> &[u8] {
    for _ in 0..2 {
        let Some(sp) = rfind(reason, b" ") else {
            break;
        };
        let last = &reason[sp + 1..];
        let timing = [b"DT=".as_slice(), b"QT="]
            .iter()
            .any(|p| last.strip_prefix(*p).and_then(duration).is_some());
        if !timing {
            break;
        }
        reason = &reason[..sp];
    }
    reason
}

/// An Exim time: `6s`, `0.018s`, `1m2s`, `2h`, `1d3h`, `1w2d`: seconds.
fn duration(v: &[u8]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut total = 0.0;
    let mut rest = v;
    while !rest.is_empty() {
        let n = rest
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'.')
            .count();
        let num: f64 = std::str::from_utf8(&rest[..n]).ok()?.parse().ok()?;
        let unit = match rest.get(n)? {
            b's' => 1.0,
            b'm' => 60.0,
            b'h' => 3600.0,
            b'd' => 86_400.0,
            b'w' => 604_800.0,
            _ => return None,
        };
        total += num * unit;
        rest = &rest[n + 1..];
    }
    Some(total)
}

/// The remote server's reply in an Exim failure reason: `SMTP error from remote mail server
/// after RCPT TO:<dave@example.org>: 451 4.7.1 ...` (older Exims: `remote mailer`, and
/// `host NAME [IP]: ` before the reply). The reply is the first part after a `: ` that
/// starts with a reply code.
pub(super) fn remote_reply(detail: &[u8]) -> Option<&[u8]> {
    let rest = detail.strip_prefix(b"SMTP error from remote ")?;
    let mut from = 0;
    while let Some(at) = find(&rest[from..], b": ") {
        let v = &rest[from + at + 2..];
        if is_reply(v) {
            return Some(v);
        }
        from += at + 2;
    }
    None
}

/// Starts with a 2xx..5xx code followed by a space, a `-` or nothing.
fn is_reply(v: &[u8]) -> bool {
    v.len() >= 3
        && (b'2'..=b'5').contains(&v[0])
        && v[1..3].iter().all(u8::is_ascii_digit)
        && v.get(3).is_none_or(|b| matches!(b, b' ' | b'-'))
}

/// The enhanced status code of a reply (`4.7.1` of `451 4.7.1 Greylisted`), or empty.
fn enhanced_code(reply: &[u8]) -> &[u8] {
    if !is_reply(reply) || reply.len() < 5 {
        return &reply[..0];
    }
    let code = until(&reply[4..], b' ');
    let mut parts = code.split(|&b| b == b'.');
    let class_ok = parts.next() == Some(&reply[..1]);
    let rest_ok = parts
        .by_ref()
        .take(2)
        .filter(|p| (1..=3).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
        .count()
        == 2;
    if class_ok && rest_ok && parts.next().is_none() {
        code
    } else {
        &reply[..0]
    }
}
