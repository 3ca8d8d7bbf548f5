//! The address mode a store was written in (`plain`, or keyed digests under one secret:
//! see `engine::privacy`), recorded in the store itself so that keys of two modes, or of
//! two secrets, never mix in one store.
//!
//! A store records its mode when it is first used. A store from before modes were recorded
//! is taken as `plain` when it holds triplets. Opening a store in another mode than the
//! recorded one is refused while the store holds triplets; an empty store (no triplets:
//! client groups hold no addresses) simply takes the new mode.

use super::{EntryKind, Store, StoreError};

/// The key the mode is recorded under.
pub const MODE_NAME: &str = "addresses";

/// What to do about a store's recorded mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The store is in the wanted mode already.
    Keep,
    /// Record the wanted mode.
    Record,
}

/// Decides whether a store whose recorded mode is `recorded` (if any) and that holds
/// triplets or not may be used in mode `wanted`; the error names the setting.
pub(crate) fn decide(
    recorded: Option<&str>,
    has_triplets: bool,
    wanted: &str,
) -> Result<Verdict, StoreError> {
    // A store that predates recorded modes wrote addresses as text.
    let effective = recorded.or(has_triplets.then_some(crate::engine::privacy::PLAIN_MODE));
    match effective {
        Some(m) if m == wanted => Ok(if recorded.is_some() {
            Verdict::Keep
        } else {
            Verdict::Record
        }),
        Some(m) if has_triplets => Err(StoreError::AddressMode(mismatch(m, wanted))),
        _ => Ok(Verdict::Record),
    }
}

fn describe(mode: &str) -> String {
    if mode == crate::engine::privacy::PLAIN_MODE {
        "addresses as plain text (hash_addresses = false)".into()
    } else {
        format!(
            "hashed addresses ({mode}: hash_addresses = true with a secret of that fingerprint)"
        )
    }
}

fn mismatch(recorded: &str, wanted: &str) -> String {
    let hint = if recorded == crate::engine::privacy::PLAIN_MODE
        || wanted == crate::engine::privacy::PLAIN_MODE
    {
        "set [store] hash_addresses back"
    } else {
        "use the secret it was written with ([store] hash_secret / hash_secret_file)"
    };
    format!(
        "the store holds triplets keyed with {}, but [store] asks for {}; mixing both in one \
         store would split every correspondent's history: {hint}, or start on an empty store \
         (remove its triplets, or point [store] at a new one)",
        describe(recorded),
        describe(wanted)
    )
}

/// Whether `store` holds any triplet, live or dead (a bounded walk: a store with records
/// finds one within its first pages).
pub(crate) async fn has_triplets(store: &dyn Store) -> Result<bool, StoreError> {
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let page = store
            .scan(EntryKind::Triplets, cursor.as_deref(), 1, 0, &|_| true)
            .await?;
        if !page.entries.is_empty() {
            return Ok(true);
        }
        match page.next {
            None => return Ok(false),
            next => cursor = next,
        }
    }
    // A store that has walked 1000 pages without a record: take it as written.
    Ok(true)
}

/// Checks `store` against the mode `wanted` and records it there: the daemon and every
/// command that writes call it before using a store.
pub async fn claim(store: &dyn Store, wanted: &str) -> Result<(), StoreError> {
    let recorded = store.address_mode().await?;
    if recorded.as_deref() == Some(wanted) {
        return Ok(());
    }
    let has = has_triplets(store).await?;
    match decide(recorded.as_deref(), has, wanted)? {
        Verdict::Keep => Ok(()),
        Verdict::Record => store.set_address_mode(wanted).await,
    }
}

/// Checks without recording (read-only commands): refuses a store written in another mode.
pub async fn check(store: &dyn Store, wanted: &str) -> Result<(), StoreError> {
    let recorded = store.address_mode().await?;
    if recorded.as_deref() == Some(wanted) {
        return Ok(());
    }
    let has = has_triplets(store).await?;
    decide(recorded.as_deref(), has, wanted).map(|_| ())
}

/// A shared store (redis, postgres) that checks its address mode before its first
/// operation: those stores connect on first use, so the check waits for the server too.
/// A store of another mode then fails every operation with [`StoreError::AddressMode`].
pub(crate) struct Claimed {
    inner: std::sync::Arc<dyn Store>,
    wanted: String,
    /// Record the mode (the daemon, writing commands) or only check it (reading ones).
    record: bool,
    /// The outcome once known: a refusal is final, a server that did not answer is asked
    /// again at the next operation.
    state: tokio::sync::OnceCell<Result<(), String>>,
}

