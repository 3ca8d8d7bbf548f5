//! The greylisting decision: pure functions of (request, stored state, policy, now).
//!
//! **The engine never reads the clock and never does I/O.** Callers pass `now` (Unix
//! seconds) and the records they loaded; the engine says what to answer and what to
//! write. The same step functions run inside a store's atomic update, so two hosts that
//! see a triplet at the same moment still agree on its first sighting.

pub mod allow;
pub mod domains;
pub mod identity;
pub mod normalize;
pub mod privacy;
pub mod record;
pub mod runtime;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use allow::{AllowKind, AllowLists, Origin};
pub use domains::{DomainApplied, DomainMode, DomainPolicies, DomainSection, SharedStr};
pub use identity::{
    HostName, Identity, IdentityFacts, IdentityKind, IdentityReason, Listing, SpfFact, SpfResult,
};
pub use privacy::AddressKeys;
pub use record::{ClientRecord, Triplet};
pub use runtime::{ListKind, RuntimeEntry, RuntimeLists, Target};

/// Seconds in the hour within which passes of one client group count once.
const PASS_COUNT_WINDOW: u64 = 3600;

/// Enforce decisions, or only record and log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Defer unknown triplets (the normal operation).
    #[default]
    Enforce,
    /// Decide and record as if enforcing, but always accept: warms the database before
    /// greylisting delays anything.
    Learn,
}

impl Mode {
    /// The name as configured and as the admin API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Learn => "learn",
        }
    }
}

/// The checked greylisting parameters (see `config` for their documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub delay: u64,
    pub retry_window: u64,
    pub max_age: u64,
    /// Counted passes after which a client group is auto-allowed; 0 disables auto-allow.
    pub auto_allow_after: u32,
    pub auto_allow_lifetime: u64,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Characters that start an address extension (Postfix's `recipient_delimiter`).
    pub recipient_delimiter: String,
    /// New pending triplets a client group may add per `new_triplets_window`; past it, its
    /// further new triplets are deferred without being stored (rule `throttled`). 0: no limit.
    pub new_triplets_per_client: u32,
    /// Seconds of one throttle window, counted from the group's first new triplet in it.
    pub new_triplets_window: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            delay: 300,
            retry_window: 2 * 86_400,
            max_age: 35 * 86_400,
            auto_allow_after: 5,
            auto_allow_lifetime: 35 * 86_400,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            recipient_delimiter: "+".into(),
            new_triplets_per_client: 1000,
            new_triplets_window: 3600,
        }
    }
}

/// The request fields the engine uses, whatever front end received them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// SMTP stage, e.g. `RCPT` (Postfix's `protocol_state`).
    pub stage: String,
    /// Client IP; `None` when the front end had none or could not parse it.
    pub client_ip: Option<IpAddr>,
    /// Verified client host name, or `unknown`.
    pub client_name: String,
    pub helo: String,
    /// Envelope sender as received; empty for the null sender.
    pub sender: String,
    pub recipient: String,
    /// SASL login name; non-empty means the client authenticated.
    pub sasl_username: String,
    /// The client's PTR name, not forward-confirmed (Postfix's `reverse_client_name`), or
    /// `unknown`; empty when the front end does not know it. Only explanations read it.
    pub reverse_client_name: String,
    /// What DNS (or a simulator) found out about the client; `None` when nothing was
    /// gathered: the identity is then the IP prefix and the delay the configured one.
    pub facts: Option<IdentityFacts>,
    /// The client's session is encrypted (STARTTLS, as the front end knows it: Postfix's
    /// `encryption_protocol`, the milter `{tls_version}` macro, the SMTP front's own).
    /// No rule reads it yet; decisions are logged with it.
    pub tls: bool,
}

/// The greylisting key of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TripletKey {
    /// Client identity: the IP group (`192.0.2.0/24`), `spf:<domain>` or `org:<domain>`.
    pub client: String,
    pub sender: String,
    pub recipient: String,
}

impl TripletKey {
    /// One string for stores; the parts cannot contain NUL (front ends refuse it).
    pub fn joined(&self) -> String {
        self.parts().join("\0")
    }

    /// The parts [`TripletKey::joined`] joins.
    pub fn parts(&self) -> [&str; 3] {
        [&self.client, &self.sender, &self.recipient]
    }

    /// Inverse of [`TripletKey::joined`].
    pub fn split(joined: &str) -> Option<TripletKey> {
        let mut parts = joined.splitn(3, '\0');
        Some(TripletKey {
            client: parts.next()?.to_string(),
            sender: parts.next()?.to_string(),
            recipient: parts.next()?.to_string(),
        })
    }
}

