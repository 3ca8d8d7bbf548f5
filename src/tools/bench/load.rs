//! The load drivers behind `greygate bench --target`: open- and closed-loop sending, the
//! per-connection bookkeeping shared with the milter client, and the report.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::histogram::{Histogram, Latency};
use super::milter::milter_conn;
use super::stream::{Kind, Mix, RequestStream, Rng, StreamConfig};
use super::{BenchError, ConnError, MAX_REPLY};
use crate::server::ListenAddr;

// ---------------------------------------------------------------------------------------------
// Open-loop schedule
// ---------------------------------------------------------------------------------------------

/// How scheduled sends are spaced in open-loop mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exponential gaps: independent mail arrivals, bursts included.
    Poisson,
    /// Equal gaps: the gentlest load for a given rate.
    Uniform,
}

impl FromStr for Arrival {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poisson" => Ok(Arrival::Poisson),
            "uniform" => Ok(Arrival::Uniform),
            _ => Err(format!("arrival {s:?} is not poisson or uniform")),
        }
    }
}

/// One connection's send times, as offsets from the start of the run. `connections`
/// schedules of rate R/connections together offer rate R (the sum of Poisson processes is
/// Poisson; uniform schedules are staggered by one gap each).
#[derive(Debug, Clone)]
pub struct Schedule {
    arrival: Arrival,
    /// Mean gap of this connection, in nanoseconds.
    gap: f64,
    next: f64,
    rng: Rng,
}

impl Schedule {
    /// The schedule of connection `conn` of `connections` that together offer `rate` requests/s.
    pub fn new(arrival: Arrival, rate: f64, connections: usize, conn: usize, seed: u64) -> Self {
        let gap = 1e9 * connections as f64 / rate;
        let mut s = Schedule {
            arrival,
            gap,
            next: 0.0,
            rng: Rng::stream(seed ^ 0x5eed_5c4e_d01e, conn as u64),
        };
        s.next = match arrival {
            Arrival::Uniform => 1e9 / rate * conn as f64,
            Arrival::Poisson => s.exp_gap(),
        };
        s
    }

    fn exp_gap(&mut self) -> f64 {
        // 1 - unit() is in (0, 1], so the logarithm is finite.
        -(1.0 - self.rng.unit()).ln() * self.gap
    }

    /// The next send time, as an offset from the start.
    pub fn next_send(&mut self) -> Duration {
        let at = Duration::from_nanos(self.next as u64);
        self.next += match self.arrival {
            Arrival::Uniform => self.gap,
            Arrival::Poisson => self.exp_gap(),
        };
        at
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// What the server answered, by the first word of the action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Replies {
    /// `DUNNO` (or `OK`): accepted or not greylisted.
    pub dunno: u64,
    /// `DEFER_IF_PERMIT`, `DEFER` or a 4xx code: greylisted.
    pub defer: u64,
    /// `PREPEND X-Greylist: ...`: passed after the delay.
    pub prepend: u64,
    pub other: u64,
}

impl Replies {
    /// Counts one reply (the bytes before its terminating empty line).
    fn count(&mut self, reply: &[u8]) {
        let action = reply.strip_prefix(b"action=").unwrap_or(reply);
        let word = action.split(|&b| b == b' ').next().unwrap_or(b"");
        match word {
            b"DUNNO" | b"OK" | b"dunno" | b"ok" => self.dunno += 1,
            b"DEFER_IF_PERMIT" | b"DEFER" | b"defer_if_permit" | b"defer" => self.defer += 1,
            w if w.first() == Some(&b'4') => self.defer += 1,
            b"PREPEND" | b"prepend" => self.prepend += 1,
            _ => self.other += 1,
        }
    }

    fn merge(&mut self, o: &Replies) {
        self.dunno += o.dunno;
        self.defer += o.defer;
        self.prepend += o.prepend;
        self.other += o.other;
    }
}

/// Requests sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sent {
    pub new: u64,
    pub retry: u64,
    pub allowed: u64,
}

impl Sent {
    pub(super) fn count(&mut self, k: Kind) {
        match k {
            Kind::New => self.new += 1,
            Kind::Retry => self.retry += 1,
            Kind::Allowed => self.allowed += 1,
        }
    }

