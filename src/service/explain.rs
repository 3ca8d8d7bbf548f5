//! Explanations: what greygate would decide for a request and why, from the stored state,
//! without changing it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::dns::Gatherer;
use crate::engine::{
    Classified, ClientRecord, Decision, DelayReason, Engine, HostName, IdentityFacts, NewTriplets,
    Request, State, Triplet,
};
use crate::store::{Store, StoreError};

use super::Throttle;

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
    /// The client group's new triplets against `new_triplets_per_client`, for a request the
    /// stored state decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default)]
    pub throttle: Option<ThrottleView>,
}

/// A client group's new triplets against the limit (`new_triplets_per_client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleView {
    /// New triplets per group and window; 0: no limit.
    pub limit: u32,
    /// Seconds per window.
    pub window: u64,
    /// Whether the count below is the daemon's: the counts live in the running daemon's
    /// memory, so an explanation without it (`explain` without `--live`) cannot know them.
    pub known: bool,
    /// The group's window, if it has one now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted: Option<NewTriplets>,
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
/// used. `throttle` is the running daemon's count of new triplets (`None` outside it: the
/// explanation then assumes the group is under its limit, and says so).
pub async fn explain(
    engine: &Engine,
    store: Result<&dyn Store, String>,
    throttle: Option<&Throttle>,
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
    let mut throttle_view = None;
    if let Classified::Lookup(lookup) = engine.classify(req, now) {
        let store = store.map_err(ExplainError::NoStore)?;
        state.client = store.get_client(&lookup.key.client).await?;
        state.triplet = store.get_triplet(&lookup.key).await?;
        state.new_triplets = throttle.and_then(|t| t.get(&lookup.key.client));
        throttle_view = Some(ThrottleView {
            limit: engine.policy.new_triplets_per_client,
            window: engine.policy.new_triplets_window,
            known: throttle.is_some(),
            // A window that has ended counts nothing.
            counted: state.new_triplets.filter(|w| {
                now < w
                    .window_start
                    .saturating_add(engine.policy.new_triplets_window)
            }),
        });
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
        throttle: throttle_view,
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
        if let Some(sec) = &d.domain {
            let _ = write!(s, "domain:     section {:?}", &*sec.name);
            if let Some(src) = &sec.source {
                let _ = write!(s, " ({src})");
            }
            let _ = writeln!(
                s,
                ", mode {}",
                sec.mode.map_or("as configured globally", |m| m.as_str())
            );
        }
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
                    let state = match (t.passed, t.passes) {
                        (true, 0) => "released by an operator, not retried since",
                        (true, _) => "passed",
                        (false, _) => "pending",
                    };
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
            if let Some(t) = &self.throttle {
                let _ = writeln!(s, "throttle:   {}", t.text(self.now));
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
                Some(DelayReason::Domain) => ", the delay of the recipient's section",
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

impl ThrottleView {
    fn text(&self, now: u64) -> String {
        if self.limit == 0 {
            return "off (no limit on new triplets per client group)".into();
        }
        if !self.known {
            return format!(
                "at most {} new triplets per client group in {} s (counted by the running \
                 daemon only: explain --live shows this group's count)",
                self.limit, self.window
            );
        }
        match self.counted {
            Some(w) => format!(
                "{} of {} new triplets from this client group in the window that began {}",
                w.count,
                self.limit,
                when(w.window_start, now)
            ),
            None => format!(
                "0 of {} new triplets from this client group (window {} s)",
                self.limit, self.window
            ),
        }
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
            throttle: None,
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

    /// Explain shows the group's count against the limit, and the `throttled` decision
    /// when it is reached; without the daemon's counts it says they are not known here.
    #[tokio::test]
    async fn explanations_show_the_new_triplet_limit() {
        use crate::engine::{NewTriplets, Policy, Rule};
        use crate::store::MemoryStore;
        let engine = Engine::new(
            Policy {
                new_triplets_per_client: 2,
                new_triplets_window: 600,
                ..Policy::default()
            },
            Default::default(),
        );
        let store = MemoryStore::new();
        let throttle = Throttle::default();
        let now = 1_700_000_000;
        let req = request();
        let group = engine.key(req.client_ip.unwrap(), "", "").client;
        let store: &dyn Store = &store;
        let x = explain(&engine, Ok(store), Some(&throttle), None, &req, now, |_| {
            "DEFER".into()
        })
        .await
        .expect("explained");
        assert_eq!(x.decision.rule, Rule::New);
        assert!(
            x.to_text().contains("throttle:   0 of 2 new triplets"),
            "{}",
            x.to_text()
        );
        for _ in 0..2 {
            throttle.update(&group, |w| engine.count_new_triplet(w, now - 100));
        }
        let x = explain(&engine, Ok(store), Some(&throttle), None, &req, now, |_| {
            "DEFER".into()
        })
        .await
        .expect("explained");
        assert_eq!(x.decision.rule, Rule::Throttled);
        assert_eq!(x.decision.remaining, Some(500 + 300));
        assert_eq!(x.triplet_after, None, "not stored");
        let text = x.to_text();
        assert!(
            text.contains("decision:   defer (rule: throttled)"),
            "{text}"
        );
        assert!(
            text.contains("throttle:   2 of 2 new triplets from this client group"),
            "{text}"
        );
        let json = serde_json::to_value(&x).expect("JSON");
        assert_eq!(json["throttle"]["counted"]["count"], 2);
        assert_eq!(
            x.throttle.and_then(|t| t.counted),
            Some(NewTriplets {
                window_start: now - 100,
                count: 2
            })
        );
        // Offline (no daemon): the count is not known, and the explanation says so.
        let x = explain(&engine, Ok(store), None, None, &req, now, |_| {
            "DEFER".into()
        })
        .await
        .expect("explained");
        assert_eq!(x.decision.rule, Rule::New);
        assert!(x.to_text().contains("explain --live"), "{}", x.to_text());
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
