//! `[greylist]`: the decision parameters, checked into the engine's `Policy`.

use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use crate::dur::Dur;
use crate::engine::Policy;

/// `[greylist]`: the decision parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGreylist {
    /// How long an unknown triplet is deferred.
    pub delay: Dur,
    /// How long after the first attempt a retry still ends greylisting.
    pub retry_window: Dur,
    /// How long a passed triplet is remembered after it was last seen.
    pub max_age: Dur,
    /// Counted passes (one per hour at most) after which a client group skips greylisting; 0 = never.
    pub auto_allow_after: u32,
    /// How long an auto-allowed client group stays allowed after it was last seen.
    pub auto_allow_lifetime: Dur,
    /// IPv4 prefix length of a client group (32 = exact host).
    pub ipv4_prefix: u8,
    /// IPv6 prefix length of a client group (128 = exact host).
    pub ipv6_prefix: u8,
    /// Characters that start an address extension, as Postfix's `recipient_delimiter`.
    pub recipient_delimiter: String,
    /// Add an `X-Greylist` header to mail that passed after a delay.
    pub x_greylist_header: bool,
    /// New pending triplets one client group may add per `new_triplets_window`; past it,
    /// its further new triplets are deferred without being stored (rule `throttled`).
    /// Known and passed triplets, and auto-allowed groups, are not affected. 0 = no limit.
    pub new_triplets_per_client: u32,
    /// The window of `new_triplets_per_client`, counted from the group's first new triplet.
    pub new_triplets_window: Dur,
}

impl Default for RawGreylist {
    fn default() -> Self {
        let p = Policy::default();
        RawGreylist {
            delay: Dur(Duration::from_secs(p.delay)),
            retry_window: Dur(Duration::from_secs(p.retry_window)),
            max_age: Dur(Duration::from_secs(p.max_age)),
            auto_allow_after: p.auto_allow_after,
            auto_allow_lifetime: Dur(Duration::from_secs(p.auto_allow_lifetime)),
            ipv4_prefix: p.ipv4_prefix,
            ipv6_prefix: p.ipv6_prefix,
            recipient_delimiter: p.recipient_delimiter,
            x_greylist_header: true,
            new_triplets_per_client: p.new_triplets_per_client,
            new_triplets_window: Dur(Duration::from_secs(p.new_triplets_window)),
        }
    }
}

impl RawGreylist {
    /// The engine's policy (prefixes capped at their maximum when they are over it).
    pub(super) fn check(&self, p: &mut Problems<'_>) -> Policy {
        let g = self;
        let secs = |d: Dur| d.0.as_secs();
        if secs(g.retry_window) < secs(g.delay) {
            p.at(
                &["greylist", "retry_window"],
                format!(
                    "retry_window ({}) must not be shorter than delay ({})",
                    g.retry_window, g.delay
                ),
            );
        }
        for (name, d) in [
            ("delay", g.delay),
            ("retry_window", g.retry_window),
            ("max_age", g.max_age),
            ("auto_allow_lifetime", g.auto_allow_lifetime),
            ("new_triplets_window", g.new_triplets_window),
        ] {
            if d.0.subsec_nanos() != 0 {
                p.at(
                    &["greylist", name],
                    format!("{name} ({d}) must be whole seconds"),
                );
            }
        }
        if g.auto_allow_after > 0 && secs(g.auto_allow_lifetime) == 0 {
            p.at(
                &["greylist", "auto_allow_lifetime"],
                "auto_allow_lifetime must be positive (auto_allow_after = 0 turns auto-allow off)"
                    .into(),
            );
        }
        if g.new_triplets_per_client > 0 && secs(g.new_triplets_window) == 0 {
            p.at(
                &["greylist", "new_triplets_window"],
                "new_triplets_window must be positive (new_triplets_per_client = 0 turns the \
                 limit off)"
                    .into(),
            );
        }
        if secs(g.max_age) == 0 {
            p.at(&["greylist", "max_age"], "max_age must be positive".into());
        }
        if g.ipv4_prefix > 32 {
            p.at(
                &["greylist", "ipv4_prefix"],
                format!("ipv4_prefix {} is over 32", g.ipv4_prefix),
            );
        }
        if g.ipv6_prefix > 128 {
            p.at(
                &["greylist", "ipv6_prefix"],
                format!("ipv6_prefix {} is over 128", g.ipv6_prefix),
            );
        }
        if g.recipient_delimiter
            .chars()
            .any(|c| c == '@' || c.is_whitespace())
        {
            p.at(
                &["greylist", "recipient_delimiter"],
                "recipient_delimiter must not contain '@' or spaces".into(),
            );
        }
        Policy {
            delay: secs(g.delay),
            retry_window: secs(g.retry_window),
            max_age: secs(g.max_age),
            auto_allow_after: g.auto_allow_after,
            auto_allow_lifetime: secs(g.auto_allow_lifetime),
            ipv4_prefix: g.ipv4_prefix.min(32),
            ipv6_prefix: g.ipv6_prefix.min(128),
            recipient_delimiter: g.recipient_delimiter.clone(),
            new_triplets_per_client: g.new_triplets_per_client,
            new_triplets_window: secs(g.new_triplets_window),
        }
    }
}
