//! Scenario files for `greygate simulate`: the site, the sender classes and the engine
//! configurations to compare, in two stages like the daemon's configuration — serde
//! structs (`RawScenario`), then [`RawScenario::validate`] into a checked [`Scenario`].
//! Errors name the file, line and column.
//!
//! Each `[[config]]` takes the daemon's own `[greylist]`, `[identity]`, `[dns]`, `[dnswl]`,
//! `[dnsbl]` and `[allow]` tables and is checked by the daemon's own validation, so a
//! simulated configuration means exactly what it would mean in `greygate.toml`. A
//! `[config.smtp]` table puts the configuration behind greygate's SMTP front: of `[smtp]`
//! it takes the pregreet test's keys (`pregreet_wait`, `pregreet_action`,
//! `pregreet_suspect_for`, `pregreet_pass_for`), with the daemon's names, defaults and
//! checks.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::mta::Schedule;
use crate::config::{
    ConfigErrors, Problems, RawAllow, RawConfig, RawDns, RawDnsbl, RawDnswl, RawDomain,
    RawGreylist, RawIdentity, Source,
};
use crate::dur::Dur;
use crate::engine::{Engine, SpfResult};

/// The scenario file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScenario {
    /// What the scenario models, for the report.
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub simulation: RawSimulation,
    /// Engine configurations compared side by side.
    #[serde(default, rename = "config")]
    pub configs: Vec<RawEngineConfig>,
    /// Sender classes.
    #[serde(default, rename = "sender")]
    pub senders: Vec<RawSender>,
}

/// `[simulation]`: the period, the seed and the receiving site.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSimulation {
    /// How long new mail arrives; retries still running at the end are followed to the end.
    pub duration: Dur,
    /// Seed of every random choice: the same seed gives the same report.
    pub seed: u64,
    /// Simulated start (RFC 3339); only the clock values stored in records depend on it.
    pub start: String,
    /// Mailboxes at the site; each message goes to one of them.
    pub recipients: u32,
    /// Domain of the site's mailboxes.
    pub recipient_domain: String,
}

impl Default for RawSimulation {
    fn default() -> Self {
        RawSimulation {
            duration: Dur(std::time::Duration::from_secs(7 * 86_400)),
            seed: 1,
            start: "2026-03-02T00:00:00Z".into(),
            recipients: 100,
            recipient_domain: "site.example".into(),
        }
    }
}

/// `[[config]]`: one engine configuration, in the daemon's own terms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawEngineConfig {
    pub name: String,
    pub description: String,
    pub greylist: RawGreylist,
    pub identity: RawIdentity,
    /// `enabled = false`: requests carry no DNS facts (IP prefix keys, like postgrey).
    pub dns: RawDns,
    pub dnswl: RawDnswl,
    pub dnsbl: RawDnsbl,
    pub allow: RawAllow,
    /// `[[config.domains]]`: per-recipient-domain sections, as the daemon's `[[domains]]`.
    pub domains: Vec<RawDomain>,
    /// `[config.smtp]`: mail comes through the SMTP front and its pregreet test; absent,
    /// the configuration is a policy service behind the site's own MTA (no test).
    pub smtp: Option<RawSmtp>,
}

/// `[config.smtp]`: the pregreet test's keys of the daemon's `[smtp]`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSmtp {
    /// How long the banner's last line is held back; `"0s"` turns the test off.
    pub pregreet_wait: Dur,
    /// `reject` (554) or `defer` (421) a client that talked first.
    pub pregreet_action: String,
    /// How long a pregreeting client's group is suspect: its RCPTs then carry a DNSBL hit
    /// (`[dnsbl] delay`, when that is set).
    pub pregreet_suspect_for: Dur,
    /// How long an address that waited for the banner is not made to wait again.
    pub pregreet_pass_for: Dur,
}

impl Default for RawSmtp {
    fn default() -> Self {
        let day = Dur(std::time::Duration::from_secs(86_400));
        RawSmtp {
            pregreet_wait: Dur(std::time::Duration::from_secs(6)),
            pregreet_action: "reject".into(),
            pregreet_suspect_for: day,
            pregreet_pass_for: day,
        }
    }
}

/// What a client that talks before the banner ends gets (`pregreet_action`), as the
/// daemon's SMTP front reads it.
pub use crate::server::smtp::PregreetAction;

/// Longest `pregreet_wait` the daemon takes.
const MAX_PREGREET_WAIT: u64 = 60;

