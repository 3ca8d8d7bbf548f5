//! The milter front end (Sendmail, Postfix `smtpd_milters`): one connection's state machine
//! over the pure codec in `proto::milter`, deciding at RCPT with the shared service.
//!
//! Negotiation asks only for what greylisting needs: connect, HELO, MAIL and RCPT; headers,
//! body, DATA and unknown commands are skipped. At RCPT a deferral is a custom
//! `451 4.7.1` reply; a recipient that ends its greylisting delay makes the message get an
//! `X-Greylist` header at end of message.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::replies::{Replies, x_greylist};
use super::slots::Slot;
use super::{Io, ListenAddr};
use crate::engine::Request;
use crate::engine::normalize::strip_envelope;
use crate::proto::milter::{
    Command, DecodeError, Decoded, Reply, VERSION, action, decode_command, macro_name, protocol,
    stage,
};
use crate::service::{Greylister, unix_now};

/// The milter listeners: where, and within which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterConfig {
    pub listen: Vec<ListenAddr>,
    pub limits: MilterLimits,
}

/// Limits of the milter listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterLimits {
    pub max_connections: usize,
    /// Connections of one client address (one user on a Unix socket) per listener.
    pub max_connections_per_peer: usize,
    /// Longest wait for the MTA's next command that moves the session on (an SMTP session
    /// can be slow); macros, negotiation and skipped steps do not restart it.
    pub idle_timeout: Duration,
    /// Longest time to finish a started frame, or to take a reply.
    pub io_timeout: Duration,
    pub max_frame: usize,
    /// Most macros kept per connection, all stages together.
    pub max_macros: usize,
    /// Most bytes of macro names and values kept per connection, all stages together.
    pub max_macro_bytes: usize,
}

/// Default of [`MilterLimits::max_macros`]: Postfix and Sendmail send about 20 macros over
/// all stages of a session by default (greygate asks for 4 of them).
pub const DEFAULT_MAX_MACROS: usize = 128;
/// Default of [`MilterLimits::max_macro_bytes`]: their values are host names, addresses,
/// queue ids and TLS names, a few KiB together; an MTA's full macro set never comes near.
pub const DEFAULT_MAX_MACRO_BYTES: usize = 64 * 1024;

/// What a milter connection needs.
pub struct MilterContext {
    pub svc: Arc<Greylister>,
    /// Swapped whole by a reload.
    pub replies: Arc<arc_swap::ArcSwap<Replies>>,
    pub limits: MilterLimits,
    /// Shutdown and hard stop.
    pub stops: Arc<super::StopSignals>,
}

/// Read buffer a connection keeps between frames; a bigger one, grown for a big frame, is
/// given back once that frame is done.
const KEEP_BUFFER: usize = 16 * 1024;

/// The protocol steps greygate does not need.
const SKIPPED_STEPS: u32 = protocol::NO_BODY
    | protocol::NO_HEADERS
    | protocol::NO_EOH
    | protocol::NO_UNKNOWN
    | protocol::NO_DATA;

/// State of one SMTP session as the milter sees it.
#[derive(Default)]
struct Session {
    client_ip: Option<IpAddr>,
    client_name: String,
    /// As Postfix's policy attribute: the unconfirmed PTR name or `unknown`; empty when the
    /// MTA did not say (DNS facts then look the name up themselves).
    reverse_client_name: String,
    helo: String,
    sender: Option<String>,
    macros: Macros,
    /// The warning about dropped macros was logged (once per connection).
    macros_over_limit_logged: bool,
    /// Longest greylisting delay a recipient of this message just served.
    delayed: Option<u64>,
}

impl Session {
    fn new_message(&mut self) {
        self.sender = None;
        self.delayed = None;
    }
}

/// The macro stages an MTA sends macros for (`SMFIM_*` order, as libmilter keeps them):
/// the stage of a command byte.
fn macro_stage(for_cmd: u8) -> Option<usize> {
    let stage = match for_cmd {
        b'C' => stage::CONNECT,
        b'H' => stage::HELO,
        b'M' => stage::ENVFROM,
        b'R' => stage::ENVRCPT,
        b'T' => stage::DATA,
        b'E' => stage::EOM,
        b'N' => stage::EOH,
        _ => return None,
    };
    Some(stage as usize)
}

const STAGES: usize = stage::EOH as usize + 1;

/// The macros of one milter connection, per stage, as the protocol keeps them: the MTA
/// sends a stage's macros before that stage's command, and they replace what the stage
/// held; a command clears the stages after its own (a new MAIL forgets the last
/// message's RCPT macros, a new connect the last session's); a new session on the
/// connection clears all. Bounded in count and bytes for the whole connection: what does
/// not fit is dropped (an MTA never sends that much; an attacker gains nothing).
#[derive(Default)]
struct Macros {
    stages: [Vec<(String, String)>; STAGES],
    count: usize,
    bytes: usize,
    /// Connect macros came since the last connect: they are the next session's.
    connect_sent: bool,
}

