//! `greygate serve`: the daemon. Command-line overrides, logging, the runtime, and the
//! signals: SIGTERM and SIGINT stop the daemon, SIGHUP reloads its configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use greygate::config::RawConfig;
use greygate::dur::Dur;
use greygate::engine::Mode;

use super::common::{ConfigArgs, config_failed};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Listen here instead of the configured addresses (repeatable): 127.0.0.1:10023, [::1]:10023, unix:/path
    #[arg(short, long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Serve the milter protocol here instead of the configured milter addresses (repeatable; without --listen, no policy listener)
    #[arg(long, value_name = "ADDR")]
    pub milter_listen: Vec<String>,
    /// Take SMTP here (e.g. [::]:25) and relay what passes to --smtp-backend, instead of the configured [smtp] addresses (repeatable; without --listen, no policy listener)
    #[arg(long, value_name = "ADDR")]
    pub smtp_listen: Vec<String>,
    /// The mail server the SMTP front relays to, instead of [smtp] backend
    #[arg(long, value_name = "HOST:PORT")]
    pub smtp_backend: Option<String>,
    /// Serve the admin API, /metrics and the dashboard here instead of the configured addresses (repeatable)
    #[arg(long, value_name = "ADDR", conflicts_with = "no_admin")]
    pub admin_listen: Vec<String>,
    /// Do not start the admin listener
    #[arg(long)]
    pub no_admin: bool,
    /// Use the embedded store in this file
    #[arg(long, value_name = "PATH", conflicts_with = "memory")]
    pub db: Option<PathBuf>,
    /// Keep the database in memory only (lost on restart)
    #[arg(long)]
    pub memory: bool,
    /// Greylisting delay, e.g. 300, 5m
    #[arg(long, value_name = "DURATION")]
    pub delay: Option<Dur>,
    /// Decide and log, but accept everything (warm the database before enforcing)
    #[arg(long)]
    pub learn: bool,
}

fn init_logging(level: &str, json: bool) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("GREYGATE_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Lines are written in batches by a thread of their own (one `write(2)` per 10 ms).
    let writer =
        greygate::logfmt::BatchedStderr::start().context("cannot start the log writer thread")?;
    greygate::logfmt::install(writer.clone(), !json);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        greygate::logfmt::flush();
        previous(info);
    }));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        // Same line as the default text format, for a fraction of its cost per decision.
        builder
            .fmt_fields(greygate::logfmt::QuickFields)
            .event_format(greygate::logfmt::QuickEvent)
            .init();
    }
    Ok(())
}

/// Applies `serve`'s command-line overrides to the file's configuration.
fn serve_overrides(args: &ServeArgs, raw: &mut RawConfig) {
    if !args.listen.is_empty() {
        raw.policy.listen = args.listen.clone();
    }
    if !args.milter_listen.is_empty() {
        raw.milter.listen = args.milter_listen.clone();
        if args.listen.is_empty() {
            // Milter addresses given alone mean a milter-only daemon.
            raw.policy.listen.clear();
        }
    }
    if !args.smtp_listen.is_empty() {
        raw.smtp.listen = args.smtp_listen.clone();
        if args.listen.is_empty() {
            // SMTP addresses given alone mean a daemon in front of a mail server only.
            raw.policy.listen.clear();
        }
    }
    if let Some(b) = &args.smtp_backend {
        raw.smtp.backend = Some(b.clone());
    }
    if !args.admin_listen.is_empty() {
        raw.admin.listen = Some(args.admin_listen.clone());
    }
    if args.no_admin {
        raw.admin.listen = Some(Vec::new());
    }
    // A store named on the command line replaces the configured one, server URL too.
    if let Some(db) = &args.db {
        raw.store.use_embedded(db);
    }
    if args.memory {
        raw.store.use_memory();
    }
    if let Some(d) = args.delay {
        raw.greylist.delay = d;
        if raw.greylist.retry_window.0 < d.0 {
            raw.greylist.retry_window = d;
        }
    }
    if args.learn {
        raw.mode = Mode::Learn;
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let args = Arc::new(args);
    let load = {
        let args = args.clone();
        move || args.config.load(|raw| serve_overrides(&args, raw))
    };
    let cfg = match load() {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    init_logging(&cfg.log.level, cfg.log.json)?;
    // No transparent huge pages for the daemon: mimalloc asks for them on its arenas, and
    // huge pages only partly used held 10 million triplets at 1.07 GB instead of 0.92 GB
    // (the loaded store's maps are spread over many arenas); throughput was the same.
    // SAFETY: sets a flag of this process; no pointers.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    fit_descriptor_limit(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let (stop, reloads) = signals()?;
        greygate::daemon::run(cfg, Arc::new(load), stop, reloads).await
    });
    drop(rt);
    greygate::logfmt::flush();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft file descriptor limit to what the configured connection limits need
/// (up to the hard limit), or says by how much it falls short: a daemon out of descriptors
/// can only refuse new clients.
fn fit_descriptor_limit(cfg: &greygate::config::Config) {
    use greygate::daemon::descriptors::{Limit, needed, raise_limit};
    let need = needed(cfg);
    match raise_limit(need.total()) {
        Ok(Limit::Enough { soft }) => {
            tracing::debug!(limit = soft, need = %need, "file descriptor limit suffices");
        }
        Ok(Limit::Raised { from, to }) => {
            tracing::info!(from, to, need = %need, "file descriptor limit raised");
        }
        Ok(Limit::Short { soft, hard }) => tracing::warn!(
            limit = soft, hard, need = %need,
            "file descriptor limit below what the connection limits need; raise it (LimitNOFILE= in the systemd unit) or lower max_connections: when descriptors run out, new connections are refused"
        ),
        Err(e) => {
            tracing::warn!(error = %e, need = %need, "cannot read or raise the file descriptor limit")
        }
    }
}

/// Maps the daemon's signals: SIGTERM and SIGINT complete the stop future, each SIGHUP
/// sends a reload. Handlers are installed before the daemon starts, so a signal sent while
/// it starts is not lost.
fn signals() -> anyhow::Result<(
    impl std::future::Future<Output = ()>,
    tokio::sync::mpsc::Receiver<&'static str>,
)> {
    use tokio::signal::unix::{SignalKind, signal};
    let stopped = super::common::stop_signal()?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A reload already waiting covers this one too.
            let _ = tx.try_send("SIGHUP");
        }
    });
    let stop = async move {
        let name = stopped.await;
        tracing::info!("{name} received");
    };
    Ok((stop, rx))
}
