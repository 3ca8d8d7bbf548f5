//! The Postfix policy front end: one connection's read–decide–reply loop, and the mapping
//! between policy attributes, engine requests and `action=` replies.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{ConnLimits, Io};
use crate::config::DeferAction;
use crate::engine::{Request, Rule, Verdict};
use crate::proto::policy::{Decoder, PolicyRequest, encode_response};
use crate::service::{Greylister, Outcome, unix_now};

/// How decisions are spelled as policy replies.
#[derive(Debug, Clone)]
pub struct Replies {
    pub defer_action: DeferAction,
    /// Deferral text with `{remaining}` placeholder.
    pub defer_text: String,
    /// Host name for the `X-Greylist` header, or `None` when the header is off.
    pub header_host: Option<String>,
}

impl Replies {
    /// The `action=` value for an outcome decided at `now`.
    pub fn action(&self, o: &Outcome, now: u64) -> String {
        let d = &o.decision;
        match o.effective() {
            Verdict::Defer if d.rule == Rule::StoreFailClosed => self.defer_action.reply(
                "Greylisting is temporarily unavailable, please try again later",
                Some("4.3.0"),
            ),
            Verdict::Defer => {
                let remaining = d.remaining.unwrap_or(0).to_string();
                self.defer_action
                    .reply(&self.defer_text.replace("{remaining}", &remaining), None)
            }
            Verdict::Pass if o.enforced => match (d.delayed, &self.header_host) {
                (Some(secs), Some(host)) => format!("PREPEND {}", x_greylist(secs, host, now)),
                _ => "DUNNO".into(),
            },
            _ => "DUNNO".into(),
        }
    }
}

/// The `X-Greylist` header line (SPEC §3).
pub fn x_greylist(delayed: u64, host: &str, now: u64) -> String {
    let date = jiff::Timestamp::from_second(i64::try_from(now).unwrap_or(i64::MAX))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%a, %d %b %Y %H:%M:%S +0000");
    format!(
        "X-Greylist: delayed {delayed} seconds by greygate-{} at {host}; {date}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Maps a policy request to an engine request, or `None` when it is not an
/// `smtpd_access_policy` request (answered `DUNNO`).
pub fn to_request(p: &PolicyRequest) -> Option<Request> {
    if p.get("request") != Some("smtpd_access_policy") {
        return None;
    }
    let get = |n: &str| p.get(n).unwrap_or("").to_string();
    Some(Request {
        stage: get("protocol_state"),
        client_ip: p
            .get("client_address")
            .and_then(|a| a.parse::<IpAddr>().ok()),
        client_name: p.get("client_name").unwrap_or("unknown").to_string(),
        helo: get("helo_name"),
        sender: get("sender"),
        recipient: get("recipient"),
        sasl_username: get("sasl_username"),
    })
}

/// What a connection needs.
#[derive(Clone)]
pub struct ConnContext {
    pub svc: Arc<Greylister>,
    pub replies: Arc<Replies>,
    pub limits: ConnLimits,
    pub shutdown: CancellationToken,
}

/// Serves one connection: requests are answered in order; pipelined replies go out in one
/// write. Malformed input, timeouts and shutdown close the connection; per the protocol,
/// a request we cannot read gets no reply.
pub async fn serve_connection<S: Io>(mut stream: S, peer: &str, ctx: &ConnContext) {
    let mut decoder = Decoder::new(ctx.limits.codec);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 8192];
    loop {
        let mut start = 0;
        loop {
            match decoder.decode(&buf[start..]) {
                Ok((used, req)) => {
                    start += used;
                    let Some(req) = req else { break };
                    let action = match to_request(&req) {
                        Some(r) => {
                            let now = unix_now();
                            let outcome = ctx.svc.check(&r, now).await;
                            ctx.replies.action(&outcome, now)
                        }
                        None => {
                            tracing::debug!(
                                peer,
                                request = req.get("request").unwrap_or(""),
                                "not an smtpd_access_policy request; DUNNO"
                            );
                            "DUNNO".into()
                        }
                    };
                    encode_response(&action, &mut out);
                }
                Err(e) => {
                    tracing::warn!(peer, error = %e, "malformed policy request; closing connection");
                    return;
                }
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            let write = tokio::time::timeout(ctx.limits.io_timeout, stream.write_all(&out)).await;
            match write {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => {
                    tracing::debug!(peer, error = %e, "write failed; closing connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        peer,
                        "client did not take a reply within io_timeout; closing connection"
                    );
                    return;
                }
            }
        }
        let mid_request = decoder.in_request() || !buf.is_empty();
        let wait = if mid_request {
            ctx.limits.io_timeout
        } else {
            ctx.limits.idle_timeout
        };
        let read = tokio::select! {
            r = tokio::time::timeout(wait, stream.read(&mut chunk)) => r,
            _ = ctx.shutdown.cancelled(), if !mid_request => return,
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
                tracing::warn!(peer, timeout = ?wait, "request not completed within io_timeout; closing connection");
                return;
            }
            Err(_) => {
                tracing::debug!(peer, timeout = ?wait, "idle connection closed");
                return;
            }
        }
    }
}