impl Claimed {
    pub(crate) fn new(inner: std::sync::Arc<dyn Store>, wanted: String, record: bool) -> Self {
        Claimed {
            inner,
            wanted,
            record,
            state: tokio::sync::OnceCell::new(),
        }
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let outcome = self
            .state
            .get_or_try_init(|| async {
                let r = if self.record {
                    claim(&*self.inner, &self.wanted).await
                } else {
                    check(&*self.inner, &self.wanted).await
                };
                match r {
                    Ok(()) => Ok(Ok(())),
                    Err(StoreError::AddressMode(m)) => Ok(Err(m)),
                    Err(e) => Err(e),
                }
            })
            .await?;
        outcome.clone().map_err(StoreError::AddressMode)
    }
}

#[async_trait::async_trait]
impl Store for Claimed {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn health(&self) -> super::StoreHealth {
        self.inner.health()
    }

    fn capacity(&self) -> Option<super::Capacity> {
        self.inner.capacity()
    }

    /// The entries are operator patterns, not keys: no address mode to check first.
    fn shared_entries(&self) -> Option<&dyn super::SharedEntries> {
        self.inner.shared_entries()
    }

    async fn get_triplet(
        &self,
        key: &crate::engine::TripletKey,
    ) -> Result<Option<crate::engine::Triplet>, StoreError> {
        self.ready().await?;
        self.inner.get_triplet(key).await
    }

    async fn update_triplet(
        &self,
        key: &crate::engine::TripletKey,
        f: super::UpdateFn<'_, crate::engine::Triplet>,
    ) -> Result<Option<crate::engine::Triplet>, StoreError> {
        self.ready().await?;
        self.inner.update_triplet(key, f).await
    }

    async fn get_client(
        &self,
        client: &str,
    ) -> Result<Option<crate::engine::ClientRecord>, StoreError> {
        self.ready().await?;
        self.inner.get_client(client).await
    }

    async fn update_client(
        &self,
        client: &str,
        f: super::UpdateFn<'_, crate::engine::ClientRecord>,
    ) -> Result<Option<crate::engine::ClientRecord>, StoreError> {
        self.ready().await?;
        self.inner.update_client(client, f).await
    }

    async fn expire(&self, now: u64, max_scan: usize) -> Result<super::ExpireStep, StoreError> {
        self.ready().await?;
        self.inner.expire(now, max_scan).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    async fn flush_fully(&self) -> Result<(), StoreError> {
        self.inner.flush_fully().await
    }

    async fn counts(&self) -> Result<super::Counts, StoreError> {
        self.ready().await?;
        self.inner.counts().await
    }

    async fn scan(
        &self,
        kind: EntryKind,
        cursor: Option<&str>,
        limit: usize,
        now: u64,
        keep: super::EntryFilter<'_>,
    ) -> Result<super::Page, StoreError> {
        self.ready().await?;
        self.inner.scan(kind, cursor, limit, now, keep).await
    }

    async fn remove_triplet(&self, key: &crate::engine::TripletKey) -> Result<bool, StoreError> {
        self.ready().await?;
        self.inner.remove_triplet(key).await
    }

    async fn remove_client(&self, client: &str) -> Result<bool, StoreError> {
        self.ready().await?;
        self.inner.remove_client(client).await
    }

    /// Checks (and records) the mode first: the daemon asks this at start to refuse a
    /// store of another mode at once when its server answers.
    async fn address_mode(&self) -> Result<Option<String>, StoreError> {
        self.ready().await?;
        self.inner.address_mode().await
    }

    async fn set_address_mode(&self, mode: &str) -> Result<(), StoreError> {
        self.inner.set_address_mode(mode).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "hmac-sha256:0011223344556677";
    const H2: &str = "hmac-sha256:8899aabbccddeeff";

    #[test]
    fn modes_are_kept_recorded_or_refused() {
        assert_eq!(decide(None, false, H).unwrap(), Verdict::Record);
        assert_eq!(decide(None, false, "plain").unwrap(), Verdict::Record);
        assert_eq!(decide(Some(H), true, H).unwrap(), Verdict::Keep);
        // A store from before modes were recorded holds plain text.
        assert_eq!(decide(None, true, "plain").unwrap(), Verdict::Record);
        let e = decide(None, true, H).unwrap_err().to_string();
        assert!(e.contains("hash_addresses"), "{e}");
        assert!(e.contains("plain text"), "{e}");
        let e = decide(Some(H), true, "plain").unwrap_err().to_string();
        assert!(e.contains("hash_addresses"), "{e}");
        let e = decide(Some(H), true, H2).unwrap_err().to_string();
        assert!(e.contains("hash_secret"), "{e}");
        // An empty store takes the new mode.
        assert_eq!(decide(Some(H), false, "plain").unwrap(), Verdict::Record);
        assert_eq!(decide(Some("plain"), false, H).unwrap(), Verdict::Record);
    }
}
