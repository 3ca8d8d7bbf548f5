//! Operator allow/deny entries: in a small JSON file beside a store of this host's own
//! (memory, embedded), or in a store that several daemons share (redis, postgres).
//!
//! File: every change is written to a temporary file, synced, and renamed over the old one
//! before it takes effect, so a crash leaves either the old or the new list, never half of
//! one. The CLI edits the same file when no daemon runs.
//!
//! Shared store: every change is made in the store ([`add_shared`], [`remove_shared`]),
//! and each daemon keeps the entries it last read there (this type, then a cache): it reads
//! them again whenever the store's change marker moved, and keeps what it has while the
//! store cannot be reached.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::engine::{ListKind, RuntimeEntry, RuntimeLists, Target};
use crate::store::{SharedEntries, StoreError};

/// Largest entries file read (a runaway file must not exhaust memory).
const MAX_FILE: u64 = 16 << 20;
/// Most entries kept; more is almost certainly a script gone wrong.
pub const MAX_ENTRIES: usize = 100_000;
/// Longest entry value or comment accepted.
const MAX_TEXT: usize = 1024;

/// Why an entry change or the entries file failed.
#[derive(Debug, thiserror::Error)]
pub enum EntriesError {
    #[error("invalid {target} entry {value:?}: {why}")]
    Invalid {
        target: &'static str,
        value: String,
        why: String,
    },
    #[error("no runtime {list} entry matches {what:?}")]
    NotFound { list: &'static str, what: String },
    #[error("too many runtime entries (limit {MAX_ENTRIES})")]
    Full,
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("cannot save {path}: {why}")]
    Write { path: String, why: String },
    /// The shared store that keeps the entries did not take the change.
    #[error("runtime entries are kept in the store, which failed: {0}")]
    Store(StoreError),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    next_id: u64,
    entries: Vec<RuntimeEntry>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    entries: Vec<RuntimeEntry>,
    /// Shared store: the change marker the entries were read at (`None`: not read yet).
    synced: Option<u64>,
    /// Shared store: reading the entries failed last time (said once in the log).
    failing: bool,
}

/// The entries and where they are kept.
#[derive(Debug)]
pub struct RuntimeEntries {
    state: Mutex<State>,
    file: Option<PathBuf>,
    /// Kept in the shared store; `state` holds the entries last read there.
    shared: bool,
    /// Shared store: an entries file from before, to import once (see [`RuntimeEntries::shared`]).
    import: Mutex<Option<PathBuf>>,
}

/// Checks an entry's value and comment; returns the value trimmed.
fn checked<'v>(target: Target, value: &'v str, comment: &str) -> Result<&'v str, EntriesError> {
    let value = value.trim();
    let invalid = |why: String| EntriesError::Invalid {
        target: target.as_str(),
        value: value.to_string(),
        why,
    };
    if value.len() > MAX_TEXT || comment.len() > MAX_TEXT {
        return Err(invalid(format!("longer than {MAX_TEXT} bytes")));
    }
    if comment.chars().any(char::is_control) {
        return Err(invalid("comment has control characters".into()));
    }
    RuntimeLists::check(target, value).map_err(invalid)?;
    Ok(value)
}

/// Adds an entry to a shared store, or updates expiry and comment of the same (list,
/// target, value); the id comes from the store.
pub async fn add_shared(
    store: &dyn SharedEntries,
    list: ListKind,
    target: Target,
    value: &str,
    ttl: Option<u64>,
    comment: &str,
    now: u64,
) -> Result<RuntimeEntry, EntriesError> {
    let value = checked(target, value, comment)?;
    let entry = RuntimeEntry {
        id: 0,
        list,
        target,
        value: value.to_string(),
        added_at: now,
        expires_at: ttl.map(|t| now.saturating_add(t)),
        comment: comment.to_string(),
    };
    store
        .put_entry(&entry, MAX_ENTRIES)
        .await
        .map_err(EntriesError::Store)?
        .ok_or(EntriesError::Full)
}

/// Removes the entries of `list` that `sel` names from a shared store; returns them.
pub async fn remove_shared(
    store: &dyn SharedEntries,
    list: ListKind,
    sel: &Selector,
) -> Result<Vec<RuntimeEntry>, EntriesError> {
    let (_, all) = store.list_entries().await.map_err(EntriesError::Store)?;
    let ids: Vec<u64> = all
        .iter()
        .filter(|e| selected(e, list, sel))
        .map(|e| e.id)
        .collect();
    let gone = if ids.is_empty() {
        Vec::new()
    } else {
        store
            .remove_entries(&ids)
            .await
            .map_err(EntriesError::Store)?
    };
    if gone.is_empty() {
        return Err(not_found(list, sel));
    }
    Ok(gone)
}