/// Bytes a macro is counted for.
fn macro_bytes(name: &str, value: &str) -> usize {
    name.len() + value.len()
}

impl Macros {
    /// Replaces the macros of `stage` with `pairs`, in order, as far as they fit within the
    /// limits; returns how many were dropped. A name sent twice is kept twice (and
    /// counted): `get` finds the first, as libmilter does, and no search per macro makes
    /// a frame of many thousand names slow.
    fn set(&mut self, stage: usize, pairs: Vec<(String, String)>, limits: &MilterLimits) -> usize {
        self.clear_stage(stage);
        self.connect_sent |= stage == stage::CONNECT as usize;
        let mut dropped = 0;
        let mut kept = Vec::new();
        for (name, value) in pairs {
            let name = if macro_name(&name).len() == name.len() {
                name
            } else {
                macro_name(&name).to_string()
            };
            let bytes = macro_bytes(&name, &value);
            if self.count >= limits.max_macros || self.bytes + bytes > limits.max_macro_bytes {
                dropped += 1;
                continue;
            }
            self.count += 1;
            self.bytes += bytes;
            kept.push((name, value));
        }
        kept.shrink_to_fit();
        self.stages[stage] = kept;
        dropped
    }

    fn clear_stage(&mut self, stage: usize) {
        for (n, v) in std::mem::take(&mut self.stages[stage]) {
            self.count -= 1;
            self.bytes -= macro_bytes(&n, &v);
        }
    }

    /// Forgets the macros of the stages after `stage` (libmilter's `mi_clr_macros`).
    fn clear_after(&mut self, stage: u32) {
        for s in stage as usize + 1..STAGES {
            self.clear_stage(s);
        }
    }

    /// A new SMTP session (connect info): only the connect macros sent for it stay. An MTA
    /// that sends none this time must not find the last client's.
    fn new_session(&mut self) {
        if !std::mem::take(&mut self.connect_sent) {
            self.clear_stage(stage::CONNECT as usize);
        }
        self.clear_after(stage::CONNECT);
    }

    /// A macro's value: the latest stage's, the first of a name within a stage.
    fn get(&self, name: &str) -> Option<&str> {
        self.stages
            .iter()
            .rev()
            .flat_map(|pairs| pairs.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether a command moves the SMTP session on. Only these restart the idle timer and mark
/// the connection busy: macros come before the command they belong to, negotiation happens
/// once, and the steps greygate asked to skip carry nothing it uses — a client repeating
/// any of them shows no sign of a session, and must not hold its connection by it.
fn advances_session(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Connect { .. }
            | Command::Helo(_)
            | Command::Mail(_)
            | Command::Rcpt(_)
            | Command::EndOfMessage(_)
            | Command::Abort
            | Command::Quit
            | Command::QuitNewConnection
    )
}

/// Serves one milter connection until the MTA quits, a frame is bad, a timeout, or it is
/// closed to make room (`slot`).
pub async fn serve_connection<S: Io>(mut stream: S, peer: &str, ctx: &MilterContext, slot: &Slot) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut session = Session::default();
    let mut frame_deadline: Option<Instant> = None;
    // Set at the connect and after each command that moves the session on.
    let mut idle_deadline = Instant::now() + ctx.limits.idle_timeout;
    let (shutdown, hard_stop) = ctx.stops.waits();
    let evicted = slot.evicted();
    tokio::pin!(shutdown, hard_stop, evicted);
    loop {
        let mut start = 0;
        let mut stop = None;
        let mut advanced = false;
        loop {
            match decode_command(&buf[start..], ctx.limits.max_frame) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame(cmd, used)) => {
                    start += used;
                    frame_deadline = None;
                    if advances_session(&cmd) {
                        if !slot.begin() {
                            // Closed to make room just before the command came in.
                            tracing::debug!(peer, "milter connection closed to make room");
                            return;
                        }
                        advanced = true;
                    }
                    match step(&mut session, cmd, ctx, peer).await {
                        Step::Reply(replies) => replies.iter().for_each(|r| r.encode(&mut out)),
                        Step::Quiet => {}
                        Step::Close(why) => {
                            stop = Some(why);
                            break;
                        }
                    }
                }
                Err(e) => {
                    stop = Some(Err(e));
                    break;
                }
            }
        }
        buf.drain(..start);
        // One big frame (up to max_frame) must not leave its buffer with the connection
        // for good: hundreds of idle connections would each keep up to twice max_frame.
        if buf.capacity() > KEEP_BUFFER * 4 && buf.len() <= KEEP_BUFFER {
            buf.shrink_to(KEEP_BUFFER);
        }
        if !out.is_empty() {
            match tokio::time::timeout(ctx.limits.io_timeout, stream.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => {
                    tracing::debug!(peer, error = %e, "milter write failed; closing connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        peer,
                        "MTA did not take a milter reply within io_timeout; closing connection"
                    );
                    return;
                }
            }
        }
        if advanced {
            let now = Instant::now();
            slot.done(now);
            idle_deadline = now + ctx.limits.idle_timeout;
        }
        match stop {
            Some(Ok(reason)) => {
                tracing::debug!(peer, reason, "milter connection closed");
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(peer, error = %e, "malformed milter frame; closing connection");
                return;
            }
            None => {}
        }
        let mid_frame = !buf.is_empty();
        let deadline = if mid_frame {
            *frame_deadline.get_or_insert_with(|| Instant::now() + ctx.limits.io_timeout)
        } else {
            idle_deadline
        };
        let read = tokio::select! {
            // Stopping first: a client that never stops sending must not hold it up.
            biased;
            () = &mut hard_stop => return,
            () = &mut shutdown, if !mid_frame && session.sender.is_none() => return,
            () = &mut evicted => {
                tracing::debug!(peer, "milter connection closed to make room for a new one");
                return;
            }
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => r,
        };
        match read {
            Ok(Ok(0)) => {
                if mid_frame {
                    tracing::warn!(peer, "milter connection closed in the middle of a frame");
                }
                return;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                tracing::debug!(peer, error = %e, "milter read failed; closing connection");
                return;
            }
            Err(_) if mid_frame => {
                tracing::warn!(
                    peer,
                    "milter frame not completed within io_timeout; closing connection"
                );
                return;
            }
            Err(_) => {
                tracing::debug!(peer, "idle milter connection closed");
                return;
            }
        }
    }
}

