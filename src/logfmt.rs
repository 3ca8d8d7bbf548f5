//! A cheaper text log format for the decision line, which is written once per request.
//!
//! tracing-subscriber's default field formatter Debug-escapes every string character by
//! character and its timestamp is rebuilt from the calendar for every line; together that
//! cost as much as the decision itself (BENCHMARKS.md, "What limits what"). These two
//! replacements write the same line: `name="value"` with the escapes Rust's Debug uses for
//! quotes, backslashes and control characters (plain runs are copied at once), and the
//! RFC 3339 timestamp with its date and time part formatted once per second and thread.

use std::cell::RefCell;
use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::lock;
use crate::metrics::{STRIPES, Striped};

/// Event formatter: `TIMESTAMP  LEVEL target: span: message fields`, the layout of
/// tracing-subscriber's default (without colours), written directly.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuickEvent;

impl<S, N> FormatEvent<S, N> for QuickEvent
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        CachedTime.format_time(&mut writer)?;
        let meta = event.metadata();
        write!(writer, " {:>5} {}: ", meta.level(), meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}: ", span.name())?;
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Field formatter: `message k="v" n=1`, values escaped only where needed.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuickFields;

impl<'writer> FormatFields<'writer> for QuickFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            w: writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    w: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn sep(&mut self) -> fmt::Result {
        if self.first {
            self.first = false;
            Ok(())
        } else {
            self.w.write_char(' ')
        }
    }

    fn name(&mut self, field: &Field) -> fmt::Result {
        self.sep()?;
        self.w.write_str(field.name())?;
        self.w.write_char('=')
    }
}

/// Writes `s` quoted and escaped exactly as Rust's Debug does.
pub fn write_quoted(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // Addresses and names almost never need an escape: one byte scan decides, and the
    // plain string is copied at once. Anything else (quotes, backslashes, controls, any
    // non-ASCII character) takes Debug's own path, so the output is the same either way.
    if !is_plain(s.as_bytes()) {
        return write!(w, "{s:?}");
    }
    w.write_char('"')?;
    w.write_str(s)?;
    w.write_char('"')
}

/// Whether every byte of `s` is printable ASCII other than `"` and `\\`: eight bytes at a
/// time (a decision line has some 300 bytes of values to check).
fn is_plain(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero (exact as a test of "any": a borrow only ever follows a zero).
    let any_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut words = s.chunks_exact(8);
    for word in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        let v = u64::from_le_bytes(b);
        // Non-ASCII; then, all bytes below 0x80, one below 0x20 (borrows from its high
        // bit only); DEL, '"' or '\\'.
        if v & HIGH != 0
            || v.wrapping_sub(ONES * 0x20) & !v & HIGH != 0
            || any_zero(v ^ (ONES * 0x7f))
            || any_zero(v ^ (ONES * u64::from(b'"')))
            || any_zero(v ^ (ONES * u64::from(b'\\')))
        {
            return false;
        }
    }
    words.remainder().iter().all(|&b| is_plain_byte(b))
}

fn is_plain_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            self.sep().and_then(|()| self.w.write_str(value))
        } else {
            self.name(field)
                .and_then(|()| write_quoted(&mut self.w, value))
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| write!(self.w, "{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        // `message` arrives as format arguments: Debug prints them as written.
        self.result = if field.name() == "message" {
            self.sep().and_then(|()| write!(self.w, "{value:?}"))
        } else {
            self.name(field).and_then(|()| write!(self.w, "{value:?}"))
        };
    }
}

/// The daemon's log writer, and whether its events are written by
/// [`QuickEvent`]/[`QuickFields`] (the text log, which [`write_direct`] may use).
static SINK: OnceLock<(BatchedStderr, bool)> = OnceLock::new();

