//! Taking connections when the process is out of file descriptors.
//!
//! `accept(2)` fails with `EMFILE` (or `ENFILE`) while the descriptor table is full, and
//! the connection stays in the kernel's backlog: its client waits, unanswered, until
//! descriptors come free — it hangs instead of being refused, and so does every client
//! after it. Each accept loop therefore keeps one spare descriptor (`/dev/null`). When
//! accept fails for want of descriptors, [`Reserve::shed`] gives the spare up, takes the
//! waiting connection with it and closes that at once — its client learns right away that
//! it was refused — and takes the spare back. The listener keeps answering, one refusal
//! per waiting client, instead of stalling.
//!
//! The kernel takes a descriptor number before it looks at the backlog, so accept also
//! fails so when nothing is waiting; `shed` then finds nothing and leaves the listener
//! waiting for the next connection, holding its spare.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::slots::{Evicted, Refused};
use crate::logfmt::Summarised;

/// Whether `e` says the process or the system is out of file descriptors.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How long an accept loop waits when it has no spare to give up and accept still fails
/// for want of descriptors (another task took the one freed): short, so that the listener
/// stays responsive, doubling up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(5);
pub const MAX_PAUSE: Duration = Duration::from_millis(100);

/// One spare file descriptor, held so that a connection can be accepted (and closed)
/// when the process has no other.
pub struct Reserve {
    spare: Option<File>,
}

impl Default for Reserve {
    fn default() -> Self {
        let mut r = Reserve { spare: None };
        r.ensure();
        r
    }
}

impl Reserve {
    /// Holds a spare again if it does not; false only when the process is out of
    /// descriptors. (Without `/dev/null` — a bare chroot — there is no spare to hold, and
    /// the loop pauses instead of refusing; nothing else changes.)
    pub fn ensure(&mut self) -> bool {
        if self.spare.is_none() {
            match File::open("/dev/null") {
                Ok(f) => self.spare = Some(f),
                Err(e) => return !out_of_descriptors(&e),
            }
        }
        true
    }

    /// Gives the spare up, so that the next accept can take a waiting connection; false
    /// when there was none to give.
    pub fn release(&mut self) -> bool {
        self.spare.take().is_some()
    }

    /// After accept failed for want of descriptors: with the spare given up, takes the
    /// waiting connection, if any, through `poll_accept` (without waiting for one) and
    /// closes it; then holds a spare again.
    pub async fn shed<T>(
        &mut self,
        mut poll_accept: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Shed {
        if !self.release() {
            return Shed::NoSpare;
        }
        let taken = std::future::poll_fn(|cx| Poll::Ready(poll_accept(cx))).await;
        let shed = match taken {
            // Closed here: the client sees its connection end at once.
            Poll::Ready(Ok(conn)) => {
                drop(conn);
                Shed::Refused
            }
            // The freed descriptor went elsewhere meanwhile.
            Poll::Ready(Err(e)) if out_of_descriptors(&e) => Shed::NoSpare,
            Poll::Ready(Err(_)) | Poll::Pending => Shed::Nothing,
        };
        self.ensure();
        shed
    }
}

impl Reserve {
    /// What an accept loop does when accepting failed for want of descriptors (`error`):
    /// refuses a waiting connection with the spare, or pauses (`pause` doubles up to
    /// [`MAX_PAUSE`]) when it cannot; logged summarised. True when a connection was refused.
    pub async fn out_of_descriptors<T>(
        &mut self,
        poll_accept: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>>,
        log: &AdmissionLog,
        error: &io::Error,
        pause: &mut Duration,
    ) -> bool {
        match self.shed(poll_accept).await {
            Shed::Refused => {
                log.no_descriptors(error);
                true
            }
            Shed::Nothing => false,
            Shed::NoSpare => {
                log.no_descriptors(error);
                tokio::time::sleep(*pause).await;
                *pause = (*pause * 2).min(MAX_PAUSE);
                false
            }
        }
    }
}

/// What [`Reserve::shed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// A waiting connection was accepted and closed.
    Refused,
    /// Nothing was waiting.
    Nothing,
    /// No spare to give up, or no connection could be taken with it: the loop pauses
    /// briefly before it tries again.
    NoSpare,
}

