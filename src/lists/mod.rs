//! `greygate lists update`: client allow lists built from the big senders' own SPF records
//! (what postwhite does for Postfix). Each configured domain's record is walked
//! ([`walk`]: `include:` and `redirect=` followed, RFC 7208's limits kept), the ranges of
//! every domain merged and de-duplicated ([`merge`]) and written atomically ([`write()`])
//! as a client allow-list file, each range with its source domains as a comment. The
//! daemon reads that file (`[lists] output`) as one of its client allow lists, so the
//! ranges skip greylisting (rule `allow`) from the next reload on.
//!
//! A domain that fails (DNS trouble, or a record that breaks RFC 7208) keeps the ranges
//! the previous file gave it ([`previous_ranges`]), so that one retired or broken name
//! does not freeze the others' updates; when every domain fails, nothing is written and
//! the previous file stays.

pub mod domains;
pub mod record;
pub mod walk;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use ipnet::IpNet;

use crate::dns::{DnsSetupError, resolver_config};
use crate::engine::allow::canonical_net;

pub use walk::{Found, WalkError, Walked};

/// Where the list goes, and where the daemon looks for it, unless `[lists] output` says
/// otherwise.
pub const DEFAULT_OUTPUT: &str = "/var/lib/greygate/big-senders";

/// Most domains one update asks about.
pub const MAX_DOMAINS: usize = 1000;

/// Ranges wider than these (fewer prefix bits) are left out: no mail provider sends from
/// a whole /8 (IPv4) or /16 (IPv6), and such an entry in an SPF record (`ip4:0.0.0.0/1`
/// has been seen) is a mistake that would exempt a large part of the Internet.
pub const MIN_PREFIX_V4: u8 = 8;
pub const MIN_PREFIX_V6: u8 = 16;

/// Domains walked at once.
const CONCURRENCY: usize = 8;

/// The checked `[lists]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListsSettings {
    /// Lower-case domain names without a trailing dot, each once.
    pub domains: Vec<String>,
    /// The allow-list file `update` writes and the daemon reads when it exists.
    pub output: PathBuf,
}

impl Default for ListsSettings {
    fn default() -> Self {
        ListsSettings {
            domains: domains::BUILT_IN
                .iter()
                .map(|(d, _)| d.to_string())
                .collect(),
            output: PathBuf::from(DEFAULT_OUTPUT),
        }
    }
}

/// A resolver asking `server` (or the system's resolvers), each query tried twice within
/// 5 s; the hosts file is not read (SPF names are DNS names).
pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, DnsSetupError> {
    let (config, mut opts) = resolver_config(server)?;
    opts.timeout = Duration::from_secs(5);
    opts.attempts = 2;
    opts.use_hosts_file = ResolveHosts::Never;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| DnsSetupError::new(e.to_string()))
}

/// One domain's walk and what came of it.
#[derive(Debug, Clone)]
pub struct DomainResult {
    pub domain: String,
    pub walked: Result<Walked, WalkError>,
}

/// Walks every domain (a few at once), each within `timeout`; results in `domains`' order.
pub async fn resolve_all(
    resolver: &TokioResolver,
    domains: &[String],
    timeout: Duration,
) -> Vec<DomainResult> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, d) in domains.iter().enumerate() {
        let (resolver, d, gate) = (resolver.clone(), d.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let walked = tokio::time::timeout(timeout, walk::walk(&resolver, &d))
                .await
                .unwrap_or(Err(WalkError::Timeout(timeout)));
            (i, DomainResult { domain: d, walked })
        });
    }
    let mut out: Vec<Option<DomainResult>> = vec![None; domains.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, r)) = joined {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .zip(domains)
        .map(|(r, d)| {
            r.unwrap_or_else(|| DomainResult {
                domain: d.clone(),
                walked: Err(WalkError::Timeout(timeout)),
            })
        })
        .collect()
}

/// A range of the list and the configured domains whose records gave (part of) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub net: IpNet,
    pub domains: BTreeSet<String>,
}

/// A range found but left out of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooWide {
    pub domain: String,
    pub found: Found,
}

