//! postgrey's databases, read through Berkeley DB's `db_dump`.
//!
//! postgrey (1.37, `/usr/sbin/postgrey`) keeps two Berkeley DB B-tree files in its
//! `--dbdir`, inside a transactional environment:
//!
//! - `postgrey.db`: key `lc "CLIENT_NET/SENDER/RECIPIENT"`, value `FIRST,LAST` (Unix
//!   seconds; older versions appended `,CLIENT_HOST`). CLIENT_NET is the client's address
//!   masked to `--ipv4cidr` (24) or `--ipv6cidr` (64) bits, written without the length
//!   (`192.0.2.0`, `2001:db8:0:0:0:0:0:0`), or the whole address with `--lookup-by-host`.
//!   SENDER has had BATV `prvs=` tags and `+extensions` removed and digit runs replaced by
//!   `#`; the null sender is empty. RECIPIENT is as Postfix sent it (extension kept). A
//!   triplet has passed when `LAST - FIRST >= --delay`; postgrey forgets pending ones after
//!   `--retry-window` and passed ones after `--max-age`.
//! - `postgrey_clients.db` (with `--auto-whitelist-clients`, on by default at 5): key the
//!   client's whole address, value `COUNT,LAST`: passes counted at most once an hour, the
//!   client is whitelisted from COUNT >= N on.
//!
//! With `--privacy` every key is a SHA-1 hex digest: nothing can be recovered from them.
//!
//! **Why `db_dump`.** No maintained, permissively licensed Rust crate reads Berkeley DB
//! B-tree files, and linking libdb would bring the Sleepycat licence's terms into greygate.
//! `db_dump` is Berkeley DB's own reader (Debian `db-util` / `db5.3-util`): it joins
//! postgrey's environment (`-h DBDIR`), so it reads pages the environment's cache holds
//! as well, and its `-p` output is a documented, line-based text format, parsed here with
//! every line bounded and every escape checked.

use std::io::{BufRead, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Bad, ImportError, Importer, Skip, SourceNet, clamp_time};

/// postgrey's settings that shaped its records (its command-line options of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgreyOptions {
    /// `--delay` in seconds: a triplet with `LAST - FIRST >= delay` has passed.
    pub delay: u64,
    /// `--ipv4cidr`.
    pub ipv4cidr: u8,
    /// `--ipv6cidr`.
    pub ipv6cidr: u8,
    /// `--lookup-by-host`: keys hold whole addresses.
    pub lookup_by_host: bool,
    /// `--auto-whitelist-clients`: passes from which a client was whitelisted (0: off).
    pub auto_whitelist_clients: u32,
}

impl Default for PostgreyOptions {
    fn default() -> Self {
        PostgreyOptions {
            delay: 300,
            ipv4cidr: 24,
            ipv6cidr: 64,
            lookup_by_host: false,
            auto_whitelist_clients: 5,
        }
    }
}

/// Longest line of `db_dump` output read (keys and values of postgrey are a few hundred
/// bytes; escaped, up to three times that).
pub const MAX_LINE: usize = 64 * 1024;

/// Most records read from one file: a bound on the import's run, far above any postgrey.
pub const MAX_RECORDS: u64 = 100_000_000;

/// One item of `db_dump -p` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DumpItem {
    /// A key and its value, unescaped.
    Pair(Vec<u8>, Vec<u8>),
    /// A record that could not be read (a bad escape, an over-long line, a key without
    /// its value), with why.
    Bad(String),
}

/// Why the dump as a whole cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    #[error("db_dump output has no header (no \"HEADER=END\" line)")]
    NoHeader,
    #[error("db_dump output is in format {0:?}; expected \"print\" or \"bytevalue\"")]
    Format(String),
    #[error("db_dump output ends before \"DATA=END\"")]
    Truncated,
    #[error("more than {MAX_RECORDS} records")]
    TooMany,
    #[error("reading db_dump output: {0}")]
    Io(String),
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline). `Ok(None)` at the
/// end; an over-long line is consumed and returned as `Err(true)`.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<Option<bool>, DumpError> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().map_err(|e| DumpError::Io(e.to_string()))?;
        if chunk.is_empty() {
            return Ok((!buf.is_empty() || too_long).then_some(too_long));
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take <= MAX_LINE {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            too_long = true;
        }
        r.consume(take + usize::from(done));
        if done {
            return Ok(Some(too_long));
        }
    }
}

