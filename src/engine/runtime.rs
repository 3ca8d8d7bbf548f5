//! Runtime allow and deny entries: added by an operator while the daemon runs (admin API,
//! `greygate allow add`), each with an optional expiry, kept across restarts by the caller.
//!
//! Entries use the allow-list syntax (client IP/CIDR/host name/`.suffix`/`/regex/`, sender
//! or recipient `user@domain`/`@domain`/`user@`). They are compiled into [`AllowLists`] once
//! per change; matching checks the entry's expiry against the request's `now`, so an
//! expired entry stops counting at once even before the caller rebuilds the lists.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::allow::{AllowLists, Origin};

/// Allow (skip greylisting) or deny (always answer "try again later").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Deny,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Allow => "allow",
            ListKind::Deny => "deny",
        }
    }
}

/// What an entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Client IP, CIDR network, host name, `.suffix` or `/regex/`.
    Client,
    Sender,
    Recipient,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Client => "client",
            Target::Sender => "sender",
            Target::Recipient => "recipient",
        }
    }
}

/// One operator-made entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEntry {
    pub id: u64,
    pub list: ListKind,
    pub target: Target,
    /// The entry as written, in allow-list syntax.
    pub value: String,
    /// Unix seconds it was added.
    pub added_at: u64,
    /// Unix seconds after which it no longer applies; `None` keeps it until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

impl RuntimeEntry {
    pub fn alive(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// Runtime entries compiled for matching.
#[derive(Debug, Default)]
pub struct RuntimeLists {
    entries: Vec<RuntimeEntry>,
    allow: AllowLists,
    deny: AllowLists,
}

/// A runtime entry that decided a request.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub entry: &'a RuntimeEntry,
}

impl RuntimeLists {
    /// Checks that `value` is a valid entry for `target` (the error says why not).
    pub fn check(target: Target, value: &str) -> Result<(), String> {
        let mut scratch = AllowLists::default();
        add(&mut scratch, target, value, origin("check", 0, value))
    }

    /// Compiles the entries alive at `now`; invalid ones (edited by hand) are left out and
    /// returned with the reason.
    pub fn build(entries: Vec<RuntimeEntry>, now: u64) -> (Self, Vec<(RuntimeEntry, String)>) {
        let mut lists = RuntimeLists::default();
        let mut bad = Vec::new();
        let mut kept = Vec::with_capacity(entries.len());
        let allow_source: Arc<str> = Arc::from("runtime allow");
        let deny_source: Arc<str> = Arc::from("runtime deny");
        for e in entries {
            if !e.alive(now) {
                continue;
            }
            let (list, source) = match e.list {
                ListKind::Allow => (&mut lists.allow, &allow_source),
                ListKind::Deny => (&mut lists.deny, &deny_source),
            };
            let o = Origin {
                source: source.clone(),
                line: e.id as usize,
                entry: e.value.clone(),
            };
            match add(list, e.target, &e.value, o) {
                Ok(()) => kept.push(e),
                Err(why) => bad.push((e, why)),
            }
        }
        kept.sort_by_key(|e| e.id);
        lists.entries = kept;
        (lists, bad)
    }

    /// The live entries, by id.
    pub fn entries(&self) -> &[RuntimeEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The earliest expiry among the entries, when the caller should rebuild.
    pub fn next_expiry(&self) -> Option<u64> {
        self.entries.iter().filter_map(|e| e.expires_at).min()
    }

    /// The first live entry of `list` matching the client, then the sender, then the
    /// recipient (normalised or as received).
    #[allow(clippy::too_many_arguments)]
    pub fn find(
        &self,
        list: ListKind,
        ip: IpAddr,
        client_name: &str,
        sender: (&str, &str),
        recipient: (&str, &str),
        now: u64,
    ) -> Option<Matched<'_>> {
        let lists = match list {
            ListKind::Allow => &self.allow,
            ListKind::Deny => &self.deny,
        };
        let origins = [
            lists.match_client(ip, client_name).map(|(_, o)| o),
            lists.match_sender(sender.0, sender.1),
            lists.match_recipient(recipient.0, recipient.1),
        ];
        origins
            .into_iter()
            .flatten()
            .filter_map(|o| self.by_id(o.line as u64))
            .find(|e| e.alive(now))
            .map(|entry| Matched { entry })
    }

