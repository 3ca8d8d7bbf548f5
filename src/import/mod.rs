//! `greygate import`: what another greylister learnt, carried into a greygate store, so that
//! switching does not greylist every known correspondent again.
//!
//! Two sources: postgrey's Berkeley DB files ([`postgrey`], read through Berkeley DB's own
//! `db_dump`) and sqlgrey's tables ([`sqlgrey`], in PostgreSQL or SQLite). Each source
//! record becomes a greygate record under greygate's key (client group, normalised sender
//! and recipient), with the times it carried: a passed triplet passes at once, a pending
//! one passes on a retry once greygate's delay has run from its first sighting, and client
//! counts carry over towards auto-allow. What greygate would already have forgotten
//! (past `retry_window`, `max_age`, `auto_allow_lifetime`) is skipped.
//!
//! Every record is written by one atomic update of the store with a pure merge step
//! ([`merge_triplet`], [`merge_client`]), as the daemon writes: a record greygate already
//! holds is kept when it is as new or newer, so an import may run again, and into a shared
//! store (Redis, PostgreSQL) while daemons serve from it.

pub mod postgrey;
pub mod sqlgrey;

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::normalize::{canonical_ip, client_group};
use crate::engine::{ClientRecord, Engine, Triplet, TripletKey};
use crate::store::{Store, StoreError};

/// Why an import could not run (or stopped): the source cannot be read, or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source is missing, unreadable or not what it should be.
    #[error("{0}")]
    Source(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a source record was not merged. Counted per source record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Skip {
    /// The record could not be read (a broken key, value, time or address).
    Unparseable,
    /// postgrey `--privacy` keys are SHA-1 digests: the addresses cannot be recovered.
    Hashed,
    /// greygate would already have forgotten it: a pending triplet past `retry_window`, a
    /// passed one past `max_age`, a client past `auto_allow_lifetime`.
    Expired,
    /// The source keyed a network wider than greygate's client groups (`ipv4_prefix`,
    /// `ipv6_prefix`): it cannot be given to one group.
    WiderNetwork,
    /// Client counts, while greygate's auto-allow is off (`auto_allow_after = 0`).
    AutoAllowOff,
    /// greygate already held the record (or an earlier source record with the same
    /// greygate key made it), as new or newer: it was kept.
    ExistingNewer,
}

impl Skip {
    pub const ALL: [Skip; 6] = [
        Skip::Unparseable,
        Skip::Hashed,
        Skip::Expired,
        Skip::WiderNetwork,
        Skip::AutoAllowOff,
        Skip::ExistingNewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Unparseable => "unparseable",
            Skip::Hashed => "hashed",
            Skip::Expired => "expired",
            Skip::WiderNetwork => "wider-network",
            Skip::AutoAllowOff => "auto-allow-off",
            Skip::ExistingNewer => "existing-newer",
        }
    }

    /// What the reason means, for the text report.
    pub fn meaning(self) -> &'static str {
        match self {
            Skip::Unparseable => "the record could not be read",
            Skip::Hashed => {
                "a SHA-1 digest (postgrey --privacy): the addresses behind it cannot be recovered"
            }
            Skip::Expired => {
                "greygate would have forgotten it: past retry_window (pending), max_age \
                 (passed) or auto_allow_lifetime (clients)"
            }
            Skip::WiderNetwork => {
                "the source's network is wider than greygate's client groups (ipv4_prefix, \
                 ipv6_prefix)"
            }
            Skip::AutoAllowOff => "a client count, but auto-allow is off (auto_allow_after = 0)",
            Skip::ExistingNewer => "greygate already held the same key, as new or newer: kept",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source record that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    pub skip: Skip,
    /// What was wrong, for the report's examples (unparseable records).
    pub detail: String,
}

impl Bad {
    pub(crate) fn unparseable(detail: impl Into<String>) -> Bad {
        Bad {
            skip: Skip::Unparseable,
            detail: detail.into(),
        }
    }

    pub(crate) fn because(skip: Skip) -> Bad {
        Bad {
            skip,
            detail: String::new(),
        }
    }
}

/// What became of one greygate record an import offered the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// No live record held the key: the imported one was written.
    New,
    /// A live record held the key and the imported one adds to it (passed where it was
    /// pending, an earlier first sighting, a later pass, more counted passes).
    Into,
    /// The store's record is as new or newer: left as it was.
    Kept,
}