fn selected(e: &RuntimeEntry, list: ListKind, sel: &Selector) -> bool {
    e.list == list
        && match sel {
            Selector::Id(id) => e.id == *id,
            Selector::Value(v) => e.value.eq_ignore_ascii_case(v.trim()),
        }
}

fn not_found(list: ListKind, sel: &Selector) -> EntriesError {
    EntriesError::NotFound {
        list: list.as_str(),
        what: match sel {
            Selector::Id(id) => format!("#{id}"),
            Selector::Value(v) => v.clone(),
        },
    }
}

/// What to remove: one entry by id, or every entry with this value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Id(u64),
    Value(String),
}

impl RuntimeEntries {
    /// Entries that live only as long as the process (memory store, tests).
    pub fn in_memory() -> Self {
        RuntimeEntries {
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            file: None,
            shared: false,
            import: Mutex::new(None),
        }
    }

    /// Entries kept in a shared store: none until the first read there. `import` is an
    /// entries file from before the switch to the shared store: imported once, at the first
    /// read, if the store has no entries yet (the file is then renamed `<name>.imported`);
    /// left alone, with a warning, if the store has some.
    pub fn shared(import: Option<PathBuf>) -> Self {
        RuntimeEntries {
            shared: true,
            import: Mutex::new(import),
            ..Self::in_memory()
        }
    }

    /// Whether the entries are kept in a shared store.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The file to import into the shared store, once (see [`RuntimeEntries::shared`]).
    pub(crate) fn take_import(&self) -> Option<PathBuf> {
        self.import.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Puts back a file whose import failed, for the next attempt.
    pub(crate) fn put_import(&self, path: PathBuf) {
        *self.import.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// The change marker the entries were last read at (shared store).
    pub fn synced(&self) -> Option<u64> {
        self.lock().synced
    }

    /// The entries read from the shared store at change marker `version`.
    pub fn set_synced(&self, version: u64, entries: Vec<RuntimeEntry>) {
        let mut st = self.lock();
        st.synced = Some(version);
        st.entries = entries;
    }

    /// Records whether reading the shared store failed; true when that changed.
    pub(crate) fn set_failing(&self, failing: bool) -> bool {
        let mut st = self.lock();
        std::mem::replace(&mut st.failing, failing) != failing
    }

    /// Loads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, EntriesError> {
        let read_err = |why: String| EntriesError::Read {
            path: path.display().to_string(),
            why,
        };
        let state = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                next_id: 1,
                ..State::default()
            },
            Err(e) => return Err(read_err(e.to_string())),
            Ok(m) if m.len() > MAX_FILE => {
                return Err(read_err(format!("larger than {MAX_FILE} bytes")));
            }
            Ok(_) => {
                let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
                let f: FileFormat =
                    serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
                let max_id = f.entries.iter().map(|e| e.id).max().unwrap_or(0);
                State {
                    next_id: f.next_id.max(max_id + 1),
                    entries: f.entries,
                    ..State::default()
                }
            }
        };
        Ok(RuntimeEntries {
            state: Mutex::new(state),
            file: Some(path.to_path_buf()),
            shared: false,
            import: Mutex::new(None),
        })
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every entry, expired ones included until the next clean-up, by id.
    pub fn list(&self) -> Vec<RuntimeEntry> {
        let mut v = self.lock().entries.clone();
        v.sort_by_key(|e| e.id);
        v
    }

    /// The entries alive at `now`, compiled; entries that no longer parse are logged.
    pub fn compile(&self, now: u64) -> RuntimeLists {
        let (lists, bad) = RuntimeLists::build(self.lock().entries.clone(), now);
        for (e, why) in bad {
            tracing::warn!(entry = %e, error = %why, "runtime entry ignored");
        }
        lists
    }

    /// Adds an entry, or updates expiry and comment of the same (list, target, value).
    pub fn add(
        &self,
        list: ListKind,
        target: Target,
        value: &str,
        ttl: Option<u64>,
        comment: &str,
        now: u64,
    ) -> Result<RuntimeEntry, EntriesError> {
        let value = checked(target, value, comment)?;
        let expires_at = ttl.map(|t| now.saturating_add(t));
        let mut st = self.lock();
        let mut next = st.entries.clone();
        let existing = next
            .iter_mut()
            .find(|e| e.list == list && e.target == target && e.value == value);
        let entry = match existing {
            Some(e) => {
                e.expires_at = expires_at;
                e.comment = comment.to_string();
                e.clone()
            }
            None => {
                if next.len() >= MAX_ENTRIES {
                    return Err(EntriesError::Full);
                }
                let e = RuntimeEntry {
                    id: st.next_id,
                    list,
                    target,
                    value: value.to_string(),
                    added_at: now,
                    expires_at,
                    comment: comment.to_string(),
                };
                next.push(e.clone());
                e
            }
        };
        let next_id = st.next_id.max(entry.id + 1);
        self.save(next_id, &next)?;
        st.entries = next;
        st.next_id = next_id;
        Ok(entry)
    }

