//! Outbound delivery tools: `greygate probe` (ask a recipient's mail server, without sending
//! mail, whether it greylists us) and `greygate track` (rebuild delivery timelines from
//! Postfix logs and measure what greylisting costs per destination).
//!
//! Layering as elsewhere: [`mod@classify`], [`targets`] (the destinations file) and [`track`]
//! are pure (bytes and text in, values out); [`smtp`] is the client side of an SMTP
//! conversation over any async stream; [`gate`] bounds how many probes run and keeps one
//! connection per server; [`probe`] does the I/O at the edge (DNS, TCP, clocks) and
//! [`probe_report`] renders its results as a table and an HTML page.

pub mod classify;
pub mod gate;
pub mod probe;
pub mod probe_report;
pub mod smtp;
pub mod targets;
pub mod track;

pub use classify::{Class, Reply, classify};