/// The pure merge of an imported triplet into what the store holds: the outcome, and the
/// record to write (`None`: leave the store as it is). Runs inside the store's atomic
/// update, so it may run more than once.
pub fn merge_triplet(
    engine: &Engine,
    old: Option<&Triplet>,
    new: &Triplet,
    now: u64,
) -> (Merge, Option<Triplet>) {
    let p = &engine.policy;
    let Some(old) = old.filter(|t| engine.triplet_alive(t, now)) else {
        return (Merge::New, Some(*new));
    };
    let merged = match (old.passed, new.passed) {
        // greygate already passed it: a pending round from the source adds nothing.
        (true, false) => None,
        // The source passed what greygate still holds pending.
        (false, true) => Some(Triplet {
            first_seen: new.first_seen,
            last_seen: old.last_seen.max(new.last_seen),
            attempts: old.attempts.max(new.attempts),
            passes: old.passes.max(new.passes).max(1),
            ..*new
        }),
        (true, true) => (new.last_seen > old.last_seen).then(|| Triplet {
            first_seen: old.first_seen.min(new.first_seen),
            last_seen: new.last_seen,
            attempts: old.attempts.max(new.attempts),
            passes: old.passes.max(new.passes),
            ..*new
        }),
        // Both pending: the earlier first sighting stays, as it does in the engine.
        (false, false) => (new.first_seen < old.first_seen).then(|| Triplet {
            first_seen: new.first_seen,
            last_seen: old.last_seen.max(new.last_seen),
            expires_at: new.first_seen.saturating_add(p.retry_window),
            attempts: old.attempts.max(new.attempts),
            passes: 0,
            passed: false,
        }),
    };
    match merged {
        Some(t) if t != *old => (Merge::Into, Some(t)),
        _ => (Merge::Kept, None),
    }
}

/// The pure merge of an imported client group record: the larger count and the later
/// times win (never a sum, so an import run twice counts nothing twice).
pub fn merge_client(
    engine: &Engine,
    old: Option<&ClientRecord>,
    new: &ClientRecord,
    now: u64,
) -> (Merge, Option<ClientRecord>) {
    let lifetime = engine.policy.auto_allow_lifetime;
    let Some(old) = old.filter(|r| now.saturating_sub(r.last_seen) <= lifetime) else {
        return (Merge::New, Some(*new));
    };
    let last_seen = old.last_seen.max(new.last_seen);
    let merged = ClientRecord {
        passes: old.passes.max(new.passes),
        last_counted: old.last_counted.max(new.last_counted),
        last_seen,
        expires_at: last_seen.saturating_add(lifetime),
    };
    if merged == *old {
        (Merge::Kept, None)
    } else {
        (Merge::Into, Some(merged))
    }
}

/// A source's network and how wide it is: an address with the prefix length the source
/// grouped it by (32 or 128: one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNet {
    pub ip: IpAddr,
    pub prefix: u8,
}

/// greygate's client group for a source's network, when one group holds all of it.
///
/// # Errors
///
/// [`Skip::WiderNetwork`] when the source's network is wider than greygate's groups.
pub fn group_of(engine: &Engine, net: SourceNet) -> Result<String, Bad> {
    let p = &engine.policy;
    let ip = canonical_ip(net.ip);
    let (prefix, wanted) = match (ip, net.ip) {
        (IpAddr::V4(_), IpAddr::V6(_)) => (net.prefix.saturating_sub(96), p.ipv4_prefix.min(32)),
        (IpAddr::V4(_), _) => (net.prefix.min(32), p.ipv4_prefix.min(32)),
        (IpAddr::V6(_), _) => (net.prefix.min(128), p.ipv6_prefix.min(128)),
    };
    if prefix < wanted {
        return Err(Bad {
            skip: Skip::WiderNetwork,
            detail: format!("{}/{prefix}", net.ip),
        });
    }
    Ok(client_group(ip, p.ipv4_prefix, p.ipv6_prefix))
}

/// greygate's triplet key for a source's network, sender and recipient (as the source kept
/// them; greygate's own normalisation is applied over the source's, and its keyed hashing
/// when `[store] hash_addresses` is on).
///
/// # Errors
///
/// As [`group_of`].
pub fn key_of(
    engine: &Engine,
    net: SourceNet,
    sender: &str,
    recipient: &str,
) -> Result<TripletKey, Bad> {
    // As the engine keys them: normalised, then hashed when the store holds digests.
    Ok(TripletKey {
        client: group_of(engine, net)?,
        sender: engine.sender_key(sender),
        recipient: engine.recipient_key(recipient),
    })
}