/// Declares that `sink` carries the log, to be flushed by [`flush`]. `text`: events are
/// written by [`QuickEvent`]/[`QuickFields`] (the daemon's text log), so hot paths may write
/// their line themselves with [`write_direct`]. Not called in tests with their own
/// subscribers; with the JSON log or without a sink, events carry their fields one by one.
pub fn install(sink: BatchedStderr, text: bool) {
    let _ = SINK.set((sink, text));
}

/// Writes log lines still held for batching (before the process exits or on a panic).
pub fn flush() {
    if let Some((sink, _)) = SINK.get() {
        sink.flush();
    }
}

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Writes one line to the text log as [`QuickEvent`] would for an event of `level` and
/// `target` whose message and fields `fields` writes (`message k="v" n=1`, as
/// [`QuickFields`] spells them), without going through tracing's dispatch. The caller has
/// checked that the level is enabled for the target. `false`: no text sink (JSON log, or
/// not the daemon), and nothing was written — log an event instead.
pub fn write_direct(level: Level, target: &str, fields: impl FnOnce(&mut String)) -> bool {
    let Some((sink, true)) = SINK.get() else {
        return false;
    };
    LINE.with(|cell| {
        let mut line = cell.borrow_mut();
        line.clear();
        format_line(&mut line, level, target, fields);
        let _ = (&*sink.shared).write_all(line.as_bytes());
    });
    true
}

/// The line of [`write_direct`], into `out`.
pub fn format_line(out: &mut String, level: Level, target: &str, fields: impl FnOnce(&mut String)) {
    let _ = push_timestamp(out);
    out.push_str(match level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    });
    out.push_str(target);
    out.push_str(": ");
    fields(out);
    out.push('\n');
}

/// RFC 3339 UTC timestamps with microseconds, `2026-11-28T21:55:03.794734Z`, the date and
/// time of day formatted once per second (per thread).
#[derive(Debug, Default, Clone, Copy)]
pub struct CachedTime;

thread_local! {
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `YYYY-MM-DDTHH:MM:SS` of Unix second `secs` (proleptic Gregorian, UTC).
pub fn format_second(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl FormatTime for CachedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        push_timestamp(w)
    }
}

/// Writes the current time as [`CachedTime`] shows it.
fn push_timestamp(w: &mut impl fmt::Write) -> fmt::Result {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != secs {
            *c = (secs, format_second(secs));
        }
        w.write_str(&c.1)?;
        let mut micros = *b".000000Z";
        let mut n = now.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (n % 10) as u8;
            n /= 10;
        }
        // Only ASCII was written.
        w.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
    })
}

// ---------------------------------------------------------------------------------------------
// Batched writes
// ---------------------------------------------------------------------------------------------

/// How long the writer thread lets lines gather before one `write(2)`.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Bytes of lines one buffer (see [`STRIPES`]) holds at most before the thread that logs
/// writes them all itself (a stuck stderr then slows the daemon down, as a direct write
/// would, instead of growing memory).
const MAX_PENDING: usize = 1 << 20;

/// A `MakeWriter` for stderr that gathers log lines and writes them from a background
/// thread, at most [`BATCH_WINDOW`] after the first of a batch: one system call per batch
/// instead of one per line, and no tokio worker waiting for another's `write(2)` on
/// stderr's lock (at 60,000 decisions a second that lock was most of the daemon's futex
/// calls). Each thread gathers its lines in its own buffer (see [`Striped`]: one shared
/// buffer was a lock the workers passed back and forth for every line); the writer takes
/// all buffers at one instant and merges them by the time stamp each line starts with.
/// Each thread's lines keep their order; lines of different threads come out in time-stamp
/// order (threads that share a buffer, beyond eight, in the order they wrote, and a
/// wall clock stepped back can misorder one batch). Nothing is dropped. Call
/// [`BatchedStderr::flush`] before the process exits.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Batch>,
}

