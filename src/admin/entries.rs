//! Listing, purging and releasing stored records: the admin API's `/api/entries`,
//! `/api/purge` and `/api/release`, and the CLI's `list`, `purge` and `release` when no
//! daemon runs.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::{PurgeReport, ReleaseReport, ReleaseRequest};
use crate::engine::normalize::normalize_recipient;
use crate::engine::{Engine, ReleaseOutcome, TripletKey};
use crate::store::{Entry, EntryKind, SCAN_EXAMINE, Store, StoreError};

/// Records per page when the caller does not say.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page served.
pub const MAX_LIMIT: usize = 1000;
/// Most store scans one listing call makes (each looks at up to about [`SCAN_EXAMINE`]
/// records, so about half a million records in all): a selective filter over a big store
/// fills its page in one call instead of hundreds of empty pages, and no call runs long.
pub const LIST_SCANS: usize = 256;
/// Records one listing call looks at, at most (about).
pub const LIST_EXAMINE: usize = LIST_SCANS * SCAN_EXAMINE;

/// How much one listing call may do before it answers with what it found so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListBudget {
    /// Most store scans.
    pub scans: usize,
    /// No further scan starts after this long (slow shared stores).
    pub time: Duration,
}

impl Default for ListBudget {
    fn default() -> Self {
        ListBudget {
            scans: LIST_SCANS,
            time: Duration::from_secs(5),
        }
    }
}

/// One page of matching records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// Where the next page starts; `None` when the store has no more records.
    pub next: Option<String>,
    /// The budget ran out before `limit` matches were found: the page is short (maybe
    /// empty) although `next` continues the listing.
    pub budget_spent: bool,
}

/// Which records to list or purge.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct EntryQuery {
    /// `triplets` (default) or `clients` (auto-allow records).
    pub kind: Option<String>,
    /// Triplets only: `pending`, `passed` or `any` (default).
    pub state: Option<String>,
    /// A client IP (matches its group), or part of a client group / identity.
    pub client: Option<String>,
    /// Part of the normalised sender.
    pub sender: Option<String>,
    /// Part of the normalised recipient.
    pub recipient: Option<String>,
}

/// A checked query.
pub struct Matcher {
    pub kind: EntryKind,
    passed: Option<bool>,
    client: Option<ClientMatch>,
    sender: Option<String>,
    recipient: Option<String>,
}

enum ClientMatch {
    Group(String),
    Part(String),
}

fn part(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
}

impl EntryQuery {
    /// Whether the query names anything beyond the kind (purge refuses "everything" by
    /// accident).
    pub fn is_narrowed(&self) -> bool {
        [&self.state, &self.client, &self.sender, &self.recipient]
            .iter()
            .any(|f| part(f).is_some_and(|s| s != "any"))
    }

    /// Checks the query; an IP client becomes its group under `engine`'s prefixes.
    pub fn matcher(&self, engine: &Engine) -> Result<Matcher, String> {
        let kind = match self.kind.as_deref().map(str::trim) {
            None | Some("") | Some("triplets") | Some("triplet") => EntryKind::Triplets,
            Some("clients") | Some("client") => EntryKind::Clients,
            Some(k) => return Err(format!("kind {k:?} is not triplets or clients")),
        };
        let passed = match self.state.as_deref().map(str::trim) {
            None | Some("") | Some("any") => None,
            Some("pending") => Some(false),
            Some("passed") => Some(true),
            Some(s) => return Err(format!("state {s:?} is not pending, passed or any")),
        };
        if passed.is_some() && kind == EntryKind::Clients {
            return Err("state applies to triplets only".into());
        }
        let client = part(&self.client).map(|c| match c.parse::<IpAddr>() {
            Ok(ip) => ClientMatch::Group(engine.key(ip, "", "").client),
            Err(_) => ClientMatch::Part(c),
        });
        // Hashed keys hold digests: an address is found by its digest, as a whole.
        let (sender, recipient) = if engine.addresses.is_hashed() {
            (
                part(&self.sender).map(|s| engine.sender_key(&s)),
                part(&self.recipient).map(|r| engine.recipient_key(&r)),
            )
        } else {
            (part(&self.sender), part(&self.recipient))
        };
        Ok(Matcher {
            kind,
            passed,
            client,
            sender,
            recipient,
        })
    }
}