/// Parses the output of `db_dump -p` (or of plain `db_dump`, format `bytevalue`): calls
/// `each` for every record in order. Stops at the first error `each` returns.
///
/// # Errors
///
/// The output is not a dump (no header, an unknown format, cut short) or holds more than
/// [`MAX_RECORDS`] records; or `each` failed.
pub fn parse_dump<E: From<DumpError>>(
    mut r: impl BufRead,
    mut each: impl FnMut(DumpItem) -> Result<(), E>,
) -> Result<(), E> {
    let mut line = Vec::new();
    let mut records = 0u64;
    // Several databases in one file each have a header and a data section.
    let mut sections = 0u32;
    loop {
        // Header: `name=value` lines up to HEADER=END.
        let mut printable = None;
        loop {
            match read_line(&mut r, &mut line)? {
                None if sections > 0 && printable.is_none() => return Ok(()),
                None => return Err(DumpError::NoHeader.into()),
                Some(true) => continue,
                Some(false) => {}
            }
            match line.as_slice() {
                b"HEADER=END" => break,
                l => {
                    if let Some(f) = l.strip_prefix(b"format=") {
                        printable = Some(match f {
                            b"print" => true,
                            b"bytevalue" => false,
                            other => {
                                return Err(DumpError::Format(
                                    String::from_utf8_lossy(other).into_owned(),
                                )
                                .into());
                            }
                        });
                    }
                }
            }
        }
        let printable = printable.unwrap_or(false);
        sections += 1;
        // Data: key line, value line, ... up to DATA=END. Data lines start with a space.
        let mut key: Option<Result<Vec<u8>, String>> = None;
        loop {
            let too_long = match read_line(&mut r, &mut line)? {
                None => return Err(DumpError::Truncated.into()),
                Some(t) => t,
            };
            if !too_long && line.as_slice() == b"DATA=END" {
                if key.is_some() {
                    each(DumpItem::Bad("a key without a value at the end".into()))?;
                }
                break;
            }
            let decoded = if too_long {
                Err(format!("a line longer than {MAX_LINE} bytes"))
            } else {
                match line.strip_prefix(b" ") {
                    Some(data) if printable => unescape(data),
                    Some(data) => unhex(data),
                    None => Err("a data line that does not start with a space".into()),
                }
            };
            match key.take() {
                None => key = Some(decoded),
                Some(k) => {
                    records += 1;
                    if records > MAX_RECORDS {
                        return Err(DumpError::TooMany.into());
                    }
                    let item = match (k, decoded) {
                        (Ok(k), Ok(v)) => DumpItem::Pair(k, v),
                        (Err(e), _) => DumpItem::Bad(format!("key: {e}")),
                        (_, Err(e)) => DumpItem::Bad(format!("value: {e}")),
                    };
                    each(item)?;
                }
            }
        }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `db_dump -p`'s printable encoding: bytes as they are, except `\\` for a backslash and
/// `\hh` (two hex digits) for a byte that is not printable.
pub fn unescape(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i] != b'\\' {
            out.push(data[i]);
            i += 1;
            continue;
        }
        match (data.get(i + 1), data.get(i + 2)) {
            (Some(b'\\'), _) => {
                out.push(b'\\');
                i += 2;
            }
            (Some(&h), Some(&l)) => match (hex_digit(h), hex_digit(l)) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => return Err(format!("a bad escape at byte {i}")),
            },
            _ => return Err(format!("an escape cut short at byte {i}")),
        }
    }
    Ok(out)
}

/// `db_dump`'s `bytevalue` encoding: two hex digits a byte.
fn unhex(data: &[u8]) -> Result<Vec<u8>, String> {
    if !data.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    data.chunks(2)
        .map(|p| Some(hex_digit(p[0])? << 4 | hex_digit(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| "a character that is not a hex digit".into())
}

/// A record of `postgrey.db`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgreyTriplet {
    pub net: SourceNet,
    pub sender: String,
    pub recipient: String,
    pub first: u64,
    pub last: u64,
}

/// A record of `postgrey_clients.db`, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgreyClient {
    pub ip: IpAddr,
    pub count: u32,
    pub last: u64,
}

/// postgrey `--privacy` keys: a SHA-1 digest in lower-case hex.
fn is_digest(key: &[u8]) -> bool {
    key.len() == 40 && key.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn text(bytes: &[u8], what: &str) -> Result<String, Bad> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Bad::unparseable(format!("{what} is not UTF-8")))
}

