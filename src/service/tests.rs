//! Service tests: fail modes, store timeouts with paused time, partial failures, and the
//! daemon's store-update path agreeing with the pure `Engine::decide`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use proptest::prelude::*;

use super::*;
use crate::engine::{ClientRecord, NewTriplets, Policy, Rule, State, Triplet, TripletKey};
use crate::store::{Counts, EntryFilter, EntryKind, ExpireStep, MemoryStore, Page, UpdateFn};

fn request(ip: &str, sender: &str, recipient: &str) -> Request {
    Request {
        stage: "RCPT".into(),
        client_ip: Some(ip.parse().unwrap()),
        client_name: "unknown".into(),
        sender: sender.into(),
        recipient: recipient.into(),
        ..Request::default()
    }
}

fn service(store: Arc<dyn Store>, mode: Mode, fail_mode: FailMode) -> Greylister {
    Greylister::new(
        Engine::default(),
        StoreSlot::new(store),
        ServiceOptions {
            mode,
            fail_mode,
            store_timeout: Duration::from_millis(200),
        },
    )
}

/// A store whose every operation fails, or never answers, or refuses only writes of client
/// records (pass counts) while everything else works.
struct BadStore {
    inner: MemoryStore,
    hang: bool,
    fail_all: bool,
    fail_client_writes: bool,
}

impl BadStore {
    fn failing() -> Self {
        Self::new(false, true, false)
    }
    fn hanging() -> Self {
        Self::new(true, false, false)
    }
    fn failing_pass_counts() -> Self {
        Self::new(false, false, true)
    }
    fn new(hang: bool, fail_all: bool, fail_client_writes: bool) -> Self {
        BadStore {
            inner: MemoryStore::new(),
            hang,
            fail_all,
            fail_client_writes,
        }
    }
    async fn trouble(&self) -> Result<(), StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.fail_all {
            return Err(StoreError::Backend("disk on fire".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for BadStore {
    fn describe(&self) -> String {
        "bad".into()
    }
    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        self.trouble().await?;
        self.inner.get_triplet(key).await
    }
    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        self.trouble().await?;
        self.inner.update_triplet(key, f).await
    }
    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.trouble().await?;
        self.inner.get_client(client).await
    }
    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.trouble().await?;
        if self.fail_client_writes {
            let old = self.inner.get_client(client).await?;
            if f(old.as_ref()).is_some() {
                return Err(StoreError::Backend("client table unavailable".into()));
            }
        }
        self.inner.update_client(client, f).await
    }
    async fn expire(&self, now: u64, max_scan: usize) -> Result<ExpireStep, StoreError> {
        self.inner.expire(now, max_scan).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.counts().await
    }
    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        self.trouble().await?;
        self.inner.scan(kind, cursor, limit, now, keep).await
    }
    async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError> {
        self.trouble().await?;
        self.inner.remove_triplet(key).await
    }
    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        self.trouble().await?;
        self.inner.remove_client(client).await
    }

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        self.trouble().await?;
        self.inner.address_mode().await
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        self.trouble().await?;
        self.inner.set_address_mode(mode).await
    }
}

#[tokio::test]
async fn failing_store_fails_open_by_default_and_closed_when_asked() {
    let req = request("192.0.2.1", "a@example.net", "b@example.org");
    for (fail_mode, verdict, rule) in [
        (FailMode::Open, Verdict::Pass, Rule::StoreFailOpen),
        (FailMode::Closed, Verdict::Defer, Rule::StoreFailClosed),
    ] {
        let svc = service(Arc::new(BadStore::failing()), Mode::Enforce, fail_mode);
        let o = svc.check(&req, 1000).await;
        assert_eq!((o.decision.verdict, o.decision.rule), (verdict, rule));
        assert!(
            o.decision
                .detail
                .as_deref()
                .unwrap_or("")
                .contains("disk on fire")
        );
        assert_eq!(
            svc.metrics.fail_open.load(Ordering::Relaxed)
                + svc.metrics.fail_closed.load(Ordering::Relaxed),
            1
        );
    }
}

