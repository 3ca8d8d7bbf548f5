//! The store conformance suite: every backend, now and later, must pass it.
//!
//! Call [`run`] from a test with a fresh, empty store ([`run_with`] for a store that
//! expires by server TTL). It checks atomic updates under concurrency, first-sighting
//! races, expiry, counts, scans, removal and an operator's release, using the engine's own
//! step functions as update closures.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::engine::{ClientRecord, Engine, ReleaseOutcome, Triplet, TripletKey, TripletOutcome};

use super::{Entry, EntryFilter, EntryKind, SCAN_EXAMINE, Store};

fn key(i: usize) -> TripletKey {
    TripletKey {
        client: format!("192.0.{}.0/24", i % 250),
        sender: format!("sender{i}@example.net"),
        recipient: "rcpt@example.org".into(),
    }
}

/// How a backend removes dead records, which decides what the expiry check can observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `expire(now, ..)` deletes the records whose `expires_at` is before the `now` it is
    /// given (memory, embedded, postgres): the suite checks exactly that.
    Sweep,
    /// The server deletes records when their TTL runs out, on its own clock, and `expire`
    /// has nothing to do (redis). A TTL cannot follow the synthetic clock this suite uses,
    /// so here the suite checks that `expire` is harmless and keeps live records; the TTLs
    /// themselves are tested against the real server's clock beside the backend's run.
    ServerTtl,
}

/// Runs every check against `store`, which must start empty and expire by sweeping.
/// Panics with a message naming the failed check.
pub async fn run(store: Arc<dyn Store>) {
    run_with(store, Expiry::Sweep).await;
}

/// [`run`] for a store that expires as `expiry` says.
pub async fn run_with(store: Arc<dyn Store>, expiry: Expiry) {
    scan_of_empty_store_is_complete(&*store).await;
    missing_records_read_as_none(&*store).await;
    update_returns_old_and_writes_new(&*store).await;
    none_from_update_writes_nothing(&*store).await;
    concurrent_updates_are_atomic(store.clone()).await;
    first_sighting_race_has_one_winner(store.clone()).await;
    keys_with_odd_characters(&*store).await;
    match expiry {
        Expiry::Sweep => expiry_removes_only_dead_records(&*store).await,
        Expiry::ServerTtl => ttl_expiry_keeps_live_records(&*store).await,
    }
    scan_pages_list_every_live_triplet_once(&*store).await;
    scan_pages_list_every_live_client_once(&*store).await;
    junk_cursors_are_refused_as_such(&*store).await;
    removal_removes_and_reports(&*store).await;
    release_passes_the_next_retry(&*store).await;
    shared_entries_keep_one_list(store.clone()).await;
    store.flush().await.expect("flush");
}

async fn missing_records_read_as_none(s: &dyn Store) {
    assert_eq!(
        s.get_triplet(&key(0)).await.unwrap(),
        None,
        "missing triplet"
    );
    assert_eq!(
        s.get_client("203.0.113.0/24").await.unwrap(),
        None,
        "missing client"
    );
}

async fn update_returns_old_and_writes_new(s: &dyn Store) {
    let engine = Engine::default();
    let k = key(1);
    let old = s
        .update_triplet(&k, &|old| {
            Some(engine.triplet_step(old, 1000, engine.policy.delay).1)
        })
        .await
        .unwrap();
    assert_eq!(old, None, "first update sees no record");
    let stored = s.get_triplet(&k).await.unwrap().expect("record written");
    assert_eq!(
        (stored.first_seen, stored.attempts, stored.passed),
        (1000, 1, false)
    );
    let old = s
        .update_triplet(&k, &|old| {
            Some(engine.triplet_step(old, 1400, engine.policy.delay).1)
        })
        .await
        .unwrap();
    assert_eq!(old, Some(stored), "second update sees the first record");
    let passed = s.get_triplet(&k).await.unwrap().unwrap();
    assert!(passed.passed, "record passed after the delay");
    assert_eq!(passed.first_seen, 1000, "first_seen kept");

    let c = ClientRecord {
        passes: 3,
        last_counted: 10,
        last_seen: 20,
        expires_at: 30,
    };
    assert_eq!(
        s.update_client("198.51.100.0/24", &|_| Some(c))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.get_client("198.51.100.0/24").await.unwrap(),
        Some(c),
        "client written"
    );
}