/// `FIRST,LAST[,...]` or `COUNT,LAST`: two decimal numbers before anything else.
fn two_numbers(value: &[u8]) -> Result<(u64, u64), Bad> {
    let v = std::str::from_utf8(value).map_err(|_| Bad::unparseable("value is not text"))?;
    let mut parts = v.split(',');
    let mut number = |what: &str| {
        parts
            .next()
            .map(str::trim)
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| Bad::unparseable(format!("value {v:?} has no {what}")))
    };
    Ok((number("first number")?, number("second number")?))
}

/// Splits `CLIENT_NET/SENDER/RECIPIENT`. The network holds no `/`; the sender and the
/// recipient may (a local part may hold `/`), so the split is taken where the sender is
/// empty (the null sender) or ends in a domain (`@` and no `/` after it) and the recipient
/// holds an `@`. A key two splits would fit is refused rather than guessed.
fn split_key(key: &str) -> Result<(&str, &str, &str), Bad> {
    let (net, rest) = key
        .split_once('/')
        .ok_or_else(|| Bad::unparseable("no '/' after the client network"))?;
    let mut found = None;
    for (i, _) in rest.match_indices('/') {
        let (sender, recipient) = (&rest[..i], &rest[i + 1..]);
        let sender_ok = sender.is_empty()
            || sender
                .rfind('@')
                .is_some_and(|at| !sender[at..].contains('/'));
        if sender_ok && recipient.contains('@') {
            if found.is_some() {
                return Err(Bad::unparseable(
                    "the '/' between sender and recipient is ambiguous",
                ));
            }
            found = Some((sender, recipient));
        }
    }
    let (sender, recipient) =
        found.ok_or_else(|| Bad::unparseable("no sender/recipient split fits"))?;
    Ok((net, sender, recipient))
}

/// The source network of a key's CLIENT_NET: as wide as postgrey's `--ipv4cidr` /
/// `--ipv6cidr` said, unless the address has host bits set there (a key from
/// `--lookup-by-host`, or a narrower setting at the time): then the host alone.
fn net_of(net: &str, opts: &PostgreyOptions) -> Result<SourceNet, Bad> {
    let ip: IpAddr = net
        .parse()
        .map_err(|_| Bad::unparseable(format!("client network {net:?} is not an address")))?;
    let (full, declared) = match ip {
        IpAddr::V4(_) => (32, opts.ipv4cidr.min(32)),
        IpAddr::V6(_) => (128, opts.ipv6cidr.min(128)),
    };
    if opts.lookup_by_host {
        return Ok(SourceNet { ip, prefix: full });
    }
    // Shifted left by the prefix, only the host bits are left.
    let host_bits = match ip {
        IpAddr::V4(v4) => u32::from(v4)
            .checked_shl(u32::from(declared))
            .is_some_and(|h| h != 0),
        IpAddr::V6(v6) => u128::from(v6)
            .checked_shl(u32::from(declared))
            .is_some_and(|h| h != 0),
    };
    let prefix = if host_bits { full } else { declared };
    Ok(SourceNet { ip, prefix })
}

/// Reads a `postgrey.db` record.
///
/// # Errors
///
/// A record that cannot be read ([`Skip::Unparseable`]) or a `--privacy` digest
/// ([`Skip::Hashed`]).
pub fn parse_triplet(
    key: &[u8],
    value: &[u8],
    opts: &PostgreyOptions,
) -> Result<PostgreyTriplet, Bad> {
    if is_digest(key) {
        return Err(Bad::because(Skip::Hashed));
    }
    let key = text(key, "key")?;
    let (net, sender, recipient) = split_key(&key)?;
    let (first, last) = two_numbers(value)?;
    Ok(PostgreyTriplet {
        net: net_of(net, opts)?,
        sender: sender.to_string(),
        recipient: recipient.to_string(),
        first,
        last,
    })
}

/// Reads a `postgrey_clients.db` record.
///
/// # Errors
///
/// As [`parse_triplet`].
pub fn parse_client(key: &[u8], value: &[u8]) -> Result<PostgreyClient, Bad> {
    if is_digest(key) {
        return Err(Bad::because(Skip::Hashed));
    }
    let key = text(key, "key")?;
    let ip = key
        .trim()
        .parse()
        .map_err(|_| Bad::unparseable(format!("client {key:?} is not an address")))?;
    let (count, last) = two_numbers(value)?;
    Ok(PostgreyClient {
        ip,
        count: u32::try_from(count).unwrap_or(u32::MAX),
        last,
    })
}

