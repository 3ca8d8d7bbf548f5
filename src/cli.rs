//! Command-line definitions (clap).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use greygate::config::{DEFAULT_CONFIG_PATH, Dur};

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
    /// Run the daemon: Postfix policy service on the configured listeners.
    Serve(ServeArgs),
    /// Check the configuration and allow-list files; report every problem with its line.
    CheckConfig(CheckConfigArgs),
    /// Explain what greygate would decide for a request, without changing anything.
    Explain(ExplainArgs),
    /// Ask a recipient's mail servers whether they accept, greylist or reject (no mail is sent).
    Probe(crate::outbound_cmd::ProbeArgs),
    /// Rebuild delivery timelines from Postfix logs; report greylisting per destination.
    Track(crate::outbound_cmd::TrackArgs),
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
    /// Verified client host name (Postfix's client_name)
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
}