/// The warnings of one listener's admissions, each summarised (see
/// [`crate::logfmt::Summarised`]): a client that reconnects as fast as it can gets a line
/// and a count every few seconds, not a line per connection.
pub struct AdmissionLog {
    full: Arc<Summarised>,
    per_peer: Arc<Summarised>,
    evicted: Arc<Summarised>,
    no_descriptors: Arc<Summarised>,
    listener: Arc<str>,
    protocol: &'static str,
}

impl AdmissionLog {
    pub fn new(listener: &str, protocol: &'static str) -> Self {
        let listener: Arc<str> = listener.into();
        let summary = |what: &'static str, error: bool| {
            let listener = listener.clone();
            Summarised::new(move |count, over| {
                if error {
                    tracing::error!(listener = %listener, protocol, count, "{what}: {count} more in the last {over:?}");
                } else {
                    tracing::warn!(listener = %listener, protocol, count, "{what}: {count} more in the last {over:?}");
                }
            })
        };
        AdmissionLog {
            full: summary("connection limit reached; new connections closed", false),
            per_peer: summary(
                "per-peer connection limit reached; new connections closed",
                false,
            ),
            evicted: summary("idle connections closed to make room", false),
            no_descriptors: summary("out of file descriptors; new connections closed", true),
            listener,
            protocol,
        }
    }

    /// A new connection from `peer` was turned away.
    pub fn refused(&self, peer: &dyn fmt::Display, why: Refused, limit: usize) {
        let (listener, protocol) = (&*self.listener, self.protocol);
        match why {
            Refused::Full => self.full.hit(|| {
                tracing::warn!(
                    listener, protocol, peer = %peer, limit,
                    "connection limit reached and every connection busy or just answered; closing new connection"
                );
            }),
            Refused::PerPeer => self.per_peer.hit(|| {
                tracing::warn!(
                    listener, protocol, peer = %peer, limit,
                    "per-peer connection limit reached and every connection of the peer busy or just answered; closing new connection"
                );
            }),
        }
    }

    /// A connection was closed to make room for one from `peer`.
    pub fn evicted(&self, peer: &dyn fmt::Display, e: &Evicted, limit: usize) {
        let (listener, protocol) = (&*self.listener, self.protocol);
        self.evicted.hit(|| {
            let whose = match e.reason {
                Refused::Full => "connection limit reached",
                Refused::PerPeer => "per-peer connection limit reached",
            };
            tracing::warn!(
                listener, protocol, peer = %peer, closed_peer = %e.peer, limit,
                "{whose}; closed the longest-idle connection to make room"
            );
        });
    }

    /// Accept failed for want of descriptors; the waiting connection is refused.
    pub fn no_descriptors(&self, error: &io::Error) {
        let (listener, protocol) = (&*self.listener, self.protocol);
        self.no_descriptors.hit(|| {
            tracing::error!(
                listener, protocol, %error,
                "out of file descriptors; closing new connections at once (raise the descriptor limit, LimitNOFILE=, or lower max_connections)"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_out_of_descriptors() {
        for (code, want) in [
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::ECONNABORTED, false),
            (libc::ENOBUFS, false),
        ] {
            assert_eq!(
                out_of_descriptors(&io::Error::from_raw_os_error(code)),
                want
            );
        }
        assert!(!out_of_descriptors(&io::Error::other("x")));
    }

    #[test]
    fn the_spare_is_given_up_and_taken_again() {
        let mut r = Reserve::default();
        assert!(r.release());
        assert!(!r.release(), "nothing left to give");
        assert!(r.ensure());
        assert!(r.release());
    }
}