/// Retry behaviour of a sender class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtaKind {
    Postfix,
    Exim,
    Exchange,
    Sendmail,
    /// Every `retry_every` until `give_up`.
    Fixed,
    /// The gaps in `retries`.
    Custom,
    /// No retry at all.
    Never,
}

/// Where a class's connections come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpKind {
    /// `hosts` fixed addresses in `network`; each sender address always uses the same one.
    Single,
    /// Every attempt from a random address of `subnets` /24 networks inside `network`.
    Pool,
    /// Every message from a random address of `network`; its retries from the same one.
    Botnet,
}

/// What reverse DNS says about a class's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PtrKind {
    /// A forward-confirmed name under `ptr_domain` (`mail-ab-f12.google.com`).
    Verified,
    /// A forward-confirmed name that spells the address (`12-0-113-203.dyn.isp.example`).
    Dynamic,
    /// No name (Postfix's `unknown`).
    None,
}

/// `[[sender]]`: a class of senders.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSender {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Spam is counted as "accepted", legitimate mail as "delivered" or "lost".
    #[serde(default)]
    pub spam: bool,
    /// Messages over the simulated period, arriving at random times.
    pub messages: u64,
    /// Retry schedule: postfix, exim, exchange, sendmail, fixed, custom, never.
    #[serde(default = "default_mta")]
    pub mta: MtaKind,
    /// Queue runner interval (postfix `queue_run_delay`, exim `-q`, sendmail `-q`).
    pub queue_run: Option<Dur>,
    /// `fixed`: the interval.
    pub retry_every: Option<Dur>,
    /// When the sender gives up, after the first attempt (any MTA; default: its own).
    pub give_up: Option<Dur>,
    /// `custom`: gaps between consecutive attempts.
    #[serde(default)]
    pub retries: Vec<Dur>,
    #[serde(default = "default_ips")]
    pub ips: IpKind,
    /// IPv4 network the addresses come from.
    pub network: String,
    /// `pool`: how many /24 networks of `network` the pool uses.
    #[serde(default = "one")]
    pub subnets: u32,
    /// `single`: how many hosts send the class's mail.
    #[serde(default = "one")]
    pub hosts: u32,
    /// Envelope sender domain; `{n}` is replaced by the domain number when `domains` > 1.
    pub domain: String,
    #[serde(default = "one")]
    pub domains: u32,
    /// Distinct sender addresses per domain.
    #[serde(default = "hundred")]
    pub senders: u32,
    /// Site mailboxes each sender address writes to (0: any mailbox).
    #[serde(default)]
    pub correspondents: u32,
    /// SPF result of the sender domain for the class's addresses.
    #[serde(default = "default_spf")]
    pub spf: SpfResult,
    #[serde(default = "default_ptr")]
    pub ptr: PtrKind,
    /// Domain of the PTR names (default: the sender domain).
    pub ptr_domain: Option<String>,
    /// Share of addresses (0–1) the configured DNSBL zone lists.
    #[serde(default)]
    pub dnsbl: f64,
    /// Share of addresses (0–1) the configured DNSWL zone lists.
    #[serde(default)]
    pub dnswl: f64,
    /// Share of addresses (0–1) that talk before the banner ends (bots: most; real MTAs: 0).
    #[serde(default)]
    pub pregreet: f64,
}

fn default_mta() -> MtaKind {
    MtaKind::Postfix
}
fn default_ips() -> IpKind {
    IpKind::Single
}
fn default_spf() -> SpfResult {
    SpfResult::None
}
fn default_ptr() -> PtrKind {
    PtrKind::None
}
fn one() -> u32 {
    1
}
fn hundred() -> u32 {
    100
}

/// One checked engine configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub name: String,
    pub description: String,
    pub engine: Engine,
    /// Whether requests carry DNS facts.
    pub dns: bool,
    /// The zone named in DNSWL hits, when one is configured.
    pub dnswl_zone: Option<String>,
    pub dnsbl_zone: Option<String>,
    /// The SMTP front's pregreet test; `None`: no test (no `[config.smtp]`, or
    /// `pregreet_wait = "0s"`).
    pub pregreet: Option<Pregreet>,
}

/// The pregreet test of a configuration, checked; times in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pregreet {
    pub wait: u64,
    pub action: PregreetAction,
    pub suspect_for: u64,
    pub pass_for: u64,
}