/// The lines a [`BatchedStderr`] holds; each log event writes its line through `&Batch`.
pub struct Batch {
    /// Per thread: events as written, each behind its length (`u32`, native order).
    pending: Striped<Mutex<Vec<u8>>>,
    /// True while the writer thread waits for lines; set and cleared under `sleep`.
    idle: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    /// Held while writing to stderr, so batches and overflow writes never interleave.
    out: Mutex<()>,
}

impl Batch {
    /// Takes every thread's events, merges them by time into `merged` and writes that to
    /// stderr; false if there was nothing to write. `spares` are the buffers of the last
    /// call, swapped in so that no allocation is needed.
    fn write_pending(&self, spares: &mut Vec<Vec<u8>>, merged: &mut Vec<u8>) -> bool {
        let out = lock(&self.out);
        spares.resize_with(STRIPES, Vec::new);
        // All buffers at one instant: a task that logs on one thread and then on another
        // must not have its later line taken in this batch and its earlier one left for
        // the next.
        let mut stripes: Vec<MutexGuard<'_, Vec<u8>>> = self.pending.all().map(lock).collect();
        for (stripe, spare) in stripes.iter_mut().zip(spares.iter_mut()) {
            std::mem::swap(&mut **stripe, spare);
        }
        drop(stripes);
        if spares.iter().all(Vec::is_empty) {
            return false;
        }
        merge_by_time(spares, merged);
        // Nowhere to report a failed write to stderr; the lines are gone either way.
        let _ = std::io::stderr().lock().write_all(merged);
        drop(out);
        merged.clear();
        for spare in spares.iter_mut() {
            spare.clear();
        }
        true
    }
}

/// How many leading bytes of two events are compared to order them: the time stamp (text
/// log: `2026-11-28T21:55:03.794734Z`; JSON: `{"timestamp":"2026-11-28T21:55:03.794734Z"`).
const ORDER_PREFIX: usize = 48;

/// Appends the events of `bufs` (each in order, each event behind its `u32` length) to
/// `out`, oldest first by their leading time stamps. A buffer's own events never change
/// places; events of different buffers with the same stamp are ordered by what follows it.
fn merge_by_time(bufs: &[Vec<u8>], out: &mut Vec<u8>) {
    fn event_at(buf: &[u8], at: usize) -> Option<&[u8]> {
        let len = buf.get(at..at + 4)?;
        let len = u32::from_ne_bytes(len.try_into().ok()?) as usize;
        buf.get(at + 4..at + 4 + len)
    }
    let mut at = [0usize; STRIPES];
    // Only the threads that logged (on a busy daemon: its two or so workers).
    let active: Vec<usize> = (0..bufs.len().min(STRIPES))
        .filter(|&i| !bufs[i].is_empty())
        .collect();
    loop {
        let mut next: Option<(usize, &[u8])> = None;
        for &i in &active {
            let Some(event) = event_at(&bufs[i], at[i]) else {
                continue;
            };
            let key = &event[..event.len().min(ORDER_PREFIX)];
            if next.is_none_or(|(_, best)| key < &best[..best.len().min(ORDER_PREFIX)]) {
                next = Some((i, event));
            }
        }
        let Some((i, event)) = next else {
            return;
        };
        out.extend_from_slice(event);
        at[i] += 4 + event.len();
    }
}

impl BatchedStderr {
    /// Starts the writer thread.
    ///
    /// # Errors
    ///
    /// The thread cannot be spawned.
    pub fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Batch {
            pending: Striped::default(),
            idle: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            out: Mutex::new(()),
        });
        let batch = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let mut spares = Vec::new();
                let mut merged = Vec::with_capacity(64 * 1024);
                loop {
                    std::thread::sleep(BATCH_WINDOW);
                    if batch.write_pending(&mut spares, &mut merged) {
                        continue;
                    }
                    // Nothing came for a whole window: wait to be woken. `idle` is raised
                    // before the buffers are looked at again, so a line added meanwhile
                    // either is seen here or sees `idle` and wakes us.
                    let mut sleep = lock(&batch.sleep);
                    batch.idle.store(true, Ordering::SeqCst);
                    if batch.pending.all().any(|b| !lock(b).is_empty()) {
                        batch.idle.store(false, Ordering::SeqCst);
                        continue;
                    }
                    while batch.idle.load(Ordering::SeqCst) {
                        sleep = batch
                            .wake
                            .wait(sleep)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            })?;
        Ok(BatchedStderr { shared })
    }

    /// Writes every line logged so far, now.
    pub fn flush(&self) {
        self.shared.write_pending(&mut Vec::new(), &mut Vec::new());
    }
}

