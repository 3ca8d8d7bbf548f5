//! `greygate track`: rebuild each message's delivery timeline from Postfix logs and report
//! what greylisting costs per destination domain.
//!
//! [`crate::tools::maillog`] turns a line into an event (pure, no allocation); [`Tracker`]
//! folds the queue events into messages keyed by queue id; [`report`] computes per-domain
//! statistics and renders text, JSON and HTML. [`open_log`] is the only I/O: plain or gzip
//! files, or stdin.

pub mod report;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::tools::maillog::{self, Clock, DeliveryStatus, Event, MAX_LINE, Ts};
use crate::tools::outbound::classify::{Class, Reply, classify};

/// Calls `f` with every line of `input` (newline included), each cut at [`MAX_LINE`]
/// bytes: one absurd line cannot grow the buffer past `MAX_LINE` plus a read.
pub fn for_each_line(mut input: impl BufRead, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        let n = (&mut input)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') && n == MAX_LINE {
            // Cut: skip the rest of the line.
            let mut sink = Vec::new();
            input.read_until(b'\n', &mut sink)?;
        }
        f(&buf);
    }
}

/// One delivery attempt for one recipient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    /// Milliseconds since the Unix epoch.
    pub ts: Ts,
    pub status: DeliveryStatus,
    pub relay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<f64>,
    pub delays: String,
    pub dsn: String,
    /// Postfix's text in parentheses after the status.
    pub detail: String,
    /// For deferrals: whether the remote reply looks like greylisting.
    pub greylisting: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
}

/// One recipient of a message and its attempts, in log order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recipient {
    pub to: String,
    /// Lower-cased domain of `to`.
    pub domain: String,
    pub attempts: Vec<Attempt>,
    /// Set when qmgr expired the message while this recipient was pending.
    pub expired: bool,
}

impl Recipient {
    /// The final status: the last attempt's if it is final, `None` while still queued.
    pub fn outcome(&self) -> Option<DeliveryStatus> {
        if self.expired {
            return Some(DeliveryStatus::Expired);
        }
        match self.attempts.last()?.status {
            DeliveryStatus::Deferred | DeliveryStatus::Other => None,
            s => Some(s),
        }
    }

    /// Seconds from the first greylisting deferral to the successful delivery: what
    /// greylisting added.
    pub fn added_delay(&self) -> Option<f64> {
        let first = self.attempts.iter().find(|a| a.greylisting)?;
        let sent = self
            .attempts
            .iter()
            .rev()
            .find(|a| a.status == DeliveryStatus::Sent)?;
        Some((sent.ts - first.ts).max(0) as f64 / 1000.0)
    }

    pub fn greylisted(&self) -> bool {
        self.attempts.iter().any(|a| a.greylisting)
    }
}

/// One message (one queue-id lifetime).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    pub queue_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// First line seen for this queue id (ms since the epoch).
    pub first_seen: Ts,
    /// qmgr logged `removed`.
    pub removed: bool,
    pub recipients: Vec<Recipient>,
}

/// Folds log lines into messages. Queue ids are interned: each id's bytes are stored once
/// in the index, and a `removed` line frees the id so Postfix may reuse it.
#[derive(Debug)]
pub struct Tracker {
    clock: Clock,
    live: HashMap<Box<[u8]>, usize>,
    messages: Vec<Message>,
    /// Lines seen / lines that were Postfix queue events.
    pub lines: u64,
    pub events: u64,
}

impl Tracker {
    /// `year`: the year of the first classic (year-less) timestamp.
    pub fn new(year: i64) -> Self {
        Self::with_clock(Clock::new(year))
    }

    /// With a clock that knows today's date (see [`Clock::for_now`]).
    pub fn with_clock(clock: Clock) -> Self {
        Tracker {
            clock,
            live: HashMap::new(),
            messages: Vec::new(),
            lines: 0,
            events: 0,
        }
    }