    /// Removes the entries of `list` that `sel` names; returns them.
    pub fn remove(
        &self,
        list: ListKind,
        sel: &Selector,
    ) -> Result<Vec<RuntimeEntry>, EntriesError> {
        let mut st = self.lock();
        let (gone, kept): (Vec<_>, Vec<_>) = st
            .entries
            .iter()
            .cloned()
            .partition(|e| selected(e, list, sel));
        if gone.is_empty() {
            return Err(not_found(list, sel));
        }
        self.save(st.next_id, &kept)?;
        st.entries = kept;
        Ok(gone)
    }

    /// Forgets entries that expired before `now` (kept in memory if the file cannot be
    /// written; they no longer match either way).
    pub fn drop_expired(&self, now: u64) {
        let mut st = self.lock();
        let kept: Vec<_> = st
            .entries
            .iter()
            .filter(|e| e.alive(now))
            .cloned()
            .collect();
        if kept.len() == st.entries.len() {
            return;
        }
        match self.save(st.next_id, &kept) {
            Ok(()) => st.entries = kept,
            Err(e) => tracing::warn!(error = %e, "could not remove expired runtime entries"),
        }
    }

    fn save(&self, next_id: u64, entries: &[RuntimeEntry]) -> Result<(), EntriesError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let write_err = |e: std::io::Error| EntriesError::Write {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let body = serde_json::to_vec_pretty(&FileFormat {
            version: 1,
            next_id,
            entries: entries.to_vec(),
        })
        .expect("entries serialise");
        let tmp = path.with_extension("tmp");
        // The entries name addresses: the file is owner-only whatever the umask. A
        // leftover temporary file (a crash) may have another mode, so it goes first.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(write_err(e)),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err)?;
        f.write_all(&body).map_err(write_err)?;
        f.write_all(b"\n").map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself must reach the disk too.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reload_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.json");
        let e = RuntimeEntries::load(&path).unwrap();
        let a = e
            .add(
                ListKind::Allow,
                Target::Client,
                "192.0.2.0/24",
                Some(60),
                "partner",
                1000,
            )
            .unwrap();
        assert_eq!((a.id, a.expires_at), (1, Some(1060)));
        let again = e
            .add(
                ListKind::Allow,
                Target::Client,
                "192.0.2.0/24",
                None,
                "",
                1001,
            )
            .unwrap();
        assert_eq!(
            (again.id, again.expires_at),
            (1, None),
            "same entry updated"
        );
        e.add(
            ListKind::Deny,
            Target::Sender,
            "@spam.example",
            None,
            "",
            1002,
        )
        .unwrap();
        assert!(matches!(
            e.add(ListKind::Allow, Target::Client, "10.0.0.0/99", None, "", 0),
            Err(EntriesError::Invalid { .. })
        ));

        let reloaded = RuntimeEntries::load(&path).unwrap();
        assert_eq!(reloaded.list(), e.list());
        let gone = reloaded
            .remove(ListKind::Deny, &Selector::Value("@SPAM.example".into()))
            .unwrap();
        assert_eq!(gone.len(), 1);
        assert!(reloaded.remove(ListKind::Deny, &Selector::Id(2)).is_err());
        let third = reloaded
            .add(
                ListKind::Allow,
                Target::Recipient,
                "@example.org",
                Some(5),
                "",
                2000,
            )
            .unwrap();
        assert_eq!(third.id, 3, "ids are never reused");
        reloaded.drop_expired(2005);
        assert_eq!(RuntimeEntries::load(&path).unwrap().list().len(), 1);
    }

    /// The file names addresses: owner-only whatever the umask, also when a crash left a
    /// temporary file with another mode behind.
    #[test]
    fn the_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.json");
        std::fs::write(path.with_extension("tmp"), "left over").unwrap();
        std::fs::set_permissions(
            path.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let e = RuntimeEntries::load(&path).unwrap();
        e.add(ListKind::Allow, Target::Client, "192.0.2.1", None, "", 1)
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn a_broken_file_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            RuntimeEntries::load(&path),
            Err(EntriesError::Read { .. })
        ));
    }
}
