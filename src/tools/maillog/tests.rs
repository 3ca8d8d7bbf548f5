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

// Exim 4's mainlog. The lines are as Exim 4.96 wrote them in the integration test (ids,
// hosts and times changed), with `log_selector = +pid +millisec +queue_time +deliver_time
// +outgoing_port` and `log_timezone` where shown.

const EXIM_ARRIVAL: &str = "2026-12-04 16:23:29.763 [20625] 1xZW4H-0005Mf-2R <= carol@example.net H=(client.example.net) [127.0.0.1] P=esmtp S=401 id=20261204162329.020623@client.example.net";
const EXIM_SENT: &str = "2026-12-04 17:23:29.776 +0100 [20626] 1xZW4H-0005Mf-2R => a@sink.example <A@sink.example> R=sink T=remote_smtp H=127.0.0.1 [127.0.0.1]:2601 C=\"250 2.0.0 Ok: queued as 12\" QT=1m2.5s DT=0.000s";
const EXIM_MORE: &str = "2026-12-04 16:23:09 1xZW3q-0005IX-0u -> b@sink.example R=sink T=remote_smtp H=127.0.0.1 [127.0.0.1] C=\"250 2.0.0 Ok\" QT=6s DT=0.006s";
const EXIM_GREYLISTED: &str = "2026-12-04 16:23:09.198 [20405] 1tGxyz-00000000Ivm-2pVT == dave@example.org R=dnslookup T=remote_smtp defer (-44) H=mx.example.org [192.0.2.1] DT=0.000s: SMTP error from remote mail server after RCPT TO:<dave@example.org>: 451 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, try again in 2 seconds";
const EXIM_BOUNCED: &str = "2026-12-04 16:23:09.201 [20405] 1xZW3q-0005IX-0u ** d@rej.example R=rej T=remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error from remote mail server after RCPT TO:<d@rej.example>: 550 5.1.1 <d@rej.example>: Recipient address rejected: User unknown DT=0.000s";

/// Every Exim line kind the tests use, for the never-panics tests.
const EXIM_LINES: &[&str] = &[
    EXIM_ARRIVAL,
    EXIM_SENT,
    EXIM_MORE,
    EXIM_GREYLISTED,
    EXIM_BOUNCED,
    "2026-12-04 16:23:09 1xZW3q-0005IX-0u == a@sink.example R=sink T=remote_smtp defer (111): Connection refused DT=0.000s",
    "2026-12-04 16:23:09 1xZW3q-0005IX-0u ** carol@example.net: Unrouteable address DT=0.000s",
    "2026-12-04 16:23:09 1xZW3q-0005IX-0u *> x@example.org R=r T=t",
    "2026-12-04 16:23:29.776 -0530 [20626] 1xZW4H-0005Mf-2R Completed QT=0.020s",
];

fn exim(s: &str) -> Option<Line<'_>> {
    parse_exim_line(s.as_bytes())
}

fn exim_delivery(s: &str) -> Delivery<'_> {
    match exim(s).unwrap_or_else(|| panic!("not parsed: {s}")).event {
        Event::Delivery(d) => d,
        e => panic!("not a delivery: {e:?}"),
    }
}

#[test]
fn exim_arrival() {
    let l = exim(EXIM_ARRIVAL).unwrap();
    assert_eq!(l.ts, 1_796_401_409_763);
    assert_eq!(l.program, b"exim");
    assert_eq!(l.queue_id, b"1xZW4H-0005Mf-2R");
    assert_eq!(
        l.event,
        Event::Arrival {
            from: b"carol@example.net",
            message_id: Some(b"20261204162329.020623@client.example.net"),
        }
    );
    // The null sender, and no Message-ID (a bounce Exim wrote itself).
    let l = exim("2026-12-04 16:23:09 1xZW3x-0005JE-0f <= <> R=1xZW3q-0005IX-0u U=Debian-exim P=local S=1682").unwrap();
    assert_eq!(
        l.event,
        Event::Arrival {
            from: b"",
            message_id: None
        }
    );
    // A HELO name that says `id=` is not the message's id.
    let l = exim("2026-12-04 16:23:09 1xZW3x-0005JE-0f <= a@b.example H=(x id=forged S=1) [192.0.2.9] P=esmtp S=12 id=real@b.example T=\"id=subject\"").unwrap();
    assert!(matches!(
        l.event,
        Event::Arrival {
            message_id: Some(b"real@b.example"),
            ..
        }
    ));
}

