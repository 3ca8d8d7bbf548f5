//! Fuzzes `greygate track`'s log parsing: any bytes, as one line or split into lines, never
//! panic, through the Postfix and the Exim parser and the per-file [`Parser`], and every
//! reply the parsers extract classifies without panicking either.
#![no_main]

use greygate::tools::maillog::{
    Clock, Event, Line, Parser, parse_exim_line, parse_line, remote_reply,
};
use greygate::tools::outbound::classify::{Reply, classify};
use greygate::tools::outbound::track::{Tracker, report};
use libfuzzer_sys::fuzz_target;

fn classify_reply(line: Option<Line<'_>>) {
    if let Some(line) = line
        && let Event::Delivery(d) = line.event
        && let Some(reply) = remote_reply(d.detail)
        && let Some(reply) = Reply::parse(&String::from_utf8_lossy(reply))
    {
        let _ = classify(&reply);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut clock = Clock::new(2026);
    classify_reply(parse_line(data, &mut clock));
    classify_reply(parse_exim_line(data));
    let mut parser = Parser::new(Clock::new(2026));
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if i % 64 == 63 {
            parser.new_file();
        }
        classify_reply(parser.parse(line));
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