impl Matcher {
    pub fn keep(&self, e: &Entry) -> bool {
        let client_ok = |group: &str| match &self.client {
            None => true,
            Some(ClientMatch::Group(g)) => group == g,
            Some(ClientMatch::Part(p)) => group.to_lowercase().contains(p),
        };
        match e {
            Entry::Triplet { key, record } => {
                self.passed.is_none_or(|p| record.passed == p)
                    && client_ok(&key.client)
                    && self
                        .sender
                        .as_ref()
                        .is_none_or(|s| key.sender.contains(s.as_str()))
                    && self
                        .recipient
                        .as_ref()
                        .is_none_or(|r| key.recipient.contains(r.as_str()))
            }
            Entry::Client { client, .. } => {
                self.sender.is_none() && self.recipient.is_none() && client_ok(client)
            }
        }
    }
}

/// One page of matching records: scans from `cursor` until `limit` matches are found, the
/// store has no more, or `budget` is spent.
pub async fn list(
    store: &dyn Store,
    m: &Matcher,
    cursor: Option<&str>,
    limit: usize,
    now: u64,
    budget: ListBudget,
) -> Result<Listing, StoreError> {
    let started = Instant::now();
    let limit = limit.clamp(1, MAX_LIMIT);
    let keep = |e: &Entry| m.keep(e);
    let mut out = Listing::default();
    let mut from = cursor.map(str::to_string);
    let mut scans = 0;
    loop {
        let page = store
            .scan(
                m.kind,
                from.as_deref(),
                limit - out.entries.len(),
                now,
                &keep,
            )
            .await?;
        scans += 1;
        out.entries.extend(page.entries);
        out.next = page.next;
        if out.next.is_none() || out.entries.len() >= limit {
            return Ok(out);
        }
        if scans >= budget.scans || started.elapsed() >= budget.time {
            out.budget_spent = true;
            return Ok(out);
        }
        from.clone_from(&out.next);
        // The memory store scans without waiting on anything: give the workers' other
        // tasks (mail) their turn between scans.
        tokio::task::yield_now().await;
    }
}

/// Removes every matching record, within `budget`.
pub async fn purge(
    store: &dyn Store,
    m: &Matcher,
    now: u64,
    budget: Duration,
) -> Result<PurgeReport, StoreError> {
    let started = Instant::now();
    let mut report = PurgeReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let left = ListBudget {
            time: budget.saturating_sub(started.elapsed()),
            ..ListBudget::default()
        };
        let page = list(store, m, cursor.as_deref(), 500, now, left).await?;
        for e in &page.entries {
            let gone = match e {
                Entry::Triplet { key, .. } => store.remove_triplet(key).await?,
                Entry::Client { client, .. } => store.remove_client(client).await?,
            };
            report.removed += u64::from(gone);
        }
        match page.next {
            None => {
                report.complete = true;
                break;
            }
            Some(next) => cursor = Some(next),
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    store.flush_fully().await?;
    Ok(report)
}

/// Most triplet keys a [`ReleaseReport`] lists (its `count` counts them all).
pub const SHOWN: usize = 100;

/// Which pending triplets a release names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseTarget {
    /// One triplet, under each client key it may be stored with.
    Keys(Vec<TripletKey>),
    /// Every pending triplet of this (normalised) recipient, and sender when given, whatever
    /// its client key.
    Recipient {
        recipient: String,
        sender: Option<String>,
    },
}

