//! `greygate simulate` on the shipped scenarios (issue 9's done-when claims, asserted on
//! the big-provider scenario; issue 17's pregreet figures on the pregreet scenario) and
//! `greygate replay` on an inbound log fixture.

use std::io::Write as _;

use serde_json::Value;

use crate::harness::run_cli;

fn scenario(name: &str) -> String {
    format!(
        "{}/contrib/scenarios/{name}.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
}

fn simulate(args: &[&str]) -> Value {
    let mut all = vec!["simulate", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(&all);
    assert_eq!(code, 0, "{err}");
    json(&out)
}

fn config<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no config {name}"))
}

fn class<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["class"] == name)
        .unwrap_or_else(|| panic!("no class {name}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn big_provider_scenario_meets_the_issue_9_claims() {
    let r = simulate(&[&scenario("big-providers")]);
    let postgrey = config(&r, "postgrey-like");
    let aware = config(&r, "pool-aware");
    let pools: Vec<&Value> = r["classes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ips"] == "pool" && c["spam"] == false)
        .collect();
    assert!(pools.len() >= 3, "the scenario has pool senders");
    for info in &pools {
        let name = info["name"].as_str().unwrap();
        let bound = u(&info["first_retry"]);
        let a = class(aware, name);
        let p = class(postgrey, name);
        // Pool-aware: at most one retry interval of the sender's MTA, nothing lost.
        assert!(
            u(&a["delay_p95"]) <= bound,
            "{name}: pool-aware p95 {} > one retry interval {bound}",
            a["delay_p95"]
        );
        assert_eq!(u(&a["lost"]), 0, "{name} lost under pool-aware");
        assert!(
            u(&p["delay_p95"]) > u(&a["delay_p95"]) || u(&p["lost"]) > 0,
            "{name}: postgrey-like is no worse: {p} vs {a}"
        );
    }
    // The big providers under postgrey-like: hours of delay, or losses.
    for name in ["gmail", "microsoft-365", "amazon-ses"] {
        let p = class(postgrey, name);
        assert!(
            u(&p["delay_p95"]) >= 3600 || u(&p["lost"]) > 0,
            "{name} under postgrey-like: {p}"
        );
    }
    // No legitimate mail lost; spam accepted no higher than postgrey-like, per class too.
    assert_eq!(u(&aware["legitimate"]["lost"]), 0);
    assert!(u(&aware["spam"]["delivered"]) <= u(&postgrey["spam"]["delivered"]));
    for info in r["classes"].as_array().unwrap() {
        if info["spam"] == true {
            let name = info["name"].as_str().unwrap();
            assert!(
                u(&class(aware, name)["delivered"]) <= u(&class(postgrey, name)["delivered"]),
                "{name}"
            );
        }
    }
}

