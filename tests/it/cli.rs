//! The command line: check-config, explain, help.

use std::time::Duration;

use crate::harness::{DaemonConfig, rcpt_request, run_cli};

#[test]
fn help_lists_every_command() {
    let (code, out, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["serve", "check-config", "explain"] {
        assert!(out.contains(cmd), "--help mentions {cmd}:\n{out}");
    }
    let (code, out, _) = run_cli(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--listen", "--db", "--delay", "--config", "--learn", "--memory",
    ] {
        assert!(out.contains(flag), "serve --help mentions {flag}:\n{out}");
    }
}

#[test]
fn check_config_accepts_the_shipped_sample() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/greygate.toml");
    let (code, out, err) = run_cli(&["check-config", "--config", sample]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");
    // The sample shows the defaults: pool-aware, SPF through the system's resolver, host
    // names from the MTA.
    assert!(
        out.contains(
            "client identity: spf, org, prefix; DNS budget 300 ms via the system's resolver, host names the MTA's only"
        ),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let (code, defaults, err) = run_cli(&["check-config", "--config", empty.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let line = |text: &str| {
        text.lines()
            .find(|l| l.contains("client identity:"))
            .map(str::to_string)
    };
    assert_eq!(line(&out), line(&defaults), "{defaults}");
}

#[test]
fn check_config_points_at_the_offending_lines() {
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("clients");
    std::fs::write(&allow, "192.0.2.0/24\n# comment\nnot a host name\n").unwrap();
    let cfg = dir.path().join("greygate.toml");
    std::fs::write(
        &cfg,
        format!(
            "mode = \"enforce\"\n[greylist]\ndelay = \"10m\"\nretry_window = \"5m\"\n[allow]\nclient_files = [{:?}]\n",
            allow.display().to_string()
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:4:", cfg.display())),
        "retry_window line named:\n{err}"
    );
    assert!(
        err.contains(&format!("{}:3:", allow.display())),
        "allow file line named:\n{err}"
    );

    std::fs::write(&cfg, "[greylist]\ndelay = 300\ndealy = 5\n").unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{}:3:", cfg.display())),
        "typo line named:\n{err}"
    );
    assert!(err.contains("dealy"), "{err}");

    let (code, _, err) = run_cli(&["check-config", "--config", "/nonexistent/greygate.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/greygate.toml"), "{err}");
}

#[test]
fn explain_reads_the_store_without_changing_it_and_knows_when_a_daemon_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml("[greylist]\ndelay = 600\n");
    let db = cfg.db_path();
    let db = db.to_str().unwrap();
    let config = dir.path().join("greygate.toml");
    let d = cfg.start();
    let req = rcpt_request("192.0.2.33", "Alice+news@Example.net", "bob@example.org");
    assert!(d.client().ask(&req).starts_with("DEFER_IF_PERMIT"));
    let args = |extra: &[&'static str]| {
        let mut v: Vec<String> = [
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--db",
            db,
            "--client",
            "192.0.2.200",
            "--from",
            "alice@example.net",
            "--to",
            "bob@example.org",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&'static str]| {
        let a = args(extra);
        run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, _, err) = run(&[]);
    assert_eq!(code, 3, "store held by the daemon: {err}");
    assert!(err.contains("locked") && err.contains("daemon"), "{err}");
    // Static rules need no store, even while the daemon runs.
    let a: Vec<String> = args(&[])
        .into_iter()
        .map(|s| s.replace("bob@example.org", "postmaster@example.org"))
        .collect();
    let (code, out, err) = run_cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rule: allow-recipient"), "{out}");

    let (status, _) = d.terminate();
    assert!(status.success());
    let before = std::fs::read(db).unwrap();
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("decision:   defer (rule: early-retry)"),
        "same /24, normalised sender:\n{out}"
    );
    assert!(out.contains("record:     pending"), "{out}");
    assert!(out.contains("client 192.0.2.0/24"), "{out}");
    assert!(out.contains("remaining:"), "{out}");
    let (code, out, _) = run(&["--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON explanation");
    assert_eq!(v["decision"]["rule"], "early-retry");
    assert_eq!(v["decision"]["key"]["sender"], "alice@example.net");
    let in_an_hour = (greygate::service::unix_now() + 3600).to_string();
    let a = args(&["--at"]);
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    a.push(&in_an_hour);
    let (code, out, _) = run_cli(&a);
    assert_eq!(code, 0);
    assert!(
        out.contains("rule: delayed"),
        "after the delay it would pass:\n{out}"
    );
    assert_eq!(
        std::fs::read(db).unwrap(),
        before,
        "explain changed nothing"
    );

    // And the daemon still sees the triplet as pending.
    let d = cfg.start();
    assert!(d.client().ask(&req).starts_with("DEFER_IF_PERMIT"));
    assert!(d.wait_log("rule=\"early-retry\"", Duration::from_secs(2)));
}