impl fmt::Display for TripletKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {} / {}", self.client, self.sender, self.recipient)
    }
}

/// What to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Greylisting does not apply (wrong stage, authenticated client).
    Skip,
    Pass,
    Defer,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Skip => "skip",
            Verdict::Pass => "pass",
            Verdict::Defer => "defer",
        }
    }
}

/// The rule that decided; its name appears in logs, explanations and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Rule {
    NotRcptStage,
    NoClientAddress,
    Authenticated,
    AllowClientAddress,
    AllowClientName,
    AllowRecipient,
    AllowSender,
    /// An operator's runtime allow entry.
    RuntimeAllow,
    /// An operator's runtime deny entry: always "try again later".
    Deny,
    /// The recipient's `[[domains]]` section has `mode = "off"`: not greylisted.
    DomainOff,
    AutoAllow,
    /// Listed by a configured DNS allow list (DNSWL) zone.
    Dnswl,
    /// A verified identity (SPF or forward-confirmed host) that no DNSBL zone lists, with
    /// `verified_skip` on.
    VerifiedUnlisted,
    /// No live record: first sighting, or the previous one expired.
    New,
    /// No live record, and the client group already added its limit of new triplets in
    /// this window (`new_triplets_per_client`): deferred without being stored.
    Throttled,
    /// Pending and retried before the delay ended.
    EarlyRetry,
    /// Pending and retried within the window after the delay: the pass that ends greylisting.
    Delayed,
    /// Already passed and seen within `max_age`.
    Known,
    /// Pending, released by an operator (`greygate release`): the first retry after the
    /// release passes at once, before its delay; the record is then an ordinary passed one.
    Released,
    StoreFailOpen,
    StoreFailClosed,
}

impl Rule {
    /// Every rule, in declaration order (`rule as usize` indexes it): metrics keep one
    /// counter per rule without a map.
    pub const ALL: [Rule; 21] = [
        Rule::NotRcptStage,
        Rule::NoClientAddress,
        Rule::Authenticated,
        Rule::AllowClientAddress,
        Rule::AllowClientName,
        Rule::AllowRecipient,
        Rule::AllowSender,
        Rule::RuntimeAllow,
        Rule::Deny,
        Rule::DomainOff,
        Rule::AutoAllow,
        Rule::Dnswl,
        Rule::VerifiedUnlisted,
        Rule::New,
        Rule::Throttled,
        Rule::EarlyRetry,
        Rule::Delayed,
        Rule::Known,
        Rule::Released,
        Rule::StoreFailOpen,
        Rule::StoreFailClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NotRcptStage => "not-rcpt-stage",
            Rule::NoClientAddress => "no-client-address",
            Rule::Authenticated => "authenticated",
            Rule::AllowClientAddress => "allow-client-address",
            Rule::AllowClientName => "allow-client-name",
            Rule::AllowRecipient => "allow-recipient",
            Rule::AllowSender => "allow-sender",
            Rule::RuntimeAllow => "runtime-allow",
            Rule::Deny => "deny",
            Rule::DomainOff => "domain-off",
            Rule::AutoAllow => "auto-allow",
            Rule::Dnswl => "dnswl",
            Rule::VerifiedUnlisted => "verified-unlisted",
            Rule::New => "new",
            Rule::Throttled => "throttled",
            Rule::EarlyRetry => "early-retry",
            Rule::Delayed => "delayed",
            Rule::Known => "known",
            Rule::Released => "released",
            Rule::StoreFailOpen => "store-fail-open",
            Rule::StoreFailClosed => "store-fail-closed",
        }
    }
}

impl From<Rule> for &'static str {
    fn from(r: Rule) -> Self {
        r.as_str()
    }
}

/// The inverse of [`Rule::as_str`], for reading the admin API's answers.
impl TryFrom<String> for Rule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Rule::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown rule {s:?}"))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Rule,
    /// Free text for the rule: the allow entry that matched, the store error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<TripletKey>,
    /// The triplet record as it was before this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<Triplet>,
    /// The client group's auto-allow record as it was before this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_record: Option<ClientRecord>,
    /// Seconds until a retry would pass (defers by the triplet rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Seconds the mail was delayed (the pass that ends greylisting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delayed: Option<u64>,
    /// The client identity of the key and why it was chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityReason>,
    /// The delay the triplet rule applied to this request, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// The recipient's `[[domains]]` section, when one matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainApplied>,
}

