//! The greylisting decision: pure functions of (request, stored state, policy, now).
//!
//! **The engine never reads the clock and never does I/O.** Callers pass `now` (Unix
//! seconds) and the records they loaded; the engine says what to answer and what to
//! write. The same step functions run inside a store's atomic update, so two hosts that
//! see a triplet at the same moment still agree on its first sighting.

pub mod allow;
pub mod normalize;
pub mod record;
pub mod runtime;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

pub use allow::{AllowKind, AllowLists, Origin};
pub use record::{ClientRecord, Triplet};
pub use runtime::{ListKind, RuntimeEntry, RuntimeLists, Target};

/// Seconds in the hour within which passes of one client group count once.
const PASS_COUNT_WINDOW: u64 = 3600;

/// Enforce decisions, or only record and log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Defer unknown triplets (the normal operation).
    #[default]
    Enforce,
    /// Decide and record as if enforcing, but always accept: warms the database before
    /// greylisting delays anything.
    Learn,
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
}

/// The greylisting key of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TripletKey {
    /// Client identity: the IP group now (`192.0.2.0/24`); pool-aware identities later.
    pub client: String,
    pub sender: String,
    pub recipient: String,
}

impl TripletKey {
    /// One string for stores; the parts cannot contain NUL (front ends refuse it).
    pub fn joined(&self) -> String {
        format!("{}\0{}\0{}", self.client, self.sender, self.recipient)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
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
    AutoAllow,
    /// No live record: first sighting, or the previous one expired.
    New,
    /// Pending and retried before the delay ended.
    EarlyRetry,
    /// Pending and retried within the window after the delay: the pass that ends greylisting.
    Delayed,
    /// Already passed and seen within `max_age`.
    Known,
    StoreFailOpen,
    StoreFailClosed,
}

impl Rule {
    /// Every rule, in declaration order (`rule as usize` indexes it): metrics keep one
    /// counter per rule without a map.
    pub const ALL: [Rule; 16] = [
        Rule::NotRcptStage,
        Rule::NoClientAddress,
        Rule::Authenticated,
        Rule::AllowClientAddress,
        Rule::AllowClientName,
        Rule::AllowRecipient,
        Rule::AllowSender,
        Rule::RuntimeAllow,
        Rule::Deny,
        Rule::AutoAllow,
        Rule::New,
        Rule::EarlyRetry,
        Rule::Delayed,
        Rule::Known,
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
            Rule::AutoAllow => "auto-allow",
            Rule::New => "new",
            Rule::EarlyRetry => "early-retry",
            Rule::Delayed => "delayed",
            Rule::Known => "known",
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

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
}

impl Decision {
    fn new(verdict: Verdict, rule: Rule) -> Self {
        Decision {
            verdict,
            rule,
            detail: None,
            key: None,
            record: None,
            client_record: None,
            remaining: None,
            delayed: None,
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

/// Rules 1–3 either decide, or yield the key that the stored state decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    Decided(Decision),
    Lookup(TripletKey),
}

/// What the triplet rule made of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TripletOutcome {
    New,
    EarlyRetry { remaining: u64 },
    Delayed { by: u64 },
    Known,
}

/// Stored state relevant to one request, for [`Engine::decide`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    pub client: Option<ClientRecord>,
    pub triplet: Option<Triplet>,
}

/// The decision logic with its policy and allow lists. Cheap to clone: the lists are
/// shared, so a runtime-entry change or a reload swaps in a new engine in one step.
#[derive(Debug, Default, Clone)]
pub struct Engine {
    pub policy: Policy,
    pub allow: Arc<AllowLists>,
    /// Operator entries made while running; shared so a reload keeps them.
    pub runtime: Arc<RuntimeLists>,
}

impl Engine {
    pub fn new(policy: Policy, allow: AllowLists) -> Self {
        Engine {
            policy,
            allow: Arc::new(allow),
            runtime: Arc::default(),
        }
    }

    /// The greylisting key of a request (client group, normalised sender and recipient).
    pub fn key(&self, ip: IpAddr, sender: &str, recipient: &str) -> TripletKey {
        let p = &self.policy;
        TripletKey {
            client: normalize::client_group(ip, p.ipv4_prefix, p.ipv6_prefix),
            sender: normalize::normalize_sender(sender, &p.recipient_delimiter),
            recipient: normalize::normalize_recipient(recipient, &p.recipient_delimiter),
        }
    }

