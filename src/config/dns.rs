//! `[identity]`, `[dns]`, `[dnswl]` and `[dnsbl]`: which client identity a key names and
//! the lookups that give identities and DNS list facts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Problems, RawConfig};
use crate::dns::DnsSettings;
use crate::dur::Dur;
use crate::engine::{IdentityKind, Policy, Selective, VerifiedTreatment};

/// `[identity]`: which client identity a greylisting key names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawIdentity {
    /// Identities tried in order, first that holds wins: `spf` (the sender's SPF passes for
    /// the client IP), `org` (registrable domain of a forward-confirmed, non-dynamic host
    /// name), `prefix` (the IP group; always the last resort, named or not). `spf` and
    /// `org` need `[dns] enabled`; without DNS facts every client is its prefix.
    pub order: Vec<IdentityKind>,
    /// Delay of a verified identity (`spf` or `org`) that no `[dnsbl]` zone lists (every
    /// zone must have answered); default: `[greylist] delay`. 0 still wants one retry.
    pub verified_delay: Option<Dur>,
    /// Do not greylist a verified identity that no `[dnsbl]` zone lists.
    pub verified_skip: bool,
}

impl Default for RawIdentity {
    fn default() -> Self {
        RawIdentity {
            order: crate::engine::identity::DEFAULT_ORDER.to_vec(),
            verified_delay: None,
            verified_skip: false,
        }
    }
}

/// `[dns]`: the lookups that give identities and DNS list facts. DNS trouble never defers
/// mail by itself: what is not known within `budget` is treated as not found.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDns {
    /// Look up SPF (and, with `ptr_lookup`, forward-confirmed reverse DNS) and the
    /// `[dnswl]`/`[dnsbl]` zones. On by default: big senders are keyed by `spf:`/`org:`.
    pub enabled: bool,
    /// Most time all lookups of one request may take together.
    pub budget: Dur,
    /// DNS server (`IP` or `IP:port`); default: the system's resolver configuration.
    pub resolver: Option<String>,
    /// Answers kept in memory (an SPF result per sender and address, a host name per
    /// address, a list answer per zone and address, and as many sender domains that
    /// publish no SPF record); 0 keeps none.
    pub cache_size: usize,
    /// Look up the client's host name (PTR, then A/AAAA) when the front end gave none (a
    /// milter without `{client_ptr}`, `explain` without `--name`). Off: `org:` comes only
    /// from the name the MTA verified, and costs no query.
    pub ptr_lookup: bool,
}

impl Default for RawDns {
    fn default() -> Self {
        RawDns {
            enabled: true,
            budget: Dur(Duration::from_millis(300)),
            resolver: None,
            cache_size: 200_000,
            ptr_lookup: false,
        }
    }
}

/// `[dnswl]`: DNS allow lists; a client they list is not greylisted (rule `dnswl`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDnswl {
    /// Zones queried with the client IP, e.g. `list.dnswl.org`.
    pub zones: Vec<String>,
}

/// `[dnsbl]`: DNS block lists; a client they list is greylisted, for `delay`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDnsbl {
    /// Zones queried with the client IP, e.g. `zen.spamhaus.org`.
    pub zones: Vec<String>,
    /// Delay of a listed client; default: `[greylist] delay`.
    pub delay: Option<Dur>,
}

/// Longest `[dns] budget`: a policy client (Postfix waits 100 s) must never wait on DNS
/// for long, and the store still needs its time after the lookups.
const MAX_DNS_BUDGET: Duration = Duration::from_secs(10);

/// A DNS list zone as written: lower-case LDH labels, at least two of them.
fn check_zone(zone: &str) -> Result<String, String> {
    let z = zone.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = z.len() <= 253
        && z.split('.').count() >= 2
        && z.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(z)
    } else {
        Err(format!(
            "{zone:?} is not a DNS zone name such as \"zen.spamhaus.org\""
        ))
    }
}

/// `IP` or `IP:port` (port 53 by default).
fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not IP or IP:port (e.g. 127.0.0.1:53, [::1]:53)"))
}

