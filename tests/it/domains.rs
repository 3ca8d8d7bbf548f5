//! Per-recipient-domain sections (`[[domains]]`) in a running daemon: one domain `off`, one
//! `learn`, one with a longer delay, and a hosting provider's file reloaded on SIGHUP; the
//! answers, the decision log line, `explain --live` and the dashboard's recent decisions
//! name the section that applied.

use std::time::Duration;

use crate::admin::{Http, admin_toml};
use crate::harness::{Daemon, DaemonConfig, rcpt_request, run_cli};

const WAIT: Duration = Duration::from_secs(5);

fn explain_live(d: &Daemon, to: &str) -> String {
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let (code, out, err) = run_cli(&[
        "explain",
        "--live",
        "--client",
        "198.51.100.7",
        "--from",
        "alice@sender.example",
        "--to",
        to,
        "--config",
        config.to_str().unwrap(),
        "--admin",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    out
}

/// The decision line of the `n`-th request for `recipient`, once it is logged.
fn decision_line(d: &Daemon, recipient: &str) -> String {
    let needle = format!("recipient=\"{recipient}\"");
    assert!(
        d.wait_log(&needle, WAIT),
        "no decision for {recipient}:\n{}",
        d.log()
    );
    d.log()
        .lines()
        .rfind(|l| l.contains(&needle))
        .unwrap()
        .to_string()
}

#[test]
fn off_learn_and_slower_domains_in_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let customers = dir.path().join("customers.txt");
    std::fs::write(&customers, "# hosted customers\nshop.example off\n").unwrap();
    // No DNS: this test needs no resolver (and must never query the system's).
    let toml = admin_toml(&format!(
        "\n[dns]\nenabled = false\n\n[[domains]]\nname = \"no-greylisting\"\nrecipients = [\"off.example\"]\nmode = \"off\"\n\n\
         [[domains]]\nname = \"trial\"\nrecipients = [\"learn.example\"]\nmode = \"learn\"\n\n\
         [[domains]]\nname = \"slow\"\nrecipients = [\"slow.example\"]\ndelay = \"20m\"\n\n\
         [[domains]]\nname = \"hosted\"\nfiles = [{:?}]\n",
        customers.display().to_string()
    ));
    let d = DaemonConfig::new(dir.path()).toml(&toml).start();
    let config = d.dir.join("greygate.toml");
    let (code, out, err) = run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("domain sections: 4 in the configuration, 1 file lines"),
        "{out}"
    );
    let mut c = d.client();
    let ask = |c: &mut crate::harness::PolicyClient, to: &str| {
        c.ask(&rcpt_request("198.51.100.7", "alice@sender.example", to))
    };

    // off: accepted at once, never stored (a retry is still `domain-off`).
    assert_eq!(ask(&mut c, "bob@off.example"), "DUNNO");
    let line = decision_line(&d, "bob@off.example");
    assert!(line.contains("rule=\"domain-off\""), "{line}");
    assert!(line.contains("domain=\"no-greylisting\""), "{line}");
    assert_eq!(ask(&mut c, "bob@off.example"), "DUNNO");

    // learn: decided and recorded, but accepted.
    assert_eq!(ask(&mut c, "bob@learn.example"), "DUNNO");
    let line = decision_line(&d, "bob@learn.example");
    assert!(line.contains("rule=\"new\""), "{line}");
    assert!(line.contains("would=\"defer\""), "{line}");
    assert!(line.contains("domain=\"trial\""), "{line}");
    assert!(
        explain_live(&d, "bob@learn.example").contains("rule: early-retry"),
        "recorded"
    );

    // A longer delay: deferred for 20 minutes, not the global 5.
    assert!(ask(&mut c, "bob@slow.example").starts_with("DEFER_IF_PERMIT"));
    let line = decision_line(&d, "bob@slow.example");
    assert!(line.contains("remaining=1200"), "{line}");
    assert!(line.contains("delay=1200"), "{line}");
    assert!(line.contains("domain=\"slow\""), "{line}");
    let x = explain_live(&d, "bob@slow.example");
    assert!(x.contains("domain:     section \"slow\""), "{x}");
    assert!(x.contains("rule: early-retry"), "{x}");
    assert!(
        x.contains("delay 1200 s, the delay of the recipient's section"),
        "{x}"
    );

    // Everything else: the global settings, no section named.
    assert!(ask(&mut c, "bob@other.example").starts_with("DEFER_IF_PERMIT"));
    let line = decision_line(&d, "bob@other.example");
    assert!(line.contains("remaining=300"), "{line}");
    assert!(!line.contains("domain="), "{line}");
    assert!(!explain_live(&d, "bob@other.example").contains("domain:"));

    // The hosting file's line, named with its section and line.
    assert_eq!(ask(&mut c, "info@shop.example"), "DUNNO");
    let line = decision_line(&d, "info@shop.example");
    assert!(line.contains("rule=\"domain-off\""), "{line}");
    assert!(line.contains("domain=\"hosted\""), "{line}");
    assert!(line.contains("customers.txt:2"), "{line}");

    // The dashboard's recent decisions name the section.
    let http = Http::new(&d);
    let recent = http.get_json("/api/recent?limit=20");
    let domain_of = |rcpt: &str| {
        recent
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["recipient"] == rcpt)
            .map(|r| r["domain"].clone())
            .unwrap_or_else(|| panic!("{rcpt} not in {recent}"))
    };
    assert_eq!(domain_of("bob@slow.example"), "slow");
    assert_eq!(domain_of("bob@learn.example"), "trial");
    assert!(domain_of("bob@other.example").is_null());

    // The customer opts in: the file is read again on SIGHUP.
    std::fs::write(
        &customers,
        "# hosted customers\nshop.example enforce delay=10m\n",
    )
    .unwrap();
    d.hup();
    assert!(
        d.wait_log("domain_sections=5", WAIT),
        "no reload:\n{}",
        d.log()
    );
    let reply = ask(&mut c, "sales@shop.example");
    assert!(reply.starts_with("DEFER_IF_PERMIT"), "{reply}");
    let line = decision_line(&d, "sales@shop.example");
    assert!(line.contains("remaining=600"), "{line}");
    assert!(line.contains("domain=\"hosted\""), "{line}");
    let x = explain_live(&d, "sales@shop.example");
    let want = format!(
        "domain:     section \"hosted\" ({}:2), mode enforce",
        customers.display()
    );
    assert!(x.contains(&want), "{x}");

    // A bad line is refused with its line number, by check-config and by a reload (which
    // keeps the running sections).
    std::fs::write(
        &customers,
        "shop.example enforce delay=10m\nbad..example off\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:2:", customers.display())),
        "{err}"
    );
    d.hup();
    assert!(
        d.wait_log("configuration reload refused", WAIT),
        "{}",
        d.log()
    );
    let reply = ask(&mut c, "sales@shop.example");
    assert!(reply.starts_with("DEFER_IF_PERMIT"), "{reply}");
}