/// Why a request serves the delay it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelayReason {
    /// `[greylist] delay`.
    Configured,
    /// A DNSBL zone lists the client: `[dnsbl] delay`.
    Dnsbl,
    /// A verified identity that no DNSBL zone lists: `[identity] verified_delay`.
    Verified,
    /// The `delay` of the recipient's `[[domains]]` section.
    Domain,
}

/// The delay of one request: per request, since DNS list facts may lengthen or shorten it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delay {
    pub seconds: u64,
    pub reason: DelayReason,
}

/// How a verified, unlisted identity is treated (`[identity] verified_delay`/`verified_skip`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VerifiedTreatment {
    /// Like any client: the configured delay.
    #[default]
    Greylist,
    /// Its own delay; 0 still wants one retry, at any time.
    Delay(u64),
    /// No greylisting (rule `verified-unlisted`).
    Skip,
}

/// Selective greylisting: how DNS facts choose identities and change delays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selective {
    /// Identity kinds in the order they are tried; the prefix ends it, named or not.
    pub identity_order: Vec<IdentityKind>,
    /// Delay of clients a DNSBL zone lists; `None`: the configured delay.
    pub dnsbl_delay: Option<u64>,
    pub verified: VerifiedTreatment,
}

impl Default for Selective {
    fn default() -> Self {
        Selective {
            identity_order: identity::DEFAULT_ORDER.to_vec(),
            dnsbl_delay: None,
            verified: VerifiedTreatment::Greylist,
        }
    }
}

impl Decision {
    pub(crate) fn new(verdict: Verdict, rule: Rule) -> Self {
        Decision {
            verdict,
            rule,
            detail: None,
            key: None,
            record: None,
            client_record: None,
            remaining: None,
            delayed: None,
            identity: None,
            delay: None,
            domain: None,
        }
    }

    /// Whether the verdict is enforced: the recipient's section's mode decides, else the
    /// global one (`learn` only records).
    pub fn enforced(&self, global: Mode) -> bool {
        match self.domain.as_ref().and_then(|d| d.mode) {
            Some(DomainMode::Learn) => false,
            Some(DomainMode::Enforce | DomainMode::Off) => true,
            None => global == Mode::Enforce,
        }
    }

    /// The decision taken when the store failed or was too slow.
    pub fn store_failure(fail_open: bool, error: String) -> Self {
        let (verdict, rule) = if fail_open {
            (Verdict::Pass, Rule::StoreFailOpen)
        } else {
            (Verdict::Defer, Rule::StoreFailClosed)
        };
        Decision {
            detail: Some(error),
            ..Decision::new(verdict, rule)
        }
    }
}

/// What the stored state decides on: the key, and how this request is to be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub key: TripletKey,
    /// The delay the triplet rule applies to this request.
    pub delay: Delay,
    pub identity: IdentityReason,
    /// Why the delay differs from the configured one (the DNSBL zones that list the client).
    pub detail: Option<String>,
    /// The recipient's `[[domains]]` section, when one matched.
    pub domain: Option<DomainApplied>,
}

/// A request that [`Engine::classify_unkeyed`] left open: its sender and recipient keys,
/// waiting for the client's identity (which DNS facts may decide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unkeyed<'e> {
    ip: IpAddr,
    section: Option<&'e DomainSection>,
    sender: String,
    recipient: String,
}

/// Rules 1–3 either decide, or yield the lookup that the stored state decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Decided(Decision),
    Lookup(Lookup),
}

/// What the triplet rule made of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TripletOutcome {
    New,
    EarlyRetry {
        remaining: u64,
    },
    Delayed {
        by: u64,
    },
    Known,
    /// The first retry after an operator released the pending triplet.
    Released {
        by: u64,
    },
}

impl TripletOutcome {
    /// Whether the request passes (and counts towards auto-allow).
    pub fn passes(self) -> bool {
        matches!(
            self,
            TripletOutcome::Delayed { .. }
                | TripletOutcome::Known
                | TripletOutcome::Released { .. }
        )
    }
}

/// What releasing a triplet found (see [`Engine::release_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseOutcome {
    /// It was pending: its next retry passes at once (rule `released`).
    Released,
    /// It had already passed (or been released): nothing changed.
    AlreadyPassed,
    /// No live record: nothing to release.
    NotFound,
}

/// Stored state relevant to one request, for [`Engine::decide`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    pub client: Option<ClientRecord>,
    pub triplet: Option<Triplet>,
    /// The client group's count of new triplets in its throttle window, when known.
    pub new_triplets: Option<NewTriplets>,
}

