//! One client session of the SMTP front: banner and pregreet test, then commands in order
//! (pipelined replies go out together once no command is left buffered, RFC 2920), with
//! RCPT decided by the shared service and relayed to the backend when it passes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use smtp_proto::Request as Command;
use tokio::time::Instant;

use super::backend::{Backend, BackendError, ClientFacts, Reply};
use super::wire::{Client, DataScan, Line, Normalize, ReadError, Tarpit};
use super::{PregreetAction, SmtpContext};
use crate::engine::identity::{IdentityFacts, Listing};
use crate::engine::normalize::client_group;
use crate::engine::{Classified, ListKind, Request, Target, Verdict};
use crate::server::Io;
use crate::server::replies::{write_date, x_greylist};
use crate::server::slots::Slot;
use crate::service::unix_now;

/// Longest wait for a reply to be taken by the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Slowest message data taken (Postfix's `smtpd_min_data_rate`): a DATA or BDAT phase
/// may last `data_timeout` plus one second per this many bytes, however it trickles in.
const MIN_DATA_RATE: u64 = 500;

/// A MAIL parameter that asks for what greygate did not offer and cannot pass on as asked:
/// binary content, onward TLS, a delivery deadline or a hold, or SMTPUTF8 when the backend
/// did not offer it. Dropping one would relay the message against its sender's terms, so
/// it is refused (RFC 5321 §4.1.1.11: 555). DSN's parameters, also unoffered, only ask
/// for notices: they are passed over, and the backend's own DSN rules apply.
fn unoffered(from: &smtp_proto::MailFrom<String>, smtputf8_offered: bool) -> Option<&'static str> {
    use smtp_proto::{
        MAIL_BODY_BINARYMIME, MAIL_BY_NOTIFY, MAIL_BY_RETURN, MAIL_BY_TRACE, MAIL_REQUIRETLS,
        MAIL_SMTPUTF8,
    };
    if from.flags & MAIL_BODY_BINARYMIME != 0 {
        Some("BODY=BINARYMIME")
    } else if from.flags & MAIL_REQUIRETLS != 0 {
        Some("REQUIRETLS")
    } else if from.flags & MAIL_SMTPUTF8 != 0 && !smtputf8_offered {
        Some("SMTPUTF8")
    } else if from.by != 0 || from.flags & (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE) != 0 {
        Some("BY")
    } else if from.hold_for != 0 || from.hold_until != 0 {
        Some("HOLDFOR/HOLDUNTIL")
    } else {
        None
    }
}

/// The address as an SMTP path (RFC 5321 §4.1.2) between `<>`: `smtp-proto` hands over a
/// quoted local part unquoted, so it is quoted again when it is not a dot-atom (a
/// `"john smith"@example.org` stays one). `None` for what no path may hold: control
/// characters, or brackets and quotes in the domain — the backend must get the very
/// address the engine decided on, never one that reads as more parameters.
fn path(address: &str) -> Option<String> {
    if address.chars().any(|c| c.is_control()) {
        return None;
    }
    let (local, domain) = match address.rfind('@') {
        Some(at) => (&address[..at], Some(&address[at + 1..])),
        None => (address, None),
    };
    if let Some(d) = domain
        && (d.is_empty() || d.contains(['<', '>', '"', '\\', ' ', '(', ')', ',', ';', '@']))
    {
        return None;
    }
    let atext = |c: char| c.is_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| c == '.' || atext(c));
    let mut out = String::with_capacity(address.len() + 2);
    if dot_atom || local.is_empty() {
        out.push_str(local);
    } else {
        out.push('"');
        for c in local.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    if let Some(d) = domain {
        out.push('@');
        out.push_str(d);
    }
    Some(out)
}

/// The command line's path is `<postmaster>` (which `smtp-proto` reads as empty).
fn names_postmaster(line: &[u8]) -> bool {
    let Some(open) = memchr::memchr(b'<', line) else {
        return false;
    };
    let rest = &line[open + 1..];
    memchr::memchr(b'>', rest)
        .is_some_and(|close| rest[..close].eq_ignore_ascii_case(b"postmaster"))
}

/// MAIL, RCPT, DATA, BDAT and STARTTLS: the commands that take a message (or the session's
/// security) a step further.
fn moves_a_message_on(line: &[u8]) -> bool {
    let verb = line.get(..4).unwrap_or(line);
    [&b"MAIL"[..], b"RCPT", b"DATA", b"BDAT", b"STAR"]
        .iter()
        .any(|v| verb.eq_ignore_ascii_case(v))
}

/// How long message data of `size` bytes so far may have taken.
fn data_allowance(data_timeout: Duration, size: u64) -> Duration {
    data_timeout + Duration::from_secs(size / MIN_DATA_RATE)
}

/// The reply when the backend session broke in mid-transaction.
const BACKEND_LOST: &str = "451 4.4.2 Connection to the mail server lost, try again later\r\n";
/// Message data gathered before it is written to the backend (the rest at its end).
const DATA_WRITE: usize = 32 * 1024;
/// Bytes of a BDAT chunk relayed at once.
const BDAT_PIECE: usize = 64 * 1024;

/// The message in progress.
#[derive(Default)]
struct Transaction {
    /// `MAIL FROM` as the backend gets it (address and the parameters passed on).
    mail_line: String,
    sender: String,
    /// Recipients the engine passed and the backend accepted.
    accepted: usize,
    /// RCPT commands in this transaction.
    recipients: usize,
    /// The backend has the MAIL command.
    backend_has_mail: bool,
    /// The backend session broke after accepting recipients: the message cannot go on.
    broken: bool,
    /// Longest greylisting delay a recipient of this message just served.
    delayed: Option<u64>,
    /// BDAT chunks sent (the trace headers go before the first).
    chunks: usize,
    /// Message bytes so far (DATA or BDAT).
    size: u64,
}

struct Session<'a> {
    ctx: &'a SmtpContext,
    client: Client,
    peer: SocketAddr,
    local: SocketAddr,
    group: String,
    helo: Option<String>,
    esmtp: bool,
    /// SMTPUTF8 was in the EHLO reply (the backend offered it then).
    smtputf8_offered: bool,
    /// Protocol and cipher once STARTTLS is done.
    tls: Option<String>,
    suspect: bool,
    tx: Option<Transaction>,
    backend: Option<Backend>,
    /// The backend session was opened for this transaction (not kept from an earlier one
    /// of this client or another): if it fails, a fresh one would fail as well.
    backend_fresh: bool,
    commands: usize,
    errors: usize,
}

