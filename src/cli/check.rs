//! `greygate check-config`: check the configuration, allow-list and domain files, summarise what
//! they set, and with `--connect` ask the store's server who it is; `greygate check-store`:
//! read the embedded store file offline and say what the daemon would do with it.

use std::process::ExitCode;

use clap::Args;

use greygate::config::Config;
use greygate::store::{self, StoreError, StoreKind};

use super::common::{ConfigArgs, Exit, config_failed, runtime};

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also connect to the store's server (redis, postgres) and report what answered
    #[arg(long)]
    pub connect: bool,
}

pub fn run(args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let cfg = match args.config.load(|_| {}) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let (path, _) = args.config.path();
    let (clients, recipients, senders) = cfg.engine.allow.counts();
    let p = &cfg.engine.policy;
    let store = &cfg.store.kind;
    println!("{}: configuration OK", path.display());
    println!(
        "  mode {:?}, delay {} s, retry window {} s, max age {} s, auto-allow after {} passes",
        cfg.mode, p.delay, p.retry_window, p.max_age, p.auto_allow_after
    );
    println!(
        "  client groups IPv4 /{} IPv6 /{}; store {store}; fail mode {:?}",
        p.ipv4_prefix, p.ipv6_prefix, cfg.fail_mode
    );
    if cfg.engine.addresses.is_hashed() {
        println!(
            "  addresses stored as keyed digests ({})",
            cfg.store.addresses
        );
    }
    let listen: Vec<String> = cfg.policy.listen.iter().map(ToString::to_string).collect();
    println!("  policy listeners: {}", listen.join(", "));
    if !cfg.milter.listen.is_empty() {
        let listen: Vec<String> = cfg.milter.listen.iter().map(ToString::to_string).collect();
        println!("  milter listeners: {}", listen.join(", "));
    }
    if !cfg.smtp.listen.is_empty() {
        let s = &cfg.smtp;
        let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        println!(
            "  SMTP front: {} -> backend {}; STARTTLS {}; pregreet wait {:?}; {} greytrap entries",
            listen.join(", "),
            s.backend.as_deref().unwrap_or("(none)"),
            if s.tls.is_some() { "on" } else { "off" },
            s.pregreet.wait,
            greygate::server::smtp::Traps::load(&s.traps).map_or(0, |t| t.len())
        );
    }
    println!("  allow lists: {clients} client, {recipients} recipient, {senders} sender entries");
    let sections = cfg.engine.domains.sections();
    if !sections.is_empty() {
        let from_files = sections
            .iter()
            .filter(|s| s.applied.source.is_some())
            .count();
        println!(
            "  domain sections: {} in the configuration, {from_files} file lines",
            sections.len() - from_files
        );
    }
    let order: Vec<&str> = cfg
        .engine
        .selective
        .identity_order
        .iter()
        .map(|k| k.as_str())
        .collect();
    if cfg.dns.enabled {
        println!(
            "  client identity: {}; DNS budget {} ms via {}, host names {}, {} DNSWL and {} DNSBL zone(s)",
            order.join(", "),
            cfg.dns.budget.as_millis(),
            cfg.dns
                .resolver
                .map_or_else(|| "the system's resolver".to_string(), |a| a.to_string()),
            if cfg.dns.ptr_lookup {
                "the MTA's or looked up"
            } else {
                "the MTA's only"
            },
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
    let answer = runtime()?.block_on(store::check(&cfg.store));
    match (answer, &cfg.store.kind) {
        (Ok(Some(who)), _) => {
            println!("  store server answered: {who}");
            Ok(ExitCode::SUCCESS)
        }
        (Ok(None), _) => {
            println!("  store: no server to connect to");
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), StoreKind::Redis(server) | StoreKind::Postgres(server)) => {
            eprintln!("greygate: cannot use the store at {server}: {e}");
            Ok(Exit::Failure.into())
        }
        (Err(e), kind) => {
            eprintln!("greygate: cannot use the {kind} store: {e}");
            Ok(Exit::Failure.into())
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckStoreArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Check this embedded store file instead of the configured one
    #[arg(long, value_name = "PATH")]
    pub db: Option<std::path::PathBuf>,
}

/// `greygate check-store`: reads every row of the embedded store file without writing and
/// says what `greygate serve` would do with it.
pub fn run_store(args: &CheckStoreArgs) -> anyhow::Result<ExitCode> {
    let cfg = match args.config.load(|raw| {
        if let Some(db) = &args.db {
            raw.store.use_embedded(db);
        }
    }) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let StoreKind::Embedded(path) = &cfg.store.kind else {
        eprintln!(
            "greygate: check-store reads an embedded store file; the {} store has none \
             (check-config --connect asks a store server)",
            cfg.store.kind
        );
        return Ok(Exit::Usage.into());
    };
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("{shown}: does not exist; greygate serve would start a new store there");
            return Ok(ExitCode::SUCCESS);
        }
        Ok(m) if m.len() == 0 => {
            println!("{shown}: empty (0 bytes); greygate serve would start a new store in it");
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    match store::verify(path) {
        Ok(v) => {
            println!(
                "{shown}: OK, {} triplets and {} client records readable",
                v.triplets, v.clients
            );
            if v.undecodable > 0 {
                println!(
                    "  {} rows this version cannot decode (greygate serve leaves them on disk)",
                    v.undecodable
                );
            }
            if v.repaired {
                println!(
                    "  not closed cleanly: greygate serve repairs it at start (checked on a repaired copy)"
                );
            }
            if v.journal_rows > 0 {
                println!(
                    "  {} journaled commits not merged yet (greygate serve merges them at start)",
                    v.journal_rows
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(StoreError::Corrupt { reason, .. }) => {
            println!("{shown}: cannot be read: {reason}");
            println!(
                "  greygate serve would set it aside untouched as {shown}.corrupt-<unix time> \
                 and start a new, empty store in its place"
            );
            Ok(Exit::Failure.into())
        }
        Err(e @ StoreError::Locked { .. }) => {
            eprintln!("greygate: {e}");
            Ok(Exit::StoreBusy.into())
        }
        Err(e) => {
            eprintln!("greygate: {e}");
            Ok(Exit::Failure.into())
        }
    }
}
