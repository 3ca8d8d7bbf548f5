//! Benchmark tools behind `greygate bench`: a Postfix policy load generator, a null responder
//! (the protocol's ceiling) and a bulk preloader for scale tests of the embedded store.
//!
//! The load generator behaves like Postfix's smtpd processes: each connection sends one request
//! and waits for its reply before the next. Closed loop (as fast as replies come) measures
//! capacity; open loop (`rate`) sends on a fixed schedule and measures latency from the
//! *scheduled* send time, so a stalled server cannot hide its stall by slowing the generator
//! down (coordinated omission).
//!
//! Every connection draws its requests from its own deterministic stream (seed, connection
//! number), so two targets driven with the same seed see the same requests per connection
//! whatever their speed. The generator shares the CPU with the server it measures, so the hot
//! path re-uses buffers and copies pre-encoded blocks instead of formatting.

mod histogram;
mod load;
mod milter;
mod null_server;
mod preload;
mod stream;

pub use histogram::{Histogram, Latency};
pub use load::{Arrival, LoadOptions, Protocol, Replies, Report, Schedule, Sent, Stop, run_load};
pub use null_server::run_null_server;
pub use preload::{PreloadReport, preload};
pub use stream::{Kind, Mix, RequestStream, Rng, StreamConfig};

use crate::store::StoreError;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("no connection survived: {0}")]
    AllConnectionsFailed(String),
    #[error("invalid benchmark options: {0}")]
    Options(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Why one connection stopped early; counted, and the run goes on with the others.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("reply longer than {MAX_REPLY} bytes")]
    ReplyTooLong,
}

/// Replies are one short `action=` line; anything longer is a broken peer, not a reply.
const MAX_REPLY: usize = 16 * 1024;
