//! The `greygate` binary: CLI dispatch, logging, signals and exit codes (anyhow only here).
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration, 3 the store is
//! held by a running daemon; `probe`: 0 accepted, 4 greylisted, 5 other temporary failure,
//! 6 rejected, 7 no connection.

mod admin_cmd;
mod cli;
mod outbound_cmd;
mod simulate_cmd;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

use cli::{BenchArgs, CheckConfigArgs, Cli, Command, ExplainArgs, ServeArgs};
use greygate::config::{self, Config, ConfigErrors, RawConfig, Source, StoreKind};
use greygate::engine::{Mode, Request};
use greygate::service::unix_now;
use greygate::store::{OpenError, PostgresStore, RedisStore};

const EXIT_RUNTIME: u8 = 1;
/// Bad usage or configuration (clap also exits 2 on usage errors).
const EXIT_CONFIG: u8 = 2;
const EXIT_STORE_BUSY: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Not for the daemon nor the benchmark's servers and clients: a peer closing its socket
    // must end that connection, not the process.
    if !matches!(cli.command, Command::Serve(_) | Command::Bench(_)) {
        // Report commands end quietly when their reader goes away (`| head`), as Unix
        // tools do, instead of panicking on a failed print.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check_config(&args),
        Command::Explain(args) => explain(args),
        Command::Probe(args) => outbound_cmd::probe(args),
        Command::Track(args) => outbound_cmd::track(args),
        Command::Stats(args) => admin_cmd::stats(args),
        Command::List(args) => admin_cmd::list(args),
        Command::Purge(args) => admin_cmd::purge(args),
        Command::Allow(args) => admin_cmd::runtime_entries(greygate::engine::ListKind::Allow, args),
        Command::Deny(args) => admin_cmd::runtime_entries(greygate::engine::ListKind::Deny, args),
        Command::Reload(args) => admin_cmd::reload(args),
        Command::Bench(args) => bench(args),
        Command::Simulate(args) => simulate_cmd::simulate(&args),
        Command::Replay(args) => simulate_cmd::replay(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("greygate: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Reads and validates the configuration; `tweak` applies command-line overrides first.
pub(crate) fn load_config(
    args: &cli::ConfigArgs,
    tweak: impl FnOnce(&mut RawConfig),
) -> Result<Config, ConfigErrors> {
    let (path, explicit) = args.path();
    let (mut raw, text) = config::load_raw(&path, explicit)?;
    tweak(&mut raw);
    let name = path.display().to_string();
    let src = text.as_deref().map(|text| Source { name: &name, text });
    raw.validate(src.as_ref())
}

pub(crate) fn config_failed(e: &ConfigErrors) -> ExitCode {
    eprintln!("greygate: invalid configuration:\n{e}");
    ExitCode::from(EXIT_CONFIG)
}

fn check_config(args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let cfg = match load_config(&args.config, |_| {}) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let (path, _) = args.config.path();
    let (clients, recipients, senders) = cfg.engine.allow.counts();
    let p = &cfg.engine.policy;
    let store = match &cfg.store {
        StoreKind::Memory => "memory".to_string(),
        StoreKind::Embedded(path) => format!("embedded {}", path.display()),
        StoreKind::Redis(server) => format!("redis {server}"),
        StoreKind::Postgres(server) => format!("postgres {server}"),
    };
    println!("{}: configuration OK", path.display());
    println!(
        "  mode {:?}, delay {} s, retry window {} s, max age {} s, auto-allow after {} passes",
        cfg.mode, p.delay, p.retry_window, p.max_age, p.auto_allow_after
    );
    println!(
        "  client groups IPv4 /{} IPv6 /{}; store {store}; fail mode {:?}",
        p.ipv4_prefix, p.ipv6_prefix, cfg.fail_mode
    );
    let listen: Vec<String> = cfg.listen.iter().map(ToString::to_string).collect();
    println!("  policy listeners: {}", listen.join(", "));
    println!("  allow lists: {clients} client, {recipients} recipient, {senders} sender entries");
    let order: Vec<&str> = cfg
        .engine
        .selective
        .identity_order
        .iter()
        .map(|k| k.as_str())
        .collect();
    if cfg.dns.enabled {
        println!(
            "  client identity: {}; DNS budget {} ms, {} DNSWL and {} DNSBL zone(s)",
            order.join(", "),
            cfg.dns.budget.as_millis(),
            cfg.dns.dnswl_zones.len(),
            cfg.dns.dnsbl_zones.len()
        );
    } else {
        println!(
            "  client identity: prefix (DNS off; order {})",
            order.join(", ")
        );
    }
    if args.connect {
        return check_connection(&cfg);
    }
    Ok(ExitCode::SUCCESS)
}

/// `check-config --connect`: asks the store's server who it is (and lets the postgres
/// backend create or migrate its schema, as the daemon would).
fn check_connection(cfg: &Config) -> anyhow::Result<ExitCode> {
    let server = match &cfg.store {
        StoreKind::Redis(s) | StoreKind::Postgres(s) => s,
        StoreKind::Memory | StoreKind::Embedded(_) => {
            println!("  store: no server to connect to");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Unlike a request, the check may spend its whole connect_timeout on connecting.
    let limit = server.connect_timeout + cfg.store_timeout;
    let answer = rt.block_on(async {
        match &cfg.store {
            StoreKind::Redis(s) => {
                RedisStore::new(&s.url, s.connect_timeout, limit)?
                    .check()
                    .await
            }
            _ => {
                PostgresStore::new(&server.url, 1, server.connect_timeout, limit)?
                    .check()
                    .await
            }
        }
    });
    match answer {
        Ok(who) => {
            println!("  store server answered: {who}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("greygate: cannot use the store at {server}: {e}");
            Ok(ExitCode::from(EXIT_RUNTIME))
        }
    }
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
    if !args.admin_listen.is_empty() {
        raw.admin.listen = Some(args.admin_listen.clone());
    }
    if args.no_admin {
        raw.admin.listen = Some(Vec::new());
    }
    // A store named on the command line replaces the configured one, server URL too.
    if let Some(db) = &args.db {
        raw.store.backend = "embedded".into();
        raw.store.path = db.clone();
        raw.store.url.clear();
    }
    if args.memory {
        raw.store.backend = "memory".into();
        raw.store.url.clear();
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

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let args = Arc::new(args);
    let load = {
        let args = args.clone();
        move || load_config(&args.config, |raw| serve_overrides(&args, raw))
    };
    let cfg = match load() {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    init_logging(&cfg.log_level, cfg.log_json)?;
    // No transparent huge pages for the daemon: mimalloc asks for them on its arenas, and
    // huge pages only partly used held 10 million triplets at 1.07 GB instead of 0.92 GB
    // (the loaded store's maps are spread over many arenas); throughput was the same.
    // SAFETY: sets a flag of this process; no pointers.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(greygate::daemon::run(cfg, Arc::new(load)));
    drop(rt);
    greygate::logfmt::flush();
    result?;
    Ok(ExitCode::SUCCESS)
}

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    if args.live {
        let daemon = admin_cmd::DaemonArgs {
            config: args.config.clone(),
            admin: args.admin.clone(),
            token: None,
            offline: false,
        };
        let query = [
            ("client", args.client.to_string()),
            ("name", args.name.clone()),
            ("from", args.from.clone()),
            ("to", args.to.clone()),
            ("sasl_user", args.sasl_user.clone()),
            ("at", args.at.clone().unwrap_or_default()),
        ];
        if let Some(code) = admin_cmd::explain_live(&daemon, &query, args.json)? {
            return Ok(code);
        }
    }
    let cfg = match load_config(&args.config, |raw| {
        if let Some(db) = &args.db {
            raw.store.backend = "embedded".into();
            raw.store.path = db.clone();
            raw.store.url.clear();
        }
    }) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let now = match args.at.as_deref().map(greygate::explain::parse_time) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("greygate: --at {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        None => unix_now(),
    };
    let req = Request {
        stage: "RCPT".into(),
        client_ip: Some(args.client),
        client_name: args.name.clone(),
        helo: String::new(),
        sender: args.from.clone(),
        recipient: args.to.clone(),
        sasl_username: args.sasl_user.clone(),
        reverse_client_name: String::new(),
        facts: None,
    };
    let (reader, busy) =
        match greygate::store::open_for_command(&cfg.store, cfg.store_timeout, false) {
            Ok(store) => (Ok(store), false),
            Err(e) => (Err(e.to_string()), matches!(e, OpenError::Busy(_))),
        };
    let (replies, _) = greygate::daemon::replies(&cfg);
    let enforced = cfg.mode == Mode::Enforce;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store_ref = reader.as_deref().map_err(Clone::clone);
    // DNS facts as the daemon would gather them; a resolver that cannot be set up only
    // means the explanation goes without (as the daemon's requests would).
    let dns = if cfg.dns.enabled {
        let _in_runtime = rt.enter();
        let stats = std::sync::Arc::default();
        match greygate::dns::Gatherer::new(&cfg.dns, &cfg.hostname, stats) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("greygate: {e}; explaining without DNS facts");
                None
            }
        }
    } else {
        None
    };
    let result = rt.block_on(greygate::explain::explain(
        &cfg.engine,
        store_ref,
        dns.as_ref(),
        &req,
        now,
        |d| replies.action_text(d, enforced, now),
    ));
    match result {
        Ok(x) if args.json => println!("{}", serde_json::to_string_pretty(&x)?),
        Ok(x) => print!("{}", x.to_text()),
        Err(e) => {
            eprintln!("greygate: {e}");
            return Ok(ExitCode::from(if busy {
                EXIT_STORE_BUSY
            } else {
                EXIT_RUNTIME
            }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    use greygate::bench;
    if let Some(addr) = &args.null_server {
        bench::run_null_server(addr, |bound| {
            eprintln!("greygate bench: null responder listening on {bound}");
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if let (Some(count), Some(db)) = (args.preload, &args.db) {
        let report = bench::preload(db, count, args.batch, args.seed, unix_now(), |done| {
            eprintln!("greygate bench: {done} triplets written");
        })?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "preloaded {} triplets and {} client records into {} in {:.1} s ({} bytes)",
                report.triplets, report.clients, report.path, report.seconds, report.file_bytes
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = bench::LoadOptions {
        label: args.label,
        target: args.target,
        connections: args.connections,
        stop: match args.requests {
            Some(n) => bench::Stop::Requests(n),
            None => bench::Stop::Duration(args.duration.0),
        },
        warmup: args.warmup.0,
        rate: args.rate,
        arrival: args.arrival,
        seed: args.seed,
        stream: bench::StreamConfig {
            mix: args.mix,
            ipv6: args.ipv6,
            retry_pool: args.retry_pool,
        },
        threads: args.threads,
        protocol: args.protocol,
    };
    let report = bench::run_load(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
