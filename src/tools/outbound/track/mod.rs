//! `greygate track`: rebuild each message's delivery timeline from Postfix logs and report
//! what greylisting costs per destination domain.
//!
//! [`crate::tools::maillog`] turns a line into an event (pure, no allocation); [`Tracker`]
//! folds the queue events into messages keyed by queue id while they are in flight, and
//! finished messages into per-domain aggregates ([`fold`]); [`report`] turns those into
//! statistics and renders text, JSON, HTML and Prometheus metrics. [`open_log`] reads
//! plain or gzip files or stdin; [`follow`] tails a live log across rotation.

pub mod fold;
pub mod follow;
pub mod metrics;
pub mod report;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::tools::maillog::{self, Clock, DeliveryStatus, Event, MAX_LINE, Ts};
use crate::tools::outbound::classify::{Class, Reply, classify};
use report::Filter;

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

/// One recipient of a message: what its attempts came to, and (for a message kept whole)
/// the attempts themselves, in log order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recipient {
    pub to: String,
    /// Lower-cased domain of `to`.
    pub domain: String,
    /// Every attempt, when the message is kept whole (a `--to`/`--queue-id`/
    /// `--message-id` filter); empty otherwise: [`Recipient::summary`] is all the report
    /// needs, whatever the number of attempts.
    pub attempts: Vec<Attempt>,
    #[serde(skip)]
    pub summary: Summary,
    /// Set when qmgr expired the message while this recipient was pending.
    pub expired: bool,
}

/// What a recipient's attempts came to, in a few fixed fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// The first greylisting deferral.
    pub first_greylisting: Option<Ts>,
    /// The last successful delivery.
    pub last_sent: Option<Ts>,
    /// The latest attempt's status.
    pub last_status: Option<DeliveryStatus>,
    /// Some attempt was deferred (for whatever reason).
    pub deferred: bool,
}

impl Summary {
    fn add(&mut self, ts: Ts, status: DeliveryStatus, greylisting: bool) {
        if greylisting && self.first_greylisting.is_none() {
            self.first_greylisting = Some(ts);
        }
        if status == DeliveryStatus::Sent {
            self.last_sent = Some(ts);
        }
        self.deferred |= status == DeliveryStatus::Deferred;
        self.last_status = Some(status);
    }
}

impl Recipient {
    /// The final status: the last attempt's if it is final, `None` while still queued.
    pub fn outcome(&self) -> Option<DeliveryStatus> {
        if self.expired {
            return Some(DeliveryStatus::Expired);
        }
        match self.summary.last_status? {
            DeliveryStatus::Deferred | DeliveryStatus::Other => None,
            s => Some(s),
        }
    }

    /// Seconds from the first greylisting deferral to the successful delivery: what
    /// greylisting added.
    pub fn added_delay(&self) -> Option<f64> {
        let first = self.summary.first_greylisting?;
        let sent = self.summary.last_sent?;
        Some((sent - first).max(0) as f64 / 1000.0)
    }

    pub fn greylisted(&self) -> bool {
        self.summary.first_greylisting.is_some()
    }

