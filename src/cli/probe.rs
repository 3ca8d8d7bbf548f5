//! `greygate probe`: clap arguments and the edges (runtime, terminal, files, exit codes).
//! The work is in `greygate::tools::outbound::probe`; the destinations file format in
//! `greygate::tools::outbound::targets`.
//!
//! Exit codes: 0 accepted, 4 greylisted, 5 other temporary failure, 6 rejected, 7 no
//! connection (most severe over all recipients); 1 runtime error, 2 usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use greygate::dur::Dur;
use greygate::tools::outbound::probe::{self, DEFAULT_CONCURRENCY, Options};
use greygate::tools::outbound::probe_report;
use greygate::tools::outbound::targets::{self, FileError, ParseOptions, Target};

use super::common::Exit;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 accepted, 4 greylisted, 5 other temporary failure, \
6 rejected, 7 no connection (the most severe over all recipients, --file lines included); \
1 error, 2 usage (bad recipients or --file lines are all reported, with line numbers, \
before any connection)."
)]
pub struct ProbeArgs {
    /// Recipient addresses (local@domain) to ask about (none needed with --file).
    #[arg(required_unless_present = "file", value_name = "RECIPIENT")]
    pub recipients: Vec<String>,
    /// Also ask about the destinations in FILE (`-`: standard input), one a line.
    ///
    /// A line is an address (`dave@example.org`) or a bare domain (`example.org`, asked
    /// about `postmaster@example.org`, see --local-part), optionally followed by the server
    /// to ask instead of the domain's MX hosts: `HOST`, `HOST:PORT`, `IP:PORT` or
    /// `[IPv6]:PORT` (port: --port). `#` starts a comment; blank lines are skipped; the
    /// same destination twice is asked once. At most 10,000 destinations and 2 MiB. With
    /// --file the text output is a table (destination, result, attempts, time to accept,
    /// last reply) and a summary line.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Local part to probe for bare-domain lines of --file.
    ///
    /// postmaster must exist at every domain that takes mail (RFC 5321 4.5.1), but some
    /// greylisters exempt it (postgrey's default whitelist_recipients has postmaster@ and
    /// abuse@): to learn whether a domain greylists ordinary mail, give a real address or
    /// another local part.
    #[arg(long, default_value = targets::DEFAULT_LOCAL_PART, value_name = "NAME")]
    pub local_part: String,
    /// Probes at once over the whole run (one connection at a time per server regardless).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY as u16, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Connect to HOST:PORT instead of the recipient domain's MX hosts (a server named on a
    /// --file line wins).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Ask this DNS server (IP:PORT) instead of the system's resolvers.
    #[arg(long, value_name = "IP:PORT")]
    pub resolver: Option<SocketAddr>,
    /// SMTP port of the MX hosts.
    #[arg(long, default_value_t = 25)]
    pub port: u16,
    /// Envelope sender [default: the null sender <>].
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// Name to give in EHLO [default: this host's name].
    #[arg(long, value_name = "NAME")]
    pub helo: Option<String>,
    /// Timeout for connecting, for each reply, and for the DNS lookups of an attempt.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub timeout: Dur,
    /// Try each destination again this often (at least 1s) until it is accepted or
    /// rejected: measures the greylisting delay, per destination.
    #[arg(long, value_name = "DURATION")]
    pub retry_every: Option<Dur>,
    /// With --retry-every: give up on a destination this long after its first attempt.
    #[arg(
        long,
        default_value = "30m",
        value_name = "DURATION",
        requires = "retry_every"
    )]
    pub until: Dur,
    /// Print JSON instead of text: recipients[] and totals.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Upgrade to TLS with STARTTLS before MAIL FROM (the certificate is not verified)
    #[arg(long)]
    pub starttls: bool,
}

/// Prints a usage error, each line prefixed (a file's bad lines are one line each).
fn usage(message: &str) -> anyhow::Result<ExitCode> {
    for line in message.lines() {
        eprintln!("greygate: {line}");
    }
    Ok(Exit::Usage.into())
}

