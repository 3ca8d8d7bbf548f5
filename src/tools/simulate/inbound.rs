//! Pure parsing of a receiving site's Postfix log: the lines that say who tried to deliver
//! what to whom, for `greygate replay`. Byte slices in, borrowed fields out; never panics;
//! anything else is `None`.
//!
//! - smtpd, accepted: `QUEUEID: client=name[ip]` (with `, sasl_username=...` when the
//!   client authenticated), then qmgr's `QUEUEID: from=<...>, size=...` and one delivery
//!   line per recipient (`to=<...>, orig_to=<...>, relay=..., status=...`);
//!   `QUEUEID: removed` ends the queue id.
//! - smtpd, refused at RCPT: `NOQUEUE: reject: RCPT from name[ip]: 450 4.7.1 <...>: ...;
//!   from=<...> to=<...> proto=ESMTP helo=<...>` (also `milter-reject`).

use std::net::IpAddr;

use crate::tools::outbound::track::parse::{Clock, Event, Ts, find, parse_line, timestamp};

/// What one inbound line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// smtpd accepted a message from a client: the queue id starts here.
    Client {
        queue_id: &'a [u8],
        name: &'a [u8],
        ip: IpAddr,
        /// The client authenticated (submission): greylisting does not apply.
        sasl: bool,
    },
    /// qmgr: the envelope sender of a queued message.
    From {
        queue_id: &'a [u8],
        from: &'a [u8],
    },
    /// A delivery agent handled one recipient (whatever the status).
    To {
        queue_id: &'a [u8],
        /// `orig_to` when logged (the address given at RCPT before aliasing), else `to`.
        rcpt: &'a [u8],
    },
    Removed {
        queue_id: &'a [u8],
    },
    /// smtpd refused a RCPT.
    Reject {
        name: &'a [u8],
        ip: IpAddr,
        /// The SMTP reply code (450, 554, ...).
        code: u16,
        from: &'a [u8],
        to: &'a [u8],
    },
}

/// A parsed inbound line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundLine<'a> {
    /// Milliseconds since the Unix epoch.
    pub ts: Ts,
    pub event: Inbound<'a>,
}

/// Parses one line (without its newline).
pub fn parse_inbound<'a>(line: &'a [u8], clock: &mut Clock) -> Option<InboundLine<'a>> {
    // smtpd's own lines first; everything else the outbound parser understands already.
    let (ts, rest) = timestamp(line, clock)?;
    let rest = rest.strip_prefix(b" ")?;
    let sp = rest.iter().position(|&b| b == b' ')?;
    let rest = &rest[sp + 1..];
    let colon = find(rest, b": ")?;
    let program = &rest[..colon];
    let msg = &rest[colon + 2..];
    if program.contains(&b' ') {
        return None;
    }
    let service = program
        .rsplit(|&b| b == b'/')
        .next()
        .map(|s| s.split(|&b| b == b'[').next().unwrap_or(s))?;
    if service == b"smtpd" && program.contains(&b'/') {
        let qcolon = find(msg, b": ")?;
        let queue_id = &msg[..qcolon];
        let body = &msg[qcolon + 2..];
        if queue_id == b"NOQUEUE" {
            return reject(body).map(|event| InboundLine { ts, event });
        }
        let client = body.strip_prefix(b"client=")?;
        let (name, ip, after) = name_ip(client)?;
        let sasl = find(after, b"sasl_username=").is_some();
        return Some(InboundLine {
            ts,
            event: Inbound::Client {
                queue_id,
                name,
                ip,
                sasl,
            },
        });
    }
    let parsed = parse_line(line, clock)?;
    let queue_id = parsed.queue_id;
    let event = match parsed.event {
        Event::From(from) => Inbound::From { queue_id, from },
        Event::Delivery(d) => {
            let rcpt = find(line, b", orig_to=<")
                .and_then(|i| {
                    let v = &line[i + 11..];
                    v.iter().position(|&b| b == b'>').map(|e| &v[..e])
                })
                .unwrap_or(d.to);
            Inbound::To { queue_id, rcpt }
        }
        Event::Removed => Inbound::Removed { queue_id },
        Event::MessageId(_) | Event::Expired => return None,
    };
    Some(InboundLine {
        ts: parsed.ts,
        event,
    })
}

/// `name[ip]` and what follows the `]`.
fn name_ip(v: &[u8]) -> Option<(&[u8], IpAddr, &[u8])> {
    let open = v.iter().position(|&b| b == b'[')?;
    let close = open + v[open..].iter().position(|&b| b == b']')?;
    let ip = std::str::from_utf8(&v[open + 1..close]).ok()?;
    let ip = ip.strip_prefix("IPv6:").unwrap_or(ip);
    Some((&v[..open], ip.parse().ok()?, &v[close + 1..]))
}