/// Merges the ranges of every domain: IPv4-mapped IPv6 ranges become IPv4, host bits are
/// cleared, ranges inside others and adjacent ranges are joined; each merged range keeps
/// the domains it came from. Ranges wider than [`MIN_PREFIX_V4`]/[`MIN_PREFIX_V6`] are
/// returned apart.
pub fn merge(walked: &[(String, Walked)]) -> (Vec<Range>, Vec<TooWide>) {
    let mut all: Vec<(IpNet, &str)> = Vec::new();
    let mut wide = Vec::new();
    for (domain, w) in walked {
        for f in &w.ranges {
            let net = canonical_net(f.net);
            let too_wide = match net {
                IpNet::V4(n) => n.prefix_len() < MIN_PREFIX_V4,
                IpNet::V6(n) => n.prefix_len() < MIN_PREFIX_V6,
            };
            if too_wide {
                wide.push(TooWide {
                    domain: domain.clone(),
                    found: f.clone(),
                });
            } else {
                all.push((net, domain));
            }
        }
    }
    let nets: Vec<IpNet> = all.iter().map(|(n, _)| *n).collect();
    let mut merged = IpNet::aggregate(&nets);
    merged.sort_by_key(order_key);
    let mut ranges: Vec<Range> = merged
        .into_iter()
        .map(|net| Range {
            net,
            domains: BTreeSet::new(),
        })
        .collect();
    for (net, domain) in all {
        // The merged ranges are disjoint: the one holding `net` starts at or before it.
        let at = ranges.partition_point(|r| order_key(&r.net) <= order_key(&net));
        if let Some(r) = at.checked_sub(1).map(|i| &mut ranges[i])
            && r.net.contains(&net)
        {
            r.domains.insert(domain.to_string());
        }
    }
    (ranges, wide)
}

/// IPv4 before IPv6, then by first address.
fn order_key(n: &IpNet) -> (u8, u128) {
    match n {
        IpNet::V4(v4) => (4, u128::from(u32::from(v4.network()))),
        IpNet::V6(v6) => (6, u128::from(v6.network())),
    }
}

/// A domain whose walk failed in this update, and the ranges the previous file gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub domain: String,
    pub error: String,
    pub kept: Vec<IpNet>,
}

impl Failed {
    /// The kept ranges as a walk, for [`merge`].
    pub fn as_walked(&self) -> (String, Walked) {
        let ranges = self
            .kept
            .iter()
            .map(|&net| Found {
                net,
                record: "the previous list".into(),
            })
            .collect();
        (
            self.domain.clone(),
            Walked {
                ranges,
                ..Walked::default()
            },
        )
    }
}

/// The ranges that a file written by [`render`] gave `domain`: every range line whose
/// comment names it. Lines that are not such a range line are passed over.
pub fn previous_ranges(previous: &str, domain: &str) -> Vec<IpNet> {
    previous
        .lines()
        .filter_map(|line| {
            let (net, comment) = line.split_once('#')?;
            let net: IpNet = net.trim().parse().ok()?;
            comment
                .split(',')
                .any(|d| d.trim() == domain)
                .then_some(net)
        })
        .collect()
}

/// The allow-list file: a header (when, from which domains, how many ranges each, which
/// failed and kept their previous ranges), then one range a line with all its source
/// domains as a comment (what [`previous_ranges`] reads back).
pub fn render(
    ranges: &[Range],
    walked: &[(String, Walked)],
    failed: &[Failed],
    written_at: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Client ranges of big senders, from their own SPF records: written by\n\
         # `greygate lists update` at {written_at}. The next update replaces this file;\n\
         # change the domains in [lists] of greygate.toml rather than editing it.\n\
         # Clients in these ranges are not greylisted (rule allow).\n#"
    );
    for (domain, w) in walked {
        let _ = writeln!(
            s,
            "# {domain}: {} ranges, {} DNS lookups",
            w.ranges.len(),
            w.lookups
        );
    }
    for f in failed {
        let _ = writeln!(
            s,
            "# {}: update failed ({}); {} ranges kept from the previous list",
            f.domain,
            f.error,
            f.kept.len()
        );
    }
    let _ = writeln!(s, "#\n# {} ranges after merging", ranges.len());
    for r in ranges {
        let names: Vec<&str> = r.domains.iter().map(String::as_str).collect();
        let _ = writeln!(s, "{}  # {}", r.net, names.join(", "));
    }
    s
}

/// Replaces `path` with `text` in one step: written to a temporary file beside it,
/// flushed to disk, then renamed over it (readers see the old file or the new, never
/// half of one). The directory is made when missing.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "list".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
