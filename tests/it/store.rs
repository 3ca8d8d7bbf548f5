//! The store conformance suite against every backend available here.

use std::sync::Arc;

use greygate::store::{EmbeddedStore, MemoryStore, Store, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    conformance::run(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap());
    conformance::run(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_persists_flushed_changes_and_deletions() {
    use greygate::engine::{Engine, TripletKey};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let engine = Engine::default();
    let key = |s: &str| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: s.into(),
        recipient: "r@example.org".into(),
    };
    {
        let store = EmbeddedStore::open(&path, 0).unwrap();
        for s in ["a@x", "b@x", "c@x"] {
            store
                .update_triplet(&key(s), &|old| {
                    Some(engine.triplet_step(old, 1000, engine.policy.delay).1)
                })
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        // Expire everything (records written at 1000 live until 1000 + retry_window).
        let later = 1000 + engine.policy.retry_window + 1;
        store
            .update_triplet(&key("d@x"), &|old| {
                Some(engine.triplet_step(old, later, engine.policy.delay).1)
            })
            .await
            .unwrap();
        loop {
            if store.expire(later, 1 << 20).await.unwrap().cycle_done {
                break;
            }
        }
        store.flush().await.unwrap();
    }
    let store = EmbeddedStore::open(&path, 0).unwrap();
    let report = store.load_report();
    assert_eq!(
        report.triplets, 1,
        "only the live record is on disk: {report:?}"
    );
    assert!(store.get_triplet(&key("d@x")).await.unwrap().is_some());
    assert!(store.get_triplet(&key("a@x")).await.unwrap().is_none());
}

#[tokio::test]
async fn embedded_store_refuses_a_second_opener_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = EmbeddedStore::open(&path, 0).unwrap();
    let err = EmbeddedStore::open(&path, 0)
        .err()
        .expect("second open fails");
    assert!(
        matches!(err, greygate::store::StoreError::Locked { .. }),
        "{err}"
    );
}

// ---- Shared backends, each against a real server started for the test. ----

use std::time::{Duration, Instant};

use greygate::engine::{ClientRecord, Engine, Triplet, TripletKey, TripletOutcome};
use greygate::store::conformance::Expiry;
use greygate::store::{PostgresStore, RedisStore, StoreError};

use crate::harness::postgres::Postgres;
use crate::harness::redis::Redis;

const SECOND: Duration = Duration::from_secs(1);

fn unix_now() -> u64 {
    greygate::service::unix_now()
}

fn redis_store(redis: &Redis, timeout: Duration) -> RedisStore {
    RedisStore::new(&redis.url(), SECOND, timeout).expect("redis store")
}

fn postgres_store(pg: &Postgres, timeout: Duration) -> PostgresStore {
    PostgresStore::new(&pg.url(), 8, SECOND, timeout).expect("postgres store")
}

/// Polls `op` until it succeeds; panics after `within`.
async fn recovers<T>(
    within: Duration,
    what: &str,
    mut op: impl AsyncFnMut() -> Result<T, StoreError>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: not back within {within:?}: {e}"),
        }
    }
}

