//! `greygate probe`: ask a recipient's mail servers, the way a sending MTA would, whether
//! they accept, greylist, defer or reject a recipient — without sending mail (the dialogue
//! stops after RCPT). MX hosts are tried in preference order; a host that cannot be reached
//! or refuses the session (banner or EHLO not 2xx) passes the turn to the next, as MTAs do.
//! With a retry schedule the probe repeats until each recipient is accepted or rejected and
//! measures how long greylisting held it back.
//!
//! Many destinations at once (`--file`): recipients of one domain (and one server override)
//! share sessions; every such group runs on its own retry schedule, all groups concurrently,
//! bounded by a [`Gate`]: one connection at a time per server, at most `concurrency` probes
//! over the run. Memory is bounded per recipient (kept attempts, transcript lines and their
//! length, reasons), per reply by the SMTP client, and in count by the destinations file's
//! limits ([`super::targets`]); time per attempt by `timeout` per connect, command and lookup
//! and [`MAX_ROUTE_ADDRS`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::classify::{Class, classify};
use super::gate::Gate;
use super::smtp::{Line, Session, Stage};
use super::targets::{self, Target};

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
    #[error("{0:?} is not an email address (want local@domain): {1}")]
    BadRecipient(String, String),
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
}

/// Most recipients in one SMTP session; a domain with more gets several sessions (Postfix
/// sends at most 50 per delivery by default, `smtp_destination_recipient_limit`).
pub const MAX_RCPTS_PER_SESSION: usize = 50;
/// Most addresses tried per attempt, over all MX hosts (Postfix tries 5,
/// `smtp_mx_address_limit`): bounds the time of one attempt to that many timeouts.
pub const MAX_ROUTE_ADDRS: usize = 10;
/// Attempts kept per recipient: the first and the latest (`attempt_count` has them all).
pub const MAX_KEPT_ATTEMPTS: usize = 10;
/// Transcript kept per recipient (its last attempt's): lines and bytes per line.
pub const MAX_KEPT_TRANSCRIPT_LINES: usize = 64;
pub const MAX_KEPT_LINE_BYTES: usize = 512;
/// Longest reason kept for a server that did not do (`tried`).
const MAX_TRIED_BYTES: usize = 300;
/// Attempts per recipient, whatever the schedule (`--until` / `--retry-every` bounds them
/// first: with the one-second minimum, 24 hours make 86,400).
const MAX_ATTEMPTS: u32 = 100_000;
/// Default of `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connect here instead of looking up MX records (`host:port`), unless a target names
    /// its own server.
    pub server: Option<String>,
    /// DNS server to ask instead of the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// SMTP port on MX hosts (25; tests point it elsewhere).
    pub port: u16,
    /// Envelope sender, bare address; empty for the null sender.
    pub from: String,
    pub helo: String,
    /// Per connect, per command, per DNS lookup of an attempt.
    pub timeout: Duration,
    /// Repeat every so often until accepted/rejected or `until` has passed.
    pub retry_every: Option<Duration>,
    /// With `retry_every`: give up on a destination this long after its first attempt.
    pub until: Duration,
    /// Upgrade each conversation with STARTTLS before MAIL FROM.
    pub starttls: bool,
    /// Probes at once over the whole run; one connection at a time per server regardless.
    pub concurrency: usize,
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
    pub fn is_final(self) -> bool {
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
    /// Seconds since the run started, when the connection that answered was opened (for
    /// an attempt without an answer, when it started). Time to accept is measured with it.
    pub at_secs: f64,
    /// The conversation, as far as it concerns this recipient (other recipients' RCPT
    /// lines of a shared session left out). Kept for the last attempt only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transcript: Vec<Line>,
}

