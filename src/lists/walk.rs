//! The walk of one domain's SPF record: `include:` and `redirect=` followed, the ranges of
//! `ip4:`/`ip6:`/`a`/`mx` collected, RFC 7208's limits kept (10 terms that query DNS, 2
//! void lookups, 10 MX names per `mx`) and loops refused — each an error for the domain,
//! as it would be a `permerror` for a receiver checking it.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::record::{self, DomainSpec, Expand, Mechanism, Qualifier, RecordError, Term};

/// Terms that query DNS, per domain checked (RFC 7208 4.6.4).
pub const MAX_LOOKUPS: usize = 10;
/// Lookups that find nothing (NXDOMAIN or no records), per domain checked.
pub const MAX_VOID_LOOKUPS: usize = 2;
/// MX names one `mx` mechanism may look up.
pub const MAX_MX_NAMES: usize = 10;

/// One range and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub net: IpNet,
    /// The domain whose record named it (the configured domain or one it includes).
    pub record: String,
}

/// What the walk of one domain gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walked {
    pub ranges: Vec<Found>,
    /// DNS-querying terms evaluated.
    pub lookups: usize,
    pub void_lookups: usize,
    /// Terms left out because no list can hold them (`ptr`, `exists`, client macros).
    pub skipped: Vec<String>,
}

/// Why a domain gave no list: the first problem met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("{domain} has no SPF record")]
    NoRecord { domain: String },
    #[error("{domain} has {count} SPF records (RFC 7208 4.5: permerror)")]
    Multiple { domain: String, count: usize },
    #[error("{domain}'s SPF record is invalid: {error}")]
    Syntax { domain: String, error: RecordError },
    #[error(
        "more than {MAX_LOOKUPS} DNS lookups (RFC 7208 4.6.4), the 11th at {at} in {domain}'s record"
    )]
    TooManyLookups { domain: String, at: String },
    #[error(
        "more than {MAX_VOID_LOOKUPS} lookups that found nothing (RFC 7208 4.6.4), the last for {name}"
    )]
    TooManyVoid { name: String },
    #[error("{domain}: mx finds {count} MX names, more than {MAX_MX_NAMES} (RFC 7208 4.6.4)")]
    TooManyMx { domain: String, count: usize },
    #[error("include loop: {}", chain.join(" -> "))]
    Loop { chain: Vec<String> },
    #[error("{domain}: {term} names {name:?}, not a domain")]
    BadName {
        domain: String,
        term: String,
        name: String,
    },
    #[error("DNS lookup of {name} ({kind}) failed: {error}")]
    Dns {
        name: String,
        kind: &'static str,
        error: String,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl WalkError {
    /// Whether the error is the domain's own (its records break RFC 7208) rather than
    /// DNS trouble that the next run may not meet.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, WalkError::Dns { .. } | WalkError::Timeout(_))
    }
}

/// Walks `domain`'s SPF record with `resolver`.
pub async fn walk(resolver: &TokioResolver, domain: &str) -> Result<Walked, WalkError> {
    let mut w = Walker {
        resolver,
        top: domain,
        chain: Vec::new(),
        out: Walked::default(),
    };
    w.check_host(domain, true).await?;
    Ok(w.out)
}

struct Walker<'a> {
    resolver: &'a TokioResolver,
    /// The configured domain (`%{o}`).
    top: &'a str,
    /// Domains whose records are being walked, outermost first (for loops).
    chain: Vec<String>,
    out: Walked,
}

/// Addresses found, or a void lookup.
enum Answer<T> {
    Records(Vec<T>),
    Void,
}