    /// Some attempt was deferred, for greylisting or not.
    pub fn deferred(&self) -> bool {
        self.summary.deferred
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
    /// Last line seen for it.
    #[serde(skip)]
    pub last_seen: Ts,
    /// qmgr logged `removed`.
    pub removed: bool,
    pub recipients: Vec<Recipient>,
}

/// How long (log time) a message may go without a line before it is taken as finished
/// with what it has: longer than Postfix's `maximal_queue_lifetime` and Exim's usual
/// retry limit (5 days), so only messages whose last lines are missing from the logs
/// (a log that starts or ends mid-way) go this way.
pub const STALE_AFTER_MS: Ts = 7 * 86_400_000;

/// Lines between two looks for stale messages.
pub(crate) const SWEEP_EVERY: u64 = 1 << 16;

/// Folds log lines into messages while they are in flight, and finished messages into
/// per-domain aggregates ([`fold::Aggregates`]): memory grows with the messages in flight
/// and the destination domains, not with the log. Queue ids are interned while in flight;
/// a `removed` line finishes the message and frees the id so Postfix may reuse it.
///
/// Messages that match the [`Filter`] given are kept whole (returned by
/// [`Tracker::finish`]), and only then does an attempt keep its texts (relay, DSN, detail).
#[derive(Debug)]
pub struct Tracker {
    /// Reads Postfix or Exim lines, the format found per file.
    parser: maillog::Parser,
    live: HashMap<Box<[u8]>, Message>,
    done: fold::Aggregates,
    keep: Filter,
    selected: Vec<Message>,
    /// The latest time stamp seen, for the stale sweep.
    latest: Ts,
    peak_in_flight: usize,
    /// Lines seen / lines that were queue events.
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
            parser: maillog::Parser::new(clock),
            live: HashMap::new(),
            done: fold::Aggregates::default(),
            keep: Filter::default(),
            selected: Vec::new(),
            latest: Ts::MIN,
            peak_in_flight: 0,
            lines: 0,
            events: 0,
        }
    }

    /// Keeps the messages that match `filter` whole, with every attempt's texts.
    pub fn keeping(mut self, filter: Filter) -> Self {
        self.keep = filter;
        self
    }

    /// Feeds one line (with or without its newline). Never fails: lines that are not
    /// queue events are counted and skipped.
    pub fn feed(&mut self, line: &[u8]) {
        self.lines += 1;
        if self.lines.is_multiple_of(SWEEP_EVERY) {
            self.sweep_stale();
        }
        let Some(parsed) = self.parser.parse(maillog::trim_line(line)) else {
            return;
        };
        if let Event::Client(_) | Event::Reject(_) = parsed.event {
            // smtpd's lines say who connected, not how delivery went: not queue events.
            return;
        }
        self.events += 1;
        self.latest = self.latest.max(parsed.ts);
        if let Event::Removed = parsed.event {
            if let Some(mut msg) = self.live.remove(parsed.queue_id) {
                msg.removed = true;
                msg.last_seen = msg.last_seen.max(parsed.ts);
                self.finish_message(msg);
            }
            return;
        }
        let detail = !self.keep.is_empty();
        if !self.live.contains_key(parsed.queue_id) {
            self.live.insert(
                parsed.queue_id.into(),
                Message {
                    queue_id: lossy(parsed.queue_id),
                    message_id: None,
                    from: None,
                    first_seen: parsed.ts,
                    last_seen: parsed.ts,
                    removed: false,
                    recipients: Vec::new(),
                },
            );
            self.peak_in_flight = self.peak_in_flight.max(self.live.len());
        }
        let Some(msg) = self.live.get_mut(parsed.queue_id) else {
            return;
        };
        msg.last_seen = msg.last_seen.max(parsed.ts);
        match parsed.event {
            // Only a kept message shows (or is found by) its Message-ID and sender.
            Event::MessageId(id) if detail => msg.message_id = Some(lossy(id)),
            Event::From(from) if detail => {
                if msg.from.is_none() {
                    msg.from = Some(lossy(from));
                }
            }
            Event::Arrival { from, message_id } if detail => {
                msg.from = Some(lossy(from));
                msg.message_id = message_id.map(lossy);
            }
            Event::MessageId(_) | Event::From(_) | Event::Arrival { .. } => {}
            Event::Expired => {
                for r in &mut msg.recipients {
                    if r.outcome().is_none() {
                        r.expired = true;
                    }
                }
            }
            // Handled above / skipped before they were counted.
            Event::Removed | Event::Client(_) | Event::Reject(_) => {}
            Event::Delivery(d) => {
                let (greylisting, evidence) = if d.status == DeliveryStatus::Deferred {
                    deferral_class(d.detail, detail)
                } else {
                    (false, None)
                };
                let i = match msg.recipients.iter().position(|r| r.to.as_bytes() == d.to) {
                    Some(i) => i,
                    None => {
                        let to = lossy(d.to);
                        let domain = to
                            .rsplit_once('@')
                            .map(|(_, d)| d.to_ascii_lowercase())
                            .unwrap_or_default();
                        msg.recipients.push(Recipient {
                            to,
                            domain,
                            attempts: Vec::new(),
                            summary: Summary::default(),
                            expired: false,
                        });
                        msg.recipients.len() - 1
                    }
                };
                let r = &mut msg.recipients[i];
                r.summary.add(parsed.ts, d.status, greylisting);
                if detail {
                    r.attempts.push(Attempt {
                        ts: parsed.ts,
                        status: d.status,
                        relay: lossy(d.relay),
                        delay: d.delay,
                        delays: lossy(d.delays),
                        dsn: lossy(d.dsn),
                        detail: lossy(d.detail),
                        greylisting,
                        evidence,
                    });
                }
            }
        }
    }

    fn finish_message(&mut self, msg: Message) {
        self.done.fold(&msg);
        if !self.keep.is_empty() && self.keep.matches(&msg) {
            self.selected.push(msg);
        }
    }

    /// Finishes the messages without a line for [`STALE_AFTER_MS`] of log time.
    fn sweep_stale(&mut self) {
        let Some(cut) = self.latest.checked_sub(STALE_AFTER_MS) else {
            return;
        };
        if self.live.values().all(|m| m.last_seen >= cut) {
            return;
        }
        let stale: Vec<Box<[u8]>> = self
            .live
            .iter()
            .filter(|(_, m)| m.last_seen < cut)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(m) = self.live.remove(&k) {
                self.finish_message(m);
            }
        }
    }

    /// Feeds every line of `input`, a file of its own: its format (Postfix or Exim) is
    /// found anew.
    pub fn feed_reader(&mut self, input: impl BufRead) -> std::io::Result<()> {
        self.new_file();
        for_each_line(input, |line| self.feed(line))
    }

    /// The next lines come from another file, which may be in the other format.
    pub fn new_file(&mut self) {
        self.parser.new_file();
    }

    /// Messages seen so far, finished or in flight.
    pub fn messages(&self) -> u64 {
        self.done.messages + self.live.len() as u64
    }

    /// Messages in flight now.
    pub fn in_flight(&self) -> usize {
        self.live.len()
    }

    /// The most messages in flight at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight
    }

    /// The report as it stands: the finished messages' aggregates with the messages in
    /// flight folded in as they are (still queued where nothing final happened). Leaves
    /// the tracker as it was: `--follow` asks again and again.
    pub fn snapshot(&self) -> fold::Aggregates {
        let mut all = self.done.clone();
        for m in self.live.values() {
            all.fold(m);
        }
        all
    }

    /// Ends the log: the messages still in flight are finished as they are. The
    /// aggregates, and the kept messages in order of first appearance.
    pub fn finish(mut self) -> (fold::Aggregates, Vec<Message>) {
        let mut rest: Vec<Message> = std::mem::take(&mut self.live).into_values().collect();
        rest.sort_by_key(|m| m.first_seen);
        for m in rest {
            self.finish_message(m);
        }
        self.selected.sort_by_key(|m| m.first_seen);
        (self.done, self.selected)
    }
}