/// Everything about one recipient.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecipientReport {
    pub recipient: String,
    /// The line of the destinations file it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The server the destination named (`host:port`), instead of its MX hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The last attempt's status.
    pub status: Status,
    /// Whether any attempt was greylisted: with `status` accepted, the server greylisted
    /// us and let us through later.
    pub was_greylisted: bool,
    /// Attempts made in all, and how many of them were greylisted.
    pub attempt_count: u32,
    pub greylisted_attempts: u32,
    /// The first attempt and the latest ones, at most [`MAX_KEPT_ATTEMPTS`].
    pub attempts: Vec<Attempt>,
    /// Seconds from the first try to the accepting one, when a greylisted (or otherwise
    /// deferred) recipient was accepted later: the delay that server imposes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_accept_secs: Option<f64>,
}

impl RecipientReport {
    /// The latest attempt (`None` only if the recipient was never tried).
    pub fn last(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    fn new(t: &Target) -> Self {
        RecipientReport {
            recipient: t.recipient.clone(),
            line: t.line,
            via: t.server.clone(),
            status: Status::NoConnection,
            was_greylisted: false,
            attempt_count: 0,
            greylisted_attempts: 0,
            attempts: Vec::new(),
            time_to_accept_secs: None,
        }
    }

    /// Adds an attempt, keeping memory bounded: older transcripts go, and of long series
    /// only the first attempt and the latest stay.
    fn record(&mut self, a: Attempt) {
        if a.status == Status::Accepted
            && let Some(first) = self.attempts.first()
        {
            self.time_to_accept_secs = Some(millis(a.at_secs - first.at_secs));
        }
        if a.status == Status::Greylisted {
            self.was_greylisted = true;
            self.greylisted_attempts = self.greylisted_attempts.saturating_add(1);
        }
        if let Some(prev) = self.attempts.last_mut() {
            prev.transcript = Vec::new();
        }
        if self.attempts.len() >= MAX_KEPT_ATTEMPTS {
            self.attempts.remove(1);
        }
        self.status = a.status;
        self.attempt_count = self.attempt_count.saturating_add(1);
        self.attempts.push(a);
    }
}

/// Counts over all recipients.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    pub destinations: usize,
    pub accepted: usize,
    pub greylisted: usize,
    pub temp_fail: usize,
    pub rejected: usize,
    pub no_connection: usize,
    /// Accepted in the end after at least one greylisted attempt.
    pub greylisted_then_accepted: usize,
    /// Of the recipients accepted after a delay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_accept_median_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_accept_max_secs: Option<f64>,
    pub attempts: u64,
}

impl Totals {
    fn of(recipients: &[RecipientReport]) -> Totals {
        let mut t = Totals {
            destinations: recipients.len(),
            ..Totals::default()
        };
        let mut delays = Vec::new();
        for r in recipients {
            *match r.status {
                Status::Accepted => &mut t.accepted,
                Status::Greylisted => &mut t.greylisted,
                Status::TempFail => &mut t.temp_fail,
                Status::Rejected => &mut t.rejected,
                Status::NoConnection => &mut t.no_connection,
            } += 1;
            if r.status == Status::Accepted && r.was_greylisted {
                t.greylisted_then_accepted += 1;
            }
            delays.extend(r.time_to_accept_secs);
            t.attempts += u64::from(r.attempt_count);
        }
        delays.sort_by(f64::total_cmp);
        t.time_to_accept_median_secs = delays.get(delays.len() / 2).copied();
        t.time_to_accept_max_secs = delays.last().copied();
        t
    }
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub recipients: Vec<RecipientReport>,
    pub totals: Totals,
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
    targets::check_address(rcpt).map_err(|why| ProbeError::BadRecipient(rcpt.to_string(), why))?;
    rcpt.rsplit_once('@')
        .map(|(_, d)| d)
        .ok_or_else(|| ProbeError::BadRecipient(rcpt.to_string(), "no '@'".into()))
}

/// Rounds to milliseconds: plenty for delays measured in seconds or minutes.
fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// Where to connect for one domain: hosts in preference order, each with its addresses.
type Route = Vec<(String, Vec<SocketAddr>)>;