/// Where a class's addresses come from, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpModel {
    Single {
        hosts: Vec<Ipv4Addr>,
    },
    /// Base addresses of the /24 networks.
    Pool {
        subnets: Vec<u32>,
    },
    Botnet {
        net: Ipv4Net,
    },
}

/// One checked sender class.
#[derive(Debug, Clone)]
pub struct SenderClass {
    pub name: String,
    pub description: String,
    pub spam: bool,
    pub messages: u64,
    pub schedule: Schedule,
    pub ips: IpModel,
    pub domain: String,
    pub domains: u32,
    pub senders: u32,
    pub correspondents: u32,
    pub spf: SpfResult,
    pub ptr: PtrKind,
    pub ptr_domain: Option<String>,
    pub dnsbl: f64,
    pub dnswl: f64,
    pub pregreet: f64,
}

impl SenderClass {
    /// The sender domain of domain number `n`.
    pub fn domain(&self, n: u32) -> String {
        self.domain.replace("{n}", &n.to_string())
    }
}

/// A checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub duration: u64,
    pub seed: u64,
    /// Unix seconds of the simulated start.
    pub start: u64,
    pub recipients: u32,
    pub recipient_domain: String,
    pub configs: Vec<SimConfig>,
    pub classes: Vec<SenderClass>,
}

impl Scenario {
    /// Parses and checks a scenario file's text; `name` is used in error locations.
    pub fn parse(name: &str, text: &str) -> Result<Scenario, ConfigErrors> {
        let src = Source { name, text };
        let raw: RawScenario = src.parse()?;
        let stem = std::path::Path::new(name)
            .file_stem()
            .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
        raw.validate(&stem, &src)
    }

    /// Multiplies every class's message count (at least one message stays one).
    pub fn scale(&mut self, factor: f64) {
        for c in &mut self.classes {
            if c.messages > 0 {
                c.messages = ((c.messages as f64 * factor).round() as u64).max(1);
            }
        }
    }
}

impl RawScenario {
    /// Checks everything and reports every problem at once.
    pub fn validate(self, name: &str, src: &Source<'_>) -> Result<Scenario, ConfigErrors> {
        let mut problems = Problems::nearest(src);
        let mut err = |path: &[&str], message: String| problems.at(path, message);
        let s = &self.simulation;
        let duration = s.duration.0.as_secs();
        if duration == 0 {
            err(
                &["simulation", "duration"],
                "duration must be positive".into(),
            );
        }
        let start = match s.start.parse::<jiff::Timestamp>() {
            Ok(t) => u64::try_from(t.as_second()).unwrap_or_else(|_| {
                err(&["simulation", "start"], "start must be after 1970".into());
                0
            }),
            Err(e) => {
                err(
                    &["simulation", "start"],
                    format!("{:?} is not an RFC 3339 time ({e})", s.start),
                );
                0
            }
        };
        if s.recipients == 0 {
            err(
                &["simulation", "recipients"],
                "recipients must be at least 1".into(),
            );
        }
        if s.recipient_domain.is_empty() || s.recipient_domain.contains(['@', ' ']) {
            err(
                &["simulation", "recipient_domain"],
                format!("{:?} is not a domain", s.recipient_domain),
            );
        }

        if self.configs.is_empty() {
            err(
                &[],
                "no [[config]]: name at least one engine configuration to simulate".into(),
            );
        }
        let mut configs = Vec::new();
        for (i, c) in self.configs.iter().enumerate() {
            let at = i.to_string();
            if c.name.trim().is_empty() {
                err(&["config", &at], "every [[config]] needs a name".into());
            } else if self.configs[..i].iter().any(|o| o.name == c.name) {
                err(
                    &["config", &at, "name"],
                    format!("config name {:?} appears twice", c.name),
                );
            }
            let raw = RawConfig {
                greylist: c.greylist.clone(),
                identity: c.identity.clone(),
                dns: c.dns.clone(),
                dnswl: c.dnswl.clone(),
                dnsbl: c.dnsbl.clone(),
                allow: c.allow.clone(),
                domains: c.domains.clone(),
                ..RawConfig::default()
            };
            let pregreet = c.smtp.as_ref().and_then(|smtp| {
                check_smtp(smtp, &mut |key: &str, message: String| {
                    err(&["config", &at, "smtp", key], message);
                })
            });
            match raw.validate(None) {
                Ok(cfg) => configs.push(SimConfig {
                    name: c.name.clone(),
                    description: c.description.clone(),
                    engine: cfg.engine,
                    dns: cfg.dns.enabled,
                    dnswl_zone: cfg.dns.dnswl_zones.first().cloned(),
                    dnsbl_zone: cfg.dns.dnsbl_zones.first().cloned(),
                    pregreet,
                }),
                Err(ConfigErrors(list)) => {
                    for e in list {
                        // Without a source, validation names the setting (`greylist.delay`).
                        let mut path = vec!["config", at.as_str()];
                        path.extend(e.location.split('.'));
                        err(&path, e.message);
                    }
                }
            }
        }

        if self.senders.is_empty() {
            err(
                &[],
                "no [[sender]]: describe at least one class of senders".into(),
            );
        }
        let mut classes = Vec::new();
        for (i, r) in self.senders.iter().enumerate() {
            let at = i.to_string();
            let mut e = |key: &str, message: String| {
                if key.is_empty() {
                    err(&["sender", &at], message);
                } else {
                    err(&["sender", &at, key], message);
                }
            };
            if let Some(c) = check_sender(r, &mut e) {
                if self.senders[..i].iter().any(|o| o.name == r.name) {
                    e("name", format!("sender class {:?} appears twice", r.name));
                }
                classes.push(c);
            }
        }
        problems.finish(|| Scenario {
            name: name.to_string(),
            description: self.description,
            duration,
            seed: s.seed,
            start,
            recipients: s.recipients,
            recipient_domain: s.recipient_domain.to_ascii_lowercase(),
            configs,
            classes,
        })
    }
}

