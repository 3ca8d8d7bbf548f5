//! `greygate explain`: what greygate would decide for a request, read from the store (or,
//! with `--live`, asked of the running daemon), without changing anything.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use greygate::admin::wire::ExplainQuery;
use greygate::engine::Request;
use greygate::service::unix_now;
use greygate::store::{self, Access, StoreError};

use super::common::{ConfigArgs, Exit, config_failed, runtime};

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
    /// Verified client host name (Postfix's client_name), the source of org: identities;
    /// without it the host name is not known, unless [dns] ptr_lookup = true looks it up as
    /// the daemon would for a milter MTA that gives none
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

pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    if args.live {
        let daemon = super::admin::DaemonArgs {
            config: args.config.clone(),
            admin: args.admin.clone(),
            token: None,
            offline: false,
        };
        let query = ExplainQuery {
            client: args.client.to_string(),
            name: Some(args.name.clone()),
            from: args.from.clone(),
            to: args.to.clone(),
            sasl_user: args.sasl_user.clone(),
            at: args.at.clone(),
        };
        if let Some(code) = super::admin::explain_live(&daemon, &query, args.json)? {
            return Ok(code);
        }
    }
    let cfg = match args.config.load(|raw| {
        if let Some(db) = &args.db {
            raw.store.use_embedded(db);
        }
    }) {
        Ok(c) => c,
        Err(e) => return Ok(config_failed(&e)),
    };
    let now = match args
        .at
        .as_deref()
        .map(greygate::service::explain::parse_time)
    {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("greygate: --at {e}");
            return Ok(Exit::Usage.into());
        }
        None => unix_now(),
    };
    let req = Request {
        stage: "RCPT".into(),
        client_ip: Some(args.client),
        client_name: args.name.clone(),
        helo: String::new(),
        sender: args.from.clone(),
        recipient: args.to.clone(),
        sasl_username: args.sasl_user.clone(),
        reverse_client_name: String::new(),
        facts: None,
        tls: false,
    };
    let (reader, busy) = match store::open(&cfg.store, Access::Read) {
        Ok(store) => (Ok(store), false),
        Err(e) => (Err(e.to_string()), matches!(e, StoreError::Locked { .. })),
    };
    let replies = &cfg.replies;
    let mode = cfg.mode;
    let rt = runtime()?;
    let store_ref = reader.as_deref().map_err(Clone::clone);
    // DNS facts as the daemon would gather them; a resolver that cannot be set up only
    // means the explanation goes without (as the daemon's requests would).
    let dns = if cfg.dns.enabled {
        let _in_runtime = rt.enter();
        let stats = std::sync::Arc::default();
        match greygate::dns::Gatherer::new(&cfg.dns, &cfg.hostname, stats) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("greygate: {e}; explaining without DNS facts");
                None
            }
        }
    } else {
        None
    };
    let result = rt.block_on(greygate::service::explain::explain(
        &cfg.engine,
        store_ref,
        // The counts live in the daemon: `explain --live` asks it.
        None,
        dns.as_ref(),
        &req,
        now,
        |d| replies.action_text(d, d.enforced(mode), now),
    ));
    match result {
        Ok(x) if args.json => println!("{}", serde_json::to_string_pretty(&x)?),
        Ok(x) => print!("{}", x.to_text()),
        Err(e) => {
            eprintln!("greygate: {e}");
            return Ok(ExitCode::from(if busy {
                Exit::StoreBusy
            } else {
                Exit::Failure
            }));
        }
    }
    Ok(ExitCode::SUCCESS)
}