/// A store that could not be opened answers per fail mode at once, with the reason; a
/// request that needs no store is decided as always.
#[test]
fn a_missing_store_is_decided_at_once_per_fail_mode() {
    let req = request("192.0.2.1", "a@example.net", "b@example.org");
    let not_rcpt = Request {
        stage: "DATA".into(),
        ..req.clone()
    };
    for (fail_mode, verdict, rule) in [
        (FailMode::Open, Verdict::Pass, Rule::StoreFailOpen),
        (FailMode::Closed, Verdict::Defer, Rule::StoreFailClosed),
    ] {
        let svc = Greylister::new(
            Engine::default(),
            StoreSlot::missing("no such directory".into()),
            ServiceOptions {
                mode: Mode::Enforce,
                fail_mode,
                store_timeout: Duration::from_millis(200),
            },
        );
        let Ok(d) = svc.decide_now(Cow::Borrowed(&req), 1000) else {
            panic!("nothing to wait for");
        };
        let o = &d.outcome;
        assert_eq!((o.decision.verdict, o.decision.rule), (verdict, rule));
        assert!(
            o.decision
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("no such directory")),
            "{:?}",
            o.decision.detail
        );
        let Ok(d) = svc.decide_now(Cow::Borrowed(&not_rcpt), 1000) else {
            panic!("nothing to wait for");
        };
        assert_eq!(d.outcome.decision.rule, Rule::NotRcptStage);
        assert_eq!(
            svc.metrics.fail_open.load(Ordering::Relaxed)
                + svc.metrics.fail_closed.load(Ordering::Relaxed),
            1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_that_never_answers_fails_open_after_store_timeout() {
    let svc = service(Arc::new(BadStore::hanging()), Mode::Enforce, FailMode::Open);
    let started = tokio::time::Instant::now();
    let o = svc
        .check(
            &request("192.0.2.1", "a@example.net", "b@example.org"),
            1000,
        )
        .await;
    assert_eq!(o.decision.rule, Rule::StoreFailOpen);
    assert!(
        o.decision
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("did not answer")
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "exactly store_timeout"
    );
}

#[tokio::test]
async fn static_rules_need_no_store() {
    let svc = service(
        Arc::new(BadStore::failing()),
        Mode::Enforce,
        FailMode::Closed,
    );
    let mut req = request("192.0.2.1", "a@example.net", "b@example.org");
    req.sasl_username = "joe".into();
    let o = svc.check(&req, 1000).await;
    assert_eq!(o.decision.rule, Rule::Authenticated);
    assert_eq!(
        svc.metrics.fail_open.load(Ordering::Relaxed)
            + svc.metrics.fail_closed.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_failed_pass_count_does_not_undo_a_committed_pass() {
    let svc = service(
        Arc::new(BadStore::failing_pass_counts()),
        Mode::Enforce,
        FailMode::Closed,
    );
    let req = request("192.0.2.1", "a@example.net", "b@example.org");
    assert_eq!(svc.check(&req, 1000).await.decision.rule, Rule::New);
    let o = svc.check(&req, 1400).await;
    assert_eq!(o.decision.rule, Rule::Delayed, "the pass stands: {o:?}");
    assert_eq!(o.decision.delayed, Some(400));
}

#[tokio::test]
async fn learn_mode_records_but_never_defers() {
    let svc = service(Arc::new(MemoryStore::new()), Mode::Learn, FailMode::Open);
    let req = request("192.0.2.1", "a@example.net", "b@example.org");
    let o = svc.check(&req, 1000).await;
    assert_eq!(o.decision.verdict, Verdict::Defer, "the would-be decision");
    assert_eq!(o.effective(), Verdict::Pass);
    assert_eq!(
        svc.check(&req, 1100).await.decision.rule,
        Rule::EarlyRetry,
        "recorded"
    );
}

/// A `learn` section is recorded but never deferred, an `enforce` one defers under global
/// learn mode, and a store failure (fail-closed) still names the section whose mode
/// decides whether it is enforced; through an in-process store and one behind futures.
#[tokio::test]
async fn domain_sections_decide_enforcement_per_request() {
    use crate::engine::{DomainApplied, DomainMode, DomainPolicies, DomainSection};
    let mut domains = DomainPolicies::default();
    for (name, mode) in [("l", DomainMode::Learn), ("e", DomainMode::Enforce)] {
        let i = domains.push(DomainSection {
            applied: DomainApplied {
                name: name.into(),
                source: None,
                mode: Some(mode),
            },
            delay: None,
            verified: None,
        });
        domains.add_pattern(i, &format!("{name}.example")).unwrap();
    }
    let engine = Engine::default().with_domains(domains);
    let options = |mode, fail_mode| ServiceOptions {
        mode,
        fail_mode,
        store_timeout: Duration::from_millis(200),
    };
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(MemoryStore::new()),
        Arc::new(BadStore::new(false, false, false)),
    ];
    for store in stores {
        let svc = Greylister::new(
            engine.clone(),
            StoreSlot::new(store),
            options(Mode::Learn, FailMode::Closed),
        );
        let learn = request("192.0.2.1", "a@example.net", "b@l.example");
        let o = svc.check(&learn, 1000).await;
        assert_eq!(
            (o.decision.verdict, o.effective()),
            (Verdict::Defer, Verdict::Pass)
        );
        let enforce = request("192.0.2.1", "a@example.net", "b@e.example");
        let o = svc.check(&enforce, 1000).await;
        assert_eq!((o.effective(), o.enforced), (Verdict::Defer, true));
        let other = request("192.0.2.1", "a@example.net", "b@other.example");
        assert_eq!(svc.check(&other, 1000).await.effective(), Verdict::Pass);
        assert_eq!(
            svc.check(&learn, 1100).await.decision.rule,
            Rule::EarlyRetry
        );
    }
    let svc = Greylister::new(
        engine,
        StoreSlot::new(Arc::new(BadStore::failing())),
        options(Mode::Enforce, FailMode::Closed),
    );
    let o = svc
        .check(&request("192.0.2.1", "a@example.net", "b@l.example"), 1000)
        .await;
    assert_eq!(o.decision.rule, Rule::StoreFailClosed);
    assert_eq!(o.decision.domain.map(|s| s.name), Some("l".into()));
    assert!(!o.enforced);
    let missing = Greylister::new(
        Engine::default().with_domains(DomainPolicies::default()),
        StoreSlot::missing("gone".into()),
        options(Mode::Enforce, FailMode::Closed),
    );
    let o = missing
        .check(&request("192.0.2.1", "a@example.net", "b@l.example"), 1000)
        .await;
    assert_eq!((o.decision.rule, o.enforced), (Rule::StoreFailClosed, true));
}

/// Past `new_triplets_per_client` new triplets in a window, a group's further new ones are
/// deferred (rule `throttled`) and not stored; its known triplets, its passes and other
/// groups go on as before; the next window takes new ones again (stepped `now`). The same
/// holds through a store behind futures.
#[tokio::test]
async fn new_triplets_past_the_limit_are_deferred_unstored() {
    let engine = Engine::new(
        Policy {
            new_triplets_per_client: 3,
            new_triplets_window: 600,
            auto_allow_after: 0,
            ..Policy::default()
        },
        Default::default(),
    );
    let options = ServiceOptions {
        mode: Mode::Enforce,
        fail_mode: FailMode::Closed,
        store_timeout: Duration::from_secs(5),
    };
    for store in [
        Arc::new(MemoryStore::new()) as Arc<dyn Store>,
        Arc::new(BadStore::new(false, false, false)),
    ] {
        let svc = Greylister::new(engine.clone(), StoreSlot::new(store.clone()), options);
        let t0 = 1_000_000;
        let req = |i: usize| request("192.0.2.1", &format!("s{i}@example.net"), "r@example.org");
        for i in 0..3 {
            assert_eq!(
                svc.check(&req(i), t0 + i as u64).await.decision.rule,
                Rule::New
            );
        }
        let o = svc.check(&req(3), t0 + 10).await;
        assert_eq!(
            (o.decision.rule, o.decision.verdict),
            (Rule::Throttled, Verdict::Defer)
        );
        // Back once the window ended (590 s) and the delay served (300 s).
        assert_eq!(o.decision.remaining, Some(590 + 300));
        assert_eq!(
            store.counts().await.unwrap().triplets_pending,
            3,
            "not stored"
        );
        // A retry of a stored one is not new: it passes after the delay.
        assert_eq!(
            svc.check(&req(0), t0 + 400).await.decision.rule,
            Rule::Delayed
        );
        assert_eq!(
            svc.check(&req(0), t0 + 401).await.decision.rule,
            Rule::Known
        );
        // The throttled one is still new, and still over the limit.
        assert_eq!(
            svc.check(&req(3), t0 + 500).await.decision.rule,
            Rule::Throttled
        );
        // Another group is not affected.
        let other = request("198.51.100.7", "s3@example.net", "r@example.org");
        assert_eq!(svc.check(&other, t0 + 500).await.decision.rule, Rule::New);
        // The next window: new triplets are stored again.
        assert_eq!(svc.check(&req(3), t0 + 600).await.decision.rule, Rule::New);
        assert_eq!(
            svc.check(&req(3), t0 + 900).await.decision.rule,
            Rule::Delayed
        );
        assert_eq!(
            svc.metrics
                .decisions()
                .into_iter()
                .find(|(r, ..)| *r == Rule::Throttled)
                .map(|(.., n)| n),
            Some(2)
        );
    }
}

/// A small policy so random sequences reach every rule.
fn small_engine() -> Engine {
    Engine::new(
        Policy {
            delay: 300,
            retry_window: 3000,
            max_age: 10_000,
            auto_allow_after: 2,
            auto_allow_lifetime: 20_000,
            // Low enough that random sequences run into it.
            new_triplets_per_client: 3,
            new_triplets_window: 2000,
            ..Policy::default()
        },
        Default::default(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The daemon path (three atomic store updates) decides exactly like the pure
    /// `Engine::decide` over a snapshot, for any request sequence.
    #[test]
    fn service_path_agrees_with_pure_decide(
        steps in proptest::collection::vec((0usize..3, 0usize..4, 0u64..900, any::<bool>()), 1..120)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let service = |store: Arc<dyn Store>| Greylister::new(
            small_engine(),
            StoreSlot::new(store),
            ServiceOptions { mode: Mode::Enforce, fail_mode: FailMode::Closed, store_timeout: Duration::from_secs(5) },
        );
        // Records in memory are decided at once (`decide_now`); a store that is not in
        // memory (here: the same records behind the store trait) goes through the futures.
        let svc = service(Arc::new(MemoryStore::new()));
        let through_futures = service(Arc::new(BadStore::new(false, false, false)));
        let engine = small_engine();
        let mut triplets: HashMap<TripletKey, Triplet> = HashMap::new();
        let mut clients: HashMap<String, ClientRecord> = HashMap::new();
        let mut windows: HashMap<String, NewTriplets> = HashMap::new();
        let ips = ["192.0.2.1", "192.0.2.200", "198.51.100.7"];
        let mut now = 1_000_000u64;
        for (ip, who, advance, jump) in steps {
            now += advance + if jump { 4000 } else { 0 };
            let req = request(ips[ip], &format!("s{who}@example.net"), &format!("r{}@example.org", who % 2));
            let got = match svc.decide_now(Cow::Borrowed(&req), now) {
                Ok(decided) => decided.outcome.decision,
                Err(_) => panic!("records in memory are decided at once"),
            };
            // Hands the request back before touching anything.
            let Err(back) = through_futures.decide_now(Cow::Borrowed(&req), now) else {
                panic!("a store behind futures is not decided at once");
            };
            let other = rt.block_on(through_futures.decide(back, now)).outcome.decision;
            prop_assert_eq!(&other, &got);
            let key = engine.key(req.client_ip.unwrap(), &req.sender, &req.recipient);
            let state = State {
                client: clients.get(&key.client).copied(),
                triplet: triplets.get(&key).copied(),
                new_triplets: windows.get(&key.client).copied(),
            };
            let (want, next) = engine.decide(&req, &state, now);
            prop_assert_eq!(&got, &want);
            if let Some(t) = next.triplet { triplets.insert(key.clone(), t); }
            if let Some(c) = next.client { clients.insert(key.client.clone(), c); }
            if let Some(w) = next.new_triplets { windows.insert(key.client.clone(), w); }
        }
    }
}

/// The text log's pre-written decision line equals the structured event written by the
/// same formatter, for every optional field present or absent and for awkward values.
#[tokio::test]
async fn the_prewritten_decision_line_matches_the_structured_event() {
    use crate::engine::{Delay, DelayReason, IdentityFacts, IdentityKind, IdentityReason};
    let svc = service(Arc::new(MemoryStore::new()), Mode::Enforce, FailMode::Open);
    let mut cases = Vec::new();
    for (ip, sender, rcpt) in [
        ("192.0.2.1", "a@example.net", "b@example.org"),
        ("2001:db8::7", "", "postmaster@example.org"),
        (
            "10.0.100.255",
            "we\"ird\\ \u{7}ü@example.net",
            "r@example.org",
        ),
    ] {
        let req = request(ip, sender, rcpt);
        let o = svc.check(&req, 1_000).await;
        cases.push((req, o));
    }
    // A pass after the delay, the learn-mode "would", DNS facts with an identity and a
    // delay of their own, a store failure with its detail, no client address at all.
    let (req, _) = cases[0].clone();
    let o = svc.check(&req, 1_000 + 400).await;
    cases.push((req.clone(), o.clone()));
    let mut learn = o.clone();
    learn.enforced = false;
    learn.decision.verdict = Verdict::Defer;
    cases.push((req.clone(), learn.clone()));
    let mut section = learn;
    section.decision.domain = Some(crate::engine::DomainApplied {
        name: "customer \"a\"".into(),
        source: Some("/etc/greygate/customers:3".into()),
        mode: Some(crate::engine::DomainMode::Learn),
    });
    cases.push((req.clone(), section));
    let mut with_facts = req.clone();
    with_facts.facts = Some(IdentityFacts::default());
    let mut spf = o.clone();
    spf.decision.identity = Some(IdentityReason {
        kind: IdentityKind::Spf,
        reason: "SPF \"pass\" for example.net".into(),
    });
    spf.decision.delay = Some(Delay {
        seconds: 900,
        reason: DelayReason::Dnsbl,
    });
    cases.push((with_facts, spf));
    let mut failed = o.clone();
    failed.decision = Decision::store_failure(true, "redis: connection refused".into());
    let mut no_ip = req.clone();
    no_ip.client_ip = None;
    cases.push((no_ip, failed));
    let mut tls = req.clone();
    tls.tls = true;
    cases.push((tls, o.clone()));

    for (i, (req, o)) in cases.iter().enumerate() {
        for (dns, level) in [
            (None, tracing::Level::INFO),
            (
                Some("DNS timed out after 300 ms: PTR"),
                tracing::Level::WARN,
            ),
        ] {
            let line = DecisionLine { req, o, dns };
            let structured = crate::logfmt::capture_text(|| line.event(level));
            let mut written = String::new();
            crate::logfmt::format_line(&mut written, level, DECISION_TARGET, |out| {
                line.write_fields(out)
            });
            let strip = |s: &str| s.split_once(' ').unwrap().1.to_string();
            assert_eq!(strip(&written), strip(&structured), "case {i}");
            let (time, _) = written.split_once(' ').unwrap();
            assert_eq!(time.len(), "2026-11-28T21:55:03.794734Z".len(), "{written}");
            assert!(
                time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "{written}"
            );
            assert!(structured.contains(" decision verdict="), "{structured}");
        }
    }
}

#[test]
fn learn_mode_turns_only_defers_into_passes() {
    use crate::engine::Verdict::{Defer, Pass, Skip};
    use crate::engine::{Decision, Rule};
    #[rustfmt::skip]
    let cases = [
        // (decision, enforced, effective)
        (Decision::new(Skip, Rule::NotRcptStage), true, Skip),
        (Decision::new(Skip, Rule::NotRcptStage), false, Skip),
        (Decision::new(Pass, Rule::Delayed), true, Pass),
        (Decision::new(Pass, Rule::Delayed), false, Pass),
        (Decision::new(Defer, Rule::New), true, Defer),
        (Decision::new(Defer, Rule::New), false, Pass),
        (Decision::new(Defer, Rule::EarlyRetry), false, Pass),
        (Decision::store_failure(false, "down".into()), true, Defer),
        (Decision::store_failure(false, "down".into()), false, Pass),
        (Decision::store_failure(true, "down".into()), true, Pass),
    ];
    for (decision, enforced, want) in cases {
        let rule = decision.rule;
        let outcome = Outcome { decision, enforced };
        assert_eq!(outcome.effective(), want, "{rule} enforced={enforced}");
        // The would-be decision is kept for logs and explanations.
        assert_eq!(outcome.decision.rule, rule);
    }
}
