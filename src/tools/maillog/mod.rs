//! The one place that knows the mail log line formats: `greygate track` (outbound
//! delivery timelines), `greygate replay` and their fuzz targets all read lines through
//! [`parse_line`] (Postfix), [`parse_exim_line`] (Exim 4's mainlog), or [`Parser`] and
//! [`parse_any`] (either), so a line shape learnt here is learnt by every tool.
//!
//! Pure and allocation-free: byte slices in (logs are not always UTF-8), borrowed fields
//! out, and it never panics: anything it does not understand is `None`, and the tools skip
//! it.
//!
//! Accepted line shapes (what follows the timestamp is the same in all):
//! - classic syslog: `Nov 28 19:31:46 host postfix/smtp[123]: 4FzQ1b2c3d: to=<...>, ...`
//! - RFC 5424 / ISO 8601: `2026-11-28T19:31:46.123456+00:00 host postfix/smtp[123]: ...`
//! - Postfix's own `maillog_file` (postlogd): the classic shape.
//!
//! After the timestamp and host comes the program (`syslog_name/service[pid]`, e.g.
//! `postfix/smtp[123]`, `postfix-out/qmgr[9]`), then a queue id and the event:
//! `time.rs` reads timestamps ([`Clock`]), `queue.rs` the queue events (cleanup, qmgr,
//! delivery agents: [`Delivery`]), `smtpd.rs` smtpd's own ([`Client`], [`Reject`]).
//! `exim.rs` reads Exim's mainlog into the same events (see there for its line kinds).

mod exim;
mod queue;
mod smtpd;
mod time;

pub use exim::parse_line as parse_exim_line;
pub use queue::{Delivery, DeliveryStatus, remote_reply};
pub use smtpd::{Client, Reject};
pub use time::{Clock, Ts, days_from_civil, exim_timestamp, timestamp};

/// Longest line kept; longer lines are cut (Postfix itself limits log lines to a few KB).
pub const MAX_LINE: usize = 16 * 1024;

/// A line as read (with or without its `\n` or `\r\n`) as [`parse_line`] takes it: without
/// the line ending and cut at [`MAX_LINE`] bytes.
pub fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    &line[..line.len().min(MAX_LINE)]
}

/// What a line says.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// smtpd: `client=name[ip]`: a client's message got this queue id.
    Client(Client<'a>),
    /// smtpd: `NOQUEUE: reject: RCPT from ...`: a refused RCPT (queue id `NOQUEUE`).
    Reject(Reject<'a>),
    /// cleanup: `message-id=<...>`.
    MessageId(&'a [u8]),
    /// qmgr: `from=<...>, size=..., nrcpt=N (queue active)`.
    From(&'a [u8]),
    /// qmgr: `from=<...>, status=expired, returned to sender`: recipients still pending gave up.
    Expired,
    /// A delivery agent (smtp, lmtp, local, ...): one attempt for one recipient.
    Delivery(Delivery<'a>),
    /// qmgr: `removed`; Exim: `Completed`: the queue id is free for reuse after this.
    Removed,
    /// Exim: `<= sender ... id=MESSAGE-ID`: a message arrived. Exim logs its sender and
    /// its Message-ID header on this one line (what Postfix's [`Event::From`] and
    /// [`Event::MessageId`] say apart). `from` is empty for the null sender `<>`.
    Arrival {
        from: &'a [u8],
        message_id: Option<&'a [u8]>,
    },
}

/// A parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    pub ts: Ts,
    /// The syslog tag without its `: `, e.g. `postfix/smtpd[77]`; `exim` for Exim lines.
    pub program: &'a [u8],
    pub queue_id: &'a [u8],
    pub event: Event<'a>,
}

impl<'a> Line<'a> {
    /// The Postfix service of [`Line::program`]: `smtpd` for `postfix/submission/smtpd[9]`.
    pub fn service(&self) -> &'a [u8] {
        service(self.program)
    }
}

/// Parses one line (without its newline, see [`trim_line`]). `None`: not a Postfix line
/// with an event we understand.
pub fn parse_line<'a>(line: &'a [u8], clock: &mut Clock) -> Option<Line<'a>> {
    let (ts, program, msg) = header(line, clock)?;
    let qcolon = find(msg, b": ")?;
    let queue_id = &msg[..qcolon];
    let body = &msg[qcolon + 2..];
    let event = if service(program) == b"smtpd" && smtpd::is_own(queue_id, body) {
        // smtpd's `client=` queue id is taken as logged: replay has always keyed on it
        // without checking its shape.
        smtpd::event(queue_id, body)?
    } else if is_queue_id(queue_id) {
        queue::event(body, line)?
    } else {
        return None;
    };
    Some(Line {
        ts,
        program,
        queue_id,
        event,
    })
}