/// What a session offers beyond the fixed extensions: SMTPUTF8 and CHUNKING as the
/// backend offered them at its last session, STARTTLS with a certificate and no TLS yet.
struct Offered {
    smtputf8: bool,
    chunking: bool,
    starttls: bool,
}

/// How a session ended, for the log.
enum End {
    Quit,
    Closed(String),
}

/// Serves one SMTP client. `local` is the address it connected to, when the PROXY protocol
/// needs it (otherwise unspecified, `0.0.0.0:0`).
pub async fn serve_connection<S: Io + 'static>(
    stream: S,
    peer: &str,
    local: Option<SocketAddr>,
    ctx: &SmtpContext,
    slot: &Slot,
) {
    let Ok(peer) = peer.parse::<SocketAddr>() else {
        tracing::warn!(peer, "SMTP front: not a TCP client; closing");
        return;
    };
    let local = local.unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
    let now = unix_now();
    let live = ctx.svc.live();
    let p = &live.engine.policy;
    let group = client_group(peer.ip(), p.ipv4_prefix, p.ipv6_prefix);
    drop(live);
    let stats = &ctx.svc.metrics.smtp;
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    let mut s = Session {
        ctx,
        client: Client::new(Box::new(stream)),
        peer,
        local,
        suspect: ctx.guard.is_suspect(&group, now),
        group,
        helo: None,
        esmtp: false,
        smtputf8_offered: false,
        tls: None,
        tx: None,
        backend: None,
        backend_fresh: false,
        commands: 0,
        errors: 0,
    };
    if s.suspect {
        s.start_tarpit();
    }
    // The hard stop ends a session wherever it is: in message data, waiting on the
    // backend, writing a tarpitted reply (the command loop also watches it between
    // commands, to say goodbye).
    let hard_stop = ctx.stops.hard_stop.clone();
    let end = tokio::select! {
        end = s.run(slot) => end,
        () = hard_stop.cancelled() => End::Closed("shutting down".into()),
    };
    if let Some(b) = s.backend.take() {
        s.release(b).await;
    }
    match end {
        End::Quit => tracing::debug!(peer = %s.peer, "SMTP session ended"),
        End::Closed(why) => tracing::info!(peer = %s.peer, "SMTP session closed: {why}"),
    }
}

