//! The simulation report: per configuration and sender class, what greylisting cost
//! (delivered, lost, added delay) and what it stopped (spam accepted), and for a
//! configuration behind the SMTP front what its pregreet test added; rendered as a text
//! table, JSON, or a self-contained HTML page with SVG charts.

use std::fmt::Write as _;

use serde::Serialize;

/// Upper bounds (seconds) and labels of the added-delay histogram.
pub const BUCKETS: &[(u64, &str)] = &[
    (1, "none"),
    (301, "≤ 5 min"),
    (901, "5–15 min"),
    (3601, "15–60 min"),
    (4 * 3600 + 1, "1–4 h"),
    (u64::MAX, "> 4 h"),
];

/// What one simulation found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    /// Seconds during which new mail arrived.
    pub duration: u64,
    pub messages: u64,
    pub classes: Vec<ClassInfo>,
    pub configs: Vec<ConfigResult>,
}

/// A sender class as the report describes it.
#[derive(Debug, Clone, Serialize)]
pub struct ClassInfo {
    pub name: String,
    pub description: String,
    pub spam: bool,
    pub mta: &'static str,
    pub ips: &'static str,
    /// The latest its first retry comes (seconds after the first attempt): one retry
    /// interval of its MTA.
    pub first_retry: Option<u64>,
}

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub name: String,
    pub description: String,
    /// Whether requests carried DNS facts.
    pub dns: bool,
    pub classes: Vec<ClassResult>,
    pub legitimate: ClassResult,
    pub spam: ClassResult,
    /// Attempts answered "try again later".
    pub deferrals: u64,
    /// Records in the store at the end.
    pub triplets: usize,
    pub client_records: usize,
    /// What the SMTP front's pregreet test added; absent when the configuration has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregreet: Option<PregreetResult>,
}

/// What a configuration's pregreet test did, against the same configuration without it
/// (the baseline: greylisting alone). Delays and losses of the configuration's own tables
/// include the test.
#[derive(Debug, Clone, Serialize)]
pub struct PregreetResult {
    /// `pregreet_wait`, seconds.
    pub wait: u64,
    pub action: &'static str,
    /// `pregreet_suspect_for` and `pregreet_pass_for`, seconds.
    pub suspect_for: u64,
    pub pass_for: u64,
    /// `[dnsbl] delay`, which suspect groups serve; `None`: not set, so they serve the
    /// configured delay.
    pub suspect_delay: Option<u64>,
    /// Connections refused for talking before the banner ended.
    pub caught: u64,
    /// Of those, from legitimate senders.
    pub caught_legitimate: u64,
    /// RCPTs from suspect client groups (keyed on the IP prefix, with a DNSBL hit).
    pub suspect_rcpts: u64,
    /// Spam accepted with the test, and by greylisting alone.
    pub spam_accepted: u64,
    pub spam_accepted_without: u64,
    /// Spam messages greylisting alone accepted and the test kept out.
    pub spam_blocked: u64,
    /// Legitimate messages greylisting alone delivered and the test lost.
    pub legitimate_lost: u64,
    /// Connections of legitimate senders held for the banner's end (the first from each
    /// address in `pregreet_pass_for`), and their seconds in all: added to their delays.
    pub legitimate_waits: u64,
    pub legitimate_wait_seconds: u64,
    /// Added delay of delivered legitimate mail with the test and by greylisting alone.
    pub legitimate_p50: Option<u64>,
    pub legitimate_p50_without: Option<u64>,
    pub legitimate_p95: Option<u64>,
    pub legitimate_p95_without: Option<u64>,
    pub classes: Vec<PregreetClass>,
}

/// One sender class under a configuration's pregreet test.
#[derive(Debug, Clone, Serialize)]
pub struct PregreetClass {
    pub class: String,
    pub spam: bool,
    /// Connections refused for talking before the banner ended.
    pub caught: u64,
    /// Messages greylisting alone accepted and the test kept out.
    pub blocked: u64,
    /// Connections held for the banner's end, and their seconds in all.
    pub waits: u64,
    pub wait_seconds: u64,
    /// RCPTs from suspect client groups.
    pub suspect_rcpts: u64,
}

