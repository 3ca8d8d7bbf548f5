//! Milter connection tests over an in-memory duplex stream with the real service.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::engine::{Engine, Mode, Policy};
use crate::proto::milter::{DEFAULT_MAX_FRAME, decode_reply};
use crate::server::replies::DeferAction;
use crate::service::{FailMode, ServiceOptions, StoreSlot};
use crate::store::MemoryStore;
use tokio_util::sync::CancellationToken;

/// A service whose delay is 0: the first attempt defers, any retry passes after "0 s".
fn context() -> Arc<MilterContext> {
    let engine = Engine::new(
        Policy {
            delay: 0,
            ..Policy::default()
        },
        Default::default(),
    );
    let svc = Greylister::new(
        engine,
        StoreSlot::new(Arc::new(MemoryStore::new())),
        ServiceOptions {
            mode: Mode::Enforce,
            fail_mode: FailMode::Open,
            store_timeout: Duration::from_secs(1),
        },
    );
    Arc::new(MilterContext {
        svc: Arc::new(svc),
        replies: Arc::new(arc_swap::ArcSwap::from_pointee(Replies {
            defer_action: DeferAction::DeferIfPermit,
            milter_code: "451 4.7.1".into(),
            defer_text: "Greylisted, please try again in {remaining} seconds".into(),
            header_host: Some("gw.test".into()),
        })),
        limits: MilterLimits {
            max_connections: 4,
            max_connections_per_peer: 4,
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            max_macros: DEFAULT_MAX_MACROS,
            max_macro_bytes: DEFAULT_MAX_MACRO_BYTES,
        },
        stops: crate::server::StopSignals::new(CancellationToken::new(), CancellationToken::new()),
    })
}

struct Mta {
    conn: DuplexStream,
    buf: Vec<u8>,
}

impl Mta {
    fn start(ctx: &Arc<MilterContext>) -> (Mta, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let ctx = ctx.clone();
        let task =
            tokio::spawn(
                async move { serve_connection(server, "test", &ctx, &Slot::unlisted()).await },
            );
        (
            Mta {
                conn: client,
                buf: Vec::new(),
            },
            task,
        )
    }

    async fn send(&mut self, cmd: Command) {
        let mut out = Vec::new();
        cmd.encode(&mut out);
        self.conn.write_all(&out).await.unwrap();
    }

    async fn reply(&mut self) -> Reply {
        loop {
            if let Decoded::Frame(r, used) = decode_reply(&self.buf, DEFAULT_MAX_FRAME).unwrap() {
                self.buf.drain(..used);
                return r;
            }
            let mut chunk = [0u8; 4096];
            let n = self.conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "milter closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn ask(&mut self, cmd: Command) -> Reply {
        self.send(cmd).await;
        self.reply().await
    }

    /// Negotiation and the session up to MAIL, as Postfix sends it.
    async fn open(&mut self, ip: &str, sasl: Option<&str>) {
        let neg = self
            .ask(Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1fffff,
            })
            .await;
        let Reply::OptNeg {
            version,
            actions,
            protocol,
            macros,
        } = neg
        else {
            panic!("{neg:?}")
        };
        assert_eq!(version, 6);
        assert_eq!(actions, action::ADD_HEADERS | action::SET_SYMLIST);
        assert_eq!(protocol, SKIPPED_STEPS, "skips body, headers, DATA");
        assert_eq!(
            macros,
            vec![
                (stage::CONNECT, "{client_ptr} {client_resolve}".to_string()),
                (stage::HELO, "{tls_version}".to_string()),
                (stage::ENVFROM, "{auth_authen} i".to_string())
            ]
        );
        let connect = Command::Connect {
            hostname: "mail.example.net".into(),
            family: crate::proto::milter::Family::Inet,
            port: 25,
            address: ip.into(),
        };
        assert_eq!(self.ask(connect).await, Reply::Continue);
        assert_eq!(
            self.ask(Command::Helo("client.example.net".into())).await,
            Reply::Continue
        );
        let mut pairs = vec![("i".to_string(), "ABC123".to_string())];
        if let Some(user) = sasl {
            pairs.push(("{auth_authen}".into(), user.into()));
        }
        self.send(Command::Macros {
            for_cmd: b'M',
            pairs,
        })
        .await;
        assert_eq!(
            self.ask(Command::Mail(vec![
                "<a@example.net>".into(),
                "SIZE=10".into()
            ]))
            .await,
            Reply::Continue
        );
    }
}

