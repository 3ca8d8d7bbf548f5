//! The redis backend's high-availability set-ups and TLS, against real servers on
//! loopback: Redis Sentinel (a master, a replica and three sentinels; the master killed
//! under load), Redis Cluster (three masters, keys over every slot owner, a slot migrated
//! while traffic runs) and `rediss://` with a test CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use greygate::engine::{Triplet, TripletKey};
use greygate::store::conformance::{self, Expiry};
use greygate::store::{EntryKind, RedisAuth, RedisStore, RedisTopology, ServerStore, Store};

use crate::harness::redis::Redis;
use crate::harness::tls::TestCa;
use crate::harness::{DaemonConfig, rcpt_request, run_cli};

/// The store timeout the daemons run with: no answer may wait much longer.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
const SECOND: Duration = Duration::from_secs(1);

fn is_defer(action: &str) -> bool {
    action.starts_with("DEFER_IF_PERMIT ")
}

/// Polls `ok` every 100 ms for at most `limit`; panics with `what` when it never holds.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn server(redis: RedisTopology, url: &str, ca: Option<&Path>) -> ServerStore {
    ServerStore {
        redis,
        url: url.into(),
        pool_size: 1,
        connect_timeout: SECOND,
        tls_ca_file: ca.map(Path::to_path_buf),
    }
}

fn key(n: usize) -> TripletKey {
    TripletKey {
        client: "192.0.2.0/24".into(),
        sender: format!("s{n}@example.net"),
        recipient: "r@example.org".into(),
    }
}