#[test]
fn exim_sent_and_additional_address() {
    let l = exim(EXIM_SENT).unwrap();
    // 17:23:29.776 at +0100.
    assert_eq!(l.ts, 1_796_401_409_776);
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.status, DeliveryStatus::Sent);
    assert_eq!(d.to, b"a@sink.example");
    assert_eq!(d.orig_to, Some(&b"A@sink.example"[..]));
    assert_eq!(d.relay, b"127.0.0.1 [127.0.0.1]:2601");
    assert_eq!(d.detail, b"250 2.0.0 Ok: queued as 12");
    assert_eq!(d.dsn, b"2.0.0");
    assert_eq!(d.delay, Some(62.5));
    assert_eq!(d.delays, b"");
    assert!(remote_reply(d.detail).is_none());

    let l = exim(EXIM_MORE).unwrap();
    assert_eq!(l.ts, 1_796_401_389_000);
    assert_eq!(l.queue_id, b"1xZW3q-0005IX-0u");
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.status, DeliveryStatus::Sent);
    assert_eq!(d.to, b"b@sink.example");
    assert_eq!(d.orig_to, None);
    assert_eq!(d.relay, b"127.0.0.1 [127.0.0.1]");
    assert_eq!(d.delay, Some(6.0));

    // `+all_parents`, a cutthrough delivery, and one suppressed by `-N`.
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u >> bob@example.org (list@example.org) <all@example.org> R=r T=t H=mx.example.org [2001:db8::25] C=\"250 OK\"",
    );
    assert_eq!(d.status, DeliveryStatus::Sent);
    assert_eq!(d.to, b"bob@example.org");
    assert_eq!(d.orig_to, Some(&b"all@example.org"[..]));
    assert_eq!(d.relay, b"mx.example.org [2001:db8::25]");
    assert_eq!(d.dsn, b"");
    assert_eq!(d.delay, None);
    let d = exim_delivery("2026-12-04 16:23:09 1xZW3q-0005IX-0u *> x@example.org R=r T=t");
    assert_eq!(d.status, DeliveryStatus::Other);
    assert_eq!(d.relay, b"");
    assert_eq!(d.detail, b"");
}

#[test]
fn exim_deferrals() {
    let l = exim(EXIM_GREYLISTED).unwrap();
    // The 6-11-4 ids of Exim 4.97 and later.
    assert_eq!(l.queue_id, b"1tGxyz-00000000Ivm-2pVT");
    let Event::Delivery(d) = l.event else {
        panic!()
    };
    assert_eq!(d.status, DeliveryStatus::Deferred);
    assert_eq!(d.to, b"dave@example.org");
    assert_eq!(d.relay, b"mx.example.org [192.0.2.1]");
    assert_eq!(d.dsn, b"4.7.1");
    assert_eq!(d.delay, None);
    let reply = remote_reply(d.detail).unwrap();
    assert_eq!(
        reply,
        b"451 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, try again in 2 seconds"
    );
    // What `track` makes of it: the same classifier as for Postfix's replies.
    use crate::tools::outbound::classify::{Class, Reply, classify};
    let class = classify(&Reply::parse(&String::from_utf8_lossy(reply)).unwrap());
    assert!(matches!(class, Class::Greylisted { .. }), "{class:?}");

    // After the data, with the timings Exim appends after the reason.
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u == e@example.com R=dnslookup T=remote_smtp defer (-46) H=mx.example.com [192.0.2.2]: SMTP error from remote mail server after end of data: 451 4.3.0 Temporary local problem DT=1s",
    );
    assert_eq!(
        d.detail,
        b"SMTP error from remote mail server after end of data: 451 4.3.0 Temporary local problem"
    );
    assert_eq!(
        remote_reply(d.detail).unwrap(),
        b"451 4.3.0 Temporary local problem"
    );
    let class = classify(&Reply::parse("451 4.3.0 Temporary local problem").unwrap());
    assert!(!matches!(class, Class::Greylisted { .. }), "{class:?}");
    // Older Exims: `remote mailer`, and the host between the command and the reply.
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u == e@example.com R=dnslookup T=remote_smtp defer (-44): SMTP error from remote mailer after RCPT TO:<e@example.com>: host mx.example.com [192.0.2.2]: 450 4.2.0 <e@example.com>: Greylisted",
    );
    assert_eq!(d.relay, b"");
    assert_eq!(
        remote_reply(d.detail).unwrap(),
        b"450 4.2.0 <e@example.com>: Greylisted"
    );
    assert_eq!(d.dsn, b"4.2.0");
    // No reply at all.
    let d = exim_delivery(EXIM_LINES[5]);
    assert_eq!(d.status, DeliveryStatus::Deferred);
    assert_eq!(d.to, b"a@sink.example");
    assert_eq!(d.detail, b"Connection refused");
    assert_eq!(d.dsn, b"");
    assert!(remote_reply(d.detail).is_none());
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u == a@example.com <A@example.com> R=dnslookup T=remote_smtp defer (111) H=mx.example.com [192.0.2.2]:2525: Connection refused",
    );
    assert_eq!(d.orig_to, Some(&b"A@example.com"[..]));
    assert_eq!(d.relay, b"mx.example.com [192.0.2.2]:2525");
    assert_eq!(d.detail, b"Connection refused");

    // Not attempts: Exim only says it waits.
    for line in [
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u == a@example.com R=dnslookup T=remote_smtp defer (-53): retry time not reached for any host for 'example.com'",
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u == a@example.com routing defer (-51): retry time not reached",
    ] {
        assert!(exim(line).is_none(), "{line}");
    }
}

