//! `greygate track --follow --metrics-listen ADDR`: the per-domain report as Prometheus
//! metrics, so a relay's dashboard shows which destinations greylist it and what that
//! costs as it happens. Counters only grow while the log goes on (a message's flags only
//! accumulate); `still_queued` and `in_flight` are gauges.
//!
//! The listener is small and bounded like every other here: [`MAX_CONNECTIONS`] at once
//! (more are closed at once), a deadline for the request head, a head size limit, a
//! lifetime per connection; only `GET /metrics` (and `/`) answer.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::fold::DELAY_BUCKETS;
use super::report::DomainStats;

/// Connections served at once; scrapers need one or two.
pub const MAX_CONNECTIONS: usize = 16;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 16 * 1024;
const CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// What the follower knows besides the domains.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub lines: u64,
    pub messages: u64,
    pub in_flight: usize,
    pub rotations: u64,
    pub truncations: u64,
}

/// A label value as the text format wants it.
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The Prometheus text exposition of the report.
pub fn render(stats: &[DomainStats], p: &Progress) -> String {
    let mut s = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&DomainStats) -> u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in stats {
            let _ = writeln!(s, "{name}{{domain=\"{}\"}} {}", label(&d.domain), value(d));
        }
    };
    family(
        "greygate_track_messages_total",
        "counter",
        "Messages with a recipient in the destination domain.",
        &|d| d.messages,
    );
    family(
        "greygate_track_greylisted_total",
        "counter",
        "Messages whose delivery to the domain met greylisting at least once.",
        &|d| d.greylisted,
    );
    family(
        "greygate_track_deferred_other_total",
        "counter",
        "Messages deferred by the domain for reasons other than greylisting only.",
        &|d| d.deferred_other,
    );
    family(
        "greygate_track_bounced_total",
        "counter",
        "Messages bounced or expired for a recipient in the domain.",
        &|d| d.bounced,
    );
    family(
        "greygate_track_still_queued",
        "gauge",
        "Messages not yet delivered, bounced nor expired for a recipient in the domain.",
        &|d| d.still_queued,
    );
    let name = "greygate_track_added_delay_seconds";
    let _ = writeln!(
        s,
        "# HELP {name} Delay greylisting added to delivered messages (first greylisting deferral to delivery).\n# TYPE {name} histogram"
    );
    for d in stats {
        let dom = label(&d.domain);
        let mut cumulative = 0;
        for (ub, n) in DELAY_BUCKETS.iter().zip(d.added_buckets) {
            cumulative += n;
            let le = if ub.is_infinite() {
                "+Inf".to_string()
            } else {
                ub.to_string()
            };
            let _ = writeln!(
                s,
                "{name}_bucket{{domain=\"{dom}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            s,
            "{name}_sum{{domain=\"{dom}\"}} {}\n{name}_count{{domain=\"{dom}\"}} {cumulative}",
            d.added_delay_total
        );
    }
    for (name, kind, help, v) in [
        (
            "greygate_track_lines_total",
            "counter",
            "Log lines read.",
            p.lines,
        ),
        (
            "greygate_track_log_messages_total",
            "counter",
            "Messages seen in the log.",
            p.messages,
        ),
        (
            "greygate_track_in_flight",
            "gauge",
            "Messages in flight: tracked one by one until they finish.",
            p.in_flight as u64,
        ),
        (
            "greygate_track_rotations_total",
            "counter",
            "Log rotations followed (renames and truncations).",
            p.rotations + p.truncations,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    s
}

/// Serves `current()` at `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    current: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: closed at once rather than queued.
            continue;
        };
        let current = current.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let current = current.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &*current)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFE, conn).await;
            drop(permit);
        });
    }
}

fn answer<B>(req: &Request<B>, current: &(dyn Fn() -> String + Send + Sync)) -> Response<Body> {
    let reply = |code: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = code;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" | "/" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            current(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_a_histogram_per_domain() {
        let d = DomainStats {
            domain: "ex\"ample.org".into(),
            messages: 3,
            greylisted: 2,
            deferred_other: 0,
            added_delay_median: Some(300.0),
            added_delay_p95: Some(400.0),
            added_delay_total: 700.0,
            still_queued: 1,
            bounced: 0,
            added_buckets: [0, 1, 1, 0, 0, 0],
        };
        let text = render(
            &[d],
            &Progress {
                lines: 10,
                ..Progress::default()
            },
        );
        for want in [
            "greygate_track_greylisted_total{domain=\"ex\\\"ample.org\"} 2",
            "greygate_track_still_queued{domain=\"ex\\\"ample.org\"} 1",
            "greygate_track_added_delay_seconds_bucket{domain=\"ex\\\"ample.org\",le=\"300\"} 1",
            "greygate_track_added_delay_seconds_bucket{domain=\"ex\\\"ample.org\",le=\"900\"} 2",
            "greygate_track_added_delay_seconds_bucket{domain=\"ex\\\"ample.org\",le=\"+Inf\"} 2",
            "greygate_track_added_delay_seconds_count{domain=\"ex\\\"ample.org\"} 2",
            "greygate_track_lines_total 10",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    async fn served() -> (std::net::SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, Arc::new(|| "m 1\n".to_string()), stop.clone()));
        (addr, stop)
    }

    async fn get(s: &mut tokio::net::TcpStream, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_closes_connections_past_the_limit() {
        use tokio::io::AsyncReadExt;
        let (addr, stop) = served().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let page = get(&mut s, "/metrics").await;
        assert!(
            page.starts_with("HTTP/1.1 200") && page.ends_with("m 1\n"),
            "{page}"
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut s, "/other").await.starts_with("HTTP/1.1 404"));
        // MAX_CONNECTIONS idle connections hold every slot: the next is closed at once.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut b))
            .await
            .expect("closed at once, not held");
        assert_eq!(n.unwrap_or(0), 0);
        // Freed slots serve again.
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut s, "/metrics").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_head_timeout() {
        use tokio::io::AsyncReadExt;
        let (addr, stop) = served().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut b = [0u8; 64];
        let n = tokio::time::timeout(HEAD_TIMEOUT + Duration::from_secs(3), s.read(&mut b))
            .await
            .expect("closed by the head timeout");
        assert!(n.is_ok());
        assert!(started.elapsed() >= HEAD_TIMEOUT - Duration::from_millis(500));
        stop.cancel();
    }
}
