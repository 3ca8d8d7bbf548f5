//! Configuration in two stages: serde structs with documented defaults (`RawConfig`, one
//! `Raw*` struct per section, each in its section's file), then [`RawConfig::validate`],
//! which checks section by section and assembles the checked [`Config`] from the types the
//! components own (`PolicyConfig` in `server`, `StoreSpec` in `store`, `DnsSettings` in
//! `dns`, ...). Every problem of a file is reported at once, at its `file:line:column`.
//!
//! This module only parses, checks and assembles: no component below it imports it.

mod admin;
mod allow;
mod diagnostics;
mod diff;
mod dns;
mod domains;
mod greylist;
mod listeners;
mod lists;
mod log;
mod smtp;
mod store;

use std::path::Path;

use serde::Deserialize;

pub use admin::RawAdmin;
pub use allow::RawAllow;
pub use diagnostics::{ConfigError, ConfigErrors, Problems, Source};
pub use dns::{RawDns, RawDnsbl, RawDnswl, RawIdentity};
pub use domains::RawDomain;
pub use greylist::RawGreylist;
pub use listeners::{RawMilter, RawPolicyServer};
pub use lists::{RawLists, built_in_comment};
pub use log::RawLog;
pub use smtp::RawSmtp;
pub use store::RawStore;

use crate::admin::AdminConfig;
use crate::dns::DnsSettings;
use crate::engine::{Engine, Mode};
use crate::lists::ListsSettings;
use crate::logfmt::LogConfig;
use crate::server::milter::MilterConfig;
use crate::server::policy::PolicyConfig;
use crate::server::replies::Replies;
use crate::server::smtp::SmtpConfig;
use crate::service::{FailMode, ServiceOptions};
use crate::store::StoreSpec;

/// Most connections one listener may hold (far above what one MTA opens).
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Where greygate looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/greygate/greygate.toml";
/// Where the embedded store lives when neither config nor `--db` says otherwise.
pub const DEFAULT_DB_PATH: &str = "/var/lib/greygate/greygate.redb";

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
    pub smtp: RawSmtp,
    pub store: RawStore,
    pub allow: RawAllow,
    pub admin: RawAdmin,
    pub identity: RawIdentity,
    pub dns: RawDns,
    pub dnswl: RawDnswl,
    pub dnsbl: RawDnsbl,
    pub lists: RawLists,
    pub log: RawLog,
    /// `[[domains]]`: per-recipient-domain sections, in precedence order.
    pub domains: Vec<RawDomain>,
}

/// The checked configuration, in sections the components own.
#[derive(Debug)]
pub struct Config {
    pub mode: Mode,
    pub hostname: String,
    pub engine: Engine,
    /// How both front ends spell decisions.
    pub replies: Replies,
    pub policy: PolicyConfig,
    pub milter: MilterConfig,
    pub smtp: SmtpConfig,
    pub store: StoreSpec,
    pub fail_mode: FailMode,
    pub dns: DnsSettings,
    pub log: LogConfig,
    pub admin: AdminConfig,
    /// `greygate lists update`'s domains and file (the daemon reads the file as a client
    /// allow list, `allow` already holds its entries).
    pub lists: ListsSettings,
}

impl Config {
    /// What the service needs to decide: mode and failure policy.
    pub fn service_options(&self) -> ServiceOptions {
        ServiceOptions {
            mode: self.mode,
            fail_mode: self.fail_mode,
            store_timeout: self.store.timeout,
        }
    }
}

impl RawConfig {
    /// Parses TOML; a syntax or type error points at its line and column.
    pub fn parse(src: &Source<'_>) -> Result<RawConfig, ConfigErrors> {
        src.parse()
    }

    /// Checks every section and loads the allow-list files, reporting all problems at once.
    /// `src` is the configuration text, for locating bad values (None: built-in defaults).
    pub fn validate(self, src: Option<&Source<'_>>) -> Result<Config, ConfigErrors> {
        let mut p = Problems::new(src);
        let policy = self.greylist.check(&mut p);
        let (policy_listeners, defer_action) = self.policy.check(
            self.milter.listen.is_empty() && self.smtp.listen.is_empty(),
            &mut p,
        );
        let (milter, milter_code) = self.milter.check(&mut p);
        let mut smtp = self.smtp.check(self.hostname.as_deref(), &mut p);
        let mut store = self.store.check(&mut p);
        let addresses = self.store.address_keys(&mut p);
        store.addresses = addresses.store_mode();
        let (selective, dns) = self.check_dns(&policy, &mut p);
        let log = self.log.check(&mut p);
        if let Some(h) = &self.hostname
            && (h.is_empty() || h.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            p.at(&["hostname"], format!("{h:?} is not a host name"));
        }
        let admin = self.admin.check(&store.kind, &mut p);
        let lists = self.lists.check(&mut p);
        let allow = self.allow.check(&lists.output, &mut p);
        let domains = domains::check(&self.domains, &policy, self.dns.enabled, &mut p);
        p.finish(|| {
            let hostname = self
                .hostname
                .clone()
                .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
            if smtp.hostname.is_empty() {
                smtp.hostname = hostname.clone();
            }
            Config {
                mode: self.mode,
                replies: Replies {
                    defer_action,
                    milter_code,
                    defer_text: self.policy.defer_text.clone(),
                    header_host: self.greylist.x_greylist_header.then(|| hostname.clone()),
                },
                hostname,
                engine: Engine::new(policy, allow)
                    .with_selective(selective)
                    .with_domains(domains)
                    .with_addresses(addresses),
                policy: policy_listeners,
                milter,
                smtp,
                fail_mode: self.store.fail_mode,
                store,
                dns,
                log,
                admin,
                lists,
            }
        })
    }
}

/// Reads the configuration file. `explicit` is true when the user named it: then a missing
/// file is an error; the default path may be absent (built-in defaults apply).
pub fn load_raw(path: &Path, explicit: bool) -> Result<(RawConfig, Option<String>), ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let name = path.display().to_string();
            let raw = Source {
                name: &name,
                text: &text,
            }
            .parse()?;
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
            smtp: RawSmtp::default(),
            store: RawStore::default(),
            allow: RawAllow::default(),
            admin: RawAdmin::default(),
            identity: RawIdentity::default(),
            dns: RawDns::default(),
            dnswl: RawDnswl::default(),
            dnsbl: RawDnsbl::default(),
            lists: RawLists::default(),
            log: RawLog::default(),
            domains: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