    fn merge(&mut self, o: &Sent) {
        self.new += o.new;
        self.retry += o.retry;
        self.allowed += o.allowed;
    }
}

/// Bytes read from a connection, from which complete replies are taken.
struct ReplyBuf {
    buf: Vec<u8>,
    /// Bytes already searched for the terminator (a reply arriving in pieces is searched once).
    scanned: usize,
}

impl ReplyBuf {
    fn new() -> Self {
        ReplyBuf {
            buf: Vec::with_capacity(512),
            scanned: 0,
        }
    }

    /// Takes one complete reply off the front, if there is one, and counts it.
    fn take(&mut self, replies: &mut Replies) -> Result<bool, ConnError> {
        let from = self.scanned.saturating_sub(1);
        match self.buf[from..].windows(2).position(|w| w == b"\n\n") {
            Some(pos) => {
                let end = from + pos;
                replies.count(&self.buf[..end]);
                self.buf.drain(..end + 2);
                self.scanned = 0;
                Ok(true)
            }
            None if self.buf.len() > MAX_REPLY => Err(ConnError::ReplyTooLong),
            None => {
                self.scanned = self.buf.len();
                Ok(false)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many measured requests (warm-up excluded).
    Requests(u64),
    /// After this long measuring (warm-up excluded).
    Duration(Duration),
}

/// Everything a load run needs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Printed in reports, e.g. `greygate-embedded`.
    pub label: String,
    pub target: ListenAddr,
    pub connections: usize,
    pub stop: Stop,
    /// Requests in this first stretch are sent but not measured (caches, allocator, JIT-free
    /// but not cold-free servers).
    pub warmup: Duration,
    /// Open loop at this many requests/s offered; `None` is closed loop.
    pub rate: Option<f64>,
    pub arrival: Arrival,
    pub seed: u64,
    pub stream: StreamConfig,
    /// Closed-loop runtime threads: 1 is a current-thread runtime, which costs the server
    /// the least CPU on a small machine.
    pub threads: usize,
    /// The protocol spoken to the target.
    pub protocol: Protocol,
}

/// What the load generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Postfix policy delegation: one request per RCPT.
    Policy,
    /// Milter, as an MTA: per request a new session (connect, HELO, MAIL, RCPT), each
    /// waiting for its reply, then abort; the RCPT reply is the greylisting decision.
    Milter,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "policy" => Ok(Protocol::Policy),
            "milter" => Ok(Protocol::Milter),
            _ => Err(format!("{s:?} is not policy or milter")),
        }
    }
}

/// The result of a load run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    /// `closed` (as fast as replies come) or `open` (fixed offered rate).
    pub mode: &'static str,
    pub connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<f64>,
    pub seed: u64,
    pub mix: Mix,
    /// Measured seconds (warm-up excluded).
    pub seconds: f64,
    /// Measured requests answered.
    pub requests: u64,
    /// Requests answered per second.
    pub throughput: f64,
    /// Closed loop: send to reply. Open loop: scheduled send to reply, less the time the
    /// generator itself overslept (waiting for a slow previous reply counts).
    pub latency_us: Latency,
    /// Open loop: scheduled send to reply, the generator's oversleeping included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_latency_us: Option<Latency>,
    /// Open loop: how long the generator overslept before sending (its own error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_us: Option<Latency>,
    pub replies: Replies,
    pub sent: Sent,
    /// Connections that failed during the run.
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_us;
        let _ = writeln!(s, "target:      {} ({})", self.target, self.label);
        let _ = match self.offered_rate {
            Some(r) => writeln!(
                s,
                "mode:        open loop, {r:.0} requests/s offered, {} connections",
                self.connections
            ),
            None => writeln!(
                s,
                "mode:        closed loop, {} connections",
                self.connections
            ),
        };
        let _ = writeln!(
            s,
            "requests:    {} in {:.2} s = {:.0} requests/s",
            self.requests, self.seconds, self.throughput
        );
        let _ = writeln!(
            s,
            "latency:     p50 {} p90 {} p99 {} p99.9 {} max {} (mean {})",
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max),
            fmt_us(l.mean)
        );
        if let (Some(raw), Some(lag)) = (&self.scheduled_latency_us, &self.send_lag_us) {
            let _ = writeln!(
                s,
                "             (from the scheduled send time; waiting for a previous reply counts)"
            );
            let _ = writeln!(
                s,
                "send lag:    p50 {} p99 {} max {} (the generator oversleeping, left out above)",
                fmt_us(lag.p50),
                fmt_us(lag.p99),
                fmt_us(lag.max)
            );
            let _ = writeln!(
                s,
                "with lag:    p50 {} p99 {} p99.9 {} max {}",
                fmt_us(raw.p50),
                fmt_us(raw.p99),
                fmt_us(raw.p999),
                fmt_us(raw.max)
            );
        }
        let r = &self.replies;
        let _ = writeln!(
            s,
            "replies:     {} DUNNO, {} defer, {} PREPEND, {} other",
            r.dunno, r.defer, r.prepend, r.other
        );
        let t = &self.sent;
        let _ = writeln!(
            s,
            "sent:        {} new, {} retry, {} allowed (mix {}/{}/{}, seed {})",
            t.new, t.retry, t.allowed, self.mix.new, self.mix.retry, self.mix.allowed, self.seed
        );
        if self.errors > 0 {
            let _ = writeln!(
                s,
                "errors:      {} connections failed; first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        s
    }
}

