//! Benchmark tools behind `greygate bench`: a Postfix policy load generator, a null responder
//! (the protocol's ceiling) and a bulk preloader for scale tests of the embedded store.
//!
//! The load generator behaves like Postfix's smtpd processes: each connection sends one request
//! and waits for its reply before the next. Closed loop (as fast as replies come) measures
//! capacity; open loop (`rate`) sends on a fixed schedule and measures latency from the
//! *scheduled* send time, so a stalled server cannot hide its stall by slowing the generator
//! down (coordinated omission).
//!
//! Every connection draws its requests from its own deterministic stream (seed, connection
//! number), so two targets driven with the same seed see the same requests per connection
//! whatever their speed. The generator shares the CPU with the server it measures, so the hot
//! path re-uses buffers and copies pre-encoded blocks instead of formatting.

use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::engine::{ClientRecord, Engine};
use crate::proto::policy::{Decoder, Limits, encode_response};
use crate::server::ListenAddr;
use crate::store::{EmbeddedStore, Store, StoreError};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("no connection survived: {0}")]
    AllConnectionsFailed(String),
    #[error("invalid benchmark options: {0}")]
    Options(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Why one connection stopped early; counted, and the run goes on with the others.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("reply longer than {MAX_REPLY} bytes")]
    ReplyTooLong,
}

/// Replies are one short `action=` line; anything longer is a broken peer, not a reply.
const MAX_REPLY: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64: tiny, fast and fully determined by its seed, which is all a load stream needs
/// (no cryptographic quality, no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A generator for stream `n` of `seed`; streams of one seed do not overlap in practice.
    pub fn stream(seed: u64, n: u64) -> Self {
        let mut r = Rng(seed ^ n.wrapping_add(1).wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-high instead of a biased modulo.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `pct` percent.
    fn percent(&mut self, pct: u8) -> bool {
        self.below(100) < u64::from(pct)
    }
}

// ---------------------------------------------------------------------------------------------
// The request stream
// ---------------------------------------------------------------------------------------------

/// Shares of the request stream, in percent (they add up to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mix {
    /// First sightings of a new triplet.
    pub new: u8,
    /// Repeats of a triplet this connection sent earlier in the run.
    pub retry: u8,
    /// Mail to `postmaster@`/`abuse@`, which greygate and postgrey both allow by default.
    pub allowed: u8,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            new: 30,
            retry: 50,
            allowed: 20,
        }
    }
}

impl FromStr for Mix {
    type Err = String;
    /// `NEW,RETRY,ALLOWED` in percent, e.g. `30,50,20`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [new, retry, allowed] = parts[..] else {
            return Err(format!("mix {s:?} must be NEW,RETRY,ALLOWED percentages"));
        };
        let pct = |p: &str| {
            p.parse::<u8>()
                .map_err(|_| format!("mix share {p:?} is not a percentage"))
        };
        let mix = Mix {
            new: pct(new)?,
            retry: pct(retry)?,
            allowed: pct(allowed)?,
        };
        let sum = u32::from(mix.new) + u32::from(mix.retry) + u32::from(mix.allowed);
        if sum != 100 {
            return Err(format!("mix {s:?} adds up to {sum}, not 100"));
        }
        Ok(mix)
    }
}

/// The kind of request the stream produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    New,
    Retry,
    Allowed,
}

/// What shapes a request stream besides its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StreamConfig {
    pub mix: Mix,
    /// Share of IPv6 clients, in percent.
    pub ipv6: u8,
    /// How many recent new triplets a connection remembers for retries. Postfix retries
    /// come minutes after the first attempt, long after many other requests.
    pub retry_pool: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            mix: Mix::default(),
            ipv6: 20,
            retry_pool: 4096,
        }
    }
}

// The attributes around the client/sender/recipient block, in the order and number (29) of
// the request captured from Postfix 3.7 (shared/fixtures), with TLS as most MX traffic has now.
const HEAD: &[u8] = b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n";
const MIDDLE: &[u8] = b"recipient_count=0\nqueue_id=\ninstance=";
const TAIL: &[u8] =
    b"\nsize=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n\
ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\n\
policy_context=\n\n";

