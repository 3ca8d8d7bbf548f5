//! Connection slots of one listener: the overall and per-peer limits, and which connection
//! makes room for a new one when a limit is reached.
//!
//! A full listener used to close every new connection, so whoever held the slots — 512
//! sockets sending a blank line now and then — kept every other client out for as long as
//! they liked. Now a new connection takes the slot of the connection that has waited
//! longest without a request in progress, and only a listener whose every connection is
//! answering a request, or was answered moments ago, turns it away. The per-peer limit
//! does the same within one peer's connections, so that one address cannot take the whole
//! listener while others are kept out.
//!
//! What counts as progress is the connection loop's business: it calls [`Slot::begin`]
//! when a complete request (a policy request, a milter command that moves the session on,
//! an HTTP request) arrives and [`Slot::done`] when its reply is out. Bytes that do not
//! complete a request — blank lines, no-op frames, a header trickling in — are not progress,
//! so they neither protect a connection nor make it younger.
//!
//! Cost: admitting and closing a connection take the table's lock once each (a hash map
//! insert or remove); a request marks its own slot with one compare-and-swap and one store,
//! on an atomic only its connection writes. Looking for a connection to close is a scan of
//! the table, made only when a limit is reached.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{Signal, StopWait};
use crate::lock;

/// A connection answered this recently is not closed to make room: its client is likely
/// to send the next request at once (Postfix sends one per RCPT of a session), and two
/// busy clients must not take turns closing each other's connections. A connection that
/// has never completed a request has no such protection: a client that connects and sends
/// nothing useful cannot shield its connections by opening them quickly.
pub const ANSWERED_GRACE: Duration = Duration::from_secs(2);

/// Who a connection comes from, for the per-peer limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A TCP client: its address (IPv6 too: a whole address, not a prefix, because several
    /// MTAs of one site may share a /64).
    Ip(IpAddr),
    /// A Unix socket client: there is no address, so the peer is its user id
    /// (`SO_PEERCRED`): Postfix's processes share one, another local user has another.
    Uid(u32),
    /// A Unix socket client whose credentials could not be read: all such clients share
    /// one peer's limit.
    Local,
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Uid(uid) => write!(f, "uid {uid}"),
            PeerKey::Local => f.write_str("unix"),
        }
    }
}

/// Bits of [`Slot::state`].
const BUSY: u64 = 1 << 63;
const EVICTED: u64 = 1 << 62;
const ANSWERED: u64 = 1 << 61;
/// The rest: milliseconds since the table's epoch of the last progress (the connect, or
/// the end of the last reply).
const TIME: u64 = ANSWERED - 1;

/// One connection's slot, as its connection loop marks it.
pub struct Slot {
    state: AtomicU64,
    epoch: Instant,
    evicted: Signal,
}

impl Slot {
    fn new(epoch: Instant, now: Instant) -> Self {
        Slot {
            state: AtomicU64::new(millis(epoch, now)),
            epoch,
            evicted: Signal::default(),
        }
    }

    /// A slot in no table: never closed to make room (unit tests, and connections served
    /// without a listener).
    pub fn unlisted() -> Arc<Slot> {
        let now = Instant::now();
        Arc::new(Slot::new(now, now))
    }

    /// A complete request arrived: the connection may not be closed to make room until
    /// [`Slot::done`]. False when it already was (the request is then not answered: the
    /// client sees the connection close and sends it again on another).
    pub fn begin(&self) -> bool {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & EVICTED != 0 {
                return false;
            }
            if s & BUSY != 0 {
                return true;
            }
            match self
                .state
                .compare_exchange_weak(s, s | BUSY, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// The replies are out at `now`: the connection waits for its next request.
    pub fn done(&self, now: Instant) {
        // A busy slot is never marked evicted, so nothing is overwritten here.
        self.state
            .store(ANSWERED | millis(self.epoch, now), Ordering::Release);
    }

    /// Resolves once the connection has been closed to make room; its loop then returns.
    pub(crate) fn evicted(&self) -> StopWait<'_> {
        StopWait::new(&self.evicted)
    }

    /// Whether the slot may be taken at `now_ms`, and if so since when it made no progress.
    fn idle_since(&self, now_ms: u64) -> Option<(u64, u64)> {
        let s = self.state.load(Ordering::Acquire);
        if s & (BUSY | EVICTED) != 0 {
            return None;
        }
        let at = s & TIME;
        let recent = now_ms.saturating_sub(at) < ANSWERED_GRACE.as_millis() as u64;
        if s & ANSWERED != 0 && recent {
            return None;
        }
        Some((at, s))
    }
}

fn millis(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_millis())
        .unwrap_or(TIME)
        .min(TIME)
}

