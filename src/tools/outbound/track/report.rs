//! Reports over tracked messages: per destination domain (messages, greylisted, added
//! delay median/p95, still queued, bounced; sorted by pain), per-message timelines, and
//! the renderings: text table, JSON, self-contained HTML with inline SVG charts.

use std::fmt::Write as _;

use super::Message;
use super::fold::{Aggregates, DELAY_BUCKETS};
use crate::tools::maillog::{DeliveryStatus, Ts};
use crate::tools::outbound::probe::fmt_secs;

/// Statistics for one destination domain. A message counts once per domain however many
/// of its recipients are there.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainStats {
    pub domain: String,
    pub messages: u64,
    /// Messages with at least one greylisting deferral for a recipient in this domain.
    pub greylisted: u64,
    /// Messages deferred for other reasons only.
    pub deferred_other: u64,
    /// Added delay (first greylisting deferral → delivery), seconds, over greylisted
    /// messages that were delivered: exact for a domain's first 64 such messages, then
    /// within 1 % (a DDSketch).
    pub added_delay_median: Option<f64>,
    pub added_delay_p95: Option<f64>,
    /// Sum of added delays: the sort key ("pain").
    pub added_delay_total: f64,
    pub still_queued: u64,
    /// Bounced or expired.
    pub bounced: u64,
    /// Added delays per [`DELAY_BUCKETS`] bucket, for charts and metrics.
    #[serde(skip)]
    pub added_buckets: [u64; DELAY_BUCKETS.len()],
}

/// Per-domain statistics, most painful first (total added delay, then greylisted count,
/// then messages, then name).
pub fn domains(agg: &Aggregates) -> Vec<DomainStats> {
    let mut out: Vec<DomainStats> = agg
        .domains
        .iter()
        .map(|(domain, d)| DomainStats {
            domain: domain.to_string(),
            messages: d.messages,
            greylisted: d.greylisted,
            deferred_other: d.deferred_other,
            added_delay_median: d.added.quantile(0.5),
            added_delay_p95: d.added.quantile(0.95),
            added_delay_total: d.added_total,
            still_queued: d.still_queued,
            bounced: d.bounced,
            added_buckets: d.added_buckets,
        })
        .collect();
    out.sort_by(|a, b| {
        b.added_delay_total
            .total_cmp(&a.added_delay_total)
            .then(b.greylisted.cmp(&a.greylisted))
            .then(b.messages.cmp(&a.messages))
            .then(a.domain.cmp(&b.domain))
    });
    out
}

/// Which messages a per-message report shows.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub to: Option<String>,
    pub queue_id: Option<String>,
    pub message_id: Option<String>,
    /// Every message matches (memory grows with the log: for small logs and tests).
    pub all: bool,
}

impl Filter {
    /// A filter that every message matches.
    pub fn everything() -> Filter {
        Filter {
            all: true,
            ..Filter::default()
        }
    }

    /// Matches nothing: no field given.
    pub fn is_empty(&self) -> bool {
        !self.all && self.to.is_none() && self.queue_id.is_none() && self.message_id.is_none()
    }

    pub fn matches(&self, m: &Message) -> bool {
        if self.all {
            return true;
        }
        let strip = |s: &str| {
            s.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        };
        self.queue_id.as_ref().is_none_or(|q| m.queue_id == *q)
            && self.message_id.as_ref().is_none_or(|id| {
                m.message_id
                    .as_deref()
                    .is_some_and(|mid| mid.eq_ignore_ascii_case(&strip(id)))
            })
            && self.to.as_ref().is_none_or(|to| {
                let to = strip(to);
                m.recipients.iter().any(|r| r.to.eq_ignore_ascii_case(&to))
            })
    }
}

/// `2026-11-28 19:31:46` (UTC; classic syslog times come out as written).
pub fn fmt_ts(ts: Ts) -> String {
    match jiff::Timestamp::from_millisecond(ts) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => ts.to_string(),
    }
}

fn opt_secs(v: Option<f64>) -> String {
    v.map(fmt_secs).unwrap_or_else(|| "-".into())
}