/// `123 µs` below a millisecond, `1.23 ms` above.
fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// What one connection measured.
pub(super) struct ConnStats {
    pub(super) latency: Histogram,
    /// Open loop: scheduled send to reply, the generator's own lateness included.
    raw: Histogram,
    /// Open loop: how long after the server allowed it a request went out.
    lag: Histogram,
    pub(super) replies: Replies,
    pub(super) sent: Sent,
    /// When the last measured reply arrived.
    pub(super) last: Option<Instant>,
    pub(super) error: Option<ConnError>,
}

impl ConnStats {
    pub(super) fn new() -> Self {
        ConnStats {
            latency: Histogram::new(),
            raw: Histogram::new(),
            lag: Histogram::new(),
            replies: Replies::default(),
            sent: Sent::default(),
            last: None,
            error: None,
        }
    }
}

/// Shared by all connections of a run: when measuring starts and when to stop.
pub(super) struct Control {
    measure_from: Instant,
    end: Option<Instant>,
    /// Measured requests still to send (`Stop::Requests`).
    budget: Option<AtomicU64>,
    stopped: AtomicBool,
}

impl Control {
    fn new(start: Instant, opts: &LoadOptions) -> Self {
        let measure_from = start + opts.warmup;
        let (end, budget) = match opts.stop {
            Stop::Duration(d) => (Some(measure_from + d), None),
            Stop::Requests(n) => (None, Some(AtomicU64::new(n))),
        };
        Control {
            measure_from,
            end,
            budget,
            stopped: AtomicBool::new(false),
        }
    }

    /// Whether a request to be sent at `at` is to be sent, and whether it is measured.
    pub(super) fn admit(&self, at: Instant) -> Option<bool> {
        if self.stopped.load(Ordering::Relaxed) || self.end.is_some_and(|e| at >= e) {
            return None;
        }
        if at < self.measure_from {
            return Some(false);
        }
        if let Some(b) = &self.budget {
            // Claim one; the decrement that would go below zero ends the run.
            if b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
            {
                self.stopped.store(true, Ordering::Relaxed);
                return None;
            }
        }
        Some(true)
    }
}

/// Runs a load test and reports what it measured.
///
/// # Errors
///
/// Bad options, no connection to the target, or every connection failing.
pub fn run_load(opts: &LoadOptions) -> Result<Report, BenchError> {
    if opts.connections == 0 {
        return Err(BenchError::Options("connections must be at least 1".into()));
    }
    if opts.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(BenchError::Options("rate must be positive".into()));
    }
    if opts.protocol == Protocol::Milter && opts.rate.is_some() {
        return Err(BenchError::Options(
            "the milter mode runs closed loop only".into(),
        ));
    }
    let (stats, start) = match opts.rate {
        None => run_closed(opts)?,
        Some(rate) => run_open(opts, rate)?,
    };
    Ok(summarise(opts, stats, start))
}