impl Session<'_> {
    async fn run(&mut self, slot: &Slot) -> End {
        if let Some(end) = self.greet().await {
            return end;
        }
        let (shutdown, hard_stop) = self.ctx.stops.waits();
        let evicted = slot.evicted();
        tokio::pin!(shutdown, hard_stop, evicted);
        let limits = &self.ctx.config.limits;
        // The banner counts as the connection's first progress.
        let mut progressed = true;
        loop {
            if !self.client.has_line() {
                if let Err(e) = self.client.flush(WRITE_TIMEOUT).await {
                    return End::Closed(format!("reply not taken: {e}"));
                }
                if std::mem::take(&mut progressed) {
                    slot.done(Instant::now());
                }
                // Between commands a session keeps a small buffer, whatever it read before.
                self.client.shrink();
            }
            let line = tokio::select! {
                biased;
                () = &mut hard_stop => return End::Closed("shutting down".into()),
                () = &mut shutdown, if !self.client.has_line() => {
                    return self.close("421 4.3.2 Service shutting down, try again later\r\n", "shutting down").await;
                }
                () = &mut evicted => {
                    return self.close("421 4.7.0 Too many connections, try again later\r\n", "closed to make room").await;
                }
                r = self.client.line(limits.max_line_length, limits.command_timeout) => r,
            };
            let line = match line {
                Ok(l) => l,
                Err(ReadError::Timeout) => {
                    return self
                        .close(
                            "421 4.4.2 Timeout waiting for a command\r\n",
                            "client timed out",
                        )
                        .await;
                }
                Err(e) => return End::Closed(e.to_string()),
            };
            // Only commands that move a message on are progress for the slots (NOOP, RSET,
            // HELP or junk every second must not keep a connection from being closed to
            // make room), and only they keep it from being closed while answered.
            if let Line::Complete(l) = &line
                && moves_a_message_on(l)
            {
                if !slot.begin() {
                    return End::Closed("closed to make room".into());
                }
                progressed = true;
            }
            self.commands += 1;
            if self.commands > limits.max_commands {
                return self
                    .close("421 4.7.0 Too many commands\r\n", "too many commands")
                    .await;
            }
            let line = match line {
                Line::Complete(l) => l,
                Line::TooLong => {
                    self.error("500 5.5.2 Line too long\r\n");
                    if let Some(end) = self.too_many_errors().await {
                        return end;
                    }
                    continue;
                }
            };
            match self.command(&line).await {
                Ok(Some(end)) => return end,
                Ok(None) => {}
                Err(e) => return End::Closed(e.to_string()),
            }
            if let Some(end) = self.too_many_errors().await {
                return end;
            }
        }
    }

    /// The banner, with the pregreet test when it applies. `Some` ends the session.
    async fn greet(&mut self) -> Option<End> {
        let cfg = &self.ctx.config;
        let host = &cfg.hostname;
        let now = unix_now();
        let ip = self.peer.ip();
        let wait = cfg.pregreet.wait;
        if wait.is_zero() || self.ctx.guard.has_passed(ip, now) {
            self.client.reply(&format!("220 {host} ESMTP\r\n"));
            return None;
        }
        self.client.reply(&format!("220-{host} ESMTP\r\n"));
        if let Err(e) = self.client.flush(WRITE_TIMEOUT).await {
            return Some(End::Closed(format!("banner not taken: {e}")));
        }
        let talked = match self.client.talks_within(wait).await {
            Ok(t) => t,
            Err(e) => return Some(End::Closed(format!("during the banner: {e}"))),
        };
        if !talked {
            let until = now.saturating_add(cfg.pregreet.pass_for.as_secs());
            self.ctx.guard.passed(ip, until, now);
            self.client.reply(&format!("220 {host} ESMTP\r\n"));
            return None;
        }
        // Spoke before the banner ended: a bot that does not wait for replies.
        self.ctx
            .svc
            .metrics
            .smtp
            .pregreets
            .fetch_add(1, Ordering::Relaxed);
        let until = now.saturating_add(cfg.pregreet.suspect_for.as_secs());
        self.ctx.guard.suspect(&self.group, until, now);
        let said = String::from_utf8_lossy(
            &self.client.buffered()[..self.client.buffered().len().min(64)],
        )
        .into_owned();
        let (reply, action) = match cfg.pregreet.action {
            PregreetAction::Reject => (
                format!("554 5.5.1 {host} Protocol error: talked before the greeting\r\n"),
                "reject",
            ),
            PregreetAction::Defer => (
                format!("421 4.7.1 {host} Service temporarily unavailable, try again later\r\n"),
                "defer",
            ),
        };
        tracing::info!(
            rule = "pregreet", client = %ip, group = %self.group, action, said = ?said,
            suspect_for = ?cfg.pregreet.suspect_for,
            "client spoke before the banner ended"
        );
        Some(self.close(&reply, "pregreet").await)
    }

    /// Sends a last reply and ends the session.
    async fn close(&mut self, reply: &str, why: &str) -> End {
        self.client.reply(reply);
        let _ = self.client.flush(Duration::from_secs(5)).await;
        End::Closed(why.to_string())
    }

    /// Passes a backend reply on to the client as it is.
    fn relay(&mut self, r: &Reply) {
        let mut out = String::new();
        r.write_to(&mut out);
        self.client.reply(&out);
    }

    fn error(&mut self, reply: &str) {
        self.errors += 1;
        self.client.reply(reply);
    }

    async fn too_many_errors(&mut self) -> Option<End> {
        if self.errors < self.ctx.config.limits.max_errors {
            return None;
        }
        self.ctx
            .svc
            .metrics
            .smtp
            .error_disconnects
            .fetch_add(1, Ordering::Relaxed);
        Some(
            self.close(
                "421 4.7.0 Too many errors, closing connection\r\n",
                "too many errors",
            )
            .await,
        )
    }

    /// Tarpits the rest of the session, if the tarpit is on and has room.
    fn start_tarpit(&mut self) {
        let rate = self.ctx.config.tarpit.rate;
        if rate == 0 || self.client.tarpit.is_some() {
            return;
        }
        if let Ok(permit) = self.ctx.guard.tarpit.clone().try_acquire_owned() {
            self.ctx
                .svc
                .metrics
                .smtp
                .tarpitted
                .fetch_add(1, Ordering::Relaxed);
            self.client.tarpit = Some(Tarpit {
                rate,
                _permit: permit,
            });
        }
    }

    /// Answers one command line. `Ok(Some)` ends the session; `Err` is a failure to
    /// talk to the client.
    async fn command(&mut self, line: &[u8]) -> std::io::Result<Option<End>> {
        let parsed = Command::parse(&mut line.iter());
        let cmd = match parsed {
            Ok(c) => c.into_owned(),
            Err(e) => {
                let reply = match e {
                    smtp_proto::Error::UnknownCommand => {
                        "500 5.5.2 Command unrecognized\r\n".into()
                    }
                    smtp_proto::Error::InvalidSenderAddress => {
                        "501 5.1.7 Bad sender address syntax\r\n".into()
                    }
                    smtp_proto::Error::InvalidRecipientAddress => {
                        "501 5.1.3 Bad recipient address syntax\r\n".into()
                    }
                    smtp_proto::Error::SyntaxError { syntax } => {
                        format!("501 5.5.4 Syntax: {syntax}\r\n")
                    }
                    smtp_proto::Error::InvalidParameter { param } => {
                        format!("501 5.5.4 Invalid parameter {param}\r\n")
                    }
                    smtp_proto::Error::UnsupportedParameter { param } => {
                        let param: String = param.chars().take(64).collect();
                        format!("555 5.5.4 Unsupported parameter {param:?}\r\n")
                    }
                    _ => "500 5.5.2 Syntax error\r\n".into(),
                };
                self.error(&reply);
                return Ok(None);
            }
        };
        match cmd {
            Command::Ehlo { host } => self.hello(host, true),
            Command::Helo { host } => self.hello(host, false),
            Command::Mail { mut from } => {
                if from.address.is_empty() && names_postmaster(line) {
                    from.address = "postmaster".into();
                }
                match path(&from.address) {
                    Some(_) => self.mail(from),
                    None => self.error("553 5.1.7 Sender address not accepted here\r\n"),
                }
            }
            Command::Rcpt { to } => {
                let address = match to.address.as_str() {
                    "" if names_postmaster(line) => "postmaster".to_string(),
                    "" => {
                        self.error("501 5.1.3 Bad recipient address syntax\r\n");
                        return Ok(None);
                    }
                    _ => to.address,
                };
                match path(&address) {
                    Some(_) => self.rcpt(address).await,
                    None => self.error("553 5.1.3 Recipient address not accepted here\r\n"),
                }
            }
            Command::Data => self.data().await?,
            Command::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last).await,
            Command::Rset => {
                self.reset_transaction().await;
                self.client.reply("250 2.0.0 Ok\r\n");
            }
            Command::Noop { .. } => self.client.reply("250 2.0.0 Ok\r\n"),
            Command::Quit => {
                self.client.reply("221 2.0.0 Bye\r\n");
                self.client.flush(WRITE_TIMEOUT).await?;
                return Ok(Some(End::Quit));
            }
            Command::StartTls => return self.starttls().await,
            Command::Vrfy { .. } => self.client.reply(
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
            ),
            Command::Help { .. } => {
                let offered = self.offered();
                let bdat = if offered.chunking { " BDAT" } else { "" };
                let starttls = if offered.starttls { " STARTTLS" } else { "" };
                self.client.reply(&format!(
                    "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA{bdat} RSET NOOP QUIT{starttls}\r\n"
                ));
            }
            Command::Auth { .. } => {
                self.error("502 5.5.1 AUTH not available: this is a mail exchanger\r\n")
            }
            Command::Expn { .. }
            | Command::Etrn { .. }
            | Command::Atrn { .. }
            | Command::Burl { .. }
            | Command::Lhlo { .. } => self.error("502 5.5.1 Command not implemented\r\n"),
        }
        Ok(None)
    }

    /// The extensions offered now beyond the fixed ones, for the EHLO reply and HELP.
    fn offered(&self) -> Offered {
        Offered {
            smtputf8: self.ctx.guard.backend_smtputf8.load(Ordering::Relaxed),
            chunking: self.ctx.guard.backend_chunking.load(Ordering::Relaxed),
            starttls: self.tls.is_none() && self.ctx.tls.load().is_some(),
        }
    }

    fn hello(&mut self, host: String, esmtp: bool) {
        // A new greeting is an implicit RSET (RFC 5321 §4.1.4); the backend session, if
        // any, is reset at the next MAIL.
        if let Some(tx) = self.tx.take()
            && tx.backend_has_mail
        {
            self.backend_needs_reset();
        }
        self.helo = Some(host);
        self.esmtp = esmtp;
        self.smtputf8_offered = false;
        let cfg = &self.ctx.config;
        if !esmtp {
            self.client.reply(&format!("250 {}\r\n", cfg.hostname));
            return;
        }
        let mut caps = vec![
            cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", cfg.limits.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        let offered = self.offered();
        if offered.smtputf8 {
            caps.push("SMTPUTF8".into());
        }
        if offered.chunking {
            caps.push("CHUNKING".into());
        }
        if offered.starttls {
            caps.push("STARTTLS".into());
        }
        self.smtputf8_offered = offered.smtputf8;
        let last = caps.len() - 1;
        for (i, c) in caps.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.client.reply(&format!("250{sep}{c}\r\n"));
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            self.error("503 5.5.1 Error: send HELO/EHLO first\r\n");
            return;
        }
        if self.tx.is_some() {
            self.error("503 5.5.1 Error: nested MAIL command\r\n");
            return;
        }
        if let Some(param) = unoffered(&from, self.smtputf8_offered) {
            self.error(&format!("555 5.5.4 Unsupported parameter {param}\r\n"));
            return;
        }
        let max = self.ctx.config.limits.max_message_size;
        if from.size as u64 > max {
            self.client
                .reply("552 5.3.4 Message size exceeds fixed limit\r\n");
            return;
        }
        let mut line = format!("MAIL FROM:<{}>", path(&from.address).unwrap_or_default());
        if from.size > 0 {
            line.push_str(&format!(" SIZE={}", from.size));
        }
        if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            line.push_str(" BODY=8BITMIME");
        } else if from.flags & smtp_proto::MAIL_BODY_7BIT != 0 {
            line.push_str(" BODY=7BIT");
        }
        if from.flags & smtp_proto::MAIL_SMTPUTF8 != 0 {
            line.push_str(" SMTPUTF8");
        }
        self.tx = Some(Transaction {
            mail_line: line,
            sender: from.address,
            ..Transaction::default()
        });
        self.client.reply("250 2.1.0 Ok\r\n");
    }

    async fn rcpt(&mut self, recipient: String) {
        let limits = &self.ctx.config.limits;
        let Some(tx) = self.tx.as_mut() else {
            self.error("503 5.5.1 Error: need MAIL command\r\n");
            return;
        };
        tx.recipients += 1;
        if tx.recipients > limits.max_recipients {
            self.client.reply("452 4.5.3 Too many recipients\r\n");
            return;
        }
        let now = unix_now();
        let ip = self.peer.ip();
        let req = Request {
            stage: "RCPT".into(),
            client_ip: Some(ip),
            client_name: "unknown".into(),
            helo: self.helo.clone().unwrap_or_default(),
            sender: self
                .tx
                .as_ref()
                .map(|t| t.sender.clone())
                .unwrap_or_default(),
            recipient: recipient.clone(),
            sasl_username: String::new(),
            reverse_client_name: String::new(),
            facts: self.suspect.then(|| IdentityFacts {
                dnsbl: Listing {
                    hits: vec!["pregreet".into()],
                    complete: true,
                },
                ..IdentityFacts::default()
            }),
            tls: self.tls.is_some(),
        };
        if self.ctx.guard.traps().catches(&recipient) {
            trapped(self.ctx, self.peer.ip(), &req, now).await;
        }
        let outcome = self.ctx.svc.check(&req, now).await;
        let tx = self.tx.as_mut().expect("checked above");
        if let Some(deferral) = self.ctx.replies.load().milter_deferral(&outcome) {
            self.client.reply(&deferral);
            self.client.reply("\r\n");
            self.start_tarpit();
            return;
        }
        if outcome.enforced
            && let Some(by) = outcome.decision.delayed
        {
            tx.delayed = Some(tx.delayed.map_or(by, |d| d.max(by)));
        }
        match self.relay_rcpt(&recipient).await {
            Ok(reply) if reply.code == 421 => self.backend_closing(reply),
            Ok(reply) => {
                let tx = self.tx.as_mut().expect("still in a transaction");
                if reply.is_positive() {
                    tx.accepted += 1;
                }
                self.relay(&reply);
            }
            Err(e) => {
                self.backend_failed(&e);
                self.client
                    .reply("451 4.4.1 Mail server unavailable, try again later\r\n");
            }
        }
    }

    /// Opens the backend session if needed, gives it the MAIL command if it has not got
    /// it, and the recipient.
    async fn relay_rcpt(&mut self, recipient: &str) -> Result<Reply, BackendError> {
        if self.backend.is_some() {
            // Kept from this session's earlier message.
            self.backend_fresh = false;
        }
        let first = self.tx.as_ref().is_some_and(|t| !t.backend_has_mail);
        let attempt = self.relay_rcpt_once(recipient, false).await;
        // A backend session kept from an earlier message (this client's or another's, in
        // the pool) may have been closed by the backend meanwhile (its idle timeout): with
        // nothing of this message accepted by it yet, open a fresh one and try once more.
        let stale = match &attempt {
            Err(_) => true,
            Ok(r) => r.code == 421,
        };
        if !self.backend_fresh && first && stale {
            tracing::debug!(peer = %self.peer, "kept backend session failed; trying a fresh one");
            if let Some(b) = self.backend.take() {
                tokio::spawn(b.quit());
            }
            if let Some(tx) = self.tx.as_mut() {
                tx.backend_has_mail = false;
            }
            return self.relay_rcpt_once(recipient, true).await;
        }
        attempt
    }

    async fn relay_rcpt_once(
        &mut self,
        recipient: &str,
        fresh: bool,
    ) -> Result<Reply, BackendError> {
        self.ensure_backend(fresh).await?;
        let tx = self.tx.as_mut().expect("in a transaction");
        let backend = self.backend.as_mut().expect("opened");
        let rcpt = format!("RCPT TO:<{}>", path(recipient).unwrap_or_default());
        if !tx.backend_has_mail {
            if tx.mail_line.ends_with(" SMTPUTF8") && !backend.caps.smtputf8 {
                // Offered when the backend last had it; it has not now. Not the sender's
                // fault: try again later rather than the backend's permanent 555.
                return Ok(Reply {
                    code: 451,
                    lines: vec!["4.3.0 SMTPUTF8 not available now, try again later".into()],
                });
            }
            let (mail, rcpt) = if backend.caps.pipelining {
                // One round trip for both; a refused MAIL makes the RCPT fail too.
                let mut r = backend.pipelined(&[&tx.mail_line, &rcpt]).await?;
                let rcpt = r.pop().expect("two replies");
                (r.pop().expect("two replies"), Some(rcpt))
            } else {
                (backend.command(&tx.mail_line).await?, None)
            };
            if !mail.is_positive() {
                // The backend refuses the sender: this recipient gets its answer.
                return Ok(mail);
            }
            tx.backend_has_mail = true;
            if let Some(r) = rcpt {
                return Ok(r);
            }
        }
        backend.command(&rcpt).await
    }

    /// A backend session for this client: the one it has, one from the pool (unless
    /// `fresh`) told who the client is, or a new one.
    async fn ensure_backend(&mut self, fresh: bool) -> Result<(), BackendError> {
        if self.backend.is_some() {
            return Ok(());
        }
        let cfg = &self.ctx.config;
        let Some(target) = &cfg.backend else {
            return Err(BackendError::Malformed("no backend configured".into()));
        };
        let facts = ClientFacts {
            addr: self.peer,
            local: self.local,
            name: None,
            helo: self.helo.clone().unwrap_or_default(),
            esmtp: self.esmtp,
        };
        if !fresh && let Some(b) = self.pooled(&facts).await {
            self.svc_stats()
                .backend_reuses
                .fetch_add(1, Ordering::Relaxed);
            self.backend = Some(b);
            self.backend_fresh = false;
            return Ok(());
        }
        let b = Backend::open(target, &cfg.backend_options, &cfg.hostname, &facts).await?;
        self.ctx.guard.learn_backend(&b.caps);
        self.svc_stats()
            .backend_connections
            .fetch_add(1, Ordering::Relaxed);
        self.backend = Some(b);
        self.backend_fresh = true;
        Ok(())
    }

    /// A backend session from the pool, told by XCLIENT who this client is (when the
    /// backend offers it and it is wanted; pooled sessions never named a client, see
    /// `release`). One whose XCLIENT fails is closed; one refused XCLIENT sees greygate's
    /// address, as a new one would.
    async fn pooled(&mut self, facts: &ClientFacts) -> Option<Backend> {
        let mut b = self.ctx.pool.take()?;
        let opts = &self.ctx.config.backend_options;
        if !opts.xclient || b.caps.xclient.is_empty() {
            return Some(b);
        }
        match b.introduce(&self.ctx.config.hostname, facts).await {
            Ok(true) => Some(b),
            // Never told another client's address: it sees greygate's, as a new one would.
            Ok(false) if !b.introduced => Some(b),
            Ok(false) => {
                tokio::spawn(b.quit());
                None
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "pooled backend session failed at XCLIENT; opening a fresh one");
                None
            }
        }
    }

    fn svc_stats(&self) -> &crate::metrics::SmtpStats {
        &self.ctx.svc.metrics.smtp
    }

    /// Gives the backend session back to the pool when the session ends, reset if it
    /// holds a transaction; closes it when shutting down or when it cannot be reset.
    async fn release(&mut self, mut b: Backend) {
        let stopping =
            self.ctx.stops.shutdown.is_cancelled() || self.ctx.stops.hard_stop.is_cancelled();
        // A session that named its client by XCLIENT stays that client's: Postfix checks
        // `smtpd_authorized_xclient_hosts` against the address it was last told, so it
        // refuses a second XCLIENT on the connection, and the next client would be
        // logged and checked as this one.
        if stopping || b.introduced || !self.ctx.pool.enabled() {
            b.quit().await;
            return;
        }
        let in_tx = self.tx.take().is_some_and(|t| t.backend_has_mail);
        if in_tx {
            // As long as a QUIT may take: a slow backend is not worth keeping.
            let reset = tokio::time::timeout(Duration::from_secs(5), b.reset()).await;
            if !matches!(reset, Ok(Ok(()))) {
                b.quit().await;
                return;
            }
        }
        self.ctx.pool.put(b);
    }

    fn backend_failed(&mut self, e: &BackendError) {
        self.ctx
            .svc
            .metrics
            .smtp
            .backend_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %self.peer, backend = ?self.ctx.config.backend, error = %e, "SMTP front: backend unavailable; client told to try again later");
        self.backend = None;
        if let Some(tx) = self.tx.as_mut() {
            // Recipients it accepted are gone with it.
            tx.broken = tx.accepted > 0;
            tx.backend_has_mail = false;
        }
    }

    /// The backend answered `421`: it is closing its session. Not its answer to the
    /// client's command but the loss of the backend: the client may try again later, on
    /// this connection or another.
    fn backend_closing(&mut self, reply: Reply) {
        self.backend_failed(&BackendError::Refused(reply));
        self.client.reply(BACKEND_LOST);
    }

    /// The backend is in a transaction that is over on the client's side.
    fn backend_needs_reset(&mut self) {
        // Simplest and always right: the next message opens a fresh backend session.
        if let Some(b) = self.backend.take() {
            tokio::spawn(b.quit());
        }
    }

    async fn reset_transaction(&mut self) {
        if let Some(tx) = self.tx.take()
            && tx.backend_has_mail
            && let Some(b) = self.backend.as_mut()
        {
            match b.command("RSET").await {
                Ok(r) if r.is_positive() => {}
                _ => self.backend_needs_reset(),
            }
        }
    }

    /// Checks that the transaction can take message data (by DATA, or a BDAT chunk: the
    /// first or a later one); the error reply otherwise.
    fn ready_for_data(&self, bdat: bool) -> Result<(), &'static str> {
        match &self.tx {
            None => Err("503 5.5.1 Error: need MAIL command\r\n"),
            Some(tx) if tx.broken => Err(BACKEND_LOST),
            // RFC 3030 §2: DATA after BDAT in one transaction is an error.
            Some(tx) if tx.chunks > 0 && !bdat => {
                Err("503 5.5.1 Error: BDAT already began this message\r\n")
            }
            Some(tx) if tx.accepted == 0 => Err("554 5.5.1 Error: no valid recipients\r\n"),
            Some(_) if self.backend.is_none() => Err(BACKEND_LOST),
            Some(_) => Ok(()),
        }
    }

    /// The trace headers greygate adds in front of the message.
    fn trace_headers(&self) -> String {
        let cfg = &self.ctx.config;
        let ip = self.peer.ip();
        // The client's words go into a header: printable ASCII only.
        let helo: String = self
            .helo
            .as_deref()
            .unwrap_or("unknown")
            .chars()
            .take(255)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        let proto = match (self.esmtp, self.tls.is_some()) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let tls = self
            .tls
            .as_deref()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        let now = unix_now();
        // RFC 5321's address literal: `[192.0.2.1]`, `[IPv6:2001:db8::1]`.
        let v6 = if ip.is_ipv6() { "IPv6:" } else { "" };
        let mut h = format!(
            "Received: from {helo} (unknown [{v6}{ip}])\r\n\tby {} (greygate) with {proto}{tls};\r\n\t",
            cfg.hostname
        );
        write_date(&mut h, now);
        h.push_str("\r\n");
        if let (Some(by), Some(host)) = (
            self.tx.as_ref().and_then(|t| t.delayed),
            &self.ctx.replies.load().header_host,
        ) {
            h.push_str(&x_greylist(by, host, now));
            h.push_str("\r\n");
        }
        h
    }

    async fn data(&mut self) -> std::io::Result<()> {
        if let Err(reply) = self.ready_for_data(false) {
            self.error(reply);
            return Ok(());
        }
        let headers = self.trace_headers();
        // The client gets its 354 while the backend's is on its way (one round trip
        // instead of two). Nothing reaches the backend before its own 354: should it
        // refuse DATA, the client's message is read and dropped, and the client gets the
        // backend's refusal as the answer to the end of its data — nothing is accepted
        // that the backend did not accept.
        let backend = self.backend.as_mut().expect("checked");
        let mut failed: Option<BackendError> = match backend.send(b"DATA\r\n").await {
            Ok(()) => backend.flush().await.err(),
            Err(e) => Some(e),
        };
        self.client.reply("354 End data with <CR><LF>.<CR><LF>\r\n");
        if let Err(e) = self.client.flush(WRITE_TIMEOUT).await {
            // The backend waits for message data: that session is no use to anyone.
            self.backend = None;
            return Err(e);
        }
        // The backend's 354 is read when the first message bytes are ready to go, not
        // before the client's data is read: by then it has come, and the session wakes
        // up once (for the client's data) instead of twice.
        let mut awaiting_354 = failed.is_none();
        let limits = &self.ctx.config.limits;
        let max = limits.max_message_size;
        // The trace headers go out with the message's first bytes, in one write; what
        // follows has its bare line endings made CRLF (see `Normalize`).
        let mut out = Vec::with_capacity(headers.len() + DATA_WRITE);
        out.extend_from_slice(headers.as_bytes());
        let mut normalize = Normalize::default();
        let mut scan = DataScan::default();
        let mut size = 0u64;
        let started = Instant::now();
        loop {
            let (bytes, done) = match self.client.take_data(&mut scan, limits.data_timeout).await {
                Ok(x) => x,
                Err(e) => {
                    // The client stopped mid-message: dropping the backend session
                    // without the final dot makes the backend discard it.
                    self.backend = None;
                    self.tx = None;
                    return Err(std::io::Error::other(format!("during DATA: {e}")));
                }
            };
            size += bytes.len() as u64;
            if failed.is_none() && size <= max {
                normalize.feed(bytes, &mut out);
                // Small reads are gathered into fewer, bigger writes (a message of a
                // few KiB goes out in one): fewer wake-ups of greygate and the backend.
                if done || out.len() >= DATA_WRITE {
                    let backend = self.backend.as_mut().expect("open while relaying");
                    if std::mem::take(&mut awaiting_354) {
                        let timeout = self.ctx.config.backend_options.reply_timeout;
                        failed = match backend.reply(timeout).await {
                            Ok(r) if r.code == 354 => None,
                            Ok(r) => Some(BackendError::Refused(r)),
                            Err(e) => Some(e),
                        };
                    }
                    if failed.is_none() {
                        failed = backend.send(&out).await.err();
                    }
                    out.clear();
                }
            }
            if done {
                break;
            }
            if started.elapsed() > data_allowance(limits.data_timeout, size) {
                self.backend = None;
                self.tx = None;
                return Err(std::io::Error::other(format!(
                    "message data slower than {MIN_DATA_RATE} bytes/s"
                )));
            }
        }
        if normalize.rewritten > 0 {
            tracing::info!(
                peer = %self.peer, bare_line_endings = normalize.rewritten,
                "message with bare CR or LF line endings: sent on with CRLF"
            );
        }
        let tx = self.tx.take();
        self.finish_message(size, failed, tx).await;
        Ok(())
    }

    /// After the message's last byte: the backend's verdict, or why there is none.
    async fn finish_message(
        &mut self,
        size: u64,
        failed: Option<BackendError>,
        tx: Option<Transaction>,
    ) {
        let stats = &self.ctx.svc.metrics.smtp;
        if size > self.ctx.config.limits.max_message_size {
            // The backend has part of it: closing its session discards that.
            self.backend = None;
            self.client
                .reply("552 5.3.4 Message size exceeds fixed limit\r\n");
            return;
        }
        match failed {
            // The backend refused DATA (the client had its 354 already): its refusal is
            // the answer to the message, which went nowhere.
            Some(BackendError::Refused(r)) if r.code != 421 => {
                tracing::debug!(peer = %self.peer, reply = %r.text(), "backend refused DATA; message dropped");
                self.relay(&r);
                self.backend_needs_reset();
                return;
            }
            Some(e) => {
                self.backend_failed(&e);
                self.client.reply(BACKEND_LOST);
                return;
            }
            None => {}
        }
        let backend = self.backend.as_mut().expect("open after relaying");
        match backend.final_reply().await {
            // Closing its session, the backend took nothing.
            Ok(r) if r.code == 421 => self.backend_closing(r),
            Ok(r) => {
                if r.is_positive() {
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                    stats.message_bytes.fetch_add(size, Ordering::Relaxed);
                    // A client whose message the backend took is not slowed down any
                    // more: a tarpitted final reply would only invite a duplicate.
                    self.client.tarpit = None;
                }
                tracing::debug!(
                    peer = %self.peer, size, recipients = tx.as_ref().map_or(0, |t| t.accepted),
                    reply = %r.text(), "message relayed"
                );
                self.relay(&r);
            }
            Err(e) => {
                self.backend_failed(&e);
                self.client
                    .reply("451 4.4.2 No answer from the mail server, try again later\r\n");
            }
        }
    }

    async fn bdat(&mut self, chunk: usize, last: bool) -> std::io::Result<Option<End>> {
        let refusal = match self.ready_for_data(true) {
            Err(r) => Some(r),
            Ok(()) if !self.backend.as_ref().is_some_and(|b| b.caps.chunking) => {
                Some("451 4.4.2 The mail server does not take BDAT now, try again later\r\n")
            }
            Ok(()) => None,
        };
        let limits = &self.ctx.config.limits;
        if chunk as u64 > limits.max_message_size {
            // More than any message may be: reading it would only hold the connection.
            return Ok(Some(
                self.close(
                    "552 5.3.4 Message size exceeds fixed limit; closing connection\r\n",
                    "BDAT chunk over max_message_size",
                )
                .await,
            ));
        }
        let tx = self.tx.as_mut();
        let over = tx.is_some_and(|t| {
            t.size = t.size.saturating_add(chunk as u64);
            t.size > limits.max_message_size
        });
        if refusal.is_some() || over {
            // The chunk's bytes are read and dropped whatever happens: they are not commands.
            if let Err(e) = self.discard(chunk).await {
                return Err(std::io::Error::other(format!("during BDAT: {e}")));
            }
            if over {
                self.backend = None;
                self.tx = None;
                self.client
                    .reply("552 5.3.4 Message size exceeds fixed limit\r\n");
            } else if let Some(r) = refusal {
                self.error(r);
            }
            return Ok(None);
        }
        let headers = (self.tx.as_ref().expect("ready").chunks == 0).then(|| self.trace_headers());
        let backend = self.backend.as_mut().expect("ready");
        let mut failed = None;
        if let Some(h) = headers {
            match backend
                .command_with_data(&format!("BDAT {}", h.len()), h.as_bytes())
                .await
            {
                Ok(r) if r.is_positive() => {}
                Ok(r) => failed = Some(BackendError::Refused(r)),
                Err(e) => failed = Some(e),
            }
        }
        let verb = if last {
            format!("BDAT {chunk} LAST\r\n")
        } else {
            format!("BDAT {chunk}\r\n")
        };
        if failed.is_none() {
            failed = backend.send(verb.as_bytes()).await.err();
        }
        let mut left = chunk;
        let started = Instant::now();
        while left > 0 {
            let piece = match self
                .client
                .take_upto(left.min(BDAT_PIECE), limits.data_timeout)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    self.backend = None;
                    self.tx = None;
                    return Err(std::io::Error::other(format!("during BDAT: {e}")));
                }
            };
            left -= piece.len();
            if failed.is_none() {
                let backend = self.backend.as_mut().expect("open while relaying");
                failed = backend.send(piece).await.err();
            }
            if left > 0
                && started.elapsed() > data_allowance(limits.data_timeout, (chunk - left) as u64)
            {
                self.backend = None;
                self.tx = None;
                return Err(std::io::Error::other(format!(
                    "BDAT data slower than {MIN_DATA_RATE} bytes/s"
                )));
            }
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.chunks += 1;
        }
        if let Some(e) = failed {
            if let BackendError::Refused(r) = &e {
                self.relay(r);
                self.backend_needs_reset();
                self.tx = None;
            } else {
                self.backend_failed(&e);
                self.tx = None;
                self.client.reply(BACKEND_LOST);
            }
            return Ok(None);
        }
        if last {
            let tx = self.tx.take();
            let size = tx.as_ref().map_or(0, |t| t.size);
            self.finish_message(size, None, tx).await;
        } else {
            let backend = self.backend.as_mut().expect("open");
            match backend.flush().await {
                Ok(()) => {}
                Err(e) => {
                    self.backend_failed(&e);
                    self.client.reply(BACKEND_LOST);
                    return Ok(None);
                }
            }
            let timeout = self.ctx.config.backend_options.reply_timeout;
            match self.backend.as_mut().expect("open").reply(timeout).await {
                Ok(r) if r.code == 421 => {
                    self.tx = None;
                    self.backend_closing(r);
                }
                Ok(r) => {
                    if !r.is_positive() {
                        self.tx = None;
                        self.backend_needs_reset();
                    }
                    self.relay(&r);
                }
                Err(e) => {
                    self.backend_failed(&e);
                    self.client.reply(BACKEND_LOST);
                }
            }
        }
        Ok(None)
    }

    async fn discard(&mut self, mut left: usize) -> Result<(), ReadError> {
        let limit = self.ctx.config.limits.data_timeout;
        let (started, total) = (Instant::now(), left as u64);
        while left > 0 {
            let n = self
                .client
                .take_upto(left.min(BDAT_PIECE), limit)
                .await?
                .len();
            left -= n;
            if started.elapsed() > data_allowance(limit, total - left as u64) {
                return Err(ReadError::Timeout);
            }
        }
        Ok(())
    }

    async fn starttls(&mut self) -> std::io::Result<Option<End>> {
        if self.tls.is_some() {
            self.error("503 5.5.1 Error: TLS already active\r\n");
            return Ok(None);
        }
        let Some(acceptor) = self.ctx.tls.load_full() else {
            self.error("502 5.5.1 STARTTLS not available\r\n");
            return Ok(None);
        };
        self.client.reply("220 2.0.0 Ready to start TLS\r\n");
        self.client.flush(WRITE_TIMEOUT).await?;
        // Commands pipelined after STARTTLS were sent in clear: never act on them.
        let dropped = self.client.drop_buffered();
        if dropped > 0 {
            return Ok(Some(End::Closed(format!(
                "{dropped} bytes pipelined after STARTTLS (command injection?)"
            ))));
        }
        let placeholder: Box<dyn Io> =
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let client = std::mem::replace(&mut self.client, Client::new(placeholder));
        let tarpit = {
            let mut c = client;
            let t = c.tarpit.take();
            (c.into_io(), t)
        };
        let (io, tarpit) = tarpit;
        let limit = self.ctx.config.limits.command_timeout;
        let tls = match tokio::time::timeout(limit, acceptor.accept(io)).await {
            Err(_) => return Ok(Some(End::Closed("TLS handshake timed out".into()))),
            Ok(Err(e)) => return Ok(Some(End::Closed(format!("TLS handshake failed: {e}")))),
            Ok(Ok(t)) => t,
        };
        let (version, cipher) = crate::tls::summary(tls.get_ref().1);
        self.tls = Some(format!("version={version} cipher={cipher}"));
        self.client.replace_io(Box::new(tls));
        self.client.tarpit = tarpit;
        self.ctx
            .svc
            .metrics
            .smtp
            .tls_sessions
            .fetch_add(1, Ordering::Relaxed);
        // RFC 3207 §4.2: everything known before is forgotten; the client greets again.
        self.helo = None;
        if let Some(b) = self.backend.take() {
            self.release(b).await;
        }
        self.tx = None;
        Ok(None)
    }
}

