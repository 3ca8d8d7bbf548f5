//! `greygate bench`: the load generator, the null responder and the store preloader.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use greygate::dur::Dur;
use greygate::server::ListenAddr;
use greygate::service::unix_now;
use greygate::tools::bench::{self, Arrival, Mix};

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
    /// Sender domains new triplets draw from, uniformly (each also names its own list
    /// domain for bounces); with DNS facts on, each one's SPF is looked up once per cache
    /// lifetime
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub domains: u64,
    /// Closed-loop generator threads (1: a single-threaded runtime, lightest on small machines)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Protocol to speak to the target: policy, or milter (as an MTA: connect, HELO, MAIL, RCPT per request; closed loop)
    #[arg(long, value_name = "PROTOCOL", default_value = "policy")]
    pub protocol: greygate::tools::bench::Protocol,
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

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = &args.null_server {
        // Lazy: the signal handlers are installed inside the responder's runtime.
        let stop = async {
            match super::common::stop_signal() {
                Ok(stopped) => {
                    stopped.await;
                }
                // Without handlers the default action (exit) still stops the process.
                Err(_) => std::future::pending().await,
            }
        };
        bench::run_null_server(
            addr,
            |bound| {
                eprintln!("greygate bench: null responder listening on {bound}");
            },
            stop,
        )?;
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
            domains: args.domains,
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
