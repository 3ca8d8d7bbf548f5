//! Pure, allocation-free parsing of one Postfix log line into a timestamp, a queue id and
//! the event it records. Works on byte slices (logs are not always UTF-8) and never
//! panics: anything it does not understand is `None`, and the tracker skips it.
//!
//! Accepted line shapes (what follows the timestamp is the same in all):
//! - classic syslog: `Nov 28 19:31:46 host postfix/smtp[123]: 4FzQ1b2c3d: to=<...>, ...`
//! - RFC 5424 / ISO 8601: `2026-11-28T19:31:46.123456+00:00 host postfix/smtp[123]: ...`
//! - Postfix's own `maillog_file` (postlogd): the classic shape.

/// Milliseconds since the Unix epoch (UTC for ISO timestamps; classic syslog timestamps
/// carry no zone and are taken as UTC, which keeps differences between them right).
pub type Ts = i64;

/// What a line says about a queued message.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// cleanup: `message-id=<...>`.
    MessageId(&'a [u8]),
    /// qmgr: `from=<...>, size=..., nrcpt=N (queue active)`.
    From(&'a [u8]),
    /// qmgr: `from=<...>, status=expired, returned to sender`: recipients still pending gave up.
    Expired,
    /// A delivery agent (smtp, lmtp, local, ...): one attempt for one recipient.
    Delivery(Delivery<'a>),
    /// qmgr: `removed`: the queue id is free for reuse after this.
    Removed,
}

/// Fields of a delivery attempt line.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<'a> {
    pub to: &'a [u8],
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

/// A parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    pub ts: Ts,
    pub queue_id: &'a [u8],
    pub event: Event<'a>,
}

/// Turns classic timestamps (no year) into absolute ones: starts from a given year and
/// moves to the next year when the month goes from December back to January.
#[derive(Debug, Clone)]
pub struct Clock {
    year: i64,
    last_month: u8,
    /// The current month when reading live logs: a first line from a later month must be
    /// from last year (a December log read in January).
    now_month: Option<u8>,
}

impl Clock {
    /// The clock for `--year`, or for today (UTC year and month) when none is given.
    pub fn for_year_or_today(year: Option<i64>) -> Self {
        match year {
            Some(y) => Clock::new(y),
            None => {
                // Today's year and month from the formatted timestamp: no time-zone
                // database needed.
                let now = jiff::Timestamp::now().strftime("%Y %m").to_string();
                let mut it = now.split(' ').filter_map(|v| v.parse::<i64>().ok());
                let (year, month) = (it.next().unwrap_or(2026), it.next().unwrap_or(1));
                Clock::for_now(year, u8::try_from(month).unwrap_or(1))
            }
        }
    }

    /// `year`: the year the first classic line belongs to.
    pub fn new(year: i64) -> Self {
        Clock {
            year,
            last_month: 0,
            now_month: None,
        }
    }

    /// For logs read now: `year` and `month` are today's.
    pub fn for_now(year: i64, month: u8) -> Self {
        Clock {
            now_month: Some(month),
            ..Clock::new(year)
        }
    }

    fn classic(&mut self, month: u8, day: u8, secs_of_day: i64) -> Ts {
        if self.last_month == 0 && self.now_month.is_some_and(|now| month > now) {
            self.year -= 1;
        }
        if self.last_month == 12 && month == 1 {
            self.year += 1;
        }
        self.last_month = month;
        (days_from_civil(self.year, month, day) * 86_400 + secs_of_day) * 1000
    }
}

/// Parses one line (without its newline). `None`: not a queue-id line we understand.
pub fn parse_line<'a>(line: &'a [u8], clock: &mut Clock) -> Option<Line<'a>> {
    let (ts, rest) = timestamp(line, clock)?;
    // host
    let rest = rest.strip_prefix(b" ")?;
    let sp = memchr(b' ', rest)?;
    let rest = &rest[sp + 1..];
    // program[pid]: — Postfix programs are `syslog_name/service` (postfix/smtp,
    // postfix-out/qmgr); other programs' lines are not ours.
    let colon = find(rest, b": ")?;
    let program = &rest[..colon];
    if memchr(b'/', program).is_none() || memchr(b' ', program).is_some() {
        return None;
    }
    let msg = &rest[colon + 2..];
    let qcolon = find(msg, b": ")?;
    let queue_id = &msg[..qcolon];
    if !is_queue_id(queue_id) {
        return None;
    }
    let body = &msg[qcolon + 2..];
    let event = event(body)?;
    Some(Line {
        ts,
        queue_id,
        event,
    })
}

/// Short ids are upper-case hex; long ids (`enable_long_queue_ids`) mix cases and digits.
/// Words like `warning` (all lower case) are not ids.
fn is_queue_id(id: &[u8]) -> bool {
    (6..=20).contains(&id.len())
        && id.iter().all(u8::is_ascii_alphanumeric)
        && id
            .iter()
            .any(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        && id != b"NOQUEUE"
}

fn event(body: &[u8]) -> Option<Event<'_>> {
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
        return delivery(body).map(Event::Delivery);
    }
    None
}