/// The `db_dump` to run: `tool` if given, else the first of Berkeley DB's usual names on
/// `PATH` (Debian: `db_dump` from db-util, `db5.3_dump` from db5.3-util).
pub fn find_db_dump(tool: Option<&Path>) -> Result<PathBuf, ImportError> {
    if let Some(t) = tool {
        return Ok(t.to_path_buf());
    }
    const NAMES: [&str; 5] = [
        "db_dump",
        "db5.3_dump",
        "db5.1_dump",
        "db4.8_dump",
        "db6.0_dump",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in NAMES {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(ImportError::Source(
        "no db_dump found on PATH (install Berkeley DB's utilities: Debian's db-util or \
         db5.3-util), or name one with --db-dump"
            .into(),
    ))
}

/// Most bytes of `db_dump`'s standard error kept for the report of a failure.
const MAX_STDERR: u64 = 16 * 1024;

/// How long `db_dump` may go without writing a byte before it is stopped (it waits
/// forever on a lock a crashed postgrey left in its environment).
const STALL: Duration = Duration::from_secs(60);

/// Stops a process that makes no progress for a while: the import's bound in time.
struct Watchdog {
    start: Instant,
    /// Milliseconds from `start` to the latest progress.
    last: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches process `pid` (a child not reaped before [`Watchdog::stop`]): SIGKILL once
    /// it made no progress for `limit`.
    fn start(pid: u32, limit: Duration) -> Watchdog {
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let (l, d, s) = (last.clone(), done.clone(), stalled.clone());
        let limit = millis(limit);
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if millis(start.elapsed()).saturating_sub(l.load(Ordering::Relaxed)) > limit {
                    s.store(true, Ordering::Relaxed);
                    if let Ok(pid) = i32::try_from(pid) {
                        // SAFETY: kill(2) on the caller's child, which is not reaped
                        // before this thread is joined, so the pid is still its.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    return;
                }
            }
        });
        Watchdog {
            start,
            last,
            done,
            stalled,
            thread: Some(thread),
        }
    }

    fn progress(&self) {
        self.last
            .fetch_max(millis(self.start.elapsed()), Ordering::Relaxed);
    }

    /// Ends the watch; whether the process was stopped for making no progress.
    fn stop(mut self) -> bool {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.stalled.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A reader that tells the watchdog of every read that brought bytes.
struct Progress<'a, R> {
    inner: R,
    watch: &'a Watchdog,
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.watch.progress();
        }
        Ok(n)
    }
}

/// Runs `db_dump -p -h DBDIR FILE` and calls `each` with every record of its output.
fn dump_file(
    tool: &Path,
    dbdir: &Path,
    file: &str,
    stall: Duration,
    mut each: impl FnMut(DumpItem) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    let mut child = Command::new(tool)
        .arg("-p")
        .arg("-h")
        .arg(dbdir)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImportError::Source(format!("cannot run {}: {e}", tool.display())))?;
    let stderr = child.stderr.take().map(|s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut s = s.take(MAX_STDERR);
            let _ = s.read_to_string(&mut text);
            // Drain the rest so that db_dump never blocks on a full pipe.
            let _ = std::io::copy(&mut s.into_inner(), &mut std::io::sink());
            text
        })
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    // Progress is output read or a record stored: a slow store is not a stalled db_dump.
    let watch = Watchdog::start(child.id(), stall);
    let parsed = parse_dump(
        std::io::BufReader::new(Progress {
            inner: stdout,
            watch: &watch,
        }),
        |item| {
            watch.progress();
            each(item)
        },
    );
    // The watch ends before the child is reaped, so it never signals a reused pid.
    let stalled = watch.stop();
    // A failure while db_dump still runs is ours (the store, a bound, its output): it
    // need not finish. One after it ended comes second to how it ended. Its output may end
    // (no header, say) a moment before it can be reaped: it gets a short while to exit.
    let ours = parsed.is_err() && !exits_within(&mut child, EXIT_GRACE);
    if ours {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| ImportError::Source(format!("waiting for {}: {e}", tool.display())))?;
    let stderr = stderr
        .and_then(|t| t.join().ok())
        .unwrap_or_default()
        .trim()
        .to_string();
    if stalled {
        return Err(ImportError::Source(format!(
            "{} -p -h {} {file} wrote nothing for {} s and was stopped: is the environment \
             locked by a postgrey that crashed? `db5.3_recover -h {}` with postgrey stopped \
             repairs it",
            tool.display(),
            dbdir.display(),
            stall.as_secs(),
            dbdir.display()
        )));
    }
    if ours {
        return parsed;
    }
    if !status.success() {
        return Err(ImportError::Source(format!(
            "{} -p -h {} {file} failed ({status}): {}; if postgrey's environment is damaged \
             (a crash), `db5.3_recover -h {}` with postgrey stopped repairs it",
            tool.display(),
            dbdir.display(),
            if stderr.is_empty() {
                "no message"
            } else {
                &stderr
            },
            dbdir.display()
        )));
    }
    parsed
}

