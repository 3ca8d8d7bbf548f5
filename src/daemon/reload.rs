//! Reloading a running daemon's configuration.
//!
//! A reload validates the whole new configuration first; only when it is good are the
//! engine (policy, allow lists), the DNS facts gatherer (rebuilt only when `[dns]`,
//! `[dnswl]` or `[dnsbl]` changed) and the reply texts swapped in, each in one step, so a
//! request sees either the old or the new configuration. Connections stay open. Sections
//! that the daemon built sockets, its store or its logging from (`Config::needs_restart`)
//! are reported and wait for a restart.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::admin::Control;
use crate::admin::wire::ReloadReport;
use crate::config::{Config, ConfigErrors};
use crate::server::replies::Replies;
use crate::server::smtp::{Guard, SmtpConfig, Traps, load_acceptor};
use crate::service::{Greylister, Live};

/// Reads and checks the configuration again (same file, same command-line overrides).
pub type ConfigLoader = Arc<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>;

/// Everything a reload swaps, and how to read the configuration again.
pub(super) struct Reloader {
    svc: Arc<Greylister>,
    /// The replies both front ends read.
    replies: Arc<ArcSwap<Replies>>,
    loader: ConfigLoader,
    /// The configuration the sockets and store were made from.
    started: Config,
    /// What the SMTP front reloads: its certificate and its greytraps.
    smtp: SmtpReload,
    /// Serialises reloads (SIGHUP and API at once).
    lock: tokio::sync::Mutex<()>,
}

/// The SMTP front's parts a reload replaces.
pub(super) struct SmtpReload {
    pub tls: Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>,
    pub guard: Arc<Guard>,
}

impl SmtpReload {
    /// Reads the certificate and the trap file again; a bad one keeps what runs.
    fn apply(&self, cfg: &SmtpConfig) {
        if let Some(files) = &cfg.tls {
            match load_acceptor(files) {
                Ok(a) => self.tls.store(Some(Arc::new(a))),
                Err(e) => {
                    tracing::error!(error = %e, "SMTP certificate not reloaded; the running one stays")
                }
            }
        }
        match Traps::load(&cfg.traps) {
            Ok(t) => self.guard.set_traps(t),
            Err(e) => tracing::error!(error = %e, "greytraps not reloaded; the running list stays"),
        }
    }
}

impl Reloader {
    pub(super) fn new(
        svc: Arc<Greylister>,
        replies: Arc<ArcSwap<Replies>>,
        loader: ConfigLoader,
        started: Config,
        smtp: SmtpReload,
    ) -> Self {
        Reloader {
            svc,
            replies,
            loader,
            started,
            smtp,
            lock: tokio::sync::Mutex::new(()),
        }
    }
}

#[async_trait::async_trait]
impl Control for Reloader {
    fn replies(&self) -> Arc<Replies> {
        self.replies.load_full()
    }

    async fn reload(&self, why: &str) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.lock.lock().await;
        let loader = self.loader.clone();
        // Allow-list files can be large: read them off the async workers.
        let loaded = tokio::task::spawn_blocking(move || loader())
            .await
            .map_err(|e| format!("reload task failed: {e}"))?;
        let cfg = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.svc
                    .metrics
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                let msg = e.to_string().replace('\n', "; ");
                tracing::error!(trigger = why, errors = %msg, "configuration reload refused; the running configuration stays");
                return Err(msg);
            }
        };
        let needs_restart = self.started.needs_restart(&cfg);
        let allow_entries = cfg.engine.allow.counts();
        let domain_sections = cfg.engine.domains.sections().len();
        let mode = cfg.mode;
        // The same DNS settings keep the gatherer, and with it the cache.
        let current = self.svc.live().dns.clone();
        let dns = match current {
            Some(g) if g.settings() == &cfg.dns && g.host_domain() == cfg.hostname => Some(g),
            _ => super::gatherer(&cfg, &self.svc),
        };
        self.svc.replace_live(Live {
            options: cfg.service_options(),
            // Keys keep the address mode the store was opened in (a changed [store] waits
            // for a restart, which checks the store against it).
            engine: cfg
                .engine
                .with_addresses(self.svc.live().engine.addresses.clone()),
            dns,
        });
        self.replies.store(Arc::new(cfg.replies));
        self.smtp.apply(&cfg.smtp);
        self.svc.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        let p = &self.svc.live().engine.policy;
        tracing::info!(
            trigger = why,
            mode = ?mode,
            delay = p.delay,
            allow_clients = allow_entries.0,
            allow_recipients = allow_entries.1,
            allow_senders = allow_entries.2,
            domain_sections,
            "configuration reloaded"
        );
        if !needs_restart.is_empty() {
            tracing::warn!(sections = ?needs_restart, "changed sections take effect after a restart");
        }
        Ok(ReloadReport {
            needs_restart: needs_restart.into_iter().map(String::from).collect(),
            allow_entries,
        })
    }
}
