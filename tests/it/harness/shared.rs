//! The shared store server of a test that runs on both shared backends: a private Redis
//! or PostgreSQL (see `redis.rs`, `postgres.rs`), behind one type.

use super::postgres::Postgres;
use super::redis::Redis;

/// Which shared backend a test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Redis,
    Postgres,
}

/// A running shared store server.
pub enum Server {
    Redis(Redis),
    Postgres(Postgres),
}

impl Server {
    /// A server on loopback (Redis without persistence), or `None` as the peers' `start`.
    pub fn start(kind: Kind, test: &str) -> Option<Server> {
        match kind {
            Kind::Redis => Redis::start(test).map(Server::Redis),
            Kind::Postgres => Postgres::start(test).map(Server::Postgres),
        }
    }

    /// As `start`, Redis with an append-only file synced at every write, so that a killed
    /// server comes back with what it acknowledged (as PostgreSQL does).
    pub fn start_persistent(kind: Kind, test: &str) -> Option<Server> {
        match kind {
            Kind::Redis => Redis::start_persistent(test).map(Server::Redis),
            Kind::Postgres => Postgres::start(test).map(Server::Postgres),
        }
    }

    /// `[store] backend` for it.
    pub fn backend(&self) -> &'static str {
        match self {
            Server::Redis(_) => "redis",
            Server::Postgres(_) => "postgres",
        }
    }

    /// `[store] url` for it.
    pub fn url(&self) -> String {
        match self {
            Server::Redis(r) => r.url(),
            Server::Postgres(p) => p.url(),
        }
    }

    /// Kills the server the hard way (SIGKILL; PostgreSQL's immediate stop).
    pub fn crash(&mut self) {
        match self {
            Server::Redis(r) => r.kill(),
            Server::Postgres(p) => p.crash(),
        }
    }

    /// Starts it again on the same port (Redis with what its persistence kept, PostgreSQL
    /// with its data).
    pub fn revive(&mut self) {
        match self {
            Server::Redis(r) => r.restart(),
            Server::Postgres(p) => p.start_again(),
        }
    }
}
