//! Tests of [`super::parse_line`] over whole lines: every line shape, the queue events
//! `track` follows and smtpd's events `replay` reads, and what is not ours.

use super::*;

const DEFERRED: &str = "Nov 28 19:31:46 relay postfix/smtp[123]: 4FzQ1b2c3d: to=<dave@example.org>, relay=mx.example.org[192.0.2.1]:25, delay=0.31, delays=0.05/0.01/0.2/0.05, dsn=4.7.1, status=deferred (host mx.example.org[192.0.2.1] said: 450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, please try again in 300 seconds (in reply to RCPT TO command))";

fn parse(s: &str) -> Option<Line<'_>> {
    parse_line(s.as_bytes(), &mut Clock::new(2026))
}

#[test]
fn classic_deferral() {
    let l = parse(DEFERRED).unwrap();
    assert_eq!(l.queue_id, b"4FzQ1b2c3d");
    // 2026-11-28 19:31:46 UTC
    assert_eq!(l.ts, 1_795_894_306_000);
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.to, b"dave@example.org");
    assert_eq!(d.relay, b"mx.example.org[192.0.2.1]:25");
    assert_eq!(d.delay, Some(0.31));
    assert_eq!(d.delays, b"0.05/0.01/0.2/0.05");
    assert_eq!(d.dsn, b"4.7.1");
    assert_eq!(d.status, DeliveryStatus::Deferred);
    assert_eq!(
        remote_reply(d.detail).unwrap(),
        b"450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, please try again in 300 seconds"
    );
}

#[test]
fn iso_and_other_events() {
    let l = parse("2026-11-28T20:31:46.250+01:00 relay postfix/cleanup[9]: 4FzQ1b2c3d: message-id=<abc@example.net>").unwrap();
    assert_eq!(l.ts, 1_795_894_306_250);
    assert_eq!(l.event, Event::MessageId(b"abc@example.net"));
    let l = parse("2026-11-28T19:31:46Z relay postfix/qmgr[9]: 4FzQ1b2c3d: from=<carol@example.net>, size=312, nrcpt=1 (queue active)").unwrap();
    assert_eq!(l.event, Event::From(b"carol@example.net"));
    let l = parse("Nov  8 01:02:03 relay postfix/qmgr[9]: ABCDEF123: removed").unwrap();
    assert_eq!(l.event, Event::Removed);
    let l = parse("Nov  8 01:02:03 relay postfix/qmgr[9]: ABCDEF123: from=<>, status=expired, returned to sender").unwrap();
    assert_eq!(l.event, Event::Expired);
    // Not ours.
    assert!(
        parse("Nov  8 01:02:03 relay postfix/smtpd[9]: warning: hostname x does not resolve")
            .is_none()
    );
    assert!(
        parse("Nov  8 01:02:03 relay postfix/smtpd[9]: NOQUEUE: reject: RCPT from x").is_none()
    );
    assert!(parse("Nov  8 01:02:03 relay sshd[9]: ABCDEF123: removed").is_none());
    assert!(parse("garbage").is_none());
    assert!(parse("").is_none());
}

#[test]
fn sent_without_reply() {
    let l = parse("Nov 28 19:36:51 relay postfix/smtp[124]: 4FzQ1b2c3d: to=<dave@example.org>, orig_to=<d@example.org>, relay=mx.example.org[192.0.2.1]:25, delay=305, delays=0.05/300/0.2/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 123)").unwrap();
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.status, DeliveryStatus::Sent);
    assert_eq!(d.delay, Some(305.0));
    assert_eq!(d.detail, b"250 2.0.0 Ok: queued as 123");
    assert!(remote_reply(d.detail).is_none());
}

#[test]
fn year_rolls_over() {
    let mut c = Clock::new(2026);
    let a = parse_line(
        b"Dec 31 23:59:59 h postfix/qmgr[1]: ABCDEF1: removed",
        &mut c,
    )
    .unwrap()
    .ts;
    let b = parse_line(
        b"Jan  1 00:00:01 h postfix/qmgr[1]: ABCDEF1: removed",
        &mut c,
    )
    .unwrap()
    .ts;
    assert_eq!(b - a, 2000);
}