/// Writes a fresh pending triplet at `key`.
async fn put(store: &dyn Store, key: &TripletKey, now: u64) -> Result<(), String> {
    let fresh = Triplet {
        first_seen: now,
        last_seen: now,
        expires_at: now + 86_400,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    store
        .update_triplet(key, &|old: Option<&Triplet>| old.is_none().then_some(fresh))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------- Sentinel

/// A master, a replica and three sentinels watching them as `mymaster`, ready to fail over.
struct SentinelSet {
    master: Redis,
    replica: Redis,
    sentinels: Vec<Redis>,
}

impl SentinelSet {
    fn start(test: &str) -> Option<SentinelSet> {
        let master = Redis::start(test)?;
        let replica = Redis::start_args(
            test,
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        )?;
        wait_for("the replica to sync", 15 * SECOND, || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let sentinels: Vec<Redis> = (0..3)
            .map(|_| Redis::start_sentinel(test, master.port).expect("sentinel"))
            .collect();
        // Ready to fail over: each sentinel knows the replica and the two other sentinels.
        for s in &sentinels {
            wait_for("the sentinels to find each other", 20 * SECOND, || {
                let info = s.cli(&["SENTINEL", "MASTER", "mymaster"]);
                let field = |name: &str| {
                    let mut lines = info.lines();
                    lines.find(|l| *l == name)?;
                    lines.next()?.trim().parse::<u32>().ok()
                };
                field("num-slaves") == Some(1) && field("num-other-sentinels") == Some(2)
            });
        }
        Some(SentinelSet {
            master,
            replica,
            sentinels,
        })
    }

    fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first sentinel names it.
    fn named_master(&self) -> String {
        self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"])
    }
}

struct Seen {
    at: Instant,
    took: Duration,
    reply: String,
}

// Done when: Sentinel — killing the master under load: greygate follows the promotion, no
// request waits longer than the store timeout, replicated state survives; time to follow.
#[test]
fn sentinel_failover_under_load_is_followed() {
    let test = "sentinel_failover_under_load_is_followed";
    let Some(mut set) = SentinelSet::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let list = set
        .addrs()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let d = DaemonConfig::new(dir.path())
        .toml(&format!(
            "[greylist]\ndelay = 2\n\n[store]\nbackend = \"redis\"\nsentinels = [{list}]\n\
             master_name = \"mymaster\"\ntimeout = \"{}ms\"\n",
            STORE_TIMEOUT.as_millis()
        ))
        .start();
    let mut c = d.client();
    // State from before the failover, replicated (WAIT) before the master dies.
    let early: Vec<String> = (0..20)
        .map(|n| {
            rcpt_request(
                "198.51.100.7",
                &format!("early{n}@example.net"),
                "r@example.org",
            )
        })
        .collect();
    for r in &early {
        assert!(is_defer(&c.ask(r)), "first sighting deferred");
    }
    let first_seen = Instant::now();
    assert_eq!(
        set.master.cli(&["WAIT", "1", "2000"]).trim(),
        "1",
        "replicated"
    );
    let keys_before = set.master.cli(&["--scan", "--pattern", "gg:t:*"]);
    assert_eq!(keys_before.lines().count(), 20, "{keys_before}");

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            let mut c = d.client();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for n in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let req = rcpt_request("203.0.113.9", &format!("l{t}x{n}@x"), "r@example.org");
                    let at = Instant::now();
                    let reply = c.ask(&req);
                    seen.push(Seen {
                        at,
                        took: at.elapsed(),
                        reply,
                    });
                    std::thread::sleep(Duration::from_millis(5));
                }
                seen
            })
        })
        .collect();

    std::thread::sleep(SECOND);
    let old_master = set.named_master();
    let killed = Instant::now();
    set.master.kill();
    // Followed once a new triplet is greylisted again (written on the new master).
    let mut probe = d.client();
    let mut n = 0;
    let mut promoted = None;
    let followed = loop {
        if promoted.is_none() && set.named_master() != old_master {
            promoted = Some(killed.elapsed());
        }
        n += 1;
        let req = rcpt_request("203.0.113.1", &format!("probe{n}@x"), "r@example.org");
        if is_defer(&probe.ask(&req)) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "greylisting never resumed after the failover:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = load
        .into_iter()
        .flat_map(|t| t.join().expect("load thread"))
        .collect();

    let new_master = set.named_master();
    assert_ne!(old_master, new_master, "the sentinels promoted the replica");
    assert!(
        new_master.contains(&set.replica.port.to_string()),
        "{new_master}"
    );
    let slack = STORE_TIMEOUT + SECOND;
    for s in &seen {
        assert!(
            s.reply == "DUNNO" || is_defer(&s.reply),
            "greylisting or fail-open only: {}",
            s.reply
        );
        assert!(s.took < slack, "answered in {:?} (limit {slack:?})", s.took);
    }
    let during = seen
        .iter()
        .filter(|s| s.at > killed && s.at < killed + followed)
        .count();
    // The replica, now master, holds every record written before the failover.
    let keys_after = set.replica.cli(&["--scan", "--pattern", "gg:t:*"]);
    for k in keys_before.lines() {
        assert!(keys_after.contains(k), "{k} survived the failover");
    }
    // And greygate reads them: the early triplets pass once their delay is over.
    std::thread::sleep((first_seen + 3 * SECOND).saturating_duration_since(Instant::now()));
    for r in &early {
        let reply = c.ask(r);
        assert!(
            !is_defer(&reply),
            "passed after the delay, not a new first sighting: {reply}"
        );
    }
    d.expect_log("greylisting resumes");
    eprintln!(
        "{test}: {} requests, {during} while following; the sentinels named the new master \
         {promoted:?} and greylisting was back {followed:?} after the master was killed \
         (sentinel down-after 500 ms, failover-timeout 3 s)",
        seen.len()
    );
}

