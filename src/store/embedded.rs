//! The embedded default backend: one redb file, hot state in memory, group commit.
//!
//! Requests touch only memory. `flush` (called every `flush_interval` by the daemon, and at
//! shutdown) writes what changed since the previous flush in one redb transaction with
//! immediate durability, so a hard kill loses at most one interval of updates and redb's
//! copy-on-write commits never leave a corrupt file.
//!
//! Scans walk the file in key order (memory holds no key text for most records) and take
//! each record's current value from memory; removals leave memory at once and the file at
//! the next commit, like any other change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

use super::hot::{Change, HotMap, KeyText, Packed};
use super::memory::MemoryStore;
use super::{
    Capacity, Counts, Entry, EntryFilter, EntryKind, ExpireStep, Page, SCAN_EXAMINE, Store,
    StoreError, UpdateFn, cursor,
};
use crate::engine::record::Record;
use crate::engine::{ClientRecord, Triplet, TripletKey};

const TRIPLETS: TableDefinition<&str, &[u8]> = TableDefinition::new("triplets");
const CLIENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("clients");
/// The store's own settings: its address mode (see `store::mode`).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// The recorded address mode and whether the triplet table has rows (dead ones too).
fn read_mode(tx: &redb::ReadTransaction) -> Result<(Option<String>, bool), StoreError> {
    let recorded = match tx.open_table(META) {
        Ok(t) => t
            .get(super::mode::MODE_NAME)
            .map_err(backend)?
            .map(|v| v.value().to_string()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(backend(e)),
    };
    let has_triplets = match tx.open_table(TRIPLETS) {
        Ok(t) => !t.is_empty().map_err(backend)?,
        Err(redb::TableError::TableDoesNotExist(_)) => false,
        Err(e) => return Err(backend(e)),
    };
    Ok((recorded, has_triplets))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// An error met while opening or loading the file. What redb finds damaged, or a file that
/// is not a greygate store, is `Corrupt` (the daemon sets such a file aside); the rest —
/// I/O, permissions, a lock, a newer format — leaves the file alone.
fn open_error(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    // redb reports a damaged header (no magic number) as invalid data read from the file.
    let damaged = match &e {
        redb::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        e => matches!(
            e,
            redb::Error::Corrupted(_)
                | redb::Error::TableTypeMismatch { .. }
                | redb::Error::TableIsMultimap(_)
                | redb::Error::TableIsNotMultimap(_)
                | redb::Error::TypeDefinitionChanged { .. }
        ),
    };
    match e {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.display().to_string(),
        },
        e if damaged => StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
        other => StoreError::Unavailable(format!("cannot open {}: {other}", path.display())),
    }
}

/// What loading the file found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub triplets: usize,
    pub clients: usize,
    /// Records that were already expired and were not loaded.
    pub expired: usize,
    /// Records that could not be decoded (skipped and removed at the next flush).
    pub undecodable: usize,
    /// The file existed with 0 bytes (taken as a new store).
    pub empty_file: bool,
    /// Records evicted because the file held more than the cap (`max_entries`); their rows
    /// are deleted at the first commit.
    pub evicted: usize,
}

/// The open redb file, and whether it must be opened again: after a failed commit (a
/// full disk) redb refuses every later write until the database is closed and reopened.
struct DbHandle {
    path: PathBuf,
    current: std::sync::Mutex<Option<Arc<Database>>>,
    broken: std::sync::atomic::AtomicBool,
}

impl DbHandle {
    fn open(path: &Path) -> Result<Database, StoreError> {
        // Requests never read the file (memory answers), so redb's cache only serves the
        // group commit's B-tree paths; its 1 GiB default would hold half a large store's
        // file after the start-up scan, in RSS.
        Database::builder()
            .set_cache_size(REDB_CACHE)
            .create(path)
            .map_err(|e| open_error(path, e))
    }