impl Walker<'_> {
    /// Walks the record of `domain`; `collect`: whether a match there lets the client
    /// pass (false inside `-include:` and the like, which still count).
    fn check_host<'s>(
        &'s mut self,
        domain: &'s str,
        collect: bool,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), WalkError>> + Send + 's>> {
        Box::pin(async move {
            if self.chain.iter().any(|d| d == domain) {
                let mut chain = self.chain.clone();
                chain.push(domain.to_string());
                return Err(WalkError::Loop { chain });
            }
            let rec = self.record_of(domain).await?;
            self.chain.push(domain.to_string());
            for term in &rec.terms {
                let Term::Directive(q, m) = term else {
                    continue;
                };
                if m.queries_dns() {
                    self.count(domain, m)?;
                }
                let pass = collect && *q == Qualifier::Pass;
                self.mechanism(domain, m, pass).await?;
            }
            if let Some(target) = rec.redirect() {
                self.count_term(domain, &format!("redirect={target}"))?;
                match self.expand(domain, target, "redirect")? {
                    Some(t) => self.check_host(&t, collect).await?,
                    None => self
                        .out
                        .skipped
                        .push(format!("{domain}: redirect={target} depends on the client")),
                }
            }
            self.chain.pop();
            Ok(())
        })
    }

    fn count(&mut self, domain: &str, m: &Mechanism) -> Result<(), WalkError> {
        let name = match m {
            Mechanism::Include(d) => format!("include:{d}"),
            Mechanism::A { .. } => "a".into(),
            Mechanism::Mx { .. } => "mx".into(),
            Mechanism::Ptr(_) => "ptr".into(),
            Mechanism::Exists(d) => format!("exists:{d}"),
            _ => "?".into(),
        };
        self.count_term(domain, &name)
    }

    fn count_term(&mut self, domain: &str, term: &str) -> Result<(), WalkError> {
        self.out.lookups += 1;
        if self.out.lookups > MAX_LOOKUPS {
            return Err(WalkError::TooManyLookups {
                domain: domain.to_string(),
                at: term.to_string(),
            });
        }
        Ok(())
    }

    fn void(&mut self, name: &str) -> Result<(), WalkError> {
        self.out.void_lookups += 1;
        if self.out.void_lookups > MAX_VOID_LOOKUPS {
            return Err(WalkError::TooManyVoid {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// `spec` expanded for `domain`'s record, `None` when it depends on the client.
    fn expand(
        &self,
        domain: &str,
        spec: &DomainSpec,
        term: &str,
    ) -> Result<Option<String>, WalkError> {
        match spec.expand(domain, self.top) {
            Ok(name) => Ok(Some(name)),
            Err(Expand::Dynamic(_)) => Ok(None),
            Err(Expand::NotADomain(name)) => Err(WalkError::BadName {
                domain: domain.to_string(),
                term: format!("{term}:{spec}"),
                name,
            }),
        }
    }

    async fn mechanism(
        &mut self,
        domain: &str,
        m: &Mechanism,
        pass: bool,
    ) -> Result<(), WalkError> {
        let add = |out: &mut Walked, net: IpNet| {
            if pass {
                out.ranges.push(Found {
                    net,
                    record: domain.to_string(),
                });
            }
        };
        match m {
            // `all` matches every client: never a range for a list.
            Mechanism::All => {}
            Mechanism::Ip4(n) => add(&mut self.out, IpNet::V4(*n)),
            Mechanism::Ip6(n) => add(&mut self.out, IpNet::V6(*n)),
            Mechanism::Include(spec) => match self.expand(domain, spec, "include")? {
                // RFC 7208 5.2: an included domain without a record is a permerror.
                Some(target) => self.check_host(&target, pass).await?,
                None => self
                    .out
                    .skipped
                    .push(format!("{domain}: include:{spec} depends on the client")),
            },
            Mechanism::A {
                domain: spec,
                v4,
                v6,
            } => {
                let target = match spec {
                    Some(s) => self.expand(domain, s, "a")?,
                    None => Some(domain.to_string()),
                };
                let Some(target) = target else {
                    self.out
                        .skipped
                        .push(format!("{domain}: an a mechanism depends on the client"));
                    return Ok(());
                };
                match self.addresses(&target).await? {
                    Answer::Void => self.void(&target)?,
                    Answer::Records(ips) => {
                        for ip in ips {
                            add(&mut self.out, with_prefix(ip, *v4, *v6));
                        }
                    }
                }
            }
            Mechanism::Mx {
                domain: spec,
                v4,
                v6,
            } => {
                let target = match spec {
                    Some(s) => self.expand(domain, s, "mx")?,
                    None => Some(domain.to_string()),
                };
                let Some(target) = target else {
                    self.out
                        .skipped
                        .push(format!("{domain}: an mx mechanism depends on the client"));
                    return Ok(());
                };
                let names = match self.mx(&target).await? {
                    Answer::Void => return self.void(&target),
                    Answer::Records(names) => names,
                };
                if names.len() > MAX_MX_NAMES {
                    return Err(WalkError::TooManyMx {
                        domain: target,
                        count: names.len(),
                    });
                }
                for name in names {
                    if let Answer::Records(ips) = self.addresses(&name).await? {
                        for ip in ips {
                            add(&mut self.out, with_prefix(ip, *v4, *v6));
                        }
                    }
                }
            }
            Mechanism::Ptr(_) => self.out.skipped.push(format!(
                "{domain}: ptr depends on the client's reverse DNS (and is deprecated)"
            )),
            Mechanism::Exists(spec) => self
                .out
                .skipped
                .push(format!("{domain}: exists:{spec} depends on the client")),
        }
        Ok(())
    }

    /// The one SPF record of `domain`.
    async fn record_of(&mut self, domain: &str) -> Result<record::Record, WalkError> {
        let fqdn = format!("{domain}.");
        let lookup = match self.resolver.txt_lookup(fqdn.as_str()).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() => {
                return Err(WalkError::NoRecord {
                    domain: domain.to_string(),
                });
            }
            Err(e) => return Err(dns_error(domain, "TXT", &e)),
        };
        let records: Vec<String> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => {
                    // RFC 7208 3.3: the strings of one record are joined without spaces.
                    let mut joined = Vec::new();
                    for s in txt.txt_data.iter() {
                        if joined.len() + s.len() > record::MAX_RECORD_LEN + 1 {
                            break;
                        }
                        joined.extend_from_slice(s);
                    }
                    Some(String::from_utf8_lossy(&joined).into_owned())
                }
                _ => None,
            })
            .filter(|t| record::is_spf(t))
            .collect();
        match records.len() {
            0 => Err(WalkError::NoRecord {
                domain: domain.to_string(),
            }),
            1 => record::parse(&records[0]).map_err(|error| WalkError::Syntax {
                domain: domain.to_string(),
                error,
            }),
            count => Err(WalkError::Multiple {
                domain: domain.to_string(),
                count,
            }),
        }
    }

    /// The A and AAAA records of `name`; void when neither has any.
    async fn addresses(&self, name: &str) -> Result<Answer<IpAddr>, WalkError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let mut ips = Vec::new();
        match self.resolver.ipv4_lookup(fqdn.as_str()).await {
            Ok(l) => ips.extend(l.answers().iter().filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(dns_error(name, "A", &e)),
        }
        match self.resolver.ipv6_lookup(fqdn.as_str()).await {
            Ok(l) => ips.extend(l.answers().iter().filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(dns_error(name, "AAAA", &e)),
        }
        Ok(if ips.is_empty() {
            Answer::Void
        } else {
            Answer::Records(ips)
        })
    }

    /// The MX host names of `name`.
    async fn mx(&self, name: &str) -> Result<Answer<String>, WalkError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(l) => {
                let names: Vec<String> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(mx.exchange.to_string()),
                        _ => None,
                    })
                    // RFC 7505 null MX (".") names no host.
                    .filter(|n| n != ".")
                    .collect();
                Ok(if names.is_empty() {
                    Answer::Void
                } else {
                    Answer::Records(names)
                })
            }
            Err(e) if e.is_no_records_found() => Ok(Answer::Void),
            Err(e) => Err(dns_error(name, "MX", &e)),
        }
    }
}

fn dns_error(name: &str, kind: &'static str, e: &NetError) -> WalkError {
    WalkError::Dns {
        name: name.to_string(),
        kind,
        error: e.to_string(),
    }
}

/// The network of `ip` with the mechanism's prefix length for its family.
fn with_prefix(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    match ip {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, v4).map(|n| n.trunc()).unwrap_or(a.into())),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, v6).map(|n| n.trunc()).unwrap_or(a.into())),
    }
}
