//! `greygate track`: clap arguments and the edges (files, terminal, exit codes). The work
//! is in `greygate::tools::outbound::track`.
//!
//! Exit codes: 0 done, 1 unreadable input or unwritable report, 2 usage.

use std::io::{IsTerminal as _, Read, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use greygate::tools::maillog::Clock;
use greygate::tools::outbound::track::report::{self, Filter};
use greygate::tools::outbound::track::{self, Message, Tracker};

#[derive(Debug, Args)]
pub struct TrackArgs {
    /// Postfix logs, plain or gzipped; rotated files are read oldest first. `-` or none:
    /// standard input.
    #[arg(value_name = "LOG")]
    pub logs: Vec<PathBuf>,
    /// Show the timeline of messages to this recipient.
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Show the timeline of the message with this queue id.
    #[arg(long, value_name = "ID")]
    pub queue_id: Option<String>,
    /// Show the timeline of the message with this Message-ID.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report with charts to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Year of the first line for year-less syslog timestamps [default: this year, or last
    /// year if the log starts in a later month than now].
    #[arg(long)]
    pub year: Option<i64>,
}

/// Counts bytes read from a file, for the progress line.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

pub fn track(args: TrackArgs) -> anyhow::Result<ExitCode> {
    let mut logs = args.logs.clone();
    if logs.is_empty() {
        logs.push(PathBuf::from("-"));
    }
    track::order_rotated(&mut logs);
    let clock = Clock::for_year_or_today(args.year);
    let mut tracker = Tracker::with_clock(clock);
    // A progress line only for people watching (stderr a terminal) and files of known size.
    let total: u64 = logs
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let show = std::io::stderr().is_terminal() && total > 0;
    let read = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    for path in &logs {
        let input = if path.as_os_str() == "-" {
            track::decode(std::io::stdin())
        } else {
            std::fs::File::open(path).and_then(|f| {
                track::decode(Counting {
                    inner: f,
                    count: read.clone(),
                })
            })
        }
        .with_context(|| format!("reading {}", path.display()))?;
        feed(&mut tracker, input, show.then_some((&read, total)))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if show {
        eprint!("\r\x1b[K");
    }
    let lines = tracker.lines;
    let messages = tracker.finish();
    let stats = report::domains(&messages);
    let filter = Filter {
        to: args.to.clone(),
        queue_id: args.queue_id.clone(),
        message_id: args.message_id.clone(),
    };
    let selected: Option<Vec<&Message>> =
        (!filter.is_empty()).then(|| messages.iter().filter(|m| filter.matches(m)).collect());
    if let Some(path) = &args.html {
        std::fs::write(path, report::render_html(&stats, messages.len(), lines))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = report::to_json(&stats, selected.as_deref(), lines, messages.len());
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if let Some(sel) = &selected {
        if sel.is_empty() {
            writeln!(out, "no message matches")?;
        }
        write!(out, "{}", report::render_timelines(sel, args.to.as_deref()))?;
    } else {
        write!(out, "{}", report::render_domains(&stats, messages.len()))?;
    }
    if show {
        eprintln!(
            "read {lines} lines in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Feeds a reader, redrawing the progress line a few times a second when asked to.
fn feed(
    tracker: &mut Tracker,
    input: Box<dyn std::io::BufRead>,
    progress: Option<(&Arc<AtomicU64>, u64)>,
) -> std::io::Result<()> {
    let Some((read, total)) = progress else {
        return tracker.feed_reader(input);
    };
    // Feed line by line through a reader that redraws every 256 KiB or so.
    struct Ticker<'a, R> {
        inner: R,
        read: &'a AtomicU64,
        total: u64,
        last: Instant,
    }
    impl<R: std::io::BufRead> Read for Ticker<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl<R: std::io::BufRead> std::io::BufRead for Ticker<'_, R> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            if self.last.elapsed() > Duration::from_millis(200) {
                self.last = Instant::now();
                let done = self.read.load(Ordering::Relaxed);
                eprint!(
                    "\r\x1b[Kreading logs: {:>3}% ({} of {} MB)",
                    done * 100 / self.total.max(1),
                    done >> 20,
                    self.total >> 20
                );
            }
            self.inner.fill_buf()
        }
        fn consume(&mut self, n: usize) {
            self.inner.consume(n)
        }
    }
    tracker.feed_reader(Ticker {
        inner: input,
        read,
        total,
        last: Instant::now(),
    })
}