/// The connect callback's host name as (`client_name`, `reverse_client_name`) in the
/// policy front end's terms.
///
/// Postfix passes its forward-confirmed `client_name` or `unknown`; Sendmail passes the PTR
/// name, or `[192.0.2.1]` when there is none, and says in `{client_resolve}` whether the
/// name was confirmed (`OK`) or not (`FORGED`, `FAIL`, `TEMP`). `{client_ptr}`, when sent,
/// is the unconfirmed PTR name. Without either macro an unnamed client's reverse name stays
/// unknown (empty): no `org:` identity, unless `[dns] ptr_lookup` looks the name up.
fn connect_names(
    hostname: String,
    client_ptr: Option<&str>,
    client_resolve: Option<&str>,
) -> (String, String) {
    let unnamed = hostname.is_empty() || hostname.starts_with('[') || hostname == "unknown";
    let confirmed = client_resolve.is_none_or(|r| r.eq_ignore_ascii_case("OK"));
    let ptr = client_ptr.filter(|p| !p.is_empty() && !p.starts_with('['));
    match (unnamed, confirmed) {
        (false, true) => (hostname.clone(), ptr.unwrap_or(&hostname).to_string()),
        // Sendmail names a client whose PTR did not confirm: the name is only a PTR name.
        (false, false) => ("unknown".into(), hostname),
        (true, _) => {
            let reverse = match (ptr, client_resolve) {
                (Some(p), _) => p.to_string(),
                // The MTA looked and found no name.
                (None, Some(_)) => "unknown".into(),
                (None, None) => String::new(),
            };
            ("unknown".into(), reverse)
        }
    }
}