    /// Rules 1–3: stage, authentication, runtime deny, static and runtime allow lists;
    /// none needs the store. `now` only decides whether runtime entries have expired.
    pub fn classify(&self, req: &Request, now: u64) -> Classified {
        let done = |verdict, rule, detail: Option<String>| {
            Classified::Decided(Decision {
                detail,
                ..Decision::new(verdict, rule)
            })
        };
        if !req.stage.eq_ignore_ascii_case("RCPT") {
            return done(Verdict::Skip, Rule::NotRcptStage, None);
        }
        if !req.sasl_username.is_empty() {
            return done(Verdict::Skip, Rule::Authenticated, None);
        }
        let Some(ip) = req.client_ip else {
            return done(Verdict::Skip, Rule::NoClientAddress, None);
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
                return Classified::Decided(Decision {
                    detail: Some(m.entry.to_string()),
                    key: Some(key),
                    ..Decision::new(Verdict::Defer, Rule::Deny)
                });
            }
            if let Some(m) = find(ListKind::Allow) {
                return done(Verdict::Pass, Rule::RuntimeAllow, Some(m.entry.to_string()));
            }
        }
        if let Some((kind, origin)) = self.allow.match_client(ip, &req.client_name) {
            let rule = match kind {
                AllowKind::ClientAddress => Rule::AllowClientAddress,
                _ => Rule::AllowClientName,
            };
            return done(Verdict::Pass, rule, Some(origin.to_string()));
        }
        let key = self.key(ip, &req.sender, &req.recipient);
        if let Some(origin) = self.allow.match_recipient(&key.recipient, &req.recipient) {
            return done(
                Verdict::Pass,
                Rule::AllowRecipient,
                Some(origin.to_string()),
            );
        }
        if let Some(origin) = self.allow.match_sender(&key.sender, &req.sender) {
            return done(Verdict::Pass, Rule::AllowSender, Some(origin.to_string()));
        }
        Classified::Lookup(key)
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

    /// Whether a stored triplet still counts (not past its retry window or `max_age`).
    pub fn triplet_alive(&self, t: &Triplet, now: u64) -> bool {
        if t.passed {
            now.saturating_sub(t.last_seen) <= self.policy.max_age
        } else {
            now.saturating_sub(t.first_seen) <= self.policy.retry_window
        }
    }

    /// Rule 5 as a pure state transition: what the old record means now, and the record to
    /// write. Runs inside a store's atomic update.
    pub fn triplet_step(&self, old: Option<&Triplet>, now: u64) -> (TripletOutcome, Triplet) {
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
                if elapsed < p.delay {
                    let next = Triplet {
                        last_seen: now.max(t.last_seen),
                        attempts: t.attempts.saturating_add(1),
                        ..*t
                    };
                    let remaining = p.delay - elapsed;
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

    /// The decision of rule 4.
    pub fn auto_allow_decision(key: TripletKey, client_record: Option<ClientRecord>) -> Decision {
        Decision {
            key: Some(key),
            client_record,
            ..Decision::new(Verdict::Pass, Rule::AutoAllow)
        }
    }

    /// The decision for a triplet outcome.
    pub fn triplet_decision(
        &self,
        key: TripletKey,
        outcome: TripletOutcome,
        record: Option<Triplet>,
        client_record: Option<ClientRecord>,
    ) -> Decision {
        let mut d = match outcome {
            TripletOutcome::New => Decision {
                remaining: Some(self.policy.delay),
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
        };
        d.key = Some(key);
        d.record = record;
        d.client_record = client_record;
        d
    }

    /// The whole decision over a snapshot of the stored state, and the state to store after
    /// it. Pure: explanations and property tests use it; the service runs the same steps
    /// as atomic store updates.
    pub fn decide(&self, req: &Request, state: &State, now: u64) -> (Decision, State) {
        let key = match self.classify(req, now) {
            Classified::Decided(d) => return (d, *state),
            Classified::Lookup(key) => key,
        };
        let client = state.client.as_ref();
        if self.client_allowed(client, now) {
            let d = Self::auto_allow_decision(key, state.client);
            let next = State {
                client: self.client_seen(client, now).or(state.client),
                ..*state
            };
            return (d, next);
        }
        let (outcome, triplet) = self.triplet_step(state.triplet.as_ref(), now);
        let passed = matches!(
            outcome,
            TripletOutcome::Delayed { .. } | TripletOutcome::Known
        );
        let next = State {
            client: if passed {
                self.count_pass(client, now).or(state.client)
            } else {
                state.client
            },
            triplet: Some(triplet),
        };
        let d = self.triplet_decision(key, outcome, state.triplet, state.client);
        (d, next)
    }
}

#[cfg(test)]
mod tests;