    /// The database to use now; reopens it first if a commit failed. A reader still
    /// holding the old handle (a scan) makes the reopen fail until it is done: the next
    /// commit tries again.
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        let mut current = crate::lock(&self.current);
        if self.broken.load(std::sync::atomic::Ordering::Acquire) {
            // Closing is dropping; redb writes what it can on the way.
            drop(current.take());
            let db = Self::open(&self.path)?;
            *current = Some(Arc::new(db));
            self.broken
                .store(false, std::sync::atomic::Ordering::Release);
        }
        current
            .clone()
            .ok_or_else(|| StoreError::Unavailable(format!("{} is not open", self.path.display())))
    }

    fn mark_broken(&self) {
        self.broken
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Creates `path` empty with mode 0600 unless it exists; true when it was created here.
/// redb takes an empty file as a new database.
fn create_private(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `from` to the new file `to`, owner-only: `fs::copy` would give the copy the
/// original's mode, in a shared temporary directory.
fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    Ok(())
}

/// What the embedded store knows of its writes.
#[derive(Default)]
struct WriteState {
    failing: std::sync::atomic::AtomicBool,
    failed_commits: std::sync::atomic::AtomicU64,
    /// Changes in memory that the last failed commit could not write.
    pending: std::sync::atomic::AtomicU64,
}

/// The embedded store.
pub struct EmbeddedStore {
    path: PathBuf,
    db: Arc<DbHandle>,
    writes: Arc<WriteState>,
    /// The unreadable file set aside when this store was opened in its place.
    set_aside: Option<super::SetAside>,
    // Shared with the commit's blocking task, which hands changes back if it fails.
    hot: Arc<MemoryStore>,
    // Flushes must not overlap: an older batch committed after a newer one would win.
    // Holds the bytes the journal has gathered since it was last merged. The commit's
    // blocking task owns the guard until it is done, even if its caller gave up waiting.
    flush_lock: Arc<tokio::sync::Mutex<u64>>,
    load: LoadReport,
    /// Where the disk-side expiry sweep goes on, per table (triplets, clients).
    sweep: Arc<std::sync::Mutex<(Option<String>, Option<String>)>>,
    /// The `now` of the latest `expire` call: the disk sweep's notion of time (stores do
    /// not read the clock; 0 means no sweep yet).
    sweep_now: std::sync::atomic::AtomicU64,
}

impl EmbeddedStore {
    /// Commits what changed since the last commit (see [`Commit`]); `merge`: also merge the
    /// journal into the tables, whatever its size.
    async fn commit(&self, merge: bool) -> Result<(), StoreError> {
        let mut journal_bytes = self.flush_lock.clone().lock_owned().await;
        let triplets = self.hot.triplets.take_dirty();
        let clients = self.hot.clients.take_dirty();
        let orphans = (
            self.hot.triplets.take_orphans(),
            self.hot.clients.take_orphans(),
        );
        let has_orphans = !orphans.0.is_empty() || !orphans.1.is_empty();
        let changes = triplets.len() + clients.len();
        if changes == 0 && *journal_bytes == 0 && !has_orphans {
            return Ok(());
        }
        // With nothing changed, a journal is there to merge.
        let how = match Commit::choose(changes, *journal_bytes, merge) {
            // Orphans are looked for in the tables, so no row may wait in the journal.
            Commit::Append if has_orphans => Commit::Merge,
            how => how,
        };
        let (handle, writes) = (self.db.clone(), self.writes.clone());
        let (hot, sweep) = (self.hot.clone(), self.sweep.clone());
        let cursors = sweep.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = self.sweep_now.load(std::sync::atomic::Ordering::Relaxed);
        // Everything after the take happens in the blocking task, bookkeeping included: a
        // caller that stops waiting (an admin request's timeout) must neither lose the
        // changes of a failed commit nor let the next commit start before this one ends.
        let task = tokio::task::spawn_blocking(move || {
            // Even a panic inside redb must hand the batch back, or its changes would never
            // be written.
            let outcome = crate::catch_panic(|| {
                let db = handle.get()?;
                let mut tx = db.begin_write().map_err(backend)?;
                tx.set_durability(Durability::Immediate).map_err(backend)?;
                let added = match how {
                    Commit::Direct => {
                        write_changes(&tx, TRIPLETS, &triplets)?;
                        write_changes(&tx, CLIENTS, &clients)?;
                        0
                    }
                    Commit::Append => append_journal(&tx, &triplets, &clients)?,
                    Commit::Merge => {
                        merge_journal(&tx, &triplets, &clients)?;
                        0
                    }
                };
                if has_orphans {
                    delete_orphans(&tx, TRIPLETS, &hot.triplets, &orphans.0)?;
                    delete_orphans(&tx, CLIENTS, &hot.clients, &orphans.1)?;
                }
                // The disk sweep deletes rows whose own record has expired, which holds
                // only when the tables have every change (a journaled change may have
                // renewed a record whose row is old): not on a commit to the journal.
                let next = if now == 0 || how == Commit::Append {
                    cursors
                } else {
                    (
                        sweep_table::<Triplet>(&tx, TRIPLETS, cursors.0.as_deref(), now)?,
                        sweep_table::<ClientRecord>(&tx, CLIENTS, cursors.1.as_deref(), now)?,
                    )
                };
                tx.commit().map_err(backend)?;
                Ok((next, added))
            })
            .unwrap_or_else(|panic| {
                Err(backend(format!("redb panicked during the commit: {panic}")))
            });
            use std::sync::atomic::Ordering::Relaxed;
            match outcome {
                Ok((next, added)) => {
                    writes.failing.store(false, Relaxed);
                    writes.pending.store(0, Relaxed);
                    *sweep.lock().unwrap_or_else(|e| e.into_inner()) = next;
                    if how == Commit::Merge {
                        *journal_bytes = 0;
                    } else {
                        *journal_bytes += added;
                    }
                    Ok(())
                }
                Err(e) => {
                    // Keep the changes pending: the next flush tries again, on a database
                    // opened anew (redb refuses writes after a failed one until then).
                    handle.mark_broken();
                    writes.failing.store(true, Relaxed);
                    writes.failed_commits.fetch_add(1, Relaxed);
                    writes
                        .pending
                        .store((triplets.len() + clients.len()) as u64, Relaxed);
                    hot.triplets.restore_dirty(triplets);
                    hot.clients.restore_dirty(clients);
                    hot.triplets.restore_orphans(orphans.0);
                    hot.clients.restore_orphans(orphans.1);
                    Err(e)
                }
            }
        });
        task.await
            .unwrap_or_else(|join| Err(backend(format!("flush task failed: {join}"))))
    }

    /// Opens (or creates) the file and loads its live records into memory. `now` decides
    /// which records are already expired. A file that cannot be read is `Corrupt`, also
    /// when redb panics on it (a damaged page can make it).
    pub fn open(path: &Path, now: u64) -> Result<Self, StoreError> {
        Self::open_capped(path, now, 0)
    }

    /// [`EmbeddedStore::open`] for a store of at most `max_entries` records (0: no cap; see
    /// [`MemoryStore::with_cap`]). A file that holds more is evicted down to the cap as it
    /// loads, and the evicted rows are deleted at the first commit.
    pub fn open_capped(path: &Path, now: u64, max_entries: usize) -> Result<Self, StoreError> {
        crate::catch_panic(|| Self::open_unguarded(path, now, max_entries)).unwrap_or_else(
            |panic| {
                Err(StoreError::Corrupt {
                    path: path.display().to_string(),
                    reason: format!("redb failed reading it: {panic}"),
                })
            },
        )
    }

    fn open_unguarded(path: &Path, now: u64, max_entries: usize) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let empty_file = std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
        // The file holds addresses: a new one is made owner-only before redb writes to it
        // (redb takes no mode and would leave it to the umask). An existing file keeps the
        // mode its administrator gave it.
        let created = create_private(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", path.display()))
        })?;
        let db = DbHandle::open(path).inspect_err(|_| {
            if created {
                // No empty file left behind to be warned about at the next start.
                let _ = std::fs::remove_file(path);
            }
        })?;
        let err = |e: redb::Error| open_error(path, e);
        let hot = MemoryStore::with_key_text(KeyText::WhileDirty, max_entries);
        let mut load = LoadReport {
            empty_file,
            ..LoadReport::default()
        };
        {
            let tx = db.begin_write().map_err(|e| err(e.into()))?;
            // Creating the tables up front lets readers (explain) open them without writing.
            tx.open_table(TRIPLETS).map_err(|e| err(e.into()))?;
            tx.open_table(CLIENTS).map_err(|e| err(e.into()))?;
            // Commits a daemon journaled and had not merged when it stopped (a hard kill)
            // go into the tables before they are read.
            if tx
                .open_table(JOURNAL)
                .map_err(|e| err(e.into()))?
                .len()
                .map_err(|e| err(e.into()))?
                > 0
            {
                merge_journal(&tx, &[], &[])?;
            }
            tx.commit().map_err(|e| err(e.into()))?;
        }
        let tx = db.begin_read().map_err(|e| err(e.into()))?;
        load_table(&tx, TRIPLETS, &hot.triplets, now, &mut load, |l| {
            l.triplets += 1
        })
        .map_err(err)?;
        load_table(&tx, CLIENTS, &hot.clients, now, &mut load, |l| {
            l.clients += 1
        })
        .map_err(err)?;
        drop(tx);
        load.evicted = hot.shrink_to_cap();
        // The load's temporary per-shard vectors were freed, but allocators keep freed
        // memory mapped for a while: hand it back now, or a large store's RSS keeps them.
        crate::release_free_memory();
        Ok(EmbeddedStore {
            path: path.to_path_buf(),
            db: Arc::new(DbHandle {
                path: path.to_path_buf(),
                current: std::sync::Mutex::new(Some(Arc::new(db))),
                broken: std::sync::atomic::AtomicBool::new(false),
            }),
            writes: Arc::default(),
            set_aside: None,
            hot: Arc::new(hot),
            flush_lock: Arc::new(tokio::sync::Mutex::new(0)),
            load,
            sweep: Arc::new(std::sync::Mutex::new((None, None))),
            sweep_now: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn load_report(&self) -> LoadReport {
        self.load
    }

    /// Checks the file against the address mode `wanted` and records it (see
    /// `store::mode`): refused when the file holds triplets of another mode.
    pub fn claim_addresses(&self, wanted: &str) -> Result<(), StoreError> {
        let db = self.db.get()?;
        let (recorded, has_triplets) = read_mode(&db.begin_read().map_err(backend)?)?;
        match super::mode::decide(recorded.as_deref(), has_triplets, wanted)? {
            super::mode::Verdict::Keep => Ok(()),
            super::mode::Verdict::Record => self.write_mode(&db, wanted),
        }
    }

    fn write_mode(&self, db: &Database, mode: &str) -> Result<(), StoreError> {
        let mut tx = db.begin_write().map_err(backend)?;
        tx.set_durability(Durability::Immediate).map_err(backend)?;
        tx.open_table(META)
            .map_err(backend)?
            .insert(super::mode::MODE_NAME, mode)
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that this store was opened in place of an unreadable file, now at `aside`.
    pub fn started_after_set_aside(mut self, aside: super::SetAside) -> Self {
        self.set_aside = Some(aside);
        self
    }
}

/// Rows handed from the scan to the workers that fingerprint and queue them: key texts in
/// one buffer (one allocation per batch, not per row) and the decoded records.
struct Batch<R> {
    text: String,
    rows: Vec<(std::ops::Range<usize>, R)>,
}

const BATCH_ROWS: usize = 4096;

impl<R> Batch<R> {
    fn new() -> Self {
        Batch {
            text: String::with_capacity(BATCH_ROWS * 64),
            rows: Vec::with_capacity(BATCH_ROWS),
        }
    }
}

/// Loads a table into memory. The scan (redb's B-tree walk, decoding) runs on this thread
/// while the other cores fingerprint the keys and queue them per shard: on a large store
/// those are the two halves of start-up, and they overlap.
fn load_table<R: Packed>(
    tx: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    into: &HotMap<R>,
    now: u64,
    load: &mut LoadReport,
    count: fn(&mut LoadReport),
) -> Result<(), redb::Error> {
    let table = tx.open_table(def)?;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let (send, recv) = std::sync::mpsc::sync_channel::<Batch<R>>(2 * workers);
    let recv = std::sync::Mutex::new(recv);
    std::thread::scope(|s| -> Result<(), redb::Error> {
        for _ in 0..workers {
            let recv = &recv;
            s.spawn(move || {
                loop {
                    // The lock is held only to take the next batch.
                    let next = recv.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(batch) = next else { return };
                    for (range, rec) in batch.rows {
                        into.load(&batch.text[range], rec);
                    }
                }
            });
        }
        let mut batch = Batch::new();
        let scanned = (|| {
            for item in table.iter()? {
                let (k, v) = item?;
                match R::from_bytes(v.value()) {
                    Ok(rec) if rec.expires_at() >= now => {
                        let start = batch.text.len();
                        batch.text.push_str(k.value());
                        batch.rows.push((start..batch.text.len(), rec));
                        count(load);
                        if batch.rows.len() == BATCH_ROWS {
                            let full = std::mem::replace(&mut batch, Batch::new());
                            if send.send(full).is_err() {
                                break;
                            }
                        }
                    }
                    Ok(_) => {
                        load.expired += 1;
                        // Marked changed-to-nothing: the next flush deletes the dead row.
                        into.remove(k.value());
                    }
                    // Left on disk untouched: a row this version cannot read may come from a
                    // newer release (rolled back) or a bug; deleting it would throw trust
                    // data away.
                    Err(_) => load.undecodable += 1,
                }
            }
            Ok(())
        })();
        if !batch.rows.is_empty() {
            let _ = send.send(batch);
        }
        // Closing the channel ends the workers once they have drained it.
        drop(send);
        scanned
    })?;
    into.finish_loading();
    Ok(())
}

/// redb's page cache (its default is 1 GiB). It fills while a large file is read at
/// start-up and stays full: at ten million triplets 64 MiB put the daemon just over 1 GiB
/// of RSS; 32 MiB costs the journaled commits nothing measurable.
const REDB_CACHE: usize = 32 << 20;

/// Rows looked at per table and commit by the disk-side expiry sweep.
const SWEEP_ROWS: usize = 20_000;

/// Deletes rows whose record has expired, looking at up to `SWEEP_ROWS` rows after `cursor`;
/// returns where to go on next time (`None`: start over). Memory forgets expired records
/// without their key text, so their rows are found here, by their own `expires_at`. A row
/// changed in memory was written earlier in the same transaction (directly or by the
/// journal's merge), so it is never dead here; commits to the journal do not sweep.
fn sweep_table<R: Record>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    cursor: Option<&str>,
    now: u64,
) -> Result<Option<String>, StoreError> {
    use std::ops::Bound;
    let mut table = tx.open_table(def).map_err(backend)?;
    let mut dead = Vec::new();
    let mut last = None;
    let mut seen = 0;
    {
        let from = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let range = table
            .range::<&str>((from, Bound::Unbounded))
            .map_err(backend)?;
        for item in range.take(SWEEP_ROWS) {
            let (k, v) = item.map_err(backend)?;
            seen += 1;
            if R::from_bytes(v.value()).is_ok_and(|r| r.expires_at() < now) {
                dead.push(k.value().to_owned());
            }
            last = Some(k.value().to_owned());
        }
    }
    for key in &dead {
        table.remove(key.as_str()).map_err(backend)?;
    }
    // Fewer rows than asked for: the end of the table; start over next time.
    Ok(last.filter(|_| seen == SWEEP_ROWS))
}

/// Deletes the rows of evicted records that memory kept no key text of (see
/// `HotMap::take_orphans`): walks the whole table and fingerprints every key. Only evictions
/// of passed triplets and client groups make orphans, and those come only once no pending
/// triplet is left to evict, a cap too small for the records the store must keep. A record
/// made again since its eviction is in memory, and its row stays.
fn delete_orphans<R: Packed>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    hot: &HotMap<R>,
    orphans: &[u128],
) -> Result<(), StoreError> {
    if orphans.is_empty() {
        return Ok(());
    }
    let orphans: std::collections::HashSet<u128> = orphans.iter().copied().collect();
    let mut table = tx.open_table(def).map_err(backend)?;
    let mut dead = Vec::new();
    for item in table.iter().map_err(backend)? {
        let (k, _) = item.map_err(backend)?;
        let fp = hot.fingerprint(k.value());
        if orphans.contains(&fp) && !hot.contains_fp(fp) {
            dead.push(k.value().to_owned());
        }
    }
    for key in &dead {
        table.remove(key.as_str()).map_err(backend)?;
    }
    Ok(())
}

fn table_def(kind: EntryKind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match kind {
        EntryKind::Triplets => TRIPLETS,
        EntryKind::Clients => CLIENTS,
    }
}

/// Rows read for one scan page.
struct Rows {
    /// (key, record bytes) in key order.
    rows: Vec<(String, Vec<u8>)>,
    /// The table has no rows after these.
    ended: bool,
}

/// Up to `SCAN_EXAMINE` rows of `def` after the key `after`, copied out so that no read
/// transaction outlives the call.
fn read_rows(
    tx: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    after: Option<&str>,
) -> Result<Rows, StoreError> {
    use std::ops::Bound;
    let table = match tx.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Ok(Rows {
                rows: Vec::new(),
                ended: true,
            });
        }
        Err(e) => return Err(backend(e)),
    };
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut rows = Vec::new();
    for item in table
        .range::<&str>((from, Bound::Unbounded))
        .map_err(backend)?
        .take(SCAN_EXAMINE)
    {
        let (k, v) = item.map_err(backend)?;
        rows.push((k.value().to_owned(), v.value().to_vec()));
    }
    Ok(Rows {
        ended: rows.len() < SCAN_EXAMINE,
        rows,
    })
}