/// How long a `db_dump` whose output was found wrong may take to exit before it is
/// stopped (a failing one closes its output as it exits).
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Whether `child` has exited, or does within `limit`.
fn exits_within(child: &mut std::process::Child, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Err(_) => return false,
            Ok(None) if Instant::now() >= until => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl From<DumpError> for ImportError {
    fn from(e: DumpError) -> Self {
        ImportError::Source(e.to_string())
    }
}

/// The count greygate keeps for a postgrey client with `count` passes: a client postgrey
/// whitelisted stays auto-allowed, one on its way keeps its count below greygate's
/// threshold (`auto_allow_after`), so each side's verdict carries over.
pub fn client_count(count: u32, opts: &PostgreyOptions, auto_allow_after: u32) -> u32 {
    let whitelisted = opts.auto_whitelist_clients > 0 && count >= opts.auto_whitelist_clients;
    if whitelisted {
        count.max(auto_allow_after)
    } else {
        count.min(auto_allow_after.saturating_sub(1))
    }
}

/// Whether `dbdir` is postgrey's database directory (it holds `postgrey.db`).
///
/// # Errors
///
/// It is not.
pub fn check_dbdir(dbdir: &Path) -> Result<(), ImportError> {
    if dbdir.join("postgrey.db").is_file() {
        Ok(())
    } else {
        Err(ImportError::Source(format!(
            "{} holds no postgrey.db: not postgrey's --dbdir",
            dbdir.display()
        )))
    }
}

/// Reads postgrey's `DBDIR` into the importer: `postgrey.db` as triplets,
/// `postgrey_clients.db` (when present) as client counts. `rt` runs the store's writes.
///
/// # Errors
///
/// `db_dump` is missing or fails, `postgrey.db` is missing, or the store failed.
pub fn import(
    imp: &mut Importer,
    rt: &tokio::runtime::Runtime,
    dbdir: &Path,
    tool: &Path,
    opts: &PostgreyOptions,
) -> Result<(), ImportError> {
    check_dbdir(dbdir)?;
    let now = imp.now();
    each_record(imp, tool, dbdir, "postgrey.db", |imp, t, k, v| {
        let r = parse_triplet(k, v, opts)?;
        let key = super::key_of(imp.engine(), r.net, &r.sender, &r.recipient)?;
        let (first, last) = (clamp_time(r.first, now), clamp_time(r.last, now));
        let first = first.min(last);
        let record = if r.last.saturating_sub(r.first) >= opts.delay {
            super::passed(imp.engine(), first, last)
        } else {
            super::pending(imp.engine(), first, last)
        };
        Ok(rt.block_on(imp.triplet(t, key, record)))
    })?;
    if !dbdir.join("postgrey_clients.db").is_file() {
        imp.note(
            "no postgrey_clients.db: postgrey kept no client auto-whitelist (--auto-whitelist-clients=0)",
        );
        return Ok(());
    }
    each_record(imp, tool, dbdir, "postgrey_clients.db", |imp, t, k, v| {
        let c = parse_client(k, v)?;
        let full = if c.ip.is_ipv4() { 32 } else { 128 };
        let net = SourceNet {
            ip: c.ip,
            prefix: full,
        };
        let group = super::group_of(imp.engine(), net)?;
        Ok(imp.client_passes(t, group, c.count, clamp_time(c.last, now)))
    })
}

/// Each record of postgrey's `file`, as table `file` of the report: counted as read, and
/// skipped as `record N` when `db_dump` could not give it as a key and value or `each`
/// finds it bad (`Err(Bad)`); `each` stores it otherwise (`Ok` of what storing gave).
fn each_record(
    imp: &mut Importer,
    tool: &Path,
    dbdir: &Path,
    file: &str,
    mut each: impl FnMut(&mut Importer, usize, &[u8], &[u8]) -> Result<Result<(), ImportError>, Bad>,
) -> Result<(), ImportError> {
    let t = imp.table(file);
    let mut n = 0u64;
    dump_file(tool, dbdir, file, STALL, |item| {
        n += 1;
        imp.read(t);
        let what = || format!("record {n}");
        let stored = match item {
            DumpItem::Pair(k, v) => each(imp, t, &k, &v),
            DumpItem::Bad(why) => Err(Bad::unparseable(why)),
        };
        stored.unwrap_or_else(|bad| {
            imp.skip(t, bad, what);
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests;
