//! `greygate simulate` and `greygate replay`: what greylisting would cost legitimate mail,
//! measured with the real engine on a simulated clock before anyone turns it on.
//!
//! [`scenario`] reads a scenario file (sender classes, their MTAs' retry schedules, their
//! addresses and DNS facts, and engine configurations in `greygate.toml`'s own terms);
//! [`mta`] holds the retry schedules; [`mod@run`] replays days of traffic through
//! [`crate::engine::Engine::decide`] over an in-memory state; [`report`] renders the
//! results. [`inbound`] turns the lines of a site's own inbound Postfix log, read by
//! [`crate::tools::maillog`], into deliveries, and [`replay`] feeds them through the engine. Like the engine, nothing here reads the clock.

pub mod inbound;
pub mod mta;
pub mod replay;
pub mod report;
pub mod run;
pub mod scenario;

pub use report::Report;
pub use run::run;
pub use scenario::Scenario;
