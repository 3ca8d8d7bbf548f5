//! The binary's side: one module per command or group of commands, each with its clap
//! arguments and its `run`; `common` holds what they share (`--config`, exit codes).
//! Library code never prints for a command nor picks an exit code; this side does.

mod admin;
mod bench;
mod check;
mod common;
mod explain;
mod generate;
mod import;
mod lists;
mod probe;
mod serve;
mod simulate;
mod track;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use common::Exit;

/// greygate: greylisting for Postfix and other MTAs.
///
/// Unknown (client, sender, recipient) combinations are answered "try again later"; real
/// mail servers retry and get through, spam bots mostly don't.
#[derive(Debug, Parser)]
#[command(
    name = "greygate",
    version,
    about,
    long_about,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: policy, milter and SMTP listeners, admin API, metrics and dashboard.
    Serve(serve::ServeArgs),
    /// Check the configuration and allow-list files; report every problem with its line.
    CheckConfig(check::CheckConfigArgs),
    /// Read the embedded store file without writing; say whether the daemon can load it.
    CheckStore(check::CheckStoreArgs),
    /// Explain what greygate would decide for a request, without changing anything.
    Explain(explain::ExplainArgs),
    /// Ask a recipient's mail servers whether they accept, greylist or reject (no mail is sent).
    Probe(probe::ProbeArgs),
    /// Rebuild delivery timelines from Postfix or Exim logs; report greylisting per destination.
    Track(track::TrackArgs),
    /// Counters of the running daemon (or the store's record counts when none runs).
    Stats(admin::StatsArgs),
    /// List greylisting records: pending and passed triplets, auto-allowed client groups.
    List(admin::ListArgs),
    /// Forget greylisting records that match a filter.
    Purge(admin::PurgeArgs),
    /// Accept a pending triplet's next retry at once (or every pending triplet of a recipient).
    Release(admin::ReleaseArgs),
    /// Runtime allow entries: skip greylisting for a client, sender or recipient now.
    Allow(admin::RuntimeArgs),
    /// Runtime deny entries: always answer "try again later".
    Deny(admin::RuntimeArgs),
    /// Make the running daemon reload its configuration and allow-list files.
    Reload(admin::ReloadArgs),
    /// Client allow lists of the big senders' ranges, from their own SPF records.
    Lists(lists::ListsArgs),
    /// Benchmarks: load a policy server, run a null responder, or preload a store.
    Bench(bench::BenchArgs),
    /// Replay a scenario of senders and their MTAs through the engine on a simulated clock;
    /// compare configurations by delivered, lost, added delay and spam accepted.
    Simulate(simulate::SimulateArgs),
    /// Feed a site's own inbound Postfix log through the engine offline: what greylisting
    /// would have delayed.
    Replay(simulate::ReplayArgs),
    /// Carry postgrey's or sqlgrey's database into the store, so that switching greylists
    /// no known correspondent again.
    Import(import::ImportArgs),
    /// Manual pages and shell completions for packages (scripts/package).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

impl Command {
    /// The daemon and the benchmark's servers and clients live with sockets that peers
    /// close; report commands write to a reader that may go away (`| head`).
    fn serves(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::Bench(_))
    }
}

/// Runs the command; an error is printed here, with the exit code for a failure.
pub fn run(cli: Cli) -> ExitCode {
    if !cli.command.serves() {
        // Report commands end quietly when their reader goes away, as Unix tools do,
        // instead of panicking on a failed print.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => check::run(&args),
        Command::CheckStore(args) => check::run_store(&args),
        Command::Explain(args) => explain::run(args),
        Command::Probe(args) => probe::probe(args),
        Command::Track(args) => track::track(args),
        Command::Stats(args) => admin::stats(args),
        Command::List(args) => admin::list(args),
        Command::Purge(args) => admin::purge(args),
        Command::Release(args) => admin::release(args),
        Command::Allow(args) => admin::runtime_entries(greygate::engine::ListKind::Allow, args),
        Command::Deny(args) => admin::runtime_entries(greygate::engine::ListKind::Deny, args),
        Command::Reload(args) => admin::reload(args),
        Command::Lists(args) => lists::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Simulate(args) => simulate::simulate(&args),
        Command::Replay(args) => simulate::replay(&args),
        Command::Import(args) => import::run(args),
        Command::Generate(args) => generate::run(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("greygate: {e:#}");
        Exit::Failure.into()
    })
}