// Done when: a demoted old master (READONLY) is left for the new one the sentinels name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_switchover_leaves_a_read_only_old_master() {
    let test = "sentinel_switchover_leaves_a_read_only_old_master";
    let Some(set) = SentinelSet::start(test) else {
        return;
    };
    let topology = RedisTopology::Sentinel {
        sentinels: set.addrs(),
        master_name: "mymaster".into(),
        auth: RedisAuth::default(),
    };
    let store = RedisStore::with_server(&server(topology, "", None), STORE_TIMEOUT).unwrap();
    let who = store.check().await.unwrap();
    assert!(
        who.contains(&format!(
            "sentinel master mymaster at 127.0.0.1:{}",
            set.master.port
        )),
        "{who}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    let list = set
        .addrs()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &cfg,
        format!("[store]\nbackend = \"redis\"\nsentinels = [{list}]\nmaster_name = \"mymaster\"\n"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--connect",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("(sentinel master mymaster at 127.0.0.1:"),
        "{out}"
    );
    let now = unix_now();
    put(&store, &key(1), now).await.unwrap();
    // A failover the old master lives through: it becomes a replica and refuses writes.
    let out = set.sentinels[0].cli(&["SENTINEL", "FAILOVER", "mymaster"]);
    assert!(out.contains("OK"), "{out}");
    wait_for("the old master to be demoted", 20 * SECOND, || {
        set.master.cli(&["ROLE"]).starts_with("slave")
            && set.replica.cli(&["ROLE"]).starts_with("master")
    });
    let t = Instant::now();
    let mut n = 2;
    loop {
        match put(&store, &key(n), now).await {
            Ok(()) => break,
            Err(e) => assert!(
                t.elapsed() < 20 * SECOND,
                "never wrote to the new master: {e}"
            ),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.get_triplet(&key(1)).await.unwrap().is_some(), "kept");
    let on_new = set.replica.cli(&["DBSIZE"]);
    assert!(on_new.trim().parse::<u32>().unwrap() >= 2, "{on_new}");
    eprintln!(
        "{test}: writes back on the new master {:?} after the demotion",
        t.elapsed()
    );
}

// ---------------------------------------------------------------- Cluster

/// Three masters on loopback, one cluster.
struct ClusterSet {
    nodes: Vec<Redis>,
}

impl ClusterSet {
    fn start(test: &str) -> Option<ClusterSet> {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| Redis::start_cluster_node(test))
            .collect::<Option<_>>()?;
        Some(Self::start_from(nodes))
    }

    /// Makes one cluster of `nodes` (started with `Redis::cluster_args`).
    fn start_from(nodes: Vec<Redis>) -> ClusterSet {
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port)))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = nodes[0].cli(&args);
        assert!(out.contains("All 16384 slots covered"), "{out}");
        for n in &nodes {
            wait_for("the cluster to be ok", 20 * SECOND, || {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        ClusterSet { nodes }
    }

    fn topology(&self) -> RedisTopology {
        RedisTopology::Cluster {
            nodes: vec![format!("127.0.0.1:{}", self.nodes[0].port)],
            auth: RedisAuth::default(),
        }
    }

    fn store(&self) -> RedisStore {
        RedisStore::with_server(&server(self.topology(), "", None), 5 * SECOND).unwrap()
    }

    fn id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_owned()
    }
}