async fn none_from_update_writes_nothing(s: &dyn Store) {
    let k = key(2);
    assert_eq!(s.update_triplet(&k, &|_| None).await.unwrap(), None);
    assert_eq!(
        s.get_triplet(&k).await.unwrap(),
        None,
        "None must not create a record"
    );
}

async fn concurrent_updates_are_atomic(store: Arc<dyn Store>) {
    const TASKS: u32 = 64;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            s.update_client("192.0.2.0/24", &|old: Option<&ClientRecord>| {
                let mut c = old.copied().unwrap_or(ClientRecord {
                    passes: 0,
                    last_counted: 0,
                    last_seen: 0,
                    expires_at: u64::MAX,
                });
                c.passes += 1;
                Some(c)
            })
            .await
            .unwrap()
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let c = store.get_client("192.0.2.0/24").await.unwrap().unwrap();
    assert_eq!(c.passes, TASKS, "no increment may be lost");
}

async fn first_sighting_race_has_one_winner(store: Arc<dyn Store>) {
    let engine = Arc::new(Engine::default());
    let k = key(3);
    let mut handles = Vec::new();
    for i in 0..32u64 {
        let (s, e, k) = (store.clone(), engine.clone(), k.clone());
        handles.push(tokio::spawn(async move {
            let now = 5000 + i % 3;
            let old = s
                .update_triplet(&k, &|old| Some(e.triplet_step(old, now, e.policy.delay).1))
                .await
                .unwrap();
            e.triplet_step(old.as_ref(), now, e.policy.delay).0
        }));
    }
    let mut news = 0;
    for h in handles {
        if h.await.unwrap() == TripletOutcome::New {
            news += 1;
        }
    }
    assert_eq!(news, 1, "exactly one request may see the first sighting");
    let t: Triplet = store.get_triplet(&k).await.unwrap().unwrap();
    assert_eq!(t.attempts, 32, "every attempt counted once");
}

async fn keys_with_odd_characters(s: &dyn Store) {
    let k = TripletKey {
        client: "2001:db8::/64".into(),
        sender: "\"we ird\"@exämple.net".into(),
        recipient: "a=b/c%d@example.org".into(),
    };
    let engine = Engine::default();
    s.update_triplet(&k, &|old| {
        Some(engine.triplet_step(old, 7, engine.policy.delay).1)
    })
    .await
    .unwrap();
    assert!(
        s.get_triplet(&k).await.unwrap().is_some(),
        "odd key stored and found"
    );
    let other = TripletKey {
        recipient: "a=b/c%d@example.orG".into(),
        ..k.clone()
    };
    assert_eq!(s.get_triplet(&other).await.unwrap(), None, "keys are exact");
}

