//! `greygate probe`: ask a recipient's mail servers, the way a sending MTA would, whether
//! they accept, greylist, defer or reject a recipient — without sending mail (the dialogue
//! stops after RCPT). MX hosts are tried in preference order; a host that cannot be reached
//! or refuses the session (banner or EHLO not 2xx) passes the turn to the next, as MTAs do.
//! With a retry schedule the probe repeats until each recipient is accepted or rejected and
//! measures how long greylisting held it back.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::net::TcpStream;

use super::classify::{Class, classify};
use super::smtp::{Line, Session, Stage};

/// Exit codes of `greygate probe`, most severe result of all recipients wins
/// (no connection > rejected > temporary failure > greylisted > accepted).
pub const EXIT_ACCEPTED: u8 = 0;
pub const EXIT_GREYLISTED: u8 = 4;
pub const EXIT_TEMPFAIL: u8 = 5;
pub const EXIT_REJECTED: u8 = 6;
pub const EXIT_NO_CONNECTION: u8 = 7;

/// Errors that stop the probe before any server is asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0:?} is not an email address (want local@domain)")]
    BadRecipient(String),
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
}

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connect here instead of looking up MX records (`host:port`).
    pub server: Option<String>,
    /// DNS server to ask instead of the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// SMTP port on MX hosts (25; tests point it elsewhere).
    pub port: u16,
    /// Envelope sender, bare address; empty for the null sender.
    pub from: String,
    pub helo: String,
    /// Per connect, per command.
    pub timeout: Duration,
    /// Repeat every so often until accepted/rejected or `until` has passed.
    pub retry_every: Option<Duration>,
    pub until: Duration,
    /// Upgrade each conversation with STARTTLS before MAIL FROM.
    pub starttls: bool,
}

/// The verdict for one recipient in one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Greylisted,
    TempFail,
    Rejected,
    NoConnection,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Greylisted => "greylisted",
            Status::TempFail => "temporary failure",
            Status::Rejected => "rejected",
            Status::NoConnection => "no connection",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Status::Accepted => EXIT_ACCEPTED,
            Status::Greylisted => EXIT_GREYLISTED,
            Status::TempFail => EXIT_TEMPFAIL,
            Status::Rejected => EXIT_REJECTED,
            Status::NoConnection => EXIT_NO_CONNECTION,
        }
    }

    /// Accepted and rejected do not change by waiting; the rest may.
    fn is_final(self) -> bool {
        matches!(self, Status::Accepted | Status::Rejected)
    }
}

/// One attempt's result for one recipient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub status: Status,
    /// Why "greylisted": the reply's code, enhanced code or words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The server that answered: `name [ip]:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Which command the reply answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// The server's exact reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Hosts tried before, and why they did not do (connection refused, timeouts, 421).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<String>,
    /// Seconds since the first attempt.
    pub at_secs: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transcript: Vec<Line>,
}

/// Everything about one recipient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecipientReport {
    pub recipient: String,
    /// The last attempt's status.
    pub status: Status,
    pub attempts: Vec<Attempt>,
    /// Seconds from the first try to the accepting one, when a greylisted (or otherwise
    /// deferred) recipient was accepted later: the delay that server imposes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_accept_secs: Option<f64>,
}

impl RecipientReport {
    pub fn last(&self) -> &Attempt {
        self.attempts.last().expect("at least one attempt")
    }
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub recipients: Vec<RecipientReport>,
}

impl Report {
    /// The exit code: the most severe status among recipients.
    pub fn exit_code(&self) -> u8 {
        self.recipients
            .iter()
            .map(|r| r.status)
            .max()
            .unwrap_or(Status::Accepted)
            .exit_code()
    }
}

/// Splits `local@domain`; the domain is what MX lookups are about.
fn domain_of(rcpt: &str) -> Result<&str, ProbeError> {
    match rcpt.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !rcpt.contains(['<', '>', ' ', '\r', '\n']) =>
        {
            Ok(domain)
        }
        _ => Err(ProbeError::BadRecipient(rcpt.to_string())),
    }
}

/// Where to connect for one domain: hosts in preference order, each with its addresses.
type Route = Vec<(String, Vec<SocketAddr>)>;

