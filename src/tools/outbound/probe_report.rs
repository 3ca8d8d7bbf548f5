//! Batch probe results for people: a text table with a summary line, and a self-contained
//! HTML page (no scripts, no external resources, every value escaped). Pure.

use std::fmt::Write as _;

use super::probe::{Attempt, RecipientReport, Report, Status, fmt_secs, printable};

/// Longest reply shown in a table cell (the JSON has it whole).
const MAX_CELL_CHARS: usize = 160;

/// What the table and the page say about a destination's result.
pub fn result_label(r: &RecipientReport) -> &'static str {
    match (r.status, r.was_greylisted) {
        (Status::Accepted, true) => "accepted after greylisting",
        (Status::Accepted, false) if r.time_to_accept_secs.is_some() => "accepted after deferral",
        (Status::Rejected, true) => "rejected after greylisting",
        (s, _) => s.name(),
    }
}

/// The last thing the destination's servers said: the reply, or why none answered.
pub fn last_reply(r: &RecipientReport) -> String {
    match r.last() {
        None => "never tried".into(),
        Some(Attempt {
            reply: Some(reply), ..
        }) => reply.clone(),
        Some(a) => a
            .tried
            .last()
            .cloned()
            .unwrap_or_else(|| "no server answered".into()),
    }
}

/// `dave@example.org` or `dave@example.org via 127.0.0.1:2525`.
pub fn destination(r: &RecipientReport) -> String {
    match &r.via {
        Some(server) => format!("{} via {server}", r.recipient),
        None => r.recipient.clone(),
    }
}

fn cell(s: &str) -> String {
    let s = printable(s);
    match s.char_indices().nth(MAX_CELL_CHARS) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s,
    }
}