/// Writes a triplet that lives (almost) forever and one that expired at 50,000.
async fn write_live_and_dead(s: &dyn Store) -> (TripletKey, TripletKey) {
    let (live, dead) = (key(100), key(101));
    let rec = |expires_at| Triplet {
        first_seen: 1,
        last_seen: 1,
        expires_at,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    s.update_triplet(&live, &|_| Some(rec(u64::MAX - 1)))
        .await
        .unwrap();
    s.update_triplet(&dead, &|_| Some(rec(50_000)))
        .await
        .unwrap();
    (live, dead)
}

async fn expiry_removes_only_dead_records(s: &dyn Store) {
    let (live, dead) = write_live_and_dead(s).await;
    let gone = ClientRecord {
        passes: 1,
        last_counted: 1,
        last_seen: 1,
        expires_at: 50_000,
    };
    s.update_client("203.0.113.0/24", &|_| Some(gone))
        .await
        .unwrap();
    let now = 50_001;
    let mut removed = 0;
    for _ in 0..100_000 {
        let step = s.expire(now, 64).await.unwrap();
        removed += step.removed;
        if step.cycle_done {
            break;
        }
    }
    assert!(removed >= 2, "expired records removed (removed {removed})");
    assert_eq!(
        s.get_triplet(&dead).await.unwrap(),
        None,
        "dead triplet gone"
    );
    assert_eq!(
        s.get_client("203.0.113.0/24").await.unwrap(),
        None,
        "dead client gone"
    );
    assert!(
        s.get_triplet(&live).await.unwrap().is_some(),
        "live triplet kept"
    );
    let counts = s.counts().await.unwrap();
    assert!(
        counts.triplets_pending >= 1,
        "counts see the live record: {counts:?}"
    );
}

async fn ttl_expiry_keeps_live_records(s: &dyn Store) {
    // The far future must not overflow a TTL; the long past must not fail the write.
    let (live, _dead) = write_live_and_dead(s).await;
    let step = s.expire(50_001, 64).await.unwrap();
    assert!(step.cycle_done, "a TTL store has no sweep to continue");
    assert!(
        s.get_triplet(&live).await.unwrap().is_some(),
        "live triplet kept"
    );
    let counts = s.counts().await.unwrap();
    assert!(
        counts.triplets_pending >= 1,
        "counts see the live record: {counts:?}"
    );
}

// ---- Scans and removal. Other checks leave records behind, so these mark their own. ----

/// Far in the future, yet within 32 bits (the in-memory form) and beyond any TTL.
const LIVE: u64 = 4_000_000_000;
/// The `now` scans are made at; records expiring before it are dead.
const SCAN_NOW: u64 = 60_000;
const SCAN_RCPT: &str = "scan@example.org";

/// Senders that must round-trip through every backend's keys, cursors and values.
const ODD: &[&str] = &[
    "with space@example.net",
    "ünï©ødé@exämple.net",
    "{braces}@example.net",
    "}{@example.net",
    "a:b:c@example.net",
    "100%@example.net",
    "\"q.u\\ote\"@example.net",
    "",
];

/// Pages through `kind` with `limit` until the walk ends, checking each page's size.
pub async fn scan_all(
    s: &dyn Store,
    kind: EntryKind,
    limit: usize,
    now: u64,
    keep: EntryFilter<'_>,
) -> Vec<Entry> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let page = s
            .scan(kind, cursor.as_deref(), limit, now, keep)
            .await
            .expect("scan");
        assert!(
            page.entries.len() <= limit.max(1),
            "page of {} entries over limit {limit}",
            page.entries.len()
        );
        all.extend(page.entries);
        match page.next {
            Some(next) => {
                assert_ne!(cursor.as_deref(), Some(next.as_str()), "cursor must move");
                cursor = Some(next);
            }
            None => return all,
        }
    }
    panic!("scan of {kind:?} does not end");
}

fn triplet_of(e: &Entry) -> Option<(&TripletKey, &Triplet)> {
    match e {
        Entry::Triplet { key, record } => Some((key, record)),
        Entry::Client { .. } => None,
    }
}

fn marked(e: &Entry) -> bool {
    triplet_of(e).is_some_and(|(k, _)| k.recipient == SCAN_RCPT)
}

async fn scan_of_empty_store_is_complete(s: &dyn Store) {
    for kind in [EntryKind::Triplets, EntryKind::Clients] {
        let page = s.scan(kind, None, 10, 0, &|_| true).await.expect("scan");
        assert!(page.entries.is_empty(), "empty store lists {page:?}");
        assert_eq!(page.next, None, "empty store: walk ends at once");
    }
}

/// Writes the marked triplets: live ones (every third passed), odd keys among them, and
/// dead ones. Returns the live keys.
async fn write_marked_triplets(s: &dyn Store) -> Vec<TripletKey> {
    let mut live = Vec::new();
    let senders = (0..15)
        .map(|i| format!("s{i}@example.net"))
        .chain(ODD.iter().map(|o| o.to_string()));
    for (i, sender) in senders.enumerate() {
        let key = TripletKey {
            client: if i % 2 == 0 {
                "192.0.2.0/24"
            } else {
                "2001:db8::/64"
            }
            .into(),
            sender,
            recipient: SCAN_RCPT.into(),
        };
        // Odd keys all live: the removal check removes one of them.
        let dead = i < 15 && i % 7 == 3;
        let rec = Triplet {
            first_seen: 1000 + i as u64,
            last_seen: 2000,
            expires_at: if dead { SCAN_NOW - 1 } else { LIVE },
            attempts: 1,
            passes: 0,
            passed: i % 3 == 0,
        };
        s.update_triplet(&key, &|_| Some(rec)).await.expect("write");
        if !dead {
            live.push(key);
        }
    }
    live
}