/// Checks `[config.smtp]` as the daemon checks `[smtp]`'s pregreet keys, and that times
/// are whole seconds (the simulated clock's); `None` when the test is off
/// (`pregreet_wait = "0s"`) or a problem was reported through `err`.
fn check_smtp(r: &RawSmtp, err: &mut impl FnMut(&str, String)) -> Option<Pregreet> {
    let mut ok = true;
    let mut secs = |key: &str, d: Dur, err: &mut dyn FnMut(&str, String)| {
        if d.0.subsec_nanos() != 0 {
            err(
                key,
                format!("{key} {d} must be whole seconds in a simulation"),
            );
            ok = false;
        }
        d.0.as_secs()
    };
    let wait = secs("pregreet_wait", r.pregreet_wait, err);
    if r.pregreet_wait.0 > std::time::Duration::from_secs(MAX_PREGREET_WAIT) {
        err(
            "pregreet_wait",
            "pregreet_wait over 60 s would make real mail servers give up".into(),
        );
    }
    let action = r
        .pregreet_action
        .parse::<PregreetAction>()
        .map_err(|e| err("pregreet_action", e))
        .ok();
    let suspect_for = secs("pregreet_suspect_for", r.pregreet_suspect_for, err);
    let pass_for = secs("pregreet_pass_for", r.pregreet_pass_for, err);
    let action = action.filter(|_| ok && wait > 0 && wait <= MAX_PREGREET_WAIT)?;
    Some(Pregreet {
        wait,
        action,
        suspect_for,
        pass_for,
    })
}

