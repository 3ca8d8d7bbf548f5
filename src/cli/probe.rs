//! `greygate probe`: clap arguments and the edges (runtime, terminal, exit codes). The work
//! is in `greygate::tools::outbound::probe`.
//!
//! Exit codes: 0 accepted, 4 greylisted, 5 other temporary failure, 6 rejected, 7 no
//! connection (most severe over all recipients); 1 runtime error, 2 usage.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use greygate::dur::Dur;
use greygate::tools::outbound::probe::{self, Options};

use super::common::Exit;

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 accepted, 4 greylisted, 5 other temporary failure, \
6 rejected, 7 no connection (the most severe over all recipients); 1 error, 2 usage."
)]
pub struct ProbeArgs {
    /// Recipient addresses (local@domain) to ask about.
    #[arg(required = true, value_name = "RECIPIENT")]
    pub recipients: Vec<String>,
    /// Connect to HOST:PORT instead of the recipient domain's MX hosts.
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
    /// Timeout for connecting and for each reply.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub timeout: Dur,
    /// Try again this often until accepted or rejected (measures the greylisting delay).
    #[arg(long, value_name = "DURATION")]
    pub retry_every: Option<Dur>,
    /// With --retry-every: give up after this long.
    #[arg(
        long,
        default_value = "30m",
        value_name = "DURATION",
        requires = "retry_every"
    )]
    pub until: Dur,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Upgrade to TLS with STARTTLS before MAIL FROM (the certificate is not verified)
    #[arg(long)]
    pub starttls: bool,
}

pub fn probe(args: ProbeArgs) -> anyhow::Result<ExitCode> {
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
    };
    let rt = super::common::runtime()?;
    let live = !args.json && args.retry_every.is_some();
    let result = rt.block_on(probe::run(&opts, &args.recipients, |rcpt, a| {
        // With a schedule, show each try as it happens: runs can take half an hour.
        if live {
            eprintln!(
                "+{:>6}  {rcpt}: {}{}",
                probe::fmt_secs(a.at_secs),
                a.status.name(),
                a.reply
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }));
    let report = match result {
        Ok(r) => r,
        Err(e @ probe::ProbeError::BadRecipient(_)) => {
            eprintln!("greygate: {e}");
            return Ok(Exit::Usage.into());
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", probe::render_text(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}
