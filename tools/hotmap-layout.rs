//! Memory and build time of in-memory layouts for the embedded store's hot map, at scale.
//!
//! A measurement behind BENCHMARKS.md ("10 million triplets"), standalone so that it runs in
//! seconds without a store file:
//!
//! ```sh
//! rustc -O --edition 2024 tools/hotmap-layout.rs -o /tmp/hotmap-layout
//! /tmp/hotmap-layout current 10000000        # today's layout, keys inserted in arrival order
//! /tmp/hotmap-layout fingerprint 10000000    # 128-bit keyed fingerprints, compact records
//! /tmp/hotmap-layout fingerprint-bucketed 10000000   # same, built shard by shard (a load)
//! ```
//!
//! Keys look like the store's (`client group \0 sender \0 recipient`, about 54 bytes). Each
//! mode reports the resident memory it added and how long building the map took.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Instant;

/// The record as the engine has it (`engine::record::Triplet`): 40 bytes.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Triplet {
    first_seen: u64,
    last_seen: u64,
    expires_at: u64,
    attempts: u32,
    passes: u32,
    passed: bool,
}

/// The same facts in 24 bytes: Unix seconds fit 32 bits until 2106.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Compact {
    first_seen: u32,
    last_seen: u32,
    expires_at: u32,
    attempts: u32,
    passes: u32,
    passed: bool,
}

const SHARDS: usize = 1024;

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024
}

fn key(i: u64) -> String {
    let group = i / 20;
    format!(
        "10.{}.{}.0/24\0u{}@s{}.example\0r{i}@d{}.example",
        (group >> 8) & 255,
        group & 255,
        i % 1000,
        i % 50_000,
        i % 100
    )
}

/// Two independently keyed 64-bit SipHashes: collisions among 10^7 keys have a probability
/// near 10^-25, and the keys are random per process, so senders cannot aim for them.
fn fingerprint(a: &RandomState, b: &RandomState, k: &str) -> u128 {
    (u128::from(a.hash_one(k)) << 64) | u128::from(b.hash_one(k))
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "current".into());
    let n: u64 = std::env::args()
        .nth(2)
        .map_or(10_000_000, |s| s.parse().expect("count"));
    let base = rss_mib();
    let started = Instant::now();
    let rec = Triplet {
        first_seen: 1,
        last_seen: 2,
        expires_at: 3,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let compact = Compact {
        first_seen: 1,
        last_seen: 2,
        expires_at: 3,
        attempts: 1,
        passes: 0,
        passed: false,
    };
    let report = |what: &str| {
        let added = rss_mib() - base;
        println!(
            "{what}: {n} entries, {added} MiB ({:.0} bytes/entry), {:.2} s",
            added as f64 * 1_048_576.0 / n as f64,
            started.elapsed().as_secs_f64()
        );
    };
    match mode.as_str() {
        "current" => {
            // Today: HashMap<Box<str>, Triplet> per shard, shard by a keyed hash of the key.
            let h = RandomState::new();
            let mut shards: Vec<HashMap<Box<str>, Triplet>> =
                (0..SHARDS).map(|_| HashMap::new()).collect();
            for i in 0..n {
                let k = key(i);
                let s = h.hash_one(k.as_str()) as usize % SHARDS;
                shards[s].insert(k.into_boxed_str(), rec);
            }
            report("current");
            std::hint::black_box(&shards);
        }
        "fingerprint" | "fingerprint-bucketed" => {
            let (a, b) = (RandomState::new(), RandomState::new());
            let per_shard = (n as usize / SHARDS) * 8 / 7 + 64;
            let mut shards: Vec<HashMap<u128, Compact>> = (0..SHARDS)
                .map(|_| HashMap::with_capacity(per_shard))
                .collect();
            if mode == "fingerprint" {
                for i in 0..n {
                    let fp = fingerprint(&a, &b, &key(i));
                    shards[(fp >> 64) as usize % SHARDS].insert(fp, compact);
                }
            } else {
                // A load: collect per shard first (sequential appends), then build each
                // shard's table while it is in cache instead of jumping across all of them.
                let mut buckets: Vec<Vec<u128>> = (0..SHARDS).map(|_| Vec::new()).collect();
                for i in 0..n {
                    let fp = fingerprint(&a, &b, &key(i));
                    buckets[(fp >> 64) as usize % SHARDS].push(fp);
                }
                for (shard, bucket) in shards.iter_mut().zip(buckets) {
                    shard.extend(bucket.into_iter().map(|fp| (fp, compact)));
                }
            }
            report(&mode);
            std::hint::black_box(&shards);
        }
        other => panic!("unknown mode {other}: current, fingerprint, fingerprint-bucketed"),
    }
}