/// A pending triplet first seen at `first` and last at `last` (source times, not after
/// `now`), as greygate would hold it.
pub fn pending(engine: &Engine, first: u64, last: u64) -> Triplet {
    Triplet {
        first_seen: first,
        last_seen: last.max(first),
        expires_at: first.saturating_add(engine.policy.retry_window),
        attempts: if last > first { 2 } else { 1 },
        passes: 0,
        passed: false,
    }
}

/// A triplet that passed greylisting, first seen at `first` and last at `last`.
pub fn passed(engine: &Engine, first: u64, last: u64) -> Triplet {
    let last = last.max(first);
    Triplet {
        first_seen: first,
        last_seen: last,
        expires_at: last.saturating_add(engine.policy.max_age),
        attempts: 1,
        passes: 1,
        passed: true,
    }
}

/// Counted passes of one client group gathered from the source before they are written
/// (several source records may fall into one greygate group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientTally {
    pub passes: u32,
    pub last_seen: u64,
    /// Source records behind it (for the report).
    pub records: u64,
    /// The table they came from (index into the report's tables).
    pub table: usize,
}

/// How many examples of each skip reason the report keeps.
const EXAMPLES: usize = 5;

/// Records changed per commit of a store that commits (the embedded one).
const FLUSH_EVERY: u64 = 20_000;

/// Most client groups an import gathers before writing them: a bound on its memory.
pub const MAX_CLIENT_GROUPS: usize = 10_000_000;

/// One source table or file in the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableReport {
    pub name: String,
    /// Records read from it.
    pub read: u64,
    /// Records merged into the store (as new records or into existing ones).
    pub merged: u64,
    pub skipped: BTreeMap<Skip, u64>,
    /// A few records that could not be used, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

/// Triplets an import wrote.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TripletsWritten {
    /// Keys greygate held no live record for.
    pub new: u64,
    /// Merged into a live record greygate held.
    pub into_existing: u64,
    /// Of those written, passed (the rest pending).
    pub passed: u64,
    pub pending: u64,
}

/// Client group records an import wrote.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ClientsWritten {
    pub new: u64,
    pub into_existing: u64,
    /// Of those written, auto-allowed now (`auto_allow_after` counted passes or more).
    pub auto_allowed: u64,
}

/// What an import did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub source: String,
    pub store: String,
    pub dry_run: bool,
    pub tables: Vec<TableReport>,
    pub triplets: TripletsWritten,
    pub clients: ClientsWritten,
    /// Things the operator should know (what the source could not say, settings that make
    /// imported records not match).
    pub notes: Vec<String>,
}

impl Report {
    /// Records read over every table.
    pub fn read(&self) -> u64 {
        self.tables.iter().map(|t| t.read).sum()
    }

    /// Records merged over every table.
    pub fn merged(&self) -> u64 {
        self.tables.iter().map(|t| t.merged).sum()
    }

    /// Records skipped for `skip` over every table.
    pub fn skipped(&self, skip: Skip) -> u64 {
        self.tables
            .iter()
            .filter_map(|t| t.skipped.get(&skip))
            .sum()
    }

    /// The text report.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let (merged, written) = if self.dry_run {
            let _ = writeln!(o, "dry run: nothing was written");
            ("would merge", "would be written")
        } else {
            ("merged", "written")
        };
        let _ = writeln!(o, "from:  {}", self.source);
        let _ = writeln!(o, "into:  {}", self.store);
        let width = self.tables.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &self.tables {
            let skipped: u64 = t.skipped.values().sum();
            let _ = writeln!(
                o,
                "  {:width$}  {:>8} read, {:>8} {merged}, {:>8} skipped",
                t.name, t.read, t.merged, skipped
            );
        }
        let t = &self.triplets;
        let _ = writeln!(
            o,
            "triplets {written}: {} ({} passed, {} pending; {} new, {} merged into records \
             greygate held)",
            t.new + t.into_existing,
            t.passed,
            t.pending,
            t.new,
            t.into_existing
        );
        let c = &self.clients;
        let _ = writeln!(
            o,
            "client groups {written}: {} ({} auto-allowed; {} new, {} merged into records \
             greygate held)",
            c.new + c.into_existing,
            c.auto_allowed,
            c.new,
            c.into_existing
        );
        if Skip::ALL.iter().any(|s| self.skipped(*s) > 0) {
            let _ = writeln!(o, "skipped:");
            for s in Skip::ALL {
                let n = self.skipped(s);
                if n > 0 {
                    let _ = writeln!(o, "  {n:>8} {:<15} {}", s.as_str(), s.meaning());
                }
            }
            for t in &self.tables {
                for e in &t.examples {
                    let _ = writeln!(o, "           e.g. {} {e}", t.name);
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(o, "note: {n}");
        }
        o
    }
}

