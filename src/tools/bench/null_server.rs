//! The null responder: a policy server that answers `DUNNO` to everything, the protocol's
//! ceiling to compare greygate against.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::BenchError;
use crate::proto::policy::{Decoder, Limits, encode_response};
use crate::server::ListenAddr;

/// Serves `action=DUNNO` to every request on `addr` until `stop` completes (the binary
/// passes SIGINT or SIGTERM; the future is first polled inside this function's runtime):
/// the protocol's ceiling. It decodes with the daemon's codec and keeps no state, so the
/// difference to greygate is the decision and the store. `ready` is called with the bound
/// address.
///
/// # Errors
///
/// The address cannot be bound, or the runtime cannot start.
pub fn run_null_server(
    addr: &ListenAddr,
    ready: impl FnOnce(&str),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), BenchError> {
    // Same runtime flavour as the daemon (multi-thread, one worker per core), so the two are
    // compared on equal terms.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    rt.block_on(async {
        let listen_err = |source| BenchError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = match addr {
            ListenAddr::Tcp(a) => {
                NullListener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(listen_err)?)
            }
            ListenAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                NullListener::Unix(tokio::net::UnixListener::bind(p).map_err(listen_err)?, p)
            }
        };
        let bound = match &listener {
            NullListener::Tcp(l) => l.local_addr().map_err(listen_err)?.to_string(),
            NullListener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        ready(&bound);
        tokio::select! {
            () = null_accept(&listener) => {}
            () = stop => {}
        }
        if let NullListener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}

enum NullListener<'a> {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, &'a PathBuf),
}

async fn null_accept(listener: &NullListener<'_>) {
    loop {
        let accepted = match listener {
            NullListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                tokio::spawn(null_connection(s));
            }),
            NullListener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                tokio::spawn(null_connection(s));
            }),
        };
        if accepted.is_err() {
            // Out of descriptors and the like: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The daemon's connection loop without the decision: decode with the same bounded codec,
/// answer each request, write pipelined answers in one go.
async fn null_connection<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut decoder = Decoder::new(Limits::default());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 8192];
    loop {
        let mut start = 0;
        loop {
            match decoder.decode(&buf[start..]) {
                Ok((used, req)) => {
                    start += used;
                    if req.is_none() {
                        break;
                    }
                    encode_response("DUNNO", &mut out);
                }
                Err(_) => return,
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
