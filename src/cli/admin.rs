//! The commands that operate a running daemon through its admin API — `stats`, `list`,
//! `purge`, `allow`, `deny`, `reload`, `explain --live` — and their fall-back when no
//! daemon runs: open the store (or the runtime-entries file) directly.
//!
//! Exit codes: 0 done, 1 failure, 2 usage or configuration, 3 the store is held by a
//! daemon that does not answer on its admin address.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use greygate::admin::client::{AdminClient, ClientError};
use greygate::admin::entries::{self, EntryQuery};
use greygate::config::Config;
use greygate::dur::Dur;
use greygate::engine::{ListKind, Target};
use greygate::service::{RuntimeEntries, Selector, unix_now};
use greygate::store::{self, Access, Entry, StoreError};

use super::common::{ConfigArgs, Exit, config_failed, runtime};

/// How to reach the daemon.
#[derive(Debug, Args, Clone)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Admin API of the daemon [default: the first `[admin] listen` address]
    #[arg(long, value_name = "URL", env = "GREYGATE_ADMIN_URL")]
    pub admin: Option<String>,
    /// Admin token for changes [default: `[admin] token` or the token file]
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GREYGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Do not ask the daemon; open the store (or the runtime-entries file) directly
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Which records (shared by `list` and `purge`).
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Records to walk: triplets, or clients (auto-allow records)
    #[arg(long, value_name = "KIND", default_value = "triplets")]
    pub kind: String,
    /// Triplets only: pending, passed or any
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// A client IP (matches its group) or part of a client group
    #[arg(long, value_name = "IP|TEXT")]
    pub client: Option<String>,
    /// Part of the (normalised) sender
    #[arg(long, value_name = "TEXT")]
    pub sender: Option<String>,
    /// Part of the (normalised) recipient
    #[arg(long, value_name = "TEXT")]
    pub recipient: Option<String>,
}

