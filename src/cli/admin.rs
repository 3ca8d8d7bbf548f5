//! The commands that operate a running daemon through its admin API — `stats`, `list`,
//! `purge`, `release`, `allow`, `deny`, `reload`, `explain --live` — and their fall-back
//! when no daemon runs: open the store (or the runtime-entries file) directly.
//!
//! Exit codes: 0 done, 1 failure, 2 usage or configuration, 3 the store is held by a
//! daemon that does not answer on its admin address; `release`: 4 nothing was pending.
//!
//! The daemon's answers are read into the types of `greygate::admin::wire`, the ones its
//! handlers write, so an answer without a field shown here fails loudly instead of
//! printing a zero.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;

use greygate::admin::client::{AdminClient, ClientError};
use greygate::admin::entries::{self, EntryQuery};
use greygate::admin::wire::{
    AddEntry, EntriesPage, EntriesQuery, ExplainAnswer, ExplainQuery, PurgeReport, PurgeRequest,
    ReleaseReport, ReleaseRequest, ReloadReport, ReloadRequest, Removed, RuntimeList, StatsView,
    ValueQuery,
};
use greygate::config::Config;
use greygate::dur::Dur;
use greygate::engine::{ListKind, RuntimeEntry, Target};
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

/// `release`'s exit code when nothing it names was pending.
const NOTHING_RELEASED: u8 = 4;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  greygate release --client 192.0.2.10 --sender alice@example.net --recipient bob@example.org
  greygate release --recipient bob@example.org

A released triplet counts as passed: the sender's next retry is accepted at once (rule
`released`, before its delay), and later ones as any passed triplet's. The daemon logs a
`released` line with the token's peer, the local user, the time and the triplets.

Exit codes: 0 released, 1 failure, 2 usage, 3 store held by an unanswering daemon,
4 nothing was pending (not seen, expired, or already passed).")]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// One triplet's client: its IP (the group and, in the daemon, the identity its DNS
    /// facts give), or a client key as `list` shows it (spf:example.com); needs --sender
    #[arg(long, value_name = "IP|KEY", requires = "sender")]
    pub client: Option<String>,
    /// The envelope sender (<> for the null sender); without --client, only this sender's
    /// pending triplets of the recipient
    #[arg(long, value_name = "ADDRESS")]
    pub sender: Option<String>,
    /// The recipient; alone, every pending triplet of it is released
    #[arg(long, value_name = "ADDRESS")]
    pub recipient: String,
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
    let client = match a.offline {
        false => admin_client(&cfg, a.admin.clone(), a.token.clone()),
        true => None,
    };
    Ok(Ok(Ctx { cfg, client }))
}

/// The client for the daemon's admin API: `url` or the first `[admin] listen` address,
/// `token` or the configured one; `None` when the daemon has no admin listener.
pub(super) fn admin_client(
    cfg: &Config,
    url: Option<String>,
    token: Option<String>,
) -> Option<AdminClient> {
    let url = url.or_else(|| cfg.admin.url())?;
    let token = token.or_else(|| cfg.admin.token.resolve());
    Some(AdminClient::new(&url, token, Duration::from_secs(30)))
}

/// Asks the daemon; `Ok(None)` when none answers (the caller falls back).
fn ask<T>(
    ctx: &Ctx,
    f: impl FnOnce(&AdminClient) -> Result<T, ClientError>,
) -> anyhow::Result<Option<T>> {
    ask_client(ctx.client.as_ref(), f)
}

