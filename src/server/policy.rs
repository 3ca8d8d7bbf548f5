//! The Postfix policy front end: one connection's read–decide–reply loop, and the mapping
//! between policy attributes, engine requests and `action=` replies.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::replies::Replies;
use super::slots::Slot;
use super::{Io, ListenAddr};
use crate::engine::Request;
use crate::proto::policy::{Decoder, PolicyRequest, encode_response};
use crate::service::{Decided, Greylister, timeout_if_waiting, unix_now};

/// The policy listeners: where, with which socket mode, and within which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub listen: Vec<ListenAddr>,
    /// File mode of Unix sockets.
    pub socket_mode: u32,
    pub limits: PolicyLimits,
}

/// Per-connection limits of the policy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLimits {
    pub max_connections: usize,
    /// Connections of one client address (one user on a Unix socket) per listener.
    pub max_connections_per_peer: usize,
    /// Longest wait for the next complete request; only a complete request restarts it.
    pub idle_timeout: Duration,
    /// Longest time for a started request to arrive whole, or for a reply to be taken.
    pub io_timeout: Duration,
    pub codec: crate::proto::policy::Limits,
}

/// Maps a policy request to an engine request, or `None` when it is not an
/// `smtpd_access_policy` request (answered `DUNNO`).
pub fn to_request(p: &PolicyRequest) -> Option<Request> {
    let mut is_policy = false;
    let mut r = Request::default();
    let mut client_name = None;
    let mut client_address = None;
    // One pass: a request has some 30 attributes, of which we keep 8 (copied).
    // A repeated attribute takes its last value, as Postfix's own parsers do.
    for (name, value) in p.attributes() {
        let slot = match name {
            "request" => {
                is_policy = value == "smtpd_access_policy";
                continue;
            }
            "client_address" => {
                client_address = Some(value);
                continue;
            }
            "client_name" => {
                client_name = Some(value);
                continue;
            }
            // Postfix 2.3+: `TLSv1.3` and the like once STARTTLS is done, empty before.
            "encryption_protocol" => {
                r.tls = !value.is_empty();
                continue;
            }
            "protocol_state" => &mut r.stage,
            "helo_name" => &mut r.helo,
            "sender" => &mut r.sender,
            "recipient" => &mut r.recipient,
            "sasl_username" => &mut r.sasl_username,
            // Postfix has looked the client up already: with it, DNS facts need no PTR
            // query. Absent (old Postfix, other clients): empty, and the facts gatherer
            // looks itself.
            "reverse_client_name" => &mut r.reverse_client_name,
            _ => continue,
        };
        value.clone_into(slot);
    }
    if !is_policy {
        return None;
    }
    r.client_ip = client_address.and_then(|a| a.parse::<IpAddr>().ok());
    r.client_name = client_name.unwrap_or("unknown").to_string();
    Some(r)
}

/// What a connection needs.
pub struct PolicyContext {
    pub svc: Arc<Greylister>,
    /// Swapped whole by a reload.
    pub replies: Arc<arc_swap::ArcSwap<Replies>>,
    pub limits: PolicyLimits,
    /// Shutdown and hard stop.
    pub stops: Arc<super::StopSignals>,
}