/// A greytrap hit: the client goes on the runtime deny list, on every front end —
/// unless an allow list names it (a big provider's outbound host that relayed mail
/// to a harvested trap address must not be denied for a day), and once: a client
/// already denied for a trap is not written again, however many traps it tries.
async fn trapped(ctx: &SmtpContext, ip: IpAddr, req: &Request, now: u64) {
    let recipient = req.recipient.as_str();
    let stats = &ctx.svc.metrics.smtp;
    stats.trap_hits.fetch_add(1, Ordering::Relaxed);
    let allowed = match ctx.svc.live().engine.classify(req, now) {
        Classified::Decided(d) => d.verdict != Verdict::Defer,
        Classified::Lookup(_) => false,
    };
    if allowed {
        tracing::info!(
            rule = "greytrap", client = %ip, recipient,
            "client sent to a trap address but is allow-listed; not denied"
        );
        return;
    }
    let until = now.saturating_add(ctx.config.traps.deny_for.as_secs());
    if !ctx.guard.first_trap(ip, until, now) {
        return;
    }
    let ttl = ctx.config.traps.deny_for.as_secs();
    let comment = format!(
        "greytrap: sent to {}",
        recipient.chars().take(200).collect::<String>()
    );
    let value = ip.to_string();
    let added = if ctx.svc.entries.is_shared() {
        // Into the store every daemon reads (bounded by the store timeout).
        ctx.svc
            .add_entry(
                ListKind::Deny,
                Target::Client,
                &value,
                Some(ttl),
                &comment,
                now,
            )
            .await
    } else {
        // The entries file is written and synced: off the runtime's threads.
        let svc = ctx.svc.clone();
        match tokio::task::spawn_blocking(move || {
            svc.add_file_entry(
                ListKind::Deny,
                Target::Client,
                &value,
                Some(ttl),
                &comment,
                now,
            )
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(client = %ip, error = %e, "greytrap: deny entry task failed");
                return;
            }
        }
    };
    match added {
        Ok(_) => tracing::warn!(
            rule = "greytrap", client = %ip, recipient, deny_for = ?ctx.config.traps.deny_for,
            "client sent to a trap address; denied on every front end"
        ),
        Err(e) => tracing::error!(client = %ip, error = %e, "greytrap: cannot add the deny entry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(line: &str) -> smtp_proto::MailFrom<String> {
        match Command::parse(&mut line.as_bytes().iter())
            .unwrap()
            .into_owned()
        {
            Command::Mail { from } => from,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mail_parameters_greygate_cannot_honour_are_refused() {
        for (line, param) in [
            (
                "MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
                "BODY=BINARYMIME",
            ),
            ("MAIL FROM:<a@b.example> REQUIRETLS\r\n", "REQUIRETLS"),
            ("MAIL FROM:<a@b.example> SMTPUTF8\r\n", "SMTPUTF8"),
            ("MAIL FROM:<a@b.example> BY=120;R\r\n", "BY"),
            (
                "MAIL FROM:<a@b.example> HOLDFOR=600\r\n",
                "HOLDFOR/HOLDUNTIL",
            ),
        ] {
            assert_eq!(unoffered(&mail(line), false), Some(param), "{line}");
        }
        for line in [
            "MAIL FROM:<a@b.example>\r\n",
            "MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n",
            "MAIL FROM:<a@b.example> BODY=7BIT RET=HDRS ENVID=x1\r\n",
        ] {
            assert_eq!(unoffered(&mail(line), false), None, "{line}");
        }
        // Offered in the EHLO reply (the backend had it): passed on.
        assert_eq!(
            unoffered(&mail("MAIL FROM:<a@b.example> SMTPUTF8\r\n"), true),
            None
        );
    }

    #[test]
    fn paths_are_requoted_and_injections_refused() {
        assert_eq!(path("a.b@example.org").as_deref(), Some("a.b@example.org"));
        assert_eq!(path("").as_deref(), Some(""));
        assert_eq!(path("postmaster").as_deref(), Some("postmaster"));
        assert_eq!(
            path("john smith@example.org").as_deref(),
            Some("\"john smith\"@example.org")
        );
        assert_eq!(
            path("spammer@bad.example> ENVID=x@ok.example").as_deref(),
            Some("\"spammer@bad.example> ENVID=x\"@ok.example")
        );
        assert_eq!(path("a\"b@x.org").as_deref(), Some("\"a\\\"b\"@x.org"));
        assert_eq!(path("x@bad>domain"), None);
        assert_eq!(path("x@dom\r\nRSET"), None);
        assert_eq!(
            path("ü@bücher.example").as_deref(),
            Some("ü@bücher.example")
        );
    }

    #[test]
    fn postmaster_is_read_from_the_line() {
        assert!(names_postmaster(b"RCPT TO:<PostMaster>\r\n"));
        assert!(!names_postmaster(b"RCPT TO:<>\r\n"));
        assert!(!names_postmaster(b"MAIL FROM:<postmaster@example.org>\r\n"));
    }

    #[test]
    fn smtp_proto_unquotes_as_path_expects() {
        let line = b"RCPT TO:<\"john smith\"@example.org>\r\n";
        let Ok(Command::Rcpt { to }) = Command::parse(&mut line.iter()) else {
            panic!("parses")
        };
        assert_eq!(
            path(&to.address).as_deref(),
            Some("\"john smith\"@example.org")
        );
    }
}
