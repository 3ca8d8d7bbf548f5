//! The daemon as a library: `daemon::run` inside the test process, stopped by a future and
//! reloaded through a channel that the test holds. No child process, no signal.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use greygate::config::{Config, ConfigErrors, RawConfig, Source};

use crate::harness::{PolicyClient, rcpt_request};

fn write_config(path: &Path, socket: &Path, defer_text: &str) {
    let toml = format!(
        "[policy]\nlisten = [\"unix:{}\"]\ndefer_text = \"{defer_text}\"\n\
         [store]\nbackend = \"memory\"\n\
         [admin]\nlisten = []\n\
         [dns]\nenabled = false\n",
        socket.display()
    );
    std::fs::write(path, toml).expect("write config");
}

fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).expect("read config");
    let src = Source {
        name: "greygate.toml",
        text: &text,
    };
    RawConfig::parse(&src)?.validate(Some(&src))
}

/// Asks until the reply is `want` (a reload is applied by the daemon's own task).
fn ask_until(socket: &Path, request: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = PolicyClient::unix(socket).ask(request);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_serves_reloads_on_its_channel_and_stops_on_its_future() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("greygate.toml");
    let socket = dir.path().join("policy.sock");
    write_config(&config, &socket, "first {remaining}");
    let cfg = load(&config).expect("valid config");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let loader_path = config.clone();
    let loader: greygate::daemon::ConfigLoader = Arc::new(move || load(&loader_path));
    let stop = async move {
        let _ = stop_rx.await;
    };
    let daemon = rt.spawn(greygate::daemon::run(cfg, loader, stop, reload_rx));

    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not bind its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = rcpt_request("192.0.2.1", "a@example.net", "b@example.org");
    assert_eq!(
        PolicyClient::unix(&socket).ask(&first),
        "DEFER_IF_PERMIT first 300"
    );

    // A reload asked on the channel swaps the replies in; the listener stays.
    write_config(&config, &socket, "second {remaining}");
    reload_tx
        .blocking_send("test")
        .expect("the daemon takes reloads");
    let second = rcpt_request("192.0.2.2", "a@example.net", "b@example.org");
    assert_eq!(
        ask_until(&socket, &second, "DEFER_IF_PERMIT second 300"),
        "DEFER_IF_PERMIT second 300"
    );

    // The stop future ends the daemon, which closes its listener and returns cleanly.
    stop_tx.send(()).expect("the daemon waits for its stop");
    let result = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), daemon).await })
        .expect("the daemon stops within its grace period")
        .expect("the daemon task does not panic");
    assert!(result.is_ok(), "run ended with an error: {result:?}");
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_err(),
        "nothing listens after the stop"
    );
}