/// Serves one connection: requests are answered in order; pipelined replies go out in one
/// write. Malformed input, timeouts, shutdown and being closed to make room (`slot`) close
/// the connection; per the protocol, a request we cannot read gets no reply (replies owed
/// for earlier requests still go out).
///
/// Only a complete request restarts the idle timer: blank lines between requests are
/// allowed but are no sign of life, or a client sending one every few seconds would hold
/// its connection for ever.
pub async fn serve_connection<S: Io>(mut stream: S, peer: &str, ctx: &PolicyContext, slot: &Slot) {
    let mut decoder = Decoder::new(ctx.limits.codec);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    // Decisions whose replies are in `out`: counted and logged once the replies are sent.
    let mut decided: Vec<Decided<'static>> = Vec::new();
    // The reply being spelled, reused for every request.
    let mut action = String::with_capacity(256);
    let mut chunk = [0u8; 8192];
    // A started request must be complete by this instant, however slowly it trickles in.
    let mut request_deadline: Option<Instant> = None;
    // Without a request in progress the connection closes at this instant, set at the
    // connect and after each answer.
    let mut idle_deadline = Instant::now() + ctx.limits.idle_timeout;
    // One timer and one wait per token for the whole connection, moved rather than made
    // anew for every read (a timer registration and two waiter-list insertions per request).
    let timer = tokio::time::sleep_until(idle_deadline);
    let (shutdown, hard_stop) = ctx.stops.waits();
    let evicted = slot.evicted();
    tokio::pin!(timer, shutdown, hard_stop, evicted);
    loop {
        let mut start = 0;
        let mut bad = None;
        loop {
            match decoder.decode(&buf[start..]) {
                Ok((used, None)) => {
                    start += used;
                    break;
                }
                Ok((used, Some(req))) => {
                    start += used;
                    if !slot.begin() {
                        // Closed to make room just before the request came in: the client
                        // sends it again on another connection.
                        tracing::debug!(
                            peer,
                            "connection closed to make room; request not answered"
                        );
                        return;
                    }
                    request_deadline = None;
                    action.clear();
                    answer(req, peer, ctx, &mut decided, &mut action).await;
                    encode_response(&action, &mut out);
                }
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            let written = write_replies(&mut stream, &out, ctx).await;
            // Written or not, the decisions stand (the store has them): count and log.
            for d in decided.drain(..) {
                ctx.svc.record(&d);
            }
            if let Err(why) = written {
                tracing::warn!(peer, "{why}; closing connection");
                return;
            }
            out.clear();
            let now = Instant::now();
            slot.done(now);
            idle_deadline = now + ctx.limits.idle_timeout;
        }
        if let Some(e) = bad {
            tracing::warn!(peer, error = %e, "malformed policy request; closing connection");
            return;
        }
        let mid_request = decoder.in_request() || !buf.is_empty();
        let deadline = if mid_request {
            *request_deadline.get_or_insert_with(|| Instant::now() + ctx.limits.io_timeout)
        } else {
            idle_deadline
        };
        if timer.deadline() != deadline {
            // Later than before (the usual case) only updates the entry; tokio files it
            // anew when the old instant comes.
            timer.as_mut().reset(deadline);
        }
        let read = tokio::select! {
            // Stopping first: a client that never stops sending must not hold it up.
            biased;
            () = &mut hard_stop => {
                tracing::warn!(peer, "shutting down with a request unfinished; closing connection");
                return;
            }
            () = &mut shutdown, if !mid_request => return,
            () = &mut evicted => {
                tracing::debug!(peer, "connection closed to make room for a new one");
                return;
            }
            r = stream.read(&mut chunk) => Ok(r),
            () = &mut timer => Err(()),
        };
        match read {
            Ok(Ok(0)) => {
                if mid_request {
                    tracing::warn!(peer, "connection closed in the middle of a request");
                }
                return;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                tracing::debug!(peer, error = %e, "read failed; closing connection");
                return;
            }
            Err(_) if mid_request => {
                tracing::warn!(
                    peer,
                    timeout = ?ctx.limits.io_timeout,
                    "request not completed within io_timeout; closing connection"
                );
                return;
            }
            Err(_) => {
                tracing::debug!(peer, timeout = ?ctx.limits.idle_timeout, "idle connection closed");
                return;
            }
        }
    }
}

/// Decides one request and spells the reply into `action`; the decision goes to `decided`,
/// to be counted and logged once the reply is out.
async fn answer(
    req: PolicyRequest,
    peer: &str,
    ctx: &PolicyContext,
    decided: &mut Vec<Decided<'static>>,
    action: &mut String,
) {
    match to_request(&req) {
        Some(r) => {
            let now = unix_now();
            let d = ctx.svc.decide(Cow::Owned(r), now).await;
            ctx.replies.load().write_action(&d.outcome, now, action);
            decided.push(d);
        }
        None => {
            tracing::debug!(
                peer,
                request = req.get("request").unwrap_or(""),
                "not an smtpd_access_policy request; DUNNO"
            );
            action.push_str("DUNNO");
        }
    }
}

async fn write_replies<S: Io>(
    stream: &mut S,
    out: &[u8],
    ctx: &PolicyContext,
) -> Result<(), String> {
    // Replies nearly always fit the socket buffer at once.
    match timeout_if_waiting(ctx.limits.io_timeout, stream.write_all(out)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("client did not take a reply within io_timeout".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::engine::{Engine, Mode};
    use crate::server::replies::DeferAction;
    use crate::service::{FailMode, ServiceOptions, StoreSlot};
    use crate::store::MemoryStore;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn encryption_protocol_says_whether_the_session_is_tls() {
        let req = |tls: &str| {
            let mut p = PolicyRequest::new();
            p.push("request", "smtpd_access_policy");
            p.push("protocol_state", "RCPT");
            p.push("client_address", "192.0.2.1");
            p.push("encryption_protocol", tls);
            to_request(&p).expect("a policy request")
        };
        assert!(req("TLSv1.3").tls);
        assert!(!req("").tls);
    }

    fn context() -> PolicyContext {
        let svc = Greylister::new(
            Engine::default(),
            StoreSlot::new(Arc::new(MemoryStore::new())),
            ServiceOptions {
                mode: Mode::Enforce,
                fail_mode: FailMode::Open,
                store_timeout: Duration::from_secs(1),
            },
        );
        PolicyContext {
            svc: Arc::new(svc),
            replies: Arc::new(arc_swap::ArcSwap::from_pointee(Replies {
                defer_action: DeferAction::DeferIfPermit,
                milter_code: "451 4.7.1".into(),
                defer_text: "Greylisted".into(),
                header_host: None,
            })),
            limits: PolicyLimits {
                max_connections: 10,
                max_connections_per_peer: 10,
                idle_timeout: Duration::from_secs(600),
                io_timeout: Duration::from_secs(10),
                codec: Default::default(),
            },
            stops: crate::server::StopSignals::new(
                CancellationToken::new(),
                CancellationToken::new(),
            ),
        }
    }

    fn spawn(ctx: PolicyContext) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task =
            tokio::spawn(
                async move { serve_connection(server, "test", &ctx, &Slot::unlisted()).await },
            );
        (client, task)
    }

    const REQ: &str = "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\nsender=a@example.net\nrecipient=b@example.org\n\n";

    #[tokio::test(start_paused = true)]
    async fn a_trickling_request_is_cut_off_at_io_timeout_from_its_start() {
        let (mut client, task) = spawn(context());
        let start = tokio::time::Instant::now();
        client
            .write_all(b"request=smtpd_access_policy\n")
            .await
            .unwrap();
        // One byte every 3 s would reset a per-read timeout forever.
        while client.write_all(b"x").await.is_ok() && !task.is_finished() {
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(start.elapsed() < Duration::from_secs(60), "never cut off");
        }
        task.await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(14),
            "closed after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_take_its_replies_is_dropped_at_io_timeout() {
        let ctx = context();
        // A pipe far smaller than the replies owed: the server's write has to wait.
        let (mut client, server) = tokio::io::duplex(64);
        let task =
            tokio::spawn(
                async move { serve_connection(server, "test", &ctx, &Slot::unlisted()).await },
            );
        let start = tokio::time::Instant::now();
        let mut sent = 0;
        while sent < 20 && !task.is_finished() {
            // Requests go in while the server reads them; replies are never read.
            match tokio::time::timeout(Duration::from_secs(1), client.write_all(REQ.as_bytes()))
                .await
            {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("closed")
            .unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(13),
            "closed after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_wait_for_idle_timeout_not_io_timeout() {
        let (mut client, task) = spawn(context());
        client.write_all(REQ.as_bytes()).await.unwrap();
        let mut reply = [0u8; 256];
        let n = client.read(&mut reply).await.unwrap();
        assert!(reply[..n].starts_with(b"action=DEFER_IF_PERMIT"));
        let start = tokio::time::Instant::now();
        task.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn blank_lines_do_not_keep_an_idle_connection_open() {
        let (mut client, task) = spawn(context());
        let start = tokio::time::Instant::now();
        // A blank line every 5 s, as the clients that held every slot sent.
        while !task.is_finished() {
            let _ = client.write_all(b"\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(start.elapsed() < Duration::from_secs(700), "never closed");
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(600) && took <= Duration::from_secs(605),
            "closed after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_closed_to_make_room_stops_at_once() {
        let ctx = context();
        let slots = crate::server::slots::Slots::new(1, 1);
        let key = crate::server::slots::PeerKey::Local;
        let (lease, _) = slots.admit(key).unwrap();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let slot = lease.slot().clone();
        let task = tokio::spawn(async move { serve_connection(server, "test", &ctx, &slot).await });
        client.write_all(REQ.as_bytes()).await.unwrap();
        let mut reply = [0u8; 256];
        let n = client.read(&mut reply).await.unwrap();
        assert!(reply[..n].starts_with(b"action="));
        // Just answered: not closed for a newcomer yet; after the grace, it is.
        assert!(slots.admit(key).is_err());
        tokio::time::sleep(crate::server::slots::ANSWERED_GRACE).await;
        let (_newcomer, evicted) = slots.admit(key).expect("room made");
        assert!(evicted.is_some());
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the old connection stops at once")
            .unwrap();
        drop(lease);
    }

    #[tokio::test]
    async fn replies_owed_before_a_bad_request_are_still_sent() {
        let (mut client, task) = spawn(context());
        let batch = format!("{REQ}{REQ}garbage without equals\n\n");
        client.write_all(batch.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        task.await.unwrap();
        let text = String::from_utf8(got).unwrap();
        assert_eq!(
            text.matches("action=DEFER_IF_PERMIT Greylisted\n\n")
                .count(),
            2,
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn hard_stop_closes_a_connection_mid_request() {
        let ctx = context();
        let hard = ctx.stops.hard_stop.clone();
        let shutdown = ctx.stops.shutdown.clone();
        let (mut client, task) = spawn(ctx);
        client
            .write_all(b"request=smtpd_access_policy\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !task.is_finished(),
            "graceful shutdown waits for the request"
        );
        hard.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("closed at hard stop")
            .unwrap();
    }
}
