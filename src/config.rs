//! Configuration in two stages: serde structs with documented defaults (`RawConfig`), then
//! `validate()` into a checked `Config` with allow lists loaded. Errors name the file and line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::engine::{
    AllowLists, Engine, IdentityKind, Mode, Origin, Policy, Selective, VerifiedTreatment,
};
use crate::proto::policy::Limits;
use crate::server::ListenAddr;

/// Most connections one listener may hold (far above what one MTA opens).
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Where greygate looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/greygate/greygate.toml";
/// Where the embedded store lives when neither config nor `--db` says otherwise.
pub const DEFAULT_DB_PATH: &str = "/var/lib/greygate/greygate.redb";

/// A duration written as whole seconds (`300`) or with a unit (`"5m"`, `"2d"`, `"500ms"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: whole seconds (300) or text with a unit (\"5m\", \"2d\", \"500ms\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|v| Dur(Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("duration {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(Dur(Duration::from_secs(secs)));
        }
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|e| format!("bad duration {s:?} ({e}); write e.g. 300, \"5m\", \"2d\""))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// The configuration file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// `enforce` defers unknown triplets; `learn` records and logs but always accepts.
    pub mode: Mode,
    /// Host name in the `X-Greylist` header; default: the system's host name.
    pub hostname: Option<String>,
    pub greylist: RawGreylist,
    pub policy: RawPolicyServer,
    pub milter: RawMilter,
    pub store: RawStore,
    pub allow: RawAllow,
    pub admin: RawAdmin,
    pub identity: RawIdentity,
    pub dns: RawDns,
    pub dnswl: RawDnswl,
    pub dnsbl: RawDnsbl,
    pub log: RawLog,
}

/// `[admin]`: the HTTP API, Prometheus `/metrics` and the dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    /// TCP addresses to serve on (default `127.0.0.1:9025`); `[]` disables the admin
    /// listener. When the default address is taken (another greygate on this host) the
    /// daemon runs without it and says so; an address written here must be free.
    pub listen: Option<Vec<String>>,
    /// Bearer token that changes (allow/deny entries, purge, reload) must carry.
    pub token: String,
    /// File whose first line is the token; created with a random token (mode 0600) when
    /// missing. Default: `admin.token` beside the embedded store, or in
    /// /var/lib/greygate for the other backends; none for the memory store.
    pub token_file: Option<PathBuf>,
    /// Also require the token for reads (stats, entries, explain, metrics, dashboard data).
    pub token_for_reads: bool,
    /// File that keeps runtime allow/deny entries across restarts. Default: beside the
    /// embedded store (`<path>.entries.json`), /var/lib/greygate/runtime-entries.json for
    /// redis and postgres, none (memory only) for the memory store.
    pub entries_file: Option<PathBuf>,
    /// Concurrent admin connections; more are closed at once.
    pub max_connections: usize,
    /// Longest an admin request (headers included) may take.
    pub request_timeout: Dur,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: None,
            token: String::new(),
            token_file: None,
            token_for_reads: false,
            entries_file: None,
            max_connections: 64,
            request_timeout: Dur(Duration::from_secs(10)),
        }
    }
}

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

/// The default admin address (a port browsers do not block).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9025";

/// `[dns]`: the lookups that give identities and DNS list facts. DNS trouble never defers
/// mail by itself: what is not known within `budget` is treated as not found.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDns {
    /// Look up SPF, forward-confirmed reverse DNS and the `[dnswl]`/`[dnsbl]` zones.
    pub enabled: bool,
    /// Most time all lookups of one request may take together.
    pub budget: Dur,
    /// DNS server (`IP` or `IP:port`); default: the system's resolver configuration.
    pub resolver: Option<String>,
    /// Answers kept in memory; 0 keeps none.
    pub cache_size: usize,
}