/// Checks that `entries` hold each of `want` exactly once, with their current records.
async fn listed_once(s: &dyn Store, entries: &[Entry], want: &[TripletKey], what: &str) {
    let mut seen = HashSet::new();
    for e in entries {
        let (k, rec) = triplet_of(e).expect("a triplet");
        assert!(seen.insert(k.clone()), "{what}: {k} listed twice");
        assert!(rec.expires_at >= SCAN_NOW, "{what}: dead {k} listed");
        let stored = s.get_triplet(k).await.unwrap();
        assert_eq!(stored.as_ref(), Some(rec), "{what}: {k} as stored");
    }
    let want: HashSet<_> = want.iter().cloned().collect();
    let missing: Vec<_> = want.difference(&seen).collect();
    assert!(missing.is_empty(), "{what}: not listed: {missing:?}");
    let extra: Vec<_> = seen.difference(&want).collect();
    assert!(extra.is_empty(), "{what}: listed but not wanted: {extra:?}");
}

async fn scan_pages_list_every_live_triplet_once(s: &dyn Store) {
    let live = write_marked_triplets(s).await;
    for limit in [1, 2, 3, 100] {
        let got = scan_all(s, EntryKind::Triplets, limit, SCAN_NOW, &marked).await;
        listed_once(s, &got, &live, &format!("filtered, limit {limit}")).await;
    }
    // Unfiltered: the marked records among everything else, nothing dead at all.
    let all = scan_all(s, EntryKind::Triplets, 4, SCAN_NOW, &|_| true).await;
    assert!(
        all.iter().all(|e| e.expires_at() >= SCAN_NOW),
        "dead listed"
    );
    let ours: Vec<Entry> = all.into_iter().filter(marked).collect();
    listed_once(s, &ours, &live, "unfiltered").await;
    // A filter on state.
    let passed: Vec<TripletKey> = {
        let mut p = Vec::new();
        for k in &live {
            if s.get_triplet(k).await.unwrap().is_some_and(|t| t.passed) {
                p.push(k.clone());
            }
        }
        p
    };
    assert!(!passed.is_empty());
    let got = scan_all(s, EntryKind::Triplets, 2, SCAN_NOW, &|e| {
        marked(e) && triplet_of(e).is_some_and(|(_, t)| t.passed)
    })
    .await;
    listed_once(s, &got, &passed, "passed only").await;
    // Dead is relative to the `now` given: at an earlier time the dead ones are listed.
    let earlier = scan_all(s, EntryKind::Triplets, 5, SCAN_NOW - 1, &marked).await;
    assert!(
        earlier.len() > live.len(),
        "records dead later are live earlier"
    );
}

async fn scan_pages_list_every_live_client_once(s: &dyn Store) {
    let names: Vec<String> = ODD
        .iter()
        .map(|o| format!("scan-{o}"))
        .chain((0..5).map(|i| format!("scan-198.51.{i}.0/24")))
        .collect();
    let mut want = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let rec = ClientRecord {
            passes: i as u32,
            last_counted: 10,
            last_seen: 20,
            expires_at: if i == 2 { SCAN_NOW - 1 } else { LIVE },
        };
        s.update_client(name, &|_| Some(rec)).await.expect("write");
        if i != 2 {
            want.insert(name.clone(), rec);
        }
    }
    let ours = |e: &Entry| matches!(e, Entry::Client { client, .. } if client.starts_with("scan-"));
    for limit in [1, 3, 100] {
        let mut got = BTreeMap::new();
        for e in scan_all(s, EntryKind::Clients, limit, SCAN_NOW, &ours).await {
            let Entry::Client { client, record } = e else {
                panic!("a triplet in a client scan: {e:?}");
            };
            let again = got.insert(client.clone(), record);
            assert!(
                again.is_none(),
                "client {client:?} listed twice (limit {limit})"
            );
        }
        assert_eq!(got, want, "clients listed, limit {limit}");
    }
    let triplets = scan_all(s, EntryKind::Triplets, 50, SCAN_NOW, &|_| true).await;
    assert!(
        triplets.iter().all(|e| triplet_of(e).is_some()),
        "kinds kept apart"
    );
}

