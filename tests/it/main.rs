//! The integration test binary: starts the real `greygate` binary (and, where a test needs
//! them, real peers) and talks to it over real sockets.

mod admin;
mod bench;
mod chaos;
mod cli;
mod cluster;
mod daemon;
mod dashboard;
mod dns;
mod domains;
mod exim;
mod failures;
mod flood;
mod harness;
mod import;
mod lists;
mod milter;
mod multihost;
mod outbound;
mod package;
mod policy;
mod postfix;
mod postgres_tls;
mod privacy;
mod probe_batch;
mod redis_ha;
mod release;
mod shared_entries;
mod simulate;
mod slots;
mod smtp;
mod store;