fn summarise(opts: &LoadOptions, stats: Vec<ConnStats>, start: Instant) -> Report {
    let mut latency = Histogram::new();
    let mut raw = Histogram::new();
    let mut lag = Histogram::new();
    let mut replies = Replies::default();
    let mut sent = Sent::default();
    let mut errors = 0;
    let mut first_error = None;
    let mut last = None::<Instant>;
    for s in &stats {
        latency.merge(&s.latency);
        raw.merge(&s.raw);
        lag.merge(&s.lag);
        replies.merge(&s.replies);
        sent.merge(&s.sent);
        last = last.max(s.last);
        if let Some(e) = &s.error {
            errors += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    let measure_from = start + opts.warmup;
    let seconds = match opts.stop {
        Stop::Duration(d) if errors == 0 => d.as_secs_f64(),
        _ => last.map_or(0.0, |l| {
            l.saturating_duration_since(measure_from).as_secs_f64()
        }),
    };
    let requests = latency.count();
    Report {
        label: opts.label.clone(),
        target: opts.target.to_string(),
        mode: if opts.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        connections: opts.connections,
        offered_rate: opts.rate,
        seed: opts.seed,
        mix: opts.stream.mix,
        seconds,
        requests,
        throughput: if seconds > 0.0 {
            requests as f64 / seconds
        } else {
            0.0
        },
        latency_us: latency.summary(),
        scheduled_latency_us: opts.rate.map(|_| raw.summary()),
        send_lag_us: opts.rate.map(|_| lag.summary()),
        replies,
        sent,
        errors,
        first_error,
    }
}

/// A connected client socket, TCP or Unix.
enum AsyncConn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn connect_async(target: &ListenAddr) -> Result<AsyncConn, BenchError> {
    let err = |source| BenchError::Connect {
        target: target.to_string(),
        source,
    };
    match target {
        ListenAddr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await.map_err(err)?;
            // Postfix talks to policy servers without Nagle delays too.
            s.set_nodelay(true).map_err(err)?;
            Ok(AsyncConn::Tcp(s))
        }
        ListenAddr::Unix(p) => Ok(AsyncConn::Unix(
            tokio::net::UnixStream::connect(p).await.map_err(err)?,
        )),
    }
}

fn run_closed(opts: &LoadOptions) -> Result<(Vec<ConnStats>, Instant), BenchError> {
    let rt = if opts.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    }
    .map_err(BenchError::Runtime)?;
    rt.block_on(async {
        // Connect everything first so the measured window has all connections busy.
        let mut conns = Vec::with_capacity(opts.connections);
        for _ in 0..opts.connections {
            conns.push(connect_async(&opts.target).await?);
        }
        let start = Instant::now();
        let ctl = Arc::new(Control::new(start, opts));
        let mut tasks = Vec::with_capacity(conns.len());
        for (i, conn) in conns.into_iter().enumerate() {
            let stream = RequestStream::new(opts.seed, i as u64, opts.stream);
            let ctl = ctl.clone();
            let protocol = opts.protocol;
            tasks.push(tokio::spawn(async move {
                match (conn, protocol) {
                    (AsyncConn::Tcp(s), Protocol::Policy) => closed_conn(s, stream, &ctl).await,
                    (AsyncConn::Unix(s), Protocol::Policy) => closed_conn(s, stream, &ctl).await,
                    (AsyncConn::Tcp(s), Protocol::Milter) => milter_conn(s, stream, &ctl).await,
                    (AsyncConn::Unix(s), Protocol::Milter) => milter_conn(s, stream, &ctl).await,
                }
            }));
        }
        let mut stats = Vec::with_capacity(tasks.len());
        for t in tasks {
            match t.await {
                Ok(s) => stats.push(s),
                Err(e) => return Err(BenchError::AllConnectionsFailed(e.to_string())),
            }
        }
        check_survivors(&stats)?;
        Ok((stats, start))
    })
}

fn check_survivors(stats: &[ConnStats]) -> Result<(), BenchError> {
    if stats.iter().all(|s| s.error.is_some()) {
        let first = stats
            .iter()
            .find_map(|s| s.error.as_ref())
            .map_or_else(String::new, ToString::to_string);
        return Err(BenchError::AllConnectionsFailed(first));
    }
    Ok(())
}