// Done when: three masters, keys spread over slots (on all three), listing and counting
// across nodes, a slot migrated mid-traffic (ASK, then MOVED) handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_lists_across_nodes_and_follows_a_migration() {
    let test = "cluster_spreads_keys_lists_across_nodes_and_follows_a_migration";
    let Some(cluster) = ClusterSet::start(test) else {
        return;
    };
    let store = Arc::new(cluster.store());
    let who = store.check().await.unwrap();
    assert!(who.contains("cluster of 3 masters"), "{who}");
    // The same through the configuration: check-config --connect names the set-up.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\nbackend = \"redis\"\ncluster_nodes = [\"127.0.0.1:{}\"]\n",
            cluster.nodes[1].port
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&[
        "check-config",
        "--config",
        cfg.to_str().unwrap(),
        "--connect",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("store server answered: Redis ") && out.contains("(cluster of 3 masters)"),
        "{out}"
    );
    let now = unix_now();
    const N: usize = 300;
    for n in 0..N {
        put(&*store, &key(n), now).await.unwrap();
    }
    for node in &cluster.nodes {
        let size: u32 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(size > 30, "keys on every master: {size} on {}", node.port);
    }
    let listed = conformance::scan_all(&*store, EntryKind::Triplets, 7, now, &|_| true).await;
    let mut senders: Vec<String> = listed
        .iter()
        .map(|e| match e {
            greygate::store::Entry::Triplet { key, .. } => key.sender.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), N, "every triplet listed once at least");
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.triplets_pending, N as u64);

    // Migrate the slot of key(0) to another master while updates run over every key.
    let k0 = greygate::store::redis::triplet_key(&key(0));
    let slot = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", &k0])
        .trim()
        .to_owned();
    let owner = (0..3)
        .find(|&i| {
            cluster.nodes[i]
                .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot])
                .trim()
                != "0"
        })
        .expect("the slot's owner");
    let target = (owner + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for round in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = key(round % N);
                match store.get_triplet(&k).await {
                    Ok(Some(_)) => ok += 1,
                    other => failed.push(format!("{k:?}: {other:?}")),
                }
                match put(&*store, &key(N + round), now).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (src, dst) = (&cluster.nodes[owner], &cluster.nodes[target]);
    let (src_id, dst_id) = (cluster.id(owner), cluster.id(target));
    assert!(
        dst.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id])
            .contains("OK")
    );
    assert!(
        src.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id])
            .contains("OK")
    );
    // Mid-migration: a key still on the source is served, a moved one answers ASK.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys = src.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert!(!keys.is_empty(), "key(0) is in the slot");
    let mut migrate = vec!["MIGRATE", "127.0.0.1"];
    let dst_port = dst.port.to_string();
    migrate.extend([dst_port.as_str(), "", "0", "5000", "KEYS"]);
    migrate.extend(keys.iter().copied());
    let out = src.cli(&migrate);
    assert!(out.contains("OK"), "{out}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in &cluster.nodes {
        let out = n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
        assert!(out.contains("OK"), "{out}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = tokio::time::timeout(30 * SECOND, traffic)
        .await
        .expect("traffic ends")
        .unwrap();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(ok > 50, "traffic ran during the migration ({ok})");
    // key(0) lives on the new owner now, and the store still finds it (MOVED followed).
    assert_eq!(dst.cli(&["EXISTS", &k0]).trim(), "1");
    let old = src.cli(&["EXISTS", &k0]);
    assert!(old.starts_with("MOVED "), "the old owner redirects: {old}");
    assert!(store.get_triplet(&key(0)).await.unwrap().is_some());
    assert!(
        store.remove_triplet(&key(0)).await.unwrap(),
        "removed on its new node"
    );
    let listed = conformance::scan_all(&*store, EntryKind::Triplets, 50, now, &|_| true).await;
    assert!(listed.len() >= N, "{}", listed.len());
    eprintln!("{test}: {ok} operations during the migration of slot {slot}, none failed");
}

// The store conformance suite on a cluster (plain and hashed addresses, the mode key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_conformance() {
    let Some(cluster) = ClusterSet::start("cluster_store_conformance") else {
        return;
    };
    conformance::run_with(Arc::new(cluster.store()), Expiry::ServerTtl).await;
    conformance::scan_examines_a_bounded_number(&cluster.store()).await;
    // The address-mode key and hashed addresses, on a cluster emptied first.
    for node in &cluster.nodes {
        assert!(node.cli(&["FLUSHALL"]).contains("OK"));
    }
    conformance::run_hashed(Arc::new(cluster.store())).await;
}