/// A client group's new pending triplets in its current throttle window
/// (`new_triplets_per_client`). The service keeps these (in a table of bounded size, not in
/// the store); the engine only reads and steps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTriplets {
    /// Unix seconds the window began: the group's first new triplet after the last one ended.
    pub window_start: u64,
    /// New triplets stored in the window.
    pub count: u32,
}

/// The decision logic with its policy, allow lists and selective greylisting. Cheap to
/// clone: the lists are shared, so a runtime-entry change or a reload swaps in a new
/// engine in one step.
#[derive(Debug, Default, Clone)]
pub struct Engine {
    pub policy: Policy,
    pub allow: Arc<AllowLists>,
    /// Operator entries made while running; shared so a reload keeps them.
    pub runtime: Arc<RuntimeLists>,
    pub selective: Selective,
    /// Per-recipient-domain sections (`[[domains]]`), in precedence order.
    pub domains: Arc<DomainPolicies>,
    /// How sender and recipient go into keys: as text or as keyed digests.
    pub addresses: AddressKeys,
}

impl Engine {
    pub fn new(policy: Policy, allow: AllowLists) -> Self {
        Engine {
            policy,
            allow: Arc::new(allow),
            runtime: Arc::default(),
            selective: Selective::default(),
            domains: Arc::default(),
            addresses: AddressKeys::plain(),
        }
    }

    /// The same engine with other per-recipient-domain sections.
    #[must_use]
    pub fn with_domains(self, domains: DomainPolicies) -> Self {
        Engine {
            domains: Arc::new(domains),
            ..self
        }
    }

    /// The section that applies to `recipient` (as received), if any.
    pub fn domain_section(&self, recipient: &str) -> Option<&DomainSection> {
        self.domains
            .find(recipient, &self.policy.recipient_delimiter)
    }

    /// The same engine keying addresses as `addresses` says.
    #[must_use]
    pub fn with_addresses(self, addresses: AddressKeys) -> Self {
        Engine { addresses, ..self }
    }

    /// A sender as keys hold it: normalised, then hashed when addresses are hashed.
    pub fn sender_key(&self, sender: &str) -> String {
        self.addresses.address(&normalize::normalize_sender(
            sender,
            &self.policy.recipient_delimiter,
        ))
    }

    /// A recipient as keys hold it: normalised, then hashed when addresses are hashed.
    pub fn recipient_key(&self, recipient: &str) -> String {
        self.addresses.address(&normalize::normalize_recipient(
            recipient,
            &self.policy.recipient_delimiter,
        ))
    }

    /// The same engine with other selective-greylisting settings.
    #[must_use]
    pub fn with_selective(self, selective: Selective) -> Self {
        Engine { selective, ..self }
    }

    /// The greylisting key of a request without DNS facts (client group, normalised sender
    /// and recipient).
    pub fn key(&self, ip: IpAddr, sender: &str, recipient: &str) -> TripletKey {
        self.identified_key(ip, sender, recipient, None).0
    }

    /// The key with the client identity the facts allow, and why it was chosen.
    pub fn identified_key(
        &self,
        ip: IpAddr,
        sender: &str,
        recipient: &str,
        facts: Option<&IdentityFacts>,
    ) -> (TripletKey, IdentityReason) {
        let p = &self.policy;
        let identity = identity::choose(&self.selective.identity_order, ip, sender, facts, || {
            normalize::client_group(ip, p.ipv4_prefix, p.ipv6_prefix)
        });
        let key = TripletKey {
            client: identity.key,
            sender: self.sender_key(sender),
            recipient: self.recipient_key(recipient),
        };
        (key, identity.why)
    }

    /// The delay this request serves: DNSBL-listed clients may wait longer, verified and
    /// unlisted ones less; the recipient's section may replace the configured delay and the
    /// verified treatment. `None` means verified, unlisted and `verified_skip`: no delay.
    fn delay_for(
        &self,
        facts: Option<&IdentityFacts>,
        identity: IdentityKind,
        section: Option<&DomainSection>,
    ) -> Option<(Delay, Option<String>)> {
        let configured = match section.and_then(|s| s.delay) {
            Some(seconds) => Delay {
                seconds,
                reason: DelayReason::Domain,
            },
            None => Delay {
                seconds: self.policy.delay,
                reason: DelayReason::Configured,
            },
        };
        let Some(f) = facts else {
            return Some((configured, None));
        };
        if f.dnsbl.listed() {
            let detail = format!("listed by {}", f.dnsbl.hits.join(", "));
            let delay = match self.selective.dnsbl_delay {
                Some(seconds) => Delay {
                    seconds,
                    reason: DelayReason::Dnsbl,
                },
                None => configured,
            };
            return Some((delay, Some(detail)));
        }
        if identity.is_verified() && f.dnsbl.clean() {
            let verified = section
                .and_then(|s| s.verified)
                .unwrap_or(self.selective.verified);
            return match verified {
                VerifiedTreatment::Greylist => Some((configured, None)),
                VerifiedTreatment::Delay(seconds) => Some((
                    Delay {
                        seconds,
                        reason: DelayReason::Verified,
                    },
                    None,
                )),
                VerifiedTreatment::Skip => None,
            };
        }
        Some((configured, None))
    }