/// One connection's deterministic request stream.
///
/// A triplet's attribute block (client address and names, HELO, sender, recipient) is encoded
/// once when the triplet is new; a retry copies the stored block, so most requests cost a
/// few `memcpy`s and a counter.
pub struct RequestStream {
    rng: Rng,
    config: StreamConfig,
    /// Encoded blocks of recent new triplets; a ring of at most `retry_pool` entries.
    pool: Vec<Box<[u8]>>,
    pool_next: usize,
    /// Scratch space for a block that is not kept (allowed mail).
    scratch: Vec<u8>,
    /// Postfix's `instance` differs per SMTP session; a per-connection counter is enough.
    instance: u64,
    conn: u64,
}

impl RequestStream {
    pub fn new(seed: u64, conn: u64, config: StreamConfig) -> Self {
        RequestStream {
            rng: Rng::stream(seed, conn),
            config,
            pool: Vec::with_capacity(config.retry_pool.min(1 << 16)),
            pool_next: 0,
            scratch: Vec::with_capacity(512),
            instance: 0,
            conn,
        }
    }

    /// Appends the next request's bytes to `out` and says what kind it is. A retry before any
    /// triplet exists becomes a new triplet, so the stream stays deterministic.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Kind {
        let m = self.config.mix;
        let roll = self.rng.below(100);
        let mut kind = if roll < u64::from(m.new) {
            Kind::New
        } else if roll < u64::from(m.new) + u64::from(m.retry) {
            Kind::Retry
        } else {
            Kind::Allowed
        };
        if kind == Kind::Retry && self.pool.is_empty() {
            kind = Kind::New;
        }
        out.extend_from_slice(HEAD);
        match kind {
            Kind::New => {
                let mut block = Vec::with_capacity(320);
                self.triplet_block(&mut block, false);
                out.extend_from_slice(&block);
                self.remember(block.into_boxed_slice());
            }
            Kind::Retry => {
                let i = self.rng.below(self.pool.len() as u64) as usize;
                out.extend_from_slice(&self.pool[i]);
            }
            Kind::Allowed => {
                let mut block = std::mem::take(&mut self.scratch);
                block.clear();
                self.triplet_block(&mut block, true);
                out.extend_from_slice(&block);
                self.scratch = block;
            }
        }
        out.extend_from_slice(MIDDLE);
        self.instance += 1;
        push_hex(out, self.conn);
        out.push(b'.');
        push_hex(out, self.instance);
        out.extend_from_slice(TAIL);
        kind
    }

    fn remember(&mut self, block: Box<[u8]>) {
        if self.config.retry_pool == 0 {
            return;
        }
        if self.pool.len() < self.config.retry_pool {
            self.pool.push(block);
        } else {
            self.pool[self.pool_next] = block;
            self.pool_next = (self.pool_next + 1) % self.config.retry_pool;
        }
    }

    /// Client address, names, HELO, sender and recipient lines of a fresh random triplet.
    fn triplet_block(&mut self, out: &mut Vec<u8>, allowed: bool) {
        let r = &mut self.rng;
        // Client addresses come from documentation/private ranges with many client groups
        // (65,536 IPv4 /24s and IPv6 /64s), so neither server sees an unrealistically small set.
        let ip: IpAddr = if r.percent(self.config.ipv6) {
            let group = r.below(1 << 16) as u16;
            let host = r.below(1 << 16) as u16;
            Ipv6Addr::new(0x2001, 0xdb8, 0x4000, group, 0, 0, 0, host).into()
        } else {
            let v = r.next_u64() as u32;
            Ipv4Addr::from(0x0a00_0000 | (v & 0x00ff_ffff)).into()
        };
        let named = r.percent(70);
        let host = r.below(1 << 20);
        let domain = r.below(50_000);
        let sender_kind = r.below(100);
        let user = r.below(1000);
        let tag = r.below(1 << 32);
        let rcpt_domain = r.below(100);
        let rcpt_user = r.below(100_000);
        let special = if r.percent(50) { "postmaster" } else { "abuse" };

        // Formatting into a String cannot fail.
        let mut w = String::with_capacity(320);
        let _ = writeln!(w, "client_address={ip}");
        if named {
            let _ = write!(
                w,
                "client_name=mx{host:x}.s{domain}.example\nclient_port={}\n\
                 reverse_client_name=mx{host:x}.s{domain}.example\n",
                1024 + host % 60_000
            );
        } else {
            let _ = writeln!(
                w,
                "client_name=unknown\nclient_port={}\nreverse_client_name=unknown",
                1024 + host % 60_000
            );
        }
        let _ = writeln!(
            w,
            "server_address=192.0.2.25\nserver_port=25\nhelo_name=mx{host:x}.s{domain}.example"
        );
        // Sender shapes that exercise normalisation the way real traffic does.
        let _ = match sender_kind {
            0..55 => writeln!(w, "sender=u{user}@s{domain}.example"),
            55..70 => writeln!(w, "sender=u{user}+news{}@s{domain}.example", tag % 100),
            70..85 => writeln!(
                w,
                "sender=bounce-{}-{user}@list{domain}.example",
                tag % 1_000_000
            ),
            85..90 => writeln!(w, "sender=prvs={tag:08x}=u{user}@s{domain}.example"),
            _ => writeln!(w, "sender="),
        };
        if allowed {
            let _ = writeln!(w, "recipient={special}@d{rcpt_domain}.example");
        } else {
            let _ = writeln!(w, "recipient=r{rcpt_user}@d{rcpt_domain}.example");
        }
        out.extend_from_slice(w.as_bytes());
    }
}