/// The slots of one listener.
pub struct Slots {
    limit: usize,
    per_peer: usize,
    epoch: Instant,
    table: std::sync::Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Held>,
    peers: HashMap<PeerKey, usize>,
}

struct Held {
    peer: PeerKey,
    slot: Arc<Slot>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Held> {
        let held = self.conns.remove(&id)?;
        if let Some(n) = self.peers.get_mut(&held.peer) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&held.peer);
            }
        }
        Some(held)
    }
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener is full and every connection is busy or was just answered.
    Full,
    /// The peer holds its limit and each of its connections is busy or was just answered.
    PerPeer,
}

/// A connection closed to make room for the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub peer: PeerKey,
    /// Whose limit was reached: the peer's (it made room among its own connections) or
    /// the listener's.
    pub reason: Refused,
}

/// A connection's hold on its slot, released when dropped.
pub struct Lease {
    slots: Arc<Slots>,
    id: u64,
    slot: Arc<Slot>,
}

impl Lease {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Gone already when it was closed to make room (its place was given away then).
        lock(&self.slots.table).remove(self.id);
    }
}

impl Slots {
    /// `per_peer` above `limit` means no per-peer limit.
    pub fn new(limit: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Slots {
            limit: limit.max(1),
            per_peer: per_peer.clamp(1, limit.max(1)),
            epoch: Instant::now(),
            table: std::sync::Mutex::new(Table::default()),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn per_peer(&self) -> usize {
        self.per_peer
    }

    /// The limit a refusal or an eviction was for.
    pub fn limit_for(&self, why: Refused) -> usize {
        match why {
            Refused::Full => self.limit,
            Refused::PerPeer => self.per_peer,
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        lock(&self.table).conns.len()
    }

    /// A slot for a new connection from `peer`, closing the longest-idle connection (of
    /// that peer when its limit is reached, else of the listener) when a limit is reached.
    pub fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<(Lease, Option<Evicted>), Refused> {
        let now = Instant::now();
        let now_ms = millis(self.epoch, now);
        let mut table = lock(&self.table);
        let from_peer = table.peers.get(&peer).copied().unwrap_or(0);
        let scope = if from_peer >= self.per_peer {
            Some(Refused::PerPeer)
        } else if table.conns.len() >= self.limit {
            Some(Refused::Full)
        } else {
            None
        };
        let evicted = match scope {
            None => None,
            Some(reason) => {
                let only = (reason == Refused::PerPeer).then_some(peer);
                let victim = evict(&mut table, only, now_ms).ok_or(reason)?;
                Some(Evicted {
                    peer: victim,
                    reason,
                })
            }
        };
        let id = table.next_id;
        table.next_id += 1;
        let slot = Arc::new(Slot::new(self.epoch, now));
        table.conns.insert(
            id,
            Held {
                peer,
                slot: slot.clone(),
            },
        );
        *table.peers.entry(peer).or_default() += 1;
        drop(table);
        let lease = Lease {
            slots: Arc::clone(self),
            id,
            slot,
        };
        Ok((lease, evicted))
    }
}

/// Closes the connection (of `only` that peer, if given) that has made no progress for the
/// longest, if any may be closed: takes it out of the table and tells its loop. Returns its
/// peer.
fn evict(table: &mut Table, only: Option<PeerKey>, now_ms: u64) -> Option<PeerKey> {
    // A connection may start a request between the look and the claim; the claim then
    // fails and the next oldest is tried. Bounded: each round is a whole scan.
    for _ in 0..4 {
        let (id, seen) = table
            .conns
            .iter()
            .filter(|(_, h)| only.is_none_or(|p| h.peer == p))
            .filter_map(|(id, h)| h.slot.idle_since(now_ms).map(|(at, s)| (at, *id, s)))
            .min()
            .map(|(_, id, s)| (id, s))?;
        let slot = &table.conns[&id].slot;
        if slot
            .state
            .compare_exchange(seen, seen | EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            slot.evicted.raise();
            return table.remove(id).map(|h| h.peer);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> PeerKey {
        PeerKey::Ip(IpAddr::from([127, 0, 0, last]))
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_closes_its_longest_idle_connection() {
        let slots = Slots::new(3, 3);
        let (a, _) = slots.admit(ip(1)).unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let (b, _) = slots.admit(ip(1)).unwrap();
        let (c, _) = slots.admit(ip(2)).unwrap();
        // `a` has a request in progress: `b`, the next oldest, makes room.
        assert!(a.slot().begin());
        let (d, evicted) = slots.admit(ip(3)).unwrap();
        assert_eq!(
            evicted,
            Some(Evicted {
                peer: ip(1),
                reason: Refused::Full
            })
        );
        assert!(!b.slot().begin(), "an evicted connection starts no request");
        tokio::time::timeout(Duration::from_secs(1), b.slot().evicted())
            .await
            .expect("its loop is told");
        assert_eq!(slots.held(), 3);
        drop(b);
        assert_eq!(slots.held(), 3, "its place was given away already");
        // `a` answered just now, `c` and `d` never did: `c` goes next.
        a.slot().done(Instant::now());
        let (_e, evicted) = slots.admit(ip(4)).unwrap();
        assert_eq!(evicted.map(|e| e.peer), Some(ip(2)));
        drop((c, d));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_and_just_answered_connections_are_not_closed() {
        let slots = Slots::new(2, 2);
        let (a, _) = slots.admit(ip(1)).unwrap();
        let (b, _) = slots.admit(ip(1)).unwrap();
        assert!(a.slot().begin());
        assert!(b.slot().begin());
        b.slot().done(Instant::now());
        assert_eq!(slots.admit(ip(2)).err(), Some(Refused::Full));
        // Once the grace is over, the answered one may make room; the busy one never.
        tokio::time::advance(ANSWERED_GRACE).await;
        let (c, evicted) = slots.admit(ip(2)).unwrap();
        assert_eq!(evicted.map(|e| e.peer), Some(ip(1)));
        assert!(!b.slot().begin());
        // `c` has sent nothing yet: it would make room at once; busy, it does not.
        assert!(c.slot().begin());
        assert_eq!(slots.admit(ip(3)).err(), Some(Refused::Full));
        drop(a);
        assert!(
            slots.admit(ip(3)).is_ok(),
            "a closed connection frees its slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_at_its_limit_makes_room_among_its_own_connections() {
        let slots = Slots::new(10, 2);
        let (a, _) = slots.admit(ip(1)).unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        let (b, _) = slots.admit(ip(1)).unwrap();
        let (other, _) = slots.admit(ip(2)).unwrap();
        let (c, evicted) = slots.admit(ip(1)).unwrap();
        assert_eq!(
            evicted,
            Some(Evicted {
                peer: ip(1),
                reason: Refused::PerPeer
            })
        );
        assert!(!a.slot().begin(), "the peer's oldest went");
        assert!(
            other.slot().begin(),
            "another peer's connection is untouched"
        );
        // Both of the peer's connections busy: the next one from it is turned away, while
        // another peer still gets in.
        assert!(b.slot().begin());
        assert!(c.slot().begin());
        assert_eq!(slots.admit(ip(1)).err(), Some(Refused::PerPeer));
        assert!(slots.admit(ip(3)).is_ok());
    }

    #[test]
    fn the_per_peer_limit_never_exceeds_the_listener_limit() {
        let slots = Slots::new(4, 100);
        assert_eq!(slots.per_peer(), 4);
        assert_eq!(Slots::new(4, 0).per_peer(), 1);
    }
}
