//! The admin API's requests and answers as types: the handlers serialise them and the CLI
//! deserialises the same structs, so a field the CLI shows cannot go missing unnoticed.
//!
//! Every answer the dashboard (`assets/app.js`) or the CLI reads is here, with the field
//! names and shapes they read. Reading is strict where it matters: a field the CLI shows has
//! no default, so an answer without it is an error that names it rather than a zero on the
//! screen. Unknown fields are ignored, so a newer daemon may add some.
//!
//! Engine and store types appear inside answers as they are (`Entry`, `RuntimeEntry`,
//! `Explanation`, ...): they are plain data and derive both directions themselves.

use serde::{Deserialize, Serialize};

use crate::dur::Dur;
use crate::engine::{Mode, RuntimeEntry, Target, TripletKey, Verdict};
use crate::metrics::{Bucket, RecentDecision, TopEntry};
use crate::service::explain::Explanation;
use crate::store::{Capacity, Counts, Entry, StoreHealth};

/// The body of every error answer (4xx and 5xx) of the JSON API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /api/stats`: what the daemon is doing, for `greygate stats` and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub version: String,
    pub now: u64,
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub mode: Mode,
    /// The store's description, or why it cannot be opened.
    pub store: String,
    pub store_available: bool,
    /// How the store's writes go, and whether it started in place of an unreadable file;
    /// `null` while the store is missing.
    #[serde(deserialize_with = "Option::deserialize")]
    pub store_health: Option<StoreHealth>,
    /// The cap on records and its evictions: memory and embedded stores only (absent for
    /// the shared stores, whose servers bound their own memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// `null` when the store cannot count now; present either way (`Option::deserialize`
    /// makes a missing field an error instead of `None`).
    #[serde(deserialize_with = "Option::deserialize")]
    pub entries: Option<Counts>,
    pub pass: u64,
    pub defer: u64,
    pub skip: u64,
    pub fail_open: u64,
    pub fail_closed: u64,
    pub learn_would_defer: u64,
    pub decisions: Vec<RuleCount>,
    /// `null` before the first decision.
    #[serde(deserialize_with = "Option::deserialize")]
    pub decision_p99_seconds: Option<f64>,
    pub listeners: Vec<ListenerView>,
    pub runtime_entries: usize,
    pub reloads: u64,
    pub reload_failures: u64,
    pub policy: PolicyView,
}

/// One mail listener in [`StatsView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerView {
    pub address: String,
    /// `policy` or `milter`.
    pub protocol: String,
    pub open: usize,
    pub limit: usize,
    pub accepted: u64,
    pub refused: u64,
}

/// The greylisting parameters in force, in [`StatsView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub delay: u64,
    pub retry_window: u64,
    pub max_age: u64,
    pub auto_allow_after: u32,
    pub auto_allow_lifetime: u64,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// New triplets a client group may make per window; 0: no limit.
    pub new_triplets_per_client: u32,
    pub new_triplets_window: u64,
}

/// Decisions by one rule with one verdict, in [`StatsView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// The rule's name; text rather than `Rule` so an older CLI still shows a newer
    /// daemon's rules.
    pub rule: String,
    pub verdict: Verdict,
    pub count: u64,
}

/// `GET /api/explain?client=..&to=..`: the request to explain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub client: String,
    /// Verified client host name; none or empty is `unknown`.
    #[serde(default)]
    pub name: Option<String>,
    /// Envelope sender; empty is the null sender.
    #[serde(default)]
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub sasl_user: String,
    /// Unix seconds or RFC 3339; none or empty is now.
    #[serde(default)]
    pub at: Option<String>,
}

/// The answer to [`ExplainQuery`]: the explanation, and the text the CLI and the dashboard
/// print (made by the daemon, so both show the same words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainAnswer {
    #[serde(flatten)]
    pub explanation: Explanation,
    pub text: String,
}

/// `?limit=` of `GET /api/recent` and `GET /api/top`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitQuery {
    pub limit: Option<usize>,
}

/// `GET /api/recent`: the latest decisions, newest first.
pub type Recent = Vec<RecentDecision>;