/// Runs the probe. `on_attempt` sees every attempt as it completes (for live output).
pub async fn run(
    opts: &Options,
    recipients: &[String],
    mut on_attempt: impl FnMut(&str, &Attempt),
) -> Result<Report, ProbeError> {
    for r in recipients {
        domain_of(r)?;
    }
    let resolver = match opts.server {
        Some(_) => None,
        None => Some(build_resolver(opts.resolver)?),
    };
    let start = Instant::now();
    let mut reports: Vec<RecipientReport> = recipients
        .iter()
        .map(|r| RecipientReport {
            recipient: r.clone(),
            status: Status::NoConnection,
            attempts: Vec::new(),
            time_to_accept_secs: None,
        })
        .collect();
    loop {
        let round_start = start.elapsed();
        // Recipients still worth asking, grouped by domain: one session per domain per round.
        let mut domains: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, r) in reports.iter().enumerate() {
            if r.attempts.is_empty() || !r.status.is_final() {
                let d = domain_of(&r.recipient)?.to_ascii_lowercase();
                match domains.iter_mut().find(|(name, _)| *name == d) {
                    Some((_, idx)) => idx.push(i),
                    None => domains.push((d, vec![i])),
                }
            }
        }
        if domains.is_empty() {
            break;
        }
        for (domain, idx) in domains {
            let rcpts: Vec<String> = idx.iter().map(|&i| reports[i].recipient.clone()).collect();
            let route = route(opts, resolver.as_ref(), &domain).await;
            // Milliseconds are plenty for delays measured in seconds or minutes.
            let at = (round_start.as_secs_f64() * 1000.0).round() / 1000.0;
            let attempts = attempt(opts, route, &rcpts, at).await;
            for (i, a) in idx.into_iter().zip(attempts) {
                let r = &mut reports[i];
                on_attempt(&r.recipient, &a);
                if a.status == Status::Accepted && !r.attempts.is_empty() {
                    r.time_to_accept_secs = Some(a.at_secs);
                }
                r.status = a.status;
                r.attempts.push(a);
            }
        }
        let Some(every) = opts.retry_every else { break };
        if reports.iter().all(|r| r.status.is_final()) {
            break;
        }
        let next = round_start + every;
        if next > opts.until {
            break;
        }
        tokio::time::sleep(next.saturating_sub(start.elapsed())).await;
    }
    Ok(Report {
        recipients: reports,
    })
}

fn build_resolver(server: Option<SocketAddr>) -> Result<TokioResolver, ProbeError> {
    let err = |e: &dyn std::fmt::Display| ProbeError::Resolver(e.to_string());
    match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
            .build()
            .map_err(|e| err(&e))
        }
        None => Resolver::builder_tokio()
            .map_err(|e| err(&e))?
            .build()
            .map_err(|e| err(&e)),
    }
}

/// The hosts to try for `domain`, or why there are none.
async fn route(
    opts: &Options,
    resolver: Option<&TokioResolver>,
    domain: &str,
) -> Result<Route, String> {
    let Some(resolver) = resolver else {
        let server = opts.server.as_deref().unwrap_or_default();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
            .await
            .map_err(|e| format!("cannot resolve --server {server}: {e}"))?
            .collect();
        return Ok(vec![(server.to_string(), addrs)]);
    };
    // A trailing dot: the domain is absolute, no search-list guessing.
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut mx: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_no_records_found() && !e.is_nx_domain() => Vec::new(),
        Err(e) => return Err(format!("MX lookup for {domain} failed: {e}")),
    };
    if mx.iter().any(|(_, host)| host == ".") {
        // RFC 7505 null MX: the domain says it accepts no mail at all.
        return Err(format!("{domain} publishes a null MX: it accepts no mail"));
    }
    if mx.is_empty() {
        // RFC 5321 section 5.1: no MX records, the domain itself is the implicit MX.
        mx.push((0, fqdn.clone()));
    }
    mx.sort_by_key(|(pref, _)| *pref);
    let mut route = Vec::new();
    for (_, host) in mx {
        let addrs: Vec<SocketAddr> = match resolver.lookup_ip(host.as_str()).await {
            Ok(ips) => ips
                .iter()
                .map(|ip: IpAddr| SocketAddr::new(ip, opts.port))
                .collect(),
            Err(_) => Vec::new(),
        };
        route.push((host.trim_end_matches('.').to_string(), addrs));
    }
    Ok(route)
}