/// One Postfix-like client: send, wait for the reply, repeat.
async fn closed_conn<S>(mut s: S, mut stream: RequestStream, ctl: &Control) -> ConnStats
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = ConnStats::new();
    let mut req = Vec::with_capacity(1024);
    let mut rb = ReplyBuf::new();
    let mut chunk = [0u8; 2048];
    loop {
        let t0 = Instant::now();
        let Some(measured) = ctl.admit(t0) else { break };
        req.clear();
        let kind = stream.next_into(&mut req);
        let result = async {
            s.write_all(&req).await?;
            let mut replies = Replies::default();
            while !rb.take(&mut replies)? {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ConnError::Closed);
                }
                rb.buf.extend_from_slice(&chunk[..n]);
            }
            Ok(replies)
        }
        .await;
        let t1 = Instant::now();
        match result {
            Ok(replies) if measured => {
                stats.latency.record(nanos(t1 - t0));
                stats.replies.merge(&replies);
                stats.sent.count(kind);
                stats.last = Some(t1);
            }
            Ok(_) => {}
            Err(e) => {
                stats.error = Some(e);
                break;
            }
        }
    }
    stats
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A blocking client socket for the open loop.
trait SyncConn: Read + Write + Send {}
impl<T: Read + Write + Send> SyncConn for T {}

fn connect_sync(target: &ListenAddr) -> Result<Box<dyn SyncConn>, BenchError> {
    let err = |source| BenchError::Connect {
        target: target.to_string(),
        source,
    };
    Ok(match target {
        ListenAddr::Tcp(a) => {
            let s = std::net::TcpStream::connect(a).map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            Box::new(s)
        }
        ListenAddr::Unix(p) => Box::new(std::os::unix::net::UnixStream::connect(p).map_err(err)?),
    })
}