impl Default for RawDns {
    fn default() -> Self {
        RawDns {
            enabled: false,
            budget: Dur(Duration::from_millis(300)),
            resolver: None,
            cache_size: 10_000,
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

/// DNS settings after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub enabled: bool,
    pub budget: Duration,
    /// `None`: the system's resolver configuration.
    pub resolver: Option<SocketAddr>,
    pub cache_size: usize,
    /// Lower-case zone names, without a trailing dot.
    pub dnswl_zones: Vec<String>,
    pub dnsbl_zones: Vec<String>,
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

/// `[milter]`: the milter listener(s) for Sendmail and Postfix `smtpd_milters`. The
/// deferral text is `[policy] defer_text`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMilter {
    /// Addresses to listen on (none by default): `127.0.0.1:10024`, `unix:/path`.
    pub listen: Vec<String>,
    /// SMTP code and enhanced status code of a deferral, e.g. `451 4.7.1`.
    pub reply_code: String,
    /// Concurrent connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Close a connection whose MTA sends nothing for this long.
    pub idle_timeout: Dur,
    /// Close a connection that takes this long to finish a frame or to take a reply.
    pub io_timeout: Dur,
    /// Largest frame in bytes.
    pub max_frame: usize,
}

impl Default for RawMilter {
    fn default() -> Self {
        RawMilter {
            listen: Vec::new(),
            reply_code: "451 4.7.1".into(),
            max_connections: 512,
            idle_timeout: Dur(Duration::from_secs(600)),
            io_timeout: Dur(Duration::from_secs(10)),
            max_frame: crate::proto::milter::DEFAULT_MAX_FRAME,
        }
    }
}

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
        }
    }
}

/// `[policy]`: the Postfix policy delegation listener(s).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPolicyServer {
    /// Addresses to listen on: `127.0.0.1:10023`, `[::1]:10023`, `unix:/path/to/socket`.
    pub listen: Vec<String>,
    /// How a deferral is answered: `DEFER_IF_PERMIT`, `DEFER`, or an explicit 4xx code such as `451 4.7.1`.
    pub defer_action: String,
    /// Text of the deferral; `{remaining}` is replaced by the seconds until a retry passes.
    pub defer_text: String,
    /// File mode of Unix sockets (octal).
    pub socket_mode: String,
    /// Concurrent connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Close a connection with no request for this long.
    pub idle_timeout: Dur,
    /// Close a connection that takes this long to finish a started request or to take a reply.
    pub io_timeout: Dur,
    /// Longest request line in bytes.
    pub max_line_length: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
}

impl Default for RawPolicyServer {
    fn default() -> Self {
        let l = Limits::default();
        RawPolicyServer {
            listen: vec!["127.0.0.1:10023".into()],
            defer_action: "DEFER_IF_PERMIT".into(),
            defer_text: "Greylisted, please try again in {remaining} seconds".into(),
            socket_mode: "0666".into(),
            max_connections: 512,
            idle_timeout: Dur(Duration::from_secs(600)),
            io_timeout: Dur(Duration::from_secs(10)),
            max_line_length: l.max_line,
            max_attributes: l.max_attributes,
        }
    }
}

/// `[store]`: the trust database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStore {
    /// `embedded` (one crash-safe file), `memory` (lost on restart), or a database shared by
    /// several MX hosts: `redis` or `postgres` (at `url`).
    pub backend: String,
    /// File of the embedded store.
    pub path: PathBuf,
    /// Server of the `redis` or `postgres` backend: `redis://[[user]:password@]host[:port][/db]`,
    /// `redis+unix:///path/to/socket`, `postgres://user[:password]@host[:port]/database`.
    pub url: String,
    /// Most connections to the `postgres` server (the `redis` backend multiplexes one).
    pub pool_size: usize,
    /// How long one connection attempt to a `redis` or `postgres` server may take.
    pub connect_timeout: Dur,
    /// How often the embedded store commits changes; a hard kill loses at most this much.
    pub flush_interval: Dur,
    /// A store answer slower than this counts as a store failure.
    pub timeout: Dur,
    /// On store failure: `open` accepts the mail (and says so), `closed` defers it with 4.3.0.
    pub fail_mode: FailMode,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "embedded".into(),
            path: DEFAULT_DB_PATH.into(),
            url: String::new(),
            pool_size: 16,
            connect_timeout: Dur(Duration::from_secs(2)),
            flush_interval: Dur(Duration::from_secs(1)),
            timeout: Dur(Duration::from_secs(1)),
            fail_mode: FailMode::Open,
        }
    }
}

