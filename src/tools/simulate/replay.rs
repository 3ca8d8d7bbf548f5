//! `greygate replay`: a site's own inbound mail stream, read from its Postfix log, fed through
//! the engine offline — what greylisting with a given configuration would have delayed
//! before the operator turns it on.
//!
//! Every RCPT the log shows (accepted, or refused with a 4xx) is one attempt; attempts with
//! the same sender and recipient within [`MESSAGE_SPAN`] that end at the first acceptance
//! are one message. Attempts are decided in time order over one in-memory state. When the
//! engine defers the last attempt of a message the log shows accepted, the real sender never
//! had to retry, so its retries are assumed: the given MTA schedule (Postfix's by default,
//! its queue scan right when the backoff ends), from the same client. A message whose log
//! ends in a temporary refusal was not retried by its sender: greylisting would have kept it
//! out too. Authenticated and loopback clients (submission, content-filter re-injection)
//! and permanently refused RCPTs are left out: greylisting does not see them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::BufRead;
use std::net::IpAddr;

use serde::Serialize;

use super::inbound::{Inbound, parse_inbound};
use super::mta::Schedule;
use super::report::{fmt_dur, percentile};
use super::run::MemState;
use crate::engine::{Engine, HostName, IdentityFacts, Mode, Request, Verdict};
use crate::tools::maillog::{self, Clock};

/// Attempts with one sender and recipient this long after the first belong to a new message
/// (Postfix's `maximal_queue_lifetime`).
pub const MESSAGE_SPAN: u64 = 5 * 86_400;

/// How the log says a RCPT went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logged {
    Accepted,
    TempRejected,
}

/// One RCPT attempt found in the log.
#[derive(Debug, Clone)]
struct Attempt {
    /// Unix seconds.
    ts: u64,
    ip: IpAddr,
    name: String,
    sender: String,
    rcpt: String,
    logged: Logged,
}

/// A queue id between smtpd's `client=` and qmgr's `removed`.
#[derive(Debug, Default)]
struct Open {
    ts: u64,
    ip: Option<IpAddr>,
    name: String,
    skip: bool,
    from: Option<String>,
    rcpts: Vec<String>,
}

/// Folds inbound log lines into RCPT attempts.
#[derive(Debug)]
pub struct Reader {
    clock: Clock,
    open: HashMap<Vec<u8>, Open>,
    attempts: Vec<Attempt>,
    pub stats: ReadStats,
}

/// What the reader saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadStats {
    pub lines: u64,
    /// Accepted RCPTs (message, recipient) from unauthenticated, non-loopback clients.
    pub accepted: u64,
    /// RCPTs refused with a 4xx.
    pub temp_rejected: u64,
    /// RCPTs refused with a 5xx: greylisting would not have seen them.
    pub perm_rejected: u64,
    /// Messages from authenticated or loopback clients, or without a client line.
    pub skipped: u64,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn local(ip: IpAddr) -> bool {
    ip.is_loopback()
}

impl Reader {
    /// `clock` turns year-less timestamps into times.
    pub fn new(clock: Clock) -> Self {
        Reader {
            clock,
            open: HashMap::new(),
            attempts: Vec::new(),
            stats: ReadStats::default(),
        }
    }

    /// Feeds one line.
    pub fn feed(&mut self, line: &[u8]) {
        self.stats.lines += 1;
        let Some(parsed) = parse_inbound(maillog::trim_line(line), &mut self.clock) else {
            return;
        };
        let ts = u64::try_from(parsed.ts.div_euclid(1000)).unwrap_or(0);
        match parsed.event {
            Inbound::Client {
                queue_id,
                name,
                ip,
                sasl,
            } => {
                if let Some(old) = self.open.remove(queue_id) {
                    self.close(old);
                }
                self.open.insert(
                    queue_id.to_vec(),
                    Open {
                        ts,
                        ip: Some(ip),
                        name: text(name),
                        skip: sasl || local(ip),
                        ..Open::default()
                    },
                );
            }
            Inbound::From { queue_id, from } => {
                if let Some(o) = self.open.get_mut(queue_id)
                    && o.from.is_none()
                {
                    o.from = Some(text(from));
                }
            }
            Inbound::To { queue_id, rcpt } => {
                if let Some(o) = self.open.get_mut(queue_id) {
                    let rcpt = text(rcpt);
                    if !o.rcpts.contains(&rcpt) && o.rcpts.len() < 10_000 {
                        o.rcpts.push(rcpt);
                    }
                }
            }
            Inbound::Removed { queue_id } => {
                if let Some(o) = self.open.remove(queue_id) {
                    self.close(o);
                }
            }
            Inbound::Reject {
                name,
                ip,
                code,
                from,
                to,
            } => {
                if code >= 500 {
                    self.stats.perm_rejected += 1;
                } else if !local(ip) {
                    self.stats.temp_rejected += 1;
                    self.attempts.push(Attempt {
                        ts,
                        ip,
                        name: text(name),
                        sender: text(from),
                        rcpt: text(to),
                        logged: Logged::TempRejected,
                    });
                }
            }
        }
    }