impl FilterArgs {
    fn query(&self) -> EntryQuery {
        EntryQuery {
            kind: Some(self.kind.clone()),
            state: self.state.clone(),
            client: self.client.clone(),
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Show at most this many records
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Print JSON (one object with the records)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Purge every record of the kind (needed when no filter is given)
    #[arg(long)]
    pub everything: bool,
}

#[derive(Debug, Args)]
pub struct RuntimeArgs {
    #[command(subcommand)]
    pub action: RuntimeAction,
}

#[derive(Debug, Subcommand)]
pub enum RuntimeAction {
    /// Add an entry (or change the expiry and comment of the same one)
    Add {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Client IP, CIDR network, host name, .suffix or /regex/; or a sender/recipient (--target)
        value: String,
        /// What the value matches: client, sender or recipient
        #[arg(long, value_name = "TARGET", default_value = "client")]
        target: String,
        /// Remove the entry after this long (e.g. 7d) [default: keep until removed]
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Dur>,
        /// Why (shown in listings, logs and explanations)
        #[arg(long, value_name = "TEXT", default_value = "")]
        comment: String,
    },
    /// Remove entries by number (#3 or 3) or by value
    Remove {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(value_name = "ID|VALUE")]
        what: String,
    },
    /// List the entries
    List {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The configuration, the client for its daemon, and whether to try the daemon at all.
struct Ctx {
    cfg: Config,
    client: Option<AdminClient>,
}

fn context(a: &DaemonArgs) -> anyhow::Result<Result<Ctx, ExitCode>> {
    let cfg = match a.config.load(|_| {}) {
        Ok(c) => c,
        Err(e) => return Ok(Err(config_failed(&e))),
    };
    let url = a.admin.clone().or_else(|| cfg.admin.url());
    let token = a.token.clone().or_else(|| cfg.admin.token.resolve());
    let client = match (a.offline, url) {
        (false, Some(url)) => Some(AdminClient::new(&url, token, Duration::from_secs(30))),
        _ => None,
    };
    Ok(Ok(Ctx { cfg, client }))
}

/// Asks the daemon; `Ok(None)` when none answers (the caller falls back).
fn ask<T>(
    ctx: &Ctx,
    f: impl FnOnce(&AdminClient) -> Result<T, ClientError>,
) -> anyhow::Result<Option<T>> {
    let Some(c) = &ctx.client else {
        return Ok(None);
    };
    match f(c) {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::NotRunning(url)) => {
            eprintln!("greygate: no daemon answers at {url}; using the store directly");
            Ok(None)
        }
        Err(ClientError::Refused {
            status: 401,
            message,
        }) => bail!(
            "the daemon refused: {message}; give the admin token with --token or \
             GREYGATE_ADMIN_TOKEN (the daemon's [admin] token or token_file)"
        ),
        Err(e) => Err(e.into()),
    }
}

fn open_store(cfg: &Config, access: Access) -> Result<std::sync::Arc<dyn store::Store>, ExitCode> {
    store::open(&cfg.store, access).map_err(|e| {
        eprintln!("greygate: {e}");
        match e {
            StoreError::Locked { .. } => Exit::StoreBusy.into(),
            _ => Exit::Failure.into(),
        }
    })
}

fn when(t: u64) -> String {
    jiff::Timestamp::from_second(i64::try_from(t).unwrap_or(i64::MAX)).map_or_else(
        |_| t.to_string(),
        |ts| ts.strftime("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

pub fn stats(a: StatsArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(s) = ask(&ctx, |c| c.get("/api/stats"))? {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", stats_text(&s));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = match open_store(&ctx.cfg, Access::Read) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let counts = runtime()?.block_on(store.counts())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "store": store.describe(), "entries": counts }))?
        );
    } else {
        println!("store:      {} (no daemon running)", store.describe());
        println!(
            "entries:    {} pending, {} passed triplets; {} client groups",
            counts.triplets_pending, counts.triplets_passed, counts.clients
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn stats_text(s: &Value) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "greygate {} up {} s, mode {}",
        s["version"].as_str().unwrap_or("?"),
        n(&s["uptime_seconds"]),
        s["mode"].as_str().unwrap_or("?")
    );
    let avail = if s["store_available"].as_bool() == Some(true) {
        "available"
    } else {
        "UNAVAILABLE (answering per fail_mode)"
    };
    let _ = writeln!(
        o,
        "store:      {} ({avail})",
        s["store"].as_str().unwrap_or("?")
    );
    if let Some(e) = s["entries"].as_object() {
        let _ = writeln!(
            o,
            "entries:    {} pending, {} passed triplets; {} client groups",
            n(&e["triplets_pending"]),
            n(&e["triplets_passed"]),
            n(&e["clients"])
        );
    }
    let _ = writeln!(
        o,
        "answers:    {} passed, {} deferred, {} not greylisted; {} fail-open, {} fail-closed",
        n(&s["pass"]),
        n(&s["defer"]),
        n(&s["skip"]),
        n(&s["fail_open"]),
        n(&s["fail_closed"])
    );
    if let Some(rules) = s["decisions"].as_array() {
        let _ = writeln!(o, "by rule:");
        for r in rules {
            let _ = writeln!(
                o,
                "  {:<22} {:<6} {:>10}",
                r["rule"].as_str().unwrap_or("?"),
                r["verdict"].as_str().unwrap_or("?"),
                n(&r["count"])
            );
        }
    }
    if let Some(ls) = s["listeners"].as_array() {
        for l in ls {
            let _ = writeln!(
                o,
                "listener:   {} {} — {} open of {}, {} accepted, {} refused",
                l["protocol"].as_str().unwrap_or("?"),
                l["address"].as_str().unwrap_or("?"),
                n(&l["open"]),
                n(&l["limit"]),
                n(&l["accepted"]),
                n(&l["refused"])
            );
        }
    }
    let _ = writeln!(o, "runtime entries: {}", n(&s["runtime_entries"]));
    o
}

fn entries_text(entries: &[Value]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {:<19}",
        "STATE", "CLIENT", "SENDER", "RECIPIENT", "FIRST SEEN (UTC)", "TRIES", "EXPIRES (UTC)"
    );
    for e in entries {
        let r = &e["record"];
        let t = |v: &Value| when(v.as_u64().unwrap_or(0));
        if e["kind"] == "client" {
            let _ = writeln!(
                o,
                "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {}",
                "client",
                e["client"].as_str().unwrap_or(""),
                format!("{} counted passes", r["passes"]),
                "",
                t(&r["last_counted"]),
                "",
                t(&r["expires_at"])
            );
            continue;
        }
        let k = &e["key"];
        let state = if r["passed"].as_bool() == Some(true) {
            "passed"
        } else {
            "pending"
        };
        let sender = k["sender"].as_str().unwrap_or("");
        let _ = writeln!(
            o,
            "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {}",
            state,
            k["client"].as_str().unwrap_or(""),
            if sender.is_empty() { "<>" } else { sender },
            k["recipient"].as_str().unwrap_or(""),
            t(&r["first_seen"]),
            r["attempts"].as_u64().unwrap_or(0),
            t(&r["expires_at"])
        );
    }
    o
}

pub fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let query = a.filter.query();
    let mut found: Vec<Value> = Vec::new();
    let from_daemon = ask(&ctx, |c| {
        let mut cursor: Option<String> = None;
        while found.len() < a.limit {
            let mut q = url_query(&query);
            let want = (a.limit - found.len()).min(entries::MAX_LIMIT);
            let _ = write!(q, "&limit={want}");
            if let Some(cur) = &cursor {
                let _ = write!(q, "&cursor={cur}");
            }
            let page = c.get(&format!("/api/entries?{q}"))?;
            found.extend(page["entries"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(n) => cursor = Some(n.to_string()),
                None => break,
            }
        }
        Ok(())
    })?;
    if from_daemon.is_none() {
        found.clear();
        let store = match open_store(&ctx.cfg, Access::Read) {
            Ok(s) => s,
            Err(code) => return Ok(code),
        };
        let m = match query.matcher(&ctx.cfg.engine) {
            Ok(m) => m,
            Err(e) => bail!("{e}"),
        };
        let now = unix_now();
        let rt = runtime()?;
        let mut cursor: Option<String> = None;
        while found.len() < a.limit {
            let want = a.limit - found.len();
            let page = rt.block_on(entries::list(
                store.as_ref(),
                &m,
                cursor.as_deref(),
                want,
                now,
            ))?;
            found.extend(
                page.entries
                    .iter()
                    .map(|e: &Entry| serde_json::to_value(e).unwrap_or_default()),
            );
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
    }
    found.truncate(a.limit);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "entries": found }))?
        );
    } else {
        print!("{}", entries_text(&found));
        if found.len() == a.limit {
            eprintln!("(first {} shown; --limit shows more)", a.limit);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn url_query(q: &EntryQuery) -> String {
    let mut s = String::new();
    for (k, v) in [
        ("kind", &q.kind),
        ("state", &q.state),
        ("client", &q.client),
        ("sender", &q.sender),
        ("recipient", &q.recipient),
    ] {
        if let Some(v) = v {
            if !s.is_empty() {
                s.push('&');
            }
            let _ = write!(s, "{k}={}", percent(v));
        }
    }
    s
}

/// Percent-encodes a query value (addresses carry `+`, `@`, `=`).
fn percent(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

pub fn purge(a: PurgeArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let query = a.filter.query();
    if !a.everything && !query.is_narrowed() {
        eprintln!(
            "greygate: name --state, --client, --sender or --recipient, or purge --everything"
        );
        return Ok(Exit::Usage.into());
    }
    let body = json!({
        "kind": query.kind, "state": query.state, "client": query.client,
        "sender": query.sender, "recipient": query.recipient, "all": a.everything,
    });
    if let Some(r) = ask(&ctx, |c| {
        let mut total = 0;
        loop {
            let r = c.post("/api/purge", &body)?;
            total += r["removed"].as_u64().unwrap_or(0);
            if r["complete"].as_bool() != Some(false) {
                return Ok(total);
            }
        }
    })? {
        println!("removed {r} record(s)");
        return Ok(ExitCode::SUCCESS);
    }
    let store = match open_store(&ctx.cfg, Access::Write) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let m = match query.matcher(&ctx.cfg.engine) {
        Ok(m) => m,
        Err(e) => bail!("{e}"),
    };
    let rt = runtime()?;
    let mut total = 0;
    loop {
        let r = rt.block_on(entries::purge(
            store.as_ref(),
            &m,
            unix_now(),
            Duration::from_secs(60),
        ))?;
        total += r.removed;
        if r.complete {
            break;
        }
    }
    println!("removed {total} record(s)");
    Ok(ExitCode::SUCCESS)
}

fn target(s: &str) -> anyhow::Result<Target> {
    Ok(match s {
        "client" => Target::Client,
        "sender" => Target::Sender,
        "recipient" => Target::Recipient,
        _ => bail!("--target {s:?} is not client, sender or recipient"),
    })
}

fn selector(what: &str) -> Selector {
    match what.trim_start_matches('#').parse::<u64>() {
        Ok(id) => Selector::Id(id),
        Err(_) => Selector::Value(what.to_string()),
    }
}

/// The entries file a command edits when no daemon runs.
fn entries_file(cfg: &Config) -> anyhow::Result<RuntimeEntries> {
    let Some(path) = &cfg.admin.entries_file else {
        bail!("no daemon answers and this store keeps runtime entries only in the daemon's memory");
    };
    Ok(RuntimeEntries::load(path)?)
}

fn runtime_text(entries: &[Value]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>4} {:<5} {:<9} {:<32} {:<19} COMMENT",
        "#", "LIST", "MATCHES", "VALUE", "EXPIRES (UTC)"
    );
    for e in entries {
        let expires = e["expires_at"].as_u64().map_or("never".to_string(), when);
        let _ = writeln!(
            o,
            "{:>4} {:<5} {:<9} {:<32} {:<19} {}",
            e["id"].as_u64().unwrap_or(0),
            e["list"].as_str().unwrap_or(""),
            e["target"].as_str().unwrap_or(""),
            e["value"].as_str().unwrap_or(""),
            expires,
            e["comment"].as_str().unwrap_or("")
        );
    }
    o
}

pub fn runtime_entries(list: ListKind, a: RuntimeArgs) -> anyhow::Result<ExitCode> {
    let name = list.as_str();
    match a.action {
        RuntimeAction::Add {
            daemon,
            value,
            target: t,
            ttl,
            comment,
        } => {
            let t = target(&t)?;
            let ctx = match context(&daemon)? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let ttl_secs = ttl.map(|d| d.0.as_secs().max(1));
            let body = json!({ "target": t, "value": value, "ttl": ttl_secs, "comment": comment });
            let e = match ask(&ctx, |c| c.post(&format!("/api/runtime/{name}"), &body))? {
                Some(e) => e,
                None => {
                    let file = entries_file(&ctx.cfg)?;
                    let e = file.add(list, t, &value, ttl_secs, &comment, unix_now())?;
                    serde_json::to_value(e)?
                }
            };
            println!(
                "added #{}: {name} {} {}",
                e["id"],
                e["target"].as_str().unwrap_or(""),
                e["value"]
            );
            Ok(ExitCode::SUCCESS)
        }
        RuntimeAction::Remove { daemon, what } => {
            let ctx = match context(&daemon)? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let sel = selector(&what);
            let path = match &sel {
                Selector::Id(id) => format!("/api/runtime/{name}/{id}"),
                Selector::Value(v) => format!("/api/runtime/{name}?value={}", percent(v)),
            };
            let gone = match ask(&ctx, |c| c.delete(&path))? {
                Some(r) => r["removed"].as_array().map_or(0, Vec::len),
                None => entries_file(&ctx.cfg)?.remove(list, &sel)?.len(),
            };
            println!(
                "removed {gone} {name} entr{}",
                if gone == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        RuntimeAction::List { daemon, json } => {
            let ctx = match context(&daemon)? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let all: Vec<Value> = match ask(&ctx, |c| c.get("/api/runtime"))? {
                Some(r) => r["entries"].as_array().cloned().unwrap_or_default(),
                None => {
                    let now = unix_now();
                    entries_file(&ctx.cfg)?
                        .list()
                        .into_iter()
                        .filter(|e| e.alive(now))
                        .map(|e| serde_json::to_value(e).unwrap_or_default())
                        .collect()
                }
            };
            let mine: Vec<Value> = all.into_iter().filter(|e| e["list"] == name).collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "entries": mine }))?
                );
            } else {
                print!("{}", runtime_text(&mine));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn reload(a: ReloadArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match ask(&ctx, |c| c.post("/api/reload", &json!({})))? {
        Some(r) => {
            println!("configuration reloaded");
            if let Some(list) = r["needs_restart"].as_array().filter(|l| !l.is_empty()) {
                let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                println!("changed settings that need a restart: {}", names.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("no daemon to reload"),
    }
}

/// `explain --live`: the running daemon explains with its own engine and store.
pub fn explain_live(
    daemon: &DaemonArgs,
    query: &[(&str, String)],
    json_out: bool,
) -> anyhow::Result<Option<ExitCode>> {
    let ctx = match context(daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(Some(code)),
    };
    let mut q = String::new();
    for (k, v) in query {
        if !q.is_empty() {
            q.push('&');
        }
        let _ = write!(q, "{k}={}", percent(v));
    }
    let Some(x) = ask(&ctx, |c| c.get(&format!("/api/explain?{q}")))? else {
        return Ok(None);
    };
    if json_out {
        let mut x = x;
        if let Some(o) = x.as_object_mut() {
            o.remove("text");
        }
        println!("{}", serde_json::to_string_pretty(&x)?);
    } else {
        print!("{}", x["text"].as_str().unwrap_or_default());
    }
    Ok(Some(ExitCode::SUCCESS))
}