impl ReleaseTarget {
    /// Checks a request: a client needs a sender (a triplet has all three), the recipient is
    /// required. Sender and recipient are normalised as the engine keys them; a client IP
    /// becomes its group under `engine`'s prefixes (the daemon adds the identity its DNS
    /// facts give), anything else is taken as a client key as listed.
    pub fn of(req: &ReleaseRequest, engine: &Engine) -> Result<ReleaseTarget, String> {
        let delimiters = &engine.policy.recipient_delimiter;
        let shown = normalize_recipient(&req.recipient, delimiters);
        if shown.is_empty() {
            return Err("name the recipient whose pending triplets to release".into());
        }
        // As keys hold them: digests when addresses are hashed.
        let recipient = engine.recipient_key(&req.recipient);
        let sender = req.sender.as_deref().map(|s| engine.sender_key(s));
        let client = req
            .client
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty());
        let Some(client) = client else {
            return Ok(ReleaseTarget::Recipient { recipient, sender });
        };
        let Some(sender) = sender else {
            return Err(format!(
                "a client names one triplet: give its sender too (<> for the null sender), \
                 or leave out the client to release every pending triplet of {shown}"
            ));
        };
        let client = match client.parse::<IpAddr>() {
            Ok(ip) => engine.key(ip, "", "").client,
            Err(_) => client.to_lowercase(),
        };
        Ok(ReleaseTarget::Keys(vec![TripletKey {
            client,
            sender,
            recipient,
        }]))
    }

    /// Also tries `key` (the identity DNS facts give a client IP), when it is another one.
    pub fn also(&mut self, key: TripletKey) {
        if let ReleaseTarget::Keys(keys) = self
            && !keys.contains(&key)
        {
            keys.push(key);
        }
    }

    fn keeps(&self, e: &Entry) -> bool {
        match (self, e) {
            (ReleaseTarget::Recipient { recipient, sender }, Entry::Triplet { key, record }) => {
                !record.passed
                    && key.recipient == *recipient
                    && sender.as_ref().is_none_or(|s| key.sender == *s)
            }
            _ => false,
        }
    }
}