/// Open loop on one OS thread per connection: `thread::sleep` wakes within tens of
/// microseconds, where tokio's timer wheel rounds every deadline up to the next millisecond,
/// which would add up to 1 ms of generator error to the very percentiles being measured.
/// At the offered rates of interest (thousands per second) the threads cost little.
fn run_open(opts: &LoadOptions, rate: f64) -> Result<(Vec<ConnStats>, Instant), BenchError> {
    let mut conns = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        conns.push(connect_sync(&opts.target)?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let ctl = Arc::new(Control::new(start, opts));
    let mut threads = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        let stream = RequestStream::new(opts.seed, i as u64, opts.stream);
        let schedule = Schedule::new(opts.arrival, rate, opts.connections, i, opts.seed);
        let ctl = ctl.clone();
        let t = std::thread::Builder::new()
            .name(format!("bench-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || open_conn(conn, stream, schedule, start, &ctl))
            .map_err(BenchError::Runtime)?;
        threads.push(t);
    }
    let mut stats = Vec::with_capacity(threads.len());
    for t in threads {
        stats
            .push(t.join().map_err(|_| {
                BenchError::AllConnectionsFailed("a sender thread panicked".into())
            })?);
    }
    check_survivors(&stats)?;
    Ok((stats, start))
}

fn open_conn(
    mut s: Box<dyn SyncConn>,
    mut stream: RequestStream,
    mut schedule: Schedule,
    start: Instant,
    ctl: &Control,
) -> ConnStats {
    reduce_timer_slack();
    let mut stats = ConnStats::new();
    let mut req = Vec::with_capacity(1024);
    let mut rb = ReplyBuf::new();
    let mut chunk = [0u8; 2048];
    let mut prev_done = start;
    loop {
        let at = start + schedule.next_send();
        let Some(measured) = ctl.admit(at) else { break };
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        req.clear();
        let kind = stream.next_into(&mut req);
        let sent_at = Instant::now();
        // The earliest the server let this request go out: its scheduled time, or the
        // previous reply if that came later (the wait the server caused).
        let ready = at.max(prev_done);
        let result = (|| {
            s.write_all(&req)?;
            let mut replies = Replies::default();
            while !rb.take(&mut replies)? {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(ConnError::Closed);
                }
                rb.buf.extend_from_slice(&chunk[..n]);
            }
            Ok(replies)
        })();
        let done = Instant::now();
        prev_done = done;
        match result {
            Ok(replies) if measured => {
                // Time waiting for the previous reply is the server's latency too (this is
                // what avoids coordinated omission); time this thread overslept is not.
                let lag = sent_at.saturating_duration_since(ready);
                let from_schedule = done.saturating_duration_since(at);
                stats
                    .latency
                    .record(nanos(from_schedule.saturating_sub(lag)));
                stats.raw.record(nanos(from_schedule));
                stats.lag.record(nanos(lag));
                stats.replies.merge(&replies);
                stats.sent.count(kind);
                stats.last = Some(done);
            }
            Ok(_) => {}
            Err(e) => {
                stats.error = Some(e);
                break;
            }
        }
    }
    stats
}

/// Linux lets a sleeping thread wake up to 50 µs late by default ("timer slack") to batch
/// wake-ups. This thread measures sub-millisecond latencies from its wake-up time, so it asks
/// for 1 µs instead; where the file is missing or not writable the default stays.
fn reduce_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this thread's
    // timer slack; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_schedule_is_evenly_staggered() {
        // 4 connections sharing 1000/s: each sends every 4 ms, offset by 1 ms from the next.
        let mut all: Vec<Duration> = (0..4)
            .flat_map(|c| {
                let mut s = Schedule::new(Arrival::Uniform, 1000.0, 4, c, 1);
                (0..250).map(move |_| s.next_send())
            })
            .collect();
        all.sort();
        for (i, t) in all.iter().enumerate() {
            assert_eq!(t.as_nanos(), i as u128 * 1_000_000, "send {i}");
        }
    }

    #[test]
    fn poisson_schedule_has_the_offered_rate() {
        let mut s = Schedule::new(Arrival::Poisson, 5000.0, 64, 3, 9);
        let n = 200_000;
        let mut last = Duration::ZERO;
        let mut gaps = Vec::with_capacity(n);
        for _ in 0..n {
            let t = s.next_send();
            assert!(t >= last, "send times never go back");
            gaps.push((t - last).as_secs_f64());
            last = t;
        }
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let want = 64.0 / 5000.0;
        assert!(
            (mean / want - 1.0).abs() < 0.02,
            "mean gap {mean} vs {want}"
        );
        // Exponential gaps: standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (var.sqrt() / mean - 1.0).abs() < 0.03,
            "cv {}",
            var.sqrt() / mean
        );
        let mut again = Schedule::new(Arrival::Poisson, 5000.0, 64, 3, 9);
        let mut first = Schedule::new(Arrival::Poisson, 5000.0, 64, 3, 9);
        for _ in 0..100 {
            assert_eq!(again.next_send(), first.next_send());
        }
    }

    #[test]
    fn replies_are_classified_by_action() {
        let mut r = Replies::default();
        for reply in [
            &b"action=DUNNO"[..],
            b"action=DEFER_IF_PERMIT Greylisted, please try again in 300 seconds",
            b"action=451 4.7.1 Greylisted",
            b"action=PREPEND X-Greylist: delayed 312 seconds by greygate",
            b"action=REJECT no",
        ] {
            r.count(reply);
        }
        assert_eq!(
            r,
            Replies {
                dunno: 1,
                defer: 2,
                prepend: 1,
                other: 1
            }
        );
    }

    #[test]
    fn reply_buffer_takes_replies_split_anywhere() {
        let wire = b"action=DUNNO\n\naction=DEFER_IF_PERMIT x\n\n";
        for split in 0..wire.len() {
            let mut rb = ReplyBuf::new();
            let mut r = Replies::default();
            let mut taken = 0;
            for part in [&wire[..split], &wire[split..]] {
                rb.buf.extend_from_slice(part);
                while rb.take(&mut r).expect("bounded") {
                    taken += 1;
                }
            }
            assert_eq!(taken, 2, "split at {split}");
            assert_eq!((r.dunno, r.defer), (1, 1));
        }
        let mut rb = ReplyBuf::new();
        rb.buf = vec![b'x'; MAX_REPLY + 1];
        assert!(rb.take(&mut Replies::default()).is_err());
    }
}
