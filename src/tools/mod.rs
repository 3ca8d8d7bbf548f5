//! The offline tools: nothing here runs inside the daemon. `bench` loads a policy or milter
//! server (and is a null responder and a store preloader); `simulate` replays scenarios and
//! a site's own log through the engine on a simulated clock; `outbound` holds `probe` and
//! `track` for operators of outbound relays. `maillog` is the Postfix log line parser
//! `track` and `replay` share: the one place that knows the line format.

pub mod bench;
pub mod maillog;
pub mod outbound;
pub mod simulate;
