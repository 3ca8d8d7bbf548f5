//! Explanations: what greygate would decide for a request and why, from the stored state,
//! without changing it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::dns::Gatherer;
use crate::engine::{
    Classified, ClientRecord, Decision, DelayReason, Engine, HostName, IdentityFacts, Request,
    State, Triplet,
};
use crate::store::{Store, StoreError};

/// A decision with its context, ready to print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub now: u64,
    pub decision: Decision,
    /// The policy reply an MTA would get.
    pub reply: String,
    /// What the store would hold afterwards (not written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triplet_after: Option<Triplet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_after: Option<ClientRecord>,
    pub auto_allow_after: u32,
    /// The delay this request serves (the configured one unless DNS list facts change it).
    pub delay: u64,
    /// The DNS facts the decision used (gathered now, when `[dns]` is enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facts: Option<IdentityFacts>,
    /// What DNS could not say in time, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
}

/// Why an explanation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("this request is decided by the stored state, which cannot be read: {0}")]
    Store(#[from] StoreError),
    #[error("this request is decided by the stored state, and {0}")]
    NoStore(String),
}

/// Explains `req` at `now`. `store` is `Err(why)` when it could not be opened: requests
/// that the static rules decide are still explained. With `dns`, the request's DNS facts
/// are gathered first, as the daemon would, so the explanation shows the identity really
/// used.
pub async fn explain(
    engine: &Engine,
    store: Result<&dyn Store, String>,
    dns: Option<&Gatherer>,
    req: &Request,
    now: u64,
    reply: impl Fn(&Decision) -> String,
) -> Result<Explanation, ExplainError> {
    let enriched = match dns {
        Some(g) => g.facts_for(engine, req, now).await,
        None => None,
    };
    let (req, note) = match &enriched {
        Some((with, gathered)) => (with, gathered.note()),
        None => (req, None),
    };
    let mut state = State::default();
    if let Classified::Lookup(lookup) = engine.classify(req, now) {
        let store = store.map_err(ExplainError::NoStore)?;
        state.client = store.get_client(&lookup.key.client).await?;
        state.triplet = store.get_triplet(&lookup.key).await?;
    }
    let (decision, after) = engine.decide(req, &state, now);
    Ok(Explanation {
        now,
        reply: reply(&decision),
        triplet_after: after.triplet.filter(|t| Some(*t) != state.triplet),
        client_after: after.client.filter(|c| Some(*c) != state.client),
        delay: decision.delay.map_or(engine.policy.delay, |d| d.seconds),
        decision,
        auto_allow_after: engine.policy.auto_allow_after,
        facts: req.facts.clone(),
        dns: note,
    })
}

/// The facts in one line: `spf pass (example.com); host mx.example.com (verified); ...`.
fn facts_text(f: &IdentityFacts) -> String {
    let mut parts = Vec::new();
    if let Some(spf) = &f.spf {
        parts.push(format!("spf {} ({})", spf.result.as_str(), spf.domain));
    }
    parts.push(match &f.name {
        HostName::Verified(n) => format!("host {n} (forward-confirmed)"),
        HostName::Unverified => "host not forward-confirmed".into(),
        HostName::Timeout => "host name not known in time".into(),
        HostName::Unknown => "host name not looked up".into(),
    });
    for (kind, l) in [("dnswl", &f.dnswl), ("dnsbl", &f.dnsbl)] {
        if l.listed() {
            parts.push(format!("{kind}: listed by {}", l.hits.join(", ")));
        } else if !l.complete {
            parts.push(format!("{kind}: not every zone answered"));
        }
    }
    parts.join("; ")
}

fn when(t: u64, now: u64) -> String {
    let date = jiff::Timestamp::from_second(i64::try_from(t).unwrap_or(i64::MAX)).map_or_else(
        |_| t.to_string(),
        |ts| ts.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
    );
    let rel = if t <= now {
        format!("{} s ago", now - t)
    } else {
        format!("in {} s", t - now)
    };
    format!("{date} ({rel})")
}