#[test]
fn simulate_is_deterministic_and_renders_text_and_html() {
    let path = scenario("big-providers");
    let a = run_cli(&["simulate", &path, "--scale", "0.2"]);
    let b = run_cli(&["simulate", &path, "--scale", "0.2"]);
    assert_eq!(a.0, 0, "{}", a.2);
    assert_eq!(a.1, b.1, "same seed, same report");
    assert!(a.1.contains("side by side"), "{}", a.1);
    let c = run_cli(&["simulate", &path, "--scale", "0.2", "--seed", "99"]);
    assert_ne!(a.1, c.1, "another seed, another report");

    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let (code, _, err) = run_cli(&[
        "simulate",
        &path,
        "--scale",
        "0.1",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("pool-aware"));
    assert!(!page.contains("<script") && !page.contains("src=\""));
}

#[test]
fn every_shipped_scenario_runs() {
    for name in ["small-business", "spam-wave", "pregreet"] {
        let r = simulate(&[&scenario(name), "--scale", "0.1"]);
        assert!(u(&r["messages"]) > 0, "{name}");
        for c in r["configs"].as_array().unwrap() {
            assert_eq!(u(&c["legitimate"]["lost"]), 0, "{name}/{}", c["name"]);
        }
    }
}

#[test]
fn pregreet_scenario_reports_what_detection_adds() {
    let path = scenario("pregreet");
    let r = simulate(&[&path]);
    let alone = config(&r, "greylisting");
    assert!(
        alone.get("pregreet").is_none(),
        "no [config.smtp], no figures: {alone}"
    );
    let pclass = |p: &Value, name: &str| -> Value {
        p["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["class"] == name)
            .unwrap_or_else(|| panic!("no class {name}"))
            .clone()
    };
    let mut caught = Vec::new();
    for (name, action) in [("pregreet-reject", "reject"), ("pregreet-defer", "defer")] {
        let c = config(&r, name);
        let p = &c["pregreet"];
        assert_eq!(
            (
                u(&p["wait"]),
                p["action"].as_str(),
                u(&p["suspect_for"]),
                u(&p["pass_for"])
            ),
            (6, Some(action), 86_400, 86_400),
            "{p}"
        );
        assert_eq!(u(&p["suspect_delay"]), 3 * 3600);
        // The baseline is the same configuration without the test: "greylisting" here.
        let (with, without) = (u(&p["spam_accepted"]), u(&p["spam_accepted_without"]));
        assert_eq!(without, u(&alone["spam"]["delivered"]), "{name}");
        assert_eq!(with, u(&c["spam"]["delivered"]), "{name}");
        assert!(with < without, "{name}: {p}");
        assert!(u(&p["spam_blocked"]) >= without - with, "{name}: {p}");
        assert!(
            u(&p["caught"]) > 0 && u(&p["suspect_rcpts"]) > 0,
            "{name}: {p}"
        );
        caught.push(u(&p["caught"]));
        // Bots that never retry: greylisting alone stops them; the test only catches them.
        let b = pclass(p, "botnet-no-retry");
        assert!(u(&b["caught"]) > 0 && u(&b["blocked"]) == 0, "{b}");
        // Spam software that retries through greylisting: most of it is stopped now.
        let retrying = u(&class(alone, "spamware-every-5m")["delivered"]);
        let b = pclass(p, "spamware-every-5m");
        assert!(u(&b["blocked"]) * 2 > retrying, "{b} of {retrying}");
        // Spammers' own MTAs wait for the banner like any MTA.
        assert_eq!(u(&pclass(p, "snowshoe")["caught"]), 0);
        // Legitimate mail: never refused, only slower by the waits.
        assert_eq!(u(&p["caught_legitimate"]), 0);
        assert_eq!(u(&p["legitimate_lost"]), 0);
        assert_eq!(u(&c["legitimate"]["lost"]), 0);
        let waits = u(&p["legitimate_waits"]);
        assert!(waits > 0);
        assert_eq!(u(&p["legitimate_wait_seconds"]), 6 * waits);
        assert!(u(&p["legitimate_p95"]) >= u(&p["legitimate_p95_without"]));
    }
    assert!(
        caught[1] > caught[0],
        "deferred bots retry and are caught again"
    );

    let (code, text, err) = run_cli(&["simulate", &path]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(text.matches("pregreet detection (").count(), 2, "{text}");
    assert!(
        text.contains("pregreet detection (wait 6s, reject, suspect for 1d00h, pass for 1d00h)"),
        "{text}"
    );
    assert!(
        text.contains("blocked that greylisting alone let through"),
        "{text}"
    );
    assert!(text.contains("cost to legitimate mail"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let (code, _, err) = run_cli(&["simulate", &path, "--html", html.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<h2>Pregreet detection</h2>"), "{page}");
}

#[test]
fn bad_scenario_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[config]]\nname = \"a\"\n\n[[sender]]\nname = \"x\"\nmessages = 10\nnetwork = \"10.0.0.0/8\"\ndomain = \"x.example\"\nmta = \"fixed\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["simulate", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.toml:9:"), "{err}");
    assert!(err.contains("retry_every and give_up"), "{err}");
}

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/replay/maillog",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn replay(args: &[&str]) -> Value {
    let mut all = vec!["replay", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(&all);
    assert_eq!(code, 0, "{err}");
    json(&out)
}

#[test]
fn replay_an_inbound_log() {
    let dir = tempfile::tempdir().unwrap();
    let postgrey = dir.path().join("postgrey.toml");
    // postgrey's keys: no DNS facts (on by default in greygate).
    std::fs::write(
        &postgrey,
        "[greylist]\ndelay = \"5m\"\n[dns]\nenabled = false\n",
    )
    .unwrap();
    let r = replay(&["--config", postgrey.to_str().unwrap(), &fixture()]);
    assert_eq!(u(&r["read"]["accepted"]), 5, "{r}");
    assert_eq!(u(&r["read"]["temp_rejected"]), 2);
    assert_eq!(u(&r["read"]["perm_rejected"]), 1);
    // Content-filter re-injection from localhost, and the authenticated submission.
    assert_eq!(u(&r["read"]["skipped"]), 2);
    let t = &r["total"];
    // anna→bob (twice, from two Google /24s), anna→carol, Jan→bob: accepted at once in the
    // log, so their retries are assumed (Postfix: 300 s); orders@supplier.de retried after
    // 10 min in the log; deals@cheap.example never came back.
    assert_eq!(u(&t["messages"]), 6, "{t}");
    assert_eq!(u(&t["at_once"]), 0, "{t}");
    assert_eq!(u(&t["retry_assumed"]), 4, "{t}");
    assert_eq!(u(&t["retry_in_log"]), 1, "{t}");
    assert_eq!(u(&t["never_retried"]), 1, "{t}");
    assert_eq!(u(&t["delay_max"]), 600, "{t}");
    assert_eq!(r["sender_domains"][0]["name"], "gmail.com", "{r}");

    // With DNS facts, the logged host names give org: identities: Gmail's second message
    // comes from another /24 of google.com and passes at once.
    let aware = dir.path().join("aware.toml");
    std::fs::write(&aware, "[dns]\nenabled = true\n").unwrap();
    let r = replay(&["--config", aware.to_str().unwrap(), &fixture()]);
    assert_eq!(u(&r["total"]["at_once"]), 1, "{r}");
    assert!(
        r["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "org:google.com"),
        "{r}"
    );

    // Rotated and gzipped, named in any order: the same result.
    let text = std::fs::read_to_string(fixture()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (old, new) = lines.split_at(14);
    let gz = dir.path().join("maillog.1.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    writeln!(enc, "{}", old.join("\n")).unwrap();
    enc.finish().unwrap();
    let cur = dir.path().join("maillog");
    std::fs::write(&cur, new.join("\n") + "\n").unwrap();
    let r2 = replay(&[
        "--config",
        postgrey.to_str().unwrap(),
        cur.to_str().unwrap(),
        gz.to_str().unwrap(),
    ]);
    let r1 = replay(&["--config", postgrey.to_str().unwrap(), &fixture()]);
    assert_eq!(r1["total"], r2["total"]);

    let (code, out, _) = run_cli(&["replay", "--config", postgrey.to_str().unwrap(), &fixture()]);
    assert_eq!(code, 0);
    assert!(out.contains("never retried"), "{out}");
}

/// `[[config.domains]]` sections in a scenario: `off` and `learn` delay nothing, a longer
/// delay shows in the figures; a bad section is reported at its line.
#[test]
fn simulate_compares_domain_sections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("domains.toml");
    let section = |name: &str, domain: &str, body: &str| {
        format!(
            "[[config]]\nname = \"{name}\"\n[[config.domains]]\nrecipients = [\"{domain}\"]\n{body}\n\n"
        )
    };
    let text = format!(
        "[simulation]\nduration = \"2d\"\nrecipients = 10\nrecipient_domain = \"site.example\"\n\n\
         [[config]]\nname = \"global\"\n\n{}{}{}{}\
         [[sender]]\nname = \"partner\"\nmessages = 40\nmta = \"postfix\"\nnetwork = \"192.0.2.0/24\"\n\
         domain = \"partner.example\"\n",
        section("off", "site.example", "mode = \"off\""),
        section("learn", "SITE.example", "mode = \"learn\""),
        section("slow", "site.example", "delay = \"30m\""),
        section("other", "elsewhere.example", "mode = \"off\""),
    );
    std::fs::write(&path, &text).unwrap();
    let r = simulate(&[path.to_str().unwrap()]);
    let legit = |name: &str| config(&r, name)["legitimate"].clone();
    let global = legit("global");
    assert!(u(&global["delayed"]) > 0, "{global}");
    assert!(u(&global["delay_max"]) < 1800, "{global}");
    for name in ["off", "learn"] {
        let l = legit(name);
        assert_eq!(u(&l["delayed"]), 0, "{name}: {l}");
        assert_eq!(u(&l["delivered"]), u(&global["delivered"]), "{name}: {l}");
    }
    let slow = legit("slow");
    // Each delayed message waits at least the section's 30 minutes.
    assert!(u(&slow["delayed"]) >= u(&global["delayed"]), "{slow}");
    assert!(u(&slow["delay_p95"]) >= 1800, "{slow}");
    // No delayed message waited 15 minutes or less (buckets: none, ≤ 5 min, 5–15 min, ...).
    let histogram = slow["histogram"].as_array().unwrap();
    assert_eq!(u(&histogram[1]) + u(&histogram[2]), 0, "{slow}");
    // A section for another domain changes nothing.
    assert_eq!(legit("other"), global);

    let bad = text.replace("mode = \"learn\"", "mode = \"sometimes\"");
    std::fs::write(&path, &bad).unwrap();
    let line = bad.lines().position(|l| l.contains("sometimes")).unwrap() + 1;
    let (code, _, err) = run_cli(&["simulate", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("domains.toml:{line}:")), "{err}");
}

/// `replay` with `[[domains]]` sections: one recipient `off`, one `learn`, one with a
/// longer delay; the report adds a table per section.
#[test]
fn replay_with_domain_sections() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("domains.toml");
    std::fs::write(
        &cfg,
        "[dns]\nenabled = false\n\n[[domains]]\nname = \"bob-off\"\nrecipients = [\"bob@site.example\"]\nmode = \"off\"\n\n\
         [[domains]]\nname = \"carol-learn\"\nrecipients = [\"carol@site.example\"]\nmode = \"learn\"\n\n\
         [[domains]]\nname = \"dave-slow\"\nrecipients = [\"dave@site.example\"]\ndelay = \"15m\"\n",
    )
    .unwrap();
    let r = replay(&["--config", cfg.to_str().unwrap(), &fixture()]);
    let t = &r["total"];
    // Bob's three messages and Carol's: at once (without sections: all four delayed).
    assert_eq!(u(&t["messages"]), 6, "{t}");
    assert_eq!(u(&t["at_once"]), 4, "{t}");
    assert_eq!(u(&t["never_retried"]), 1, "{t}");
    let section = |name: &str| {
        r["domain_sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("no section {name}: {r}"))
            .clone()
    };
    assert_eq!(u(&section("bob-off")["messages"]), 3);
    assert_eq!(u(&section("bob-off")["at_once"]), 3);
    assert_eq!(u(&section("carol-learn")["at_once"]), 1);
    // orders@supplier.de retried after 10 min: too early for 15 min; passes on a later
    // (assumed) retry.
    let dave = section("dave-slow");
    assert_eq!(u(&dave["messages"]), 2, "{dave}");
    assert!(u(&dave["delay_max"]) >= 900, "{dave}");
    assert_eq!(u(&dave["retry_in_log"]), 0, "{dave}");

    let (code, out, _) = run_cli(&["replay", "--config", cfg.to_str().unwrap(), &fixture()]);
    assert_eq!(code, 0);
    assert!(out.contains("DOMAIN SECTION"), "{out}");
    assert!(out.contains("dave-slow"), "{out}");
}
