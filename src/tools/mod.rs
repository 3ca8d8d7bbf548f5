//! The offline tools: nothing here runs inside the daemon. `bench` loads a policy or milter
//! server (and is a null responder and a store preloader); `simulate` replays scenarios and
//! a site's own log through the engine on a simulated clock; `outbound` holds `probe` and
//! `track` for operators of outbound relays.

pub mod bench;
pub mod outbound;
pub mod simulate;