/// One attempt for the recipients of one session. The scheduler does not care how: the
/// SMTP prober below does it for real, unit tests with a simulated server.
pub trait Prober: Send + Sync + 'static {
    /// One [`Attempt`] per recipient, in order. Every connection goes through `gate`.
    fn attempt(
        &self,
        domain: &str,
        server: Option<&str>,
        rcpts: &[String],
        gate: &Gate,
        start: Instant,
    ) -> impl Future<Output = Vec<Attempt>> + Send;
}

/// When and how often.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub concurrency: usize,
    pub retry_every: Option<Duration>,
    pub until: Duration,
}

/// Runs the probe. `on_attempt` sees every attempt as it completes (for live output).
pub async fn run(
    opts: &Options,
    targets: &[Target],
    on_attempt: impl FnMut(&str, &Attempt),
) -> Result<Report, ProbeError> {
    for t in targets {
        domain_of(&t.recipient)?;
    }
    let needs_dns = opts.server.is_none() && targets.iter().any(|t| t.server.is_none());
    let resolver = match needs_dns {
        true => Some(build_resolver(opts.resolver)?),
        false => None,
    };
    let prober = Arc::new(Smtp {
        opts: opts.clone(),
        resolver,
    });
    let plan = Plan {
        concurrency: opts.concurrency,
        retry_every: opts.retry_every,
        until: opts.until,
    };
    Ok(schedule(prober, targets, plan, on_attempt).await)
}

/// Recipients sharing a domain and a server override share sessions, at most
/// [`MAX_RCPTS_PER_SESSION`] each; every such group is a job with its own schedule.
fn jobs(targets: &[Target]) -> Vec<(String, Option<String>, Vec<usize>)> {
    let mut jobs: Vec<(String, Option<String>, Vec<usize>)> = Vec::new();
    let mut open: HashMap<(String, Option<String>), usize> = HashMap::new();
    for (i, t) in targets.iter().enumerate() {
        let domain = t
            .recipient
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_lowercase();
        let key = (domain.clone(), t.server.clone());
        match open.get(&key) {
            Some(&j) if jobs[j].2.len() < MAX_RCPTS_PER_SESSION => jobs[j].2.push(i),
            _ => {
                open.insert(key, jobs.len());
                jobs.push((domain, t.server.clone(), vec![i]));
            }
        }
    }
    jobs
}

/// Runs every job concurrently, each on its own schedule, bounded by the gate; gathers the
/// attempts as they come.
pub async fn schedule<P: Prober>(
    prober: Arc<P>,
    targets: &[Target],
    plan: Plan,
    mut on_attempt: impl FnMut(&str, &Attempt),
) -> Report {
    let start = Instant::now();
    let mut reports: Vec<RecipientReport> = targets.iter().map(RecipientReport::new).collect();
    let gate = Arc::new(Gate::new(plan.concurrency));
    let (tx, mut rx) = mpsc::channel::<(Vec<usize>, Vec<Attempt>)>(64);
    let mut set = JoinSet::new();
    for (domain, server, members) in jobs(targets) {
        let rcpts = members
            .iter()
            .map(|&i| (i, targets[i].recipient.clone()))
            .collect();
        set.spawn(run_job(
            prober.clone(),
            gate.clone(),
            Job {
                domain,
                server,
                rcpts,
            },
            plan,
            start,
            tx.clone(),
        ));
    }
    drop(tx);
    while let Some((members, attempts)) = rx.recv().await {
        for (i, a) in members.into_iter().zip(attempts) {
            if let Some(r) = reports.get_mut(i) {
                on_attempt(&r.recipient, &a);
                r.record(a);
            }
        }
    }
    while set.join_next().await.is_some() {}
    let totals = Totals::of(&reports);
    Report {
        recipients: reports,
        totals,
    }
}

struct Job {
    domain: String,
    server: Option<String>,
    /// (index into the report, recipient) still worth asking.
    rcpts: Vec<(usize, String)>,
}

