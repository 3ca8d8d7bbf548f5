//! Fuzzes `greygate replay`'s inbound log parsing and the replay itself: any bytes, as one
//! line or split into lines, never panic, and every attempt found replays through the
//! engine without panicking either.
#![no_main]

use greygate::engine::Engine;
use greygate::tools::maillog::Clock;
use greygate::tools::simulate::inbound::parse_inbound;
use greygate::tools::simulate::mta::Schedule;
use greygate::tools::simulate::replay::{Reader, render_text, replay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_inbound(data, &mut Clock::new(2026));
    let mut reader = Reader::new(Clock::new(2026));
    reader.feed_reader(data).expect("reading from a slice cannot fail");
    let report = replay(reader, &Engine::default(), true, &Schedule::postfix());
    let _ = render_text(&report, 5);
});