/// `?seconds=` of `GET /api/series`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesQuery {
    pub seconds: Option<u64>,
}

/// `GET /api/series`: answers per bucket, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    pub bucket_seconds: u64,
    pub buckets: Vec<Bucket>,
}

/// `GET /api/top`: the most deferred client groups and sender domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    pub client_groups: Vec<TopEntry>,
    pub sender_domains: Vec<TopEntry>,
}

/// `GET /api/runtime`: the runtime entries in force, both lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeList {
    pub now: u64,
    pub entries: Vec<RuntimeEntry>,
}

/// `POST /api/runtime/{allow|deny}`: the entry to add; the answer is the [`RuntimeEntry`]
/// made. Lenient where people type it by hand (defaults), strict about unknown fields so a
/// misspelt `ttl` is not silently a permanent entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddEntry {
    #[serde(default = "client_target")]
    pub target: Target,
    pub value: String,
    /// Seconds or a duration such as "7d"; none keeps the entry until removed.
    #[serde(default)]
    pub ttl: Option<Dur>,
    #[serde(default)]
    pub comment: String,
}

fn client_target() -> Target {
    Target::Client
}

/// `?value=` of `DELETE /api/runtime/{allow|deny}`: remove every entry with this value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueQuery {
    pub value: String,
}

/// The answer to both removals (by id and by value): the entries removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: Vec<RuntimeEntry>,
}

/// `GET /api/entries`: the filter of [`crate::admin::entries::EntryQuery`] plus paging.
/// Spelled out rather than flattened because flattening loses number types in query
/// strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntriesQuery {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub client: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

/// The answer to [`EntriesQuery`]: one page of stored records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntriesPage {
    pub now: u64,
    pub entries: Vec<Entry>,
    /// The cursor of the next page; `null` on the last one (present either way, see
    /// [`StatsView::entries`]).
    #[serde(deserialize_with = "Option::deserialize")]
    pub next: Option<String>,
    /// True when the request's scan budget ran out before `limit` matches were found: the
    /// page is short (even empty) and `next` goes on. Otherwise only the last page is short.
    #[serde(default)]
    pub budget_spent: bool,
}

/// `POST /api/purge`: which records to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    pub kind: Option<String>,
    pub state: Option<String>,
    pub client: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    /// Needed to purge without any filter.
    #[serde(default)]
    pub all: bool,
}

/// What a purge did (the answer to [`PurgeRequest`], and the CLI's own purge without a
/// daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    pub removed: u64,
    /// False when the time budget ran out first; purging again continues.
    pub complete: bool,
}

/// `POST /api/release`: which pending triplets to mark passed, so that the sender's next
/// retry is accepted at once (rule `released`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// With `sender`: one triplet. A client IP (its group, and in the daemon also the
    /// identity its DNS facts give it now), or a client identity as listed and logged
    /// (`192.0.2.0/24`, `spf:example.com`, `org:example.com`).
    pub client: Option<String>,
    /// The envelope sender (`<>` or empty: the null sender). Without `client`: only this
    /// sender's pending triplets of the recipient.
    pub sender: Option<String>,
    /// The recipient, whole (normalised as keys are: lower case, extension stripped).
    pub recipient: String,
    /// Who asks, in the caller's words (the CLI sends the local user name); logged beside
    /// the peer's address.
    #[serde(default)]
    pub by: Option<String>,
}

/// What a release did (the answer to [`ReleaseRequest`], and the CLI's own release
/// without a daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// Triplets released (the first [`crate::admin::entries::SHOWN`] of them).
    pub released: Vec<TripletKey>,
    /// Triplets released in all.
    pub count: u64,
    /// Triplets named that had already passed (or been released): left as they were.
    pub already_passed: Vec<TripletKey>,
    /// False when the time budget ran out first; releasing again continues.
    pub complete: bool,
}