impl RawConfig {
    /// `[identity]`, `[dns]`, `[dnswl]` and `[dnsbl]` into the engine's selective settings
    /// and the DNS layer's.
    pub(super) fn check_dns(
        &self,
        policy: &Policy,
        p: &mut Problems<'_>,
    ) -> (Selective, DnsSettings) {
        let id = &self.identity;
        let mut order = Vec::new();
        for (i, kind) in id.order.iter().enumerate() {
            let at = i.to_string();
            if order.contains(kind) {
                p.at(
                    &["identity", "order", &at],
                    format!("{kind:?} appears twice", kind = kind.as_str()),
                );
            } else if order.last() == Some(&IdentityKind::Prefix) {
                p.at(
                    &["identity", "order", &at],
                    format!(
                        "{:?} comes after \"prefix\", which always decides: it would never be used",
                        kind.as_str()
                    ),
                );
            } else {
                order.push(*kind);
            }
        }
        if order.last() != Some(&IdentityKind::Prefix) {
            order.push(IdentityKind::Prefix);
        }

        // A delay longer than the retry window could never be served: the pending record
        // dies first, and the client would be deferred for ever.
        let mut delay = |path: &[&str], d: Option<Dur>| -> Option<u64> {
            let d = d?;
            if d.0.subsec_nanos() != 0 {
                p.at(path, format!("{d} must be whole seconds"));
            }
            let secs = d.0.as_secs();
            if secs > policy.retry_window {
                p.at(
                    path,
                    format!(
                        "{d} is longer than [greylist] retry_window ({}s): a retry could never pass",
                        policy.retry_window
                    ),
                );
            }
            Some(secs)
        };
        let verified_delay = delay(&["identity", "verified_delay"], id.verified_delay);
        let dnsbl_delay = delay(&["dnsbl", "delay"], self.dnsbl.delay);
        let verified = match (id.verified_skip, verified_delay) {
            (true, Some(_)) => {
                p.at(
                    &["identity", "verified_delay"],
                    "verified_delay and verified_skip = true exclude each other".into(),
                );
                VerifiedTreatment::Skip
            }
            (true, None) => VerifiedTreatment::Skip,
            (false, Some(d)) => VerifiedTreatment::Delay(d),
            (false, None) => VerifiedTreatment::Greylist,
        };

        let d = &self.dns;
        if d.budget.0.is_zero() || d.budget.0 > MAX_DNS_BUDGET {
            p.at(
                &["dns", "budget"],
                format!(
                    "budget must be positive and at most {}",
                    Dur(MAX_DNS_BUDGET)
                ),
            );
        }
        let resolver = d.resolver.as_deref().and_then(|r| {
            parse_resolver(r)
                .map_err(|e| p.at(&["dns", "resolver"], e))
                .ok()
        });
        let mut zones = |table: &str, list: &[String]| -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for (i, z) in list.iter().enumerate() {
                match check_zone(z) {
                    Ok(z) if out.contains(&z) => {
                        p.at(
                            &[table, "zones", &i.to_string()],
                            format!("{z:?} appears twice"),
                        );
                    }
                    Ok(z) => out.push(z),
                    Err(e) => p.at(&[table, "zones", &i.to_string()], e),
                }
            }
            out
        };
        let dnswl_zones = zones("dnswl", &self.dnswl.zones);
        let dnsbl_zones = zones("dnsbl", &self.dnsbl.zones);
        // Settings that only DNS facts can trigger would silently do nothing.
        if !d.enabled {
            let unused: [(&[&str], bool); 6] = [
                (&["dns", "ptr_lookup"], d.ptr_lookup),
                (&["dnswl", "zones"], !dnswl_zones.is_empty()),
                (&["dnsbl", "zones"], !dnsbl_zones.is_empty()),
                // The SMTP front's pregreet suspects serve it as well, DNS or not.
                (
                    &["dnsbl", "delay"],
                    dnsbl_delay.is_some() && self.smtp.listen.is_empty(),
                ),
                (&["identity", "verified_delay"], verified_delay.is_some()),
                (&["identity", "verified_skip"], id.verified_skip),
            ];
            for (path, set) in unused {
                if set {
                    p.at(
                        path,
                        format!(
                            "{} has no effect unless [dns] enabled = true",
                            path.join(".")
                        ),
                    );
                }
            }
        }
        let selective = Selective {
            identity_order: order,
            dnsbl_delay,
            verified,
        };
        let dns = DnsSettings {
            enabled: d.enabled,
            budget: d.budget.0,
            resolver,
            cache_size: d.cache_size,
            ptr_lookup: d.ptr_lookup,
            dnswl_zones,
            dnsbl_zones,
        };
        (selective, dns)
    }
}