/// Checks one sender class; `None` when something is wrong (reported through `err`).
fn check_sender(r: &RawSender, err: &mut impl FnMut(&str, String)) -> Option<SenderClass> {
    let before = std::cell::Cell::new(0usize);
    let mut errs = |key: &str, message: String| {
        before.set(before.get() + 1);
        err(key, message);
    };
    if r.name.trim().is_empty() {
        errs("", "every [[sender]] needs a name".into());
    }
    let secs = |d: Option<Dur>| d.map(|d| d.0.as_secs());
    let queue_run = secs(r.queue_run);
    let give_up = secs(r.give_up);
    if queue_run == Some(0) {
        errs("queue_run", "queue_run must be positive".into());
    }
    let only = |kinds: &[MtaKind]| kinds.contains(&r.mta);
    if r.queue_run.is_some() && !only(&[MtaKind::Postfix, MtaKind::Exim, MtaKind::Sendmail]) {
        errs(
            "queue_run",
            "queue_run applies to postfix, exim and sendmail only".into(),
        );
    }
    if r.retry_every.is_some() && r.mta != MtaKind::Fixed {
        errs(
            "retry_every",
            "retry_every applies to mta = \"fixed\" only".into(),
        );
    }
    if !r.retries.is_empty() && r.mta != MtaKind::Custom {
        errs("retries", "retries applies to mta = \"custom\" only".into());
    }
    if r.give_up.is_some() && only(&[MtaKind::Custom, MtaKind::Never]) {
        errs(
            "give_up",
            "give_up does not apply to custom (the last gap ends it) or never".into(),
        );
    }
    let mut schedule = match r.mta {
        MtaKind::Postfix => Schedule::postfix(),
        MtaKind::Exim => Schedule::exim(),
        MtaKind::Exchange => Schedule::exchange(),
        MtaKind::Sendmail => Schedule::sendmail(),
        MtaKind::Never => Schedule::Never,
        MtaKind::Fixed => match (secs(r.retry_every), give_up) {
            (Some(every), Some(g)) if every > 0 => Schedule::Fixed { every, give_up: g },
            (Some(0), _) => {
                errs("retry_every", "retry_every must be positive".into());
                Schedule::Never
            }
            _ => {
                errs(
                    "mta",
                    "mta = \"fixed\" needs retry_every and give_up".into(),
                );
                Schedule::Never
            }
        },
        MtaKind::Custom => {
            if r.retries.is_empty() {
                errs(
                    "mta",
                    "mta = \"custom\" needs retries = [gaps between attempts]".into(),
                );
            }
            let gaps: Vec<u64> = r.retries.iter().map(|d| d.0.as_secs()).collect();
            if gaps.contains(&0) {
                errs("retries", "every gap must be positive".into());
            }
            Schedule::Custom { gaps }
        }
    };
    match &mut schedule {
        Schedule::Postfix {
            queue_run: q,
            lifetime,
            ..
        }
        | Schedule::Sendmail {
            queue_run: q,
            lifetime,
        } => {
            *q = queue_run.unwrap_or(*q);
            *lifetime = give_up.unwrap_or(*lifetime);
        }
        Schedule::Exim {
            queue_run: q,
            rules,
        } => {
            *q = queue_run.unwrap_or(*q);
            if let (Some(g), Some(last)) = (give_up, rules.last_mut()) {
                match last {
                    super::mta::EximRule::Fixed { cutoff, .. }
                    | super::mta::EximRule::Geometric { cutoff, .. } => *cutoff = g,
                }
            }
        }
        Schedule::Exchange { expiration, .. } => *expiration = give_up.unwrap_or(*expiration),
        _ => {}
    }

    if r.messages == 0 {
        errs("messages", "messages must be at least 1".into());
    }
    let net: Option<Ipv4Net> = match r.network.parse::<Ipv4Net>() {
        Ok(n) => Some(n.trunc()),
        Err(_) => {
            errs(
                "network",
                format!(
                    "{:?} is not an IPv4 network such as \"209.85.128.0/17\"",
                    r.network
                ),
            );
            None
        }
    };
    let ips = net.and_then(|net| match r.ips {
        IpKind::Single => {
            let size = 1u64 << (32 - net.prefix_len());
            if r.hosts == 0 || u64::from(r.hosts) > size {
                errs(
                    "hosts",
                    format!("hosts must be between 1 and {size} (the size of {net})"),
                );
                return None;
            }
            // Spread the hosts over the network: a multiplicative step that is odd visits
            // every address of a power-of-two range once.
            let base = u32::from(net.network());
            let mask = (size - 1) as u32;
            let hosts = (0..r.hosts)
                .map(|i| {
                    let off = (i.wrapping_mul(0x9e37_79b1).wrapping_add(1)) & mask;
                    Ipv4Addr::from(base | off)
                })
                .collect();
            Some(IpModel::Single { hosts })
        }
        IpKind::Pool => {
            if net.prefix_len() > 24 {
                errs("network", "a pool's network must be a /24 or larger".into());
                return None;
            }
            let available = 1u32 << (24 - net.prefix_len());
            if r.subnets == 0 || r.subnets > available {
                errs(
                    "subnets",
                    format!("subnets must be between 1 and {available} (the /24s in {net})"),
                );
                return None;
            }
            let base = u32::from(net.network());
            let step = (available / r.subnets).max(1);
            let subnets = (0..r.subnets).map(|i| base + ((i * step) << 8)).collect();
            Some(IpModel::Pool { subnets })
        }
        IpKind::Botnet => Some(IpModel::Botnet { net }),
    });
    if r.domain.is_empty() || r.domain.contains(['@', ' ']) {
        errs("domain", format!("{:?} is not a domain", r.domain));
    }
    if r.domains == 0 {
        errs("domains", "domains must be at least 1".into());
    } else if r.domains > 1 && !r.domain.contains("{n}") {
        errs(
            "domain",
            "with domains > 1 the domain needs {n} where the number goes".into(),
        );
    }
    if r.senders == 0 {
        errs("senders", "senders must be at least 1".into());
    }
    for (key, v) in [
        ("dnsbl", r.dnsbl),
        ("dnswl", r.dnswl),
        ("pregreet", r.pregreet),
    ] {
        if !(0.0..=1.0).contains(&v) {
            errs(key, format!("{key} is a share between 0 and 1, not {v}"));
        }
    }
    if before.get() > 0 {
        return None;
    }
    Some(SenderClass {
        name: r.name.clone(),
        description: r.description.clone(),
        spam: r.spam,
        messages: r.messages,
        schedule,
        ips: ips?,
        domain: r.domain.to_ascii_lowercase(),
        domains: r.domains,
        senders: r.senders,
        correspondents: r.correspondents,
        spf: r.spf,
        ptr: r.ptr,
        ptr_domain: r.ptr_domain.clone(),
        dnsbl: r.dnsbl,
        dnswl: r.dnswl,
        pregreet: r.pregreet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[simulation]
duration = "1d"

[[config]]
name = "postgrey-like"

[[sender]]
name = "friends"
messages = 10
network = "192.0.2.0/24"
domain = "friends.example"
"#;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse("s.toml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_scenario_uses_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.name, "s");
        assert_eq!(s.duration, 86_400);
        assert_eq!(s.configs.len(), 1);
        assert!(
            s.configs[0].dns,
            "DNS facts are on by default, as in the daemon"
        );
        assert_eq!(s.configs[0].engine.policy.delay, 300);
        let c = &s.classes[0];
        assert_eq!(c.schedule, Schedule::postfix());
        assert_eq!(
            c.ips,
            IpModel::Single {
                hosts: vec!["192.0.2.1".parse().unwrap()]
            }
        );
        assert_eq!(s.start, 1_772_409_600);
    }

    #[test]
    fn syntax_and_type_errors_point_at_the_line() {
        let e = parse("[simulation]\nduration = \"1d\"\nseed = \"x\"\n").unwrap_err();
        assert!(e.starts_with("s.toml:3:"), "{e}");
        let e = parse("[[sender]]\nname = \"a\"\nmessages = 1\nnetwork = \"192.0.2.0/24\"\ndomain = \"a.example\"\nmta = \"qmail\"\n").unwrap_err();
        assert!(e.starts_with("s.toml:6:"), "{e}");
        assert!(e.contains("postfix"), "{e}");
        let e = parse("[[sender]]\nnme = \"a\"\n").unwrap_err();
        assert!(e.starts_with("s.toml:2:"), "{e}");
    }

    #[test]
    fn semantic_errors_name_file_line_and_value() {
        let text = MINIMAL.replace("192.0.2.0/24", "192.0.2.0/33")
            + r#"
[[config]]
name = "postgrey-like"
[config.greylist]
delay = "3d"

[[sender]]
name = "bots"
spam = true
messages = 5
mta = "fixed"
retry_every = "10m"
ips = "pool"
network = "198.51.100.0/24"
subnets = 3
domain = "x.example"
dnsbl = 1.5
"#;
        let e = parse(&text).unwrap_err();
        let lines: Vec<&str> = e.lines().collect();
        let find = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {e}"))
                .to_string()
        };
        assert!(find("192.0.2.0/33").starts_with("s.toml:11:"), "{e}");
        assert!(find("appears twice").starts_with("s.toml:15:"), "{e}");
        assert!(find("retry_window").starts_with("s.toml:16:"), "{e}");
        assert!(
            find("needs retry_every and give_up").starts_with("s.toml:23:"),
            "{e}"
        );
        assert!(find("subnets must be").starts_with("s.toml:27:"), "{e}");
        assert!(
            find("share between 0 and 1").starts_with("s.toml:29:"),
            "{e}"
        );
    }

    #[test]
    fn missing_parts() {
        let e = parse("").unwrap_err();
        assert!(e.contains("no [[config]]"), "{e}");
        assert!(e.contains("no [[sender]]"), "{e}");
    }

    #[test]
    fn smtp_table_takes_the_daemons_pregreet_keys_and_defaults() {
        // No [config.smtp]: no SMTP front, no test; a class pregreets 0 by default.
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.configs[0].pregreet, None);
        assert_eq!(s.classes[0].pregreet, 0.0);

        let with = |table: &str| {
            let text = MINIMAL.replace(
                "name = \"postgrey-like\"\n",
                &format!("name = \"postgrey-like\"\n[config.smtp]\n{table}"),
            );
            parse(&text)
        };
        // An empty table: the daemon's defaults.
        assert_eq!(
            with("").unwrap().configs[0].pregreet,
            Some(Pregreet {
                wait: 6,
                action: PregreetAction::Reject,
                suspect_for: 86_400,
                pass_for: 86_400
            })
        );
        let s = with(
            "pregreet_wait = \"10s\"\npregreet_action = \"defer\"\npregreet_suspect_for = \"2h\"\npregreet_pass_for = \"7d\"\n",
        )
        .unwrap();
        assert_eq!(
            s.configs[0].pregreet,
            Some(Pregreet {
                wait: 10,
                action: PregreetAction::Defer,
                suspect_for: 7200,
                pass_for: 7 * 86_400
            })
        );
        // "0s" turns the test off, as in the daemon.
        assert_eq!(
            with("pregreet_wait = \"0s\"\n").unwrap().configs[0].pregreet,
            None
        );

        let text = MINIMAL.replace(
            "domain = \"friends.example\"",
            "domain = \"friends.example\"\npregreet = 0.25",
        );
        assert_eq!(parse(&text).unwrap().classes[0].pregreet, 0.25);
    }

    #[test]
    fn pregreet_problems_name_file_line_and_value() {
        let smtp = |table: &str| {
            parse(&MINIMAL.replace(
                "name = \"postgrey-like\"\n",
                &format!("name = \"postgrey-like\"\n[config.smtp]\n{table}"),
            ))
            .unwrap_err()
        };
        // Names and types: serde's errors, at the line.
        let e = smtp("listen = [\"0.0.0.0:25\"]\n");
        assert!(e.starts_with("s.toml:8:"), "{e}");
        assert!(e.contains("pregreet_wait"), "{e}");
        let e = smtp("pregreet_wait = \"soon\"\n");
        assert!(e.starts_with("s.toml:8:"), "{e}");
        // The daemon's checks, with its messages, and whole seconds: every problem at once,
        // each at its line.
        let e = smtp(
            "pregreet_wait = \"61s\"\npregreet_action = \"drop\"\npregreet_suspect_for = \"1500ms\"\n",
        );
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].starts_with("s.toml:8:"), "{e}");
        assert!(
            lines[0].ends_with("pregreet_wait over 60 s would make real mail servers give up"),
            "{e}"
        );
        assert!(lines[1].starts_with("s.toml:9:"), "{e}");
        assert!(
            lines[1].ends_with(r#""drop" is not "reject" or "defer""#),
            "{e}"
        );
        assert!(lines[2].starts_with("s.toml:10:"), "{e}");
        assert!(lines[2].contains("1s 500ms must be whole seconds"), "{e}");
        // 60 s itself is taken.
        let e = smtp("pregreet_wait = \"60s\"\npregreet_action = \"x\"\n");
        assert!(e.starts_with("s.toml:9:") && !e.contains("60 s"), "{e}");

        let text = MINIMAL.replace(
            "domain = \"friends.example\"",
            "domain = \"friends.example\"\npregreet = 1.1",
        );
        let e = parse(&text).unwrap_err();
        assert!(e.starts_with("s.toml:13:"), "{e}");
        assert!(
            e.contains("pregreet is a share between 0 and 1, not 1.1"),
            "{e}"
        );
    }

    #[test]
    fn overrides_and_scale() {
        let text = MINIMAL.replace(
            "domain = \"friends.example\"",
            "domain = \"friends.example\"\nqueue_run = \"10m\"\ngive_up = \"1d\"",
        );
        let mut s = parse(&text).unwrap();
        assert_eq!(
            s.classes[0].schedule,
            Schedule::Postfix {
                min_backoff: 300,
                max_backoff: 4000,
                queue_run: 600,
                lifetime: 86_400
            }
        );
        s.scale(2.5);
        assert_eq!(s.classes[0].messages, 25);
    }
}
