//! Fuzzes `greygate track`'s log parsing: any bytes, as one line or split into lines, never
//! panic, and every reply the parser extracts classifies without panicking either.
#![no_main]

use greygate::tools::maillog::{Clock, Event, parse_line, remote_reply};
use greygate::tools::outbound::classify::{Reply, classify};
use greygate::tools::outbound::track::{Tracker, report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut clock = Clock::new(2026);
    if let Some(line) = parse_line(data, &mut clock)
        && let Event::Delivery(d) = line.event
        && let Some(reply) = remote_reply(d.detail)
        && let Some(reply) = Reply::parse(&String::from_utf8_lossy(reply))
    {
        let _ = classify(&reply);
    }
    // Kept whole and folded, as with and without a --to filter.
    let mut tracker = Tracker::new(2026).keeping(report::Filter::everything());
    tracker.feed_reader(data).expect("reading from a slice cannot fail");
    let _ = report::domains(&tracker.snapshot());
    let (agg, messages) = tracker.finish();
    let stats = report::domains(&agg);
    let _ = report::render_domains(&stats, messages.len());
    let refs: Vec<_> = messages.iter().collect();
    let _ = report::render_timelines(&refs, None);
});