fn push_hex(out: &mut Vec<u8>, v: u64) {
    let mut digits = [0u8; 16];
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

// ---------------------------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------------------------

/// Sub-buckets per power of two: values are kept to within 1/64 (1.6 %) of what was recorded.
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const HALF: usize = SUB / 2;
const BUCKETS: usize = (64 - SUB_BITS as usize) * HALF + SUB;

/// A log-linear histogram of nanoseconds (the HdrHistogram layout, fixed precision): constant
/// memory and O(1) recording whatever the run length, so it cannot become the bottleneck.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros()) - (SUB_BITS - 1);
        shift as usize * HALF + (v >> shift) as usize
    }

    /// The highest value that falls into bucket `i`.
    fn high(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let shift = i / HALF - 1;
        let m = (i - shift * HALF) as u64;
        // The last bucket ends at u64::MAX: compute in u128 so its top does not overflow.
        let top = (u128::from(m) + 1) << shift;
        u64::try_from(top - 1).unwrap_or(u64::MAX)
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The nearest-rank percentile (`p` in 0..=100), reported as the top of its bucket, so
    /// never below the true value and at most 1/64 above it; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::high(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Percentiles in microseconds for reports.
    pub fn summary(&self) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50: us(self.percentile(50.0)),
            p90: us(self.percentile(90.0)),
            p99: us(self.percentile(99.0)),
            p999: us(self.percentile(99.9)),
            max: us(self.max),
            mean: self.mean() / 1000.0,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

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
    fn count(&mut self, k: Kind) {
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
struct ConnStats {
    latency: Histogram,
    /// Open loop: scheduled send to reply, the generator's own lateness included.
    raw: Histogram,
    /// Open loop: how long after the server allowed it a request went out.
    lag: Histogram,
    replies: Replies,
    sent: Sent,
    /// When the last measured reply arrived.
    last: Option<Instant>,
    error: Option<ConnError>,
}

impl ConnStats {
    fn new() -> Self {
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
struct Control {
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
    fn admit(&self, at: Instant) -> Option<bool> {
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

/// The value of `name=` in an encoded policy request (the stream's requests are built for
/// the policy protocol; the milter mode replays the same triplets).
fn attribute<'a>(req: &'a [u8], name: &str) -> &'a str {
    req.split(|&b| b == b'\n')
        .find_map(|line| {
            line.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

/// One MTA-like milter client: negotiate once; per request a session of connect, HELO,
/// MAIL and RCPT, each waiting for its reply, then abort and quit-new-connection.
async fn milter_conn<S>(mut s: S, mut stream: RequestStream, ctl: &Control) -> ConnStats
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use crate::proto::milter::{Command, Decoded, Family, Reply, decode_reply};
    let mut stats = ConnStats::new();
    let mut req = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(512);
    let mut inbuf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    let mut pending = vec![Command::OptNeg {
        version: 6,
        actions: 0x1ff,
        protocol: 0x1f_ffff,
    }];
    loop {
        let t0 = Instant::now();
        let Some(measured) = ctl.admit(t0) else { break };
        req.clear();
        let kind = stream.next_into(&mut req);
        let ip = attribute(&req, "client_address");
        let family = if ip.contains(':') {
            Family::Inet6
        } else {
            Family::Inet
        };
        let steps = [
            Command::Connect {
                hostname: attribute(&req, "client_name").to_string(),
                family,
                port: 25,
                address: ip.to_string(),
            },
            Command::Helo(attribute(&req, "helo_name").to_string()),
            Command::Mail(vec![format!("<{}>", attribute(&req, "sender"))]),
            Command::Rcpt(vec![format!("<{}>", attribute(&req, "recipient"))]),
        ];
        let commands: Vec<Command> = pending.drain(..).chain(steps).collect();
        let result = async {
            let mut last = Reply::Continue;
            for cmd in &commands {
                out.clear();
                cmd.encode(&mut out);
                s.write_all(&out).await?;
                if matches!(cmd, Command::Abort | Command::QuitNewConnection) {
                    continue;
                }
                last = loop {
                    match decode_reply(&inbuf, MAX_REPLY) {
                        Ok(Decoded::Frame(r, used)) => {
                            inbuf.drain(..used);
                            break r;
                        }
                        Ok(Decoded::Incomplete) => {}
                        Err(_) => return Err(ConnError::ReplyTooLong),
                    }
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(ConnError::Closed);
                    }
                    inbuf.extend_from_slice(&chunk[..n]);
                };
            }
            Ok(last)
        }
        .await;
        let t1 = Instant::now();
        // Abort the message and start a new SMTP session on the same milter connection;
        // neither gets a reply, so they go out with the next session's first command.
        pending.extend([Command::Abort, Command::QuitNewConnection]);
        match result {
            Ok(reply) => {
                if measured {
                    stats.latency.record(nanos(t1 - t0));
                    match reply {
                        Reply::Continue | Reply::Accept => stats.replies.dunno += 1,
                        Reply::ReplyCode(_) | Reply::Tempfail => stats.replies.defer += 1,
                        _ => stats.replies.other += 1,
                    }
                    stats.sent.count(kind);
                    stats.last = Some(t1);
                }
            }
            Err(e) => {
                stats.error = Some(e);
                break;
            }
        }
    }
    stats
}

fn nanos(d: Duration) -> u64 {
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

// ---------------------------------------------------------------------------------------------
// Null responder
// ---------------------------------------------------------------------------------------------

/// Serves `action=DUNNO` to every request on `addr` until SIGINT or SIGTERM: the protocol's
/// ceiling. It decodes with the daemon's codec and keeps no state, so the difference to
/// greygate is the decision and the store. `ready` is called with the bound address.
///
/// # Errors
///
/// The address cannot be bound, or the runtime cannot start.
pub fn run_null_server(addr: &ListenAddr, ready: impl FnOnce(&str)) -> Result<(), BenchError> {
    // Same runtime flavour as the daemon (multi-thread, one worker per core), so the two are
    // compared on equal terms.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    rt.block_on(async {
        let listen_err = |source| BenchError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = match addr {
            ListenAddr::Tcp(a) => {
                NullListener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(listen_err)?)
            }
            ListenAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                NullListener::Unix(tokio::net::UnixListener::bind(p).map_err(listen_err)?, p)
            }
        };
        let bound = match &listener {
            NullListener::Tcp(l) => l.local_addr().map_err(listen_err)?.to_string(),
            NullListener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        ready(&bound);
        tokio::select! {
            () = null_accept(&listener) => {}
            () = shutdown_signal() => {}
        }
        if let NullListener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}

enum NullListener<'a> {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, &'a PathBuf),
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the default action (exit) still stops the process.
        _ => std::future::pending().await,
    }
}

async fn null_accept(listener: &NullListener<'_>) {
    loop {
        let accepted = match listener {
            NullListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                tokio::spawn(null_connection(s));
            }),
            NullListener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                tokio::spawn(null_connection(s));
            }),
        };
        if accepted.is_err() {
            // Out of descriptors and the like: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The daemon's connection loop without the decision: decode with the same bounded codec,
/// answer each request, write pipelined answers in one go.
async fn null_connection<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 8192];
    loop {
        let mut start = 0;
        loop {
            match decoder.decode(&buf[start..]) {
                Ok((used, req)) => {
                    start += used;
                    if req.is_none() {
                        break;
                    }
                    encode_response("DUNNO", &mut out);
                }
                Err(_) => return,
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Preload
// ---------------------------------------------------------------------------------------------

/// What a preload wrote and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct PreloadReport {
    pub path: String,
    pub triplets: u64,
    pub clients: u64,
    pub seconds: f64,
    pub file_bytes: u64,
}

/// One client record per this many triplets (senders send many mails per client group).
const TRIPLETS_PER_CLIENT: u64 = 20;

/// Writes `count` live triplets (and client groups) into the embedded store at `path`, the
/// way the daemon would have after weeks of traffic: records are made by the engine's own
/// steps at times spread over the retry window (pending) and `max_age` (passed), so none
/// expires during a benchmark, and committed in batches of `batch` through the store's flush.
///
/// # Errors
///
/// The store cannot be opened or written.
pub fn preload(
    path: &Path,
    count: u64,
    batch: u64,
    seed: u64,
    now: u64,
    mut progress: impl FnMut(u64),
) -> Result<PreloadReport, BenchError> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(BenchError::Runtime)?;
    let store = EmbeddedStore::open(path, now)?;
    let engine = Engine::default();
    let p = engine.policy.clone();
    let mut rng = Rng::stream(seed, u64::MAX);
    let mut clients = 0;
    rt.block_on(async {
        for i in 0..count {
            let group = i / TRIPLETS_PER_CLIENT;
            // Every fifth group is IPv6; IPv4 groups come from 10.0.0.0/8's 65,536 /24s, so
            // IPv4 groups repeat as busy senders' do.
            let ip: IpAddr = if group % 5 == 4 {
                Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    (group >> 16) as u16,
                    group as u16,
                    0,
                    0,
                    0,
                    1,
                )
                .into()
            } else {
                Ipv4Addr::from(0x0a00_0007 | ((group as u32 & 0xffff) << 8)).into()
            };
            let sender = format!("u{}@s{}.example", rng.below(1000), i % 50_000);
            let recipient = format!("r{i}@d{}.example", rng.below(100));
            let key = engine.key(ip, &sender, &recipient);
            // Two thirds passed (retried after the delay, then seen again within max_age), a
            // third still pending (first seen within the retry window): the shape of a
            // database in steady state, with expiry times spread so that few expire during
            // a benchmark.
            let record = if rng.below(3) < 2 {
                let first = now - p.delay - 3600 - rng.below(p.max_age * 9 / 10);
                let (_, pending) = engine.triplet_step(None, first, engine.policy.delay);
                let passed_at = first + p.delay + rng.below(3600);
                let (_, passed) =
                    engine.triplet_step(Some(&pending), passed_at, engine.policy.delay);
                let seen = passed_at + rng.below(now - passed_at);
                engine
                    .triplet_step(Some(&passed), seen, engine.policy.delay)
                    .1
            } else {
                let first = now - rng.below(p.retry_window);
                engine.triplet_step(None, first, engine.policy.delay).1
            };
            store.update_triplet(&key, &|_| Some(record)).await?;
            if i % TRIPLETS_PER_CLIENT == 0 {
                let seen = now - rng.below(p.auto_allow_lifetime / 2);
                let passes = rng.below(10) as u32;
                let rec = ClientRecord {
                    passes,
                    last_counted: seen,
                    last_seen: seen,
                    expires_at: seen + p.auto_allow_lifetime,
                };
                // Client groups repeat (IPv4 has 65,536 of them here): count distinct ones.
                if store
                    .update_client(&key.client, &|_| Some(rec))
                    .await?
                    .is_none()
                {
                    clients += 1;
                }
            }
            if (i + 1) % batch == 0 {
                store.flush().await?;
                progress(i + 1);
            }
        }
        store.flush_fully().await?;
        Ok::<_, BenchError>(())
    })?;
    drop(store);
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(PreloadReport {
        path: path.display().to_string(),
        triplets: count,
        clients,
        seconds: started.elapsed().as_secs_f64(),
        file_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::policy::PolicyRequest;

    fn decode_one(bytes: &[u8]) -> PolicyRequest {
        let mut d = Decoder::new(Limits::default());
        let (used, req) = d.decode(bytes).expect("request decodes");
        assert_eq!(used, bytes.len(), "exactly one request");
        req.expect("complete request")
    }

    fn take(stream: &mut RequestStream, n: usize) -> Vec<(Kind, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let mut buf = Vec::new();
                let k = stream.next_into(&mut buf);
                (k, buf)
            })
            .collect()
    }

    #[test]
    fn stream_is_determined_by_seed_and_connection() {
        let cfg = StreamConfig::default();
        let a = take(&mut RequestStream::new(7, 3, cfg), 5000);
        let b = take(&mut RequestStream::new(7, 3, cfg), 5000);
        assert_eq!(a, b);
        let other_conn = take(&mut RequestStream::new(7, 4, cfg), 5000);
        let other_seed = take(&mut RequestStream::new(8, 3, cfg), 5000);
        assert_ne!(a, other_conn);
        assert_ne!(a, other_seed);
    }

    #[test]
    fn requests_look_like_postfix_and_follow_the_mix() {
        let cfg = StreamConfig::default();
        let mut stream = RequestStream::new(1, 0, cfg);
        let mut seen = std::collections::HashSet::new();
        let (mut new, mut retry, mut allowed, mut v6) = (0, 0, 0, 0);
        const N: usize = 100_000;
        for (kind, bytes) in take(&mut stream, N) {
            let req = decode_one(&bytes);
            assert_eq!(req.len(), 29, "as many attributes as Postfix 3.7 sends");
            assert_eq!(req.get("request"), Some("smtpd_access_policy"));
            assert_eq!(req.get("protocol_state"), Some("RCPT"));
            let ip: IpAddr = req
                .get("client_address")
                .and_then(|a| a.parse().ok())
                .expect("client address");
            v6 += usize::from(ip.is_ipv6());
            let triplet = (
                ip,
                req.get("sender").expect("sender").to_owned(),
                req.get("recipient").expect("recipient").to_owned(),
            );
            let recipient = triplet.2.clone();
            match kind {
                Kind::New => {
                    new += 1;
                    seen.insert(triplet);
                }
                Kind::Retry => {
                    retry += 1;
                    assert!(
                        seen.contains(&triplet),
                        "a retry repeats an earlier triplet"
                    );
                }
                Kind::Allowed => {
                    allowed += 1;
                    assert!(
                        recipient.starts_with("postmaster@") || recipient.starts_with("abuse@"),
                        "{recipient}"
                    );
                }
            }
        }
        let pct = |n: usize| n as f64 * 100.0 / N as f64;
        assert!((pct(new) - 30.0).abs() < 1.0, "new {}", pct(new));
        assert!((pct(retry) - 50.0).abs() < 1.0, "retry {}", pct(retry));
        assert!(
            (pct(allowed) - 20.0).abs() < 1.0,
            "allowed {}",
            pct(allowed)
        );
        // IPv6 share is of triplets drawn, retries repeat their triplet's family.
        assert!((pct(v6) - 20.0).abs() < 2.0, "ipv6 {}", pct(v6));
    }

    #[test]
    fn first_retry_without_a_triplet_becomes_new() {
        let cfg = StreamConfig {
            mix: Mix {
                new: 0,
                retry: 100,
                allowed: 0,
            },
            ..StreamConfig::default()
        };
        let mut s = RequestStream::new(1, 0, cfg);
        let kinds: Vec<Kind> = take(&mut s, 3).into_iter().map(|(k, _)| k).collect();
        assert_eq!(kinds, [Kind::New, Kind::Retry, Kind::Retry]);
    }

    #[test]
    fn retry_pool_is_bounded() {
        let cfg = StreamConfig {
            retry_pool: 8,
            ..StreamConfig::default()
        };
        let mut s = RequestStream::new(1, 0, cfg);
        take(&mut s, 1000);
        assert_eq!(s.pool.len(), 8);
    }

    #[test]
    fn mix_parses_and_checks_the_sum() {
        assert_eq!("30,50,20".parse(), Ok(Mix::default()));
        assert_eq!(
            " 100 ,0,0".parse(),
            Ok(Mix {
                new: 100,
                retry: 0,
                allowed: 0
            })
        );
        assert!("30,50,21".parse::<Mix>().is_err());
        assert!("30,50".parse::<Mix>().is_err());
        assert!("a,b,c".parse::<Mix>().is_err());
    }

    /// The exact nearest-rank percentile of sorted values.
    fn exact(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank - 1]
    }

    #[test]
    fn percentiles_are_within_bucket_precision() {
        let mut rng = Rng::new(42);
        let mut values: Vec<u64> = (0..50_000)
            .map(|i| match i % 3 {
                0 => rng.below(200),
                1 => 10_000 + rng.below(90_000),
                _ => rng.below(5_000_000_000),
            })
            .collect();
        let mut h = Histogram::new();
        for &v in &values {
            h.record(v);
        }
        values.sort_unstable();
        for p in [0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0] {
            let want = exact(&values, p);
            let got = h.percentile(p);
            assert!(got >= want, "p{p}: {got} < {want}");
            assert!(
                got as f64 <= want as f64 * (1.0 + 1.0 / 64.0) + 1.0,
                "p{p}: {got} too far above {want}"
            );
        }
        assert_eq!(h.percentile(100.0), *values.last().expect("values"));
        assert_eq!(h.count(), 50_000);
    }

    #[test]
    fn histogram_small_values_are_exact_and_merge_adds() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 1..=100 {
            a.record(v);
        }
        assert_eq!(a.percentile(50.0), 50);
        assert_eq!(a.percentile(99.0), 99);
        b.record(u64::MAX);
        a.merge(&b);
        assert_eq!(a.count(), 101);
        assert_eq!(a.max(), u64::MAX);
        assert_eq!(a.percentile(100.0), u64::MAX);
        assert_eq!(Histogram::new().percentile(99.0), 0);
    }

    #[test]
    fn bucket_bounds_are_contiguous() {
        for i in 1..BUCKETS {
            assert_eq!(
                Histogram::index(Histogram::high(i - 1) + 1),
                i,
                "bucket {i}"
            );
            assert_eq!(Histogram::index(Histogram::high(i)), i, "bucket {i}");
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

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

    #[test]
    fn hex_counter() {
        let mut out = Vec::new();
        push_hex(&mut out, 0);
        out.push(b' ');
        push_hex(&mut out, 0xabc1);
        out.push(b' ');
        push_hex(&mut out, u64::MAX);
        assert_eq!(out, b"0 abc1 ffffffffffffffff");
    }
}
