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
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
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
        let task = tokio::spawn(async move { serve_connection(server, "test", &ctx).await });
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