async fn removal_removes_and_reports(s: &dyn Store) {
    let key = scan_all(s, EntryKind::Triplets, 100, SCAN_NOW, &marked)
        .await
        .into_iter()
        .find_map(|e| {
            triplet_of(&e)
                .map(|(k, _)| k.clone())
                .filter(|k| k.sender == ODD[2])
        })
        .expect("written by the scan check");
    assert!(
        s.remove_triplet(&key).await.unwrap(),
        "existing triplet removed"
    );
    assert!(
        !s.remove_triplet(&key).await.unwrap(),
        "second removal finds nothing"
    );
    assert_eq!(
        s.get_triplet(&key).await.unwrap(),
        None,
        "removed triplet gone"
    );
    let missing = TripletKey {
        sender: "never@example.net".into(),
        ..key.clone()
    };
    assert!(
        !s.remove_triplet(&missing).await.unwrap(),
        "missing triplet"
    );

    let client = "scan-}{@example.net";
    assert!(
        s.remove_client(client).await.unwrap(),
        "existing client removed"
    );
    assert!(!s.remove_client(client).await.unwrap(), "second removal");
    assert!(
        !s.remove_client("scan-never").await.unwrap(),
        "missing client"
    );
    assert_eq!(
        s.get_client(client).await.unwrap(),
        None,
        "removed client gone"
    );

    s.flush().await.expect("flush");
    assert_eq!(s.get_triplet(&key).await.unwrap(), None, "gone after flush");
    let listed = scan_all(s, EntryKind::Triplets, 7, SCAN_NOW, &marked).await;
    assert!(
        listed
            .iter()
            .all(|e| triplet_of(e).is_some_and(|(k, _)| *k != key)),
        "a removed triplet is not listed"
    );
    let clients = scan_all(s, EntryKind::Clients, 7, SCAN_NOW, &|_| true).await;
    assert!(
        clients
            .iter()
            .all(|e| !matches!(e, Entry::Client { client: c, .. } if c == client)),
        "a removed client is not listed"
    );
    // A removed key can be written again, as a new record.
    s.update_triplet(&key, &|old| {
        assert_eq!(old, None, "no trace of the removed record");
        None
    })
    .await
    .unwrap();
}

/// A cursor the store did not make is `BadCursor` (the API answers 400 for it), never a
/// backend error or a silent restart from the beginning.
async fn junk_cursors_are_refused_as_such(s: &dyn Store) {
    let keep = |_: &Entry| true;
    for kind in [EntryKind::Triplets, EntryKind::Clients] {
        for junk in ["zz", "abc", "x.y", "not a cursor!", "%00"] {
            match s.scan(kind, Some(junk), 10, SCAN_NOW, &keep).await {
                Err(super::StoreError::BadCursor(c)) => assert_eq!(c, junk),
                other => panic!("{kind:?} scan from {junk:?}: {other:?}"),
            }
        }
    }
}

