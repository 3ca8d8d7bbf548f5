//! `greygate lists`: `update` writes the client allow list of the big senders' ranges from
//! their own SPF records (the work is in `greygate::lists`); `domains` prints the domains it
//! asks about.
//!
//! Exit codes: 0 written (or printed), 1 a domain failed or the file could not be written
//! (the previous file stays), 2 usage or configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use greygate::config::{Config, built_in_comment};
use greygate::dur::Dur;
use greygate::lists::{self, MIN_PREFIX_V4, MIN_PREFIX_V6, Walked};

use super::admin::{admin_client, reload_through};
use super::common::{ConfigArgs, Exit, config_failed, runtime};

#[derive(Debug, Args)]
pub struct ListsArgs {
    #[command(subcommand)]
    pub action: ListsAction,
}

#[derive(Debug, Subcommand)]
pub enum ListsAction {
    /// Resolve the big senders' SPF records and write their ranges as a client allow list.
    ///
    /// Each domain's record is followed through include: and redirect=; ip4:, ip6:, a and
    /// mx give ranges (only with the + qualifier; ptr, exists and macros that name the
    /// client cannot be listed and are left out). RFC 7208's limits apply per domain: more
    /// than 10 DNS-querying terms, more than 2 lookups that find nothing, an mx with more
    /// than 10 names, an include loop, a missing or invalid record are errors. Ranges wider
    /// than /8 (IPv4) or /16 (IPv6) are left out with a warning. The ranges of all domains
    /// are merged and written at once (a temporary file renamed over the old one), each
    /// with its source domains as a comment. All or nothing: when any domain fails, nothing
    /// is written and the previous file stays (exit 1).
    Update(UpdateArgs),
    /// Print the domains `update` asks about, with who sends from each built-in one.
    Domains(DomainsArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 written, 1 a domain failed or the file could not be \
written (the previous file is kept), 2 usage or configuration."
)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Ask about DOMAIN instead of [lists] domains and extra_domains (repeat for several)
    #[arg(long = "domain", value_name = "DOMAIN")]
    pub domains: Vec<String>,
    /// Write the list to FILE [default: [lists] output, /var/lib/greygate/big-senders];
    /// the daemon reads [lists] output
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Ask this DNS server (IP:PORT) [default: [dns] resolver, else the system's resolvers]
    #[arg(long, value_name = "IP:PORT")]
    pub resolver: Option<SocketAddr>,
    /// Most time the lookups of one domain may take
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub timeout: Dur,
    /// Then make the running daemon reload (as `greygate reload` does), so the new ranges
    /// apply at once
    #[arg(long)]
    pub reload: bool,
    /// With --reload: the daemon's admin API [default: the first `[admin] listen` address]
    #[arg(long, value_name = "URL", env = "GREYGATE_ADMIN_URL")]
    pub admin: Option<String>,
    /// With --reload: the admin token [default: `[admin] token` or the token file]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GREYGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct DomainsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: ListsArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        ListsAction::Update(a) => update(a),
        ListsAction::Domains(a) => domains(&a),
    }
}

/// The configuration with the command's overrides. The file the update replaces is not
/// read: its content, even a damaged one, must not stop the update that repairs it.
fn load(config: &ConfigArgs, domains: &[String]) -> Result<Config, ExitCode> {
    let mut output = None;
    let loaded = config.load(|raw| {
        if !domains.is_empty() {
            raw.lists.domains = domains.to_vec();
            raw.lists.extra_domains.clear();
        }
        output = Some(std::mem::replace(
            &mut raw.lists.output,
            PathBuf::from("/dev/null"),
        ));
    });
    match loaded {
        Ok(mut cfg) => {
            if let Some(o) = output {
                cfg.lists.output = o;
            }
            Ok(cfg)
        }
        Err(e) => Err(config_failed(&e)),
    }
}

fn domains(a: &DomainsArgs) -> anyhow::Result<ExitCode> {
    let cfg = match load(&a.config, &[]) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let width = cfg.lists.domains.iter().map(String::len).max().unwrap_or(0);
    for d in &cfg.lists.domains {
        match built_in_comment(d) {
            Some(who) => println!("{d:width$}  # {who}"),
            None => println!("{d}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn update(a: UpdateArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match load(&a.config, &a.domains) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(o) = a.output {
        cfg.lists.output = o;
    }
    if cfg.lists.domains.is_empty() {
        eprintln!("greygate: no domains to ask about ([lists] domains is empty)");
        return Ok(Exit::Usage.into());
    }
    let server = a.resolver.or(cfg.dns.resolver);
    let results = runtime()?.block_on(async {
        let resolver = lists::resolver(server)?;
        anyhow::Ok(lists::resolve_all(&resolver, &cfg.lists.domains, a.timeout.0).await)
    })?;

    let mut walked: Vec<(String, Walked)> = Vec::new();
    let mut failed = 0;
    for r in results {
        match r.walked {
            Ok(w) => {
                println!(
                    "{}: {} ranges, {} DNS lookups",
                    r.domain,
                    w.ranges.len(),
                    w.lookups
                );
                for s in &w.skipped {
                    println!("  left out: {s}");
                }
                walked.push((r.domain, w));
            }
            Err(e) => {
                failed += 1;
                eprintln!("greygate: {}: {e}", r.domain);
            }
        }
    }
    let output = &cfg.lists.output;
    if failed > 0 {
        eprintln!(
            "greygate: {failed} of {} domains failed: nothing written, {} keeps the previous list",
            failed + walked.len(),
            output.display()
        );
        return Ok(Exit::Failure.into());
    }
    let (ranges, wide) = lists::merge(&walked);
    for w in &wide {
        eprintln!(
            "greygate: warning: {}: left out {} (from {}'s record): wider than /{} (IPv4) or /{} (IPv6)",
            w.domain, w.found.net, w.found.record, MIN_PREFIX_V4, MIN_PREFIX_V6
        );
    }
    let now = jiff::Timestamp::now().round(jiff::Unit::Second)?;
    let text = lists::render(&ranges, &walked, &now.to_string());
    lists::write(output, &text).with_context(|| {
        format!(
            "cannot write {} (the previous list stays)",
            output.display()
        )
    })?;
    println!(
        "wrote {} ranges from {} domains to {}",
        ranges.len(),
        walked.len(),
        output.display()
    );
    if a.reload {
        let client = admin_client(&cfg, a.admin, a.token);
        return reload_through(client.as_ref());
    }
    Ok(ExitCode::SUCCESS)
}
