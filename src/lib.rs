//! greygate: a greylisting gateway for Postfix and other MTAs.
//!
//! Layers, in one direction: `server` (listeners, connections) → `proto` (pure codecs) →
//! `service` (engine + store + failure policy) → `engine` (pure decisions) and `store`.
//! See ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod bench;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod engine;
pub mod explain;
pub mod logfmt;
pub mod metrics;
pub mod outbound;
pub mod proto;
pub mod server;
pub mod service;
pub mod simulate;
pub mod store;