impl PregreetResult {
    /// `wait 6s, reject, suspect for 1d00h, pass for 1d00h`.
    fn settings(&self) -> String {
        format!(
            "wait {}, {}, suspect for {}, pass for {}",
            fmt_dur(self.wait),
            self.action,
            fmt_dur(self.suspect_for),
            fmt_dur(self.pass_for)
        )
    }
}

impl ConfigResult {
    pub fn class(&self, name: &str) -> Option<&ClassResult> {
        self.classes.iter().find(|c| c.class == name)
    }
}

/// One sender class under one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ClassResult {
    pub class: String,
    pub spam: bool,
    pub messages: u64,
    /// Accepted in the end (for spam: spam accepted).
    pub delivered: u64,
    /// Never accepted: the sender gave up (or never retried).
    pub lost: u64,
    /// Deferred at least once.
    pub delayed: u64,
    pub attempts: u64,
    pub delivered_pct: f64,
    pub lost_pct: f64,
    pub delayed_pct: f64,
    /// Added delay of delivered messages (seconds from first attempt to acceptance; 0 when
    /// accepted at once), nearest-rank percentiles.
    pub delay_p50: Option<u64>,
    pub delay_p95: Option<u64>,
    pub delay_max: Option<u64>,
    /// Delivered messages per [`BUCKETS`] entry.
    pub histogram: Vec<u64>,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl ClassResult {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        class: &str,
        spam: bool,
        messages: u64,
        delivered: u64,
        lost: u64,
        delayed: u64,
        attempts: u64,
        mut delays: Vec<u64>,
    ) -> Self {
        delays.sort_unstable();
        let mut histogram = vec![0; BUCKETS.len()];
        for &d in &delays {
            let i = BUCKETS
                .iter()
                .position(|(ub, _)| d < *ub)
                .unwrap_or(BUCKETS.len() - 1);
            histogram[i] += 1;
        }
        ClassResult {
            class: class.to_string(),
            spam,
            messages,
            delivered,
            lost,
            delayed,
            attempts,
            delivered_pct: pct(delivered, messages),
            lost_pct: pct(lost, messages),
            delayed_pct: pct(delayed, messages),
            delay_p50: percentile(&delays, 0.5),
            delay_p95: percentile(&delays, 0.95),
            delay_max: delays.last().copied(),
            histogram,
        }
    }
}

/// `0s`, `45s`, `5m`, `1h12m`, `2d3h`: short enough for a table cell.
pub fn fmt_dur(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

fn opt_dur(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), fmt_dur)
}

fn row(s: &mut String, w: usize, r: &ClassResult) {
    let lost = if r.spam {
        "-".to_string()
    } else {
        format!("{:.1}%", r.lost_pct)
    };
    let spam = if r.spam {
        format!("{:.1}%", r.delivered_pct)
    } else {
        "-".to_string()
    };
    let delivered = if r.spam {
        "-".to_string()
    } else {
        format!("{:.1}%", r.delivered_pct)
    };
    let _ = writeln!(
        s,
        "  {:<w$}  {:>8}  {:>9}  {:>6}  {:>7}  {:>7}  {:>7}  {:>7}  {:>13}",
        r.class,
        r.messages,
        delivered,
        lost,
        format!("{:.1}%", r.delayed_pct),
        opt_dur(r.delay_p50),
        opt_dur(r.delay_p95),
        opt_dur(r.delay_max),
        spam
    );
}