impl std::io::Write for &Batch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // An event longer than 4 GiB cannot be framed; it is cut (no logger writes one).
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let event = &buf[..len as usize];
        let overflow = {
            let mut pending = lock(self.pending.mine());
            pending.extend_from_slice(&len.to_ne_bytes());
            pending.extend_from_slice(event);
            pending.len() > MAX_PENDING
        };
        if overflow {
            // The writer thread is behind (stderr blocked): write here, in order.
            self.write_pending(&mut Vec::new(), &mut Vec::new());
            return Ok(buf.len());
        }
        // Orders the line's append before the look at `idle` (the writer raises `idle`
        // before it looks at the buffers): one of the two sees the other.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.idle.load(Ordering::Relaxed) {
            let _sleep = lock(&self.sleep);
            self.idle.store(false, Ordering::SeqCst);
            self.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = &'a Batch;

    fn make_writer(&'a self) -> Self::Writer {
        &self.shared
    }
}

// ---------------------------------------------------------------------------------------------
// Summarised warnings
// ---------------------------------------------------------------------------------------------

/// How often a [`Summarised`] warning that keeps happening reports its count.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// A warning that can happen once per connection or per request — as often as a client
/// (or an outage) makes it — written as its first occurrence and then as one count per
/// interval while it keeps happening: 1,000 refused connections a second are a line and a
/// count every ten seconds, not 1,000 lines a second (a reconnecting client made 19 GB of
/// log a day when every refusal had its line).
///
/// The first event of a quiet spell is logged in full by the caller's closure; later ones
/// are counted, and every `interval` a task writes the count through the `summary` closure
/// given at construction (`summary(count, interval)`). An interval without events ends the
/// spell: the next event is logged in full again. Counting is one atomic add; the lock is
/// taken only to start and end a spell. Outside a tokio runtime there is no task to write
/// the counts, so every event is logged in full (as before this type existed).
pub struct Summarised {
    /// [`SPELL`]: a spell is on (its first line is written, its count task runs); the other
    /// bits: events counted since the last line.
    state: AtomicU64,
    interval: Duration,
    /// Serialises starting and ending spells; never taken to count.
    gate: Mutex<()>,
    summary: Box<dyn Fn(u64, Duration) + Send + Sync>,
}

/// The bit of [`Summarised::state`] that says a spell is on.
const SPELL: u64 = 1 << 63;

impl Summarised {
    /// A warning summarised every [`SUMMARY_INTERVAL`]; `summary(count, interval)` writes
    /// the line for `count` further events in the last `interval`.
    pub fn new(summary: impl Fn(u64, Duration) + Send + Sync + 'static) -> Arc<Self> {
        Self::every(SUMMARY_INTERVAL, summary)
    }