/// `POST /api/reload` takes no parameters; the CLI sends this empty object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRequest {}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Sections that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<String>,
    /// Allow-list entries now in force: clients, recipients, senders.
    pub allow_entries: (usize, usize, usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ClientRecord, Engine, Request, State, Triplet, TripletKey};

    fn stats() -> StatsView {
        StatsView {
            version: "0.1.0".into(),
            now: 1_700_000_100,
            started_at: 1_700_000_000,
            uptime_seconds: 100,
            mode: Mode::Learn,
            store: "memory".into(),
            store_available: true,
            store_health: Some(StoreHealth::default()),
            capacity: None,
            entries: Some(Counts {
                triplets_pending: 3,
                triplets_passed: 2,
                clients: 1,
            }),
            pass: 10,
            defer: 4,
            skip: 1,
            fail_open: 0,
            fail_closed: 2,
            learn_would_defer: 5,
            decisions: vec![RuleCount {
                rule: "new".into(),
                verdict: Verdict::Defer,
                count: 4,
            }],
            decision_p99_seconds: Some(0.001),
            listeners: vec![ListenerView {
                address: "127.0.0.1:10023".into(),
                protocol: "policy".into(),
                open: 1,
                limit: 100,
                accepted: 7,
                refused: 0,
            }],
            runtime_entries: 2,
            reloads: 1,
            reload_failures: 0,
            policy: PolicyView {
                delay: 300,
                retry_window: 172_800,
                max_age: 3_024_000,
                auto_allow_after: 5,
                auto_allow_lifetime: 3_024_000,
                ipv4_prefix: 24,
                ipv6_prefix: 64,
                new_triplets_per_client: 1000,
                new_triplets_window: 3600,
            },
        }
    }

    /// The failure this module exists for: a renamed or dropped field is an error that names
    /// it, not a zero in `greygate stats`.
    #[test]
    fn a_stats_answer_without_a_shown_field_does_not_read() {
        for field in [
            "uptime_seconds",
            "version",
            "entries",
            "decision_p99_seconds",
        ] {
            let mut v = serde_json::to_value(stats()).expect("serialise");
            v.as_object_mut().expect("object").remove(field);
            let e = serde_json::from_value::<StatsView>(v).expect_err(field);
            assert!(
                e.to_string().contains(&format!("missing field `{field}`")),
                "{field}: {e}"
            );
        }
        // Nested too: a listener without its counts.
        let mut v = serde_json::to_value(stats()).expect("serialise");
        v["listeners"][0]
            .as_object_mut()
            .expect("object")
            .remove("open");
        let e = serde_json::from_value::<StatsView>(v).expect_err("listener");
        assert!(e.to_string().contains("missing field `open`"), "{e}");
        // `null` is an answer (the store cannot count now), not a missing field.
        let mut v = serde_json::to_value(stats()).expect("serialise");
        v["entries"] = serde_json::Value::Null;
        v["decision_p99_seconds"] = serde_json::Value::Null;
        let s: StatsView = serde_json::from_value(v).expect("nulls read");
        assert_eq!((s.entries, s.decision_p99_seconds), (None, None));
    }

    #[test]
    fn a_full_stats_answer_round_trips_and_extra_fields_are_ignored() {
        let text = serde_json::to_string(&stats()).expect("serialise");
        assert_eq!(
            serde_json::from_str::<StatsView>(&text).expect("read"),
            stats()
        );
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        v["added_by_a_newer_daemon"] = serde_json::json!({ "x": 1 });
        assert_eq!(
            serde_json::from_value::<StatsView>(v).expect("read"),
            stats()
        );
    }

    /// The shapes the dashboard and the integration tests read, spelled out once so a change
    /// to a struct that alters the JSON fails here first.
    #[test]
    fn answers_keep_the_json_shapes_their_readers_use() {
        let v = serde_json::to_value(stats()).expect("serialise");
        assert_eq!(v["mode"], "learn");
        assert_eq!(v["entries"]["triplets_pending"], 3);
        assert_eq!(v["decisions"][0]["verdict"], "defer");
        assert_eq!(v["listeners"][0]["protocol"], "policy");

        let key = TripletKey {
            client: "192.0.2.0/24".into(),
            sender: String::new(),
            recipient: "bob@example.org".into(),
        };
        let record = Triplet {
            first_seen: 1,
            last_seen: 2,
            expires_at: 3,
            attempts: 1,
            passes: 0,
            passed: false,
        };
        let page = EntriesPage {
            now: 5,
            entries: vec![
                Entry::Triplet {
                    key: key.clone(),
                    record,
                },
                Entry::Client {
                    client: "198.51.100.0/24".into(),
                    record: ClientRecord {
                        passes: 4,
                        last_counted: 1,
                        last_seen: 2,
                        expires_at: 3,
                    },
                },
            ],
            next: None,
            budget_spent: false,
        };
        let v = serde_json::to_value(&page).expect("serialise");
        assert_eq!(v["entries"][0]["kind"], "triplet");
        assert_eq!(v["entries"][0]["key"]["recipient"], "bob@example.org");
        assert_eq!(v["entries"][1]["kind"], "client");
        assert_eq!(v["entries"][1]["record"]["passes"], 4);
        assert!(v["next"].is_null());
        assert_eq!(
            serde_json::from_value::<EntriesPage>(v).expect("read"),
            page
        );

        let err = serde_json::to_value(ErrorBody { error: "no".into() }).expect("serialise");
        assert_eq!(err, serde_json::json!({ "error": "no" }));
    }

    /// The explanation is flattened beside its text, as `app.js` reads `x.text` and
    /// `x.decision.verdict`; the rule reads back from its name.
    #[test]
    fn an_explain_answer_round_trips_with_its_text_beside_the_fields() {
        let engine = Engine::default();
        let req = Request {
            stage: "RCPT".into(),
            client_ip: Some("192.0.2.1".parse().expect("ip")),
            client_name: "unknown".into(),
            sender: "alice@example.net".into(),
            recipient: "bob@example.org".into(),
            ..Request::default()
        };
        let (decision, _) = engine.decide(&req, &State::default(), 1_700_000_000);
        let explanation = Explanation {
            now: 1_700_000_000,
            reply: "DEFER_IF_PERMIT".into(),
            triplet_after: None,
            client_after: None,
            delay: 300,
            decision,
            auto_allow_after: 5,
            facts: None,
            dns: None,
            throttle: None,
        };
        let answer = ExplainAnswer {
            text: explanation.to_text(),
            explanation,
        };
        let v = serde_json::to_value(&answer).expect("serialise");
        assert_eq!(v["decision"]["verdict"], "defer");
        assert_eq!(v["decision"]["rule"], "new");
        assert!(v["text"].as_str().expect("text").contains("rule: new"));
        assert_eq!(
            serde_json::from_value::<ExplainAnswer>(v.clone()).expect("read"),
            answer
        );
        let mut v = v;
        v["decision"]["rule"] = "no-such-rule".into();
        let e = serde_json::from_value::<ExplainAnswer>(v).expect_err("unknown rule");
        assert!(e.to_string().contains("no-such-rule"), "{e}");
    }

    /// What the CLI sends reads back on the daemon's side, ttl included (the dashboard sends
    /// it as text, the CLI as seconds).
    #[test]
    fn requests_read_back_as_the_handlers_take_them() {
        let add = AddEntry {
            target: Target::Sender,
            value: "@example.com".into(),
            ttl: Some(Dur(std::time::Duration::from_secs(604_800))),
            comment: "partner".into(),
        };
        let v = serde_json::to_value(&add).expect("serialise");
        assert_eq!(v["ttl"], 604_800);
        assert_eq!(serde_json::from_value::<AddEntry>(v).expect("read"), add);
        let typed: AddEntry =
            serde_json::from_str(r#"{"value":"192.0.2.1","ttl":"7d"}"#).expect("read");
        assert_eq!(typed.target, Target::Client);
        assert_eq!(typed.ttl, add.ttl);

        let q = EntriesQuery {
            kind: Some("triplets".into()),
            sender: Some("a+b@example.net".into()),
            limit: Some(20),
            ..EntriesQuery::default()
        };
        // As the client encodes it and axum's `Query` decodes it: `None` is left out.
        let encoded = serde_urlencoded::to_string(&q).expect("encode");
        assert_eq!(encoded, "kind=triplets&sender=a%2Bb%40example.net&limit=20");
        let back: EntriesQuery = serde_urlencoded::from_str(&encoded).expect("read");
        assert_eq!(back, q);
    }
}
