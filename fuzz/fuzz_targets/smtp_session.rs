//! Fuzzes a whole SMTP front session: any bytes from a client, pipelined or not, get
//! replies and an end without a panic, a hang or unbounded memory. The backend is a small
//! SMTP server in this process that accepts everything, so MAIL, RCPT, DATA, BDAT, RSET
//! and their failures all run.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use greygate::engine::{Engine, Mode, Policy};
use greygate::server::StopSignals;
use greygate::server::replies::{DeferAction, Replies};
use greygate::server::slots::Slot;
use greygate::server::smtp::{
    BackendOptions, Guard, Pool, PregreetAction, PregreetConfig, ProxyProtocol, SmtpConfig,
    SmtpContext, SmtpLimits, TarpitConfig, TrapConfig, Traps, serve_connection,
};
use greygate::service::{FailMode, Greylister, ServiceOptions, StoreSlot};
use greygate::store::MemoryStore;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

struct World {
    rt: tokio::runtime::Runtime,
    ctx: Arc<SmtpContext>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ctx = rt.block_on(async {
            let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = backend.local_addr().unwrap().to_string();
            tokio::spawn(accept_everything(backend));
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
            let traps = TrapConfig {
                addresses: vec!["trap@example.org".into()],
                file: None,
                deny_for: Duration::from_secs(1),
            };
            let guard = Guard::new(Traps::load(&traps).unwrap(), 4);
            Arc::new(SmtpContext {
                svc: Arc::new(svc),
                replies: Arc::new(arc_swap::ArcSwap::from_pointee(Replies {
                    defer_action: DeferAction::DeferIfPermit,
                    milter_code: "451 4.7.1".into(),
                    defer_text: "Greylisted, please try again in {remaining} seconds".into(),
                    header_host: Some("gw.test".into()),
                })),
                config: SmtpConfig {
                    listen: Vec::new(),
                    backend: Some(addr),
                    backend_options: BackendOptions {
                        xclient: true,
                        proxy: ProxyProtocol::Off,
                        starttls: false,
                        connect_timeout: Duration::from_secs(1),
                        pool: 0,
                        pool_idle: Duration::from_secs(1),
                        reply_timeout: Duration::from_secs(1),
                    },
                    hostname: "gw.test".into(),
                    limits: SmtpLimits {
                        max_connections: 4,
                        max_connections_per_peer: 4,
                        max_line_length: 512,
                        max_commands: 200,
                        max_errors: 20,
                        max_recipients: 100,
                        max_message_size: 4096,
                        command_timeout: Duration::from_secs(1),
                        data_timeout: Duration::from_secs(1),
                    },
                    pregreet: PregreetConfig {
                        wait: Duration::ZERO,
                        action: PregreetAction::Reject,
                        suspect_for: Duration::from_secs(1),
                        pass_for: Duration::from_secs(1),
                    },
                    tarpit: TarpitConfig {
                        rate: 0,
                        max_sessions: 4,
                    },
                    traps,
                    tls: None,
                    threads: 1,
                },
                tls: Arc::new(arc_swap::ArcSwapOption::empty()),
                guard: Arc::new(guard),
                pool: Pool::new(0, Duration::from_secs(1)),
                stops: StopSignals::new(CancellationToken::new(), CancellationToken::new()),
            })
        });
        World { rt, ctx }
    })
}

/// A backend that says yes: 250 to every line (220 to XCLIENT), 354 to DATA and 250 at
/// its end, 250 to each BDAT chunk. CHUNKING and XCLIENT are offered.
async fn accept_everything(l: tokio::net::TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let _ = w.write_all(b"220 backend\r\n").await;
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let upper = line.to_ascii_uppercase();
                let reply: &[u8] = if upper.starts_with(b"EHLO") {
                    b"250-backend\r\n250-CHUNKING\r\n250 XCLIENT ADDR NAME HELO PROTO PORT\r\n"
                } else if upper.starts_with(b"XCLIENT") {
                    b"220 backend\r\n"
                } else if upper.starts_with(b"DATA") {
                    let _ = w.write_all(b"354 go\r\n").await;
                    let mut last = Vec::new();
                    loop {
                        last.clear();
                        if r.read_until(b'\n', &mut last).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if last == b".\r\n" {
                            break;
                        }
                    }
                    b"250 queued\r\n"
                } else if let Some(n) = upper
                    .strip_prefix(b"BDAT ")
                    .and_then(|rest| std::str::from_utf8(rest).ok())
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                {
                    let mut chunk = (&mut r).take(n);
                    if tokio::io::copy(&mut chunk, &mut tokio::io::sink()).await.is_err() {
                        return;
                    }
                    b"250 chunk\r\n"
                } else if upper.starts_with(b"QUIT") {
                    let _ = w.write_all(b"221 bye\r\n").await;
                    return;
                } else {
                    b"250 ok\r\n"
                };
                if w.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let client = async {
            let _ = theirs.write_all(data).await;
            let _ = theirs.shutdown().await;
            let mut replies = Vec::new();
            let _ = theirs.read_to_end(&mut replies).await;
            replies
        };
        let slot = Slot::unlisted();
        let session = serve_connection(ours, "192.0.2.1:4000", None, &w.ctx, &slot);
        let (replies, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(client, session)
        })
        .await
        .expect("a session with a closed client ends");
        // Every reply line is a well-formed SMTP reply.
        for line in replies.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
            assert!(matches!(line[3], b' ' | b'-'), "{line:?}");
        }
    });
});