enum Step {
    Reply(Vec<Reply>),
    /// Commands without a reply (macros, abort).
    Quiet,
    /// End the connection: `Ok(reason)` normally, `Err` for a protocol violation.
    Close(Result<&'static str, DecodeError>),
}

fn cont() -> Step {
    Step::Reply(vec![Reply::Continue])
}

async fn step(s: &mut Session, cmd: Command, ctx: &MilterContext, peer: &str) -> Step {
    match cmd {
        Command::OptNeg {
            version,
            actions,
            protocol: offered,
        } => {
            if version < 2 {
                return Step::Close(Err(DecodeError::Malformed {
                    command: b'O',
                    reason: "milter protocol version below 2",
                }));
            }
            let want = action::ADD_HEADERS | action::SET_SYMLIST;
            let actions = want & actions;
            // Ask for the client's PTR name and how it resolved at connect (DNS facts need
            // no lookup of their own then), the TLS version after HELO (sent again after
            // STARTTLS's new HELO), the SASL login with MAIL, and the queue id for logs, if
            // the MTA lets us.
            let macros = if actions & action::SET_SYMLIST != 0 {
                vec![
                    (stage::CONNECT, "{client_ptr} {client_resolve}".to_string()),
                    (stage::HELO, "{tls_version}".to_string()),
                    (stage::ENVFROM, "{auth_authen} i".to_string()),
                ]
            } else {
                Vec::new()
            };
            Step::Reply(vec![Reply::OptNeg {
                version: version.min(VERSION),
                actions,
                protocol: SKIPPED_STEPS & offered,
                macros,
            }])
        }
        Command::Macros { for_cmd, pairs } => {
            // libmilter ignores macros for other commands; greygate reads none there.
            if let Some(stage) = macro_stage(for_cmd) {
                let dropped = s.macros.set(stage, pairs, &ctx.limits);
                if dropped > 0 && !s.macros_over_limit_logged {
                    // Once per connection: the peer decides how often it overflows.
                    s.macros_over_limit_logged = true;
                    tracing::warn!(
                        peer,
                        dropped,
                        max_macros = ctx.limits.max_macros,
                        max_macro_bytes = ctx.limits.max_macro_bytes,
                        "milter macros over the connection's limits were dropped"
                    );
                }
            }
            Step::Quiet
        }
        Command::Connect {
            hostname, address, ..
        } => {
            let mut macros = std::mem::take(&mut s.macros);
            macros.new_session();
            *s = Session {
                macros,
                macros_over_limit_logged: s.macros_over_limit_logged,
                ..Session::default()
            };
            s.client_ip = address.parse().ok();
            let (name, reverse) = connect_names(
                hostname,
                s.macros.get("client_ptr"),
                s.macros.get("client_resolve"),
            );
            s.client_name = name;
            s.reverse_client_name = reverse;
            cont()
        }
        Command::Helo(h) => {
            s.macros.clear_after(stage::HELO);
            s.helo = h;
            cont()
        }
        Command::Mail(args) => {
            s.macros.clear_after(stage::ENVFROM);
            s.new_message();
            s.sender = Some(strip_envelope(&args[0]).to_string());
            cont()
        }
        Command::Rcpt(args) => {
            s.macros.clear_after(stage::ENVRCPT);
            let req = Request {
                stage: "RCPT".into(),
                client_ip: s.client_ip,
                client_name: s.client_name.clone(),
                helo: s.helo.clone(),
                sender: s.sender.clone().unwrap_or_default(),
                recipient: strip_envelope(&args[0]).to_string(),
                sasl_username: s.macros.get("auth_authen").unwrap_or_default().to_string(),
                reverse_client_name: s.reverse_client_name.clone(),
                facts: None,
                tls: s.macros.get("tls_version").is_some_and(|v| !v.is_empty()),
            };
            let outcome = ctx.svc.check(&req, unix_now()).await;
            if outcome.enforced
                && let Some(by) = outcome.decision.delayed
            {
                s.delayed = Some(s.delayed.map_or(by, |d| d.max(by)));
            }
            Step::Reply(vec![
                ctx.replies
                    .load()
                    .milter_deferral(&outcome)
                    .map_or(Reply::Continue, Reply::ReplyCode),
            ])
        }
        Command::EndOfMessage(_) => {
            let mut replies = Vec::new();
            let replies_now = ctx.replies.load();
            if let (Some(by), Some(host)) = (s.delayed, &replies_now.header_host) {
                let line = x_greylist(by, host, unix_now());
                let value = line.strip_prefix("X-Greylist: ").unwrap_or(&line);
                replies.push(Reply::AddHeader {
                    name: "X-Greylist".into(),
                    value: value.to_string(),
                });
            }
            replies.push(Reply::Continue);
            // The message is over, as at an abort: its macros go.
            s.macros.clear_after(stage::HELO);
            s.new_message();
            Step::Reply(replies)
        }
        Command::Abort => {
            // The message is over (RSET, or before QUIT); the session goes on, with its
            // connect and HELO macros. Its MAIL and later macros go now rather than at the
            // next MAIL.
            s.macros.clear_after(stage::HELO);
            s.new_message();
            Step::Quiet
        }
        Command::Header { .. }
        | Command::EndOfHeaders
        | Command::Data
        | Command::Body(_)
        | Command::Unknown(_) => cont(),
        Command::Quit => Step::Close(Ok("MTA quit")),
        Command::QuitNewConnection => {
            // Every macro goes with the session (the next one sends its own).
            *s = Session {
                macros_over_limit_logged: s.macros_over_limit_logged,
                ..Session::default()
            };
            Step::Quiet
        }
    }
}

#[cfg(test)]
mod tests;