    /// Rules 1–3: stage, authentication, runtime deny and allow entries, the recipient's
    /// section when its mode is `off`, static allow lists, DNS lists; none needs the store. `now` only
    /// decides whether runtime entries have expired. Every decision past the first three
    /// checks names the recipient's section, when one matched.
    pub fn classify(&self, req: &Request, now: u64) -> Classified {
        match self.classify_unkeyed(req, now) {
            Err(decided) => Classified::Decided(decided),
            Ok(unkeyed) => self.classify_keyed(unkeyed, req),
        }
    }

    /// [`Engine::classify`]'s checks that need no DNS facts (everything but the client's
    /// identity, the DNS lists and the delay): their decision, or what
    /// [`Engine::classify_keyed`] finishes with the facts. A front end that gathers facts
    /// only for requests these checks leave open classifies each request once.
    // The decision is the usual outcome, not a rare error: returned by value, as
    // `Classified` holds it.
    #[allow(clippy::result_large_err)]
    pub fn classify_unkeyed<'e>(
        &'e self,
        req: &Request,
        now: u64,
    ) -> Result<Unkeyed<'e>, Decision> {
        if !req.stage.eq_ignore_ascii_case("RCPT") {
            return Err(Decision::new(Verdict::Skip, Rule::NotRcptStage));
        }
        if !req.sasl_username.is_empty() {
            return Err(Decision::new(Verdict::Skip, Rule::Authenticated));
        }
        let Some(ip) = req.client_ip else {
            return Err(Decision::new(Verdict::Skip, Rule::NoClientAddress));
        };
        let section = self.domain_section(&req.recipient);
        self.unkeyed_with(req, ip, section, now).map_err(|mut d| {
            d.domain = section.map(|s| s.applied.clone());
            d
        })
    }

    /// [`Engine::classify_unkeyed`] past its first three checks, for the recipient's
    /// `section`.
    #[allow(clippy::result_large_err)]
    fn unkeyed_with<'e>(
        &'e self,
        req: &Request,
        ip: IpAddr,
        section: Option<&'e DomainSection>,
        now: u64,
    ) -> Result<Unkeyed<'e>, Decision> {
        let done = |verdict, rule, detail: Option<String>| Decision {
            detail,
            ..Decision::new(verdict, rule)
        };
        if !self.runtime.is_empty() {
            let key = self.key(ip, &req.sender, &req.recipient);
            let find = |list| {
                self.runtime.find(
                    list,
                    ip,
                    &req.client_name,
                    (&key.sender, &req.sender),
                    (&key.recipient, &req.recipient),
                    now,
                )
            };
            // A deny entry outranks every allow list: it is the operator's latest word.
            if let Some(m) = find(ListKind::Deny) {
                return Err(Decision {
                    detail: Some(m.entry.to_string()),
                    key: Some(key),
                    ..Decision::new(Verdict::Defer, Rule::Deny)
                });
            }
            if let Some(m) = find(ListKind::Allow) {
                return Err(done(
                    Verdict::Pass,
                    Rule::RuntimeAllow,
                    Some(m.entry.to_string()),
                ));
            }
        }
        if let Some(s) = section.filter(|s| s.mode() == Some(DomainMode::Off)) {
            let detail = match &s.applied.source {
                Some(src) => format!("section {:?} ({src}) has mode off", s.name()),
                None => format!("section {:?} has mode off", s.name()),
            };
            return Err(done(Verdict::Pass, Rule::DomainOff, Some(detail)));
        }
        if let Some((kind, origin)) = self.allow.match_client(ip, &req.client_name) {
            let rule = match kind {
                AllowKind::ClientAddress => Rule::AllowClientAddress,
                _ => Rule::AllowClientName,
            };
            return Err(done(Verdict::Pass, rule, Some(origin.to_string())));
        }
        let recipient = self.recipient_key(&req.recipient);
        if let Some(origin) = self.allow.match_recipient(&recipient, &req.recipient) {
            return Err(done(
                Verdict::Pass,
                Rule::AllowRecipient,
                Some(origin.to_string()),
            ));
        }
        let sender = self.sender_key(&req.sender);
        if let Some(origin) = self.allow.match_sender(&sender, &req.sender) {
            return Err(done(
                Verdict::Pass,
                Rule::AllowSender,
                Some(origin.to_string()),
            ));
        }
        Ok(Unkeyed {
            ip,
            section,
            sender,
            recipient,
        })
    }

    /// Finishes [`Engine::classify_unkeyed`]'s open request `req` with its DNS facts
    /// (`req.facts`, `None`: none gathered): the client's identity, the DNS lists, the
    /// delay.
    pub fn classify_keyed(&self, u: Unkeyed<'_>, req: &Request) -> Classified {
        let p = &self.policy;
        let facts = req.facts.as_ref();
        let ip = u.ip;
        let identity = identity::choose(
            &self.selective.identity_order,
            ip,
            &req.sender,
            facts,
            || normalize::client_group(ip, p.ipv4_prefix, p.ipv6_prefix),
        );
        let key = TripletKey {
            client: identity.key,
            sender: u.sender,
            recipient: u.recipient,
        };
        let identity = identity.why;
        let domain = u.section.map(|s| s.applied.clone());
        // DNS lists come after the static lists, whose matches name an operator's own entry.
        // A DNSWL listing wins over a DNSBL one: the operator trusts that zone to vouch.
        if let Some(f) = facts.filter(|f| f.dnswl.listed()) {
            return Classified::Decided(Decision {
                detail: Some(format!("listed by {}", f.dnswl.hits.join(", "))),
                key: Some(key),
                identity: Some(identity),
                domain,
                ..Decision::new(Verdict::Pass, Rule::Dnswl)
            });
        }
        let Some((delay, detail)) = self.delay_for(facts, identity.kind, u.section) else {
            return Classified::Decided(Decision {
                detail: Some("verified identity, not listed by any DNSBL zone".into()),
                key: Some(key),
                identity: Some(identity),
                domain,
                ..Decision::new(Verdict::Pass, Rule::VerifiedUnlisted)
            });
        };
        Classified::Lookup(Lookup {
            key,
            delay,
            identity,
            detail,
            domain,
        })
    }

    /// Whether rule 4 is in use at all (`auto_allow_after` > 0).
    pub fn auto_allow_enabled(&self) -> bool {
        self.policy.auto_allow_after > 0
    }

    fn client_alive(&self, rec: &ClientRecord, now: u64) -> bool {
        now.saturating_sub(rec.last_seen) <= self.policy.auto_allow_lifetime
    }

    /// Rule 4: is the client group auto-allowed?
    pub fn client_allowed(&self, rec: Option<&ClientRecord>, now: u64) -> bool {
        self.auto_allow_enabled()
            && rec.is_some_and(|r| {
                self.client_alive(r, now) && r.passes >= self.policy.auto_allow_after
            })
    }

    /// Rule 4's write: an allowed group's record is refreshed so it stays allowed while it
    /// keeps sending; `None` means nothing to write.
    pub fn client_seen(&self, rec: Option<&ClientRecord>, now: u64) -> Option<ClientRecord> {
        let rec = rec.filter(|r| self.client_allowed(Some(r), now))?;
        Some(ClientRecord {
            last_seen: now,
            expires_at: now.saturating_add(self.policy.auto_allow_lifetime),
            ..*rec
        })
    }

    /// A triplet pass counts towards auto-allow, at most once per hour per client group.
    pub fn count_pass(&self, rec: Option<&ClientRecord>, now: u64) -> Option<ClientRecord> {
        if !self.auto_allow_enabled() {
            return None;
        }
        let lifetime = self.policy.auto_allow_lifetime;
        let live = rec.filter(|r| self.client_alive(r, now));
        let counts = live.is_none_or(|r| now.saturating_sub(r.last_counted) >= PASS_COUNT_WINDOW);
        let (passes, last_counted) = match live {
            Some(r) if !counts => (r.passes, r.last_counted),
            Some(r) => (r.passes.saturating_add(1), now),
            None => (1, now),
        };
        Some(ClientRecord {
            passes,
            last_counted,
            last_seen: now,
            expires_at: now.saturating_add(lifetime),
        })
    }

    /// Whether new triplets are limited per client group at all.
    pub fn throttle_enabled(&self) -> bool {
        self.policy.new_triplets_per_client > 0
    }

    /// The window `w` if it still runs at `now`. A clock that went back keeps it running.
    fn throttle_window<'w>(&self, w: Option<&'w NewTriplets>, now: u64) -> Option<&'w NewTriplets> {
        w.filter(|w| {
            now < w
                .window_start
                .saturating_add(self.policy.new_triplets_window)
        })
    }

    /// Whether the group whose window is `w` may not add a new triplet at `now`: the
    /// seconds until its window ends, or `None` when it may.
    pub fn throttled(&self, w: Option<&NewTriplets>, now: u64) -> Option<u64> {
        if !self.throttle_enabled() {
            return None;
        }
        let w = self.throttle_window(w, now)?;
        (w.count >= self.policy.new_triplets_per_client).then(|| {
            w.window_start
                .saturating_add(self.policy.new_triplets_window)
                .saturating_sub(now)
        })
    }

    /// The window after the group stored one more new triplet at `now` (a new window when
    /// the old one ended).
    pub fn count_new_triplet(&self, w: Option<&NewTriplets>, now: u64) -> NewTriplets {
        match self.throttle_window(w, now) {
            Some(w) => NewTriplets {
                count: w.count.saturating_add(1),
                ..*w
            },
            None => NewTriplets {
                window_start: now,
                count: 1,
            },
        }
    }

    /// The decision for a new triplet the throttle refused: deferred like a new one, told
    /// to come back once the window has ended and the delay would be served.
    pub fn throttled_decision(
        &self,
        lookup: Lookup,
        wait: u64,
        record: Option<Triplet>,
        client_record: Option<ClientRecord>,
    ) -> Decision {
        let p = &self.policy;
        let mut detail = format!(
            "client group {} added its {} new triplets of the last {} s; not stored",
            lookup.key.client, p.new_triplets_per_client, p.new_triplets_window
        );
        if let Some(d) = &lookup.detail {
            detail.push_str("; ");
            detail.push_str(d);
        }
        Decision {
            remaining: Some(wait.saturating_add(lookup.delay.seconds)),
            detail: Some(detail),
            key: Some(lookup.key),
            identity: Some(lookup.identity),
            delay: Some(lookup.delay),
            domain: lookup.domain,
            record,
            client_record,
            ..Decision::new(Verdict::Defer, Rule::Throttled)
        }
    }

    /// Whether a stored triplet still counts (not past its retry window or `max_age`).
    pub fn triplet_alive(&self, t: &Triplet, now: u64) -> bool {
        if t.passed {
            now.saturating_sub(t.last_seen) <= self.policy.max_age
        } else {
            now.saturating_sub(t.first_seen) <= self.policy.retry_window
        }
    }

    /// Rule 5 as a pure state transition: what the old record means now, and the record to
    /// write. Runs inside a store's atomic update. `delay` is this request's
    /// ([`Lookup::delay`]; `policy.delay` when no DNS facts change it): a retry passes once
    /// the delay it brings has been served since the first sighting.
    pub fn triplet_step(
        &self,
        old: Option<&Triplet>,
        now: u64,
        delay: u64,
    ) -> (TripletOutcome, Triplet) {
        let p = &self.policy;
        match old.filter(|t| self.triplet_alive(t, now)) {
            None => (
                TripletOutcome::New,
                Triplet {
                    first_seen: now,
                    last_seen: now,
                    expires_at: now.saturating_add(p.retry_window),
                    attempts: 1,
                    passes: 0,
                    passed: false,
                },
            ),
            // Released by an operator and not retried since: this retry ends greylisting,
            // leaving the record a pass of the engine's own would leave.
            Some(t) if t.passed && t.passes == 0 => (
                TripletOutcome::Released {
                    by: now.saturating_sub(t.first_seen),
                },
                Triplet {
                    last_seen: now,
                    expires_at: now.saturating_add(p.max_age),
                    passes: 1,
                    ..*t
                },
            ),
            Some(t) if t.passed => (
                TripletOutcome::Known,
                Triplet {
                    last_seen: now,
                    expires_at: now.saturating_add(p.max_age),
                    passes: t.passes.saturating_add(1),
                    ..*t
                },
            ),
            Some(t) => {
                // Clocks of several MX hosts may disagree a little: a "future" first sighting
                // counts as just now, which defers rather than passes early.
                let elapsed = now.saturating_sub(t.first_seen);
                if elapsed < delay {
                    let next = Triplet {
                        last_seen: now.max(t.last_seen),
                        attempts: t.attempts.saturating_add(1),
                        ..*t
                    };
                    let remaining = delay - elapsed;
                    (TripletOutcome::EarlyRetry { remaining }, next)
                } else {
                    let next = Triplet {
                        last_seen: now,
                        expires_at: now.saturating_add(p.max_age),
                        passes: 1,
                        passed: true,
                        ..*t
                    };
                    (TripletOutcome::Delayed { by: elapsed }, next)
                }
            }
        }
    }

    /// An operator's release as a pure state transition, run inside a store's atomic
    /// update: a live pending triplet becomes passed with no pass counted yet
    /// (`passes` 0, which the engine's own passes never leave), so that its next retry
    /// passes at once with rule `released` ([`Engine::triplet_step`]). It lives as a passed
    /// record does, `max_age` from its last attempt. Anything else is left as it is
    /// (`None`: nothing to write).
    pub fn release_step(
        &self,
        old: Option<&Triplet>,
        now: u64,
    ) -> (ReleaseOutcome, Option<Triplet>) {
        match old.filter(|t| self.triplet_alive(t, now)) {
            None => (ReleaseOutcome::NotFound, None),
            Some(t) if t.passed => (ReleaseOutcome::AlreadyPassed, None),
            Some(t) => (
                ReleaseOutcome::Released,
                Some(Triplet {
                    expires_at: t.last_seen.saturating_add(self.policy.max_age),
                    passes: 0,
                    passed: true,
                    ..*t
                }),
            ),
        }
    }

    /// The decision of rule 4.
    pub fn auto_allow_decision(lookup: Lookup, client_record: Option<ClientRecord>) -> Decision {
        Decision {
            key: Some(lookup.key),
            identity: Some(lookup.identity),
            detail: lookup.detail,
            domain: lookup.domain,
            client_record,
            ..Decision::new(Verdict::Pass, Rule::AutoAllow)
        }
    }

    /// The decision for a triplet outcome.
    pub fn triplet_decision(
        &self,
        lookup: Lookup,
        outcome: TripletOutcome,
        record: Option<Triplet>,
        client_record: Option<ClientRecord>,
    ) -> Decision {
        let mut d = match outcome {
            TripletOutcome::New => Decision {
                remaining: Some(lookup.delay.seconds),
                ..Decision::new(Verdict::Defer, Rule::New)
            },
            TripletOutcome::EarlyRetry { remaining } => Decision {
                remaining: Some(remaining),
                ..Decision::new(Verdict::Defer, Rule::EarlyRetry)
            },
            TripletOutcome::Delayed { by } => Decision {
                delayed: Some(by),
                ..Decision::new(Verdict::Pass, Rule::Delayed)
            },
            TripletOutcome::Known => Decision::new(Verdict::Pass, Rule::Known),
            TripletOutcome::Released { by } => Decision {
                delayed: Some(by),
                ..Decision::new(Verdict::Pass, Rule::Released)
            },
        };
        d.key = Some(lookup.key);
        d.identity = Some(lookup.identity);
        d.delay = Some(lookup.delay);
        d.detail = lookup.detail;
        d.domain = lookup.domain;
        d.record = record;
        d.client_record = client_record;
        d
    }

    /// The whole decision over a snapshot of the stored state, and the state to store after
    /// it. Pure: explanations and property tests use it; the service runs the same steps
    /// as atomic store updates.
    pub fn decide(&self, req: &Request, state: &State, now: u64) -> (Decision, State) {
        let lookup = match self.classify(req, now) {
            Classified::Decided(d) => return (d, *state),
            Classified::Lookup(lookup) => lookup,
        };
        let client = state.client.as_ref();
        if self.client_allowed(client, now) {
            let d = Self::auto_allow_decision(lookup, state.client);
            let next = State {
                client: self.client_seen(client, now).or(state.client),
                ..*state
            };
            return (d, next);
        }
        let (outcome, triplet) =
            self.triplet_step(state.triplet.as_ref(), now, lookup.delay.seconds);
        let mut new_triplets = state.new_triplets;
        if outcome == TripletOutcome::New && self.throttle_enabled() {
            let w = state.new_triplets.as_ref();
            if let Some(wait) = self.throttled(w, now) {
                let d = self.throttled_decision(lookup, wait, state.triplet, state.client);
                return (d, *state);
            }
            new_triplets = Some(self.count_new_triplet(w, now));
        }
        let passed = outcome.passes();
        let next = State {
            client: if passed {
                self.count_pass(client, now).or(state.client)
            } else {
                state.client
            },
            triplet: Some(triplet),
            new_triplets,
        };
        let d = self.triplet_decision(lookup, outcome, state.triplet, state.client);
        (d, next)
    }
}

#[cfg(test)]
mod tests;