/// Builds a page from rows read in key order: `lookup` gives a row's current entry
/// (`None`: leave it out); the cursor is the hex key of the last row looked at.
fn page_from_rows(
    Rows { rows, ended }: Rows,
    limit: usize,
    now: u64,
    keep: EntryFilter<'_>,
    lookup: impl Fn(&str, &[u8]) -> Option<Entry>,
) -> Page {
    let limit = limit.max(1);
    let mut entries = Vec::new();
    for (i, (key, bytes)) in rows.iter().enumerate() {
        if let Some(e) = lookup(key, bytes)
            && e.expires_at() >= now
            && keep(&e)
        {
            entries.push(e);
        }
        let last = ended && i + 1 == rows.len();
        if entries.len() >= limit && !last {
            return Page {
                entries,
                next: Some(cursor::hex(key.as_bytes())),
            };
        }
    }
    Page {
        entries,
        next: rows
            .last()
            .filter(|_| !ended)
            .map(|(k, _)| cursor::hex(k.as_bytes())),
    }
}

fn triplet_entry(key: &str, record: Option<Triplet>) -> Option<Entry> {
    Some(Entry::Triplet {
        // Every key in the table was made by `TripletKey::joined`.
        key: TripletKey::split(key)?,
        record: record?,
    })
}