/// One round for the recipients of one domain: walk the route until a server answers.
async fn attempt(
    opts: &Options,
    route: Result<Route, String>,
    rcpts: &[String],
    at_secs: f64,
) -> Vec<Attempt> {
    let fail = |tried: Vec<String>| {
        vec![
            Attempt {
                status: Status::NoConnection,
                evidence: None,
                server: None,
                stage: None,
                reply: None,
                tried,
                at_secs,
                transcript: Vec::new(),
            };
            rcpts.len()
        ]
    };
    let route = match route {
        Ok(r) => r,
        Err(why) => return fail(vec![why]),
    };
    let mut tried = Vec::new();
    let mut refused: Option<Vec<Attempt>> = None;
    for (host, addrs) in route {
        if addrs.is_empty() {
            tried.push(format!("{host}: no address"));
        }
        for addr in addrs {
            let name = if host.parse::<IpAddr>().is_ok() || host.parse::<SocketAddr>().is_ok() {
                addr.to_string()
            } else {
                format!("{host} [{}]:{}", addr.ip(), addr.port())
            };
            let stream = match tokio::time::timeout(opts.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tried.push(format!("{name}: {e}"));
                    continue;
                }
                Err(_) => {
                    tried.push(format!(
                        "{name}: connect timed out after {:?}",
                        opts.timeout
                    ));
                    continue;
                }
            };
            let mut session = Session::new(stream, opts.timeout);
            if opts.starttls {
                let tls_name =
                    if host.parse::<IpAddr>().is_ok() || host.parse::<SocketAddr>().is_ok() {
                        addr.ip().to_string()
                    } else {
                        host.trim_end_matches('.').to_string()
                    };
                session = session.with_starttls(tls_name);
            }
            match session.probe(&opts.helo, &opts.from, rcpts).await {
                // A server that fails mid-dialogue (timeout, hang-up) counts as unreachable:
                // the next MX gets its turn.
                Err((e, _)) => tried.push(format!("{name}: {e}")),
                Ok(out) => {
                    let attempts: Vec<Attempt> = out
                        .replies
                        .iter()
                        .map(|(stage, reply)| {
                            let class = classify(reply);
                            let (status, evidence) = match class {
                                Class::Accepted => (Status::Accepted, None),
                                Class::Greylisted { evidence } => {
                                    (Status::Greylisted, Some(evidence))
                                }
                                Class::TempFail => (Status::TempFail, None),
                                Class::Rejected => (Status::Rejected, None),
                            };
                            Attempt {
                                status,
                                evidence,
                                server: Some(name.clone()),
                                stage: Some(*stage),
                                reply: Some(reply.text.clone()),
                                tried: tried.clone(),
                                at_secs,
                                transcript: out.transcript.clone(),
                            }
                        })
                        .collect();
                    // A session refused before MAIL (421 busy, 554 go away) sends an MTA
                    // on to the next MX; a reply to MAIL or RCPT is the domain's answer.
                    let session_refused = out
                        .replies
                        .first()
                        .is_some_and(|(s, _)| matches!(s, Stage::Banner | Stage::Helo));
                    if !session_refused {
                        return attempts;
                    }
                    tried.push(format!(
                        "{name}: {}",
                        out.replies
                            .first()
                            .map(|(_, r)| r.text.as_str())
                            .unwrap_or("")
                    ));
                    refused = Some(attempts);
                }
            }
        }
    }
    refused.unwrap_or_else(|| fail(tried))
}

/// Text for people: one block per recipient.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for r in &report.recipients {
        let a = r.last();
        let _ = write!(s, "{}: {}", r.recipient, r.status.name().to_uppercase());
        if let Some(server) = &a.server {
            let _ = write!(s, " by {server}");
        }
        s.push('\n');
        if let (Some(stage), Some(reply)) = (a.stage, &a.reply) {
            let _ = writeln!(s, "  reply to {}: {reply}", stage.name());
        }
        if let Some(ev) = &a.evidence {
            let _ = writeln!(s, "  evidence: {ev}");
        }
        for t in &a.tried {
            let _ = writeln!(s, "  tried: {t}");
        }
        if r.attempts.len() > 1 {
            let grey = r
                .attempts
                .iter()
                .filter(|a| a.status == Status::Greylisted)
                .count();
            let _ = writeln!(s, "  attempts: {} ({grey} greylisted)", r.attempts.len());
        }
        if let Some(t) = r.time_to_accept_secs {
            let _ = writeln!(s, "  accepted {} after the first try", fmt_secs(t));
        }
    }
    s
}

/// `4m 05s`, `2.0s`.
pub fn fmt_secs(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let total = secs.round() as u64;
        let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
        if h > 0 {
            format!("{h}h {m:02}m {s:02}s")
        } else {
            format!("{m}m {s:02}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_checked() {
        assert!(domain_of("a@example.org").is_ok());
        for bad in ["example.org", "@example.org", "a@", "a b@c", "<a@b>"] {
            assert!(domain_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_code_is_most_severe() {
        let rep = |statuses: &[Status]| Report {
            recipients: statuses
                .iter()
                .map(|&status| RecipientReport {
                    recipient: "a@b".into(),
                    status,
                    attempts: Vec::new(),
                    time_to_accept_secs: None,
                })
                .collect(),
        };
        assert_eq!(rep(&[Status::Accepted]).exit_code(), 0);
        assert_eq!(rep(&[Status::Accepted, Status::Greylisted]).exit_code(), 4);
        assert_eq!(rep(&[Status::Rejected, Status::Greylisted]).exit_code(), 6);
        assert_eq!(
            rep(&[Status::NoConnection, Status::Rejected]).exit_code(),
            7
        );
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_secs(2.04), "2.0s");
        assert_eq!(fmt_secs(305.0), "5m 05s");
        assert_eq!(fmt_secs(3725.0), "1h 02m 05s");
    }
}