/// What to answer when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

/// `[allow]`: static allow lists, inline and in files (one entry per line, `#` comments).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAllow {
    /// Client IPs, CIDR networks, host names, `.suffix`es and `/regex/`es.
    pub clients: Vec<String>,
    pub client_files: Vec<PathBuf>,
    /// Recipients: `user@domain`, `@domain`, `user@`.
    pub recipients: Vec<String>,
    pub recipient_files: Vec<PathBuf>,
    /// Senders, same forms as recipients. Empty by default: senders are easily forged.
    pub senders: Vec<String>,
    pub sender_files: Vec<PathBuf>,
}

impl Default for RawAllow {
    fn default() -> Self {
        RawAllow {
            clients: Vec::new(),
            client_files: Vec::new(),
            // RFC 5321 wants postmaster reachable; abuse reports must not wait either.
            recipients: vec!["postmaster@".into(), "abuse@".into()],
            recipient_files: Vec::new(),
            senders: Vec::new(),
            sender_files: Vec::new(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// `error`, `warn`, `info` (one line per decision), `debug`; or a tracing filter.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// How a deferral is spelled in a policy reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferAction {
    DeferIfPermit,
    Defer,
    /// An explicit reply code, e.g. `451 4.7.1`.
    Code(String),
}

impl DeferAction {
    /// The reply action for `text`, with `dsn` overriding the enhanced status code of an
    /// explicit code (used for 4.3.0 on store failure).
    pub fn reply(&self, text: &str, dsn: Option<&str>) -> String {
        let mut out = String::with_capacity(text.len() + 24);
        self.write_reply(&mut out, dsn, |out| out.push_str(text));
        out
    }

    /// [`DeferAction::reply`] into `out`, the text written by `text` (the policy front end
    /// fills in `{remaining}` while writing, without a copy of the text first).
    pub fn write_reply(&self, out: &mut String, dsn: Option<&str>, text: impl FnOnce(&mut String)) {
        let action = match (self, dsn) {
            (DeferAction::DeferIfPermit, _) => "DEFER_IF_PERMIT",
            (DeferAction::Defer, _) => "DEFER",
            (DeferAction::Code(c), None) => c,
            (DeferAction::Code(c), Some(_)) => c.split_whitespace().next().unwrap_or("451"),
        };
        out.push_str(action);
        if let Some(d) = dsn {
            out.push(' ');
            out.push_str(d);
        }
        out.push(' ');
        text(out);
    }
}

impl FromStr for DeferAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.to_ascii_uppercase().as_str() {
            "DEFER_IF_PERMIT" => return Ok(DeferAction::DeferIfPermit),
            "DEFER" => return Ok(DeferAction::Defer),
            _ => {}
        }
        let mut parts = s.split_whitespace();
        let code = parts.next().unwrap_or("");
        let dsn = parts.next();
        let code_ok =
            // 421 would end the whole SMTP session; only these defer one recipient.
            matches!(code, "450" | "451" | "452");
        let dsn_ok = dsn.is_none_or(|d| {
            let f: Vec<&str> = d.split('.').collect();
            f.len() == 3
                && f[0] == "4"
                && f.iter()
                    .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        });
        if code_ok && dsn_ok && parts.next().is_none() {
            Ok(DeferAction::Code(
                s.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        } else {
            Err(format!(
                "{s:?} is not DEFER_IF_PERMIT, DEFER or a 4xx code such as \"451 4.7.1\""
            ))
        }
    }
}

/// The store the daemon runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Embedded(PathBuf),
    Redis(ServerStore),
    Postgres(ServerStore),
}

/// Where a shared store's server is and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerStore {
    /// The URL as configured, credentials included: show it with `Display`, which hides
    /// the password.
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

impl ServerStore {
    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Display for ServerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

// Configurations get printed and logged: never the password.
impl fmt::Debug for ServerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerStore")
            .field("url", &self.redacted_url())
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Hides the password of `scheme://user:password@host...` URLs and of `password=...` in
/// PostgreSQL `key=value` connection strings.
fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _password)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{tail}");
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|part| match part.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The checked configuration.
#[derive(Debug)]
pub struct Config {
    pub mode: Mode,
    pub hostname: String,
    pub engine: Engine,
    pub x_greylist_header: bool,
    pub listen: Vec<ListenAddr>,
    pub defer_action: DeferAction,
    pub defer_text: String,
    pub socket_mode: u32,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub io_timeout: Duration,
    pub limits: Limits,
    pub milter_listen: Vec<ListenAddr>,
    /// `451 4.7.1`-style code of milter deferrals.
    pub milter_reply_code: String,
    pub milter_max_connections: usize,
    pub milter_idle_timeout: Duration,
    pub milter_io_timeout: Duration,
    pub milter_max_frame: usize,
    pub store: StoreKind,
    pub flush_interval: Duration,
    pub store_timeout: Duration,
    pub fail_mode: FailMode,
    pub dns: DnsSettings,
    pub log_level: String,
    pub log_json: bool,
    pub admin: AdminConfig,
}

/// Where the admin token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Written in the configuration.
    Inline(String),
    /// Read from (or, by the daemon, created in) this file.
    File(PathBuf),
    /// No token: changes through the API are refused.
    None,
}

/// The checked `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: Vec<SocketAddr>,
    /// True when `listen` was not configured: a busy default port is not fatal.
    pub listen_is_default: bool,
    pub token: TokenSource,
    pub token_for_reads: bool,
    pub entries_file: Option<PathBuf>,
    pub max_connections: usize,
    pub request_timeout: Duration,
}