/// Carries records into the store (or, for a dry run, into an overlay over it) and keeps
/// the report.
pub struct Importer {
    engine: Engine,
    store: Option<Arc<dyn Store>>,
    dry_run: bool,
    now: u64,
    /// A dry run's writes: what the store would hold after them.
    overlay_triplets: HashMap<TripletKey, Triplet>,
    overlay_clients: HashMap<String, ClientRecord>,
    clients: HashMap<String, ClientTally>,
    unflushed: u64,
    pub report: Report,
}

impl Importer {
    /// An import into `store` at `now` (Unix seconds). `store` may be `None` only for a dry
    /// run against a store that does not exist yet.
    pub fn new(
        engine: Engine,
        store: Option<Arc<dyn Store>>,
        dry_run: bool,
        now: u64,
        source: String,
        store_name: String,
    ) -> Importer {
        Importer {
            engine,
            store,
            dry_run,
            now,
            overlay_triplets: HashMap::new(),
            overlay_clients: HashMap::new(),
            clients: HashMap::new(),
            unflushed: 0,
            report: Report {
                source,
                store: store_name,
                dry_run,
                ..Report::default()
            },
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Starts a source table; returns its index for [`Importer::skip`] and the writes.
    pub fn table(&mut self, name: &str) -> usize {
        self.report.tables.push(TableReport {
            name: name.to_string(),
            ..TableReport::default()
        });
        self.report.tables.len() - 1
    }

    /// Adds a note to the report (once).
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.report.notes.contains(&note) {
            self.report.notes.push(note);
        }
    }

    /// Counts one record read from `table`.
    pub fn read(&mut self, table: usize) {
        self.report.tables[table].read += 1;
    }

    /// Counts a record of `table` that could not be used.
    pub fn skip(&mut self, table: usize, bad: Bad, what: impl FnOnce() -> String) {
        self.skip_n(table, bad, 1, what);
    }

    fn skip_n(&mut self, table: usize, bad: Bad, n: u64, what: impl FnOnce() -> String) {
        let t = &mut self.report.tables[table];
        *t.skipped.entry(bad.skip).or_default() += n;
        let shown = t
            .examples
            .iter()
            .filter(|e| e.starts_with(bad.skip.as_str()))
            .count();
        if matches!(bad.skip, Skip::Unparseable | Skip::WiderNetwork) && shown < EXAMPLES {
            let detail = if bad.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", bad.detail)
            };
            t.examples
                .push(format!("{} {}{detail}", bad.skip.as_str(), what()));
        }
    }

    /// Offers a triplet of `table` to the store: merged, or kept (counted as skipped).
    ///
    /// # Errors
    ///
    /// The store failed.
    pub async fn triplet(
        &mut self,
        table: usize,
        key: TripletKey,
        record: Triplet,
    ) -> Result<(), ImportError> {
        if !self.engine.triplet_alive(&record, self.now) {
            self.skip(table, Bad::because(Skip::Expired), String::new);
            return Ok(());
        }
        let (engine, now) = (&self.engine, self.now);
        let outcome = if self.dry_run {
            let old = match self.overlay_triplets.get(&key) {
                Some(t) => Some(*t),
                None => match &self.store {
                    Some(s) => s.get_triplet(&key).await?,
                    None => None,
                },
            };
            let (outcome, write) = merge_triplet(engine, old.as_ref(), &record, now);
            if let Some(w) = write {
                self.overlay_triplets.insert(key, w);
            }
            outcome
        } else {
            let store = self.store.as_ref().ok_or(StoreError::ReadOnly)?;
            let step = |old: Option<&Triplet>| merge_triplet(engine, old, &record, now).1;
            let before = store.update_triplet(&key, &step).await?;
            let outcome = merge_triplet(engine, before.as_ref(), &record, now).0;
            self.wrote().await?;
            outcome
        };
        // A pending source record is never merged into a passed one (that is kept), so a
        // written record is passed exactly when the source's was.
        self.count(table, outcome, 1, record.passed, true);
        Ok(())
    }