fn client_entry(key: &str, record: Option<ClientRecord>) -> Option<Entry> {
    Some(Entry::Client {
        client: key.to_owned(),
        record: record?,
    })
}

/// The journal: commits under heavy load, one row per commit, in order.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");

/// Commits with fewer changes go straight into the tables (an empty journal stays empty).
const JOURNAL_MIN_CHANGES: usize = 2_000;

/// The journal is merged into the tables once it holds this much (a merge holds the
/// journal's entries in memory for a moment: about 45 bytes each beyond the row bytes).
const MERGE_BYTES: u64 = 16 << 20;

/// How a commit writes its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Into the tables, record by record (a B-tree path per record).
    Direct,
    /// As one row appended to the journal (sequential pages).
    Append,
    /// The journal and the changes into the tables, in key order, each key once.
    Merge,
}

impl Commit {
    fn choose(changes: usize, journal_bytes: u64, merge: bool) -> Commit {
        if merge
            || (journal_bytes > 0
                && (changes < JOURNAL_MIN_CHANGES || journal_bytes >= MERGE_BYTES))
        {
            Commit::Merge
        } else if journal_bytes == 0 && changes < JOURNAL_MIN_CHANGES {
            Commit::Direct
        } else {
            Commit::Append
        }
    }
}

const TABLE_TRIPLETS: u8 = 0;
const TABLE_CLIENTS: u8 = 1;