/// The keys for a log line: `client / sender / recipient; ...`, with how many more were
/// released than listed.
pub fn keys_text(keys: &[TripletKey], count: u64) -> String {
    let mut text = keys
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let more = count.saturating_sub(keys.len() as u64);
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

/// What a release did, also when the store failed part of the way: what was released
/// before the failure must still be audited.
#[derive(Debug)]
pub struct Released {
    pub report: ReleaseReport,
    /// The store failed: `report` holds what was released before.
    pub error: Option<StoreError>,
}

/// Releases what `target` names: each live pending triplet becomes passed with no pass
/// counted yet, atomically ([`Engine::release_step`]), so its next retry passes with rule
/// `released`. A recipient's triplets are walked within `budget`.
pub async fn release(
    store: &dyn Store,
    engine: &Engine,
    target: &ReleaseTarget,
    now: u64,
    budget: Duration,
) -> Released {
    let mut report = ReleaseReport::default();
    let error = release_into(&mut report, store, engine, target, now, budget)
        .await
        .err();
    Released { report, error }
}

async fn release_into(
    report: &mut ReleaseReport,
    store: &dyn Store,
    engine: &Engine,
    target: &ReleaseTarget,
    now: u64,
    budget: Duration,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut one = async |key: &TripletKey| -> Result<(), StoreError> {
        let old = store
            .update_triplet(key, &|old| engine.release_step(old, now).1)
            .await?;
        match engine.release_step(old.as_ref(), now).0 {
            ReleaseOutcome::Released => {
                report.count += 1;
                if report.released.len() < SHOWN {
                    report.released.push(key.clone());
                }
            }
            ReleaseOutcome::AlreadyPassed if report.already_passed.len() < SHOWN => {
                report.already_passed.push(key.clone());
            }
            ReleaseOutcome::AlreadyPassed | ReleaseOutcome::NotFound => {}
        }
        Ok(())
    };
    match target {
        ReleaseTarget::Keys(keys) => {
            for key in keys {
                one(key).await?;
            }
            report.complete = true;
        }
        ReleaseTarget::Recipient { .. } => {
            let keep = |e: &Entry| target.keeps(e);
            let mut cursor: Option<String> = None;
            loop {
                let page = store
                    .scan(EntryKind::Triplets, cursor.as_deref(), 500, now, &keep)
                    .await?;
                for e in &page.entries {
                    if let Entry::Triplet { key, .. } = e {
                        one(key).await?;
                    }
                }
                match page.next {
                    None => {
                        report.complete = true;
                        break;
                    }
                    Some(next) => cursor = Some(next),
                }
                if started.elapsed() >= budget {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }
    store.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Triplet, TripletKey};
    use crate::store::MemoryStore;

    /// `n` live triplets; sender `s{i}@example.net`.
    async fn filled(n: usize) -> MemoryStore {
        let store = MemoryStore::new();
        let rec = Triplet {
            first_seen: 1,
            last_seen: 1,
            expires_at: 4_000_000_000,
            attempts: 1,
            passes: 0,
            passed: false,
        };
        for i in 0..n {
            let key = TripletKey {
                client: format!("10.{}.{}.0/24", i / 256 % 256, i % 256),
                sender: format!("s{i}@example.net"),
                recipient: "r@example.org".into(),
            };
            store.update_triplet(&key, &|_| Some(rec)).await.unwrap();
        }
        store
    }

    fn by_sender(sender: &str) -> Matcher {
        EntryQuery {
            sender: Some(sender.into()),
            ..EntryQuery::default()
        }
        .matcher(&Engine::default())
        .unwrap()
    }

    /// 60,000 records, 30 times what one store scan examines, and a filter that matches 3:
    /// one call finds all three and says the listing is complete, where a single scan per
    /// call answered empty pages with cursors.
    #[tokio::test]
    async fn a_selective_filter_fills_its_page_in_one_call() {
        let store = filled(60_000).await;
        let m = by_sender("s1777");
        let page = list(&store, &m, None, 50, 10, ListBudget::default())
            .await
            .unwrap();
        let mut senders: Vec<_> = page
            .entries
            .iter()
            .map(|e| match e {
                Entry::Triplet { key, .. } => key.sender.clone(),
                Entry::Client { .. } => unreachable!(),
            })
            .collect();
        senders.sort();
        assert_eq!(
            senders,
            [
                "s17770@example.net",
                "s17771@example.net",
                "s17772@example.net",
                "s17773@example.net",
                "s17774@example.net",
                "s17775@example.net",
                "s17776@example.net",
                "s17777@example.net",
                "s17778@example.net",
                "s17779@example.net",
                "s1777@example.net"
            ]
        );
        assert_eq!(page.next, None, "the store was walked to its end");
        assert!(!page.budget_spent);
    }

    /// A filter that matches one record in 500: every page is full until the last one.
    #[tokio::test]
    async fn pages_are_full_until_the_last() {
        let store = filled(20_000).await;
        let m = Matcher {
            kind: EntryKind::Triplets,
            passed: None,
            client: Some(ClientMatch::Part(".0.0/24".into())),
            sender: None,
            recipient: None,
        };
        let (mut cursor, mut total, mut pages) = (None::<String>, 0, 0);
        loop {
            let page = list(&store, &m, cursor.as_deref(), 7, 10, ListBudget::default())
                .await
                .unwrap();
            pages += 1;
            total += page.entries.len();
            assert!(!page.budget_spent);
            match page.next {
                Some(n) => {
                    assert_eq!(page.entries.len(), 7, "page {pages} is short mid-listing");
                    cursor = Some(n);
                }
                None => break,
            }
        }
        // Clients 10.X.0.0/24 for X in 0..=78: i = 256·X, below 20,000.
        assert_eq!(total, 79);
        assert!(pages <= 79 / 7 + 2, "{pages} pages");
    }

    /// A spent budget answers with what it found, says so, and hands on a cursor from which
    /// the listing goes on to every match.
    #[tokio::test]
    async fn a_spent_budget_says_so_and_the_cursor_goes_on() {
        let store = filled(30_000).await;
        let m = by_sender("s2999@");
        let tight = ListBudget {
            scans: 2,
            time: Duration::from_secs(60),
        };
        let first = list(&store, &m, None, 50, 10, tight).await.unwrap();
        assert!(first.budget_spent, "two scans cannot walk 30,000 records");
        assert!(first.next.is_some());
        let (mut found, mut cursor, mut calls) = (first.entries.len(), first.next, 1);
        while let Some(c) = cursor {
            let page = list(&store, &m, Some(&c), 50, 10, tight).await.unwrap();
            assert!(page.budget_spent || page.next.is_none());
            found += page.entries.len();
            cursor = page.next;
            calls += 1;
        }
        assert_eq!(found, 1);
        assert!(calls >= 30_000 / (2 * SCAN_EXAMINE), "{calls} calls");

        // No time left: one scan, then the answer.
        let none = ListBudget {
            scans: LIST_SCANS,
            time: Duration::ZERO,
        };
        let page = list(&store, &m, None, 50, 10, none).await.unwrap();
        assert!(page.budget_spent && page.next.is_some());
    }

    /// A recipient's release walks the whole store: 150 pending triplets of the recipient
    /// among 20,000 others are all released, the report lists the first [`SHOWN`] and counts
    /// them all, and nothing of another recipient or already passed changes.
    #[tokio::test]
    async fn a_recipient_release_counts_all_and_lists_the_first() {
        let store = filled(20_000).await;
        let engine = Engine::default();
        let pending = Triplet {
            first_seen: 1,
            last_seen: 1,
            expires_at: 4_000_000_000,
            attempts: 1,
            passes: 0,
            passed: false,
        };
        let key = |i: usize, recipient: &str| TripletKey {
            client: format!("192.0.2.{}/32", i % 256),
            sender: format!("held{i}@example.net"),
            recipient: recipient.into(),
        };
        for i in 0..150 {
            store
                .update_triplet(&key(i, "held@example.org"), &|_| Some(pending))
                .await
                .unwrap();
        }
        let passed = Triplet {
            passed: true,
            passes: 3,
            ..pending
        };
        let done = key(999, "held@example.org");
        store
            .update_triplet(&done, &|_| Some(passed))
            .await
            .unwrap();

        let req = ReleaseRequest {
            recipient: "Held+x@Example.org".into(),
            ..ReleaseRequest::default()
        };
        let target = ReleaseTarget::of(&req, &engine).unwrap();
        let r = release(&store, &engine, &target, 10, Duration::from_secs(60))
            .await
            .report;
        assert_eq!((r.count, r.released.len(), r.complete), (150, SHOWN, true));
        assert!(r.already_passed.is_empty(), "a walk skips passed triplets");
        assert_eq!(
            keys_text(&r.released[..2], r.count),
            format!("{}; {}; and 148 more", r.released[0], r.released[1])
        );
        for i in 0..150 {
            let t = store
                .get_triplet(&key(i, "held@example.org"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((t.passed, t.passes), (true, 0), "{i}");
        }
        assert_eq!(store.get_triplet(&done).await.unwrap(), Some(passed));
        let other = TripletKey {
            client: "10.0.7.0/24".into(),
            sender: "s7@example.net".into(),
            recipient: "r@example.org".into(),
        };
        assert!(!store.get_triplet(&other).await.unwrap().unwrap().passed);

        // Named one by one: the passed one is reported as such.
        let one = ReleaseTarget::Keys(vec![done.clone(), key(1000, "held@example.org")]);
        let r = release(&store, &engine, &one, 10, Duration::from_secs(60))
            .await
            .report;
        assert_eq!(
            (r.count, r.already_passed, r.complete),
            (0, vec![done], true)
        );
    }

    /// The memory store whose triplet updates fail after the first `ok` (a shared store
    /// going away in the middle of a walk).
    struct FailsAfter {
        inner: MemoryStore,
        ok: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Store for FailsAfter {
        fn describe(&self) -> String {
            "fails after a few updates".into()
        }
        async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
            self.inner.get_triplet(key).await
        }
        async fn update_triplet(
            &self,
            key: &TripletKey,
            f: crate::store::UpdateFn<'_, Triplet>,
        ) -> Result<Option<Triplet>, StoreError> {
            use std::sync::atomic::Ordering;
            let left = self.ok.load(Ordering::Relaxed);
            if left == 0 {
                return Err(StoreError::Unavailable("gone".into()));
            }
            self.ok.store(left - 1, Ordering::Relaxed);
            self.inner.update_triplet(key, f).await
        }
        async fn get_client(
            &self,
            client: &str,
        ) -> Result<Option<crate::engine::ClientRecord>, StoreError> {
            self.inner.get_client(client).await
        }
        async fn update_client(
            &self,
            client: &str,
            f: crate::store::UpdateFn<'_, crate::engine::ClientRecord>,
        ) -> Result<Option<crate::engine::ClientRecord>, StoreError> {
            self.inner.update_client(client, f).await
        }
        async fn expire(
            &self,
            now: u64,
            max_scan: usize,
        ) -> Result<crate::store::ExpireStep, StoreError> {
            self.inner.expire(now, max_scan).await
        }
        async fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush().await
        }
        async fn counts(&self) -> Result<crate::store::Counts, StoreError> {
            self.inner.counts().await
        }
        async fn scan(
            &self,
            kind: EntryKind,
            cursor: Option<&str>,
            limit: usize,
            now: u64,
            keep: crate::store::EntryFilter<'_>,
        ) -> Result<crate::store::Page, StoreError> {
            self.inner.scan(kind, cursor, limit, now, keep).await
        }
        async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError> {
            self.inner.remove_triplet(key).await
        }
        async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
            self.inner.remove_client(client).await
        }

        async fn address_mode(&self) -> Result<Option<String>, StoreError> {
            self.inner.address_mode().await
        }

        async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
            self.inner.set_address_mode(mode).await
        }
    }

    /// A store failing in the middle of a recipient's walk: what was released before stays
    /// in the report (to be audited), beside the error.
    #[tokio::test]
    async fn a_release_cut_short_by_the_store_reports_what_it_released() {
        let store = FailsAfter {
            inner: filled(10).await,
            ok: 4.into(),
        };
        let engine = Engine::default();
        let target = ReleaseTarget::of(
            &ReleaseRequest {
                recipient: "r@example.org".into(),
                ..ReleaseRequest::default()
            },
            &engine,
        )
        .unwrap();
        let done = release(&store, &engine, &target, 10, Duration::from_secs(60)).await;
        assert!(
            matches!(done.error, Some(StoreError::Unavailable(_))),
            "{done:?}"
        );
        assert_eq!((done.report.count, done.report.released.len()), (4, 4));
        assert!(!done.report.complete);
        for key in &done.report.released {
            let t = store.inner.get_triplet(key).await.unwrap().unwrap();
            assert!(t.passed, "{key}");
        }
    }

    #[test]
    fn a_release_names_a_triplet_or_a_recipient() {
        let engine = Engine::default();
        let req = |client: Option<&str>, sender: Option<&str>, recipient: &str| ReleaseRequest {
            client: client.map(Into::into),
            sender: sender.map(Into::into),
            recipient: recipient.into(),
            by: None,
        };
        let key = |client: &str, sender: &str| {
            ReleaseTarget::Keys(vec![TripletKey {
                client: client.into(),
                sender: sender.into(),
                recipient: "b@example.org".into(),
            }])
        };
        let of = |r: ReleaseRequest| ReleaseTarget::of(&r, &engine);
        assert_eq!(
            of(req(
                Some("192.0.2.7"),
                Some("A+x@Example.NET"),
                "<B@example.org>"
            )),
            Ok(key("192.0.2.0/24", "a@example.net"))
        );
        assert_eq!(
            of(req(Some(" SPF:Pool.test "), Some("<>"), "b@example.org")),
            Ok(key("spf:pool.test", "<>"))
        );
        assert_eq!(
            of(req(None, None, "b+tag@example.org")),
            Ok(ReleaseTarget::Recipient {
                recipient: "b@example.org".into(),
                sender: None
            })
        );
        assert!(of(req(Some("192.0.2.7"), None, "b@example.org")).is_err());
        assert!(of(req(None, None, " ")).is_err());
    }

    #[tokio::test]
    async fn a_junk_cursor_is_a_bad_cursor() {
        let store = filled(10).await;
        let m = by_sender("s1");
        let r = list(&store, &m, Some("zz"), 50, 10, ListBudget::default()).await;
        assert!(matches!(r, Err(StoreError::BadCursor(_))), "{r:?}");
    }
}
