//! The running daemon: assembles store, service, front ends and the admin listener from a
//! checked `Config`, and serves until the stop it is given; reloads arrive on a channel.
//! The daemon installs no signal handler: the binary maps SIGTERM, SIGINT and SIGHUP onto
//! `run`'s stop future and reload channel.

pub mod descriptors;
mod reload;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Control as _};
use crate::config::Config;
use crate::dns::Gatherer;
use crate::server::milter::MilterContext;
use crate::server::policy::PolicyContext;
use crate::server::smtp::{self, Guard, SmtpContext, Traps, load_acceptor};
use crate::server::threads::Threads;
use crate::server::{self, Bound, Handler, StoreOpener};
use crate::service::{Greylister, RuntimeEntries, StoreSlot};
use crate::store::{self, Access};

pub use reload::ConfigLoader;
use reload::{Reloader, SmtpReload};

/// How long open requests may take to finish after the stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
                ptr_lookup = cfg.dns.ptr_lookup,
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

/// Reads the runtime entries of a shared store again every `every` when they changed
/// (other daemons add and remove them too); off every request's path.
async fn poll_entries(svc: Arc<Greylister>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        svc.poll_entries(crate::service::unix_now()).await;
    }
}

/// Runs the daemon until `stop` completes; each message on `reloads` (naming what asked,
/// e.g. "SIGHUP") reloads the configuration through `loader`. The binary maps signals onto
/// both; a test passes its own future and channel.
pub async fn run(
    cfg: Config,
    loader: ConfigLoader,
    stop: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<&'static str>,
) -> anyhow::Result<()> {
    let opener: StoreOpener = {
        let spec = cfg.store.clone();
        Arc::new(move || store::open(&spec, Access::Serve))
    };
    let slot = {
        let open = opener.clone();
        match tokio::task::spawn_blocking(move || open()).await? {
            // A store written in another address mode is a configuration mistake that no
            // retry mends: refuse to start, naming the setting.
            Err(store::StoreError::AddressMode(msg)) => {
                anyhow::bail!("store {}: {msg}", cfg.store.kind)
            }
            Ok(store) => {
                // A shared store checks its mode at its first operation: ask now, so that a
                // mismatch stops the start rather than failing every request. A server that
                // does not answer yet is checked when it does.
                if let Err(store::StoreError::AddressMode(msg)) = store.address_mode().await {
                    anyhow::bail!("store {}: {msg}", cfg.store.kind);
                }
                StoreSlot::new(store)
            }
            Err(e) => {
                tracing::error!(
                    error = %e, fail_mode = ?cfg.fail_mode,
                    "store unavailable at start; answering per fail_mode and retrying"
                );
                StoreSlot::missing(e.to_string())
            }
        }
    };
    let shared_entries = matches!(
        cfg.store.kind,
        store::StoreKind::Redis(_) | store::StoreKind::Postgres(_)
    );
    let entries = match &cfg.admin.entries_file {
        // The store keeps the entries for every daemon; a file is only imported, once.
        _ if shared_entries => RuntimeEntries::shared(cfg.admin.entries_file.clone()),
        Some(path) => RuntimeEntries::load(path).with_context(|| {
            format!(
                "cannot load runtime entries (fix or move {} and start again)",
                path.display()
            )
        })?,
        None => RuntimeEntries::in_memory(),
    };
    let engine = cfg.engine.clone();
    let svc = Greylister::new(engine, slot, cfg.service_options()).with_entries(entries);
    let dns = gatherer(&cfg, &svc);
    let svc = Arc::new(svc.with_dns(dns));
    // The shared store's entries before the first request (bounded by the store timeout;
    // a store that does not answer is read by the poller when it does).
    svc.poll_entries(crate::service::unix_now()).await;
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let stops = server::StopSignals::new(shutdown.clone(), hard_stop.clone());
    // One set of replies for both front ends, swapped whole by a reload.
    let replies = Arc::new(ArcSwap::from_pointee(cfg.replies.clone()));
    let policy = Arc::new(PolicyContext {
        svc: svc.clone(),
        replies: replies.clone(),
        limits: cfg.policy.limits.clone(),
        stops: stops.clone(),
    });
    let milter = Arc::new(MilterContext {
        svc: svc.clone(),
        replies: replies.clone(),
        limits: cfg.milter.limits.clone(),
        stops: stops.clone(),
    });

    let traps = Traps::load(&cfg.smtp.traps).unwrap_or_else(|e| {
        tracing::error!(error = %e, "greytraps unreadable; running without them");
        Traps::default()
    });
    let tls = Arc::new(ArcSwapOption::from(match &cfg.smtp.tls {
        Some(files) => Some(Arc::new(load_acceptor(files).map_err(anyhow::Error::msg)?)),
        None => None,
    }));
    let guard = Arc::new(Guard::new(traps, cfg.smtp.tarpit.max_sessions));
    let smtp = Arc::new(SmtpContext {
        svc: svc.clone(),
        replies: replies.clone(),
        config: cfg.smtp.clone(),
        tls: tls.clone(),
        guard: guard.clone(),
        pool: SmtpContext::pool_for(&cfg.smtp),
        stops: stops.clone(),
    });

    let mut listeners = Vec::new();
    let policy_handler = Handler::Policy(policy.clone());
    let smtp_handler = Handler::Smtp(smtp.clone());
    let milter_handler = Handler::Milter(milter.clone());
    let wanted = cfg
        .policy
        .listen
        .iter()
        .map(|a| (a, "policy", &policy_handler));
    let wanted = wanted.chain(
        cfg.milter
            .listen
            .iter()
            .map(|a| (a, "milter", &milter_handler)),
    );
    for (addr, kind, handler) in wanted {
        let bound = Bound::bind(addr, cfg.policy.socket_mode)
            .await
            .with_context(|| format!("cannot listen on {addr} ({kind})"))?;
        listeners.push((vec![(bound, None)], kind, handler.clone()));
    }
    // The SMTP front's sessions run on threads of their own (see `server::threads`), with
    // a socket per thread on each address.
    let smtp_threads = match cfg.smtp.listen.is_empty() {
        true => None,
        false => Some(
            Threads::start(cfg.smtp.threads, "gg-smtp")
                .context("cannot start the SMTP front's threads")?,
        ),
    };
    for addr in &cfg.smtp.listen {
        let runtimes = smtp_threads.as_ref().map_or(&[][..], |t| t.handles());
        let sockets = Bound::bind_shared(*addr, runtimes.len())
            .with_context(|| format!("cannot listen on {addr} (smtp)"))?;
        let sockets = sockets
            .into_iter()
            .zip(runtimes.iter().cloned().map(Some))
            .collect();
        listeners.push((sockets, "smtp", smtp_handler.clone()));
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
    for (sockets, kind, _) in &listeners {
        if let Some((l, _)) = sockets.first() {
            tracing::info!(listener = %l.local_addr(), mode = ?cfg.mode, "{kind} listener ready");
        }
    }

    let token = cfg.admin.token.resolve_or_create();
    let admin_cfg = cfg.admin.clone();
    let flush_interval = cfg.store.flush_interval;
    if let Some(backend) = cfg.smtp.backend.clone()
        && !cfg.smtp.listen.is_empty()
    {
        let ctx = smtp.clone();
        tokio::spawn(async move { ctx.pool.reap(ctx.stops.shutdown.cancelled()).await });
        tokio::spawn(smtp::check_backend(
            backend,
            cfg.smtp.clone(),
            guard.clone(),
        ));
    }
    let smtp_reload = SmtpReload { tls, guard };
    let reloader = Arc::new(Reloader::new(
        svc.clone(),
        replies,
        loader,
        cfg,
        smtp_reload,
    ));
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
    if svc.entries.is_shared() {
        tokio::spawn(poll_entries(
            svc.clone(),
            admin_cfg.entries_poll,
            shutdown.clone(),
        ));
    }
    let listeners = listeners
        .into_iter()
        .map(|(sockets, _, handler)| server::Listener { sockets, handler })
        .collect();
    let mut serving = tokio::spawn(server::serve(listeners));

    // Reloads run one after another until the stop; a bad file keeps the running
    // configuration (the outcome is logged either way).
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(trigger) = reloads.recv() => {
                let _ = reloader.reload(trigger).await;
            }
        }
    }
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
    // Every connection has ended: the SMTP front's threads have nothing left to run.
    drop(smtp_threads);
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