/// Two stores on one server stand for two MX hosts: they share no in-process lock, so
/// every race between them is settled by the server (compare-and-set or row locks).
async fn two_hosts_race(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let engine = Arc::new(Engine::default());
    let key = TripletKey {
        client: "198.51.100.0/24".into(),
        sender: "race@example.net".into(),
        recipient: "rcpt@example.org".into(),
    };
    let now = unix_now();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (e, k) = (engine.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let at = now + i % 2;
            let old = s
                .update_triplet(&k, &|old| Some(e.triplet_step(old, at, e.policy.delay).1))
                .await
                .expect("update under contention");
            let outcome = e.triplet_step(old.as_ref(), at, e.policy.delay).0;
            s.update_client("198.51.100.0/24", &|old: Option<&ClientRecord>| {
                let mut c = old.copied().unwrap_or(ClientRecord {
                    passes: 0,
                    last_counted: 0,
                    last_seen: 0,
                    expires_at: now + 3600,
                });
                c.passes += 1;
                Some(c)
            })
            .await
            .expect("client update under contention");
            outcome
        }));
    }
    let mut news = 0;
    for t in tasks {
        if t.await.unwrap() == TripletOutcome::New {
            news += 1;
        }
    }
    assert_eq!(news, 1, "one first sighting across both hosts");
    let t: Triplet = a.get_triplet(&key).await.unwrap().expect("record");
    assert_eq!(t.attempts, 64, "every attempt counted once: {t:?}");
    assert!(t.first_seen == now || t.first_seen == now + 1, "{t:?}");
    let c = b.get_client("198.51.100.0/24").await.unwrap().unwrap();
    assert_eq!(c.passes, 64, "no increment lost between hosts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_conforms() {
    let Some(redis) = Redis::start("redis_store_conforms") else {
        return;
    };
    let store = Arc::new(redis_store(&redis, 2 * SECOND));
    conformance::run_with(store, Expiry::ServerTtl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_two_hosts_race_is_settled_by_compare_and_set() {
    let Some(redis) = Redis::start("redis_two_hosts_race_is_settled_by_compare_and_set") else {
        return;
    };
    two_hosts_race(
        Arc::new(redis_store(&redis, 5 * SECOND)),
        Arc::new(redis_store(&redis, 5 * SECOND)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_records_get_ttls_from_their_expiry() {
    let Some(redis) = Redis::start("redis_records_get_ttls_from_their_expiry") else {
        return;
    };
    let store = redis_store(&redis, 2 * SECOND);
    let now = unix_now();
    let rec = |expires_at| Triplet {
        first_seen: now,
        last_seen: now,
        expires_at,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let key = |s: &str| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: s.into(),
        recipient: "r@example.org".into(),
    };
    for (sender, expires_at) in [
        ("hour@x", now + 3600),
        ("dead@x", now - 10),
        ("never@x", u64::MAX - 1),
    ] {
        store
            .update_triplet(&key(sender), &|_| Some(rec(expires_at)))
            .await
            .unwrap();
    }
    store
        .update_client("192.0.2.0/24", &|_| {
            Some(ClientRecord {
                passes: 1,
                last_counted: now,
                last_seen: now,
                expires_at: now + 86_400,
            })
        })
        .await
        .unwrap();

    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut ttl = async |k: String| -> i64 {
        ::redis::cmd("TTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    use greygate::store::redis::{client_key, triplet_key};
    let hour = ttl(triplet_key(&key("hour@x"))).await;
    assert!((3590..=3600).contains(&hour), "TTL from expires_at: {hour}");
    let dead = ttl(triplet_key(&key("dead@x"))).await;
    assert!(
        (1..=60).contains(&dead),
        "a dead record lingers briefly, never forever: {dead}"
    );
    assert_eq!(
        ttl(triplet_key(&key("never@x"))).await,
        -1,
        "no TTL beyond ten years"
    );
    let day = ttl(client_key("192.0.2.0/24")).await;
    assert!((86_390..=86_400).contains(&day), "client TTL: {day}");
    // An update rewrites the TTL with the record.
    store
        .update_triplet(&key("never@x"), &|_| Some(rec(now + 600)))
        .await
        .unwrap();
    let renewed = ttl(triplet_key(&key("never@x"))).await;
    assert!((590..=600).contains(&renewed), "{renewed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_fails_fast_while_down_or_frozen_and_recovers() {
    let Some(mut redis) = Redis::start("redis_store_fails_fast_while_down_or_frozen_and_recovers")
    else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let store = redis_store(&redis, timeout);
    let engine = Engine::default();
    let key = TripletKey {
        client: "192.0.2.0/24".into(),
        sender: "a@x".into(),
        recipient: "b@x".into(),
    };
    let touch = async || {
        store
            .update_triplet(&key, &|old| {
                Some(engine.triplet_step(old, unix_now(), engine.policy.delay).1)
            })
            .await
    };
    touch().await.expect("works while up");

    // Frozen: the command times out, and the next request does not wait again.
    redis.pause();
    let t = Instant::now();
    let e = touch().await.unwrap_err();
    assert!(
        matches!(e, StoreError::Timeout(_) | StoreError::Unavailable(_)),
        "{e}"
    );
    assert!(
        t.elapsed() < timeout + Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let e = store.get_client("192.0.2.0/24").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "fails fast: {:?}",
        t.elapsed()
    );
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    redis.resume();
    recovers(5 * SECOND, "after SIGCONT", touch).await;

    // Killed: connection refused; restarted (empty) on the same port: back by itself.
    redis.kill();
    let t = Instant::now();
    assert!(touch().await.is_err());
    assert!(
        t.elapsed() < timeout + Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    redis.restart();
    let old = recovers(5 * SECOND, "after restart", touch).await;
    assert_eq!(old, None, "the restarted server is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() {
    let Some(pg) = Postgres::start("postgres_store_conforms") else {
        return;
    };
    conformance::run(Arc::new(postgres_store(&pg, 5 * SECOND))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_hosts_race_is_settled_by_row_locks() {
    let Some(pg) = Postgres::start("postgres_two_hosts_race_is_settled_by_row_locks") else {
        return;
    };
    two_hosts_race(
        Arc::new(postgres_store(&pg, 10 * SECOND)),
        Arc::new(postgres_store(&pg, 10 * SECOND)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_is_migrated_once_and_expiry_goes_in_batches() {
    let Some(pg) = Postgres::start("postgres_schema_is_migrated_once_and_expiry_goes_in_batches")
    else {
        return;
    };
    // Two hosts starting together both migrate a fresh database: one does it, the other
    // finds it done.
    let (a, b) = (
        postgres_store(&pg, 5 * SECOND),
        postgres_store(&pg, 5 * SECOND),
    );
    let (ra, rb) = tokio::join!(a.counts(), b.counts());
    assert_eq!(ra.unwrap(), rb.unwrap());
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = client
        .query("SELECT version FROM greygate_schema", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [greygate::store::postgres::SCHEMA_VERSION]);

    let rec = |expires_at| Triplet {
        first_seen: 1,
        last_seen: 1,
        expires_at,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let key = |i: u32| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: format!("s{i}@x"),
        recipient: "r@x".into(),
    };
    for i in 0..5 {
        let expires_at = if i < 3 { 100 } else { 10_000 };
        a.update_triplet(&key(i), &|_| Some(rec(expires_at)))
            .await
            .unwrap();
    }
    let step = a.expire(5000, 2).await.unwrap();
    assert_eq!((step.removed, step.cycle_done), (2, false), "{step:?}");
    let step = a.expire(5000, 2).await.unwrap();
    assert_eq!((step.removed, step.cycle_done), (1, true), "{step:?}");
    let counts = b.counts().await.unwrap();
    assert_eq!(counts.triplets_pending, 2, "live rows kept: {counts:?}");

    // A database migrated by a newer greygate is refused rather than written blindly.
    client
        .execute("INSERT INTO greygate_schema (version) VALUES (99)", &[])
        .await
        .unwrap();
    let newer = postgres_store(&pg, 5 * SECOND);
    let e = newer.get_triplet(&key(4)).await.unwrap_err();
    assert!(e.to_string().contains("newer than this greygate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_fails_fast_while_down_and_recovers() {
    let Some(mut pg) = Postgres::start("postgres_store_fails_fast_while_down_and_recovers") else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let store = postgres_store(&pg, timeout);
    let engine = Engine::default();
    let key = TripletKey {
        client: "192.0.2.0/24".into(),
        sender: "a@x".into(),
        recipient: "b@x".into(),
    };
    let touch = async || {
        store
            .update_triplet(&key, &|old| {
                Some(engine.triplet_step(old, unix_now(), engine.policy.delay).1)
            })
            .await
    };
    touch().await.expect("works while up");
    pg.crash();
    let t = Instant::now();
    assert!(touch().await.is_err(), "server down");
    assert!(
        t.elapsed() < timeout + Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let e = touch().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "fails fast: {:?}",
        t.elapsed()
    );
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    pg.start_again();
    let old = recovers(10 * SECOND, "after restart", touch).await;
    assert!(old.is_some(), "the record survived the crash: {old:?}");
}
