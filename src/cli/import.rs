//! `greygate import postgrey|sqlgrey`: carry what postgrey or sqlgrey learnt into the
//! configured store, so that switching does not greylist every known correspondent again.
//!
//! Exit codes: 0 done (also with records skipped: the report says which and why), 1 the
//! source or the store failed, 2 usage or configuration, 3 the embedded store is held by a
//! running daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};

use greygate::config::Config;
use greygate::dur::Dur;
use greygate::engine::IdentityKind;
use greygate::import::{self, ImportError, Importer, postgrey, sqlgrey};
use greygate::service::unix_now;
use greygate::store::{self, Access, Store, StoreError, StoreKind};

use super::common::{ConfigArgs, Exit, config_failed, runtime};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub source: ImportSource,
}

#[derive(Debug, Subcommand)]
pub enum ImportSource {
    /// Import postgrey's database directory: its triplets (passed ones pass at once, pending
    /// ones keep their first sighting) and its client auto-whitelist.
    ///
    /// Reads postgrey.db and postgrey_clients.db through Berkeley DB's db_dump (Debian
    /// package db5.3-util). Give the options postgrey ran with (POSTGREY_OPTS in
    /// /etc/default/postgrey) where they differ from its defaults.
    ///
    /// An embedded store must not be held by a running daemon (exit code 3: stop it, import,
    /// start it); Redis and PostgreSQL stores may be imported into while daemons serve.
    /// Records greygate holds as new or newer are kept, so the import may run again.
    Postgrey(PostgreyArgs),
    /// Import sqlgrey's database: its pending triplets (connect; those its allow lists cover
    /// as passed) and its from_awl and domain_awl rows, as passes of their client groups
    /// towards auto-allow.
    ///
    /// URL: postgres://USER:PASSWORD@HOST/DB (PostgreSQL), or sqlite:PATH (SQLite, e.g.
    /// sqlite:/var/lib/sqlgrey/sqlgrey.db). MySQL is not supported. sqlgrey may keep running:
    /// its database is only read.
    ///
    /// An embedded store must not be held by a running daemon (exit code 3: stop it, import,
    /// start it); Redis and PostgreSQL stores may be imported into while daemons serve.
    /// Records greygate holds as new or newer are kept, so the import may run again.
    Sqlgrey(SqlgreyArgs),
}

