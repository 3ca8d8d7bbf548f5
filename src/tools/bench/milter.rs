//! The milter client side of the load: each request replayed as an MTA's milter session.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::load::{ConnStats, Control, nanos};
use super::stream::RequestStream;
use super::{ConnError, MAX_REPLY};
use crate::proto::milter::{Command, Decoded, Family, Reply, decode_reply};

/// The value of `name=` in an encoded policy request (the stream's requests are built for
/// the policy protocol; the milter mode replays the same triplets).
fn attribute<'a>(req: &'a [u8], name: &str) -> &'a str {
    req.split(|&b| b == b'\n')
        .find_map(|line| {
            line.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
        })
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
}

/// One MTA-like milter client: negotiate once; per request a session of connect, HELO,
/// MAIL and RCPT, each waiting for its reply, then abort and quit-new-connection.
pub(super) async fn milter_conn<S>(mut s: S, mut stream: RequestStream, ctl: &Control) -> ConnStats
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = ConnStats::new();
    let mut req = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(512);
    let mut inbuf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    let mut pending = vec![Command::OptNeg {
        version: 6,
        actions: 0x1ff,
        protocol: 0x1f_ffff,
    }];
    loop {
        let t0 = Instant::now();
        let Some(measured) = ctl.admit(t0) else { break };
        req.clear();
        let kind = stream.next_into(&mut req);
        let ip = attribute(&req, "client_address");
        let family = if ip.contains(':') {
            Family::Inet6
        } else {
            Family::Inet
        };
        let steps = [
            Command::Connect {
                hostname: attribute(&req, "client_name").to_string(),
                family,
                port: 25,
                address: ip.to_string(),
            },
            Command::Helo(attribute(&req, "helo_name").to_string()),
            Command::Mail(vec![format!("<{}>", attribute(&req, "sender"))]),
            Command::Rcpt(vec![format!("<{}>", attribute(&req, "recipient"))]),
        ];
        let commands: Vec<Command> = pending.drain(..).chain(steps).collect();
        let result = async {
            let mut last = Reply::Continue;
            for cmd in &commands {
                out.clear();
                cmd.encode(&mut out);
                s.write_all(&out).await?;
                if matches!(cmd, Command::Abort | Command::QuitNewConnection) {
                    continue;
                }
                last = loop {
                    match decode_reply(&inbuf, MAX_REPLY) {
                        Ok(Decoded::Frame(r, used)) => {
                            inbuf.drain(..used);
                            break r;
                        }
                        Ok(Decoded::Incomplete) => {}
                        Err(_) => return Err(ConnError::ReplyTooLong),
                    }
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(ConnError::Closed);
                    }
                    inbuf.extend_from_slice(&chunk[..n]);
                };
            }
            Ok(last)
        }
        .await;
        let t1 = Instant::now();
        // Abort the message and start a new SMTP session on the same milter connection;
        // neither gets a reply, so they go out with the next session's first command.
        pending.extend([Command::Abort, Command::QuitNewConnection]);
        match result {
            Ok(reply) => {
                if measured {
                    stats.latency.record(nanos(t1 - t0));
                    match reply {
                        Reply::Continue | Reply::Accept => stats.replies.dunno += 1,
                        Reply::ReplyCode(_) | Reply::Tempfail => stats.replies.defer += 1,
                        _ => stats.replies.other += 1,
                    }
                    stats.sent.count(kind);
                    stats.last = Some(t1);
                }
            }
            Err(e) => {
                stats.error = Some(e);
                break;
            }
        }
    }
    stats
}