/// The per-domain table.
pub fn render_domains(stats: &[DomainStats], messages: usize) -> String {
    let mut s = String::new();
    let w = stats
        .iter()
        .map(|d| d.domain.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        s,
        "{:<w$}  {:>8}  {:>10}  {:>8}  {:>12}  {:>12}  {:>6}  {:>7}",
        "DOMAIN",
        "MESSAGES",
        "GREYLISTED",
        "DEFERRED",
        "ADDED MEDIAN",
        "ADDED P95",
        "QUEUED",
        "BOUNCED"
    );
    for d in stats {
        let _ = writeln!(
            s,
            "{:<w$}  {:>8}  {:>10}  {:>8}  {:>12}  {:>12}  {:>6}  {:>7}",
            d.domain,
            d.messages,
            d.greylisted,
            d.deferred_other,
            opt_secs(d.added_delay_median),
            opt_secs(d.added_delay_p95),
            d.still_queued,
            d.bounced
        );
    }
    let greylisted: u64 = stats.iter().map(|d| d.greylisted).sum();
    let _ = writeln!(
        s,
        "messages: {messages}, destination domains: {}, greylisted (message, domain) pairs: {greylisted}",
        stats.len()
    );
    s
}

/// Timelines of the given messages; with `only_to`, only that recipient's attempts.
pub fn render_timelines(messages: &[&Message], only_to: Option<&str>) -> String {
    let only_to = only_to.map(|t| t.trim().trim_start_matches('<').trim_end_matches('>'));
    let mut s = String::new();
    for m in messages {
        let _ = write!(s, "{}", m.queue_id);
        if let Some(id) = &m.message_id {
            let _ = write!(s, "  message-id=<{id}>");
        }
        if let Some(f) = &m.from {
            let _ = write!(s, "  from=<{f}>");
        }
        let _ = writeln!(s, "  first seen {}", fmt_ts(m.first_seen));
        for r in &m.recipients {
            if only_to.is_some_and(|t| !r.to.eq_ignore_ascii_case(t)) {
                continue;
            }
            for a in &r.attempts {
                let kind = match (a.status, a.greylisting) {
                    (DeliveryStatus::Deferred, true) => "deferred (greylisting)",
                    (DeliveryStatus::Deferred, false) => "deferred (other)",
                    (st, _) => st.name(),
                };
                let _ = writeln!(
                    s,
                    "  {}  to=<{}>  {kind}  relay={}  dsn={}",
                    fmt_ts(a.ts),
                    r.to,
                    a.relay,
                    a.dsn
                );
                let _ = writeln!(s, "      {}", a.detail);
            }
            if r.expired {
                let _ = writeln!(s, "  to=<{}>  expired: returned to sender", r.to);
            }
            match (r.outcome(), r.added_delay()) {
                (Some(DeliveryStatus::Sent), Some(d)) => {
                    let _ = writeln!(s, "  => delivered; greylisting added {}", fmt_secs(d));
                }
                (None, _) => {
                    let _ = writeln!(s, "  => still queued at the end of the log");
                }
                _ => {}
            }
        }
        s.push('\n');
    }
    s
}

/// The JSON document: per-domain statistics, the most messages in flight at once (what
/// the memory grew with), and the selected messages when filtering.
pub fn to_json(
    stats: &[DomainStats],
    selected: Option<&[&Message]>,
    lines: u64,
    messages: usize,
    peak_in_flight: usize,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "lines": lines,
        "messages": messages,
        "peak_in_flight": peak_in_flight,
        "domains": stats,
    });
    if let Some(sel) = selected {
        v["selected"] = serde_json::to_value(sel).unwrap_or_default();
    }
    v
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Horizontal bar chart as inline SVG.
fn bar_chart(title: &str, bars: &[(String, f64, String)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let row = 22;
    let h = row * bars.len().max(1) + 30;
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"{h}\" role=\"img\">",
        esc(title)
    );
    for (i, (label, v, text)) in bars.iter().enumerate() {
        let y = 10 + i * row;
        let w = (v / max * 380.0).max(if *v > 0.0 { 1.0 } else { 0.0 });
        let _ = write!(
            s,
            "<text x=\"190\" y=\"{}\" text-anchor=\"end\" font-size=\"12\">{}</text><rect x=\"200\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"#6b8fb5\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 12,
            esc(label),
            205.0 + w,
            y + 12,
            esc(text)
        );
    }
    s.push_str("</svg></figure>\n");
    s
}

/// Labels of the delay distribution chart, one per [`DELAY_BUCKETS`] bucket.
const BUCKET_LABELS: [&str; DELAY_BUCKETS.len()] = [
    "< 1 min",
    "1-5 min",
    "5-15 min",
    "15-60 min",
    "1-4 h",
    "> 4 h",
];

