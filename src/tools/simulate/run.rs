//! The simulation: every message of every sender class, its attempts in time order on one
//! simulated clock, each attempt decided by the real engine over an in-memory state.
//!
//! Messages and every random choice (arrival, sender, recipient, the pool address of each
//! attempt, the queue runner's phase) are drawn once from the seed and replayed unchanged
//! for each configuration, so configurations differ only in what the engine decides.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use crate::engine::{
    ClientRecord, Decision, Engine, HostName, IdentityFacts, Listing, NewTriplets, Request,
    SpfFact, State, Triplet, TripletKey, Verdict,
};
use crate::tools::bench::Rng;

use super::report::{ClassInfo, ClassResult, ConfigResult, Report};
use super::scenario::{IpModel, PtrKind, Scenario, SenderClass, SimConfig};

/// The stored state of a simulated site: what a store backend would hold.
#[derive(Debug, Default)]
pub struct MemState {
    triplets: HashMap<TripletKey, Triplet>,
    clients: HashMap<String, ClientRecord>,
    /// Each client group's new triplets in its throttle window (the service's count).
    new_triplets: HashMap<String, NewTriplets>,
}

impl MemState {
    /// Decides one request and stores what the engine wrote, as the service does.
    pub fn check(&mut self, engine: &Engine, req: &Request, now: u64) -> Decision {
        let Some(ip) = req.client_ip else {
            return engine.decide(req, &State::default(), now).0;
        };
        let (key, _) = engine.identified_key(ip, &req.sender, &req.recipient, req.facts.as_ref());
        let before = State {
            client: self.clients.get(&key.client).copied(),
            triplet: self.triplets.get(&key).copied(),
            new_triplets: self.new_triplets.get(&key.client).copied(),
        };
        let (d, after) = engine.decide(req, &before, now);
        if after.triplet != before.triplet
            && let Some(t) = after.triplet
        {
            self.triplets.insert(key.clone(), t);
        }
        if after.new_triplets != before.new_triplets
            && let Some(w) = after.new_triplets
        {
            self.new_triplets.insert(key.client.clone(), w);
        }
        if after.client != before.client
            && let Some(c) = after.client
        {
            self.clients.insert(key.client, c);
        }
        d
    }

    /// Triplet records held (live or not yet swept).
    pub fn triplets(&self) -> usize {
        self.triplets.len()
    }

    /// Client (auto-allow) records held.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// One simulated message.
#[derive(Debug, Clone)]
struct Msg {
    class: usize,
    /// Seconds after the start.
    arrival: u64,
    sender: String,
    sender_domain: usize,
    recipient: String,
    /// Queue runner phase of the sending MTA.
    phase: u64,
    /// The address of every attempt (single hosts, bots); `None`: drawn per attempt (pools).
    ip: Option<Ipv4Addr>,
    salt: u64,
}

/// A well-mixed 64-bit value of a few inputs (SplitMix64's finaliser).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in `[0, 1)` from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn below(h: u64, n: u64) -> u64 {
    ((u128::from(h) * u128::from(n)) >> 64) as u64
}