fn encode_changes<R: Record>(out: &mut Vec<u8>, table: u8, changes: &[Change<R>]) {
    for (key, value) in changes {
        out.push(table);
        out.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        match value {
            Some(rec) => {
                let bytes = rec.to_bytes();
                out.push(1);
                out.extend_from_slice(
                    &u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes(),
                );
                out.extend_from_slice(&bytes);
            }
            None => out.push(0),
        }
    }
}

fn append_journal(
    tx: &redb::WriteTransaction,
    triplets: &[Change<Triplet>],
    clients: &[Change<ClientRecord>],
) -> Result<u64, StoreError> {
    let mut blob = Vec::with_capacity((triplets.len() + clients.len()) * 96);
    encode_changes(&mut blob, TABLE_TRIPLETS, triplets);
    encode_changes(&mut blob, TABLE_CLIENTS, clients);
    let mut journal = tx.open_table(JOURNAL).map_err(backend)?;
    let next = journal
        .last()
        .map_err(backend)?
        .map_or(0, |(k, _)| k.value() + 1);
    journal.insert(next, blob.as_slice()).map_err(backend)?;
    Ok(blob.len() as u64)
}

/// Rows in the journal (0 when it does not exist).
fn journal_len(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    match tx.open_table(JOURNAL) {
        Ok(j) => j.len().map_err(backend),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(backend(e)),
    }
}

/// One journal entry: (table, key, value or `None` for removed).
type JournalEntry<'a> = (u8, &'a [u8], Option<&'a [u8]>);

fn decode_journal<'a>(
    mut blob: &'a [u8],
    out: &mut Vec<JournalEntry<'a>>,
) -> Result<(), StoreError> {
    let bad = || backend("undecodable journal row");
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = b.split_at_checked(n)?;
        *b = rest;
        Some(head)
    }
    fn len(b: &mut &[u8]) -> Option<usize> {
        let raw: [u8; 4] = take(b, 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    }
    // Entries borrow from the blob: the caller keeps every row's bytes alive.
    let blob_ref: &mut &'a [u8] = &mut blob;
    while !blob_ref.is_empty() {
        let table = take(blob_ref, 1).ok_or_else(bad)?[0];
        if table != TABLE_TRIPLETS && table != TABLE_CLIENTS {
            return Err(bad());
        }
        let n = len(blob_ref).ok_or_else(bad)?;
        let key = take(blob_ref, n).ok_or_else(bad)?;
        let value = match take(blob_ref, 1).ok_or_else(bad)?[0] {
            0 => None,
            1 => {
                let n = len(blob_ref).ok_or_else(bad)?;
                Some(take(blob_ref, n).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        };
        out.push((table, key, value));
    }
    Ok(())
}

/// Writes the journal, then `triplets` and `clients`, into the tables: each key once (its
/// last value), in key order; empties the journal.
fn merge_journal(
    tx: &redb::WriteTransaction,
    triplets: &[Change<Triplet>],
    clients: &[Change<ClientRecord>],
) -> Result<(), StoreError> {
    apply_journal(tx, triplets, clients)?;
    tx.delete_table(JOURNAL).map_err(backend)?;
    Ok(())
}

fn apply_journal(
    tx: &redb::WriteTransaction,
    triplets: &[Change<Triplet>],
    clients: &[Change<ClientRecord>],
) -> Result<(), StoreError> {
    // The rows are read in place (their pages stay valid until the journal is deleted).
    let journal = tx.open_table(JOURNAL).map_err(backend)?;
    let rows = journal
        .iter()
        .map_err(backend)?
        .map(|row| row.map(|(_, v)| v).map_err(backend))
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries: Vec<JournalEntry<'_>> = Vec::new();
    for row in &rows {
        decode_journal(row.value(), &mut entries)?;
    }
    let mut current = Vec::with_capacity((triplets.len() + clients.len()) * 96);
    encode_changes(&mut current, TABLE_TRIPLETS, triplets);
    encode_changes(&mut current, TABLE_CLIENTS, clients);
    decode_journal(&current, &mut entries)?;
    // Stable: among entries of one key the last one stays last, and it is the one written.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| (entries[a].0, entries[a].1).cmp(&(entries[b].0, entries[b].1)));
    let mut t = tx.open_table(TRIPLETS).map_err(backend)?;
    let mut c = tx.open_table(CLIENTS).map_err(backend)?;
    for (i, &e) in order.iter().enumerate() {
        let (table, key, value) = entries[e];
        let superseded = order
            .get(i + 1)
            .is_some_and(|&n| (entries[n].0, entries[n].1) == (table, key));
        if superseded {
            continue;
        }
        let key = std::str::from_utf8(key).map_err(|_| backend("journal key is not UTF-8"))?;
        let target = if table == TABLE_TRIPLETS {
            &mut t
        } else {
            &mut c
        };
        match value {
            Some(v) => {
                target.insert(key, v).map_err(backend)?;
            }
            None => {
                target.remove(key).map_err(backend)?;
            }
        }
    }
    Ok(())
}

fn write_changes<R: Record>(
    tx: &redb::WriteTransaction,
    def: TableDefinition<&str, &[u8]>,
    changes: &[Change<R>],
) -> Result<(), StoreError> {
    let mut table = tx.open_table(def).map_err(backend)?;
    for (key, value) in changes {
        match value {
            Some(rec) => {
                table
                    .insert(&**key, rec.to_bytes().as_slice())
                    .map_err(backend)?;
            }
            None => {
                table.remove(&**key).map_err(backend)?;
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded {}", self.path.display())
    }

    fn in_memory(&self) -> Option<&MemoryStore> {
        Some(&self.hot)
    }

    fn health(&self) -> super::StoreHealth {
        use std::sync::atomic::Ordering::Relaxed;
        super::StoreHealth {
            server_unreachable: false,
            writes_failing: self.writes.failing.load(Relaxed),
            failed_commits: self.writes.failed_commits.load(Relaxed),
            pending_changes: self.writes.pending.load(Relaxed),
            set_aside: self.set_aside.clone(),
        }
    }

    fn capacity(&self) -> Option<Capacity> {
        Some(self.hot.capacity())
    }

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        self.hot.get_triplet(key).await
    }

    async fn update_triplet(
        &self,
        key: &TripletKey,
        f: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        self.hot.update_triplet(key, f).await
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.hot.get_client(client).await
    }

    async fn update_client(
        &self,
        client: &str,
        f: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.hot.update_client(client, f).await
    }

    async fn expire(&self, now: u64, max_scan: usize) -> Result<ExpireStep, StoreError> {
        self.sweep_now
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        Ok(self.hot.expire_now(now, max_scan))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.commit(false).await
    }

    async fn flush_fully(&self) -> Result<(), StoreError> {
        self.commit(true).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(self.hot.count())
    }

    /// Walks the file in key order and takes each record's value from memory: a row that
    /// memory no longer holds was removed, or died and was forgotten, and is left out.
    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        let after = cursor.map(cursor::unhex_str).transpose()?;
        if after.is_none() {
            // Records created since the last commit are in memory only, without their key
            // text in order, and journaled ones not yet in the tables: committing and
            // merging first puts every record that lives when the walk starts in the
            // tables. Later pages need no commit: records created during the walk need not
            // be listed, and values come from memory anyway.
            self.commit(true).await?;
        }
        let handle = self.db.clone();
        let rows = tokio::task::spawn_blocking(move || {
            let tx = handle.get()?.begin_read().map_err(backend)?;
            read_rows(&tx, table_def(kind), after.as_deref())
        })
        .await
        .map_err(|e| backend(format!("scan task failed: {e}")))??;
        Ok(match kind {
            EntryKind::Triplets => page_from_rows(rows, limit, now, keep, |k, _| {
                triplet_entry(k, self.hot.triplets.get(k))
            }),
            EntryKind::Clients => page_from_rows(rows, limit, now, keep, |k, _| {
                client_entry(k, self.hot.clients.get(k))
            }),
        })
    }

    /// Leaves memory now and the file at the next commit (`flush`).
    async fn remove_triplet(&self, key: &TripletKey) -> Result<bool, StoreError> {
        Ok(self.hot.triplets.remove(&key.joined()))
    }

    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        Ok(self.hot.clients.remove(client))
    }

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        let db = self.db.get()?;
        Ok(read_mode(&db.begin_read().map_err(backend)?)?.0)
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        let db = self.db.get()?;
        self.write_mode(&db, mode)
    }
}