fn delivery(body: &[u8]) -> Option<Delivery<'_>> {
    let v = &body[4..];
    let end = memchr(b'>', v)?;
    let to = &v[..end];
    let status_at = find(body, b", status=")?;
    let fields = &body[..status_at];
    let field = |name: &[u8]| -> &[u8] {
        let mut pat = [0u8; 16];
        let n = name.len() + 3;
        pat[..2].copy_from_slice(b", ");
        pat[2..2 + name.len()].copy_from_slice(name);
        pat[n - 1] = b'=';
        match find(fields, &pat[..n]) {
            Some(i) => until(&fields[i + n..], b','),
            None => b"",
        }
    };
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
        relay: field(b"relay"),
        delay: std::str::from_utf8(field(b"delay"))
            .ok()
            .and_then(|s| s.parse().ok()),
        delays: field(b"delays"),
        dsn: field(b"dsn"),
        status,
        detail,
    })
}

/// The remote server's reply inside a deferral detail (`host X[ip] said: 450 ... (in reply
/// to RCPT TO command)`), when there is one.
pub fn remote_reply(detail: &[u8]) -> Option<&[u8]> {
    let at = find(detail, b" said: ")?;
    let reply = &detail[at + 7..];
    Some(match rfind(reply, b" (in reply to ") {
        Some(end) => &reply[..end],
        None => reply,
    })
}

/// The timestamp at the start of a line (classic syslog or ISO 8601) and the rest after it.
pub fn timestamp<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Ts, &'a [u8])> {
    if line.first().is_some_and(u8::is_ascii_digit) {
        iso(line)
    } else {
        classic(line, clock)
    }
}

/// `Nov 28 19:31:46` (day space-padded: `Nov  8`).
fn classic<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Ts, &'a [u8])> {
    let head = line.get(..15)?;
    let month = match &head[..3] {
        b"Jan" => 1,
        b"Feb" => 2,
        b"Mar" => 3,
        b"Apr" => 4,
        b"May" => 5,
        b"Jun" => 6,
        b"Jul" => 7,
        b"Aug" => 8,
        b"Sep" => 9,
        b"Oct" => 10,
        b"Nov" => 11,
        b"Dec" => 12,
        _ => return None,
    };
    if head[3] != b' ' || head[6] != b' ' {
        return None;
    }
    let day = match head[4] {
        b' ' => digits(&head[5..6])?,
        _ => digits(&head[4..6])?,
    };
    if !(1..=31).contains(&day) {
        return None;
    }
    let secs = hms(&head[7..15])?;
    Some((clock.classic(month as u8, day as u8, secs), &line[15..]))
}

/// `2026-11-28T19:31:46[.ffffff](Z|+hh:mm|-hh:mm)`.
fn iso(line: &[u8]) -> Option<(Ts, &[u8])> {
    let head = line.get(..19)?;
    if head[4] != b'-' || head[7] != b'-' || !matches!(head[10], b'T' | b' ') {
        return None;
    }
    let year = digits(&head[..4])?;
    let month = digits(&head[5..7])?;
    let day = digits(&head[8..10])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let secs = hms(&head[11..19])?;
    let mut rest = &line[19..];
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
        let mut scale = 100;
        for &b in frac.iter().take(n.min(3)) {
            millis += i64::from(b - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[n..];
    }
    let mut offset = 0i64;
    if let Some(r) = rest.strip_prefix(b"Z") {
        rest = r;
    } else if let Some(sign) = rest.first().filter(|b| matches!(b, b'+' | b'-')) {
        let z = rest.get(1..6)?;
        if z[2] != b':' {
            return None;
        }
        offset =
            (digits(&z[..2])? * 3600 + digits(&z[3..5])? * 60) * if *sign == b'-' { -1 } else { 1 };
        rest = &rest[6..];
    }
    let days = days_from_civil(year, month as u8, day as u8);
    Some(((days * 86_400 + secs - offset) * 1000 + millis, rest))
}

/// `19:31:46` as seconds of the day.
fn hms(b: &[u8]) -> Option<i64> {
    if b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (digits(&b[..2])?, digits(&b[3..5])?, digits(&b[6..8])?);
    (h < 24 && m < 60 && s < 61).then_some(h * 3600 + m * 60 + s)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn trim_angle(v: &[u8]) -> &[u8] {
    let v = v.strip_prefix(b"<").unwrap_or(v);
    v.strip_suffix(b">").unwrap_or(v)
}

fn until(v: &[u8], stop: u8) -> &[u8] {
    match memchr(stop, v) {
        Some(i) => &v[..i],
        None => v,
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// The first position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        let off = memchr(first, &hay[i..=last_start])?;
        i += off;
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
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
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }
}