#[tokio::test]
async fn deferred_then_passed_with_an_x_greylist_header_at_end_of_message() {
    let ctx = context();
    let (mut mta, _task) = Mta::start(&ctx);
    mta.open("192.0.2.1", None).await;
    let r = mta.ask(Command::Rcpt(vec!["<b@example.org>".into()])).await;
    assert_eq!(
        r,
        Reply::ReplyCode("451 4.7.1 Greylisted, please try again in 0 seconds".into())
    );
    mta.send(Command::Abort).await;

    // The retry (delay 0 has passed) continues, and the message gets the header.
    assert_eq!(
        mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await,
        Reply::Continue
    );
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<b@example.org>".into()])).await,
        Reply::Continue
    );
    let header = mta.ask(Command::EndOfMessage(vec![])).await;
    let Reply::AddHeader { name, value } = header else {
        panic!("{header:?}")
    };
    assert_eq!(name, "X-Greylist");
    assert!(
        value.starts_with("delayed 0 seconds by greygate-") && value.contains(" at gw.test; "),
        "{value}"
    );
    assert_eq!(mta.reply().await, Reply::Continue);

    // The next message of the same triplet is known: no header.
    assert_eq!(
        mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await,
        Reply::Continue
    );
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<b@example.org>".into()])).await,
        Reply::Continue
    );
    assert_eq!(
        mta.ask(Command::EndOfMessage(vec![])).await,
        Reply::Continue
    );
}

#[tokio::test]
async fn authenticated_sessions_and_allow_listed_recipients_continue_at_once() {
    let ctx = context();
    let (mut mta, _task) = Mta::start(&ctx);
    mta.open("192.0.2.2", Some("alice")).await;
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<b@example.org>".into()])).await,
        Reply::Continue
    );
    assert_eq!(
        mta.ask(Command::EndOfMessage(vec![])).await,
        Reply::Continue,
        "no header"
    );
}

#[tokio::test]
async fn quit_closes_and_garbage_is_refused() {
    let ctx = context();
    let (mut mta, task) = Mta::start(&ctx);
    mta.open("192.0.2.3", None).await;
    mta.send(Command::Quit).await;
    task.await.unwrap();

    let (mut mta, task) = Mta::start(&ctx);
    mta.conn.write_all(b"\x00\x00\x00\x05Zjunk").await.unwrap();
    task.await.unwrap();
    let mut rest = Vec::new();
    mta.conn.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "no reply to a bad frame");

    let (mut mta, task) = Mta::start(&ctx);
    mta.conn.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn quit_new_connection_keeps_the_socket_for_the_next_session() {
    let ctx = context();
    let (mut mta, _task) = Mta::start(&ctx);
    mta.open("192.0.2.4", None).await;
    mta.send(Command::QuitNewConnection).await;
    let connect = Command::Connect {
        hostname: "[198.51.100.9]".into(),
        family: crate::proto::milter::Family::Inet,
        port: 25,
        address: "198.51.100.9".into(),
    };
    assert_eq!(mta.ask(connect).await, Reply::Continue);
    assert_eq!(
        mta.ask(Command::Mail(vec!["<>".into()])).await,
        Reply::Continue
    );
    let r = mta.ask(Command::Rcpt(vec!["<x@example.org>".into()])).await;
    assert!(
        matches!(r, Reply::ReplyCode(ref t) if t.starts_with("451 4.7.1 ")),
        "{r:?}"
    );
}

