//! What `greygate replay` takes from a receiving site's Postfix log: the lines that say who
//! tried to deliver what to whom. The line format is [`crate::tools::maillog`]'s; this is
//! replay's view of its events. Byte slices in, borrowed fields out; never panics; anything
//! else is `None`.
//!
//! - smtpd, accepted: `QUEUEID: client=name[ip]` (with `, sasl_username=...` when the
//!   client authenticated), then qmgr's `QUEUEID: from=<...>, size=...` and one delivery
//!   line per recipient (`to=<...>, orig_to=<...>, relay=..., status=...`);
//!   `QUEUEID: removed` ends the queue id.
//! - smtpd, refused at RCPT: `NOQUEUE: reject: RCPT from name[ip]: 450 4.7.1 <...>: ...;
//!   from=<...> to=<...> proto=ESMTP helo=<...>` (also `milter-reject`).

use std::net::IpAddr;

use crate::tools::maillog::{self, Clock, Event, Ts};

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
    let parsed = maillog::parse_line(line, clock)?;
    let queue_id = parsed.queue_id;
    let event = match parsed.event {
        Event::Client(c) => Inbound::Client {
            queue_id,
            name: c.name,
            ip: c.ip,
            sasl: c.sasl,
        },
        Event::Reject(r) => Inbound::Reject {
            name: r.name,
            ip: r.ip,
            code: r.code,
            from: r.from,
            to: r.to,
        },
        // Queue events are qmgr's and the delivery agents'; smtpd writes none, and replay
        // has never taken one under smtpd's name.
        _ if parsed.service() == b"smtpd" => return None,
        Event::From(from) => Inbound::From { queue_id, from },
        Event::Delivery(d) => Inbound::To {
            queue_id,
            rcpt: d.orig_to.unwrap_or(d.to),
        },
        Event::Removed => Inbound::Removed { queue_id },
        Event::MessageId(_) | Event::Expired | Event::Arrival { .. } => return None,
    };
    Some(InboundLine {
        ts: parsed.ts,
        event,
    })
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