/// For stores cheap to fill: a filter that matches nothing over more than
/// [`SCAN_EXAMINE`] records makes empty pages with cursors, not one long call, and the
/// walk still ends with every match.
pub async fn scan_examines_a_bounded_number(s: &dyn Store) {
    let n = SCAN_EXAMINE + SCAN_EXAMINE / 2;
    for i in 0..n {
        let key = TripletKey {
            client: "203.0.113.0/24".into(),
            sender: format!("bulk{i}@example.net"),
            recipient: "bulk@example.org".into(),
        };
        let rec = Triplet {
            first_seen: 1,
            last_seen: 1,
            expires_at: LIVE,
            attempts: 1,
            passes: 0,
            passed: false,
        };
        s.update_triplet(&key, &|_| Some(rec)).await.unwrap();
    }
    let needle = "bulk7@example.net";
    let keep = |e: &Entry| triplet_of(e).is_some_and(|(k, _)| k.sender == needle);
    let first = s
        .scan(EntryKind::Triplets, None, 10, SCAN_NOW, &keep)
        .await
        .unwrap();
    assert!(
        first.next.is_some(),
        "a bounded first page must leave a cursor"
    );
    let mut pages = 1;
    let mut found = first.entries.len();
    let mut cursor = first.next;
    while let Some(c) = cursor {
        let page = s
            .scan(EntryKind::Triplets, Some(&c), 10, SCAN_NOW, &keep)
            .await
            .unwrap();
        pages += 1;
        found += page.entries.len();
        cursor = page.next;
    }
    assert!(pages >= 2, "examined everything in one call");
    assert_eq!(found, 1, "the one match found once");
}

/// An operator's release, the engine's step in one atomic update, makes a pending triplet
/// passed with no pass counted yet: read back, listed and counted as passed. Its next retry
/// passes as `released` and leaves an ordinary passed record (`known` after). Releasing a
/// passed or a missing triplet writes nothing.
async fn release_passes_the_next_retry(s: &dyn Store) {
    let engine = &Engine::default();
    let delay = engine.policy.delay;
    let k = TripletKey {
        client: "203.0.113.0/24".into(),
        sender: "held@example.net".into(),
        recipient: "release@example.org".into(),
    };
    let t0 = 5_000;
    let release = |at: u64| move |old: Option<&Triplet>| engine.release_step(old, at).1;
    let old = s.update_triplet(&k, &release(t0)).await.unwrap();
    assert_eq!(old, None, "release of a missing triplet");
    assert_eq!(
        s.get_triplet(&k).await.unwrap(),
        None,
        "releasing a missing triplet writes nothing"
    );

    s.update_triplet(&k, &|old| Some(engine.triplet_step(old, t0, delay).1))
        .await
        .unwrap();
    let old = s.update_triplet(&k, &release(t0 + 10)).await.unwrap();
    assert_eq!(
        engine.release_step(old.as_ref(), t0 + 10).0,
        ReleaseOutcome::Released,
        "the update saw the pending record: {old:?}"
    );
    let released = s.get_triplet(&k).await.unwrap().expect("released record");
    assert_eq!(
        (released.first_seen, released.passed, released.passes),
        (t0, true, 0),
        "released: passed, no pass counted yet"
    );
    let listed = scan_all(s, EntryKind::Triplets, 50, t0 + 10, &|e: &Entry| {
        triplet_of(e).is_some_and(|(key, _)| *key == k)
    })
    .await;
    assert_eq!(
        listed,
        vec![Entry::Triplet {
            key: k.clone(),
            record: released
        }],
        "listed as released"
    );
    assert!(
        s.counts().await.unwrap().triplets_passed >= 1,
        "counted as passed"
    );

    let again = s.update_triplet(&k, &release(t0 + 11)).await.unwrap();
    assert_eq!(
        engine.release_step(again.as_ref(), t0 + 11).0,
        ReleaseOutcome::AlreadyPassed
    );
    assert_eq!(
        s.get_triplet(&k).await.unwrap(),
        Some(released),
        "a second release changes nothing"
    );

    let step = |at: u64| move |old: Option<&Triplet>| Some(engine.triplet_step(old, at, delay).1);
    let old = s.update_triplet(&k, &step(t0 + 20)).await.unwrap();
    assert_eq!(
        engine.triplet_step(old.as_ref(), t0 + 20, delay).0,
        TripletOutcome::Released { by: 20 },
        "the retry before the delay passes"
    );
    let old = s.update_triplet(&k, &step(t0 + 30)).await.unwrap();
    assert_eq!(
        engine.triplet_step(old.as_ref(), t0 + 30, delay).0,
        TripletOutcome::Known,
        "then an ordinary passed triplet"
    );
    let now = s.get_triplet(&k).await.unwrap().expect("kept");
    assert_eq!((now.passed, now.passes), (true, 2));
    assert!(s.remove_triplet(&k).await.unwrap(), "cleaned up");
}