/// The text report: one table per configuration, then the classes side by side.
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {}: {} messages over {} from {} sender classes, seed {}",
        r.scenario,
        r.messages,
        fmt_dur(r.duration),
        r.classes.len(),
        r.seed
    );
    if !r.description.is_empty() {
        let _ = writeln!(s, "{}", r.description.trim());
    }
    let w = r
        .classes
        .iter()
        .map(|c| c.name.len())
        .chain([14])
        .max()
        .unwrap_or(14);
    for c in &r.configs {
        let _ = writeln!(
            s,
            "\nconfig {}{}{}",
            c.name,
            if c.description.is_empty() { "" } else { ": " },
            c.description
        );
        let _ = writeln!(
            s,
            "  {:<w$}  {:>8}  {:>9}  {:>6}  {:>7}  {:>7}  {:>7}  {:>7}  {:>13}",
            "CLASS",
            "MESSAGES",
            "DELIVERED",
            "LOST",
            "DELAYED",
            "P50",
            "P95",
            "MAX",
            "SPAM ACCEPTED"
        );
        for class in &c.classes {
            row(&mut s, w, class);
        }
        row(&mut s, w, &c.legitimate);
        row(&mut s, w, &c.spam);
        let _ = writeln!(
            s,
            "  {} deferrals; store at the end: {} triplets, {} client records",
            c.deferrals, c.triplets, c.client_records
        );
        if let Some(p) = &c.pregreet {
            pregreet_text(&mut s, w, p);
        }
    }
    // Side by side: delivered/lost/p95 of legitimate classes, accepted of spam classes.
    let _ = writeln!(
        s,
        "\nside by side (legitimate: lost / p95 added delay; spam: accepted)"
    );
    let cw = r
        .configs
        .iter()
        .map(|c| c.name.len())
        .chain([16])
        .max()
        .unwrap_or(16);
    let _ = write!(s, "  {:<w$}  {:>8}  {:>6}", "CLASS", "MTA", "RETRY");
    for c in &r.configs {
        let _ = write!(s, "  {:>cw$}", c.name);
    }
    s.push('\n');
    for (i, info) in r.classes.iter().enumerate() {
        let _ = write!(
            s,
            "  {:<w$}  {:>8}  {:>6}",
            info.name,
            info.mta,
            opt_dur(info.first_retry)
        );
        for c in &r.configs {
            let x = &c.classes[i];
            let cell = if x.spam {
                format!("{:.1}% accepted", x.delivered_pct)
            } else {
                format!("{:.1}% / {}", x.lost_pct, opt_dur(x.delay_p95))
            };
            let _ = write!(s, "  {cell:>cw$}");
        }
        s.push('\n');
    }
    s
}

/// A configuration's pregreet lines of the text report.
fn pregreet_text(s: &mut String, w: usize, p: &PregreetResult) {
    let _ = writeln!(
        s,
        "  pregreet detection ({}): {} connections caught ({} legitimate); {}",
        p.settings(),
        p.caught,
        p.caught_legitimate,
        match p.suspect_delay {
            Some(d) => format!(
                "{} RCPTs from suspect groups served the DNSBL delay ({})",
                p.suspect_rcpts,
                fmt_dur(d)
            ),
            None => format!(
                "{} RCPTs from suspect groups (no [dnsbl] delay: they served the configured one)",
                p.suspect_rcpts
            ),
        }
    );
    let _ = writeln!(
        s,
        "    spam accepted: {} by greylisting alone, {} with pregreet detection: {} messages blocked that greylisting alone let through",
        p.spam_accepted_without, p.spam_accepted, p.spam_blocked
    );
    let _ = writeln!(
        s,
        "    cost to legitimate mail: {} connections waited {} for the banner ({}s in all, counted in the delays above); p50 {} -> {}, p95 {} -> {}; {} messages lost to it",
        p.legitimate_waits,
        fmt_dur(p.wait),
        p.legitimate_wait_seconds,
        opt_dur(p.legitimate_p50_without),
        opt_dur(p.legitimate_p50),
        opt_dur(p.legitimate_p95_without),
        opt_dur(p.legitimate_p95),
        p.legitimate_lost
    );
    for x in &p.classes {
        if x.caught > 0 || x.blocked > 0 || x.suspect_rcpts > 0 {
            let _ = writeln!(
                s,
                "    {:<w$}  {:>8} caught  {:>8} blocked  {:>8} suspect RCPTs",
                x.class, x.caught, x.blocked, x.suspect_rcpts
            );
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours of configurations in charts, in order.
const COLOURS: &[&str] = &[
    "#c0504d", "#4f81bd", "#9bbb59", "#8064a2", "#f79646", "#4bacc6",
];

/// A grouped horizontal bar chart as inline SVG: one group per label, one bar per series.
fn grouped_bars(title: &str, series: &[String], groups: &[(String, Vec<(f64, String)>)]) -> String {
    let max = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|b| b.0))
        .fold(0.0, f64::max)
        .max(1e-9);
    let bar = 14;
    let gap = 10;
    let group_h = bar * series.len().max(1) + gap;
    let legend = 20;
    let h = legend + group_h * groups.len().max(1) + 10;
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{h}\" role=\"img\">",
        esc(title)
    );
    for (i, name) in series.iter().enumerate() {
        let x = 200 + i * 160;
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"2\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"12\" font-size=\"12\">{}</text>",
            COLOURS[i % COLOURS.len()],
            x + 16,
            esc(name)
        );
    }
    for (g, (label, bars)) in groups.iter().enumerate() {
        let y0 = legend + g * group_h;
        let _ = write!(
            s,
            "<text x=\"190\" y=\"{}\" text-anchor=\"end\" font-size=\"12\">{}</text>",
            y0 + (bar * bars.len()) / 2 + 4,
            esc(label)
        );
        for (i, (v, text)) in bars.iter().enumerate() {
            let y = y0 + i * bar;
            let w = (v / max * 420.0).max(if *v > 0.0 { 1.0 } else { 0.0 });
            let _ = write!(
                s,
                "<rect x=\"200\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{}</text>",
                bar - 2,
                COLOURS[i % COLOURS.len()],
                205.0 + w,
                y + bar - 4,
                esc(text)
            );
        }
    }
    s.push_str("</svg></figure>\n");
    s
}