    /// [`Summarised::new`] with another interval.
    pub fn every(
        interval: Duration,
        summary: impl Fn(u64, Duration) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Summarised {
            state: AtomicU64::new(0),
            interval,
            gate: Mutex::new(()),
            summary: Box::new(summary),
        })
    }

    /// One event: `first` logs it when it starts a spell; otherwise it is counted for the
    /// next summary line.
    pub fn hit(self: &Arc<Self>, first: impl FnOnce()) {
        if self.state.fetch_add(1, Ordering::AcqRel) & SPELL != 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No task could write the count: undo it and log this one.
            self.state.fetch_sub(1, Ordering::AcqRel);
            first();
            return;
        };
        {
            let _gate = lock(&self.gate);
            // Others may have counted themselves meanwhile; whoever gets the gate first
            // starts the spell, and those after find it on (their events stay counted).
            if self.state.load(Ordering::Acquire) & SPELL != 0 {
                return;
            }
            // On, with this event taken out of the count: it gets the full line.
            self.state.fetch_add(SPELL - 1, Ordering::AcqRel);
        }
        first();
        let me = Arc::clone(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(me.interval).await;
                if !me.report() {
                    return;
                }
            }
        });
    }

    /// Writes the count of the interval just ended; false (and the spell is over) when
    /// there was none.
    fn report(&self) -> bool {
        let _gate = lock(&self.gate);
        // Ends the spell only if nothing was counted: an event counted in between makes
        // the exchange fail and is reported below.
        if self
            .state
            .compare_exchange(SPELL, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return false;
        }
        let count = self.state.fetch_and(SPELL, Ordering::AcqRel) & !SPELL;
        (self.summary)(count, self.interval);
        true
    }
}

/// What `f` logs, as the daemon's text log writes it.
/// The checked `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level (`info`) or a tracing filter.
    pub level: String,
    /// JSON lines instead of text.
    pub json: bool,
}