/// Idle timeout 60 s: macro frames every 5 s do not keep the connection open, while a
/// command that moves the session on does restart the timer.
#[tokio::test(start_paused = true)]
async fn only_commands_that_move_the_session_on_restart_the_idle_timer() {
    let ctx = context();
    let (mut mta, task) = Mta::start(&ctx);
    mta.open("192.0.2.5", None).await;
    let start = tokio::time::Instant::now();
    // 50 s of no-op frames, then a real command: the timer restarts from it.
    for _ in 0..10 {
        mta.send(Command::Macros {
            for_cmd: b'R',
            pairs: vec![("i".into(), "X".into())],
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let r = mta.ask(Command::Rcpt(vec!["<c@example.org>".into()])).await;
    assert!(matches!(r, Reply::ReplyCode(_)), "{r:?}");
    let advanced = tokio::time::Instant::now();
    while !task.is_finished() {
        let _ = mta
            .conn
            .write_all(&{
                let mut out = Vec::new();
                Command::Macros {
                    for_cmd: b'R',
                    pairs: vec![],
                }
                .encode(&mut out);
                out
            })
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(300), "never closed");
    }
    let idle = advanced.elapsed();
    assert!(
        idle >= Duration::from_secs(60) && idle <= Duration::from_secs(65),
        "closed {idle:?} after the last command"
    );
}

#[test]
fn connect_host_names_map_to_policy_terms() {
    let n = |h: &str, ptr: Option<&str>, resolve: Option<&str>| {
        connect_names(h.to_string(), ptr, resolve)
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    // Postfix: a confirmed name, or "unknown".
    assert_eq!(
        n("mx.example.net", None, None),
        pair("mx.example.net", "mx.example.net")
    );
    assert_eq!(n("unknown", None, None), pair("unknown", ""));
    assert_eq!(
        n("unknown", Some("ptr.example.net"), None),
        pair("unknown", "ptr.example.net")
    );
    // Sendmail: "[ip]" when there is no name; the name with FORGED when it did not confirm.
    assert_eq!(n("[192.0.2.1]", None, None), pair("unknown", ""));
    assert_eq!(
        n("[192.0.2.1]", None, Some("FAIL")),
        pair("unknown", "unknown")
    );
    assert_eq!(
        n("ptr.example.net", None, Some("FORGED")),
        pair("unknown", "ptr.example.net")
    );
    assert_eq!(
        n("mx.example.net", Some("mx.example.net"), Some("OK")),
        pair("mx.example.net", "mx.example.net")
    );
}

fn limits(max_macros: usize, max_macro_bytes: usize) -> MilterLimits {
    MilterLimits {
        max_connections: 4,
        max_connections_per_peer: 4,
        idle_timeout: Duration::from_secs(60),
        io_timeout: Duration::from_secs(5),
        max_frame: DEFAULT_MAX_FRAME,
        max_macros,
        max_macro_bytes,
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The running totals match what the stages hold, and stay within the limits.
fn check_totals(m: &Macros, l: &MilterLimits) {
    let count: usize = m.stages.iter().map(Vec::len).sum();
    let bytes: usize = m
        .stages
        .iter()
        .flatten()
        .map(|(n, v)| macro_bytes(n, v))
        .sum();
    assert_eq!((m.count, m.bytes), (count, bytes));
    assert!(count <= l.max_macros && bytes <= l.max_macro_bytes);
}

#[test]
fn macros_are_bounded_per_connection_and_a_stage_replaces_its_own() {
    let l = limits(4, 100);
    let mut m = Macros::default();
    let c = stage::CONNECT as usize;
    let from = stage::ENVFROM as usize;
    let rcpt = stage::ENVRCPT as usize;
    let set = |m: &mut Macros, stage: usize, list: &[(&str, &str)]| {
        let dropped = m.set(stage, pairs(list), &l);
        check_totals(m, &l);
        dropped
    };
    // 21 + 3 bytes.
    assert_eq!(
        set(&mut m, c, &[("{client_ptr}", "ptr.example"), ("j", "mx")]),
        0
    );
    assert_eq!(m.get("client_ptr"), Some("ptr.example"), "braces dropped");
    let forty = "x".repeat(40);
    // 41 fits (65), the next 41 would make 106 > 100, 2 fits (67) and is the 4th.
    assert_eq!(
        set(&mut m, from, &[("a", &forty), ("b", &forty), ("c", "z")]),
        1
    );
    assert_eq!((m.count, m.bytes), (4, 67));
    assert_eq!(m.get("b"), None);
    assert_eq!(set(&mut m, rcpt, &[("d", "1")]), 1, "no fifth macro");
    // MAIL's macros again: they replace the last ones, and their room is free again.
    assert_eq!(set(&mut m, from, &[("{auth_authen}", "alice")]), 0);
    assert_eq!((m.get("auth_authen"), m.get("a")), (Some("alice"), None));
    assert_eq!((m.count, m.bytes), (3, 40));
    // The first of a name sent twice, as libmilter reads it.
    set(&mut m, rcpt, &[("x", "1"), ("x", "2")]);
    assert_eq!(m.get("x"), Some("1"));
    // A later stage's value is found first.
    assert_eq!(set(&mut m, rcpt, &[("j", "later")]), 0);
    assert_eq!(m.get("j"), Some("later"));
    m.clear_after(stage::CONNECT);
    check_totals(&m, &l);
    assert_eq!((m.count, m.bytes), (2, 24));
    assert_eq!(m.get("auth_authen"), None);
    m.clear_after(0);
    assert_eq!(m.get("client_ptr"), Some("ptr.example"));
    m.set(c, Vec::new(), &l);
    assert_eq!((m.count, m.bytes, m.get("client_ptr")), (0, 0, None));
}

/// Connect info starts a session: the connect macros sent for it stay, everything else
/// (and connect macros of an earlier session) goes.
#[test]
fn a_new_session_keeps_only_its_own_connect_macros() {
    let l = limits(DEFAULT_MAX_MACROS, DEFAULT_MAX_MACRO_BYTES);
    let mut m = Macros::default();
    m.set(
        stage::CONNECT as usize,
        pairs(&[("{client_ptr}", "one.example")]),
        &l,
    );
    m.new_session();
    m.set(
        stage::ENVFROM as usize,
        pairs(&[("{auth_authen}", "a")]),
        &l,
    );
    assert_eq!(m.get("client_ptr"), Some("one.example"));
    // The next session comes without connect macros.
    m.new_session();
    check_totals(&m, &l);
    assert_eq!((m.get("client_ptr"), m.get("auth_authen")), (None, None));
    assert_eq!((m.count, m.bytes), (0, 0));
}

/// The attack that found the problem: 64 macros of up to a frame each, over all stages,
/// kept on one connection. The defaults hold them to 64 KiB.
#[test]
fn maximal_macros_stay_within_the_default_bound() {
    let l = limits(DEFAULT_MAX_MACROS, DEFAULT_MAX_MACRO_BYTES);
    let mut m = Macros::default();
    let big = "v".repeat(DEFAULT_MAX_FRAME - 64);
    for i in 0..64 {
        let name = format!("{{m{i}}}");
        m.set(i % STAGES, vec![(name, big.clone())], &l);
        check_totals(&m, &l);
    }
    // Many small names: the count bound.
    let many: Vec<(String, String)> = (0..10_000).map(|i| (format!("n{i}"), "v".into())).collect();
    m.set(stage::EOH as usize, many, &l);
    check_totals(&m, &l);
    assert_eq!(m.count, DEFAULT_MAX_MACROS);
    assert!(m.bytes <= DEFAULT_MAX_MACRO_BYTES);
}

/// A macro sent in one message or session never answers for the next: abort and end of
/// message forget MAIL's macros, a new connect the last session's, QUIT_NC all.
#[tokio::test]
async fn macros_do_not_outlive_their_message_or_session() {
    let ctx = context();
    let (mut mta, _task) = Mta::start(&ctx);
    // Authenticated: no greylisting.
    mta.open("192.0.2.5", Some("alice")).await;
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<b@example.org>".into()])).await,
        Reply::Continue
    );
    // RSET, then a message whose MAIL comes without macros: not authenticated any more.
    mta.send(Command::Abort).await;
    assert_eq!(
        mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await,
        Reply::Continue
    );
    let r = mta.ask(Command::Rcpt(vec!["<c@example.org>".into()])).await;
    assert!(
        matches!(r, Reply::ReplyCode(ref t) if t.starts_with("451 ")),
        "{r:?}"
    );
    mta.send(Command::Abort).await;

    // Authenticated again, to the end of the message; the next message is not.
    mta.send(Command::Macros {
        for_cmd: b'M',
        pairs: pairs(&[("{auth_authen}", "alice")]),
    })
    .await;
    mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await;
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<d@example.org>".into()])).await,
        Reply::Continue
    );
    assert_eq!(
        mta.ask(Command::EndOfMessage(vec![])).await,
        Reply::Continue
    );
    mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await;
    let r = mta.ask(Command::Rcpt(vec!["<e@example.org>".into()])).await;
    assert!(
        matches!(r, Reply::ReplyCode(ref t) if t.starts_with("451 ")),
        "{r:?}"
    );

    // A new session on the connection: authenticated at MAIL; then another session that
    // starts with connect info alone (no QUIT_NC first) is not.
    mta.send(Command::QuitNewConnection).await;
    let connect = |ip: &str| Command::Connect {
        hostname: format!("[{ip}]"),
        family: crate::proto::milter::Family::Inet,
        port: 25,
        address: ip.into(),
    };
    mta.ask(connect("198.51.100.20")).await;
    assert_eq!(mta.ask(Command::Helo("x".into())).await, Reply::Continue);
    mta.send(Command::Macros {
        for_cmd: b'M',
        pairs: pairs(&[("{auth_authen}", "bob")]),
    })
    .await;
    mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await;
    assert_eq!(
        mta.ask(Command::Rcpt(vec!["<f@example.org>".into()])).await,
        Reply::Continue,
        "authenticated"
    );
    mta.ask(connect("198.51.100.21")).await;
    mta.ask(Command::Mail(vec!["<a@example.net>".into()])).await;
    let r = mta.ask(Command::Rcpt(vec!["<g@example.org>".into()])).await;
    assert!(
        matches!(r, Reply::ReplyCode(ref t) if t.starts_with("451 ")),
        "the last session's login is not this one's: {r:?}"
    );
}