/// One job: attempts at `start of its first + k * every` (never closer together than an
/// attempt takes) until every recipient has a final answer or `until` has passed since
/// the first attempt.
async fn run_job<P: Prober>(
    prober: Arc<P>,
    gate: Arc<Gate>,
    mut job: Job,
    plan: Plan,
    start: Instant,
    tx: mpsc::Sender<(Vec<usize>, Vec<Attempt>)>,
) {
    let mut due = Instant::now();
    let mut first: Option<Instant> = None;
    for _ in 0..MAX_ATTEMPTS {
        tokio::time::sleep_until(due).await;
        let names: Vec<String> = job.rcpts.iter().map(|(_, r)| r.clone()).collect();
        let attempts = prober
            .attempt(&job.domain, job.server.as_deref(), &names, &gate, start)
            .await;
        // When the first attempt reached its server; never before it was due (`at_secs`
        // is rounded to milliseconds), so the last retry due at `until` is not lost.
        let first = *first.get_or_insert_with(|| {
            let at = attempts.first().map_or(0.0, |a| a.at_secs.max(0.0));
            (start + Duration::try_from_secs_f64(at).unwrap_or_default()).max(due)
        });
        let done: Vec<bool> = attempts.iter().map(|a| a.status.is_final()).collect();
        let members = job.rcpts.iter().map(|(i, _)| *i).collect();
        if tx.send((members, attempts)).await.is_err() {
            return;
        }
        let mut k = 0;
        job.rcpts.retain(|_| {
            k += 1;
            !done.get(k - 1).copied().unwrap_or(false)
        });
        let Some(every) = plan.retry_every else {
            return;
        };
        if job.rcpts.is_empty() {
            return;
        }
        let next = (due + every).max(Instant::now());
        if next.saturating_duration_since(first) > plan.until {
            return;
        }
        due = next;
    }
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

/// The real prober: DNS, TCP, SMTP.
struct Smtp {
    opts: Options,
    resolver: Option<TokioResolver>,
}

impl Prober for Smtp {
    async fn attempt(
        &self,
        domain: &str,
        server: Option<&str>,
        rcpts: &[String],
        gate: &Gate,
        start: Instant,
    ) -> Vec<Attempt> {
        let server = server.or(self.opts.server.as_deref());
        let (route, began) = {
            // Lookups count against the run-wide bound too.
            let _slot = gate.slot().await;
            let began = millis(start.elapsed().as_secs_f64());
            let found = tokio::time::timeout(
                self.opts.timeout,
                route(&self.opts, self.resolver.as_ref(), server, domain),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "looking up where to connect for {domain} timed out after {:?}",
                    self.opts.timeout
                ))
            });
            (found, began)
        };
        walk(&self.opts, route, rcpts, gate, start, began).await
    }
}

/// The hosts to try for `domain`, or why there are none.
async fn route(
    opts: &Options,
    resolver: Option<&TokioResolver>,
    server: Option<&str>,
    domain: &str,
) -> Result<Route, String> {
    if let Some(server) = server {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
            .await
            .map_err(|e| format!("cannot resolve server {server}: {e}"))?
            .take(MAX_ROUTE_ADDRS)
            .collect();
        return Ok(vec![(server.to_string(), addrs)]);
    }
    let Some(resolver) = resolver else {
        return Err("no DNS resolver".into());
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
    let mut left = MAX_ROUTE_ADDRS;
    for (_, host) in mx {
        if left == 0 {
            break;
        }
        let addrs: Vec<SocketAddr> = match resolver.lookup_ip(host.as_str()).await {
            Ok(ips) => ips
                .iter()
                .take(left)
                .map(|ip: IpAddr| SocketAddr::new(ip, opts.port))
                .collect(),
            Err(_) => Vec::new(),
        };
        left -= addrs.len().min(left);
        route.push((host.trim_end_matches('.').to_string(), addrs));
    }
    Ok(route)
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [...]");
    }
    s
}

