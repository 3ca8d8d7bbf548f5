//! `greygate track`: clap arguments and the edges (files, terminal, exit codes). The work
//! is in `greygate::tools::outbound::track`.
//!
//! Exit codes: 0 done, 1 unreadable input or unwritable report, 2 usage.

use std::io::{IsTerminal as _, Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use greygate::dur::Dur;
use greygate::tools::maillog::Clock;
use greygate::tools::outbound::track::follow::{Follower, POLL_BUDGET};
use greygate::tools::outbound::track::metrics::{self, Progress};
use greygate::tools::outbound::track::report::{self, Filter};
use greygate::tools::outbound::track::{self, Message, Tracker};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct TrackArgs {
    /// Postfix or Exim logs (the format found per file), plain or gzipped; rotated files are
    /// read oldest first. `-` or none:
    /// standard input.
    #[arg(value_name = "LOG")]
    pub logs: Vec<PathBuf>,
    /// Show the timeline of messages to this recipient.
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Show the timeline of the message with this queue id (Exim: message id).
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
    /// Keep reading the last LOG as it grows, across rotation (rename or copytruncate),
    /// until SIGINT or SIGTERM; then print the report as without it. The other LOGs are
    /// read first, oldest first.
    #[arg(long, conflicts_with_all = ["to", "queue_id", "message_id"])]
    pub follow: bool,
    /// With --follow: print the most painful destination domains this often (to standard
    /// error with --json).
    #[arg(
        long,
        default_value = "1m",
        value_name = "DURATION",
        requires = "follow"
    )]
    pub summary_every: Dur,
    /// With --follow: serve the per-domain report as Prometheus metrics at
    /// http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", requires = "follow")]
    pub metrics_listen: Option<SocketAddr>,
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
    let followed = match args.follow {
        true => match logs.pop() {
            Some(p) if p.as_os_str() != "-" => Some(p),
            _ => {
                eprintln!("greygate: --follow needs a log file (not standard input)");
                return Ok(super::common::Exit::Usage.into());
            }
        },
        false => None,
    };
    let clock = Clock::for_year_or_today(args.year);
    let filter = Filter {
        to: args.to.clone(),
        queue_id: args.queue_id.clone(),
        message_id: args.message_id.clone(),
        all: false,
    };
    let mut tracker = Tracker::with_clock(clock).keeping(filter.clone());
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
    if let Some(path) = &followed {
        follow(&mut tracker, path, &args)?;
    }
    let lines = tracker.lines;
    let peak = tracker.peak_in_flight();
    let (agg, kept) = tracker.finish();
    let messages = agg.messages as usize;
    let stats = report::domains(&agg);
    let selected: Option<Vec<&Message>> = (!filter.is_empty()).then(|| kept.iter().collect());
    if let Some(path) = &args.html {
        std::fs::write(path, report::render_html(&stats, messages, lines))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = report::to_json(&stats, selected.as_deref(), lines, messages, peak);
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if let Some(sel) = &selected {
        if sel.is_empty() {
            writeln!(out, "no message matches")?;
        }
        write!(out, "{}", report::render_timelines(sel, args.to.as_deref()))?;
    } else {
        write!(out, "{}", report::render_domains(&stats, messages))?;
    }
    if show {
        eprintln!(
            "read {lines} lines in {:.1}s; at most {peak} messages in flight",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How often a followed log is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// How often the metrics are computed again while lines come in.
const METRICS_EVERY: Duration = Duration::from_secs(1);
/// Rows of the periodic summary.
const SUMMARY_ROWS: usize = 20;

/// `--follow`: reads `path` as it grows until SIGINT/SIGTERM, serving metrics and printing
/// summaries meanwhile.
fn follow(tracker: &mut Tracker, path: &Path, args: &TrackArgs) -> anyhow::Result<()> {
    let rt = super::common::runtime()?;
    rt.block_on(async {
        let mut stop = std::pin::pin!(super::common::stop_signal()?);
        let mut follower =
            Follower::new(path).with_context(|| format!("following {}", path.display()))?;
        tracker.new_file();
        let shutdown = CancellationToken::new();
        let text: Arc<std::sync::Mutex<String>> = Arc::default();
        if let Some(addr) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?;
            eprintln!(
                "greygate track: metrics at http://{}/metrics",
                listener.local_addr()?
            );
            let text = text.clone();
            tokio::spawn(metrics::serve(
                listener,
                Arc::new(move || text.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                shutdown.clone(),
            ));
        }
        let mut tick = tokio::time::interval(FOLLOW_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_metrics = Instant::now();
        let mut metrics_stale = true;
        let mut next_summary = Instant::now() + args.summary_every.0;
        loop {
            let n = follower
                .poll(|line| tracker.feed(line))
                .with_context(|| format!("following {}", path.display()))?;
            metrics_stale |= n > 0;
            let now = Instant::now();
            if args.metrics_listen.is_some() && metrics_stale && now >= next_metrics {
                let stats = report::domains(&tracker.snapshot());
                *text.lock().unwrap_or_else(|e| e.into_inner()) =
                    metrics::render(&stats, &progress(tracker, &follower));
                metrics_stale = false;
                next_metrics = now + METRICS_EVERY;
            }
            if now >= next_summary {
                next_summary = now + args.summary_every.0;
                let agg = tracker.snapshot();
                let stats = report::domains(&agg);
                let top = &stats[..stats.len().min(SUMMARY_ROWS)];
                // With --json, standard output is kept for the final JSON document.
                let mut out: Box<dyn std::io::Write> = if args.json {
                    Box::new(std::io::stderr().lock())
                } else {
                    Box::new(std::io::stdout().lock())
                };
                let _ = writeln!(
                    out,
                    "== {}  lines {}  messages {}  in flight {}",
                    jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S"),
                    tracker.lines,
                    agg.messages,
                    tracker.in_flight()
                );
                let _ = write!(
                    out,
                    "{}",
                    report::render_domains(top, agg.messages as usize)
                );
                let _ = out.flush();
            }
            if n >= POLL_BUDGET {
                // More to read at once; still let a signal through.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = tick.tick() => {}
                signal = &mut stop => {
                    // What is in the file now belongs to the report.
                    while follower.poll(|line| tracker.feed(line))? >= POLL_BUDGET {}
                    eprintln!("greygate track: {signal}: stopped following {}", path.display());
                    break;
                }
            }
        }
        shutdown.cancel();
        anyhow::Ok(())
    })
}

fn progress(tracker: &Tracker, follower: &Follower) -> Progress {
    Progress {
        lines: tracker.lines,
        messages: tracker.messages(),
        in_flight: tracker.in_flight(),
        rotations: follower.rotations,
        truncations: follower.truncations,
    }
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
