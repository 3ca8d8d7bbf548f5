//! The running daemon: assembles store, service, front ends and the admin listener from a
//! checked `Config`, handles signals, and reloads configuration on `SIGHUP` or request.
//!
//! A reload validates the whole new configuration first; only when it is good are the
//! engine (policy, allow lists), the DNS facts gatherer (rebuilt only when `[dns]`,
//! `[dnswl]` or `[dnsbl]` changed) and the reply texts swapped in, each in one step, so a
//! request sees either the old or the new configuration. Connections stay open. Settings
//! that need new sockets or another store (listeners, store, admin) are reported and wait
//! for a restart.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigErrors, StoreKind, TokenSource};
use crate::dns::Gatherer;
use crate::server::milter::{MilterContext, MilterLimits, MilterReplies};
use crate::server::policy::{ConnContext, Replies};
use crate::server::{self, Bound, ConnLimits, Handler, StoreOpener};
use crate::service::{Greylister, Live, RuntimeEntries, ServiceOptions, StoreSlot, unix_now};
use crate::store::{EmbeddedStore, MemoryStore, PostgresStore, RedisStore, Store};

/// How long open requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads and checks the configuration again (same file, same command-line overrides).
pub type ConfigLoader = Arc<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>;

/// What a successful reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Settings that changed in the file but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
    pub allow_entries: (usize, usize, usize),
}

/// Everything a reload swaps, and how to read the configuration again.
pub struct Reloader {
    svc: Arc<Greylister>,
    policy: Arc<ConnContext>,
    milter: Arc<MilterContext>,
    loader: ConfigLoader,
    /// The configuration the sockets and store were made from.
    started: Config,
    /// Serialises reloads (SIGHUP and API at once).
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// The policy replies in force (for explanations).
    pub fn policy_replies(&self) -> Arc<Replies> {
        self.policy.replies.load_full()
    }

    /// Reloads the configuration; on any error the running one stays and the error says why.
    pub async fn reload(&self, why: &str) -> Result<ReloadReport, String> {
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
        let s = &self.started;
        let mut needs_restart = Vec::new();
        for (name, changed) in [
            ("policy.listen", cfg.listen != s.listen),
            ("milter.listen", cfg.milter_listen != s.milter_listen),
            ("store", cfg.store != s.store),
            (
                "store.flush_interval",
                cfg.flush_interval != s.flush_interval,
            ),
            ("admin", cfg.admin != s.admin),
            ("policy.socket_mode", cfg.socket_mode != s.socket_mode),
            (
                "log",
                cfg.log_level != s.log_level || cfg.log_json != s.log_json,
            ),
        ] {
            if changed {
                needs_restart.push(name);
            }
        }
        let allow_entries = cfg.engine.allow.counts();
        let (policy_replies, milter_replies) = replies(&cfg);
        let mode = cfg.mode;
        // The same DNS settings keep the gatherer, and with it the cache.
        let current = self.svc.live().dns.clone();
        let dns = match current {
            Some(g) if g.settings() == &cfg.dns && g.host_domain() == cfg.hostname => Some(g),
            _ => gatherer(&cfg, &self.svc),
        };
        self.svc.replace_live(Live {
            options: options(&cfg),
            engine: cfg.engine,
            dns,
        });
        self.policy.replies.store(Arc::new(policy_replies));
        self.milter.replies.store(Arc::new(milter_replies));
        self.svc.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        let p = &self.svc.live().engine.policy;
        tracing::info!(
            trigger = why,
            mode = ?mode,
            delay = p.delay,
            allow_clients = allow_entries.0,
            allow_recipients = allow_entries.1,
            allow_senders = allow_entries.2,
            "configuration reloaded"
        );
        if !needs_restart.is_empty() {
            tracing::warn!(settings = ?needs_restart, "changed settings take effect after a restart");
        }
        Ok(ReloadReport {
            needs_restart,
            allow_entries,
        })
    }
}

/// The DNS facts gatherer `[dns]` asks for. A resolver that cannot be set up leaves DNS off
/// (loudly): DNS trouble must never stop mail, nor the daemon.
fn gatherer(cfg: &Config, svc: &Greylister) -> Option<Arc<Gatherer>> {
    if !cfg.dns.enabled {
        return None;
    }
    match Gatherer::new(&cfg.dns, &cfg.hostname, svc.metrics.dns.clone()) {
        Ok(g) => {
            let resolver = cfg
                .dns
                .resolver
                .map_or_else(|| "system".to_string(), |a| a.to_string());
            tracing::info!(
                %resolver,
                budget_ms = cfg.dns.budget.as_millis(),
                dnswl = ?cfg.dns.dnswl_zones,
                dnsbl = ?cfg.dns.dnsbl_zones,
                "DNS facts enabled"
            );
            Some(Arc::new(g))
        }
        Err(e) => {
            tracing::error!(error = %e, "DNS facts disabled: every client is keyed on its IP prefix");
            None
        }
    }
}