#[test]
fn exim_bounces_and_completion() {
    let d = exim_delivery(EXIM_BOUNCED);
    assert_eq!(d.status, DeliveryStatus::Bounced);
    assert_eq!(d.to, b"d@rej.example");
    assert_eq!(d.relay, b"127.0.0.1 [127.0.0.1]");
    assert_eq!(d.dsn, b"5.1.1");
    assert_eq!(
        remote_reply(d.detail).unwrap(),
        b"550 5.1.1 <d@rej.example>: Recipient address rejected: User unknown"
    );
    let d = exim_delivery(EXIM_LINES[6]);
    assert_eq!(d.status, DeliveryStatus::Bounced);
    assert_eq!(d.to, b"carol@example.net");
    assert_eq!(d.detail, b"Unrouteable address");
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u ** e@example.com <E@example.com>: retry timeout exceeded",
    );
    assert_eq!(d.status, DeliveryStatus::Expired);
    assert_eq!(d.orig_to, Some(&b"E@example.com"[..]));
    let d = exim_delivery(
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u ** e@example.com R=dnslookup T=remote_smtp: retry time not reached for any host after a long failure period",
    );
    assert_eq!(d.status, DeliveryStatus::Expired);

    let l = exim(EXIM_LINES[8]).unwrap();
    assert_eq!(l.event, Event::Removed);
    // 16:23:29.776 at -0530.
    assert_eq!(l.ts, 1_796_401_409_776 + 5 * 3_600_000 + 1_800_000);
    let l = exim("2026-12-04 16:23:09 1tGxyz-00000000Ivm-2pVT Completed").unwrap();
    assert_eq!(l.event, Event::Removed);
}

#[test]
fn exim_lines_that_are_not_events() {
    for line in [
        "2026-12-04 16:23:09.176 [20401] Start queue run: pid=20401 -qff",
        "2026-12-04 16:23:02.298 [20373] 1xZW3q-0005IX-0u H=127.0.0.1 [127.0.0.1] Connection refused",
        "2026-12-04 16:23:09.222 [20417] 1xZW3x-0005JE-0f Frozen (delivery error message)",
        "2026-12-04 16:23:09 1xZW3x-0005JE-0f Completedly",
        "2026-12-04 16:23:09 1xZW3x-0005JE-0f <=",
        "2026-12-04 16:23:09 1xZW3x-0005JE-0f =>",
        "2026-12-04 16:23:09 1xZW3x-0005JE-0f => <a@b> R=r",
        // Not a message id: wrong lengths, dashes or characters.
        "2026-12-04 16:23:09 1xZW3x-0005JE-0 Completed",
        "2026-12-04 16:23:09 1xZW3x_0005JE-0f Completed",
        "2026-12-04 16:23:09 1xZW3x-0005JE-0! Completed",
        "2026-12-04 16:23:09 1tGxyz-0000000Ivm-2pVT Completed",
        // Timestamps Exim does not write.
        "2026-12-04T16:23:09 1xZW3x-0005JE-0f Completed",
        "2026-12-04 16:23:09.12 1xZW3x-0005JE-0f Completed",
        "2026-12-04 16:23:09 +01:00 1xZW3x-0005JE-0f Completed",
        "2026-12-04 16:23:09 [x] 1xZW3x-0005JE-0f Completed",
        "2026-13-04 16:23:09 1xZW3x-0005JE-0f Completed",
        "",
    ] {
        assert!(exim(line).is_none(), "{line}");
    }
    // Neither format takes the other's lines.
    assert!(exim(DEFERRED).is_none());
    for line in EXIM_LINES {
        assert!(parse(line).is_none(), "{line}");
    }
}

