//! The store conformance suite: every backend, now and later, must pass it.
//!
//! Call [`run`] from a test with a fresh, empty store ([`run_with`] for a store that
//! expires by server TTL). It checks atomic updates under concurrency, first-sighting
//! races, expiry and counts, using the engine's own step functions as update closures.

use std::sync::Arc;

use crate::engine::{ClientRecord, Engine, Triplet, TripletKey, TripletOutcome};

use super::Store;

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