fn options(cfg: &Config) -> ServiceOptions {
    ServiceOptions {
        mode: cfg.mode,
        fail_mode: cfg.fail_mode,
        store_timeout: cfg.store_timeout,
    }
}

/// The policy and milter reply texts a configuration asks for (also what `explain` shows).
pub fn replies(cfg: &Config) -> (Replies, MilterReplies) {
    let header_host = cfg.x_greylist_header.then(|| cfg.hostname.clone());
    (
        Replies {
            defer_action: cfg.defer_action.clone(),
            defer_text: cfg.defer_text.clone(),
            header_host: header_host.clone(),
        },
        MilterReplies {
            reply_code: cfg.milter_reply_code.clone(),
            defer_text: cfg.defer_text.clone(),
            header_host,
        },
    )
}

/// Opens the store. The redis and postgres stores connect on first use (and reconnect by
/// themselves), so they open even while their server is down; `timeout` bounds each of
/// their operations.
pub fn store_opener(kind: &StoreKind, timeout: Duration) -> StoreOpener {
    match kind {
        StoreKind::Memory => {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            Arc::new(move || Ok(store.clone()))
        }
        StoreKind::Embedded(path) => {
            let path = path.clone();
            Arc::new(move || {
                let s = EmbeddedStore::open(&path, unix_now())?;
                let r = s.load_report();
                if r.undecodable > 0 {
                    tracing::warn!(
                        path = %path.display(), rows = r.undecodable,
                        "store rows this version cannot read were left on disk untouched"
                    );
                }
                tracing::info!(
                    path = %path.display(), triplets = r.triplets, clients = r.clients,
                    expired = r.expired, undecodable = r.undecodable, "store loaded"
                );
                Ok(Arc::new(s) as Arc<dyn Store>)
            })
        }
        StoreKind::Redis(server) => {
            let server = server.clone();
            Arc::new(move || {
                let s = RedisStore::new(&server.url, server.connect_timeout, timeout)?;
                tracing::info!(store = %s.describe(), "store ready (connects on first use)");
                Ok(Arc::new(s) as Arc<dyn Store>)
            })
        }
        StoreKind::Postgres(server) => {
            let server = server.clone();
            Arc::new(move || {
                let s = PostgresStore::new(
                    &server.url,
                    server.pool_size,
                    server.connect_timeout,
                    timeout,
                )?;
                tracing::info!(store = %s.describe(), pool_size = server.pool_size, "store ready (connects on first use)");
                Ok(Arc::new(s) as Arc<dyn Store>)
            })
        }
    }
}

/// The admin token: inline, read from its file, or a new random one written there.
fn admin_token(src: &TokenSource) -> Option<String> {
    match src {
        TokenSource::Inline(t) => Some(t.clone()),
        TokenSource::None => None,
        TokenSource::File(path) => match crate::admin::read_token_file(path) {
            Ok(Some(t)) => Some(t),
            Ok(None) => match crate::admin::create_token_file(path) {
                Ok(t) => {
                    tracing::info!(path = %path.display(), "admin token created");
                    Some(t)
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot create the admin token file; changes through the admin API are disabled");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the admin token file; changes through the admin API are disabled");
                None
            }
        },
    }
}

