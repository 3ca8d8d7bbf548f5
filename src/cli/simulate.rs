//! `greygate simulate` and `greygate replay`: clap arguments and the edges (files, exit
//! codes). The work is in `greygate::tools::simulate`.
//!
//! Exit codes: 0 done, 1 unreadable input or unwritable report, 2 bad scenario,
//! configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use greygate::tools::outbound::track;

use super::common::{ConfigArgs, Exit, config_failed};
use greygate::tools::maillog::Clock;
use greygate::tools::simulate::mta::Schedule;
use greygate::tools::simulate::{Scenario, replay, report};

#[derive(Debug, Args)]
#[command(
    after_help = "Shipped scenarios: contrib/scenarios/small-business.toml, big-providers.toml, spam-wave.toml, pregreet.toml.\n\
Exit codes: 0 done, 1 unwritable report, 2 bad scenario."
)]
pub struct SimulateArgs {
    /// Scenario file (TOML): sender classes, their MTAs and DNS facts, engine configurations
    #[arg(value_name = "SCENARIO")]
    pub scenario: PathBuf,
    /// Multiply every class's message count (e.g. 0.1 for a quick run, 10 for a busy site)
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
    pub scale: f64,
    /// Seed instead of the scenario's: same seed, same report
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report with charts to FILE
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// A sending MTA's default retry schedule.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RetryModel {
    Postfix,
    Exim,
    Exchange,
    Sendmail,
}

#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 done, 1 unreadable log, 2 bad configuration.")]
pub struct ReplayArgs {
    /// Inbound Postfix logs, plain or gzipped; rotated files are read oldest first. `-` or
    /// none: standard input
    #[arg(value_name = "LOG")]
    pub logs: Vec<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Retry schedule assumed for mail the log shows accepted at once (its sender never had to retry)
    #[arg(long, value_name = "MTA", default_value = "postfix")]
    pub retry_model: RetryModel,
    /// Rows per table (sender domains, clients)
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub top: usize,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Year of the first line for year-less syslog timestamps [default: this year, or last
    /// year if the log starts in a later month than now]
    #[arg(long)]
    pub year: Option<i64>,
}

pub fn simulate(args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let name = args.scenario.display().to_string();
    let text = match std::fs::read_to_string(&args.scenario) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("greygate: {name}: cannot read: {e}");
            return Ok(Exit::Usage.into());
        }
    };
    let mut scenario = match Scenario::parse(&name, &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("greygate: invalid scenario:\n{e}");
            return Ok(Exit::Usage.into());
        }
    };
    if !(args.scale > 0.0 && args.scale.is_finite()) {
        eprintln!("greygate: --scale must be a positive number");
        return Ok(Exit::Usage.into());
    }
    scenario.scale(args.scale);
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    let report = greygate::tools::simulate::run(&scenario);
    if let Some(path) = &args.html {
        std::fs::write(path, report::render_html(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn replay(args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let cfg = match args.config.load(|_| {}) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let mut logs = args.logs.clone();
    if logs.is_empty() {
        logs.push(PathBuf::from("-"));
    }
    track::order_rotated(&mut logs);
    let clock = Clock::for_year_or_today(args.year);
    let mut reader = replay::Reader::new(clock);
    for path in &logs {
        let input = track::open_log(path).with_context(|| format!("reading {}", path.display()))?;
        reader
            .feed_reader(input)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    let schedule = match args.retry_model {
        RetryModel::Postfix => Schedule::postfix(),
        RetryModel::Exim => Schedule::exim(),
        RetryModel::Exchange => Schedule::exchange(),
        RetryModel::Sendmail => Schedule::sendmail(),
    };
    let report = replay::replay(reader, &cfg.engine, cfg.dns.enabled, &schedule);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", replay::render_text(&report, args.top));
    }
    Ok(ExitCode::SUCCESS)
}