    fn by_id(&self, id: u64) -> Option<&RuntimeEntry> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.entries[i])
    }
}

fn origin(source: &str, line: usize, entry: &str) -> Origin {
    Origin {
        source: Arc::from(source),
        line,
        entry: entry.to_string(),
    }
}

fn add(lists: &mut AllowLists, target: Target, value: &str, o: Origin) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("empty entry".into());
    }
    match target {
        Target::Client => lists.add_client(value, o),
        Target::Sender => lists.add_sender(value, o),
        Target::Recipient => lists.add_recipient(value, o),
    }
}

impl std::fmt::Display for RuntimeEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "runtime {} #{} {} {:?}",
            self.list.as_str(),
            self.id,
            self.target.as_str(),
            self.value
        )?;
        if let Some(t) = self.expires_at {
            write!(f, " until {t}")?;
        }
        if !self.comment.is_empty() {
            write!(f, " ({})", self.comment)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        id: u64,
        list: ListKind,
        target: Target,
        value: &str,
        exp: Option<u64>,
    ) -> RuntimeEntry {
        RuntimeEntry {
            id,
            list,
            target,
            value: value.into(),
            added_at: 100,
            expires_at: exp,
            comment: String::new(),
        }
    }

    #[test]
    fn matches_by_kind_and_respects_expiry() {
        let (lists, bad) = RuntimeLists::build(
            vec![
                entry(
                    1,
                    ListKind::Allow,
                    Target::Client,
                    "192.0.2.0/24",
                    Some(1000),
                ),
                entry(2, ListKind::Deny, Target::Sender, "@spam.example", None),
                entry(
                    3,
                    ListKind::Allow,
                    Target::Recipient,
                    "ceo@example.org",
                    None,
                ),
                entry(
                    4,
                    ListKind::Allow,
                    Target::Client,
                    ".partner.example",
                    Some(50),
                ),
                entry(5, ListKind::Allow, Target::Client, "not an ip/", None),
            ],
            100,
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(lists.entries().len(), 3, "expired entry 4 left out");
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        let s = ("a@b.example", "a@b.example");
        let r = ("x@example.org", "x@example.org");
        let hit = lists
            .find(ListKind::Allow, ip, "unknown", s, r, 999)
            .unwrap();
        assert_eq!(hit.entry.id, 1);
        assert!(
            lists
                .find(ListKind::Allow, ip, "unknown", s, r, 1000)
                .is_none()
        );
        assert!(
            lists
                .find(ListKind::Allow, other, "unknown", s, r, 10)
                .is_none()
        );
        let ceo = ("ceo@example.org", "ceo@example.org");
        assert_eq!(
            lists
                .find(ListKind::Allow, other, "unknown", s, ceo, 10)
                .unwrap()
                .entry
                .id,
            3
        );
        let spam = ("x@spam.example", "x@spam.example");
        assert_eq!(
            lists
                .find(ListKind::Deny, other, "h.example", spam, r, 10)
                .unwrap()
                .entry
                .id,
            2
        );
        assert!(lists.find(ListKind::Deny, other, "h", s, r, 10).is_none());
        assert_eq!(lists.next_expiry(), Some(1000));
    }

    #[test]
    fn check_reports_bad_values() {
        assert!(RuntimeLists::check(Target::Client, "10.0.0.0/8").is_ok());
        assert!(RuntimeLists::check(Target::Client, "10.0.0.0/99").is_err());
        assert!(RuntimeLists::check(Target::Sender, "").is_err());
        assert!(RuntimeLists::check(Target::Recipient, "@example.org").is_ok());
    }
}