    /// Counts `n` passes of a client group from a source record of `table` (postgrey: the
    /// client's count; sqlgrey: one per allow-list row). Written by [`Importer::finish`],
    /// one record per greygate group.
    pub fn client_passes(
        &mut self,
        table: usize,
        group: String,
        passes: u32,
        last_seen: u64,
    ) -> Result<(), ImportError> {
        if !self.engine.auto_allow_enabled() {
            self.skip(table, Bad::because(Skip::AutoAllowOff), String::new);
            return Ok(());
        }
        if self.now.saturating_sub(last_seen) > self.engine.policy.auto_allow_lifetime {
            self.skip(table, Bad::because(Skip::Expired), String::new);
            return Ok(());
        }
        if !self.clients.contains_key(&group) && self.clients.len() >= MAX_CLIENT_GROUPS {
            return Err(ImportError::Source(format!(
                "more than {MAX_CLIENT_GROUPS} client groups, more than an import holds"
            )));
        }
        let t = self.clients.entry(group).or_insert(ClientTally {
            table,
            ..ClientTally::default()
        });
        t.passes = t.passes.max(passes);
        t.last_seen = t.last_seen.max(last_seen);
        t.records += 1;
        Ok(())
    }

    /// Like [`Importer::client_passes`] for sources that count one pass per record: the
    /// group's passes are the number of its records.
    pub fn client_pass_each(
        &mut self,
        table: usize,
        group: String,
        last_seen: u64,
    ) -> Result<(), ImportError> {
        let passes = self
            .clients
            .get(&group)
            .map_or(1, |t| t.passes.saturating_add(1));
        self.client_passes(table, group, passes, last_seen)
    }

    /// Writes the gathered client groups, flushes the store and returns the report.
    /// `allowed` maps a group's gathered passes to the count greygate keeps (the source's
    /// own auto-allow threshold may differ from greygate's).
    ///
    /// # Errors
    ///
    /// The store failed.
    pub async fn finish(mut self, allowed: impl Fn(u32) -> u32) -> Result<Report, ImportError> {
        let mut groups: Vec<(String, ClientTally)> = self.clients.drain().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        for (group, tally) in groups {
            let record = ClientRecord {
                passes: allowed(tally.passes),
                last_counted: tally.last_seen,
                last_seen: tally.last_seen,
                expires_at: tally
                    .last_seen
                    .saturating_add(self.engine.policy.auto_allow_lifetime),
            };
            let (engine, now) = (&self.engine, self.now);
            let outcome = if self.dry_run {
                let old = match self.overlay_clients.get(&group) {
                    Some(r) => Some(*r),
                    None => match &self.store {
                        Some(s) => s.get_client(&group).await?,
                        None => None,
                    },
                };
                let (outcome, write) = merge_client(engine, old.as_ref(), &record, now);
                if let Some(w) = write {
                    self.overlay_clients.insert(group.clone(), w);
                }
                (outcome, write)
            } else {
                let store = self.store.as_ref().ok_or(StoreError::ReadOnly)?;
                let step = |old: Option<&ClientRecord>| merge_client(engine, old, &record, now).1;
                let before = store.update_client(&group, &step).await?;
                let outcome = merge_client(engine, before.as_ref(), &record, now);
                self.wrote().await?;
                outcome
            };
            let allowed_now = outcome
                .1
                .is_some_and(|r| self.engine.client_allowed(Some(&r), self.now));
            self.count(tally.table, outcome.0, tally.records, allowed_now, false);
        }
        if let Some(store) = &self.store
            && !self.dry_run
        {
            store.flush_fully().await?;
        }
        Ok(self.report)
    }

    /// Commits now and then on stores that commit (the embedded one keeps changes in
    /// memory until a flush).
    async fn wrote(&mut self) -> Result<(), ImportError> {
        self.unflushed += 1;
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            if let Some(store) = &self.store {
                store.flush().await?;
            }
        }
        Ok(())
    }

    /// Counts what became of `records` source records of `table` offered as one greygate
    /// record; `passed`: whether the triplet written is passed, or the group auto-allowed.
    fn count(&mut self, table: usize, outcome: Merge, records: u64, passed: bool, triplet: bool) {
        let (new, into) = match outcome {
            Merge::Kept => {
                self.skip_n(
                    table,
                    Bad::because(Skip::ExistingNewer),
                    records,
                    String::new,
                );
                return;
            }
            Merge::New => (1, 0),
            Merge::Into => (0, 1),
        };
        if triplet {
            let t = &mut self.report.triplets;
            t.new += new;
            t.into_existing += into;
            if passed {
                t.passed += 1;
            } else {
                t.pending += 1;
            }
        } else {
            let c = &mut self.report.clients;
            c.new += new;
            c.into_existing += into;
            if passed {
                c.auto_allowed += 1;
            }
        }
        self.report.tables[table].merged += records;
    }
}

/// Unix seconds from a source's time, clamped to `now` (a time in the future counts as now,
/// as postgrey corrects it too).
pub(crate) fn clamp_time(t: u64, now: u64) -> u64 {
    t.min(now)
}

#[cfg(test)]
mod tests;