/// The secret [`run_hashed`] keys addresses with.
pub const HASHED_SECRET: &[u8] = b"conformance-secret-0123456789";

/// Keyed addresses (`[store] hash_addresses`) on `store`, which must start empty: it
/// records the address mode it is first claimed in, keeps keys made of digests and lists
/// them as such, finds a record by the digest of its address, refuses another mode or
/// secret while it holds triplets, and takes a new mode once emptied of them.
pub async fn run_hashed(store: Arc<dyn Store>) {
    use super::{StoreError, mode};
    use crate::engine::AddressKeys;
    use crate::engine::privacy::PLAIN_MODE;

    let s = &*store;
    let keys = AddressKeys::hashed(HASHED_SECRET);
    let hashed = keys.store_mode();
    mode::claim(s, &hashed)
        .await
        .expect("an empty store takes a mode");
    assert_eq!(
        s.address_mode().await.unwrap().as_deref(),
        Some(hashed.as_str()),
        "the mode is recorded"
    );

    let engine = Engine::default().with_addresses(keys.clone());
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let rec = Triplet {
        first_seen: 1,
        last_seen: 1,
        expires_at: LIVE,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let written: Vec<TripletKey> = (0..20)
        .map(|i| {
            engine.key(
                ip,
                &format!("Sender{i}@Example.NET"),
                "rcpt+tag@example.org",
            )
        })
        .collect();
    for k in &written {
        s.update_triplet(k, &|_| Some(rec)).await.unwrap();
    }
    s.flush().await.unwrap();

    let all = scan_all(s, EntryKind::Triplets, 7, 0, &|_| true).await;
    assert_eq!(all.len(), written.len(), "every triplet listed");
    let rcpt = engine.recipient_key("rcpt@example.org");
    for e in &all {
        let (k, _) = triplet_of(e).expect("a triplet");
        assert!(
            k.sender.starts_with("h:") && k.recipient == rcpt && !format!("{k}").contains('@'),
            "listed with digests only: {k}"
        );
        assert_eq!(k.client, "192.0.2.0/24", "the client group stays readable");
    }
    // A query by address: normalised and hashed as the engine keys it.
    let asked = engine.key(ip, "sender3@example.net", "RCPT@example.org");
    assert_eq!(
        s.get_triplet(&asked).await.unwrap(),
        Some(rec),
        "found by the digest of its address"
    );
    let sender = engine.sender_key("sender3@EXAMPLE.net");
    let found = scan_all(s, EntryKind::Triplets, 50, 0, &|e| {
        triplet_of(e).is_some_and(|(k, _)| k.sender == sender)
    })
    .await;
    assert_eq!(found.len(), 1, "one triplet of that sender");

    // Another mode or secret is refused while the store holds triplets.
    let other = AddressKeys::hashed(b"another-conformance-secret-42").store_mode();
    for wanted in [PLAIN_MODE.to_string(), other] {
        for r in [mode::claim(s, &wanted).await, mode::check(s, &wanted).await] {
            assert!(
                matches!(&r, Err(StoreError::AddressMode(m)) if m.contains("hash_")),
                "{wanted} refused: {r:?}"
            );
        }
    }
    assert_eq!(
        s.address_mode().await.unwrap().as_deref(),
        Some(hashed.as_str()),
        "a refusal leaves the recorded mode"
    );
    mode::claim(s, &hashed).await.expect("the same mode again");

    // Emptied of triplets, the store takes another mode.
    for k in &written {
        assert!(s.remove_triplet(k).await.unwrap());
    }
    s.flush_fully().await.unwrap();
    mode::claim(s, PLAIN_MODE)
        .await
        .expect("an emptied store takes a new mode");
    assert_eq!(s.address_mode().await.unwrap().as_deref(), Some(PLAIN_MODE));
}

fn runtime_entry(
    list: crate::engine::ListKind,
    target: crate::engine::Target,
    value: &str,
    added_at: u64,
    expires_at: Option<u64>,
    comment: &str,
) -> crate::engine::RuntimeEntry {
    crate::engine::RuntimeEntry {
        id: 0,
        list,
        target,
        value: value.into(),
        added_at,
        expires_at,
        comment: comment.into(),
    }
}

/// A store that keeps runtime entries for several daemons (`Store::shared_entries`): ids
/// from the store, unique under concurrent adds; the same entry added again updated in
/// place; every change moves the version, a removal of nothing does not; the limit holds.
async fn shared_entries_keep_one_list(store: Arc<dyn Store>) {
    use crate::engine::{ListKind, Target};
    let Some(s) = store.shared_entries() else {
        return;
    };
    let (v0, none) = s.list_entries().await.expect("list entries");
    assert!(none.is_empty(), "a fresh store has no runtime entries");
    assert_eq!(s.entries_version().await.unwrap(), v0);

    let a = s
        .put_entry(
            &runtime_entry(
                ListKind::Allow,
                Target::Client,
                "192.0.2.0/24",
                1000,
                Some(5000),
                "partner",
            ),
            10,
        )
        .await
        .unwrap()
        .expect("room for it");
    assert!(a.id > 0);
    assert_eq!((a.added_at, a.expires_at), (1000, Some(5000)));
    let v1 = s.entries_version().await.unwrap();
    assert_ne!(v1, v0, "an add moves the version");

    // Same list, target and value: updated in place, id and added_at kept.
    let again = s
        .put_entry(
            &runtime_entry(
                ListKind::Allow,
                Target::Client,
                "192.0.2.0/24",
                2000,
                None,
                "",
            ),
            10,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.id, again.added_at, again.expires_at),
        (a.id, 1000, None)
    );
    let v2 = s.entries_version().await.unwrap();
    assert_ne!(v2, v1, "an update moves the version");

    // Concurrent adds (as from several hosts): distinct ids, nothing lost. The value has
    // a space, which the redis index field must keep apart from list and target.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = store.shared_entries().unwrap();
            s.put_entry(
                &runtime_entry(
                    ListKind::Deny,
                    Target::Sender,
                    &format!("/spam {i}/"),
                    1000,
                    None,
                    "",
                ),
                10,
            )
            .await
            .unwrap()
            .unwrap()
            .id
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 8, "unique ids: {ids:?}");
    assert!(!ids.contains(&a.id));

    let (v3, all) = s.list_entries().await.unwrap();
    assert_eq!(all.len(), 9);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "listed by id");
    assert_eq!(all[0].comment, "", "comment updated");
    let full = s
        .put_entry(
            &runtime_entry(ListKind::Allow, Target::Client, "10.0.0.1", 1, None, ""),
            9,
        )
        .await
        .unwrap();
    assert!(full.is_none(), "a new entry beyond the limit is refused");
    assert_eq!(
        s.entries_version().await.unwrap(),
        v3,
        "a refused add changes nothing"
    );

    let some: Vec<u64> = ids.iter().copied().take(3).collect();
    let gone = s
        .remove_entries(&[some[0], some[1], some[2], 999_999])
        .await
        .unwrap();
    assert_eq!(gone.len(), 3);
    assert!(
        gone.iter()
            .all(|e| e.list == ListKind::Deny && some.contains(&e.id))
    );
    let v4 = s.entries_version().await.unwrap();
    assert_ne!(v4, v3, "a removal moves the version");
    assert!(s.remove_entries(&[some[0]]).await.unwrap().is_empty());
    assert_eq!(
        s.entries_version().await.unwrap(),
        v4,
        "removing nothing changes nothing"
    );

    // A removed entry added again is a new one (its old index entry went with it).
    let back = s
        .put_entry(
            &runtime_entry(
                ListKind::Deny,
                Target::Sender,
                &gone[0].value,
                3000,
                None,
                "",
            ),
            10,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(
        !ids.contains(&back.id) && back.id != a.id,
        "ids are not reused"
    );
    assert_eq!(back.added_at, 3000);

    // Leave the store as found for the checks after this one.
    let (_, all) = s.list_entries().await.unwrap();
    let every: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert_eq!(s.remove_entries(&every).await.unwrap().len(), all.len());
    assert!(s.list_entries().await.unwrap().1.is_empty());
}