/// Runs the daemon until SIGTERM or SIGINT; `SIGHUP` reloads the configuration.
pub async fn run(cfg: Config, loader: ConfigLoader) -> anyhow::Result<()> {
    let opener = store_opener(&cfg.store, cfg.store_timeout);
    let slot = {
        let open = opener.clone();
        match tokio::task::spawn_blocking(move || open()).await? {
            Ok(store) => StoreSlot::new(store),
            Err(e) => {
                tracing::error!(
                    error = %e, fail_mode = ?cfg.fail_mode,
                    "store unavailable at start; answering per fail_mode and retrying"
                );
                StoreSlot::missing(e.to_string())
            }
        }
    };
    let entries = match &cfg.admin.entries_file {
        Some(path) => RuntimeEntries::load(path).with_context(|| {
            format!(
                "cannot load runtime entries (fix or move {} and start again)",
                path.display()
            )
        })?,
        None => RuntimeEntries::in_memory(),
    };
    let engine = cfg.engine.clone();
    let svc = Greylister::new(engine, slot, options(&cfg)).with_entries(entries);
    let dns = gatherer(&cfg, &svc);
    let svc = Arc::new(svc.with_dns(dns));
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let stops = server::StopSignals::new(shutdown.clone(), hard_stop.clone());
    let (policy_replies, milter_replies) = replies(&cfg);
    let policy = Arc::new(ConnContext {
        svc: svc.clone(),
        replies: arc_swap::ArcSwap::from_pointee(policy_replies),
        limits: ConnLimits {
            max_connections: cfg.max_connections,
            idle_timeout: cfg.idle_timeout,
            io_timeout: cfg.io_timeout,
            codec: cfg.limits,
        },
        stops: stops.clone(),
    });
    let milter = Arc::new(MilterContext {
        svc: svc.clone(),
        replies: arc_swap::ArcSwap::from_pointee(milter_replies),
        limits: MilterLimits {
            max_connections: cfg.milter_max_connections,
            idle_timeout: cfg.milter_idle_timeout,
            io_timeout: cfg.milter_io_timeout,
            max_frame: cfg.milter_max_frame,
        },
        stops: stops.clone(),
    });

    let mut listeners = Vec::new();
    let policy_handler = Handler::Policy(policy.clone());
    let milter_handler = Handler::Milter(milter.clone());
    let wanted = cfg.listen.iter().map(|a| (a, "policy", &policy_handler));
    let wanted = wanted.chain(
        cfg.milter_listen
            .iter()
            .map(|a| (a, "milter", &milter_handler)),
    );
    for (addr, kind, handler) in wanted {
        let bound = Bound::bind(addr, cfg.socket_mode)
            .await
            .with_context(|| format!("cannot listen on {addr} ({kind})"))?;
        listeners.push((bound, kind, handler.clone()));
    }
    let mut admin_listeners = Vec::new();
    for addr in &cfg.admin.listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => admin_listeners.push(l),
            // Mail comes first: a second daemon on this host must not fail because the
            // default admin port is taken. A configured address must be free.
            Err(e) if cfg.admin.listen_is_default => tracing::warn!(
                listener = %addr, error = %e,
                "default admin address unavailable; running without the admin listener (set [admin] listen)"
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot listen on {addr} (admin)"));
            }
        }
    }
    for (l, kind, _) in &listeners {
        tracing::info!(listener = %l.local_addr(), mode = ?cfg.mode, "{kind} listener ready");
    }

    let token = admin_token(&cfg.admin.token);
    let admin_cfg = cfg.admin.clone();
    let flush_interval = cfg.flush_interval;
    let reloader = Arc::new(Reloader {
        svc: svc.clone(),
        policy,
        milter,
        loader,
        started: cfg,
        lock: tokio::sync::Mutex::new(()),
    });
    let admin_state = Arc::new(AdminState::new(
        svc.clone(),
        reloader.clone(),
        token,
        &admin_cfg,
    ));
    for l in &admin_listeners {
        let addr = l
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        tracing::info!(listener = %addr, "admin listener ready (dashboard, API, /metrics)");
    }
    let admin_task = tokio::spawn(admin::serve(admin_listeners, admin_state, shutdown.clone()));

    let maintenance = tokio::spawn(server::maintain_store(
        svc.clone(),
        flush_interval,
        Some(opener),
        shutdown.clone(),
    ));
    let listeners = listeners.into_iter().map(|(l, _, h)| (l, h)).collect();
    let mut serving = tokio::spawn(server::serve(listeners));

    wait_for_stop(&reloader).await?;
    tracing::info!("shutting down: no new connections, finishing open requests");
    shutdown.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut serving)
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after {SHUTDOWN_GRACE:?}; closing them");
        hard_stop.cancel();
        // Every connection task has ended before the final flush, so no update can slip
        // in after it.
        let _ = serving.await;
    }
    let _ = maintenance.await;
    let _ = admin_task.await;
    if let Ok(store) = svc.store.get() {
        store
            .flush_fully()
            .await
            .context("final store flush failed")?;
        tracing::info!(store = %store.describe(), "store flushed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT, reloading on every SIGHUP meanwhile.
async fn wait_for_stop(reloader: &Reloader) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(()) }
            _ = hup.recv() => {
                // The outcome is logged either way; a bad file keeps the old configuration.
                let _ = reloader.reload("SIGHUP").await;
            }
        }
    }
}