// ---------------------------------------------------------------- TLS

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`, named after
/// `name`: (ca, cert, key).
fn test_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca = TestCa::new(dir, &format!("{name}-ca"));
    let (cert, key) = ca.issue(dir, &format!("{name}-server"), "IP:127.0.0.1,DNS:localhost");
    (ca.cert, cert, key)
}

// Done when: TLS — Redis with tls-port, test certificates; the right CA works; a wrong CA
// is refused with a clear message, at start and in check-config --connect.
#[test]
fn rediss_is_verified_against_tls_ca_file() {
    let test = "rediss_is_verified_against_tls_ca_file";
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, cert_key) = test_ca(certs.path(), "good");
    let (wrong_ca, _, _) = test_ca(certs.path(), "wrong");
    let Some(redis) = Redis::start_tls(test, &cert, &cert_key, &ca) else {
        return;
    };
    let port = redis.tls_port.unwrap();
    let url = format!("rediss://127.0.0.1:{port}/");

    // The store itself, with the right CA.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = server(RedisTopology::Single, &url, Some(&ca));
        let store = RedisStore::with_server(&s, 5 * SECOND).unwrap();
        assert!(store.check().await.unwrap().starts_with("Redis "));
        put(&store, &key(1), unix_now()).await.unwrap();
        assert!(store.get_triplet(&key(1)).await.unwrap().is_some());
    });

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    let toml = |ca: &Path| {
        format!(
            "[store]\nbackend = \"redis\"\nurl = \"{url}\"\ntls_ca_file = {:?}\n",
            ca.display()
        )
    };
    std::fs::write(&cfg, toml(&ca)).unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("store server answered: Redis "), "{out}");

    std::fs::write(&cfg, toml(&wrong_ca)).unwrap();
    let t = Instant::now();
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg, "--connect"]);
    assert_eq!(code, 1, "{out}{err}");
    let expected = format!(
        "certificate is not trusted (tls_ca_file {})",
        wrong_ca.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(t.elapsed() < 5 * SECOND, "{:?}", t.elapsed());

    // Without tls_ca_file the system's roots are used: the test CA is not among them.
    std::fs::write(
        &cfg,
        format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg, "--connect"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("certificate is not trusted (the system's root certificates)"),
        "{err}"
    );

    // A daemon with the wrong CA says why at its first store operation, and fails open.
    let d = DaemonConfig::new(dir.path())
        .toml(&format!(
            "[store]\nbackend = \"redis\"\nurl = \"{url}\"\ntls_ca_file = {:?}\n\
             timeout = \"{}ms\"\n",
            wrong_ca.display(),
            STORE_TIMEOUT.as_millis()
        ))
        .start();
    let mut c = d.client();
    assert_eq!(
        c.ask(&rcpt_request("192.0.2.1", "a@example.net", "b@example.org")),
        "DUNNO"
    );
    assert!(
        d.wait_log(&expected, 5 * SECOND),
        "the log says why:\n{}",
        d.log()
    );
}

// Done when: TLS to a cluster (rediss:// entries, tls_ca_file), with the servers'
// password from `password`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls_with_a_password() {
    let test = "cluster_over_tls_with_a_password";
    const PASSWORD: &str = "s3cret-cluster";
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, cert_key) = test_ca(certs.path(), "good");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut args = Redis::cluster_args();
        args.extend(
            [
                "--tls-cluster",
                "yes",
                "--requirepass",
                PASSWORD,
                "--masterauth",
                PASSWORD,
            ]
            .map(String::from),
        );
        let Some(mut node) = Redis::start_tls_with(test, &cert, &cert_key, &ca, &args) else {
            return;
        };
        node.cli_password(PASSWORD);
        nodes.push(node);
    }
    let cluster = ClusterSet::start_from(nodes);
    let first = format!("rediss://127.0.0.1:{}", cluster.nodes[0].tls_port.unwrap());
    let topology = |username: Option<&str>, password: &str| RedisTopology::Cluster {
        nodes: vec![first.clone()],
        auth: RedisAuth {
            username: username.map(String::from),
            password: Some(password.into()),
        },
    };
    let store =
        RedisStore::with_server(&server(topology(None, PASSWORD), "", Some(&ca)), 5 * SECOND)
            .unwrap();
    let who = store.check().await.unwrap();
    assert!(who.contains("cluster of 3 masters"), "{who}");
    let now = unix_now();
    for n in 0..60 {
        put(&store, &key(n), now).await.unwrap();
    }
    let listed = conformance::scan_all(&store, EntryKind::Triplets, 9, now, &|_| true).await;
    assert_eq!(listed.len(), 60);
    for node in &cluster.nodes {
        let size: u32 = node.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(size > 0, "keys on every master over TLS");
    }
    // The ACL user goes with the password: `default` is the user requirepass sets.
    for (username, password, works) in [
        (Some("default"), PASSWORD, true),
        (Some("nobody"), PASSWORD, false),
        (None, "wrong", false),
    ] {
        let s = server(topology(username, password), "", Some(&ca));
        let store = RedisStore::with_server(&s, 2 * SECOND).unwrap();
        let answer = store.check().await;
        assert_eq!(answer.is_ok(), works, "{username:?}/{password}: {answer:?}");
    }
}

// Done when: TLS to the sentinels and to the master they name (rediss:// entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_names_a_tls_master() {
    let test = "sentinel_over_tls_names_a_tls_master";
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, cert_key) = test_ca(certs.path(), "good");
    let Some(master) = Redis::start_tls_with(
        test,
        &cert,
        &cert_key,
        &ca,
        &["--tls-replication".into(), "yes".into()],
    ) else {
        return;
    };
    let master_port = master.tls_port.unwrap();
    let sentinel =
        Redis::start_sentinel_tls(test, master_port, &cert, &cert_key, &ca).expect("sentinel");
    wait_for("the sentinel to see the master", 15 * SECOND, || {
        sentinel
            .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"])
            .contains(&master_port.to_string())
    });
    let topology = RedisTopology::Sentinel {
        sentinels: vec![format!("rediss://127.0.0.1:{}", sentinel.tls_port.unwrap())],
        master_name: "mymaster".into(),
        auth: RedisAuth::default(),
    };
    let store =
        RedisStore::with_server(&server(topology.clone(), "", Some(&ca)), 5 * SECOND).unwrap();
    let who = store.check().await.unwrap();
    assert!(
        who.contains(&format!(
            "sentinel master mymaster at 127.0.0.1:{master_port}"
        )),
        "{who}"
    );
    let now = unix_now();
    put(&store, &key(1), now).await.unwrap();
    assert_eq!(
        master.cli(&["DBSIZE"]).trim(),
        "1",
        "the record, on the TLS master"
    );
    // The test CA is not among the system's roots: without tls_ca_file, refused.
    let untrusted = RedisStore::with_server(&server(topology, "", None), 2 * SECOND).unwrap();
    let err = untrusted.check().await.unwrap_err().to_string();
    assert!(err.contains("not trusted"), "{err}");
}

// Done when: check-config names the mode and explains mistakes in the new keys.
#[test]
fn check_config_names_the_redis_set_up_and_its_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greygate.toml");
    let cfg_arg = cfg.to_str().unwrap();
    for (text, shown) in [
        (
            "sentinels = [\"127.0.0.1:26379\", \"127.0.0.2:26379\"]\nmaster_name = \"mx\"\n",
            "redis (sentinel: master \"mx\" via 127.0.0.1:26379, 127.0.0.2:26379)",
        ),
        (
            "cluster_nodes = [\"rediss://127.0.0.1:7000\"]\npassword = \"s3cret\"\n",
            "redis (cluster: rediss://127.0.0.1:7000)",
        ),
    ] {
        std::fs::write(&cfg, format!("[store]\nbackend = \"redis\"\n{text}")).unwrap();
        let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg]);
        assert_eq!(code, 0, "{text:?}: {out}{err}");
        assert!(out.contains(shown), "{text:?}: {out}");
        assert!(!out.contains("s3cret"), "{out}");
    }
    for (text, line, fragment) in [
        (
            "sentinels = [\"127.0.0.1:26379\"]\n",
            3,
            "sentinels needs master_name",
        ),
        (
            "url = \"redis://h/\"\ncluster_nodes = [\"h:7000\"]\n",
            4,
            "url or cluster_nodes, not several",
        ),
        (
            "cluster_nodes = [\"h:7000\", \"rediss://h:7001\"]\n",
            3,
            "TLS is for all nodes or none",
        ),
        (
            "cluster_nodes = [\"redis://u:pw@h:7000\"]\n",
            3,
            "give credentials in [store] username and password",
        ),
        (
            "url = \"redis://h/\"\ntls_ca_file = \"/etc/hostname\"\n",
            4,
            "use a rediss:// url",
        ),
        (
            "url = \"rediss://h/\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
            4,
            "cannot read tls_ca_file",
        ),
        (
            "url = \"redis://h/\"\npassword = \"x\"\n",
            4,
            "goes in its url",
        ),
    ] {
        std::fs::write(&cfg, format!("[store]\nbackend = \"redis\"\n{text}")).unwrap();
        let (code, out, err) = run_cli(&["check-config", "--config", cfg_arg]);
        assert_eq!(code, 2, "{text:?}: {out}{err}");
        assert!(
            err.contains(&format!("greygate.toml:{line}:")) && err.contains(fragment),
            "{text:?}: {err}"
        );
        assert!(!err.contains("pw@"), "never the password: {err}");
    }
    std::fs::write(&cfg, "[store]\nsentinels = [\"h:26379\"]\n").unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", cfg_arg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("used by the redis backend only"), "{err}");
}