/// A self-contained HTML report (no scripts, no external resources).
pub fn render_html(stats: &[DomainStats], messages: usize, lines: u64) -> String {
    let mut counts = [0u64; DELAY_BUCKETS.len()];
    for d in stats {
        for (c, n) in counts.iter_mut().zip(d.added_buckets) {
            *c += n;
        }
    }
    let dist: Vec<(String, f64, String)> = BUCKET_LABELS
        .iter()
        .zip(&counts)
        .map(|(l, &c)| (l.to_string(), c as f64, c.to_string()))
        .collect();
    let grey: Vec<(String, f64, String)> = stats
        .iter()
        .filter(|d| d.greylisted > 0)
        .take(25)
        .map(|d| {
            (
                d.domain.clone(),
                d.greylisted as f64,
                format!("{} of {}", d.greylisted, d.messages),
            )
        })
        .collect();
    let mut s = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>greygate track report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}figcaption{font-weight:bold;margin:1em 0 .3em}</style></head><body>\n<h1>Outbound greylisting report</h1>\n",
    );
    let _ = writeln!(
        s,
        "<p>{lines} log lines, {messages} messages, {} destination domains.</p>",
        stats.len()
    );
    s.push_str(&bar_chart(
        "Delay added by greylisting (delivered messages)",
        &dist,
    ));
    s.push_str(&bar_chart("Greylisted messages per domain (top 25)", &grey));
    s.push_str("<table><tr><th>Domain</th><th>Messages</th><th>Greylisted</th><th>Deferred (other)</th><th>Added median</th><th>Added p95</th><th>Still queued</th><th>Bounced</th></tr>\n");
    for d in stats {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.domain),
            d.messages,
            d.greylisted,
            d.deferred_other,
            opt_secs(d.added_delay_median),
            opt_secs(d.added_delay_p95),
            d.still_queued,
            d.bounced
        );
    }
    s.push_str("</table></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::outbound::track::{SWEEP_EVERY as SWEEP_LINES, Tracker};

    const LOG: &str = "\
Nov 28 19:31:45 relay postfix/smtpd[100]: 4FzQ1b2c3d: client=localhost[127.0.0.1]
Nov 28 19:31:45 relay postfix/cleanup[101]: 4FzQ1b2c3d: message-id=<m1@example.net>
Nov 28 19:31:45 relay postfix/qmgr[102]: 4FzQ1b2c3d: from=<carol@example.net>, size=400, nrcpt=2 (queue active)
Nov 28 19:31:46 relay postfix/smtp[123]: 4FzQ1b2c3d: to=<dave@example.org>, relay=mx.example.org[192.0.2.1]:25, delay=1, delays=0.05/0.01/0.2/0.05, dsn=4.7.1, status=deferred (host mx.example.org[192.0.2.1] said: 450 4.7.1 <dave@example.org>: Recipient address rejected: Greylisted, please try again in 300 seconds (in reply to RCPT TO command))
Nov 28 19:31:46 relay postfix/smtp[124]: 4FzQ1b2c3d: to=<erin@example.com>, relay=mx.example.com[192.0.2.2]:25, delay=1, delays=0.05/0.01/0.2/0.05, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 77)
Nov 28 19:36:51 relay postfix/smtp[125]: 4FzQ1b2c3d: to=<dave@example.org>, relay=mx.example.org[192.0.2.1]:25, delay=306, delays=300/0.01/0.2/0.05, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 88)
Nov 28 19:36:51 relay postfix/qmgr[102]: 4FzQ1b2c3d: removed
Nov 28 19:40:00 relay postfix/cleanup[101]: 5ABCDEF012: message-id=<m2@example.net>
Nov 28 19:40:01 relay postfix/smtp[126]: 5ABCDEF012: to=<x@slow.example>, relay=none, delay=1, delays=0/0/1/0, dsn=4.4.1, status=deferred (connect to mx.slow.example[192.0.2.3]:25: Connection refused)
Nov 28 19:40:02 relay postfix/smtp[127]: 6ABCDEF012: to=<y@bad.example>, relay=mx.bad.example[192.0.2.4]:25, delay=1, delays=0/0/1/0, dsn=5.1.1, status=bounced (host mx.bad.example[192.0.2.4] said: 550 5.1.1 User unknown (in reply to RCPT TO command))
";

    fn tracked() -> (Aggregates, Vec<Message>) {
        let mut t = Tracker::new(2026).keeping(Filter::everything());
        t.feed_reader(LOG.as_bytes()).unwrap();
        assert_eq!(t.lines, 10);
        t.finish()
    }

    #[test]
    fn per_domain() {
        let (agg, msgs) = tracked();
        assert_eq!(msgs.len(), 3);
        assert_eq!(agg.messages, 3);
        let stats = domains(&agg);
        let names: Vec<&str> = stats.iter().map(|d| d.domain.as_str()).collect();
        // Most pain first.
        assert_eq!(names[0], "example.org");
        let org = &stats[0];
        assert_eq!(
            (org.messages, org.greylisted, org.still_queued, org.bounced),
            (1, 1, 0, 0)
        );
        assert_eq!(org.added_delay_median, Some(305.0));
        let slow = stats.iter().find(|d| d.domain == "slow.example").unwrap();
        assert_eq!(
            (slow.greylisted, slow.deferred_other, slow.still_queued),
            (0, 1, 1)
        );
        let bad = stats.iter().find(|d| d.domain == "bad.example").unwrap();
        assert_eq!(bad.bounced, 1);
        let text = render_domains(&stats, msgs.len());
        assert!(text.contains("example.org"), "{text}");
        let html = render_html(&stats, msgs.len(), 10);
        assert!(html.contains("<svg") && html.contains("5-15 min"));
    }

    #[test]
    fn timelines_and_filters() {
        let (_, msgs) = tracked();
        let f = Filter {
            message_id: Some("<m1@example.net>".into()),
            ..Filter::default()
        };
        let sel: Vec<&Message> = msgs.iter().filter(|m| f.matches(m)).collect();
        assert_eq!(sel.len(), 1);
        let text = render_timelines(&sel, None);
        assert!(text.contains("deferred (greylisting)"), "{text}");
        assert!(text.contains("greylisting added 5m 05s"), "{text}");
        let f = Filter {
            to: Some("Y@bad.example".into()),
            ..Filter::default()
        };
        assert_eq!(msgs.iter().filter(|m| f.matches(m)).count(), 1);
    }

    #[test]
    fn a_filtered_tracker_keeps_only_what_matches_and_reports_everything() {
        let f = Filter {
            to: Some("dave@example.org".into()),
            ..Filter::default()
        };
        let mut t = Tracker::new(2026).keeping(f);
        t.feed_reader(LOG.as_bytes()).unwrap();
        let (agg, kept) = t.finish();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].recipients[0].attempts[0].dsn, "4.7.1");
        assert_eq!(agg.messages, 3);
        // Without a filter nothing is kept, and attempts keep no texts while in flight.
        let mut t = Tracker::new(2026);
        t.feed_reader(LOG.as_bytes()).unwrap();
        assert_eq!(t.in_flight(), 2, "the two messages never removed");
        assert_eq!(t.peak_in_flight(), 2);
        let snap = domains(&t.snapshot());
        let v = to_json(
            &snap,
            None,
            t.lines,
            t.messages() as usize,
            t.peak_in_flight(),
        );
        assert_eq!(v["peak_in_flight"], 2);
        let (agg, kept) = t.finish();
        assert!(kept.is_empty());
        let stats = domains(&agg);
        assert_eq!(
            serde_json::to_value(&snap).unwrap(),
            serde_json::to_value(&stats).unwrap()
        );
    }

    #[test]
    fn queue_id_reuse_starts_a_new_message() {
        let mut t = Tracker::new(2026).keeping(Filter::everything());
        t.feed_reader(LOG.as_bytes()).unwrap();
        t.feed(
            b"Nov 28 20:00:00 relay postfix/cleanup[101]: 4FzQ1b2c3d: message-id=<m3@example.net>",
        );
        let (agg, msgs) = t.finish();
        assert_eq!(msgs.len(), 4);
        assert_eq!(agg.messages, 4);
        assert_eq!(msgs[3].message_id.as_deref(), Some("m3@example.net"));
    }

    #[test]
    fn a_message_silent_for_a_week_is_finished_as_it_stands() {
        let mut t = Tracker::new(2026);
        t.feed_reader(LOG.as_bytes()).unwrap();
        // A week later, enough lines for a sweep.
        let line = b"Dec  6 10:00:00 relay postfix/smtp[9]: 7ABCDEF012: to=<z@late.example>, relay=mx[192.0.2.9]:25, delay=1, delays=0/0/1/0, dsn=2.0.0, status=sent (250 ok)";
        for _ in 0..SWEEP_LINES {
            t.feed(line);
        }
        assert_eq!(t.in_flight(), 1, "only the week-later message is left");
        let stats = domains(&t.finish().0);
        let slow = stats.iter().find(|d| d.domain == "slow.example").unwrap();
        assert_eq!(slow.still_queued, 1);
    }
}