/// The log formats [`Parser`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Postfix through syslog or its own `maillog_file`: [`parse_line`].
    Postfix,
    /// Exim 4's `mainlog`: [`parse_exim_line`].
    Exim,
}

/// Parses a line of either format: Postfix first, then Exim. The two never both accept a
/// line (a Postfix line has a host and a `program: ` after its timestamp, an Exim line a
/// message id and an event marker), so the order only saves work. For readers that see
/// one file at a time, [`Parser`] tries both only until one has parsed.
pub fn parse_any<'a>(line: &'a [u8], clock: &mut Clock) -> Option<Line<'a>> {
    detect(line, clock).map(|(_, l)| l)
}

fn detect<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Format, Line<'a>)> {
    if let Some(l) = parse_line(line, clock) {
        return Some((Format::Postfix, l));
    }
    exim::parse_line(line).map(|l| (Format::Exim, l))
}

/// Reads the lines of log files whose format is found per file: while a file's format is
/// unknown each line is tried as either, and the first that parses decides for the rest of
/// the file. [`Parser::new_file`] forgets the format (the next file may be another MTA's);
/// the clock (the year of classic timestamps) goes on across files.
#[derive(Debug, Clone)]
pub struct Parser {
    clock: Clock,
    format: Option<Format>,
}

impl Parser {
    pub fn new(clock: Clock) -> Self {
        Parser {
            clock,
            format: None,
        }
    }

    /// Parses one line (without its newline, see [`trim_line`]).
    pub fn parse<'a>(&mut self, line: &'a [u8]) -> Option<Line<'a>> {
        match self.format {
            Some(Format::Postfix) => parse_line(line, &mut self.clock),
            Some(Format::Exim) => exim::parse_line(line),
            None => {
                let (format, l) = detect(line, &mut self.clock)?;
                self.format = Some(format);
                Some(l)
            }
        }
    }

    /// A new file starts: its format is found again.
    pub fn new_file(&mut self) {
        self.format = None;
    }

    /// The current file's format, once a line has told.
    pub fn format(&self) -> Option<Format> {
        self.format
    }
}

/// `TIMESTAMP HOST PROGRAM: ` at the start of every line: the time, the program and the
/// message after it. Postfix programs are `syslog_name/service` (postfix/smtp,
/// postfix-out/qmgr); other programs' lines are not ours.
fn header<'a>(line: &'a [u8], clock: &mut Clock) -> Option<(Ts, &'a [u8], &'a [u8])> {
    let (ts, rest) = timestamp(line, clock)?;
    let rest = rest.strip_prefix(b" ")?;
    let host_end = memchr(b' ', rest)?;
    let rest = &rest[host_end + 1..];
    let colon = find(rest, b": ")?;
    let program = &rest[..colon];
    if memchr(b'/', program).is_none() || memchr(b' ', program).is_some() {
        return None;
    }
    Some((ts, program, &rest[colon + 2..]))
}

/// The last `/` part of a program, without its `[pid]`.
fn service(program: &[u8]) -> &[u8] {
    let last = program.rsplit(|&b| b == b'/').next().unwrap_or(program);
    last.split(|&b| b == b'[').next().unwrap_or(last)
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

/// The value of the first `, name=value` field in `fields`, up to the next `,`. `None`
/// when there is none (or `name` is longer than any field name Postfix logs).
pub fn field<'a>(fields: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    // The pattern `, name=` is built on the stack: no allocation per field and line.
    let mut pat = [0u8; 32];
    let n = name.len() + 3;
    if n > pat.len() {
        return None;
    }
    pat[..2].copy_from_slice(b", ");
    pat[2..n - 1].copy_from_slice(name);
    pat[n - 1] = b'=';
    let i = find(fields, &pat[..n])?;
    Some(until(&fields[i + n..], b','))
}

fn trim_angle(v: &[u8]) -> &[u8] {
    let v = v.strip_prefix(b"<").unwrap_or(v);
    v.strip_suffix(b">").unwrap_or(v)
}

/// `v` up to the first `stop`, or all of it.
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

/// The last position of `needle` in `hay`.
fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| &hay[i..i + needle.len()] == needle)
}

#[cfg(test)]
mod tests;
