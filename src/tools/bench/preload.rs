//! The store preloader: fills the embedded store with a steady-state database for scale tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::BenchError;
use super::stream::Rng;
use crate::engine::{ClientRecord, Engine};
use crate::store::{Access, StoreKind, StoreSpec};

/// What a preload wrote and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct PreloadReport {
    pub path: String,
    pub triplets: u64,
    pub clients: u64,
    pub seconds: f64,
    pub file_bytes: u64,
}

/// One client record per this many triplets (senders send many mails per client group).
const TRIPLETS_PER_CLIENT: u64 = 20;

/// Writes `count` live triplets (and client groups) into the embedded store at `path`, the
/// way the daemon would have after weeks of traffic: records are made by the engine's own
/// steps at times spread over the retry window (pending) and `max_age` (passed), so none
/// expires during a benchmark, and committed in batches of `batch` through the store's flush.
///
/// # Errors
///
/// The store cannot be opened or written.
pub fn preload(
    path: &Path,
    count: u64,
    batch: u64,
    seed: u64,
    now: u64,
    mut progress: impl FnMut(u64),
) -> Result<PreloadReport, BenchError> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(BenchError::Runtime)?;
    // Through the one place that opens stores, as a command would (no daemon holds it).
    let spec = StoreSpec {
        kind: StoreKind::Embedded(path.to_path_buf()),
        flush_interval: std::time::Duration::from_secs(1),
        timeout: std::time::Duration::from_secs(60),
        max_entries: 0,
        addresses: crate::engine::AddressKeys::plain().store_mode(),
    };
    let store = crate::store::open(&spec, Access::Write)?;
    let engine = Engine::default();
    let p = engine.policy.clone();
    let mut rng = Rng::stream(seed, u64::MAX);
    let mut clients = 0;
    rt.block_on(async {
        for i in 0..count {
            let group = i / TRIPLETS_PER_CLIENT;
            // Every fifth group is IPv6; IPv4 groups come from 10.0.0.0/8's 65,536 /24s, so
            // IPv4 groups repeat as busy senders' do.
            let ip: IpAddr = if group % 5 == 4 {
                Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    (group >> 16) as u16,
                    group as u16,
                    0,
                    0,
                    0,
                    1,
                )
                .into()
            } else {
                Ipv4Addr::from(0x0a00_0007 | ((group as u32 & 0xffff) << 8)).into()
            };
            let sender = format!("u{}@s{}.example", rng.below(1000), i % 50_000);
            let recipient = format!("r{i}@d{}.example", rng.below(100));
            let key = engine.key(ip, &sender, &recipient);
            // Two thirds passed (retried after the delay, then seen again within max_age), a
            // third still pending (first seen within the retry window): the shape of a
            // database in steady state, with expiry times spread so that few expire during
            // a benchmark.
            let record = if rng.below(3) < 2 {
                let first = now - p.delay - 3600 - rng.below(p.max_age * 9 / 10);
                let (_, pending) = engine.triplet_step(None, first, engine.policy.delay);
                let passed_at = first + p.delay + rng.below(3600);
                let (_, passed) =
                    engine.triplet_step(Some(&pending), passed_at, engine.policy.delay);
                let seen = passed_at + rng.below(now - passed_at);
                engine
                    .triplet_step(Some(&passed), seen, engine.policy.delay)
                    .1
            } else {
                let first = now - rng.below(p.retry_window);
                engine.triplet_step(None, first, engine.policy.delay).1
            };
            store.update_triplet(&key, &|_| Some(record)).await?;
            if i % TRIPLETS_PER_CLIENT == 0 {
                let seen = now - rng.below(p.auto_allow_lifetime / 2);
                let passes = rng.below(10) as u32;
                let rec = ClientRecord {
                    passes,
                    last_counted: seen,
                    last_seen: seen,
                    expires_at: seen + p.auto_allow_lifetime,
                };
                // Client groups repeat (IPv4 has 65,536 of them here): count distinct ones.
                if store
                    .update_client(&key.client, &|_| Some(rec))
                    .await?
                    .is_none()
                {
                    clients += 1;
                }
            }
            if (i + 1) % batch == 0 {
                store.flush().await?;
                progress(i + 1);
            }
        }
        store.flush_fully().await?;
        Ok::<_, BenchError>(())
    })?;
    drop(store);
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(PreloadReport {
        path: path.display().to_string(),
        triplets: count,
        clients,
        seconds: started.elapsed().as_secs_f64(),
        file_bytes,
    })
}