    /// Feeds one line (with or without its newline). Never fails: lines that are not
    /// Postfix queue events are counted and skipped.
    pub fn feed(&mut self, line: &[u8]) {
        self.lines += 1;
        let Some(parsed) = maillog::parse_any(maillog::trim_line(line), &mut self.clock) else {
            return;
        };
        if let Event::Client(_) | Event::Reject(_) = parsed.event {
            // smtpd's lines say who connected, not how delivery went: not queue events.
            return;
        }
        self.events += 1;
        let idx = match self.live.get(parsed.queue_id) {
            Some(&i) => i,
            None => {
                let i = self.messages.len();
                self.messages.push(Message {
                    queue_id: lossy(parsed.queue_id),
                    message_id: None,
                    from: None,
                    first_seen: parsed.ts,
                    removed: false,
                    recipients: Vec::new(),
                });
                self.live.insert(parsed.queue_id.into(), i);
                i
            }
        };
        let msg = &mut self.messages[idx];
        match parsed.event {
            Event::MessageId(id) => msg.message_id = Some(lossy(id)),
            Event::From(from) => {
                if msg.from.is_none() {
                    msg.from = Some(lossy(from));
                }
            }
            Event::Arrival { from, message_id } => {
                msg.from = Some(lossy(from));
                msg.message_id = message_id.map(lossy);
            }
            Event::Expired => {
                for r in &mut msg.recipients {
                    if r.outcome().is_none() {
                        r.expired = true;
                    }
                }
            }
            Event::Removed => {
                msg.removed = true;
                self.live.remove(parsed.queue_id);
            }
            // Skipped above, before they were counted.
            Event::Client(_) | Event::Reject(_) => {}
            Event::Delivery(d) => {
                let (greylisting, evidence) = if d.status == DeliveryStatus::Deferred {
                    deferral_class(d.detail)
                } else {
                    (false, None)
                };
                let attempt = Attempt {
                    ts: parsed.ts,
                    status: d.status,
                    relay: lossy(d.relay),
                    delay: d.delay,
                    delays: lossy(d.delays),
                    dsn: lossy(d.dsn),
                    detail: lossy(d.detail),
                    greylisting,
                    evidence,
                };
                match msg.recipients.iter_mut().find(|r| r.to.as_bytes() == d.to) {
                    Some(r) => r.attempts.push(attempt),
                    None => {
                        let to = lossy(d.to);
                        let domain = to
                            .rsplit_once('@')
                            .map(|(_, d)| d.to_ascii_lowercase())
                            .unwrap_or_default();
                        msg.recipients.push(Recipient {
                            to,
                            domain,
                            attempts: vec![attempt],
                            expired: false,
                        });
                    }
                }
            }
        }
    }

    /// Feeds every line of `input`.
    pub fn feed_reader(&mut self, input: impl BufRead) -> std::io::Result<()> {
        for_each_line(input, |line| self.feed(line))
    }

    /// The messages, in order of first appearance.
    pub fn finish(self) -> Vec<Message> {
        self.messages
    }
}

/// Whether a deferral's detail carries a greylisting reply, and the evidence.
fn deferral_class(detail: &[u8]) -> (bool, Option<String>) {
    let Some(reply) = maillog::remote_reply(detail) else {
        return (false, None);
    };
    match Reply::parse(&String::from_utf8_lossy(reply)).map(|r| classify(&r)) {
        Some(Class::Greylisted { evidence }) => (true, Some(evidence)),
        _ => (false, None),
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Opens a log: `-` is stdin; gzip files (by their magic bytes, whatever the name) are
/// decompressed, including multi-member files.
pub fn open_log(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        decode(std::io::stdin())
    } else {
        decode(std::fs::File::open(path)?)
    }
}

/// Buffers `raw`, decompressing it when it starts with the gzip magic bytes.
pub fn decode(raw: impl Read + 'static) -> std::io::Result<Box<dyn BufRead>> {
    let mut input: Box<dyn BufRead> = Box::new(BufReader::with_capacity(1 << 16, raw));
    let head = input.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::bufread::MultiGzDecoder::new(input),
        )));
    }
    Ok(input)
}

/// Orders rotated logs oldest first whatever order they were given in: `maillog.3.gz`,
/// `maillog.2.gz`, `maillog.1`, `maillog` (logrotate's numbering), other names by name
/// (date suffixes sort by themselves).
pub fn order_rotated(paths: &mut [std::path::PathBuf]) {
    fn key(p: &Path) -> (String, std::cmp::Reverse<u32>) {
        let name = p.to_string_lossy();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        match name.rsplit_once('.') {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (
                base.to_string(),
                std::cmp::Reverse(n.parse().unwrap_or(u32::MAX)),
            ),
            _ => (name.to_string(), std::cmp::Reverse(0)),
        }
    }
    paths.sort_by_cached_key(|p| key(p));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn rotation_order() {
        let mut v: Vec<PathBuf> = ["maillog", "maillog.1", "maillog.10.gz", "maillog.2.gz"]
            .iter()
            .map(PathBuf::from)
            .collect();
        order_rotated(&mut v);
        let names: Vec<_> = v.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["maillog.10.gz", "maillog.2.gz", "maillog.1", "maillog"]
        );
    }

    #[test]
    fn random_input_never_panics() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..400), |bytes| {
                let mut t = Tracker::new(2026);
                t.feed(&bytes);
                let _ = report::domains(&t.finish());
                Ok(())
            })
            .unwrap();
        // Near-misses of real lines: every prefix and single-byte corruption.
        let line = "Nov 28 19:31:46 relay postfix/smtp[123]: 4FzQ1b2c3d: to=<dave@example.org>, relay=mx[192.0.2.1]:25, delay=0.31, delays=0.05/0.01/0.2/0.05, dsn=4.7.1, status=deferred (host mx[192.0.2.1] said: 450 4.7.1 Greylisted (in reply to RCPT TO command))";
        let mut t = Tracker::new(2026);
        for i in 0..line.len() {
            t.feed(&line.as_bytes()[..i]);
            let mut b = line.as_bytes().to_vec();
            b[i] = b'\xff';
            t.feed(&b);
            b[i] = b' ';
            t.feed(&b);
        }
        let _ = report::domains(&t.finish());
    }
}