impl AdminConfig {
    /// The URL a local CLI uses to reach the daemon.
    pub fn url(&self) -> Option<String> {
        self.listen.first().map(|a| {
            let a = match a.ip() {
                ip if ip.is_unspecified() && a.is_ipv4() => {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                }
                ip if ip.is_unspecified() => {
                    SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), a.port())
                }
                _ => *a,
            };
            format!("http://{a}")
        })
    }
}

/// Directory for daemon state beside the store: the embedded file's directory, else
/// /var/lib/greygate; none for the memory store.
fn state_dir(store: &StoreKind) -> Option<PathBuf> {
    match store {
        StoreKind::Memory => None,
        StoreKind::Embedded(path) => Some(
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        ),
        StoreKind::Redis(_) | StoreKind::Postgres(_) => Some(PathBuf::from("/var/lib/greygate")),
    }
}

/// One configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:column` or `file:line` when known, else the file or setting name.
    pub location: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// All problems found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The source of a configuration: its text and where it came from.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Finds `table.key` (or `table.key.INDEX` for an array element) in the TOML text, for
/// pointing at a value that failed validation.
fn locate(src: &Source<'_>, path: &[&str]) -> String {
    let found = toml_edit::Document::parse(src.text).ok().and_then(|doc| {
        let mut item = doc.as_item();
        for (i, p) in path.iter().enumerate() {
            if let (Ok(index), Some(array)) = (p.parse::<usize>(), item.as_array()) {
                let value = array.get(index)?;
                return if i + 1 == path.len() {
                    value.span()
                } else {
                    None
                };
            }
            item = item.get(p)?;
        }
        item.span()
    });
    match found {
        Some(span) => {
            let (l, c) = line_col(src.text, span.start);
            format!("{}:{l}:{c}", src.name)
        }
        None => format!("{} [{}]", src.name, path.join(".")),
    }
}