impl Explanation {
    /// A human-readable explanation.
    pub fn to_text(&self) -> String {
        let d = &self.decision;
        let mut s = String::new();
        let _ = writeln!(s, "decision:   {} (rule: {})", d.verdict.as_str(), d.rule);
        let _ = writeln!(s, "reply:      {}", self.reply);
        if let Some(detail) = &d.detail {
            let _ = writeln!(s, "because:    {detail}");
        }
        if let Some(i) = &d.identity {
            let _ = writeln!(s, "identity:   {} — {}", i.kind, i.reason);
        }
        if let Some(f) = &self.facts {
            let _ = writeln!(s, "dns facts:  {}", facts_text(f));
        }
        if let Some(note) = &self.dns {
            let _ = writeln!(s, "dns:        {note}");
        }
        if let Some(k) = &d.key {
            let _ = writeln!(s, "key:        client {}", k.client);
            let _ = writeln!(s, "            sender {}", k.sender);
            let _ = writeln!(s, "            recipient {}", k.recipient);
            match &d.record {
                None => {
                    let _ = writeln!(s, "record:     none (first sighting)");
                }
                Some(t) => {
                    let state = if t.passed { "passed" } else { "pending" };
                    let _ = writeln!(
                        s,
                        "record:     {state}; first seen {}; last seen {}; {} deferred attempt(s), {} pass(es); expires {}",
                        when(t.first_seen, self.now),
                        when(t.last_seen, self.now),
                        t.attempts,
                        t.passes,
                        when(t.expires_at, self.now)
                    );
                }
            }
            match &d.client_record {
                Some(c) if self.auto_allow_after > 0 => {
                    let _ = writeln!(
                        s,
                        "auto-allow: {} of {} counted passes; last seen {}",
                        c.passes,
                        self.auto_allow_after,
                        when(c.last_seen, self.now)
                    );
                }
                _ if self.auto_allow_after == 0 => {
                    let _ = writeln!(s, "auto-allow: off");
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "auto-allow: 0 of {} counted passes",
                        self.auto_allow_after
                    );
                }
            }
        }
        if let Some(r) = d.remaining {
            let why = match d.delay.map(|d| d.reason) {
                Some(DelayReason::Dnsbl) => ", longer for DNSBL-listed clients",
                Some(DelayReason::Verified) => ", for a verified identity on no DNSBL",
                Some(DelayReason::Configured) | None => "",
            };
            let _ = writeln!(
                s,
                "remaining:  {r} s until a retry passes (delay {} s{why})",
                self.delay
            );
        }
        if let Some(by) = d.delayed {
            let _ = writeln!(
                s,
                "delayed:    {by} s in all; this attempt ends greylisting"
            );
        }
        s
    }
}

/// Reads a time given as Unix seconds or RFC 3339 (`--at`, the API's `at`).
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs);
    }
    let ts: jiff::Timestamp = s
        .parse()
        .map_err(|_| format!("{s:?} is neither Unix seconds nor an RFC 3339 time"))?;
    u64::try_from(ts.as_second()).map_err(|_| format!("{s:?} is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Listing, Selective, SpfFact, SpfResult};

    fn explained(engine: &Engine, req: &Request) -> Explanation {
        let (decision, _) = engine.decide(req, &State::default(), 1_700_000_000);
        Explanation {
            now: 1_700_000_000,
            reply: "DEFER_IF_PERMIT".into(),
            triplet_after: None,
            client_after: None,
            delay: decision.delay.map_or(engine.policy.delay, |d| d.seconds),
            decision,
            auto_allow_after: engine.policy.auto_allow_after,
            facts: req.facts.clone(),
            dns: None,
        }
    }

    fn request() -> Request {
        Request {
            stage: "RCPT".into(),
            client_ip: Some("209.85.220.41".parse().expect("ip")),
            client_name: "unknown".into(),
            sender: "alice@gmail.com".into(),
            recipient: "bob@rcpt.example".into(),
            ..Request::default()
        }
    }

    #[test]
    fn every_keyed_explanation_names_the_identity_and_why() {
        let engine = Engine::default();
        let text = explained(&engine, &request()).to_text();
        assert!(
            text.contains("identity:   prefix — IP prefix: no DNS facts"),
            "{text}"
        );

        let engine = Engine::default().with_selective(Selective {
            dnsbl_delay: Some(3_600),
            ..Selective::default()
        });
        let req = Request {
            facts: Some(IdentityFacts {
                spf: Some(SpfFact {
                    domain: "gmail.com".into(),
                    result: SpfResult::Pass,
                }),
                name: HostName::Unverified,
                dnswl: Listing::default(),
                dnsbl: Listing {
                    hits: vec!["zen.spamhaus.org".into()],
                    complete: true,
                },
            }),
            ..request()
        };
        let e = explained(&engine, &req);
        let text = e.to_text();
        assert!(
            text.contains("identity:   spf — SPF of gmail.com"),
            "{text}"
        );
        assert!(text.contains("client spf:gmail.com"), "{text}");
        assert!(
            text.contains("because:    listed by zen.spamhaus.org"),
            "{text}"
        );
        assert!(
            text.contains("(delay 3600 s, longer for DNSBL-listed clients)"),
            "{text}"
        );
        let json = serde_json::to_value(&e).expect("JSON");
        assert_eq!(json["decision"]["identity"]["kind"], "spf");
        assert_eq!(json["decision"]["delay"]["reason"], "dnsbl");
        assert_eq!(json["delay"], 3_600);
    }
}
