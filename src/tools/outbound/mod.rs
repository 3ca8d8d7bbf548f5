//! Outbound delivery tools: `greygate probe` (ask a recipient's mail server, without sending
//! mail, whether it greylists us) and `greygate track` (rebuild delivery timelines from
//! Postfix logs and measure what greylisting costs per destination).
//!
//! Layering as elsewhere: [`mod@classify`] and [`track`] are pure (bytes and text in, values
//! out); [`smtp`] is the client side of an SMTP conversation over any async stream;
//! [`probe`] does the I/O at the edge (DNS, TCP, clocks).

pub mod classify;
pub mod probe;
pub mod smtp;
pub mod track;

pub use classify::{Class, Reply, classify};
