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

/// A cap the suite never reaches changes nothing it can observe: the eviction queues and
/// counts kept beside the records stay out of the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capped_stores_conform() {
    conformance::run(Arc::new(MemoryStore::with_cap(1_000_000))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Arc::new(EmbeddedStore::open_capped(&path, 0, 1_000_000).unwrap());
    conformance::run(store).await;
}

/// Keyed addresses on the local backends (`conformance::run_hashed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_stores_conform_with_hashed_addresses() {
    conformance::run_hashed(Arc::new(MemoryStore::new())).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap());
    conformance::run_hashed(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_scans_a_bounded_number_per_call() {
    conformance::scan_examines_a_bounded_number(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_scans_a_bounded_number_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap();
    conformance::scan_examines_a_bounded_number(&store).await;
}

/// Removal through `EmbeddedStore` (what `greygate purge` does when no daemon runs) must
/// reach the file: after a clean reopen, after a crash that follows the commit (a copy of
/// the file taken while the store is open, as a kill -9 leaves it), and for the read-only
/// reader. Scans list records created since the last commit too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_removals_survive_reopen_and_crash() {
    use greygate::engine::{ClientRecord, Triplet, TripletKey};
    use greygate::store::{EmbeddedReader, Entry, EntryKind};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let crashed = dir.path().join("crashed.redb");
    let key = |s: &str| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: s.into(),
        recipient: "r@example.org".into(),
    };
    let rec = Triplet {
        first_seen: 1,
        last_seen: 1,
        expires_at: 1_000_000,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let client = ClientRecord {
        passes: 1,
        last_counted: 1,
        last_seen: 1,
        expires_at: 1_000_000,
    };
    let senders = |entries: Vec<Entry>| -> Vec<String> {
        entries
            .into_iter()
            .map(|e| match e {
                Entry::Triplet { key, .. } => key.sender,
                Entry::Client { client, .. } => client,
            })
            .collect()
    };
    {
        let store = EmbeddedStore::open(&path, 0).unwrap();
        for s in ["a@x", "b@x", "c@x {}:%ü"] {
            store.update_triplet(&key(s), &|_| Some(rec)).await.unwrap();
        }
        store
            .update_client("gone {x}", &|_| Some(client))
            .await
            .unwrap();
        store.flush().await.unwrap();
        // Not committed yet: a scan still lists it.
        store
            .update_triplet(&key("d@x"), &|_| Some(rec))
            .await
            .unwrap();
        let listed = conformance::scan_all(&store, EntryKind::Triplets, 1, 10, &|_| true).await;
        assert_eq!(senders(listed), ["a@x", "b@x", "c@x {}:%ü", "d@x"]);

        assert!(store.remove_triplet(&key("b@x")).await.unwrap());
        assert!(store.remove_client("gone {x}").await.unwrap());
        let listed = conformance::scan_all(&store, EntryKind::Triplets, 2, 10, &|_| true).await;
        assert_eq!(
            senders(listed),
            ["a@x", "c@x {}:%ü", "d@x"],
            "removed at once"
        );
        store.flush().await.unwrap();
        std::fs::copy(&path, &crashed).unwrap();
        // The last commit's state, as a kill -9 now would leave it.
    }
    for file in [&path, &crashed] {
        let store = EmbeddedStore::open(file, 10).unwrap();
        assert_eq!(store.load_report().triplets, 3, "{}", file.display());
        assert_eq!(store.get_triplet(&key("b@x")).await.unwrap(), None);
        assert_eq!(store.get_client("gone {x}").await.unwrap(), None);
        let listed = conformance::scan_all(&store, EntryKind::Triplets, 2, 10, &|_| true).await;
        assert_eq!(senders(listed), ["a@x", "c@x {}:%ü", "d@x"]);
        let clients = conformance::scan_all(&store, EntryKind::Clients, 2, 10, &|_| true).await;
        assert!(clients.is_empty(), "{clients:?}");
    }
    let reader = EmbeddedReader::open(&path).unwrap();
    let listed = conformance::scan_all(&reader, EntryKind::Triplets, 1, 10, &|_| true).await;
    assert_eq!(senders(listed), ["a@x", "c@x {}:%ü", "d@x"]);
    let late = conformance::scan_all(&reader, EntryKind::Triplets, 1, 1_000_001, &|_| true).await;
    assert!(late.is_empty(), "dead records are not listed: {late:?}");
    assert!(matches!(
        reader.remove_triplet(&key("a@x")).await,
        Err(greygate::store::StoreError::ReadOnly)
    ));
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

/// After a daemon run, every file it made that names addresses (the store, the runtime
/// entries) or grants changes (the admin token) is owner-only, whatever the umask gave.
#[test]
fn files_holding_addresses_are_owner_only_after_a_daemon_run() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::harness::DaemonConfig::new(dir.path());
    let d = cfg.start();
    let mut c = d.client();
    let r = c.ask(&crate::harness::rcpt_request(
        "192.0.2.7",
        "alice@example.net",
        "bob@example.org",
    ));
    assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    drop(c);
    let token_file = dir.path().join("admin.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let (s, b) = crate::admin::Http::new(&d).post(
        "/api/runtime/allow",
        Some(token.trim()),
        &serde_json::json!({"target": "recipient", "value": "carol@example.org"}),
    );
    assert_eq!(s, 201, "{b}");
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    let db = cfg.db_path();
    let mut entries = db.clone().into_os_string();
    entries.push(".entries.json");
    for path in [db, entries.into(), token_file] {
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{log}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", path.display());
    }
    // Only the files above (no leftover temporary file beside them).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "admin.token",
            "greygate.redb",
            "greygate.redb.entries.json",
            "greygate.toml"
        ]
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
async fn redis_store_conforms_with_hashed_addresses() {
    let Some(redis) = Redis::start("redis_store_conforms_with_hashed_addresses") else {
        return;
    };
    conformance::run_hashed(Arc::new(redis_store(&redis, 2 * SECOND))).await;
}

/// A shared store opened through `store::open` checks its address mode at its first
/// operation (it connects on first use): a host in the other mode gets every operation
/// refused with the setting named, and writes nothing; the same mode works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_stores_refuse_every_operation_in_the_other_mode() {
    use greygate::engine::AddressKeys;
    use greygate::store::{Access, ServerStore, StoreKind, StoreSpec};
    let Some(redis) = Redis::start("shared_stores_refuse_every_operation_in_the_other_mode") else {
        return;
    };
    let Some(pg) = Postgres::start("shared_stores_refuse_every_operation_in_the_other_mode") else {
        return;
    };
    let hashed = AddressKeys::hashed(conformance::HASHED_SECRET);
    let server = |url: String| ServerStore {
        redis: greygate::store::RedisTopology::Single,
        url,
        pool_size: 2,
        connect_timeout: SECOND,
        tls_ca_file: None,
    };
    for kind in [
        StoreKind::Redis(server(redis.url())),
        StoreKind::Postgres(server(pg.url())),
    ] {
        let spec = |addresses: String| StoreSpec {
            kind: kind.clone(),
            flush_interval: SECOND,
            timeout: 5 * SECOND,
            max_entries: 0,
            addresses,
        };
        let engine = Engine::default().with_addresses(hashed.clone());
        let key = engine.key(
            "192.0.2.1".parse().unwrap(),
            "a@example.net",
            "b@example.org",
        );
        let rec = Triplet {
            first_seen: 1,
            last_seen: 1,
            expires_at: 4_000_000_000,
            attempts: 1,
            passes: 0,
            passed: false,
        };
        let a = greygate::store::open(&spec(hashed.store_mode()), Access::Serve).unwrap();
        a.update_triplet(&key, &|_| Some(rec)).await.unwrap();

        let plain = AddressKeys::plain().store_mode();
        for access in [Access::Serve, Access::Read] {
            let b = greygate::store::open(&spec(plain.clone()), access).unwrap();
            let plain_key = Engine::default().key(
                "192.0.2.1".parse().unwrap(),
                "a@example.net",
                "b@example.org",
            );
            let refused = |r: Result<(), StoreError>| {
                assert!(
                    matches!(&r, Err(StoreError::AddressMode(m)) if m.contains("hash_addresses")),
                    "{kind}: {r:?}"
                );
            };
            refused(b.get_triplet(&plain_key).await.map(|_| ()));
            refused(
                b.update_triplet(&plain_key, &|_| Some(rec))
                    .await
                    .map(|_| ()),
            );
            refused(b.counts().await.map(|_| ()));
            refused(b.address_mode().await.map(|_| ()));
        }
        assert_eq!(
            a.counts().await.unwrap().triplets_pending,
            1,
            "{kind}: nothing written by the refused host"
        );
        let c = greygate::store::open(&spec(hashed.store_mode()), Access::Read).unwrap();
        assert_eq!(c.get_triplet(&key).await.unwrap(), Some(rec), "{kind}");
    }
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

/// An update sends its compare-and-set straight away, against the value this process last
/// saw (absent for a key it never saw): no `GET` first. When another host changed the key
/// meanwhile, the script's answer (the current value) is what the step runs on next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_updates_skip_the_read_and_still_see_other_hosts_writes() {
    let Some(redis) = Redis::start("redis_updates_skip_the_read_and_still_see_other_hosts_writes")
    else {
        return;
    };
    let (mx1, mx2) = (
        redis_store(&redis, 5 * SECOND),
        redis_store(&redis, 5 * SECOND),
    );
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Calls of a command so far (INFO commandstats), 0 when never called.
    let mut calls = async |cmd: &str| -> u64 {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let key = TripletKey {
        client: "192.0.2.0/24".into(),
        sender: "a@example.net".into(),
        recipient: "b@example.org".into(),
    };
    let now = unix_now();
    // Adds one attempt (a first sighting: one).
    let step = |old: Option<&Triplet>| {
        Some(match old {
            Some(t) => Triplet {
                attempts: t.attempts + 1,
                ..*t
            },
            None => Triplet {
                first_seen: now,
                last_seen: now,
                expires_at: now + 3600,
                attempts: 1,
                passes: 0,
                passed: false,
            },
        })
    };
    // A first sighting is one SET NX GET; mx2's first update, whose guess (absent) is
    // wrong, gets the current value from it and loads the script.
    let sets = calls("set").await;
    mx1.update_triplet(&key, &step).await.unwrap();
    assert_eq!(calls("set").await, sets + 1, "a first sighting: one SET NX");
    assert_eq!(calls("evalsha").await, 0, "and no script");
    mx2.update_triplet(&key, &step).await.unwrap();
    mx1.update_triplet(&key, &step).await.unwrap();
    let (gets, evals) = (calls("get").await, calls("evalsha").await);
    for _ in 0..10 {
        mx1.update_triplet(&key, &step).await.unwrap();
    }
    assert_eq!(
        calls("evalsha").await,
        evals + 10,
        "one round trip per update"
    );
    // Redis counts the commands a script runs too: the script's own GET, one per call.
    assert_eq!(
        calls("get").await,
        gets + 10,
        "no GET before a compare-and-set"
    );
    // mx2 last saw attempts = 2; the server holds 13: its guess is refused, and the
    // step runs again on what the script answered.
    let old = mx2.update_triplet(&key, &step).await.unwrap();
    assert_eq!(old.map(|t| t.attempts), Some(13));
    assert_eq!(
        calls("evalsha").await,
        evals + 12,
        "a wrong guess: two round trips"
    );
    assert_eq!(calls("get").await, gets + 12, "and no GET of its own");
    assert_eq!(
        mx1.get_triplet(&key).await.unwrap().map(|t| t.attempts),
        Some(14)
    );
    // A step that writes nothing is never answered from a guess: mx1 last saw 13.
    let seen = mx1.update_triplet(&key, &|_| None).await.unwrap();
    assert_eq!(seen.map(|t| t.attempts), Some(14), "read from the server");
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

/// Values from before scans existed hold the record alone: still read and updated, listed
/// from their next write on; a value whose key text does not hash to its key is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_scan_lists_old_values_once_rewritten_and_never_foreign_ones() {
    use greygate::engine::record::Record;
    use greygate::store::EntryKind;
    use greygate::store::redis::triplet_key;
    let Some(redis) =
        Redis::start("redis_scan_lists_old_values_once_rewritten_and_never_foreign_ones")
    else {
        return;
    };
    let store = redis_store(&redis, 2 * SECOND);
    let now = unix_now();
    let rec = Triplet {
        first_seen: now,
        last_seen: now,
        expires_at: now + 3600,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let key = |s: &str| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: s.into(),
        recipient: "r@example.org".into(),
    };
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut set = async |k: String, v: Vec<u8>| {
        let () = ::redis::cmd("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    set(triplet_key(&key("old@x")), rec.to_bytes()).await;
    let mut foreign = rec.to_bytes();
    foreign.extend_from_slice(key("other@x").joined().as_bytes());
    set(triplet_key(&key("foreign@x")), foreign).await;
    let listed = || conformance::scan_all(&store, EntryKind::Triplets, 10, now, &|_| true);
    assert!(listed().await.is_empty(), "neither is listed");
    assert_eq!(store.get_triplet(&key("old@x")).await.unwrap(), Some(rec));
    let later = Triplet {
        last_seen: now + 1,
        attempts: 2,
        ..rec
    };
    // The step may first run on this process's guess (see `store::redis`); the run that
    // wrote is the last, on the value the server held.
    let seen = std::sync::Mutex::new(Vec::new());
    store
        .update_triplet(&key("old@x"), &|old| {
            seen.lock().unwrap().push(old.copied());
            Some(later)
        })
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().last(),
        Some(&Some(rec)),
        "old value read"
    );
    let got = listed().await;
    assert_eq!(
        got,
        [greygate::store::Entry::Triplet {
            key: key("old@x"),
            record: later
        }]
    );
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
async fn postgres_store_conforms_with_hashed_addresses() {
    let Some(pg) = Postgres::start("postgres_store_conforms_with_hashed_addresses") else {
        return;
    };
    conformance::run_hashed(Arc::new(postgres_store(&pg, 5 * SECOND))).await;
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
    let all: Vec<i32> = (1..=greygate::store::postgres::SCHEMA_VERSION).collect();
    assert_eq!(versions, all, "every migration once");

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

    // Rows from schema 1 have no key text: not listed until their next write gives them one.
    client
        .execute("UPDATE greygate_triplets SET key_text = NULL", &[])
        .await
        .unwrap();
    use greygate::store::EntryKind;
    let listed = || conformance::scan_all(&a, EntryKind::Triplets, 1, 5000, &|_| true);
    assert!(listed().await.is_empty());
    a.update_triplet(&key(4), &|_| Some(rec(20_000)))
        .await
        .unwrap();
    let got = listed().await;
    assert_eq!(
        got,
        [greygate::store::Entry::Triplet {
            key: key(4),
            record: rec(20_000)
        }]
    );

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

/// Under load a commit goes to the journal (one row) instead of the tables; the journal is
/// merged when a commit is small again, when it has grown, at a scan, at the final flush,
/// and when the file is opened after a hard kill. Every path ends with the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_journal_survives_a_crash_and_merges() {
    use greygate::engine::{ClientRecord, Triplet, TripletKey};
    use greygate::store::{EmbeddedReader, EntryKind, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let crashed = dir.path().join("crashed.redb");
    let unmerged = dir.path().join("unmerged.redb");
    let key = |i: u32| TripletKey {
        client: format!("10.{}.{}.0/24", i / 256 % 256, i % 256),
        sender: format!("s{i}@example.net"),
        recipient: "r@example.org".into(),
    };
    let rec = |seen: u64| Triplet {
        first_seen: 1,
        last_seen: seen,
        expires_at: 1_000_000,
        attempts: 1,
        passes: 0,
        passed: seen > 1,
    };
    let client = ClientRecord {
        passes: 1,
        last_counted: 1,
        last_seen: 1,
        expires_at: 1_000_000,
    };
    // What every copy must hold in the end.
    let check = |store: EmbeddedStore, what: &'static str| async move {
        assert_eq!(store.load_report().triplets, 4_900, "{what}");
        assert_eq!(store.load_report().clients, 3_000, "{what}");
        for i in [0, 99, 100, 2_499, 2_500, 4_999] {
            let got = store.get_triplet(&key(i)).await.unwrap();
            let want = match i {
                0..100 => None,
                100..2_500 => Some(rec(2)),
                _ => Some(rec(1)),
            };
            assert_eq!(got, want, "{what}: triplet {i}");
        }
    };
    {
        let store = EmbeddedStore::open(&path, 0).unwrap();
        for i in 0..5_000 {
            store
                .update_triplet(&key(i), &|_| Some(rec(1)))
                .await
                .unwrap();
        }
        for i in 0..3_000 {
            let c = format!("c{i}");
            store.update_client(&c, &|_| Some(client)).await.unwrap();
        }
        store.flush().await.unwrap();
        for i in 0..2_500 {
            store
                .update_triplet(&key(i), &|_| Some(rec(2)))
                .await
                .unwrap();
        }
        for i in 0..100 {
            assert!(store.remove_triplet(&key(i)).await.unwrap());
        }
        store.flush().await.unwrap();
        // Both commits are journaled now: what a hard kill would leave.
        std::fs::copy(&path, &crashed).unwrap();
    }
    // Closed without the final flush's merge: readers refuse, the store merges on opening.
    std::fs::copy(&path, &unmerged).unwrap();
    for file in [&crashed, &unmerged] {
        match EmbeddedReader::open(file) {
            Err(StoreError::Unavailable(why)) => {
                assert!(why.contains("start greygate serve"), "{why}")
            }
            other => panic!("{}: {:?}", file.display(), other.err()),
        }
        check(EmbeddedStore::open(file, 10).unwrap(), "reopened").await;
        // Opening merged the journal: now the reader sees the same records.
        let reader = EmbeddedReader::open(file).unwrap();
        assert_eq!(reader.get_triplet(&key(50)).await.unwrap(), None);
        assert_eq!(reader.get_triplet(&key(150)).await.unwrap(), Some(rec(2)));
        let all = conformance::scan_all(&reader, EntryKind::Triplets, 500, 10, &|_| true).await;
        assert_eq!(all.len(), 4_900);
        drop(reader);
    }
    {
        let store = EmbeddedStore::open(&path, 0).unwrap();
        // A scan of a journaled store lists every record.
        for i in 0..2_500 {
            store
                .update_triplet(&key(i + 10_000), &|_| Some(rec(1)))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        let all = conformance::scan_all(&store, EntryKind::Triplets, 700, 10, &|_| true).await;
        assert_eq!(all.len(), 7_400);
        for i in 0..2_500 {
            assert!(store.remove_triplet(&key(i + 10_000)).await.unwrap());
        }
        store.flush().await.unwrap();
        store.flush_fully().await.unwrap();
    }
    // The final flush merged: a reader reads the file as it is.
    let reader = EmbeddedReader::open(&path).unwrap();
    let all = conformance::scan_all(&reader, EntryKind::Triplets, 1_000, 10, &|_| true).await;
    assert_eq!(all.len(), 4_900);
    drop(reader);
    check(
        EmbeddedStore::open(&path, 10).unwrap(),
        "after the final flush",
    )
    .await;
}

/// A record renewed in the journal while its row in the tables has expired must not be
/// swept from the tables: a listing that goes on page by page after its first page's merge
/// reads the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_journaled_renewals_survive_the_disk_sweep() {
    use greygate::engine::{Triplet, TripletKey};
    use greygate::store::EntryKind;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap();
    let key = |i: u32| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: format!("s{i:05}@example.net"),
        recipient: "r@example.org".into(),
    };
    let until = |expires_at: u64| Triplet {
        first_seen: 1,
        last_seen: 1,
        expires_at,
        attempts: 1,
        passes: 1,
        passed: true,
    };
    let renew = |expires_at: u64| {
        let store = &store;
        async move {
            for i in 0..3_000 {
                store
                    .update_triplet(&key(i), &|_| Some(until(expires_at)))
                    .await
                    .unwrap();
            }
        }
    };
    renew(1_000).await;
    store.flush_fully().await.unwrap();
    // The first page merges: every row in the tables lives until 1,000.
    let first = store
        .scan(EntryKind::Triplets, None, 10, 0, &|_| true)
        .await
        .unwrap();
    assert_eq!(first.entries.len(), 10);
    // Renewed in memory (to the journal: 3,000 changes), then the clock passes 1,000.
    renew(5_000).await;
    loop {
        if store.expire(1_500, 1 << 20).await.unwrap().cycle_done {
            break;
        }
    }
    store.flush().await.unwrap();
    let (mut listed, mut cursor) = (0, first.next);
    while let Some(from) = cursor {
        let page = store
            .scan(EntryKind::Triplets, Some(&from), 1_000, 1_500, &|_| true)
            .await
            .unwrap();
        listed += page.entries.len();
        cursor = page.next;
    }
    assert_eq!(listed, 2_990, "every renewed record is listed");
}