/// Whether a deferral's detail carries a greylisting reply, and (with `evidence`) why.
fn deferral_class(detail: &[u8], evidence: bool) -> (bool, Option<String>) {
    let Some(reply) = maillog::remote_reply(detail) else {
        return (false, None);
    };
    match Reply::parse(&String::from_utf8_lossy(reply)).map(|r| classify(&r)) {
        Some(Class::Greylisted { evidence: e }) => (true, evidence.then_some(e)),
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

    /// A relay log of `messages` messages in time order, lines of concurrent messages
    /// interleaved (the shape of tools/gen-maillog.py): a third of the domains greylist
    /// the first attempt, one never answers, a few deliveries bounce.
    fn relay_log(messages: u32) -> String {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let stamp = |s: u64| {
            format!(
                "Nov 28 {:02}:{:02}:{:02} relay",
                s / 3600 % 24,
                s / 60 % 60,
                s % 60
            )
        };
        let mut later: BinaryHeap<Reverse<(u64, u64, String)>> = BinaryHeap::new();
        let (mut out, mut seq) = (String::new(), 0u64);
        for m in 0..u64::from(messages) {
            let t = m / 4;
            while let Some(Reverse((at, _, _))) = later.peek() {
                if *at > t {
                    break;
                }
                let Reverse((at, _, line)) = later.pop().unwrap();
                out += &format!("{} {line}\n", stamp(at));
            }
            let q = format!("{:X}", 0x1000_0000 + m);
            out += &format!(
                "{} postfix/cleanup[1]: {q}: message-id=<{m}@s.example>\n",
                stamp(t)
            );
            let mut done = t + 1;
            for r in 0..1 + rnd(4) / 3 {
                let d = rnd(30);
                let to = format!("u{m}r{r}@d{d}.example");
                let mut push = |at: u64, line: String| {
                    seq += 1;
                    later.push(Reverse((at, seq, line)));
                };
                let line = |st: &str, dsn: &str, text: &str| {
                    format!(
                        "postfix/smtp[2]: {q}: to=<{to}>, relay=mx.d{d}.example[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn={dsn}, status={st} ({text})"
                    )
                };
                if d < 10 {
                    let added = 60 + rnd(3000);
                    push(
                        t + 1,
                        line(
                            "deferred",
                            "4.7.1",
                            "host mx[192.0.2.1] said: 450 4.7.1 Greylisted, try again (in reply to RCPT TO command)",
                        ),
                    );
                    push(t + 1 + added, line("sent", "2.0.0", "250 ok"));
                    done = done.max(t + 1 + added);
                } else if d == 10 {
                    push(
                        t + 1,
                        line(
                            "deferred",
                            "4.4.1",
                            "connect to mx[192.0.2.1]:25: Connection refused",
                        ),
                    );
                    done = done.max(t + 7200);
                } else if rnd(50) == 0 {
                    push(
                        t + 1,
                        line(
                            "bounced",
                            "5.1.1",
                            "host mx[192.0.2.1] said: 550 5.1.1 unknown (in reply to RCPT TO command)",
                        ),
                    );
                } else {
                    push(t + 1, line("sent", "2.0.0", "250 ok"));
                }
            }
            seq += 1;
            later.push(Reverse((
                done,
                seq,
                format!("postfix/qmgr[3]: {q}: removed"),
            )));
        }
        // The last messages stay in flight: the log ends before their removal.
        while let Some(Reverse((at, _, line))) = later.pop() {
            if at < u64::from(messages) / 4 + 600 {
                out += &format!("{} {line}\n", stamp(at));
            }
        }
        out
    }

    #[test]
    fn the_bounded_report_equals_the_unbounded_one() {
        let log = relay_log(40_000);
        // Unbounded: every message kept whole to the end.
        let mut all = Tracker::new(2026).keeping(Filter::everything());
        all.feed_reader(log.as_bytes()).unwrap();
        let (_, messages) = all.finish();
        // Bounded: finished messages folded as they finish.
        let mut bounded = Tracker::new(2026);
        bounded.feed_reader(log.as_bytes()).unwrap();
        assert!(
            bounded.peak_in_flight() < messages.len() / 4,
            "{}",
            bounded.peak_in_flight()
        );
        let (agg, kept) = bounded.finish();
        assert!(kept.is_empty());
        assert_eq!(agg.messages as usize, messages.len());
        let stats = report::domains(&agg);
        let mut sketched = 0;
        for d in &stats {
            let mine = |m: &&Message| m.recipients.iter().any(|r| r.domain == d.domain);
            let in_domain: Vec<&Message> = messages.iter().filter(mine).collect();
            let per = |r: &Recipient| r.domain == d.domain;
            let count = |f: &dyn Fn(&Recipient) -> bool| {
                in_domain
                    .iter()
                    .filter(|m| m.recipients.iter().filter(|r| per(r)).any(f))
                    .count() as u64
            };
            assert_eq!(d.messages, in_domain.len() as u64, "{}", d.domain);
            assert_eq!(d.greylisted, count(&|r| r.greylisted()), "{}", d.domain);
            assert_eq!(
                d.still_queued,
                count(&|r| r.outcome().is_none()),
                "{}",
                d.domain
            );
            assert_eq!(
                d.bounced,
                count(&|r| matches!(
                    r.outcome(),
                    Some(DeliveryStatus::Bounced | DeliveryStatus::Expired)
                )),
                "{}",
                d.domain
            );
            let added: Vec<f64> = in_domain
                .iter()
                .filter_map(|m| {
                    m.recipients
                        .iter()
                        .filter(|r| per(r))
                        .filter_map(Recipient::added_delay)
                        .reduce(f64::max)
                })
                .collect();
            assert_eq!(d.added_buckets.iter().sum::<u64>(), added.len() as u64);
            let total: f64 = added.iter().sum();
            assert!((d.added_delay_total - total).abs() < 1e-6 * total.max(1.0));
            sketched += usize::from(added.len() > fold::EXACT_DELAYS);
            for (q, got) in [(0.5, d.added_delay_median), (0.95, d.added_delay_p95)] {
                let (Some(got), Some(want)) = (got, fold::exact_quantile(&added, q)) else {
                    assert_eq!(got, None, "{}", d.domain);
                    assert!(added.is_empty());
                    continue;
                };
                assert!(
                    (got - want).abs() <= want * fold::SKETCH_RELATIVE_ERROR + 1e-9,
                    "{} q={q}: {got} vs {want}",
                    d.domain
                );
            }
        }
        assert!(stats.iter().any(|d| d.still_queued > 0 && d.greylisted > 0));
        assert!(stats.iter().any(|d| d.bounced > 0));
        assert!(sketched >= 5, "the sketch was not exercised: {sketched}");
    }

    #[test]
    fn postfix_and_exim_files_read_one_after_the_other() {
        let postfix = "Nov 28 19:31:46 relay postfix/smtp[123]: 4FzQ1b2c3d: to=<dave@example.org>, relay=mx[192.0.2.1]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)\n";
        let exim = "2026-12-04 16:23:29 1xZW4H-0005Mf-2R <= carol@example.net H=(c) [127.0.0.1] P=esmtp S=401 id=m1@example.net\n\
            2026-12-04 16:23:30 1xZW4H-0005Mf-2R == erin@example.com R=r T=remote_smtp defer (-44) H=mx.example.com [192.0.2.2]: SMTP error from remote mail server after RCPT TO:<erin@example.com>: 451 4.7.1 Greylisted, try again later\n\
            2026-12-04 16:28:30 1xZW4H-0005Mf-2R => erin@example.com R=r T=remote_smtp H=mx.example.com [192.0.2.2] C=\"250 ok\"\n\
            2026-12-04 16:28:30 1xZW4H-0005Mf-2R Completed\n";
        let mut t = Tracker::new(2026).keeping(Filter::everything());
        t.feed_reader(postfix.as_bytes()).unwrap();
        t.feed_reader(exim.as_bytes()).unwrap();
        let (agg, msgs) = t.finish();
        assert_eq!(agg.messages, 2);
        assert_eq!(msgs[1].message_id.as_deref(), Some("m1@example.net"));
        let stats = report::domains(&agg);
        let com = stats.iter().find(|d| d.domain == "example.com").unwrap();
        assert_eq!((com.greylisted, com.added_delay_median), (1, Some(300.0)));
        assert!(stats.iter().any(|d| d.domain == "example.org"));
    }

    #[test]
    fn random_input_never_panics() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..400), |bytes| {
                let mut t = Tracker::new(2026);
                t.feed(&bytes);
                let _ = report::domains(&t.finish().0);
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
        let _ = report::domains(&t.finish().0);
    }
}