/// What `verify` found in a store file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// Rows read and decoded, expired ones included.
    pub triplets: u64,
    pub clients: u64,
    /// Rows this version cannot decode (left alone by the daemon).
    pub undecodable: u64,
    /// Journaled commits not yet merged (the daemon merges them when it starts).
    pub journal_rows: u64,
    /// The file was not closed cleanly: checked on a repaired copy (the daemon repairs it
    /// when it starts).
    pub repaired: bool,
}

/// Reads every row of a store file without writing, as `greygate check-store` does: `Ok`
/// when the daemon would load it, `Corrupt` when it would set it aside, and the other
/// errors as opening gives them (held by a daemon, I/O). A file that was not closed cleanly
/// needs the repair the daemon makes at start: it is checked on a repaired copy in the
/// temporary directory, and the file itself is left as it is.
pub fn verify(path: &Path) -> Result<Verified, StoreError> {
    crate::catch_panic(|| match ReadOnlyDatabase::open(path) {
        Ok(db) => walk_rows(path, &db),
        Err(DatabaseError::RepairAborted) => {
            let copy = std::env::temp_dir().join(format!(
                "greygate-check-{}-{}.redb",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            let checked = copy_private(path, &copy)
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "{} needs a repair; cannot copy it to {} to check it: {e}",
                        path.display(),
                        copy.display()
                    ))
                })
                .and_then(|_| {
                    let db = Database::create(&copy).map_err(|e| open_error(path, e))?;
                    walk_rows(path, &db).map(|v| Verified {
                        repaired: true,
                        ..v
                    })
                });
            let _ = std::fs::remove_file(&copy);
            checked
        }
        Err(e) => Err(open_error(path, e)),
    })
    .unwrap_or_else(|panic| {
        Err(StoreError::Corrupt {
            path: path.display().to_string(),
            reason: format!("redb failed reading it: {panic}"),
        })
    })
}

fn walk_rows(path: &Path, db: &impl ReadableDatabase) -> Result<Verified, StoreError> {
    let err = |e: redb::Error| open_error(path, e);
    let tx = db.begin_read().map_err(|e| err(e.into()))?;
    let mut found = Verified::default();
    for (def, is_triplet) in [(TRIPLETS, true), (CLIENTS, false)] {
        let table = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(err(e.into())),
        };
        for row in table.iter().map_err(|e| err(e.into()))? {
            let (_, v) = row.map_err(|e| err(e.into()))?;
            let decoded = if is_triplet {
                Triplet::from_bytes(v.value()).is_ok()
            } else {
                ClientRecord::from_bytes(v.value()).is_ok()
            };
            match (decoded, is_triplet) {
                (false, _) => found.undecodable += 1,
                (true, true) => found.triplets += 1,
                (true, false) => found.clients += 1,
            }
        }
    }
    found.journal_rows = journal_len(&tx)?;
    Ok(found)
}