/// The lines of a session's transcript that concern its `index`-th recipient: everything
/// but the other recipients' RCPT commands and their replies; bounded.
fn own_transcript(transcript: &[Line], index: usize) -> Vec<Line> {
    let mut out = Vec::new();
    let mut rcpt = 0;
    let mut keep = true;
    let mut omitted = 0usize;
    for l in transcript {
        if l.dir == ">" {
            keep = match l.text.get(..8) {
                Some(cmd) if cmd.eq_ignore_ascii_case("RCPT TO:") => {
                    rcpt += 1;
                    rcpt - 1 == index
                }
                _ => true,
            };
        }
        if !keep {
            continue;
        }
        if out.len() >= MAX_KEPT_TRANSCRIPT_LINES {
            omitted += 1;
            continue;
        }
        out.push(Line {
            dir: l.dir,
            text: clip(l.text.clone(), MAX_KEPT_LINE_BYTES),
        });
    }
    if omitted > 0 {
        out.push(Line {
            dir: "*",
            text: format!("{omitted} more lines not kept"),
        });
    }
    out
}

/// One attempt for the recipients of one session: walk the route until a server answers,
/// each connection in its server's turn (`gate`).
async fn walk(
    opts: &Options,
    route: Result<Route, String>,
    rcpts: &[String],
    gate: &Gate,
    start: Instant,
    began: f64,
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
                at_secs: began,
                transcript: Vec::new(),
            };
            rcpts.len()
        ]
    };
    let route = match route {
        Ok(r) => r,
        Err(why) => return fail(vec![clip(why, MAX_TRIED_BYTES)]),
    };
    let mut tried = Vec::new();
    let mut refused: Option<Vec<Attempt>> = None;
    for (host, addrs) in route {
        if addrs.is_empty() {
            tried.push(clip(format!("{host}: no address"), MAX_TRIED_BYTES));
        }
        for addr in addrs {
            let name = if host.parse::<IpAddr>().is_ok() || host.parse::<SocketAddr>().is_ok() {
                addr.to_string()
            } else {
                format!("{host} [{}]:{}", addr.ip(), addr.port())
            };
            // This server's turn and a run-wide slot, until the session is over.
            let _pass = gate.connect(addr).await;
            let at_secs = millis(start.elapsed().as_secs_f64());
            let stream = match tokio::time::timeout(opts.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tried.push(clip(format!("{name}: {e}"), MAX_TRIED_BYTES));
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
            // The session (and its connection) ends inside `probe`, before `_pass` goes.
            match session.probe(&opts.helo, &opts.from, rcpts).await {
                // A server that fails mid-dialogue (timeout, hang-up) counts as unreachable:
                // the next MX gets its turn.
                Err((e, _)) => tried.push(clip(format!("{name}: {e}"), MAX_TRIED_BYTES)),
                Ok(out) => {
                    let attempts: Vec<Attempt> = out
                        .replies
                        .iter()
                        .enumerate()
                        .map(|(i, (stage, reply))| {
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
                                transcript: own_transcript(&out.transcript, i),
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
                    tried.push(clip(
                        format!(
                            "{name}: {}",
                            out.replies
                                .first()
                                .map(|(_, r)| r.text.as_str())
                                .unwrap_or("")
                        ),
                        MAX_TRIED_BYTES,
                    ));
                    refused = Some(attempts);
                }
            }
        }
    }
    refused.unwrap_or_else(|| fail(tried))
}

/// Text for people, made harmless for a terminal: control characters (escape sequences a
/// server could send) become `?`.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Text for people: one block per recipient.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for r in &report.recipients {
        let _ = write!(
            s,
            "{}: {}",
            printable(&r.recipient),
            r.status.name().to_uppercase()
        );
        let Some(a) = r.last() else {
            s.push_str(" (never tried)\n");
            continue;
        };
        if let Some(server) = &a.server {
            let _ = write!(s, " by {}", printable(server));
        }
        s.push('\n');
        if let (Some(stage), Some(reply)) = (a.stage, &a.reply) {
            let _ = writeln!(s, "  reply to {}: {}", stage.name(), printable(reply));
        }
        if let Some(ev) = &a.evidence {
            let _ = writeln!(s, "  evidence: {}", printable(ev));
        }
        for t in &a.tried {
            let _ = writeln!(s, "  tried: {}", printable(t));
        }
        if r.attempt_count > 1 {
            let _ = writeln!(
                s,
                "  attempts: {} ({} greylisted)",
                r.attempt_count, r.greylisted_attempts
            );
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
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn recipients_are_checked() {
        assert!(domain_of("a@example.org").is_ok());
        for bad in ["example.org", "@example.org", "a@", "a b@c", "<a@b>"] {
            assert!(domain_of(bad).is_err(), "{bad}");
        }
    }

    fn report_of(statuses: &[Status]) -> Report {
        let recipients: Vec<RecipientReport> = statuses
            .iter()
            .map(|&status| RecipientReport {
                status,
                ..RecipientReport::new(&target("a@b", None))
            })
            .collect();
        Report {
            totals: Totals::of(&recipients),
            recipients,
        }
    }

    #[test]
    fn exit_code_is_most_severe() {
        assert_eq!(report_of(&[Status::Accepted]).exit_code(), 0);
        assert_eq!(
            report_of(&[Status::Accepted, Status::Greylisted]).exit_code(),
            4
        );
        assert_eq!(
            report_of(&[Status::Rejected, Status::Greylisted]).exit_code(),
            6
        );
        assert_eq!(
            report_of(&[Status::NoConnection, Status::Rejected]).exit_code(),
            7
        );
        assert_eq!(report_of(&[]).exit_code(), 0);
        let never = report_of(&[Status::NoConnection]);
        assert!(render_text(&never).contains("never tried"));
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_secs(2.04), "2.0s");
        assert_eq!(fmt_secs(305.0), "5m 05s");
        assert_eq!(fmt_secs(3725.0), "1h 02m 05s");
    }

    fn target(rcpt: &str, server: Option<&str>) -> Target {
        Target {
            recipient: rcpt.into(),
            server: server.map(str::to_string),
            line: None,
        }
    }

    fn attempt_with(status: Status, at_secs: f64) -> Attempt {
        Attempt {
            status,
            evidence: None,
            server: None,
            stage: None,
            reply: Some(format!("{} {}", status.exit_code(), status.name())),
            tried: Vec::new(),
            at_secs,
            transcript: vec![Line {
                dir: "<",
                text: "220 hi".into(),
            }],
        }
    }

    #[test]
    fn kept_attempts_are_bounded() {
        let mut r = RecipientReport::new(&target("a@b", None));
        for i in 0..25 {
            r.record(attempt_with(Status::Greylisted, f64::from(i)));
        }
        r.record(attempt_with(Status::Accepted, 25.5));
        assert_eq!(r.attempt_count, 26);
        assert_eq!(r.greylisted_attempts, 25);
        assert_eq!(r.attempts.len(), MAX_KEPT_ATTEMPTS);
        assert_eq!(r.attempts[0].at_secs, 0.0);
        assert_eq!(r.attempts[1].at_secs, 17.0);
        assert_eq!(r.time_to_accept_secs, Some(25.5));
        let with_transcript = r.attempts.iter().filter(|a| !a.transcript.is_empty());
        assert_eq!(with_transcript.count(), 1);
        assert!(!r.last().unwrap().transcript.is_empty());
    }

    #[test]
    fn transcripts_are_per_recipient_and_bounded() {
        let l = |dir, text: &str| Line {
            dir,
            text: text.into(),
        };
        let session = vec![
            l("<", "220 mx"),
            l(">", "EHLO me"),
            l("<", "250 mx"),
            l(">", "MAIL FROM:<>"),
            l("<", "250 ok"),
            l(">", "RCPT TO:<a@x>"),
            l("<", "450-4.7.1 greylisted"),
            l("<", "450 4.7.1 come back"),
            l(">", "rcpt to:<b@x>"),
            l("<", "250 ok"),
            l(">", "QUIT"),
            l("<", "221 bye"),
        ];
        let texts = |v: Vec<Line>| v.into_iter().map(|l| l.text).collect::<Vec<_>>();
        let b = texts(own_transcript(&session, 1));
        assert_eq!(
            b,
            [
                "220 mx",
                "EHLO me",
                "250 mx",
                "MAIL FROM:<>",
                "250 ok",
                "rcpt to:<b@x>",
                "250 ok",
                "QUIT",
                "221 bye"
            ]
        );
        assert!(texts(own_transcript(&session, 0)).contains(&"450 4.7.1 come back".into()));
        let huge: Vec<Line> = (0..500)
            .map(|i| l("<", &format!("250-{i} {}", "é".repeat(400))))
            .collect();
        let kept = own_transcript(&huge, 0);
        assert_eq!(kept.len(), MAX_KEPT_TRANSCRIPT_LINES + 1);
        assert!(kept.iter().all(|l| l.text.len() <= MAX_KEPT_LINE_BYTES + 6));
        assert_eq!(kept.last().unwrap().text, "436 more lines not kept");
    }

    #[test]
    fn sessions_group_by_domain_and_server() {
        let mut t: Vec<Target> = vec![
            target("a@x.test", None),
            target("b@X.test.", None),
            target("c@y.test", None),
            target("d@x.test", Some("127.0.0.1:25")),
        ];
        t.extend((0..MAX_RCPTS_PER_SESSION + 1).map(|i| target(&format!("u{i}@big.test"), None)));
        let j = jobs(&t);
        let shape: Vec<(&str, usize)> = j.iter().map(|(d, _, m)| (d.as_str(), m.len())).collect();
        assert_eq!(
            shape,
            [
                ("x.test", 2),
                ("y.test", 1),
                ("x.test", 1),
                ("big.test", MAX_RCPTS_PER_SESSION),
                ("big.test", 1)
            ]
        );
    }

    /// A simulated world for the scheduler: servers (one per domain) that greylist each
    /// recipient for `delay` after its first RCPT, take `session` per conversation, and
    /// count connections, at once per server and over all.
    struct World {
        delay: Duration,
        session: Duration,
        /// Recipients that are rejected; `down.test` never answers.
        first_seen: Mutex<HashMap<String, Instant>>,
        now_total: AtomicUsize,
        max_total: AtomicUsize,
        per_server: Mutex<HashMap<String, (usize, usize)>>,
    }

    impl World {
        fn new(delay: u64, session_ms: u64) -> Arc<World> {
            Arc::new(World {
                delay: Duration::from_secs(delay),
                session: Duration::from_millis(session_ms),
                first_seen: Mutex::default(),
                now_total: AtomicUsize::new(0),
                max_total: AtomicUsize::new(0),
                per_server: Mutex::default(),
            })
        }

        fn peak(&self, server: &str) -> usize {
            self.per_server
                .lock()
                .unwrap()
                .get(server)
                .map_or(0, |p| p.1)
        }
    }

    impl Prober for World {
        async fn attempt(
            &self,
            domain: &str,
            server: Option<&str>,
            rcpts: &[String],
            gate: &Gate,
            start: Instant,
        ) -> Vec<Attempt> {
            let server = server.unwrap_or(domain).to_string();
            // Servers are told apart by port, as `ip:port` is what the gate keys on.
            let port = 1000 + server.bytes().map(u16::from).sum::<u16>();
            let _pass = gate.connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
            let at = millis(start.elapsed().as_secs_f64());
            let n = self.now_total.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_total.fetch_max(n, Ordering::SeqCst);
            {
                let mut per = self.per_server.lock().unwrap();
                let p = per.entry(server.clone()).or_default();
                p.0 += 1;
                p.1 = p.1.max(p.0);
            }
            tokio::time::sleep(self.session).await;
            let now = Instant::now();
            let out = rcpts
                .iter()
                .map(|r| {
                    let status = if domain == "down.test" {
                        Status::NoConnection
                    } else if r.starts_with("nobody@") {
                        Status::Rejected
                    } else {
                        let mut seen = self.first_seen.lock().unwrap();
                        let first = *seen.entry(r.clone()).or_insert(now);
                        if now.duration_since(first) >= self.delay {
                            Status::Accepted
                        } else {
                            Status::Greylisted
                        }
                    };
                    attempt_with(status, at)
                })
                .collect();
            self.now_total.fetch_sub(1, Ordering::SeqCst);
            self.per_server.lock().unwrap().get_mut(&server).unwrap().0 -= 1;
            out
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_destination_on_its_own_schedule_within_the_bounds() {
        let world = World::new(5, 200);
        // Eight domains on one shared server (a big provider's MX), four on their own, one
        // unreachable, one rejecting.
        let mut targets: Vec<Target> = (0..8)
            .map(|i| target(&format!("u@shared{i}.test"), Some("shared")))
            .collect();
        targets.extend((0..4).map(|i| target(&format!("u@own{i}.test"), None)));
        targets.push(target("u@down.test", None));
        targets.push(target("nobody@own0.test", None));
        let plan = Plan {
            concurrency: 3,
            retry_every: Some(Duration::from_secs(2)),
            until: Duration::from_secs(30),
        };
        let mut seen = 0;
        let report = schedule(world.clone(), &targets, plan, |_, _| seen += 1).await;
        assert_eq!(world.max_total.load(Ordering::SeqCst), 3);
        assert_eq!(world.peak("shared"), 1);
        for i in 0..4 {
            assert_eq!(world.peak(&format!("own{i}.test")), 1);
        }
        let r = &report.recipients;
        for x in &r[..12] {
            assert_eq!(x.status, Status::Accepted, "{x:?}");
            assert!(x.was_greylisted);
            let t = x.time_to_accept_secs.unwrap();
            // Greylisted for 5 s, retried every 2 s: accepted on the try at 6 s, give or
            // take a session time of queueing on the shared server.
            assert!((5.0..=8.0).contains(&t), "{t} {x:?}");
        }
        // The unreachable one is retried until --until: every 2 s from its first try for
        // 30 s, 16 tries.
        assert_eq!(r[12].status, Status::NoConnection);
        assert_eq!(r[12].attempt_count, 16, "{:?}", r[12]);
        assert!(r[12].attempts.len() <= MAX_KEPT_ATTEMPTS);
        // Rejected at once, never asked again (own0's session goes on without it).
        assert_eq!(r[13].status, Status::Rejected);
        assert_eq!(r[13].attempt_count, 1);
        assert_eq!(report.totals.accepted, 12);
        assert_eq!(report.totals.greylisted_then_accepted, 12);
        assert_eq!(report.totals.no_connection, 1);
        assert_eq!(report.totals.rejected, 1);
        assert_eq!(u64::from(seen as u32), report.totals.attempts);
        assert_eq!(report.exit_code(), EXIT_NO_CONNECTION);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_schedule_each_destination_is_asked_once() {
        let world = World::new(5, 50);
        let targets: Vec<Target> = (0..20)
            .map(|i| {
                target(
                    &format!("u@d{i}.test"),
                    Some(if i % 2 == 0 { "a" } else { "b" }),
                )
            })
            .collect();
        let plan = Plan {
            concurrency: 16,
            retry_every: None,
            until: Duration::from_secs(30),
        };
        let started = Instant::now();
        let report = schedule(world.clone(), &targets, plan, |_, _| {}).await;
        assert!(
            report
                .recipients
                .iter()
                .all(|r| r.attempt_count == 1 && r.status == Status::Greylisted)
        );
        assert_eq!(report.totals.greylisted, 20);
        // Two servers, ten sessions each, one at a time on each: 10 x 50 ms.
        assert_eq!(world.max_total.load(Ordering::SeqCst), 2);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }
}
