//! `[lists]`: the big senders whose SPF records `greygate lists update` turns into a client
//! allow list, and the file it writes (which the daemon reads as a client allow list).

use std::path::PathBuf;

use serde::Deserialize;

use super::Problems;
use crate::lists::{self, ListsSettings, domains};

/// `[lists]`: client ranges from the big senders' own SPF records.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLists {
    /// Domains whose SPF records give the ranges; default: the built-in set of big mail
    /// providers and ESPs (`greygate lists domains` prints it).
    pub domains: Vec<String>,
    /// Domains asked about as well as `domains` (your own partners, say).
    pub extra_domains: Vec<String>,
    /// The allow-list file `lists update` writes. The daemon reads it as one more client
    /// allow list when it exists (a missing file is no entries, not an error).
    pub output: PathBuf,
}

impl Default for RawLists {
    fn default() -> Self {
        let d = ListsSettings::default();
        RawLists {
            domains: d.domains,
            extra_domains: Vec::new(),
            output: d.output,
        }
    }
}

impl RawLists {
    pub(super) fn check(&self, p: &mut Problems<'_>) -> ListsSettings {
        let mut all: Vec<String> = Vec::new();
        for (key, list) in [
            ("domains", &self.domains),
            ("extra_domains", &self.extra_domains),
        ] {
            for (i, d) in list.iter().enumerate() {
                let name = d.trim().trim_end_matches('.').to_ascii_lowercase();
                let at = i.to_string();
                if !lists::record::is_domain_name(&name) {
                    p.at(&["lists", key, &at], format!("{d:?} is not a domain name"));
                } else if all.contains(&name) {
                    p.at(&["lists", key, &at], format!("{name:?} appears twice"));
                } else {
                    all.push(name);
                }
            }
        }
        if all.len() > lists::MAX_DOMAINS {
            p.at(
                &["lists", "domains"],
                format!("more than {} domains", lists::MAX_DOMAINS),
            );
        }
        if self.output.as_os_str().is_empty() {
            p.at(&["lists", "output"], "the output file needs a path".into());
        }
        ListsSettings {
            domains: all,
            output: self.output.clone(),
        }
    }
}

/// The comment of a built-in domain (who sends from its ranges), if it is one.
pub fn built_in_comment(domain: &str) -> Option<&'static str> {
    domains::BUILT_IN
        .iter()
        .find(|(d, _)| *d == domain)
        .map(|(_, who)| *who)
}
