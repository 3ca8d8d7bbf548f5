//! The deterministic request stream: its random numbers, the request mix and the encoded
//! Postfix policy requests each connection sends.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Serialize;

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
    /// How many sender domains new triplets draw from (uniformly): fewer means more of
    /// them already known to DNS caches, as a site's regular correspondents are.
    pub domains: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            mix: Mix::default(),
            ipv6: 20,
            retry_pool: 4096,
            domains: 50_000,
        }
    }
}

// The attributes around the client/sender/recipient block, in the order and number (29) of
// the request captured from Postfix 3.7 (tests/fixtures), with TLS as most MX traffic has now.
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
        let domain = r.below(self.config.domains.max(1));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::policy::{Decoder, Limits, PolicyRequest};

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
    fn sender_domains_come_from_the_configured_number() {
        let cfg = StreamConfig {
            domains: 3,
            ..StreamConfig::default()
        };
        let mut s = RequestStream::new(1, 0, cfg);
        let mut seen = std::collections::BTreeSet::new();
        for (_, block) in take(&mut s, 2000) {
            let text = String::from_utf8_lossy(&block).into_owned();
            if let Some(line) = text
                .lines()
                .find(|l| l.starts_with("sender=") && l.contains('@'))
            {
                let domain = line.rsplit('@').next().unwrap_or_default();
                seen.insert(
                    domain
                        .trim_start_matches("list")
                        .trim_start_matches('s')
                        .to_string(),
                );
            }
        }
        let expected: std::collections::BTreeSet<String> = ["0.example", "1.example", "2.example"]
            .map(String::from)
            .into();
        assert_eq!(seen, expected);
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