/// Read-only access to an embedded store file that no daemon holds (for `explain`).
pub struct EmbeddedReader {
    path: PathBuf,
    db: ReadOnlyDatabase,
}

impl EmbeddedReader {
    /// Opens without writing. A file left by a hard kill needs redb's repair, which only a
    /// writer does: the daemon repairs it when it starts; this reader refuses.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} does not exist (no daemon has used it yet)",
                path.display()
            )));
        }
        let db = ReadOnlyDatabase::open(path).map_err(|e| match e {
            DatabaseError::RepairAborted => StoreError::Unavailable(format!(
                "{} was not closed cleanly and needs a repair, which the daemon does when it \
                 starts; start greygate serve once, then explain again",
                path.display()
            )),
            other => open_error(path, other),
        })?;
        let tx = db.begin_read().map_err(backend)?;
        if journal_len(&tx)? > 0 {
            return Err(StoreError::Unavailable(format!(
                "{} holds commits not yet merged into its tables (the daemon stopped without \
                 its final flush), which the daemon does when it starts; start greygate serve \
                 once, then explain again",
                path.display()
            )));
        }
        drop(tx);
        Ok(EmbeddedReader {
            path: path.to_path_buf(),
            db,
        })
    }

    fn get<R: Record>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<R>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        match table.get(key).map_err(backend)? {
            Some(v) => R::from_bytes(v.value()).map(Some).map_err(backend),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Store for EmbeddedReader {
    fn describe(&self) -> String {
        format!("embedded {} (read-only)", self.path.display())
    }

    async fn get_triplet(&self, key: &TripletKey) -> Result<Option<Triplet>, StoreError> {
        self.get(TRIPLETS, &key.joined())
    }

    async fn update_triplet(
        &self,
        _: &TripletKey,
        _: UpdateFn<'_, Triplet>,
    ) -> Result<Option<Triplet>, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn get_client(&self, client: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.get(CLIENTS, client)
    }

    async fn update_client(
        &self,
        _: &str,
        _: UpdateFn<'_, ClientRecord>,
    ) -> Result<Option<ClientRecord>, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn expire(&self, _: u64, _: usize) -> Result<ExpireStep, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let mut counts = Counts::default();
        let triplets = tx.open_table(TRIPLETS).map_err(backend)?;
        for item in triplets.iter().map_err(backend)? {
            let (_, v) = item.map_err(backend)?;
            match Triplet::from_bytes(v.value()) {
                Ok(t) if t.passed => counts.triplets_passed += 1,
                Ok(_) => counts.triplets_pending += 1,
                Err(_) => {}
            }
        }
        counts.clients = tx
            .open_table(CLIENTS)
            .map_err(backend)?
            .len()
            .map_err(backend)?;
        Ok(counts)
    }

    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: EntryFilter<'_>,
    ) -> Result<Page, StoreError> {
        let after = cursor.map(cursor::unhex_str).transpose()?;
        let tx = self.db.begin_read().map_err(backend)?;
        let rows = read_rows(&tx, table_def(kind), after.as_deref())?;
        Ok(match kind {
            EntryKind::Triplets => page_from_rows(rows, limit, now, keep, |k, v| {
                triplet_entry(k, Triplet::from_bytes(v).ok())
            }),
            EntryKind::Clients => page_from_rows(rows, limit, now, keep, |k, v| {
                client_entry(k, ClientRecord::from_bytes(v).ok())
            }),
        })
    }

    async fn remove_triplet(&self, _: &TripletKey) -> Result<bool, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn remove_client(&self, _: &str) -> Result<bool, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        Ok(read_mode(&self.db.begin_read().map_err(backend)?)?.0)
    }

    async fn set_address_mode(&self, _: &str) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
}

