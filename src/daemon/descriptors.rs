//! How many file descriptors the configured limits need, and raising the process's soft
//! limit to that.
//!
//! Every connection a listener may hold is a descriptor. The defaults (512 policy and 512
//! milter connections per listener, 64 admin) came to more than the usual soft limit of
//! 1024, so a busy daemon ran out before any of its limits applied — and a client arriving
//! then waited in the backlog instead of being turned away. `serve` raises the soft limit
//! (never above the hard one) before the daemon starts, or warns with the numbers;
//! `server::accept` refuses connections promptly if descriptors run out anyway.
//! `daemon::run` itself changes no process-wide setting (tests run it in process).

use std::fmt;

use crate::config::Config;
use crate::store::StoreKind;

/// Descriptors for everything that is not a connection or a store connection: the
/// listening sockets and their spares, stdio, the runtime's epoll and wakers, the store
/// file's handles, files read on reload (configuration, allow lists, entries, token).
pub const MARGIN: u64 = 64;

/// What the configuration needs, by part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// Policy, milter and SMTP connections: `max_connections` × listeners, summed (twice
    /// for SMTP: each session has a backend connection too).
    pub mail: u64,
    /// Admin connections: `max_connections` × admin listeners.
    pub admin: u64,
    /// Store connections (PostgreSQL's pool; Redis's one, and one being re-established).
    pub store: u64,
    /// DNS lookups in flight (a socket each), when `[dns]` is on.
    pub dns: u64,
    /// Listening sockets, their spare descriptors, and [`MARGIN`].
    pub other: u64,
}

impl Needed {
    pub fn total(&self) -> u64 {
        self.mail + self.admin + self.store + self.dns + self.other
    }
}

impl fmt::Display for Needed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = mail connections {} + admin connections {} + store {} + DNS {} + other {}",
            self.total(),
            self.mail,
            self.admin,
            self.store,
            self.dns,
            self.other
        )
    }
}

/// The descriptors `cfg`'s limits can use at once.
pub fn needed(cfg: &Config) -> Needed {
    let n = |x: usize| u64::try_from(x).unwrap_or(u64::MAX);
    // Each of the SMTP front's threads has a socket of its own on every address.
    let listeners = cfg.policy.listen.len()
        + cfg.milter.listen.len()
        + cfg.smtp.listen.len() * cfg.smtp.threads
        + cfg.admin.listen.len();
    // An SMTP session holds two: the client's and the backend's.
    let mail = n(cfg.policy.listen.len()).saturating_mul(n(cfg.policy.limits.max_connections))
        + n(cfg.milter.listen.len()).saturating_mul(n(cfg.milter.limits.max_connections))
        + n(cfg.smtp.listen.len()).saturating_mul(n(cfg.smtp.limits.max_connections) * 2);
    let admin = n(cfg.admin.listen.len()).saturating_mul(n(cfg.admin.max_connections));
    let store = match &cfg.store.kind {
        StoreKind::Memory | StoreKind::Embedded(_) => 0,
        StoreKind::Redis(_) => 2,
        StoreKind::Postgres(s) => n(s.pool_size),
    };
    let dns = if cfg.dns.enabled {
        n(crate::dns::MAX_IN_FLIGHT)
    } else {
        0
    };
    Needed {
        mail,
        admin,
        store,
        dns,
        other: n(listeners) * 2 + MARGIN,
    }
}

/// What [`raise_limit`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The soft limit was enough already.
    Enough { soft: u64 },
    /// The soft limit was raised from `from` to `to`.
    Raised { from: u64, to: u64 },
    /// Not enough, and the hard limit (or the system) allows no more than `soft`.
    Short { soft: u64, hard: u64 },
}

/// Raises the soft `RLIMIT_NOFILE` to `need`, up to the hard limit. Never lowers it.
pub fn raise_limit(need: u64) -> std::io::Result<Limit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (soft, hard) = (lim.rlim_cur, lim.rlim_max);
    if soft == libc::RLIM_INFINITY || soft >= need {
        return Ok(Limit::Enough { soft });
    }
    let want = if hard == libc::RLIM_INFINITY {
        need
    } else {
        need.min(hard)
    };
    if want > soft {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if want >= need {
        Ok(Limit::Raised {
            from: soft,
            to: want,
        })
    } else {
        Ok(Limit::Short { soft: want, hard })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let src = crate::config::Source {
            name: "greygate.toml",
            text,
        };
        crate::config::RawConfig::parse(&src)
            .and_then(|raw| raw.validate(Some(&src)))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_listener_counts_with_its_limit() {
        let cfg = config(
            "[policy]\nlisten = [\"127.0.0.1:1\", \"unix:/tmp/x\"]\nmax_connections = 100\n\
             [milter]\nlisten = [\"127.0.0.1:2\"]\nmax_connections = 50\n\
             [admin]\nmax_connections = 8\n[store]\nbackend = \"memory\"\n",
        );
        let n = needed(&cfg);
        assert_eq!(n.mail, 250);
        assert_eq!(n.admin, 8);
        // DNS is on by default: every lookup in flight may hold a socket.
        assert_eq!((n.store, n.dns), (0, 4096));
        assert_eq!(n.other, 4 * 2 + MARGIN);
        assert_eq!(n.total(), 250 + 8 + 4096 + 8 + MARGIN);
        let off = config("[store]\nbackend = \"memory\"\n[dns]\nenabled = false\n");
        assert_eq!(needed(&off).dns, 0);
        // A listening socket (and its spare descriptor) per SMTP thread and address.
        let smtp = config(
            "[policy]\nlisten = []\n[admin]\nlisten = []\n[store]\nbackend = \"memory\"\n\
             [smtp]\nlisten = [\"127.0.0.1:25\", \"[::1]:25\"]\nbackend = \"127.0.0.1:2525\"\n\
             threads = 3\nmax_connections = 10\nbackend_pool = 4\n",
        );
        assert_eq!(needed(&smtp).other, 6 * 2 + MARGIN);
        assert_eq!(needed(&smtp).mail, 2 * 10 * 2);
    }

    #[test]
    fn the_limit_is_never_lowered() {
        // Whatever the test process has, asking for one descriptor changes nothing.
        assert!(matches!(raise_limit(1), Ok(Limit::Enough { .. })));
    }
}