    fn close(&mut self, o: Open) {
        let (Some(ip), Some(from), false) = (o.ip, o.from, o.skip) else {
            self.stats.skipped += 1;
            return;
        };
        for rcpt in o.rcpts {
            self.stats.accepted += 1;
            self.attempts.push(Attempt {
                ts: o.ts,
                ip,
                name: o.name.clone(),
                sender: from.clone(),
                rcpt,
                logged: Logged::Accepted,
            });
        }
    }

    /// Feeds every line of `input`.
    pub fn feed_reader(&mut self, input: impl BufRead) -> std::io::Result<()> {
        crate::tools::outbound::track::for_each_line(input, |line| self.feed(line))
    }

    /// Queue ids still open at the end count as accepted (their deliveries may be in a
    /// later log).
    fn finish(mut self) -> (Vec<Attempt>, ReadStats) {
        let mut open: Vec<(Vec<u8>, Open)> = self.open.drain().collect();
        open.sort_by(|a, b| a.1.ts.cmp(&b.1.ts).then(a.0.cmp(&b.0)));
        for (_, o) in open {
            self.close(o);
        }
        let mut attempts = self.attempts;
        attempts.sort_by_key(|a| a.ts);
        (attempts, self.stats)
    }
}

/// What greylisting would have done to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Accepted at its first attempt.
    AtOnce,
    /// Deferred, then passed on a retry the log shows.
    RetryInLog,
    /// Deferred, then passed on an assumed retry (the log shows it accepted at once).
    RetryAssumed,
    /// Deferred, and its sender never came back (the log ends in a refusal).
    NeverRetried,
    /// Deferred until the assumed sender gave up.
    GaveUp,
}

/// Counts and delays of a group of messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub name: String,
    pub messages: u64,
    pub at_once: u64,
    pub retry_in_log: u64,
    pub retry_assumed: u64,
    pub never_retried: u64,
    pub gave_up: u64,
    /// Added delay of delayed messages that passed, nearest-rank.
    pub delay_p50: Option<u64>,
    pub delay_p95: Option<u64>,
    pub delay_max: Option<u64>,
    #[serde(skip)]
    delays: Vec<u64>,
}

impl Group {
    fn add(&mut self, fate: Fate, delay: Option<u64>) {
        self.messages += 1;
        match fate {
            Fate::AtOnce => self.at_once += 1,
            Fate::RetryInLog => self.retry_in_log += 1,
            Fate::RetryAssumed => self.retry_assumed += 1,
            Fate::NeverRetried => self.never_retried += 1,
            Fate::GaveUp => self.gave_up += 1,
        }
        if let Some(d) = delay.filter(|_| fate != Fate::AtOnce) {
            self.delays.push(d);
        }
    }

    /// Deferred at least once.
    pub fn delayed(&self) -> u64 {
        self.messages - self.at_once
    }

    fn finish(mut self) -> Self {
        self.delays.sort_unstable();
        self.delay_p50 = percentile(&self.delays, 0.5);
        self.delay_p95 = percentile(&self.delays, 0.95);
        self.delay_max = self.delays.last().copied();
        self
    }
}

/// The replay's findings.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub read: ReadStats,
    /// The retry schedule assumed where the log shows no retry.
    pub assumed_mta: &'static str,
    pub total: Group,
    /// Per envelope sender domain, most delayed first.
    pub sender_domains: Vec<Group>,
    /// Per client identity (the key's client part: IP prefix or `org:`), most delayed first.
    pub clients: Vec<Group>,
    /// Per `[[domains]]` section of the recipient (`(none)`: no section matched), most
    /// delayed first; empty when the configuration has no sections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domain_sections: Vec<Group>,
}

/// One message being replayed.
#[derive(Debug)]
struct Msg {
    attempts: Vec<usize>,
    /// Index into `attempts` of the next real attempt.
    next_real: usize,
    first: u64,
    fate: Option<(Fate, Option<u64>)>,
    client: String,
    /// The recipient's `[[domains]]` section, from the first decision.
    section: Option<String>,
}

