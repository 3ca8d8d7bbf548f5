//! `greygate track` over a real Exim's mainlog: a private Exim (see `harness::exim`) relays
//! one message to three loopback destinations, greygate's SMTP front (which greylists, in
//! front of smtp-sink), a plain smtp-sink and an smtp-sink that answers 5xx at RCPT; forced
//! queue runs retry until greylisting lets the message through, and track must tell the
//! three apart from the mainlog alone.
//!
//! Skips without Exim, Postfix's smtp-sink or swaks under plain `cargo test`; fails under
//! `GREYGATE_REQUIRE_PEERS=1`. Every wait is bounded.

use std::time::{Duration, Instant};

use crate::harness::exim::{self, EximConfig};
use crate::harness::postfix::{self, SmtpSink};
use crate::harness::{DaemonConfig, run_cli, tool_available};

/// greygate's greylisting delay: the added delay track reports is at least this.
const DELAY: u64 = 2;

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

#[test]
fn track_reads_an_exim_mainlog_with_greylisted_plain_and_rejecting_destinations() {
    let test = "exim_track";
    if !exim::available(test)
        || !postfix::available(test)
        || !tool_available(test, "/usr/bin/swaks")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let behind_greygate = SmtpSink::start(&[]);
    let greygate = DaemonConfig::new(dir.path())
        .toml(&format!(
            "hostname = \"gw.test.invalid\"\n\n[greylist]\ndelay = {DELAY}\n\n\
             [smtp]\npregreet_wait = \"0s\"\n"
        ))
        .smtp(
            &["127.0.0.1:0"],
            &format!("127.0.0.1:{}", behind_greygate.port),
        )
        .start();
    let plain = SmtpSink::start(&[]);
    let rejecting = SmtpSink::start(&["-f", "RCPT"]);
    // The sender's domain goes to the plain sink too: the bounce for rej.example is
    // delivered rather than left in the queue.
    let exim = EximConfig::new()
        .route("grey.example", greygate.smtp().port())
        .route("sink.example : example.net", plain.port)
        .route("rej.example", rejecting.port)
        .start();

    let sent = exim
        .swaks()
        .from("carol@example.net")
        .to("dave@grey.example,a@sink.example,b@sink.example,erin@rej.example")
        .arg("--header", "Message-Id: <exim-track-1@example.net>")
        .run();
    assert_eq!(sent.code, 0, "{}", sent.transcript);
    // The daemon delivers at once: greylisted, delivered, bounced.
    assert!(
        exim.wait_mainlog("== dave@grey.example", Duration::from_secs(20)),
        "no deferral by greygate:\n{}\ngreygate:\n{}",
        exim.diagnostics(),
        greygate.log()
    );
    // Forced queue runs, a second apart, until greylisting lets the retry through.
    let deadline = Instant::now() + Duration::from_secs(40);
    for run in 0.. {
        if exim.mainlog().contains("=> dave@grey.example") {
            break;
        }
        assert!(
            run < 30 && Instant::now() < deadline,
            "dave@grey.example never delivered after {run} queue runs:\n{}\ngreygate:\n{}",
            exim.diagnostics(),
            greygate.log()
        );
        std::thread::sleep(Duration::from_secs(1));
        exim.queue_run();
    }
    // The bounce to carol@example.net and the message itself leave the queue.
    let deadline = Instant::now() + Duration::from_secs(20);
    while exim.queue_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "queue never emptied:\n{}",
            exim.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
        exim.queue_run();
    }
    let log = exim.mainlog();
    for kind in [" <= ", " => ", " -> ", " == ", " ** ", " Completed"] {
        assert!(log.contains(kind), "no {kind:?} line:\n{log}");
    }

    let path = exim.mainlog_path();
    let (code, out, err) = run_cli(&["track", "--json", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let domain = |name: &str| {
        v["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["domain"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {v:#}\n{log}"))
            .clone()
    };
    let grey = domain("grey.example");
    assert_eq!(grey["messages"], 1, "{grey:#}\n{log}");
    assert_eq!(grey["greylisted"], 1, "{grey:#}\n{log}");
    assert_eq!(grey["still_queued"], 0, "{grey:#}\n{log}");
    assert_eq!(grey["bounced"], 0, "{grey:#}\n{log}");
    let added = grey["added_delay_median"].as_f64().unwrap();
    assert!(
        (DELAY as f64 - 1.0..30.0).contains(&added),
        "added {added} s for a {DELAY} s delay: {grey:#}\n{log}"
    );
    let sink = domain("sink.example");
    assert_eq!(sink["messages"], 1, "{sink:#}\n{log}");
    assert_eq!(sink["greylisted"], 0, "{sink:#}\n{log}");
    assert_eq!(sink["deferred_other"], 0, "{sink:#}\n{log}");
    assert_eq!(sink["still_queued"], 0, "{sink:#}\n{log}");
    assert_eq!(sink["bounced"], 0, "{sink:#}\n{log}");
    let rej = domain("rej.example");
    assert_eq!(rej["messages"], 1, "{rej:#}\n{log}");
    assert_eq!(rej["greylisted"], 0, "{rej:#}\n{log}");
    assert_eq!(rej["bounced"], 1, "{rej:#}\n{log}");

    // One message, found by its Message-ID, with both recipients of sink.example (`=>`
    // and `->`) and the sender from the arrival line.
    let (code, out, err) = run_cli(&[
        "track",
        "--json",
        "--message-id",
        "exim-track-1@example.net",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let selected = v["selected"].as_array().unwrap();
    assert_eq!(selected.len(), 1, "{v:#}\n{log}");
    let m = &selected[0];
    assert_eq!(m["from"], "carol@example.net", "{m:#}");
    assert_eq!(m["removed"], true, "{m:#}");
    let mut to: Vec<&str> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["to"].as_str().unwrap())
        .collect();
    to.sort_unstable();
    assert_eq!(
        to,
        [
            "a@sink.example",
            "b@sink.example",
            "dave@grey.example",
            "erin@rej.example"
        ],
        "{m:#}"
    );

    // The timeline of the greylisted recipient.
    let (code, out, _) = run_cli(&["track", "--to", "dave@grey.example", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("deferred (greylisting)"), "{out}\n{log}");
    assert!(
        out.contains("=> delivered; greylisting added"),
        "{out}\n{log}"
    );
}

/// The README's Exim recipe (`contrib/exim-rcpt-acl.conf`, which the README shows
/// verbatim) in a real Exim: the first attempt is deferred with greygate's text, a retry
/// after the delay is accepted, and with greygate stopped mail is accepted.
#[test]
fn the_readme_recipe_defers_with_greygates_text_then_accepts_and_fails_open() {
    let test = "exim_recipe";
    if !exim::available(test)
        || !postfix::available(test)
        || !tool_available(test, "/usr/bin/swaks")
    {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let recipe = std::fs::read_to_string(format!("{root}/contrib/exim-rcpt-acl.conf")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    assert!(
        readme.contains(&recipe),
        "the README shows contrib/exim-rcpt-acl.conf verbatim"
    );

    let dir = tempfile::tempdir().unwrap();
    let greygate = DaemonConfig::new(dir.path())
        .toml(&format!("[greylist]\ndelay = {DELAY}\n"))
        .start();
    let sink = SmtpSink::start(&[]);
    let acl = recipe.replace("127.0.0.1:10023", &greygate.tcp().to_string()) + "accept\n";
    let exim = EximConfig::new()
        .route("example.org : example.net", sink.port)
        .rcpt_acl(&acl)
        .start();
    let send = |from: &str| exim.swaks().from(from).to("dave@example.org").run();

    let first = send("carol@example.net");
    assert_ne!(first.code, 0, "{}", first.transcript);
    assert!(
        first.transcript.contains(&format!(
            "451 Greylisted, please try again in {DELAY} seconds"
        )),
        "greygate's own text at RCPT:\n{}\n{}",
        first.transcript,
        exim.diagnostics()
    );
    greygate.expect_log("verdict=\"defer\" rule=\"new\"");

    // A retry too early is deferred again; after the delay it is accepted.
    let deadline = Instant::now() + Duration::from_secs(DELAY + 10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let retry = send("carol@example.net");
        if retry.code == 0 {
            break;
        }
        assert!(
            retry.transcript.contains("451 Greylisted"),
            "{}",
            retry.transcript
        );
        assert!(
            Instant::now() < deadline,
            "never accepted: {}",
            retry.transcript
        );
    }

    // Accepted because greygate passed it, not because readsocket failed.
    greygate.expect_log("rule=\"delayed\"");

    // greygate stopped: readsocket fails and the mail goes on, a new triplet included.
    let (status, log) = greygate.terminate();
    assert!(status.success(), "{log}");
    let open = send("frank@example.net");
    assert_eq!(open.code, 0, "fails open:\n{}", open.transcript);
}