/// The HTML report's pregreet section: one row per configuration with a test.
fn pregreet_html(r: &Report) -> String {
    let mut s = String::from(
        "<h2>Pregreet detection</h2>\n<p>Each configuration with a pregreet test against the same configuration without it (greylisting alone). Legitimate senders wait for the banner's end on their first connection from an address within the pass time; that wait is counted in their delays.</p>\n<table><tr><th>Config</th><th>Test</th><th>Caught</th><th>Caught legitimate</th><th>Spam accepted without / with</th><th>Spam blocked</th><th>Suspect RCPTs</th><th>Legitimate waits</th><th>Seconds waited</th><th>Legitimate p95 without / with</th><th>Legitimate lost</th></tr>\n",
    );
    for c in &r.configs {
        let Some(p) = &c.pregreet else { continue };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&p.settings()),
            p.caught,
            p.caught_legitimate,
            p.spam_accepted_without,
            p.spam_accepted,
            p.spam_blocked,
            p.suspect_rcpts,
            p.legitimate_waits,
            p.legitimate_wait_seconds,
            opt_dur(p.legitimate_p95_without),
            opt_dur(p.legitimate_p95),
            p.legitimate_lost
        );
    }
    s.push_str("</table>\n");
    s
}

/// A self-contained HTML report (no scripts, no external resources).
pub fn render_html(r: &Report) -> String {
    let series: Vec<String> = r.configs.iter().map(|c| c.name.clone()).collect();
    let legit: Vec<usize> = (0..r.classes.len())
        .filter(|&i| !r.classes[i].spam)
        .collect();
    let spam: Vec<usize> = (0..r.classes.len())
        .filter(|&i| r.classes[i].spam)
        .collect();
    let groups = |idx: &[usize],
                  f: &dyn Fn(&ClassResult) -> (f64, String)|
     -> Vec<(String, Vec<(f64, String)>)> {
        idx.iter()
            .map(|&i| {
                (
                    r.classes[i].name.clone(),
                    r.configs.iter().map(|c| f(&c.classes[i])).collect(),
                )
            })
            .collect()
    };
    let mut s = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>greygate simulation report</title>\n<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}figcaption{font-weight:bold;margin:1em 0 .3em}</style></head><body>\n",
    );
    let _ = writeln!(
        s,
        "<h1>Simulation: {}</h1>\n<p>{}</p>\n<p>{} messages over {} from {} sender classes, seed {}.</p>",
        esc(&r.scenario),
        esc(r.description.trim()),
        r.messages,
        fmt_dur(r.duration),
        r.classes.len(),
        r.seed
    );
    s.push_str("<h2>Configurations</h2><ul>\n");
    for c in &r.configs {
        let _ = writeln!(
            s,
            "<li><b>{}</b>: {} (DNS facts {}{})</li>",
            esc(&c.name),
            esc(&c.description),
            if c.dns { "on" } else { "off" },
            c.pregreet.as_ref().map_or_else(String::new, |p| format!(
                "; pregreet test: {}",
                p.settings()
            ))
        );
    }
    s.push_str("</ul>\n");
    if !legit.is_empty() {
        s.push_str(&grouped_bars(
            "Added delay p95 of legitimate mail",
            &series,
            &groups(&legit, &|x| {
                let v = x.delay_p95.unwrap_or(0);
                (v as f64, opt_dur(x.delay_p95))
            }),
        ));
        s.push_str(&grouped_bars(
            "Legitimate mail lost (%)",
            &series,
            &groups(&legit, &|x| (x.lost_pct, format!("{:.1}%", x.lost_pct))),
        ));
    }
    if !spam.is_empty() {
        s.push_str(&grouped_bars(
            "Spam accepted (%)",
            &series,
            &groups(&spam, &|x| {
                (x.delivered_pct, format!("{:.1}%", x.delivered_pct))
            }),
        ));
    }
    let dist: Vec<(String, Vec<(f64, String)>)> = BUCKETS
        .iter()
        .enumerate()
        .map(|(b, (_, label))| {
            (
                label.to_string(),
                r.configs
                    .iter()
                    .map(|c| {
                        let n = c.legitimate.histogram[b];
                        (n as f64, n.to_string())
                    })
                    .collect(),
            )
        })
        .collect();
    s.push_str(&grouped_bars(
        "Added delay of delivered legitimate messages",
        &series,
        &dist,
    ));
    if r.configs.iter().any(|c| c.pregreet.is_some()) {
        s.push_str(&pregreet_html(r));
    }
    for c in &r.configs {
        let _ = writeln!(
            s,
            "<h2>{}</h2>\n<table><tr><th>Class</th><th>MTA</th><th>Messages</th><th>Delivered</th><th>Lost</th><th>Delayed</th><th>p50</th><th>p95</th><th>max</th><th>Spam accepted</th></tr>",
            esc(&c.name)
        );
        let mta = |name: &str| {
            r.classes
                .iter()
                .find(|i| i.name == name)
                .map_or("", |i| i.mta)
        };
        for x in c.classes.iter().chain([&c.legitimate, &c.spam]) {
            let (delivered, lost, accepted) = if x.spam {
                ("-".into(), "-".into(), format!("{:.1}%", x.delivered_pct))
            } else {
                (
                    format!("{:.1}%", x.delivered_pct),
                    format!("{:.1}%", x.lost_pct),
                    "-".into(),
                )
            };
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{delivered}</td><td>{lost}</td><td>{:.1}%</td><td>{}</td><td>{}</td><td>{}</td><td>{accepted}</td></tr>",
                esc(&x.class),
                mta(&x.class),
                x.messages,
                x.delayed_pct,
                opt_dur(x.delay_p50),
                opt_dur(x.delay_p95),
                opt_dur(x.delay_max),
            );
        }
        let _ = writeln!(
            s,
            "</table><p>{} deferrals; {} triplets and {} client records in the store at the end.</p>",
            c.deferrals, c.triplets, c.client_records
        );
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_percentiles() {
        assert_eq!(fmt_dur(0), "0s");
        assert_eq!(fmt_dur(300), "5m");
        assert_eq!(fmt_dur(330), "5m30s");
        assert_eq!(fmt_dur(4000), "1h06m");
        assert_eq!(fmt_dur(2 * 86_400 + 3600), "2d01h");
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 0.95), Some(4));
        let r = ClassResult::new("x", false, 4, 3, 1, 2, 9, vec![600, 0, 300]);
        assert_eq!((r.delay_p50, r.delay_max), (Some(300), Some(600)));
        assert_eq!(r.histogram, [1, 1, 1, 0, 0, 0]);
        assert_eq!((r.delivered_pct, r.lost_pct), (75.0, 25.0));
    }
}