#[test]
fn parser_finds_the_format_per_file() {
    let mut p = Parser::new(Clock::new(2026));
    assert_eq!(p.format(), None);
    // Lines of neither kind decide nothing.
    assert!(p.parse(b"garbage").is_none());
    assert!(
        p.parse(b"2026-12-04 16:23:09 Start queue run: pid=1 -qff")
            .is_none()
    );
    assert_eq!(p.format(), None);
    assert!(p.parse(EXIM_ARRIVAL.as_bytes()).is_some());
    assert_eq!(p.format(), Some(Format::Exim));
    // Locked: a Postfix line in an Exim file is not read.
    assert!(p.parse(DEFERRED.as_bytes()).is_none());
    assert!(p.parse(EXIM_SENT.as_bytes()).is_some());
    p.new_file();
    assert_eq!(p.format(), None);
    let l = p.parse(DEFERRED.as_bytes()).unwrap();
    assert_eq!(l.queue_id, b"4FzQ1b2c3d");
    assert_eq!(p.format(), Some(Format::Postfix));
    assert!(p.parse(EXIM_SENT.as_bytes()).is_none());
    // Line by line, without a lock.
    let mut clock = Clock::new(2026);
    assert!(parse_any(DEFERRED.as_bytes(), &mut clock).is_some());
    assert!(parse_any(EXIM_SENT.as_bytes(), &mut clock).is_some());
    assert!(parse_any(b"garbage", &mut clock).is_none());
}

#[test]
fn exim_durations_and_timestamps() {
    let d = |s: &str| {
        let line = format!("2026-12-04 16:23:09 1xZW3q-0005IX-0u => a@b.example R=r T=t QT={s}");
        exim_delivery(&line).delay
    };
    assert_eq!(d("0.018s"), Some(0.018));
    assert_eq!(d("1h2m3s"), Some(3723.0));
    assert_eq!(d("1w1d"), Some(691_200.0));
    assert_eq!(d("2x"), None);
    assert_eq!(d("s"), None);
    assert_eq!(d(""), None);
    let ts = |s: &str| exim_timestamp(s.as_bytes()).map(|(ts, rest)| (ts, rest.len()));
    assert_eq!(ts("2026-12-04 16:23:09"), Some((1_796_401_389_000, 0)));
    assert_eq!(ts("2026-12-04 16:23:09.5"), None);
    assert_eq!(
        ts("2026-12-04 16:23:09.500 +0000 x"),
        Some((1_796_401_389_500, 2))
    );
    assert_eq!(ts("2026-12-04 16:23:09 +2400"), None);
    // A sign that is not a zone is left for what follows.
    assert_eq!(
        ts("2026-12-04 16:23:09 +01000"),
        Some((1_796_401_389_000, 7))
    );
}

/// Random bytes, Exim-looking prefixes with random tails, and every prefix and single-byte
/// corruption of each line kind: no panic, through every entry point.
#[test]
fn random_and_near_miss_lines_never_panic() {
    use proptest::prelude::*;
    fn all(bytes: &[u8]) {
        let mut p = Parser::new(Clock::new(2026));
        for _ in 0..2 {
            if let Some(Line {
                event: Event::Delivery(d),
                ..
            }) = p.parse(bytes)
            {
                let _ = remote_reply(d.detail);
            }
        }
        let _ = parse_any(bytes, &mut Clock::new(2026));
        let _ = parse_exim_line(bytes);
        let _ = exim_timestamp(bytes);
        let _ = remote_reply(bytes);
    }
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..300), |bytes| {
            all(&bytes);
            Ok(())
        })
        .unwrap();
    const HEADS: &[&str] = &[
        "2026-12-04 16:23:09 1xZW3q-0005IX-0u ",
        "2026-12-04 16:23:09.123 +0100 [1] 1tGxyz-00000000Ivm-2pVT ",
    ];
    let tail = proptest::sample::select(&["=> ", "== ", "** ", "<= ", "-> ", "*> ", ""][..]);
    runner
        .run(
            &(proptest::sample::select(HEADS), tail, "[ -~]{0,120}"),
            |(head, marker, rest)| {
                all(format!("{head}{marker}{rest}").as_bytes());
                Ok(())
            },
        )
        .unwrap();
    for line in EXIM_LINES {
        let line = line.as_bytes();
        for i in 0..line.len() {
            all(&line[..i]);
            let mut b = line.to_vec();
            for x in [b'\xff', b' ', b':', b'"', b']'] {
                b[i] = x;
                all(&b);
            }
        }
    }
}