/// Where the records go, and how.
#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Import into this embedded store file instead of the configured store
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Read the source and the store and report what would be merged; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PostgreyArgs {
    /// postgrey's database directory (its --dbdir; Debian: /var/lib/postgrey)
    #[arg(value_name = "DBDIR")]
    pub dbdir: PathBuf,
    #[command(flatten)]
    pub target: TargetArgs,
    /// postgrey's --delay (seconds, or e.g. 5m): a triplet last seen at least this long after
    /// its first sighting had passed
    #[arg(long, value_name = "DURATION", default_value = "300")]
    pub delay: Dur,
    /// postgrey's --ipv4cidr: the width of its IPv4 client networks
    #[arg(long, value_name = "N", default_value_t = 24, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub ipv4cidr: u8,
    /// postgrey's --ipv6cidr: the width of its IPv6 client networks
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub ipv6cidr: u8,
    /// postgrey ran with --lookup-by-host: its keys hold whole client addresses
    #[arg(long)]
    pub lookup_by_host: bool,
    /// postgrey's --auto-whitelist-clients: the passes after which it whitelisted a client
    /// (0: it kept no client whitelist)
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub auto_whitelist_clients: u32,
    /// The db_dump program [default: db_dump, db5.3_dump, ... found on PATH]
    #[arg(long, value_name = "PATH")]
    pub db_dump: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SqlgreyArgs {
    /// sqlgrey's database: postgres://USER:PASSWORD@HOST/DB or sqlite:PATH
    #[arg(value_name = "URL")]
    pub url: String,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub fn run(args: ImportArgs) -> anyhow::Result<ExitCode> {
    match args.source {
        ImportSource::Postgrey(a) => run_postgrey(a),
        ImportSource::Sqlgrey(a) => run_sqlgrey(a),
    }
}

/// The configuration (with `--db`), the store opened for the import, and its name.
struct Target {
    cfg: Config,
    store: Option<Arc<dyn Store>>,
    name: String,
}

fn open_target(t: &TargetArgs) -> Result<Target, ExitCode> {
    let cfg = t
        .config
        .load(|raw| {
            if let Some(db) = &t.db {
                raw.store.use_embedded(db);
            }
        })
        .map_err(|e| config_failed(&e))?;
    let name = cfg.store.kind.to_string();
    if cfg.store.kind == StoreKind::Memory {
        eprintln!(
            "greygate: the memory store lives only inside the running daemon: import into \
             the embedded store (--db PATH) or a shared one (redis, postgres)"
        );
        return Err(Exit::Usage.into());
    }
    // A dry run reads; the embedded file may not exist yet (then nothing is there).
    let missing = matches!(&cfg.store.kind, StoreKind::Embedded(p) if !p.exists());
    let store = if t.dry_run && missing {
        None
    } else {
        let access = if t.dry_run {
            Access::Read
        } else {
            Access::Write
        };
        match store::open(&cfg.store, access) {
            Ok(s) => Some(s),
            Err(e @ StoreError::Locked { .. }) => {
                eprintln!(
                    "greygate: {e}\ngreygate: stop the daemon first (an import writes the \
                     embedded file itself), then start it again"
                );
                return Err(Exit::StoreBusy.into());
            }
            Err(e) => {
                eprintln!("greygate: {e}");
                return Err(Exit::Failure.into());
            }
        }
    };
    Ok(Target { cfg, store, name })
}

/// Notes on the greygate side: settings under which imported records will not be found.
fn target_notes(imp: &mut Importer, cfg: &Config) {
    let order = &cfg.engine.selective.identity_order;
    if cfg.dns.enabled && order.first().is_some_and(|k| *k != IdentityKind::Prefix) {
        imp.note(
            "[dns] is on with spf:/org: identities first: imported records are keyed by client \
             network, so requests keyed by an spf: or org: identity do not find them",
        );
    }
}

fn print(report: &import::Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn failed(e: &ImportError) -> ExitCode {
    eprintln!("greygate: import failed: {e}");
    Exit::Failure.into()
}

fn run_postgrey(a: PostgreyArgs) -> anyhow::Result<ExitCode> {
    let opts = postgrey::PostgreyOptions {
        delay: a.delay.0.as_secs(),
        ipv4cidr: a.ipv4cidr,
        ipv6cidr: a.ipv6cidr,
        lookup_by_host: a.lookup_by_host,
        auto_whitelist_clients: a.auto_whitelist_clients,
    };
    // The source first: a failed import leaves no new store file behind.
    let tool = match postgrey::find_db_dump(a.db_dump.as_deref())
        .and_then(|t| postgrey::check_dbdir(&a.dbdir).map(|()| t))
    {
        Ok(t) => t,
        Err(e) => return Ok(failed(&e)),
    };
    let target = match open_target(&a.target) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let source = format!(
        "postgrey {} (read by {}; postgrey's --delay={} --ipv4cidr={} --ipv6cidr={}{} \
         --auto-whitelist-clients={})",
        a.dbdir.display(),
        tool.display(),
        opts.delay,
        opts.ipv4cidr,
        opts.ipv6cidr,
        if opts.lookup_by_host {
            " --lookup-by-host"
        } else {
            ""
        },
        opts.auto_whitelist_clients
    );
    let engine = target.cfg.engine.clone();
    let auto_allow_after = engine.policy.auto_allow_after;
    let mut imp = Importer::new(
        engine,
        target.store,
        a.target.dry_run,
        unix_now(),
        source,
        target.name,
    );
    target_notes(&mut imp, &target.cfg);
    let rt = runtime()?;
    if let Err(e) = postgrey::import(&mut imp, &rt, &a.dbdir, &tool, &opts) {
        return Ok(failed(&e));
    }
    let report = match rt
        .block_on(imp.finish(|count| postgrey::client_count(count, &opts, auto_allow_after)))
    {
        Ok(r) => r,
        Err(e) => return Ok(failed(&e)),
    };
    print(&report, a.target.json)?;
    Ok(ExitCode::SUCCESS)
}

fn run_sqlgrey(a: SqlgreyArgs) -> anyhow::Result<ExitCode> {
    let source = match sqlgrey::Source::parse(&a.url) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("greygate: {e}");
            return Ok(Exit::Usage.into());
        }
    };
    let rt = runtime()?;
    // The source first: a database that cannot be read leaves no new store file behind.
    let db = match rt.block_on(sqlgrey::SqlgreyDb::open(&source)) {
        Ok(db) => db,
        Err(e) => return Ok(failed(&e)),
    };
    let target = match open_target(&a.target) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let mut imp = Importer::new(
        target.cfg.engine.clone(),
        target.store,
        a.target.dry_run,
        unix_now(),
        format!("sqlgrey {}", source.shown()),
        target.name,
    );
    target_notes(&mut imp, &target.cfg);
    imp.note(
        "from_awl and domain_awl rows count as passes of their client group towards \
         auto-allow (greygate allows client groups, not a sender at a client); connect rows \
         they cover are imported as passed",
    );
    let report = rt.block_on(async {
        sqlgrey::import(&mut imp, db).await?;
        imp.finish(|passes| passes).await
    });
    match report {
        Ok(r) => {
            print(&r, a.target.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failed(&e)),
    }
}