/// [`ask`] with a client of its own (or none).
fn ask_client<T>(
    client: Option<&AdminClient>,
    f: impl FnOnce(&AdminClient) -> Result<T, ClientError>,
) -> anyhow::Result<Option<T>> {
    let Some(c) = client else {
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

/// The store opened directly and a query's matcher.
type Offline = (std::sync::Arc<dyn store::Store>, entries::Matcher);

/// The store opened directly (no daemon answered) and the query's matcher, for `list`
/// and `purge`; `Err(code)` when the store cannot be opened (said on stderr).
fn offline(
    ctx: &Ctx,
    query: &EntryQuery,
    access: Access,
) -> anyhow::Result<Result<Offline, ExitCode>> {
    let store = match open_store(&ctx.cfg, access) {
        Ok(s) => s,
        Err(code) => return Ok(Err(code)),
    };
    match query.matcher(&ctx.cfg.engine) {
        Ok(m) => Ok(Ok((store, m))),
        Err(e) => bail!("{e}"),
    }
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
    if let Some(s) = ask(&ctx, |c| c.get::<StatsView>("/api/stats"))? {
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

fn stats_text(s: &StatsView) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "greygate {} up {} s, mode {}",
        s.version,
        s.uptime_seconds,
        s.mode.as_str()
    );
    let avail = match &s.store_health {
        _ if s.store_available => "available".to_string(),
        Some(h) if h.writes_failing => format!(
            "WRITES FAILING: {} failed commits, {} changes waiting in memory",
            h.failed_commits, h.pending_changes
        ),
        _ => "UNAVAILABLE (answering per fail_mode)".to_string(),
    };
    let _ = writeln!(o, "store:      {} ({avail})", s.store);
    if let Some(aside) = s.store_health.as_ref().and_then(|h| h.set_aside.as_ref()) {
        let _ = writeln!(
            o,
            "            started empty: the file could not be read ({}) and was set aside as {}",
            aside.reason, aside.path
        );
    }
    if let Some(e) = &s.entries {
        let _ = writeln!(
            o,
            "entries:    {} pending, {} passed triplets; {} client groups",
            e.triplets_pending, e.triplets_passed, e.clients
        );
    }
    if let Some(c) = &s.capacity {
        let max = match c.max_entries {
            0 => "no cap".to_string(),
            max => format!("at most {max} records"),
        };
        let _ = writeln!(
            o,
            "capacity:   {max}; evicted {} pending, {} passed triplets, {} client groups",
            c.evicted_pending, c.evicted_passed, c.evicted_clients
        );
    }
    let _ = writeln!(
        o,
        "answers:    {} passed, {} deferred, {} not greylisted; {} fail-open, {} fail-closed",
        s.pass, s.defer, s.skip, s.fail_open, s.fail_closed
    );
    let _ = writeln!(o, "by rule:");
    for r in &s.decisions {
        let _ = writeln!(
            o,
            "  {:<22} {:<6} {:>10}",
            r.rule,
            r.verdict.as_str(),
            r.count
        );
    }
    for l in &s.listeners {
        let _ = writeln!(
            o,
            "listener:   {} {} — {} open of {}, {} accepted, {} refused",
            l.protocol, l.address, l.open, l.limit, l.accepted, l.refused
        );
    }
    let _ = writeln!(o, "runtime entries: {}", s.runtime_entries);
    o
}

fn entries_text(entries: &[Entry]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {:<19}",
        "STATE", "CLIENT", "SENDER", "RECIPIENT", "FIRST SEEN (UTC)", "TRIES", "EXPIRES (UTC)"
    );
    for e in entries {
        match e {
            Entry::Client { client, record: r } => {
                let _ = writeln!(
                    o,
                    "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {}",
                    "client",
                    client,
                    format!("{} counted passes", r.passes),
                    "",
                    when(r.last_counted),
                    "",
                    when(r.expires_at)
                );
            }
            Entry::Triplet { key: k, record: r } => {
                let state = match (r.passed, r.passes) {
                    // Released by an operator, not retried since (see `release`).
                    (true, 0) => "released",
                    (true, _) => "passed",
                    (false, _) => "pending",
                };
                let sender = if k.sender.is_empty() { "<>" } else { &k.sender };
                let _ = writeln!(
                    o,
                    "{:<8} {:<20} {:<30} {:<30} {:<19} {:>5} {}",
                    state,
                    k.client,
                    sender,
                    k.recipient,
                    when(r.first_seen),
                    r.attempts,
                    when(r.expires_at)
                );
            }
        }
    }
    o
}

pub fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let query = a.filter.query();
    let mut found: Vec<Entry> = Vec::new();
    let from_daemon = ask(&ctx, |c| {
        let mut cursor: Option<String> = None;
        while found.len() < a.limit {
            let q = EntriesQuery {
                kind: query.kind.clone(),
                state: query.state.clone(),
                client: query.client.clone(),
                sender: query.sender.clone(),
                recipient: query.recipient.clone(),
                limit: Some((a.limit - found.len()).min(entries::MAX_LIMIT)),
                cursor: cursor.take(),
            };
            let page: EntriesPage = c.get_query("/api/entries", &q)?;
            found.extend(page.entries);
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        Ok(())
    })?;
    if from_daemon.is_none() {
        found.clear();
        let (store, m) = match offline(&ctx, &query, Access::Read)? {
            Ok(x) => x,
            Err(code) => return Ok(code),
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
                entries::ListBudget::default(),
            ))?;
            found.extend(page.entries);
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
    let body = PurgeRequest {
        kind: query.kind.clone(),
        state: query.state.clone(),
        client: query.client.clone(),
        sender: query.sender.clone(),
        recipient: query.recipient.clone(),
        all: a.everything,
    };
    if let Some(r) = ask(&ctx, |c| {
        let mut total = 0;
        loop {
            let r: PurgeReport = c.post("/api/purge", &body)?;
            total += r.removed;
            if r.complete {
                return Ok(total);
            }
        }
    })? {
        println!("removed {r} record(s)");
        return Ok(ExitCode::SUCCESS);
    }
    let (store, m) = match offline(&ctx, &query, Access::Write)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
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

/// The local user, for the audit line: the login name the environment gives, and the uid.
fn local_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    if name.is_empty() {
        format!("uid {uid}")
    } else {
        format!("{name} (uid {uid})")
    }
}

fn release_text(r: &ReleaseReport) -> String {
    let mut o = String::new();
    if r.count > 0 {
        let _ = writeln!(
            o,
            "released {} pending triplet(s); the next retry of each is accepted at once:",
            r.count
        );
        for k in &r.released {
            let _ = writeln!(o, "  {k}");
        }
        let more = r.count.saturating_sub(r.released.len() as u64);
        if more > 0 {
            let _ = writeln!(o, "  ... and {more} more");
        }
    }
    for k in &r.already_passed {
        let _ = writeln!(o, "already passed, left as it is: {k}");
    }
    o
}

pub fn release(a: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let ctx = match context(&a.daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let body = ReleaseRequest {
        client: a.client.clone(),
        sender: a.sender.clone(),
        recipient: a.recipient.clone(),
        by: Some(local_user()),
    };
    let target = match entries::ReleaseTarget::of(&body, &ctx.cfg.engine) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("greygate: {e}");
            return Ok(Exit::Usage.into());
        }
    };
    let report = match ask(&ctx, |c| {
        let mut total: Option<ReleaseReport> = None;
        loop {
            let r: ReleaseReport = c.post("/api/release", &body)?;
            let done = r.complete;
            if !done && r.count == 0 {
                // Each call starts over, skipping what is released: one that released
                // nothing would be followed by the same.
                return Err(ClientError::Refused {
                    status: 503,
                    message: "the daemon found nothing to release within its request time \
                              before the walk of the store ended; try again"
                        .into(),
                });
            }
            total = Some(match total {
                None => r,
                Some(mut t) => {
                    t.count += r.count;
                    t.released.extend(r.released);
                    t.released.truncate(entries::SHOWN);
                    t.already_passed.extend(r.already_passed);
                    t.already_passed.truncate(entries::SHOWN);
                    t.complete = done;
                    t
                }
            });
            if done {
                return Ok(total.unwrap_or_default());
            }
        }
    })? {
        Some(r) => r,
        None => {
            let store = match open_store(&ctx.cfg, Access::Write) {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let rt = runtime()?;
            let now = unix_now();
            let mut total = ReleaseReport::default();
            let mut failed = None;
            loop {
                let done = rt.block_on(entries::release(
                    store.as_ref(),
                    &ctx.cfg.engine,
                    &target,
                    now,
                    Duration::from_secs(60),
                ));
                let r = done.report;
                total.count += r.count;
                total.released.extend(r.released);
                total.released.truncate(entries::SHOWN);
                total.already_passed.extend(r.already_passed);
                total.already_passed.truncate(entries::SHOWN);
                if let Some(e) = done.error {
                    failed = Some(e);
                    break;
                }
                if r.complete {
                    break;
                }
                if r.count == 0 {
                    bail!("found nothing to release in 60 s before the walk of the store ended");
                }
            }
            if failed.is_none() {
                failed = rt.block_on(store.flush_fully()).err();
            }
            // No daemon log to write to: the audit line goes to stderr.
            eprintln!(
                "greygate: released who=\"local user {}, store opened directly\" at={now} count={} triplets=\"{}\"",
                local_user(),
                total.count,
                entries::keys_text(&total.released, total.count)
            );
            if let Some(e) = failed {
                bail!("{e} (after releasing {} triplet(s))", total.count);
            }
            total
        }
    };
    print!("{}", release_text(&report));
    if report.count == 0 {
        let what = match &target {
            entries::ReleaseTarget::Keys(keys) => keys
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
            entries::ReleaseTarget::Recipient { recipient, sender } => match sender {
                Some(s) => format!("from {s} to {recipient}"),
                None => format!("to {recipient}"),
            },
        };
        eprintln!(
            "greygate: nothing released: no pending triplet {what} (never seen, expired, or already passed)"
        );
        return Ok(ExitCode::from(NOTHING_RELEASED));
    }
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

/// Where a command changes runtime entries when no daemon answers: the shared store
/// (redis, postgres), or the entries file.
enum OfflineEntries {
    Store(std::sync::Arc<dyn store::Store>),
    File(RuntimeEntries),
}

fn offline_entries(cfg: &Config) -> anyhow::Result<OfflineEntries> {
    if matches!(
        cfg.store.kind,
        store::StoreKind::Redis(_) | store::StoreKind::Postgres(_)
    ) {
        return Ok(OfflineEntries::Store(store::open(
            &cfg.store,
            Access::Write,
        )?));
    }
    let Some(path) = &cfg.admin.entries_file else {
        bail!("no daemon answers and this store keeps runtime entries only in the daemon's memory");
    };
    Ok(OfflineEntries::File(RuntimeEntries::load(path)?))
}

impl OfflineEntries {
    fn shared(store: &dyn store::Store) -> anyhow::Result<&dyn store::SharedEntries> {
        store
            .shared_entries()
            .ok_or_else(|| anyhow::anyhow!("this store does not keep runtime entries"))
    }

    fn add(
        &self,
        list: ListKind,
        t: Target,
        value: &str,
        ttl: Option<u64>,
        comment: &str,
    ) -> anyhow::Result<RuntimeEntry> {
        Ok(match self {
            OfflineEntries::Store(s) => {
                runtime()?.block_on(greygate::service::entries::add_shared(
                    Self::shared(s.as_ref())?,
                    list,
                    t,
                    value,
                    ttl,
                    comment,
                    unix_now(),
                ))?
            }
            OfflineEntries::File(f) => f.add(list, t, value, ttl, comment, unix_now())?,
        })
    }

    fn remove(&self, list: ListKind, sel: &Selector) -> anyhow::Result<usize> {
        Ok(match self {
            OfflineEntries::Store(s) => runtime()?
                .block_on(greygate::service::entries::remove_shared(
                    Self::shared(s.as_ref())?,
                    list,
                    sel,
                ))?
                .len(),
            OfflineEntries::File(f) => f.remove(list, sel)?.len(),
        })
    }

    fn list(&self) -> anyhow::Result<Vec<RuntimeEntry>> {
        Ok(match self {
            OfflineEntries::Store(s) => {
                runtime()?
                    .block_on(Self::shared(s.as_ref())?.list_entries())?
                    .1
            }
            OfflineEntries::File(f) => f.list(),
        })
    }
}

fn runtime_text(entries: &[RuntimeEntry]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>4} {:<5} {:<9} {:<32} {:<19} COMMENT",
        "#", "LIST", "MATCHES", "VALUE", "EXPIRES (UTC)"
    );
    for e in entries {
        let expires = e.expires_at.map_or("never".to_string(), when);
        let _ = writeln!(
            o,
            "{:>4} {:<5} {:<9} {:<32} {:<19} {}",
            e.id,
            e.list.as_str(),
            e.target.as_str(),
            e.value,
            expires,
            e.comment
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
            let body = AddEntry {
                target: t,
                value,
                ttl: ttl_secs.map(|s| Dur(Duration::from_secs(s))),
                comment,
            };
            let e: RuntimeEntry = match ask(&ctx, |c| {
                c.post(&format!("/api/runtime/{name}"), &body)
            })? {
                Some(e) => e,
                None => {
                    offline_entries(&ctx.cfg)?.add(list, t, &body.value, ttl_secs, &body.comment)?
                }
            };
            println!("{}", added_text(name, &e));
            Ok(ExitCode::SUCCESS)
        }
        RuntimeAction::Remove { daemon, what } => {
            let ctx = match context(&daemon)? {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let sel = selector(&what);
            let asked = ask(&ctx, |c| -> Result<Removed, ClientError> {
                match &sel {
                    Selector::Id(id) => c.delete(&format!("/api/runtime/{name}/{id}")),
                    Selector::Value(v) => c.delete_query(
                        &format!("/api/runtime/{name}"),
                        &ValueQuery { value: v.clone() },
                    ),
                }
            })?;
            let gone = match asked {
                Some(r) => r.removed.len(),
                None => offline_entries(&ctx.cfg)?.remove(list, &sel)?,
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
            let all: Vec<RuntimeEntry> = match ask(&ctx, |c| c.get::<RuntimeList>("/api/runtime"))?
            {
                Some(r) => r.entries,
                None => {
                    let now = unix_now();
                    offline_entries(&ctx.cfg)?
                        .list()?
                        .into_iter()
                        .filter(|e| e.alive(now))
                        .collect()
                }
            };
            let mine: Vec<RuntimeEntry> = all.into_iter().filter(|e| e.list == list).collect();
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
    reload_through(ctx.client.as_ref())
}

/// Asks the daemon behind `client` to reload its configuration and allow-list files, and
/// says what it answered: `greygate reload` and `greygate lists update --reload`.
pub(super) fn reload_through(client: Option<&AdminClient>) -> anyhow::Result<ExitCode> {
    match ask_client(client, |c| {
        c.post::<_, ReloadReport>("/api/reload", &ReloadRequest {})
    })? {
        Some(r) => {
            println!("configuration reloaded");
            if !r.needs_restart.is_empty() {
                println!(
                    "changed settings that need a restart: {}",
                    r.needs_restart.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("no daemon to reload"),
    }
}

/// `explain --live`: the running daemon explains with its own engine and store.
pub fn explain_live(
    daemon: &DaemonArgs,
    query: &ExplainQuery,
    json_out: bool,
) -> anyhow::Result<Option<ExitCode>> {
    let ctx = match context(daemon)? {
        Ok(c) => c,
        Err(code) => return Ok(Some(code)),
    };
    let Some(x) = ask(&ctx, |c| {
        c.get_query::<_, ExplainAnswer>("/api/explain", query)
    })?
    else {
        return Ok(None);
    };
    if json_out {
        // The explanation without the daemon's text, as `explain --json` prints it offline.
        println!("{}", serde_json::to_string_pretty(&x.explanation)?);
    } else {
        print!("{}", x.text);
    }
    Ok(Some(ExitCode::SUCCESS))
}

/// The line `allow add` / `deny add` prints; the value quoted as JSON (as it always was).
fn added_text(list: &str, e: &RuntimeEntry) -> String {
    format!(
        "added #{}: {list} {} {}",
        e.id,
        e.target.as_str(),
        serde_json::Value::String(e.value.clone())
    )
}

#[cfg(test)]
mod tests {
    //! The text the commands print, checked against what they printed when they still read
    //! untyped JSON (the expected strings were captured from that code on these answers).

    use super::*;

    const STATS: &str = r#"{"version":"0.1.0","now":1700000100,"started_at":1700000000,"uptime_seconds":100,"mode":"learn","store":"embedded /var/lib/greygate/greygate.redb","store_available":false,"store_health":null,"entries":{"triplets_pending":3,"triplets_passed":2,"clients":1},"pass":10,"defer":4,"skip":1,"fail_open":0,"fail_closed":2,"learn_would_defer":5,"decisions":[{"rule":"new","verdict":"defer","count":4},{"rule":"known","verdict":"pass","count":10}],"decision_p99_seconds":0.001,"listeners":[{"address":"127.0.0.1:10023","protocol":"policy","open":1,"limit":100,"accepted":7,"refused":0}],"runtime_entries":2,"reloads":1,"reload_failures":0,"policy":{"delay":300,"retry_window":172800,"max_age":3024000,"auto_allow_after":5,"auto_allow_lifetime":3024000,"ipv4_prefix":24,"ipv6_prefix":64,"new_triplets_per_client":1000,"new_triplets_window":3600}}"#;
    const ENTRIES: &str = r#"[{"kind":"triplet","key":{"client":"192.0.2.0/24","sender":"alice@example.net","recipient":"bob@example.org"},"record":{"first_seen":1700000000,"last_seen":1700000050,"expires_at":1700172800,"attempts":2,"passes":0,"passed":false}},{"kind":"triplet","key":{"client":"spf:example.com","sender":"","recipient":"postmaster@example.org"},"record":{"first_seen":1700000000,"last_seen":1700000400,"expires_at":1703024000,"attempts":1,"passes":3,"passed":true}},{"kind":"client","client":"198.51.100.0/24","record":{"passes":4,"last_counted":1700000000,"last_seen":1700000300,"expires_at":1703024000}}]"#;
    const RUNTIME: &str = r#"[{"id":1,"list":"allow","target":"client","value":"192.0.2.0/24","added_at":1700000000,"expires_at":1700604800,"comment":"partner"},{"id":12,"list":"allow","target":"sender","value":"@example.com","added_at":1700000000}]"#;

    #[test]
    fn stats_text_is_unchanged() {
        let s: StatsView = serde_json::from_str(STATS).expect("stats");
        assert_eq!(
            stats_text(&s),
            concat!(
                "greygate 0.1.0 up 100 s, mode learn\n",
                "store:      embedded /var/lib/greygate/greygate.redb (UNAVAILABLE (answering per fail_mode))\n",
                "entries:    3 pending, 2 passed triplets; 1 client groups\n",
                "answers:    10 passed, 4 deferred, 1 not greylisted; 0 fail-open, 2 fail-closed\n",
                "by rule:\n",
                "  new                    defer           4\n",
                "  known                  pass           10\n",
                "listener:   policy 127.0.0.1:10023 — 1 open of 100, 7 accepted, 0 refused\n",
                "runtime entries: 2\n"
            )
        );
        let no_counts = StatsView { entries: None, ..s };
        assert_eq!(
            stats_text(&no_counts),
            concat!(
                "greygate 0.1.0 up 100 s, mode learn\n",
                "store:      embedded /var/lib/greygate/greygate.redb (UNAVAILABLE (answering per fail_mode))\n",
                "answers:    10 passed, 4 deferred, 1 not greylisted; 0 fail-open, 2 fail-closed\n",
                "by rule:\n",
                "  new                    defer           4\n",
                "  known                  pass           10\n",
                "listener:   policy 127.0.0.1:10023 — 1 open of 100, 7 accepted, 0 refused\n",
                "runtime entries: 2\n"
            )
        );
    }

    #[test]
    fn entries_and_runtime_tables_are_unchanged() {
        let e: Vec<Entry> = serde_json::from_str(ENTRIES).expect("entries");
        assert_eq!(
            entries_text(&e),
            concat!(
                "STATE    CLIENT               SENDER                         RECIPIENT                      FIRST SEEN (UTC)    TRIES EXPIRES (UTC)      \n",
                "pending  192.0.2.0/24         alice@example.net              bob@example.org                2023-11-14 22:13:20     2 2023-11-16 22:13:20\n",
                "passed   spf:example.com      <>                             postmaster@example.org         2023-11-14 22:13:20     1 2023-12-19 22:13:20\n",
                "client   198.51.100.0/24      4 counted passes                                              2023-11-14 22:13:20       2023-12-19 22:13:20\n"
            )
        );
        let r: Vec<RuntimeEntry> = serde_json::from_str(RUNTIME).expect("runtime");
        assert_eq!(
            runtime_text(&r),
            concat!(
                "   # LIST  MATCHES   VALUE                            EXPIRES (UTC)       COMMENT\n",
                "   1 allow client    192.0.2.0/24                     2023-11-21 22:13:20 partner\n",
                "  12 allow sender    @example.com                     never               \n"
            )
        );
        assert_eq!(
            added_text("allow", &r[0]),
            "added #1: allow client \"192.0.2.0/24\""
        );
    }
}
