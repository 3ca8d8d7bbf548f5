//! Listing and purging stored records by filter: the admin API's `/api/entries` and
//! `/api/purge`, and the CLI's `list` and `purge` when no daemon runs.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::wire::PurgeReport;
use crate::engine::Engine;
use crate::store::{Entry, EntryKind, Page, Store, StoreError};

/// Records per page when the caller does not say.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page served.
pub const MAX_LIMIT: usize = 1000;

/// Which records to list or purge.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct EntryQuery {
    /// `triplets` (default) or `clients` (auto-allow records).
    pub kind: Option<String>,
    /// Triplets only: `pending`, `passed` or `any` (default).
    pub state: Option<String>,
    /// A client IP (matches its group), or part of a client group / identity.
    pub client: Option<String>,
    /// Part of the normalised sender.
    pub sender: Option<String>,
    /// Part of the normalised recipient.
    pub recipient: Option<String>,
}

/// A checked query.
pub struct Matcher {
    pub kind: EntryKind,
    passed: Option<bool>,
    client: Option<ClientMatch>,
    sender: Option<String>,
    recipient: Option<String>,
}

enum ClientMatch {
    Group(String),
    Part(String),
}

fn part(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_lowercase)
}

impl EntryQuery {
    /// Whether the query names anything beyond the kind (purge refuses "everything" by
    /// accident).
    pub fn is_narrowed(&self) -> bool {
        [&self.state, &self.client, &self.sender, &self.recipient]
            .iter()
            .any(|f| part(f).is_some_and(|s| s != "any"))
    }

    /// Checks the query; an IP client becomes its group under `engine`'s prefixes.
    pub fn matcher(&self, engine: &Engine) -> Result<Matcher, String> {
        let kind = match self.kind.as_deref().map(str::trim) {
            None | Some("") | Some("triplets") | Some("triplet") => EntryKind::Triplets,
            Some("clients") | Some("client") => EntryKind::Clients,
            Some(k) => return Err(format!("kind {k:?} is not triplets or clients")),
        };
        let passed = match self.state.as_deref().map(str::trim) {
            None | Some("") | Some("any") => None,
            Some("pending") => Some(false),
            Some("passed") => Some(true),
            Some(s) => return Err(format!("state {s:?} is not pending, passed or any")),
        };
        if passed.is_some() && kind == EntryKind::Clients {
            return Err("state applies to triplets only".into());
        }
        let client = part(&self.client).map(|c| match c.parse::<IpAddr>() {
            Ok(ip) => ClientMatch::Group(engine.key(ip, "", "").client),
            Err(_) => ClientMatch::Part(c),
        });
        Ok(Matcher {
            kind,
            passed,
            client,
            sender: part(&self.sender),
            recipient: part(&self.recipient),
        })
    }
}

impl Matcher {
    pub fn keep(&self, e: &Entry) -> bool {
        let client_ok = |group: &str| match &self.client {
            None => true,
            Some(ClientMatch::Group(g)) => group == g,
            Some(ClientMatch::Part(p)) => group.to_lowercase().contains(p),
        };
        match e {
            Entry::Triplet { key, record } => {
                self.passed.is_none_or(|p| record.passed == p)
                    && client_ok(&key.client)
                    && self
                        .sender
                        .as_ref()
                        .is_none_or(|s| key.sender.contains(s.as_str()))
                    && self
                        .recipient
                        .as_ref()
                        .is_none_or(|r| key.recipient.contains(r.as_str()))
            }
            Entry::Client { client, .. } => {
                self.sender.is_none() && self.recipient.is_none() && client_ok(client)
            }
        }
    }
}

/// One page of matching records.
pub async fn list(
    store: &dyn Store,
    m: &Matcher,
    cursor: Option<&str>,
    limit: usize,
    now: u64,
) -> Result<Page, StoreError> {
    let keep = |e: &Entry| m.keep(e);
    store
        .scan(m.kind, cursor, limit.clamp(1, MAX_LIMIT), now, &keep)
        .await
}

/// Removes every matching record, within `budget`.
pub async fn purge(
    store: &dyn Store,
    m: &Matcher,
    now: u64,
    budget: Duration,
) -> Result<PurgeReport, StoreError> {
    let started = Instant::now();
    let mut report = PurgeReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let page = list(store, m, cursor.as_deref(), 500, now).await?;
        for e in &page.entries {
            let gone = match e {
                Entry::Triplet { key, .. } => store.remove_triplet(key).await?,
                Entry::Client { client, .. } => store.remove_client(client).await?,
            };
            report.removed += u64::from(gone);
        }
        match page.next {
            None => {
                report.complete = true;
                break;
            }
            Some(next) => cursor = Some(next),
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    store.flush_fully().await?;
    Ok(report)
}