#[cfg(test)]
pub(crate) fn capture_text(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .fmt_fields(QuickFields)
        .event_format(QuickEvent)
        .finish();
    tracing::subscriber::with_default(sub, f);
    String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_scan_agrees_with_the_byte_scan() {
        // Every byte value at every position of a word and of the tail, in plain text.
        for len in [8, 13, 16, 24] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(
                        is_plain(&s),
                        s.iter().all(|&b| is_plain_byte(b)),
                        "byte {b:#x} at {at} of {len}"
                    );
                }
            }
        }
        // Pairs of neighbours that could borrow into each other.
        for x in 0..=255u8 {
            for y in [0u8, 0x1f, 0x20, 0x21, 0x22, 0x5c, 0x7e, 0x7f, 0x80, 0xff] {
                let s = [b'a', x, y, b'a', b'a', b'a', b'a', b'a'];
                assert_eq!(is_plain(&s), s.iter().all(|&b| is_plain_byte(b)), "{s:?}");
            }
        }
    }

    #[test]
    fn quoting_matches_rust_debug() {
        for s in [
            "plain@example.org",
            "",
            "a\"b\\c",
            "tab\there\nnewline\rcr",
            "bell\u{7}esc\u{1b}del\u{7f}",
            "ünïcödé ✓",
            "c1\u{85}control and \u{a0}nbsp",
        ] {
            let mut out = String::new();
            write_quoted(&mut out, s).unwrap();
            assert_eq!(out, format!("{s:?}"), "{s:?}");
        }
    }

    #[test]
    fn a_decision_line_reads_like_the_default_format() {
        let ip: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let line = capture_text(|| {
            tracing::info!(
                target: "greygate::decision",
                verdict = "defer",
                rule = "new",
                client = %ip,
                sender = "a\"b@example.net",
                remaining = 300u64,
                delayed = None::<u64>,
                "decision"
            );
        });
        let (time, rest) = line.split_once(' ').unwrap();
        assert_eq!(time.len(), "2026-11-28T21:55:03.794734Z".len(), "{line}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{line}");
        assert_eq!(
            rest,
            " INFO greygate::decision: decision verdict=\"defer\" rule=\"new\" client=192.0.2.10 sender=\"a\\\"b@example.net\" remaining=300\n"
        );
    }

    fn framed(events: &[&str]) -> Vec<u8> {
        let mut buf = Vec::new();
        for e in events {
            buf.extend_from_slice(&u32::try_from(e.len()).unwrap().to_ne_bytes());
            buf.extend_from_slice(e.as_bytes());
        }
        buf
    }

    /// Each thread's lines are in order; the writer interleaves the threads by time stamp,
    /// keeping a thread's own order (also where its stamps are equal, `a4` after `a3`)
    /// and multi-line events whole.
    #[test]
    fn threads_lines_merge_by_time() {
        let a = framed(&[
            "2026-11-29T05:00:00.000001Z  INFO a1\n",
            "2026-11-29T05:00:00.000004Z  INFO a2\n  continued\n",
            "2026-11-29T05:00:01.000000Z  INFO a3\n",
            "2026-11-29T05:00:01.000000Z  DEBUG a4\n",
        ]);
        let b = framed(&[
            "2026-11-29T05:00:00.000002Z  INFO b1\n",
            "2026-11-29T05:00:00.000004Z  INFO b2\n",
        ]);
        let c = framed(&["2026-11-29T04:59:59.999999Z  WARN c1\n"]);
        let mut bufs = vec![Vec::new(); STRIPES];
        bufs[0] = a;
        bufs[3] = b;
        bufs[7] = c;
        let mut out = Vec::new();
        merge_by_time(&bufs, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-29T04:59:59.999999Z  WARN c1\n\
             2026-11-29T05:00:00.000001Z  INFO a1\n\
             2026-11-29T05:00:00.000002Z  INFO b1\n\
             2026-11-29T05:00:00.000004Z  INFO a2\n  continued\n\
             2026-11-29T05:00:00.000004Z  INFO b2\n\
             2026-11-29T05:00:01.000000Z  INFO a3\n\
             2026-11-29T05:00:01.000000Z  DEBUG a4\n"
        );
    }

    /// A cut-off frame (which the writer never makes) ends that buffer's events instead of
    /// reading past it.
    #[test]
    fn a_short_frame_ends_the_buffer() {
        let mut a = framed(&["2026-11-29T05:00:00.000001Z x\n"]);
        a.extend_from_slice(&100u32.to_ne_bytes());
        a.extend_from_slice(b"short");
        let mut bufs = vec![Vec::new(); STRIPES];
        bufs[1] = a;
        let mut out = Vec::new();
        merge_by_time(&bufs, &mut out);
        assert_eq!(out, b"2026-11-29T05:00:00.000001Z x\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_summarised_warning_is_one_line_then_a_count_per_interval() {
        let counts = Arc::new(Mutex::new(Vec::new()));
        let seen = counts.clone();
        let warning = Summarised::every(Duration::from_secs(10), move |n, over| {
            assert_eq!(over, Duration::from_secs(10));
            seen.lock().unwrap().push(n);
        });
        let mut lines = 0;
        for _ in 0..1000 {
            warning.hit(|| lines += 1);
        }
        assert_eq!(lines, 1, "the first event has its line");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(*counts.lock().unwrap(), [999]);
        for _ in 0..5 {
            warning.hit(|| lines += 1);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*counts.lock().unwrap(), [999, 5]);
        assert_eq!(lines, 1, "still the same spell");
        // A quiet interval ends the spell without a line; the next event has its own.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(*counts.lock().unwrap(), [999, 5]);
        warning.hit(|| lines += 1);
        assert_eq!(lines, 2);
    }

    #[test]
    fn without_a_runtime_every_event_has_its_line() {
        let warning = Summarised::new(|_, _| panic!("no summaries without a runtime"));
        let mut lines = 0;
        for _ in 0..3 {
            warning.hit(|| lines += 1);
        }
        assert_eq!(lines, 3);
    }

    #[test]
    fn seconds_format_as_rfc3339_dates() {
        assert_eq!(format_second(0), "1970-01-01T00:00:00");
        assert_eq!(format_second(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(format_second(1_795_901_703), "2026-11-28T21:35:03");
        assert_eq!(format_second(4_102_444_799), "2099-12-31T23:59:59");
        for t in [1u64, 86_399, 1_700_000_000, 2_000_000_000] {
            let want = jiff::Timestamp::from_second(t as i64)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%S")
                .to_string();
            assert_eq!(format_second(t), want);
        }
    }
}
