//! Command-line definitions (clap).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use greygate::bench::{Arrival, Mix};
use greygate::config::{DEFAULT_CONFIG_PATH, Dur, ListenAddr};

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
    /// Run the daemon: policy and milter listeners, admin API, metrics and dashboard.
    Serve(ServeArgs),
    /// Check the configuration and allow-list files; report every problem with its line.
    CheckConfig(CheckConfigArgs),
    /// Explain what greygate would decide for a request, without changing anything.
    Explain(ExplainArgs),
    /// Ask a recipient's mail servers whether they accept, greylist or reject (no mail is sent).
    Probe(crate::outbound_cmd::ProbeArgs),
    /// Rebuild delivery timelines from Postfix logs; report greylisting per destination.
    Track(crate::outbound_cmd::TrackArgs),
    /// Counters of the running daemon (or the store's record counts when none runs).
    Stats(crate::admin_cmd::StatsArgs),
    /// List greylisting records: pending and passed triplets, auto-allowed client groups.
    List(crate::admin_cmd::ListArgs),
    /// Forget greylisting records that match a filter.
    Purge(crate::admin_cmd::PurgeArgs),
    /// Runtime allow entries: skip greylisting for a client, sender or recipient now.
    Allow(crate::admin_cmd::RuntimeArgs),
    /// Runtime deny entries: always answer "try again later".
    Deny(crate::admin_cmd::RuntimeArgs),
    /// Make the running daemon reload its configuration and allow-list files.
    Reload(crate::admin_cmd::ReloadArgs),
    /// Benchmarks: load a policy server, run a null responder, or preload a store.
    Bench(BenchArgs),
    /// Replay a scenario of senders and their MTAs through the engine on a simulated clock;
    /// compare configurations by delivered, lost, added delay and spam accepted.
    Simulate(crate::simulate_cmd::SimulateArgs),
    /// Feed a site's own inbound Postfix log through the engine offline: what greylisting
    /// would have delayed.
    Replay(crate::simulate_cmd::ReplayArgs),
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// Configuration file [default: /etc/greygate/greygate.toml if it exists, else built-in defaults]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also connect to the store's server (redis, postgres) and report what answered
    #[arg(long)]
    pub connect: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Listen here instead of the configured addresses (repeatable): 127.0.0.1:10023, [::1]:10023, unix:/path
    #[arg(short, long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Serve the milter protocol here instead of the configured milter addresses (repeatable)
    #[arg(long, value_name = "ADDR")]
    pub milter_listen: Vec<String>,
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

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Read this embedded store instead of the configured one
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Client IP address
    #[arg(long, value_name = "IP")]
    pub client: IpAddr,
    /// Verified client host name (Postfix's client_name); with [dns] enabled and no name
    /// given, the client's reverse DNS is looked up as the milter front end would
    #[arg(long, value_name = "HOST", default_value = "unknown")]
    pub name: String,
    /// Envelope sender; "" or "<>" for the null sender
    #[arg(long, value_name = "ADDR")]
    pub from: String,
    /// Envelope recipient
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// SASL user name, as if the client had authenticated
    #[arg(long, value_name = "USER", default_value = "")]
    pub sasl_user: String,
    /// Evaluate at this time (Unix seconds or RFC 3339) instead of now
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Ask the running daemon (its engine, runtime entries and store) instead of reading the store
    #[arg(long)]
    pub live: bool,
    /// With --live: the daemon's admin API [default: the first `[admin] listen` address]
    #[arg(long, value_name = "URL", env = "GREYGATE_ADMIN_URL")]
    pub admin: Option<String>,
}

/// `greygate bench`: by default a load test of `--target`; `--null-server` and `--preload`
/// select the other two tools.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Policy server to load: 127.0.0.1:10023, [::1]:10023, unix:/path
    #[arg(short, long, value_name = "ADDR", default_value = "127.0.0.1:10023")]
    pub target: ListenAddr,
    /// Name of the target in the report
    #[arg(long, value_name = "NAME", default_value = "target")]
    pub label: String,
    /// Concurrent connections, each with one request in flight (like Postfix smtpd processes)
    #[arg(short, long, value_name = "N", default_value_t = 64)]
    pub connections: usize,
    /// Stop after this many measured requests instead of after --duration
    #[arg(short = 'n', long, value_name = "N")]
    pub requests: Option<u64>,
    /// How long to measure, after the warm-up
    #[arg(short, long, value_name = "DURATION", default_value = "10s")]
    pub duration: Dur,
    /// Send but do not measure for this long first
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub warmup: Dur,
    /// Open loop: offer this many requests per second (latency from the scheduled send time)
    #[arg(short, long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Spacing of open-loop sends: poisson or uniform
    #[arg(long, value_name = "KIND", default_value = "poisson")]
    pub arrival: Arrival,
    /// Seed of the request stream: same seed, same requests per connection
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Request mix in percent: NEW,RETRY,ALLOWED (new triplets, retries of earlier ones, postmaster@/abuse@)
    #[arg(long, value_name = "N,N,N", default_value = "30,50,20")]
    pub mix: Mix,
    /// Share of IPv6 clients in percent
    #[arg(long, value_name = "PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub ipv6: u8,
    /// New triplets each connection remembers for retries
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub retry_pool: usize,
    /// Closed-loop generator threads (1: a single-threaded runtime, lightest on small machines)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Protocol to speak to the target: policy, or milter (as an MTA: connect, HELO, MAIL, RCPT per request; closed loop)
    #[arg(long, value_name = "PROTOCOL", default_value = "policy")]
    pub protocol: greygate::bench::Protocol,
    /// Instead of loading a server, be one: answer DUNNO to every request on ADDR (the protocol's ceiling)
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["preload", "rate", "requests"])]
    pub null_server: Option<ListenAddr>,
    /// Instead of loading a server, write N triplets into the embedded store --db (scale tests)
    #[arg(long, value_name = "N", requires = "db", conflicts_with_all = ["rate", "requests"])]
    pub preload: Option<u64>,
    /// Embedded store file for --preload
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Triplets per commit during --preload
    #[arg(long, value_name = "N", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
}