/// One line per destination, in input order, then the totals.
pub fn render_table(report: &Report) -> String {
    let rows: Vec<[String; 5]> = report
        .recipients
        .iter()
        .map(|r| {
            [
                cell(&destination(r)),
                result_label(r).to_string(),
                r.attempt_count.to_string(),
                r.time_to_accept_secs
                    .map(fmt_secs)
                    .unwrap_or_else(|| "-".into()),
                cell(&last_reply(r)),
            ]
        })
        .collect();
    let head = [
        "DESTINATION",
        "RESULT",
        "ATTEMPTS",
        "TIME TO ACCEPT",
        "LAST REPLY",
    ];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([head[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    let mut s = String::new();
    let mut line = |c: [&str; 5]| {
        let _ = writeln!(
            s,
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {}",
            c[0], c[1], c[2], c[3], c[4]
        );
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
    s.push_str(&summary(report));
    s.push('\n');
    s
}

/// `7 destinations: 3 accepted (2 after greylisting), ...`.
pub fn summary(report: &Report) -> String {
    let t = &report.totals;
    let mut s = format!(
        "{} destination{}: {} accepted",
        t.destinations,
        if t.destinations == 1 { "" } else { "s" },
        t.accepted
    );
    if t.greylisted_then_accepted > 0 {
        let _ = write!(s, " ({} after greylisting)", t.greylisted_then_accepted);
    }
    let _ = write!(
        s,
        ", {} greylisted, {} temporary failure, {} rejected, {} no connection",
        t.greylisted, t.temp_fail, t.rejected, t.no_connection
    );
    if let (Some(median), Some(max)) = (t.time_to_accept_median_secs, t.time_to_accept_max_secs) {
        let _ = write!(
            s,
            "; time to accept median {}, max {}",
            fmt_secs(median),
            fmt_secs(max)
        );
    }
    s
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// CSS class of a result cell.
fn class(r: &RecipientReport) -> &'static str {
    match (r.status, r.was_greylisted) {
        (Status::Accepted, true) => "grey-ok",
        (Status::Accepted, false) => "ok",
        (Status::Greylisted, _) => "grey",
        (Status::TempFail, _) => "temp",
        (Status::Rejected, _) => "rej",
        (Status::NoConnection, _) => "down",
    }
}

/// Time to accept per destination that made us wait, as inline SVG bars.
fn delay_chart(report: &Report) -> String {
    let bars: Vec<(&RecipientReport, f64)> = report
        .recipients
        .iter()
        .filter_map(|r| r.time_to_accept_secs.map(|t| (r, t)))
        .take(50)
        .collect();
    if bars.is_empty() {
        return String::new();
    }
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let row = 22;
    let h = row * bars.len() + 20;
    let mut s = format!(
        "<figure><figcaption>Time to accept (destinations that made us wait{})</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{h}\" role=\"img\">",
        if bars.len() == 50 { ", first 50" } else { "" }
    );
    for (i, (r, t)) in bars.iter().enumerate() {
        let y = 10 + i * row;
        let w = (t / max * 380.0).max(1.0);
        let _ = write!(
            s,
            "<text x=\"310\" y=\"{}\" text-anchor=\"end\" font-size=\"12\">{}</text><rect x=\"320\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"#8a8a8a\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 12,
            esc(&r.recipient),
            325.0 + w,
            y + 12,
            esc(&fmt_secs(*t))
        );
    }
    s.push_str("</svg></figure>\n");
    s
}

/// A self-contained HTML report. `generated` says when (shown as given).
pub fn render_html(report: &Report, generated: &str) -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>greygate probe report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}td.n{text-align:right}td.ok{color:#1a6b1a}td.grey-ok{color:#6b5a00}td.grey{color:#8a6d00;font-weight:bold}td.temp{color:#8a4b00}td.rej,td.down{color:#a01010;font-weight:bold}code{font-size:90%}figcaption{font-weight:bold;margin:1em 0 .3em}</style></head><body>\n<h1>Outbound probe report</h1>\n",
    );
    let _ = writeln!(
        s,
        "<p>{} ({}). {} attempts in all.</p>",
        esc(&summary(report)),
        esc(generated),
        report.totals.attempts
    );
    s.push_str(&delay_chart(report));
    s.push_str("<table><tr><th>Line</th><th>Destination</th><th>Result</th><th>Attempts</th><th>Greylisted</th><th>Time to accept</th><th>Server</th><th>Last reply</th></tr>\n");
    for r in &report.recipients {
        let server = r.last().and_then(|a| a.server.clone()).unwrap_or_default();
        let _ = writeln!(
            s,
            "<tr><td class=\"n\">{}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
            r.line.map(|l| l.to_string()).unwrap_or_default(),
            esc(&destination(r)),
            class(r),
            esc(result_label(r)),
            r.attempt_count,
            r.greylisted_attempts,
            r.time_to_accept_secs
                .map(fmt_secs)
                .unwrap_or_else(|| "-".into()),
            esc(&server),
            esc(&last_reply(r))
        );
    }
    s.push_str("</table></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::outbound::probe::Totals;

    fn row(
        rcpt: &str,
        status: Status,
        grey: bool,
        tta: Option<f64>,
        reply: &str,
    ) -> RecipientReport {
        RecipientReport {
            recipient: rcpt.into(),
            line: Some(3),
            via: Some("127.0.0.1:2525".into()),
            status,
            was_greylisted: grey,
            attempt_count: if grey { 3 } else { 1 },
            greylisted_attempts: if grey { 2 } else { 0 },
            attempts: vec![Attempt {
                status,
                evidence: None,
                server: Some("127.0.0.1:2525".into()),
                stage: None,
                reply: (!reply.is_empty()).then(|| reply.to_string()),
                tried: vec!["127.0.0.1:9: Connection refused".into()],
                at_secs: 0.0,
                transcript: Vec::new(),
            }],
            time_to_accept_secs: tta,
        }
    }

    fn report() -> Report {
        let recipients = vec![
            row(
                "a@grey.test",
                Status::Accepted,
                true,
                Some(2.5),
                "250 2.1.5 Ok",
            ),
            row(
                "<b>&'\"@x.test",
                Status::Rejected,
                false,
                None,
                "554 5.7.1 <script>alert(1)</script>\x1b[2J",
            ),
            row("c@down.test", Status::NoConnection, false, None, ""),
        ];
        Report {
            totals: crate::tools::outbound::probe::Totals {
                destinations: 3,
                accepted: 1,
                rejected: 1,
                no_connection: 1,
                greylisted_then_accepted: 1,
                time_to_accept_median_secs: Some(2.5),
                time_to_accept_max_secs: Some(2.5),
                attempts: 5,
                ..Totals::default()
            },
            recipients,
        }
    }

    #[test]
    fn table() {
        let t = render_table(&report());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("DESTINATION"), "{t}");
        assert!(lines[1].contains("accepted after greylisting"), "{t}");
        assert!(lines[1].contains("2.5s"), "{t}");
        assert!(lines[1].ends_with("250 2.1.5 Ok"), "{t}");
        assert!(!t.contains('\x1b'), "{t}");
        assert!(lines[3].ends_with("127.0.0.1:9: Connection refused"), "{t}");
        assert_eq!(
            lines[4],
            "3 destinations: 1 accepted (1 after greylisting), 0 greylisted, 0 temporary failure, 1 rejected, 1 no connection; time to accept median 2.5s, max 2.5s"
        );
        // Columns line up.
        let col = lines[0].find("RESULT").unwrap();
        assert!(lines.iter().take(4).all(|l| l.is_char_boundary(col)));
    }

    #[test]
    fn html_is_self_contained_and_escaped() {
        let h = render_html(&report(), "2026-12-04 <now>");
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(!h.contains("<script"), "{h}");
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{h}");
        assert!(h.contains("&lt;b&gt;&amp;&#39;&quot;@x.test"), "{h}");
        assert!(h.contains("2026-12-04 &lt;now&gt;"));
        assert!(!h.contains('\x1b'));
        for external in [" src=", "href", "url(", "<link", "@import"] {
            assert!(!h.contains(external), "{external} in {h}");
        }
        assert!(h.contains("<svg") && h.contains("a@grey.test"));
        assert!(h.contains("class=\"grey-ok\">accepted after greylisting"));
    }
}