/// Replays a log read by `reader` through `engine`. `dns`: whether the configuration has
/// DNS facts on — then logged host names give `org:` identities (SPF and DNS lists are not
/// in the log: they count as not checked).
pub fn replay(reader: Reader, engine: &Engine, dns: bool, assumed: &Schedule) -> ReplayReport {
    let (attempts, read) = reader.finish();
    // Group attempts into messages.
    let mut msgs: Vec<Msg> = Vec::new();
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    for (i, a) in attempts.iter().enumerate() {
        let key = (a.sender.to_ascii_lowercase(), a.rcpt.to_ascii_lowercase());
        let cur = open
            .get(&key)
            .copied()
            .filter(|&m| a.ts.saturating_sub(msgs[m].first) <= MESSAGE_SPAN);
        let m = match cur {
            Some(m) => m,
            None => {
                msgs.push(Msg {
                    attempts: Vec::new(),
                    next_real: 0,
                    first: a.ts,
                    fate: None,
                    client: String::new(),
                    section: None,
                });
                msgs.len() - 1
            }
        };
        msgs[m].attempts.push(i);
        if a.logged == Logged::Accepted {
            open.remove(&key);
        } else {
            open.insert(key, m);
        }
    }

    let mut state = MemState::default();
    // (time, message, real attempt index or usize::MAX for an assumed retry)
    let mut heap: BinaryHeap<Reverse<(u64, usize, usize)>> = BinaryHeap::new();
    for (m, msg) in msgs.iter().enumerate() {
        heap.push(Reverse((attempts[msg.attempts[0]].ts, m, msg.attempts[0])));
    }
    let mut cursors: HashMap<usize, super::mta::Attempts<'_>> = HashMap::new();
    while let Some(Reverse((t, m, a))) = heap.pop() {
        let msg = &mut msgs[m];
        if msg.fate.is_some() {
            continue;
        }
        let real = a != usize::MAX;
        // An assumed retry comes from the client of the last real attempt.
        let at = &attempts[if real {
            a
        } else {
            *msg.attempts.last().unwrap_or(&0)
        }];
        let facts = dns.then(|| IdentityFacts {
            name: if at.name.is_empty() || at.name == "unknown" {
                HostName::Unverified
            } else {
                HostName::Verified(at.name.clone())
            },
            ..IdentityFacts::default()
        });
        let req = Request {
            stage: "RCPT".into(),
            client_ip: Some(at.ip),
            client_name: at.name.clone(),
            sender: at.sender.clone(),
            recipient: at.rcpt.clone(),
            facts,
            ..Request::default()
        };
        let d = state.check(engine, &req, t);
        if msg.client.is_empty() {
            msg.section = d.domain.as_ref().map(|s| s.name.to_string());
            msg.client = d
                .key
                .as_ref()
                .map_or_else(|| at.ip.to_string(), |k| k.client.clone());
        }
        let first_attempt = real && msg.next_real == 0;
        if real {
            msg.next_real += 1;
        }
        let elapsed = t - msg.first;
        // A `learn` section records the deferral but accepts, as the daemon does.
        if d.verdict != Verdict::Defer || !d.enforced(Mode::Enforce) {
            let fate = if first_attempt {
                Fate::AtOnce
            } else if real {
                Fate::RetryInLog
            } else {
                Fate::RetryAssumed
            };
            msg.fate = Some((fate, Some(elapsed)));
            continue;
        }
        if let Some(&next) = msg.attempts.get(msg.next_real) {
            heap.push(Reverse((attempts[next].ts, m, next)));
            continue;
        }
        // The log has no further attempt of this message.
        let last = &attempts[*msg.attempts.last().unwrap_or(&0)];
        if last.logged == Logged::TempRejected {
            msg.fate = Some((Fate::NeverRetried, None));
            continue;
        }
        let cursor = cursors.entry(m).or_insert_with(|| assumed.attempts(0));
        match cursor.next_after_failure(elapsed) {
            Some(rel) => heap.push(Reverse((msg.first + rel, m, usize::MAX))),
            None => msg.fate = Some((Fate::GaveUp, None)),
        }
    }

    let mut total = Group {
        name: "all".into(),
        ..Group::default()
    };
    let mut domains: BTreeMap<String, Group> = BTreeMap::new();
    let mut clients: BTreeMap<String, Group> = BTreeMap::new();
    let mut sections: BTreeMap<String, Group> = BTreeMap::new();
    for msg in &msgs {
        let (fate, delay) = msg.fate.unwrap_or((Fate::GaveUp, None));
        let a = &attempts[msg.attempts[0]];
        let domain = a
            .sender
            .rsplit_once('@')
            .map_or_else(|| "<>".to_string(), |(_, d)| d.to_ascii_lowercase());
        total.add(fate, delay);
        let g = domains.entry(domain.clone()).or_default();
        g.name = domain;
        g.add(fate, delay);
        let g = clients.entry(msg.client.clone()).or_default();
        g.name.clone_from(&msg.client);
        g.add(fate, delay);
        if !engine.domains.is_empty() {
            let name = msg.section.as_deref().unwrap_or("(none)");
            let g = sections.entry(name.to_string()).or_default();
            name.clone_into(&mut g.name);
            g.add(fate, delay);
        }
    }
    let ranked = |map: BTreeMap<String, Group>| {
        let mut v: Vec<Group> = map.into_values().map(Group::finish).collect();
        v.sort_by(|a, b| {
            b.delayed()
                .cmp(&a.delayed())
                .then(b.messages.cmp(&a.messages))
                .then(a.name.cmp(&b.name))
        });
        v
    };
    ReplayReport {
        read,
        assumed_mta: assumed.name(),
        total: total.finish(),
        sender_domains: ranked(domains),
        clients: ranked(clients),
        domain_sections: ranked(sections),
    }
}