impl EmbeddedReader {
    /// Checks the file against the address mode `wanted` without writing (see
    /// `store::mode`).
    pub fn check_addresses(&self, wanted: &str) -> Result<(), StoreError> {
        let (recorded, has_triplets) = read_mode(&self.db.begin_read().map_err(backend)?)?;
        super::mode::decide(recorded.as_deref(), has_triplets, wanted).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A new store file holds addresses from its first commit: owner-only whatever the
    /// umask; a file that exists keeps the mode it was given.
    #[test]
    fn a_new_file_is_owner_only_and_an_old_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = dir.path().join("new.redb");
        drop(EmbeddedStore::open(&new, 0).unwrap());
        assert_eq!(mode(&new), 0o600);
        assert!(
            !EmbeddedStore::open(&new, 0)
                .unwrap()
                .load_report()
                .empty_file
        );

        let old = dir.path().join("old.redb");
        drop(EmbeddedStore::open(&old, 0).unwrap());
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o640)).unwrap();
        drop(EmbeddedStore::open(&old, 0).unwrap());
        assert_eq!(mode(&old), 0o640, "the administrator's choice stays");

        // `verify`'s copy goes to a shared temporary directory: owner-only there too.
        let copy = dir.path().join("copy.redb");
        copy_private(&old, &copy).unwrap();
        assert_eq!(mode(&copy), 0o600);
        assert!(
            copy_private(&old, &copy).is_err(),
            "never over an existing file"
        );
    }

    #[test]
    fn commits_go_to_the_journal_only_under_load() {
        let many = JOURNAL_MIN_CHANGES;
        assert_eq!(Commit::choose(10, 0, false), Commit::Direct);
        assert_eq!(Commit::choose(many, 0, false), Commit::Append);
        assert_eq!(Commit::choose(many, 1, false), Commit::Append);
        assert_eq!(Commit::choose(many, MERGE_BYTES, false), Commit::Merge);
        assert_eq!(Commit::choose(10, 1, false), Commit::Merge, "load dropped");
        assert_eq!(Commit::choose(0, 1, false), Commit::Merge);
        assert_eq!(Commit::choose(many, 0, true), Commit::Merge);
    }

    #[test]
    fn journal_rows_read_back_as_written() {
        let t = Triplet {
            first_seen: 1,
            last_seen: 2,
            expires_at: 3,
            attempts: 4,
            passes: 5,
            passed: true,
        };
        let c = ClientRecord {
            passes: 1,
            last_counted: 2,
            last_seen: 3,
            expires_at: 4,
        };
        let triplets: Vec<Change<Triplet>> =
            vec![("a/b/c".into(), Some(t)), ("ü/x/y".into(), None)];
        let clients: Vec<Change<ClientRecord>> = vec![("192.0.2.0/24".into(), Some(c))];
        let mut blob = Vec::new();
        encode_changes(&mut blob, TABLE_TRIPLETS, &triplets);
        encode_changes(&mut blob, TABLE_CLIENTS, &clients);
        let mut entries = Vec::new();
        decode_journal(&blob, &mut entries).unwrap();
        let t_bytes = t.to_bytes();
        let c_bytes = c.to_bytes();
        assert_eq!(
            entries,
            vec![
                (TABLE_TRIPLETS, &b"a/b/c"[..], Some(&t_bytes[..])),
                (TABLE_TRIPLETS, "ü/x/y".as_bytes(), None),
                (TABLE_CLIENTS, &b"192.0.2.0/24"[..], Some(&c_bytes[..])),
            ]
        );
        // Cut anywhere inside the last entry: an error, not a panic or a short read.
        for cut in 1..blob.len() {
            let mut entries = Vec::new();
            let whole = decode_journal(&blob[..cut], &mut entries).is_ok();
            assert!(!whole || entries.len() < 3, "cut at {cut}");
        }
    }

    fn key(i: usize) -> TripletKey {
        TripletKey {
            client: format!("10.0.{}.0/24", i % 250),
            sender: format!("s{i}@example.net"),
            recipient: "r@example.org".into(),
        }
    }

    const T0: u64 = 1_700_000_000;

    fn pending(i: usize) -> Triplet {
        Triplet {
            first_seen: T0 + i as u64,
            last_seen: T0 + i as u64,
            expires_at: T0 + 86_400,
            attempts: 1,
            passes: 0,
            passed: false,
        }
    }

    fn put_in(store: &EmbeddedStore, i: usize, t: Triplet) {
        let _ = store.hot.update_triplet_now(&key(i), &|_| Some(t));
    }

    /// Keys of the rows in the file's triplet table (after the journal is merged).
    async fn rows_on_disk(store: &EmbeddedStore) -> Vec<String> {
        store.flush_fully().await.expect("merge");
        let tx = store.db.get().expect("open").begin_read().expect("read");
        let table = tx.open_table(TRIPLETS).expect("table");
        table
            .iter()
            .expect("iter")
            .map(|row| row.expect("row").0.value().to_owned())
            .collect()
    }

    /// An evicted record leaves the file at the next commit, like a removal: pending ones by
    /// the key text their queue keeps, passed ones (no text in memory) by a walk of the
    /// table. The file never keeps more rows than the cap after a commit.
    #[tokio::test]
    async fn evicted_records_leave_the_file_at_the_next_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cap.redb");
        let store = EmbeddedStore::open_capped(&path, T0, 100).expect("open");
        let put = |i: usize, t: Triplet| put_in(&store, i, t);
        for i in 0..100 {
            put(i, pending(i));
        }
        store.flush().await.expect("flush");
        assert_eq!(rows_on_disk(&store).await.len(), 100);
        // 50 more: the 50 oldest (committed rows, their text only in the queue) go.
        for i in 100..150 {
            put(i, pending(i));
        }
        store.flush().await.expect("flush");
        let rows = rows_on_disk(&store).await;
        assert_eq!(rows.len(), 100, "evicted rows deleted at the commit");
        assert_eq!(store.capacity().map(|c| c.evicted_pending), Some(50));
        // A big batch goes through the journal; evictions still leave by the next merge.
        for i in 150..150 + JOURNAL_MIN_CHANGES {
            put(i, pending(i));
        }
        store.flush_fully().await.expect("flush");
        assert_eq!(rows_on_disk(&store).await.len(), 100);

        // Passed triplets only, and a newcomer: a passed one goes, found by the table walk.
        for i in 0..200 {
            store
                .hot
                .triplets
                .remove(&key(150 + JOURNAL_MIN_CHANGES - 1 - i).joined());
        }
        for i in 0..100 {
            put(
                10_000 + i,
                Triplet {
                    passed: true,
                    passes: 1,
                    ..pending(i)
                },
            );
        }
        store.flush().await.expect("flush");
        assert_eq!(rows_on_disk(&store).await.len(), 100);
        put(20_000, pending(20_000));
        store.flush().await.expect("flush");
        let rows = rows_on_disk(&store).await;
        assert_eq!(rows.len(), 100);
        assert!(
            rows.contains(&key(20_000).joined()),
            "the newcomer is written"
        );
        assert_eq!(store.capacity().map(|c| c.evicted_passed), Some(1));
        drop(store);

        // Opened without a cap (a command's `Access::Write`), the loaded records are counted
        // all the same: a removal counts down what loading counted up.
        let store = EmbeddedStore::open(&path, T0).expect("reopen");
        assert_eq!(store.hot.len(), 100);
        assert_eq!(store.hot.triplets.pending(), 1);
        assert!(store.hot.triplets.remove(&key(20_000).joined()));
        assert_eq!((store.hot.len(), store.hot.triplets.pending()), (99, 0));
        put_in(&store, 20_000, pending(20_000));
        store.flush().await.expect("flush");
        drop(store);

        // Opened with a smaller cap, the file is evicted down to it as it loads, oldest
        // pending first, and the rows go at the first commit.
        let store = EmbeddedStore::open_capped(&path, T0, 60).expect("reopen");
        assert_eq!(store.load_report().evicted, 40);
        assert_eq!(
            store.hot.count().triplets_pending,
            0,
            "the newcomer went first"
        );
        assert_eq!(rows_on_disk(&store).await.len(), 60);
    }

    proptest! {
        #[test]
        fn any_journal_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut entries = Vec::new();
            let _ = decode_journal(&bytes, &mut entries);
        }
    }
}