/// `n` written in letters (`a`, `b`, ..., `ba`, ...).
fn letters(mut n: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Draws every message of the scenario.
fn messages(s: &Scenario) -> (Vec<Msg>, Vec<Vec<String>>) {
    let mut out = Vec::new();
    let mut domains = Vec::new();
    for (ci, c) in s.classes.iter().enumerate() {
        let mut rng = Rng::stream(s.seed, ci as u64);
        let names: Vec<String> = (0..c.domains).map(|n| c.domain(n + 1)).collect();
        let queue_run = c.schedule.queue_run().max(1);
        for _ in 0..c.messages {
            let arrival = rng.below(s.duration);
            let d = rng.below(u64::from(c.domains)) as usize;
            let j = rng.below(u64::from(c.senders));
            let sender_id = d as u64 * u64::from(c.senders) + j;
            // Letters only: the engine collapses digit runs of local parts (VERP).
            let local = if c.spam {
                // Spam forges a new sender for nearly every message.
                letters(rng.next_u64() >> 24)
            } else {
                letters(j)
            };
            let recipients = u64::from(s.recipients);
            let r = if c.correspondents > 0 {
                let k = rng.below(u64::from(c.correspondents));
                below(mix(mix(s.seed, ci as u64), mix(sender_id, k)), recipients)
            } else {
                rng.below(recipients)
            };
            let ip = match &c.ips {
                IpModel::Single { hosts } => Some(hosts[(sender_id % hosts.len() as u64) as usize]),
                IpModel::Botnet { net } => {
                    let size = 1u64 << (32 - net.prefix_len());
                    let off = rng.below(size) as u32;
                    Some(Ipv4Addr::from(u32::from(net.network()) | off))
                }
                IpModel::Pool { .. } => None,
            };
            out.push(Msg {
                class: ci,
                arrival,
                sender: format!("{local}@{}", names[d]),
                sender_domain: d,
                recipient: format!("user{r}@{}", s.recipient_domain),
                phase: rng.below(queue_run),
                ip,
                salt: rng.next_u64(),
            });
        }
        domains.push(names);
    }
    (out, domains)
}

/// The address of attempt `n` of a message.
fn address(c: &SenderClass, m: &Msg, n: u32) -> Ipv4Addr {
    if let Some(ip) = m.ip {
        return ip;
    }
    match &c.ips {
        IpModel::Pool { subnets } => {
            let h = mix(m.salt, u64::from(n));
            let net = subnets[below(h, subnets.len() as u64) as usize];
            let host = 1 + below(mix(h, 1), 254) as u32;
            Ipv4Addr::from(net | host)
        }
        // Single and botnet addresses are drawn with the message.
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// The forward-confirmed name of an address, or `None` for no name.
fn ptr_name(c: &SenderClass, domain: &str, ip: Ipv4Addr) -> Option<String> {
    let [a, b, cc, d] = ip.octets();
    match c.ptr {
        PtrKind::None => None,
        PtrKind::Verified => {
            let ptr_domain = c.ptr_domain.as_deref().unwrap_or(domain);
            let l1 = char::from(b'a' + cc / 26 % 26);
            let l2 = char::from(b'a' + cc % 26);
            Some(format!("mail-{l1}{l2}-f{d}.{ptr_domain}"))
        }
        PtrKind::Dynamic => {
            let ptr_domain = c.ptr_domain.as_deref().unwrap_or("isp.example.net");
            Some(format!("{d}-{cc}-{b}-{a}.dyn.{ptr_domain}"))
        }
    }
}

/// Whether a DNS list with `share` lists `ip` (the same answer for every query).
fn listed(seed: u64, salt: u64, ip: Ipv4Addr, share: f64) -> bool {
    share > 0.0 && unit(mix(mix(seed, salt), u64::from(u32::from(ip)))) < share
}

/// The DNS facts a request carries under a configuration with DNS on.
fn facts(
    cfg: &SimConfig,
    seed: u64,
    c: &SenderClass,
    domain: &str,
    ip: Ipv4Addr,
    name: Option<&str>,
) -> IdentityFacts {
    let list = |zone: &Option<String>, salt: u64, share: f64| Listing {
        hits: match zone {
            Some(z) if listed(seed, salt, ip, share) => vec![z.clone()],
            _ => Vec::new(),
        },
        complete: true,
    };
    IdentityFacts {
        spf: Some(SpfFact {
            domain: domain.to_string(),
            result: c.spf,
        }),
        name: name.map_or(HostName::Unverified, |n| HostName::Verified(n.to_string())),
        dnswl: list(&cfg.dnswl_zone, 0x57, c.dnswl),
        dnsbl: list(&cfg.dnsbl_zone, 0xb1, c.dnsbl),
    }
}

/// Per-class counters while a configuration runs.
#[derive(Debug, Default, Clone)]
struct Tally {
    messages: u64,
    delivered: u64,
    lost: u64,
    delayed: u64,
    attempts: u64,
    delays: Vec<u64>,
}

/// Runs one configuration over the messages.
fn run_config(
    s: &Scenario,
    cfg: &SimConfig,
    msgs: &[Msg],
    domains: &[Vec<String>],
) -> ConfigResult {
    let mut state = MemState::default();
    let mut tallies = vec![Tally::default(); s.classes.len()];
    let mut cursors: Vec<_> = msgs
        .iter()
        .map(|m| s.classes[m.class].schedule.attempts(m.phase))
        .collect();
    let mut attempt = vec![0u32; msgs.len()];
    let mut deferred = vec![false; msgs.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| Reverse((m.arrival, i)))
        .collect();
    for m in msgs {
        tallies[m.class].messages += 1;
    }
    let mut deferrals = 0u64;
    while let Some(Reverse((t, i))) = heap.pop() {
        let m = &msgs[i];
        let c = &s.classes[m.class];
        let ip = address(c, m, attempt[i]);
        attempt[i] += 1;
        let domain = &domains[m.class][m.sender_domain];
        let name = ptr_name(c, domain, ip);
        let req = Request {
            stage: "RCPT".into(),
            client_ip: Some(IpAddr::V4(ip)),
            client_name: name.clone().unwrap_or_else(|| "unknown".into()),
            sender: m.sender.clone(),
            recipient: m.recipient.clone(),
            facts: cfg
                .dns
                .then(|| facts(cfg, s.seed, c, domain, ip, name.as_deref())),
            ..Request::default()
        };
        let d = state.check(&cfg.engine, &req, s.start + t);
        let tally = &mut tallies[m.class];
        tally.attempts += 1;
        if d.verdict != Verdict::Defer {
            tally.delivered += 1;
            tally.delays.push(t - m.arrival);
            continue;
        }
        deferrals += 1;
        if !deferred[i] {
            deferred[i] = true;
            tally.delayed += 1;
        }
        match cursors[i].next_after_failure(t - m.arrival) {
            Some(rel) => heap.push(Reverse((m.arrival + rel, i))),
            None => tally.lost += 1,
        }
    }
    let result = |name: &str, spam: bool, t: Tally| {
        ClassResult::new(
            name,
            spam,
            t.messages,
            t.delivered,
            t.lost,
            t.delayed,
            t.attempts,
            t.delays,
        )
    };
    let mut legit = Tally::default();
    let mut spam = Tally::default();
    let mut classes = Vec::new();
    for (c, t) in s.classes.iter().zip(tallies) {
        let sum = if c.spam { &mut spam } else { &mut legit };
        sum.messages += t.messages;
        sum.delivered += t.delivered;
        sum.lost += t.lost;
        sum.delayed += t.delayed;
        sum.attempts += t.attempts;
        sum.delays.extend_from_slice(&t.delays);
        classes.push(result(&c.name, c.spam, t));
    }
    ConfigResult {
        name: cfg.name.clone(),
        description: cfg.description.clone(),
        dns: cfg.dns,
        classes,
        legitimate: result("all legitimate", false, legit),
        spam: result("all spam", true, spam),
        deferrals,
        triplets: state.triplets(),
        client_records: state.clients(),
    }
}

/// Runs every configuration of the scenario (scaled already, if wanted).
pub fn run(s: &Scenario) -> Report {
    let (msgs, domains) = messages(s);
    let configs = s
        .configs
        .iter()
        .map(|cfg| run_config(s, cfg, &msgs, &domains))
        .collect();
    Report {
        scenario: s.name.clone(),
        description: s.description.clone(),
        seed: s.seed,
        duration: s.duration,
        messages: msgs.len() as u64,
        classes: s
            .classes
            .iter()
            .map(|c| ClassInfo {
                name: c.name.clone(),
                description: c.description.clone(),
                spam: c.spam,
                mta: c.schedule.name(),
                ips: match c.ips {
                    IpModel::Single { .. } => "single",
                    IpModel::Pool { .. } => "pool",
                    IpModel::Botnet { .. } => "botnet",
                },
                first_retry: c.schedule.first_retry_bound(),
            })
            .collect(),
        configs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::identity::dynamic_name;

    const SCENARIO: &str = r#"
[simulation]
duration = "1d"
seed = 5
recipients = 20
[[config]]
name = "postgrey-like"
[[config]]
name = "pool-aware"
[config.dns]
enabled = true
[[sender]]
name = "pool"
messages = 200
ips = "pool"
network = "209.85.128.0/17"
subnets = 16
domain = "gmail.com"
spf = "pass"
ptr = "verified"
ptr_domain = "google.com"
[[sender]]
name = "bots"
spam = true
messages = 200
mta = "never"
ips = "botnet"
network = "100.64.0.0/10"
domain = "x.example"
"#;

    fn report(seed: Option<u64>) -> String {
        let mut s = Scenario::parse("t.toml", SCENARIO).unwrap();
        if let Some(seed) = seed {
            s.seed = seed;
        }
        serde_json::to_string(&run(&s)).unwrap()
    }

    #[test]
    fn same_seed_same_report() {
        assert_eq!(report(None), report(None));
        assert_ne!(report(None), report(Some(6)));
    }

    #[test]
    fn pool_retries_match_only_with_dns_facts() {
        let s = Scenario::parse("t.toml", SCENARIO).unwrap();
        let r = run(&s);
        let [postgrey, aware] = &r.configs[..] else {
            panic!()
        };
        let (p, a) = (&postgrey.classes[0], &aware.classes[0]);
        assert_eq!((p.messages, a.messages), (200, 200));
        // Postfix's first retry comes within 300-599 s; from the same spf: identity it passes.
        assert!(a.delay_p95.unwrap() < 600, "{a:?}");
        assert!(p.delay_p95.unwrap() > 600, "{p:?}");
        assert_eq!(postgrey.classes[1].delivered, 0);
        assert_eq!(aware.classes[1].delivered, 0);
    }

    #[test]
    fn generated_names_are_judged_as_intended() {
        let ip: Ipv4Addr = "209.85.128.170".parse().unwrap();
        let mut c = Scenario::parse(
            "t.toml",
            "[[config]]\nname = \"a\"\n[[sender]]\nname = \"p\"\nmessages = 1\nnetwork = \"209.85.128.0/17\"\nips = \"pool\"\ndomain = \"gmail.com\"\nptr = \"verified\"\nptr_domain = \"google.com\"\n",
        )
        .unwrap()
        .classes
        .remove(0);
        let name = ptr_name(&c, "gmail.com", ip).unwrap();
        assert_eq!(name, "mail-ey-f170.google.com");
        assert_eq!(dynamic_name(&name, IpAddr::V4(ip)), None);
        c.ptr = PtrKind::Dynamic;
        let name = ptr_name(&c, "gmail.com", ip).unwrap();
        assert!(dynamic_name(&name, IpAddr::V4(ip)).is_some(), "{name}");
    }
}