#[test]
fn orig_to_and_fields() {
    let l = parse("Mar  2 10:00:03 mx postfix/lmtp[1250]: 3F4A5B6C7D: to=<bob@site.example>, orig_to=<Bob+news@site.example>, relay=imap[private/dovecot-lmtp], delay=1, delays=0.1/0/0/0.9, dsn=2.0.0, status=sent (250 2.0.0 Saved)").unwrap();
    assert_eq!(l.program, b"postfix/lmtp[1250]");
    assert_eq!(l.service(), b"lmtp");
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.to, b"bob@site.example");
    assert_eq!(d.orig_to, Some(&b"Bob+news@site.example"[..]));
    assert_eq!(d.relay, b"imap[private/dovecot-lmtp]");
    let Event::Delivery(d) = parse(DEFERRED).unwrap().event else {
        panic!()
    };
    assert_eq!(d.orig_to, None);

    let fields = b"to=<a>, relay=mx[192.0.2.1]:25, delay=0.31";
    assert_eq!(field(fields, b"relay"), Some(&b"mx[192.0.2.1]:25"[..]));
    assert_eq!(field(fields, b"delay"), Some(&b"0.31"[..]));
    assert_eq!(field(fields, b"dsn"), None);
    // Only `, name=`: not the start of the text, not a longer name ending the same way.
    assert_eq!(field(fields, b"to"), None);
    assert_eq!(field(b"x, xdelay=1", b"delay"), None);
    assert_eq!(field(fields, &[b'a'; 64]), None);
}

#[test]
fn smtpd_events() {
    let l = parse("Mar  2 10:00:02 mx postfix/submission/smtpd[9]: 4B: client=unknown[2001:db8::7], sasl_method=PLAIN, sasl_username=bob").unwrap();
    assert_eq!(l.service(), b"smtpd");
    assert_eq!(l.queue_id, b"4B");
    assert_eq!(
        l.event,
        Event::Client(Client {
            name: b"unknown",
            ip: "2001:db8::7".parse().unwrap(),
            sasl: true
        })
    );
    let l = parse(
        "Mar  2 10:00:02 mx postfix/smtpd[1]: 3F4A5B6C7D: client=a.example[IPv6:2001:db8::8]",
    )
    .unwrap();
    assert!(matches!(l.event, Event::Client(Client { sasl: false, .. })));
    let l = parse("2026-03-02T10:01:00+00:00 mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[203.0.113.5]: 450 4.7.1 <carol@site.example>: Recipient address rejected: from=<quoted@x> to=<quoted@y>; from=<x@spam.example> to=<carol@site.example> proto=ESMTP helo=<bot>").unwrap();
    assert_eq!(l.queue_id, b"NOQUEUE");
    assert_eq!(
        l.event,
        Event::Reject(Reject {
            name: b"unknown",
            ip: "203.0.113.5".parse().unwrap(),
            code: 450,
            from: b"x@spam.example",
            to: b"carol@site.example"
        })
    );
    // smtpd's events are smtpd's: another program saying `client=` is not one.
    assert!(
        parse("Mar  2 10:00:02 mx postfix/cleanup[1]: 3F4A5B6C7D: client=a[192.0.2.1]").is_none()
    );
    assert!(
        parse("Mar  2 10:00:02 mx postfix/smtpd[1]: 3F4A5B6C7D: client=a[not-an-ip]").is_none()
    );
}

#[test]
fn trimmed_lines() {
    assert_eq!(trim_line(b"a\r\n"), b"a");
    assert_eq!(trim_line(b"a\n"), b"a");
    assert_eq!(trim_line(b"a"), b"a");
    assert_eq!(trim_line(&[b'x'; MAX_LINE + 10]).len(), MAX_LINE);
}