/// Command-line recipients, then the file's destinations; `Err` is a usage message.
fn destinations(args: &ProbeArgs) -> Result<Result<Vec<Target>, String>, anyhow::Error> {
    let mut all = Vec::new();
    let mut bad = Vec::new();
    for r in &args.recipients {
        match targets::check_address(r) {
            Ok(()) => all.push(Target {
                recipient: r.clone(),
                server: None,
                line: None,
            }),
            Err(why) => bad.push(format!("{r:?} is not a recipient address: {why}")),
        }
    }
    if let Some(path) = &args.file {
        let (name, bytes) = if path.as_os_str() == "-" {
            (
                "stdin".to_string(),
                targets::read_bounded(std::io::stdin().lock()),
            )
        } else {
            let name = path.display().to_string();
            let file = std::fs::File::open(path).with_context(|| format!("cannot read {name}"))?;
            (name, targets::read_bounded(file))
        };
        let opts = ParseOptions {
            local_part: &args.local_part,
            default_port: args.port,
        };
        match bytes.and_then(|b| targets::parse(&b, &opts)) {
            Ok(t) => all.extend(t),
            Err(FileError::Io(e)) => {
                return Err(anyhow::Error::new(e).context(format!("cannot read {name}")));
            }
            Err(e) => bad.push(e.render(&name)),
        }
    }
    if !bad.is_empty() {
        return Ok(Err(bad.join("\n")));
    }
    let all = targets::dedup(all);
    if all.is_empty() {
        // Only comments and blank lines: most likely the wrong file.
        return Ok(Err(
            "no destinations to probe (the file has only comments and blank lines)".into(),
        ));
    }
    if all.len() > targets::MAX_DESTINATIONS {
        return Ok(Err(format!(
            "more than {} destinations in one run: split the list",
            targets::MAX_DESTINATIONS
        )));
    }
    Ok(Ok(all))
}

pub fn probe(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    if let Some(every) = args.retry_every
        && every.0 < Duration::from_secs(1)
    {
        return usage("--retry-every must be at least 1s");
    }
    if let Err(why) = targets::check_local_part(&args.local_part) {
        return usage(&format!("--local-part {:?}: {why}", args.local_part));
    }
    let targets = match destinations(&args)? {
        Ok(t) => t,
        Err(message) => return usage(&format!("{message}\nnothing was probed")),
    };
    let helo = args
        .helo
        .clone()
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
    let opts = Options {
        server: args.server.clone(),
        resolver: args.resolver,
        port: args.port,
        from: args
            .from
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_string(),
        helo,
        timeout: args.timeout.0,
        retry_every: args.retry_every.map(|d| d.0),
        until: args.until.0,
        starttls: args.starttls,
        concurrency: usize::from(args.concurrency),
    };
    let rt = super::common::runtime()?;
    let live = !args.json && args.retry_every.is_some();
    let result = rt.block_on(probe::run(&opts, &targets, |rcpt, a| {
        // With a schedule, show each try as it happens: runs can take half an hour.
        if live {
            eprintln!(
                "+{:>6}  {}: {}{}",
                probe::fmt_secs(a.at_secs),
                probe::printable(rcpt),
                a.status.name(),
                a.reply
                    .as_deref()
                    .map(|r| format!(" ({})", probe::printable(r)))
                    .unwrap_or_default()
            );
        }
    }));
    let report = match result {
        Ok(r) => r,
        Err(e @ probe::ProbeError::BadRecipient(..)) => return usage(&e.to_string()),
        Err(e) => return Err(e.into()),
    };
    if let Some(path) = &args.html {
        let generated = jiff::Timestamp::now()
            .strftime("%Y-%m-%d %H:%M:%S UTC")
            .to_string();
        std::fs::write(path, probe_report::render_html(&report, &generated))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.file.is_some() {
        print!("{}", probe_report::render_table(&report));
    } else {
        print!("{}", probe::render_text(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}