fn group_table(s: &mut String, title: &str, groups: &[Group], limit: usize) {
    let w = groups
        .iter()
        .take(limit)
        .map(|g| g.name.len())
        .chain([title.len()])
        .max()
        .unwrap_or(10);
    let _ = writeln!(
        s,
        "{:<w$}  {:>8}  {:>7}  {:>8}  {:>8}  {:>7}  {:>7}  {:>7}  {:>7}",
        title.to_uppercase(),
        "MESSAGES",
        "DELAYED",
        "LOG RTRY",
        "ASSUMED",
        "NO RTRY",
        "P50",
        "P95",
        "MAX"
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".into(), fmt_dur);
    for g in groups.iter().take(limit) {
        let _ = writeln!(
            s,
            "{:<w$}  {:>8}  {:>7}  {:>8}  {:>8}  {:>7}  {:>7}  {:>7}  {:>7}",
            g.name,
            g.messages,
            g.delayed(),
            g.retry_in_log,
            g.retry_assumed,
            g.never_retried + g.gave_up,
            opt(g.delay_p50),
            opt(g.delay_p95),
            opt(g.delay_max)
        );
    }
    if groups.len() > limit {
        let _ = writeln!(s, "... {} more", groups.len() - limit);
    }
}

/// The text report; `limit` rows per table.
pub fn render_text(r: &ReplayReport, limit: usize) -> String {
    let mut s = String::new();
    let t = &r.total;
    let _ = writeln!(
        s,
        "{} log lines: {} accepted and {} temporarily refused RCPTs replayed; {} permanently refused and {} authenticated/local messages left out",
        r.read.lines, r.read.accepted, r.read.temp_rejected, r.read.perm_rejected, r.read.skipped
    );
    let pct = |n: u64| {
        if t.messages == 0 {
            0.0
        } else {
            n as f64 * 100.0 / t.messages as f64
        }
    };
    let opt = |v: Option<u64>| v.map_or_else(|| "-".into(), fmt_dur);
    let _ = writeln!(
        s,
        "{} messages (sender, recipient) with greylisting:",
        t.messages
    );
    let assumed = format!("delayed, passed on an assumed {} retry", r.assumed_mta);
    for (label, n) in [
        ("accepted at once", t.at_once),
        ("delayed, passed on a retry seen in the log", t.retry_in_log),
        (assumed.as_str(), t.retry_assumed),
        ("deferred, sender never retried (blocked)", t.never_retried),
        ("deferred until the sender gave up (lost)", t.gave_up),
    ] {
        let _ = writeln!(s, "  {label:<46}{n:>8}  {:5.1}%", pct(n));
    }
    let _ = writeln!(
        s,
        "added delay of delayed messages: p50 {}, p95 {}, max {}",
        opt(t.delay_p50),
        opt(t.delay_p95),
        opt(t.delay_max)
    );
    let _ = writeln!(
        s,
        "(mail the log shows accepted at once never had to retry: its retries follow {}'s default schedule from the same client)\n",
        r.assumed_mta
    );
    group_table(&mut s, "sender domain", &r.sender_domains, limit);
    s.push('\n');
    group_table(&mut s, "client", &r.clients, limit);
    if !r.domain_sections.is_empty() {
        s.push('\n');
        group_table(&mut s, "domain section", &r.domain_sections, limit);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
Mar  2 10:00:00 mx postfix/smtpd[1]: 1A2B3C4D5E: client=mail.partner.example[192.0.2.10]
Mar  2 10:00:00 mx postfix/qmgr[9]: 1A2B3C4D5E: from=<anna@partner.example>, size=900, nrcpt=1 (queue active)
Mar  2 10:00:01 mx postfix/local[3]: 1A2B3C4D5E: to=<bob@site.example>, relay=local, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (delivered to mailbox)
Mar  2 10:00:01 mx postfix/qmgr[9]: 1A2B3C4D5E: removed
Mar  2 10:05:00 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 450 4.7.1 <bob@site.example>: Recipient address rejected: try later; from=<x@bulk.example> to=<bob@site.example> proto=ESMTP helo=<x>
Mar  2 10:20:00 mx postfix/smtpd[1]: 2A2B3C4D5E: client=unknown[203.0.113.9]
Mar  2 10:20:00 mx postfix/qmgr[9]: 2A2B3C4D5E: from=<x@bulk.example>, size=900, nrcpt=1 (queue active)
Mar  2 10:20:01 mx postfix/local[3]: 2A2B3C4D5E: to=<bob@site.example>, relay=local, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (delivered to mailbox)
Mar  2 10:20:01 mx postfix/qmgr[9]: 2A2B3C4D5E: removed
Mar  2 11:00:00 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[198.51.100.7]: 450 4.7.1 <carol@site.example>: Recipient address rejected: try later; from=<win@lottery.example> to=<carol@site.example> proto=ESMTP helo=<x>
Mar  2 12:00:00 mx postfix/smtpd[1]: 3A2B3C4D5E: client=mail.partner.example[192.0.2.10]
Mar  2 12:00:00 mx postfix/qmgr[9]: 3A2B3C4D5E: from=<anna@partner.example>, size=900, nrcpt=1 (queue active)
Mar  2 12:00:01 mx postfix/local[3]: 3A2B3C4D5E: to=<bob@site.example>, relay=local, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (delivered to mailbox)
Mar  2 12:00:01 mx postfix/qmgr[9]: 3A2B3C4D5E: removed
Mar  2 12:30:00 mx postfix/submission/smtpd[1]: 4A2B3C4D5E: client=unknown[192.0.2.200], sasl_method=PLAIN, sasl_username=bob
Mar  2 12:30:00 mx postfix/qmgr[9]: 4A2B3C4D5E: from=<bob@site.example>, size=900, nrcpt=1 (queue active)
Mar  2 12:30:00 mx postfix/smtp[3]: 4A2B3C4D5E: to=<z@elsewhere.example>, relay=mx[192.0.2.99]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)
Mar  2 12:30:01 mx postfix/qmgr[9]: 4A2B3C4D5E: removed
";

    #[test]
    fn fates_of_a_small_log() {
        let mut reader = Reader::new(Clock::new(2026));
        reader.feed_reader(LOG.as_bytes()).unwrap();
        let r = replay(reader, &Engine::default(), false, &Schedule::postfix());
        assert_eq!(r.read.accepted, 3);
        assert_eq!(r.read.temp_rejected, 2);
        assert_eq!(r.read.skipped, 1);
        let t = &r.total;
        // anna→bob at 10:00: deferred, assumed Postfix retry at +300 s passes; at 12:00 known.
        // x@bulk: refused 10:05, accepted 10:20 in the log: passes on that retry (15 min).
        // lottery: refused and never back.
        assert_eq!(
            (
                t.messages,
                t.at_once,
                t.retry_assumed,
                t.retry_in_log,
                t.never_retried
            ),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(t.delay_max, Some(900));
        assert_eq!(t.delay_p50, Some(300));
        let text = render_text(&r, 10);
        assert!(text.contains("partner.example"), "{text}");
    }

    #[test]
    fn random_input_never_panics() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..400), |bytes| {
                let mut reader = Reader::new(Clock::new(2026));
                reader.feed_reader(&bytes[..]).unwrap();
                let _ = replay(reader, &Engine::default(), true, &Schedule::postfix());
                Ok(())
            })
            .unwrap();
        // Near-misses of real lines: every prefix and single-byte corruption.
        let mut reader = Reader::new(Clock::new(2026));
        for line in LOG.lines().take(6) {
            for i in 0..line.len() {
                reader.feed(&line.as_bytes()[..i]);
                let mut b = line.as_bytes().to_vec();
                b[i] = b'\xff';
                reader.feed(&b);
                b[i] = b' ';
                reader.feed(&b);
            }
        }
        let r = replay(reader, &Engine::default(), false, &Schedule::exim());
        let _ = render_text(&r, 3);
    }
}