impl RawConfig {
    /// Parses TOML; a syntax or type error points at its line and column.
    pub fn parse(src: &Source<'_>) -> Result<RawConfig, ConfigErrors> {
        toml::from_str(src.text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(src.text, span.start);
                    format!("{}:{l}:{c}", src.name)
                }
                None => src.name.to_string(),
            };
            ConfigErrors(vec![ConfigError {
                location,
                message: e.message().trim().to_string(),
            }])
        })
    }

    /// Checks every setting and loads the allow-list files, reporting all problems at once.
    /// `src` is the configuration text, for locating bad values (None: built-in defaults).
    pub fn validate(self, src: Option<&Source<'_>>) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |path: &[&str], message: String| {
            let location = match src {
                Some(s) => locate(s, path),
                None => path.join("."),
            };
            errors.push(ConfigError { location, message });
        };
        let g = &self.greylist;
        let secs = |d: Dur| d.0.as_secs();
        if secs(g.retry_window) < secs(g.delay) {
            err(
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
        ] {
            if d.0.subsec_nanos() != 0 {
                err(
                    &["greylist", name],
                    format!("{name} ({d}) must be whole seconds"),
                );
            }
        }
        if g.auto_allow_after > 0 && secs(g.auto_allow_lifetime) == 0 {
            err(
                &["greylist", "auto_allow_lifetime"],
                "auto_allow_lifetime must be positive (auto_allow_after = 0 turns auto-allow off)"
                    .into(),
            );
        }
        if secs(g.max_age) == 0 {
            err(&["greylist", "max_age"], "max_age must be positive".into());
        }
        if g.ipv4_prefix > 32 {
            err(
                &["greylist", "ipv4_prefix"],
                format!("ipv4_prefix {} is over 32", g.ipv4_prefix),
            );
        }
        if g.ipv6_prefix > 128 {
            err(
                &["greylist", "ipv6_prefix"],
                format!("ipv6_prefix {} is over 128", g.ipv6_prefix),
            );
        }
        if g.recipient_delimiter
            .chars()
            .any(|c| c == '@' || c.is_whitespace())
        {
            err(
                &["greylist", "recipient_delimiter"],
                "recipient_delimiter must not contain '@' or spaces".into(),
            );
        }
        let policy = Policy {
            delay: secs(g.delay),
            retry_window: secs(g.retry_window),
            max_age: secs(g.max_age),
            auto_allow_after: g.auto_allow_after,
            auto_allow_lifetime: secs(g.auto_allow_lifetime),
            ipv4_prefix: g.ipv4_prefix.min(32),
            ipv6_prefix: g.ipv6_prefix.min(128),
            recipient_delimiter: g.recipient_delimiter.clone(),
        };

        let p = &self.policy;
        let mut listen = Vec::new();
        if p.listen.is_empty() && self.milter.listen.is_empty() {
            err(
                &["policy", "listen"],
                "at least one listen address is needed (policy or milter)".into(),
            );
        }
        for (i, l) in p.listen.iter().enumerate() {
            match l.parse() {
                Ok(a) => listen.push(a),
                Err(e) => err(&["policy", "listen", &i.to_string()], e),
            }
        }
        let defer_action = p.defer_action.parse().unwrap_or_else(|e| {
            err(&["policy", "defer_action"], e);
            DeferAction::DeferIfPermit
        });
        if p.defer_text.contains(['\r', '\n']) || p.defer_text.trim().is_empty() {
            err(
                &["policy", "defer_text"],
                "defer_text must be one non-empty line".into(),
            );
        }
        let digits = p.socket_mode.strip_prefix("0o").unwrap_or(&p.socket_mode);
        let socket_mode = Some(digits)
            .filter(|d| {
                !d.is_empty() && d.len() <= 4 && d.bytes().all(|b| (b'0'..=b'7').contains(&b))
            })
            .and_then(|d| u32::from_str_radix(d, 8).ok())
            .filter(|m| *m <= 0o777)
            .unwrap_or_else(|| {
                err(
                    &["policy", "socket_mode"],
                    format!(
                        "{:?} is not an octal file mode like \"0660\"",
                        p.socket_mode
                    ),
                );
                0o666
            });
        if !(1..=MAX_CONNECTIONS).contains(&p.max_connections) {
            err(
                &["policy", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        for (name, d) in [
            ("idle_timeout", p.idle_timeout),
            ("io_timeout", p.io_timeout),
        ] {
            if d.0.is_zero() {
                err(&["policy", name], format!("{name} must be positive"));
            }
        }
        if p.max_line_length < 256 {
            err(
                &["policy", "max_line_length"],
                "max_line_length below 256 would refuse ordinary Postfix requests".into(),
            );
        }
        if p.max_attributes < 32 {
            err(
                &["policy", "max_attributes"],
                "max_attributes below 32 would refuse ordinary Postfix requests".into(),
            );
        }

        let m = &self.milter;
        let mut milter_listen = Vec::new();
        for (i, l) in m.listen.iter().enumerate() {
            match l.parse() {
                Ok(a) => milter_listen.push(a),
                Err(e) => err(&["milter", "listen", &i.to_string()], e),
            }
        }
        // The same checks as an explicit policy defer code: 45x and an optional 4.x.y.
        if !matches!(m.reply_code.parse(), Ok(DeferAction::Code(_))) {
            err(
                &["milter", "reply_code"],
                format!(
                    "{:?} is not a 450/451/452 reply code such as \"451 4.7.1\"",
                    m.reply_code
                ),
            );
        }
        if !(1..=MAX_CONNECTIONS).contains(&m.max_connections) {
            err(
                &["milter", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        for (name, d) in [
            ("idle_timeout", m.idle_timeout),
            ("io_timeout", m.io_timeout),
        ] {
            if d.0.is_zero() {
                err(&["milter", name], format!("{name} must be positive"));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&m.max_frame) {
            err(
                &["milter", "max_frame"],
                "max_frame must be between 1 KiB and 64 MiB".into(),
            );
        }

        let s = &self.store;
        if s.backend == "embedded" && s.path.as_os_str().is_empty() {
            err(
                &["store", "path"],
                "the embedded store needs a file path".into(),
            );
        }
        let server = || ServerStore {
            url: s.url.clone(),
            pool_size: s.pool_size,
            connect_timeout: s.connect_timeout.0,
        };
        let store = match s.backend.as_str() {
            "embedded" => StoreKind::Embedded(s.path.clone()),
            "memory" => StoreKind::Memory,
            "redis" => StoreKind::Redis(server()),
            "postgres" => StoreKind::Postgres(server()),
            other => {
                err(
                    &["store", "backend"],
                    format!(
                        "unknown store backend {other:?} (embedded, memory, redis or postgres)"
                    ),
                );
                StoreKind::Memory
            }
        };
        type CheckUrl = fn(&str) -> Result<(), String>;
        let shared: Option<(&str, &ServerStore, CheckUrl)> = match &store {
            StoreKind::Redis(server) => Some(("redis", server, crate::store::redis::check_url)),
            StoreKind::Postgres(server) => {
                Some(("postgres", server, crate::store::postgres::check_url))
            }
            StoreKind::Embedded(_) | StoreKind::Memory => None,
        };
        match shared {
            Some((name, server, check)) => {
                if server.url.is_empty() {
                    err(
                        &["store", "backend"],
                        format!("the {name} backend needs the server's url in [store]"),
                    );
                } else if let Err(e) = check(&server.url) {
                    // The message may quote the URL: never with its password.
                    err(
                        &["store", "url"],
                        e.replace(&server.url, &server.redacted_url()),
                    );
                }
                if server.pool_size == 0 {
                    err(
                        &["store", "pool_size"],
                        "pool_size must be at least 1".into(),
                    );
                }
            }
            None if !s.url.is_empty() => {
                let guess = if s.url.starts_with("redis") || s.url.starts_with("unix") {
                    "redis"
                } else {
                    "postgres"
                };
                err(
                    &["store", "url"],
                    format!(
                        "url is used by the redis and postgres backends only; set backend = {guess:?}"
                    ),
                );
            }
            None => {}
        }
        for (name, d) in [
            ("flush_interval", s.flush_interval),
            ("timeout", s.timeout),
            ("connect_timeout", s.connect_timeout),
        ] {
            if d.0.is_zero() {
                err(&["store", name], format!("{name} must be positive"));
            }
        }

        let (selective, dns) = self.validate_dns(&policy, &mut err);

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
            || self.log.level.trim().is_empty()
        {
            err(
                &["log", "level"],
                format!(
                    "{:?} is not a log level (error, warn, info, debug, trace) or tracing filter",
                    self.log.level
                ),
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            err(
                &["log", "format"],
                format!("log format {:?} is not text or json", self.log.format),
            );
        }
        if let Some(h) = &self.hostname
            && (h.is_empty() || h.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            err(&["hostname"], format!("{h:?} is not a host name"));
        }

        let ad = &self.admin;
        let mut admin_listen = Vec::new();
        let default_listen = vec![DEFAULT_ADMIN_LISTEN.to_string()];
        for (i, l) in ad
            .listen
            .as_ref()
            .unwrap_or(&default_listen)
            .iter()
            .enumerate()
        {
            match l.parse::<SocketAddr>() {
                Ok(a) => admin_listen.push(a),
                Err(_) => err(
                    &["admin", "listen", &i.to_string()],
                    format!("{l:?} is not an IP address and port such as 127.0.0.1:9025"),
                ),
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&ad.max_connections) {
            err(
                &["admin", "max_connections"],
                format!("max_connections must be between 1 and {MAX_CONNECTIONS}"),
            );
        }
        if ad.request_timeout.0.is_zero() {
            err(
                &["admin", "request_timeout"],
                "request_timeout must be positive".into(),
            );
        }
        if !ad.token.is_empty() && ad.token.trim().len() < 16 {
            err(
                &["admin", "token"],
                "token must have at least 16 characters".into(),
            );
        }
        if !ad.token.is_empty() && ad.token_file.is_some() {
            err(
                &["admin", "token_file"],
                "set token or token_file, not both".into(),
            );
        }

        let mut allow = AllowLists::default();
        let mut file_errors = Vec::new();
        let a = &self.allow;
        type Add = fn(&mut AllowLists, &str, Origin) -> Result<(), String>;
        let inline: [(&str, &Vec<String>, Add); 3] = [
            ("clients", &a.clients, AllowLists::add_client),
            ("recipients", &a.recipients, AllowLists::add_recipient),
            ("senders", &a.senders, AllowLists::add_sender),
        ];
        for (name, entries, add) in inline {
            for (i, e) in entries.iter().enumerate() {
                let origin = Origin {
                    source: "config".into(),
                    line: 0,
                    entry: e.clone(),
                };
                if let Err(m) = add(&mut allow, e, origin) {
                    err(&["allow", name, &i.to_string()], m);
                }
            }
        }
        let files: [(&str, &Vec<PathBuf>, Add); 3] = [
            ("client_files", &a.client_files, AllowLists::add_client),
            (
                "recipient_files",
                &a.recipient_files,
                AllowLists::add_recipient,
            ),
            ("sender_files", &a.sender_files, AllowLists::add_sender),
        ];
        for (name, paths, add) in files {
            for path in paths {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        if let Err(list) = allow.add_file(path, &text, add) {
                            file_errors.extend(list.into_iter().map(|e| ConfigError {
                                location: format!("{}:{}", e.source_name, e.line),
                                message: e.message,
                            }));
                        }
                    }
                    Err(e) => err(
                        &["allow", name],
                        format!("cannot read {}: {e}", path.display()),
                    ),
                }
            }
        }

        errors.extend(file_errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let hostname = self
            .hostname
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
        Ok(Config {
            mode: self.mode,
            hostname,
            engine: Engine::new(policy, allow).with_selective(selective),
            x_greylist_header: g.x_greylist_header,
            listen,
            defer_action,
            defer_text: p.defer_text.clone(),
            socket_mode,
            max_connections: p.max_connections,
            idle_timeout: p.idle_timeout.0,
            io_timeout: p.io_timeout.0,
            limits: Limits {
                max_line: p.max_line_length,
                max_attributes: p.max_attributes,
            },
            milter_listen,
            milter_reply_code: m
                .reply_code
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            milter_max_connections: m.max_connections,
            milter_idle_timeout: m.idle_timeout.0,
            milter_io_timeout: m.io_timeout.0,
            milter_max_frame: m.max_frame,
            flush_interval: s.flush_interval.0,
            store_timeout: s.timeout.0,
            fail_mode: s.fail_mode,
            dns,
            log_level: self.log.level.clone(),
            log_json: self.log.format == "json",
            admin: AdminConfig {
                listen: admin_listen,
                listen_is_default: ad.listen.is_none(),
                token: if !ad.token.is_empty() {
                    TokenSource::Inline(ad.token.trim().to_string())
                } else if let Some(f) = ad
                    .token_file
                    .clone()
                    .or_else(|| state_dir(&store).map(|d| d.join("admin.token")))
                {
                    TokenSource::File(f)
                } else {
                    TokenSource::None
                },
                token_for_reads: ad.token_for_reads,
                entries_file: ad.entries_file.clone().or_else(|| match &store {
                    StoreKind::Memory => None,
                    StoreKind::Embedded(p) => {
                        let mut name = p.file_name().unwrap_or_default().to_os_string();
                        name.push(".entries.json");
                        Some(p.with_file_name(name))
                    }
                    _ => state_dir(&store).map(|d| d.join("runtime-entries.json")),
                }),
                max_connections: ad.max_connections,
                request_timeout: ad.request_timeout.0,
            },
            store,
        })
    }
}

impl RawConfig {
    /// `[identity]`, `[dns]`, `[dnswl]` and `[dnsbl]` into the engine's selective settings
    /// and the DNS layer's.
    fn validate_dns(
        &self,
        policy: &Policy,
        err: &mut impl FnMut(&[&str], String),
    ) -> (Selective, DnsSettings) {
        let id = &self.identity;
        let mut order = Vec::new();
        for (i, kind) in id.order.iter().enumerate() {
            let at = i.to_string();
            if order.contains(kind) {
                err(
                    &["identity", "order", &at],
                    format!("{kind:?} appears twice", kind = kind.as_str()),
                );
            } else if order.last() == Some(&IdentityKind::Prefix) {
                err(
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
                err(path, format!("{d} must be whole seconds"));
            }
            let secs = d.0.as_secs();
            if secs > policy.retry_window {
                err(
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
                err(
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
            err(
                &["dns", "budget"],
                format!(
                    "budget must be positive and at most {}",
                    Dur(MAX_DNS_BUDGET)
                ),
            );
        }
        let resolver = d.resolver.as_deref().and_then(|r| {
            parse_resolver(r)
                .map_err(|e| err(&["dns", "resolver"], e))
                .ok()
        });
        let mut zones = |table: &str, list: &[String]| -> Vec<String> {
            let mut out: Vec<String> = Vec::new();
            for (i, z) in list.iter().enumerate() {
                match check_zone(z) {
                    Ok(z) if out.contains(&z) => {
                        err(
                            &[table, "zones", &i.to_string()],
                            format!("{z:?} appears twice"),
                        );
                    }
                    Ok(z) => out.push(z),
                    Err(e) => err(&[table, "zones", &i.to_string()], e),
                }
            }
            out
        };
        let dnswl_zones = zones("dnswl", &self.dnswl.zones);
        let dnsbl_zones = zones("dnsbl", &self.dnsbl.zones);
        // Settings that only DNS facts can trigger would silently do nothing.
        if !d.enabled {
            let unused: [(&[&str], bool); 5] = [
                (&["dnswl", "zones"], !dnswl_zones.is_empty()),
                (&["dnsbl", "zones"], !dnsbl_zones.is_empty()),
                (&["dnsbl", "delay"], dnsbl_delay.is_some()),
                (&["identity", "verified_delay"], verified_delay.is_some()),
                (&["identity", "verified_skip"], id.verified_skip),
            ];
            for (path, set) in unused {
                if set {
                    err(
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
            dnswl_zones,
            dnsbl_zones,
        };
        (selective, dns)
    }
}

/// Reads the configuration file. `explicit` is true when the user named it: then a missing
/// file is an error; the default path may be absent (built-in defaults apply).
pub fn load_raw(path: &Path, explicit: bool) -> Result<(RawConfig, Option<String>), ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let name = path.display().to_string();
            let raw = RawConfig::parse(&Source {
                name: &name,
                text: &text,
            })?;
            Ok((raw, Some(text)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok((RawConfig::default(), None))
        }
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            location: path.display().to_string(),
            message: format!("cannot read: {e}"),
        }])),
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            mode: Mode::Enforce,
            hostname: None,
            greylist: RawGreylist::default(),
            policy: RawPolicyServer::default(),
            milter: RawMilter::default(),
            store: RawStore::default(),
            allow: RawAllow::default(),
            admin: RawAdmin::default(),
            identity: RawIdentity::default(),
            dns: RawDns::default(),
            dnswl: RawDnswl::default(),
            dnsbl: RawDnsbl::default(),
            log: RawLog::default(),
        }
    }
}

#[cfg(test)]
mod tests;