/// `reject: RCPT from name[ip]: 450 ...; from=<a> to=<b> proto=...`.
fn reject(body: &[u8]) -> Option<Inbound<'_>> {
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
    let end = env.iter().position(|&b| b == b'>')?;
    let from = &env[..end];
    let to_at = find(&env[end..], b" to=<")? + end + 5;
    let to_v = &env[to_at..];
    let to = &to_v[..to_v.iter().position(|&b| b == b'>')?];
    Some(Inbound::Reject {
        name,
        ip,
        code,
        from,
        to,
    })
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| &hay[i..i + needle.len()] == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<Inbound<'_>> {
        parse_inbound(s.as_bytes(), &mut Clock::new(2026)).map(|l| l.event)
    }

    #[test]
    fn accepted_path() {
        assert_eq!(
            parse(
                "Mar  2 10:00:02 mx postfix/smtpd[1234]: 3F4A5B6C7D: client=mail-ey-f170.google.com[209.85.128.170]"
            ),
            Some(Inbound::Client {
                queue_id: b"3F4A5B6C7D",
                name: b"mail-ey-f170.google.com",
                ip: "209.85.128.170".parse().unwrap(),
                sasl: false
            })
        );
        assert_eq!(
            parse(
                "Mar  2 10:00:02 mx postfix/submission/smtpd[9]: 4B: client=unknown[2001:db8::7], sasl_method=PLAIN, sasl_username=bob"
            ),
            Some(Inbound::Client {
                queue_id: b"4B",
                name: b"unknown",
                ip: "2001:db8::7".parse().unwrap(),
                sasl: true
            })
        );
        assert_eq!(
            parse(
                "Mar  2 10:00:02 mx postfix/qmgr[999]: 3F4A5B6C7D: from=<a@gmail.com>, size=1234, nrcpt=1 (queue active)"
            ),
            Some(Inbound::From {
                queue_id: b"3F4A5B6C7D",
                from: b"a@gmail.com"
            })
        );
        assert_eq!(
            parse(
                "Mar  2 10:00:03 mx postfix/lmtp[1250]: 3F4A5B6C7D: to=<bob@site.example>, orig_to=<Bob+news@site.example>, relay=imap[private/dovecot-lmtp], delay=1, delays=0.1/0/0/0.9, dsn=2.0.0, status=sent (250 2.0.0 Saved)"
            ),
            Some(Inbound::To {
                queue_id: b"3F4A5B6C7D",
                rcpt: b"Bob+news@site.example"
            })
        );
        assert_eq!(
            parse("Mar  2 10:00:03 mx postfix/qmgr[999]: 3F4A5B6C7D: removed"),
            Some(Inbound::Removed {
                queue_id: b"3F4A5B6C7D"
            })
        );
    }

    #[test]
    fn rejects() {
        let l = "Mar  2 10:01:00 mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[203.0.113.5]: 450 4.7.1 <carol@site.example>: Recipient address rejected: Greylisted; from=<x@spam.example> to=<carol@site.example> proto=ESMTP helo=<bot>";
        assert_eq!(
            parse(l),
            Some(Inbound::Reject {
                name: b"unknown",
                ip: "203.0.113.5".parse().unwrap(),
                code: 450,
                from: b"x@spam.example",
                to: b"carol@site.example"
            })
        );
        let l = "2026-03-02T10:01:00+00:00 mx postfix/smtpd[77]: NOQUEUE: milter-reject: RCPT from a.example[192.0.2.9]: 554 5.7.1 Blocked; from=<> to=<d@site.example> proto=SMTP helo=<a>";
        assert!(matches!(
            parse(l),
            Some(Inbound::Reject {
                code: 554,
                from: b"",
                ..
            })
        ));
        // Not ours, or broken.
        for l in [
            "Mar  2 10:01:00 mx postfix/smtpd[77]: connect from unknown[203.0.113.5]",
            "Mar  2 10:01:00 mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[bad]: 450 x; from=<a> to=<b>",
            "Mar  2 10:01:00 mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 250 ok; from=<a> to=<b>",
            "Mar  2 10:01:00 mx postfix/cleanup[7]: 3F4A5B6C7D: message-id=<x@y>",
            "Mar  2 10:01:00 mx sshd[7]: 3F4A5B6C7D: client=a[192.0.2.1]",
            "",
        ] {
            assert_eq!(parse(l), None, "{l}");
        }
    }
}
