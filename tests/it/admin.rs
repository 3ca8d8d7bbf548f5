//! The admin API, `/metrics`, runtime entries and reloads, driven over HTTP against the
//! real daemon.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Daemon, DaemonConfig, rcpt_request};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn admin_toml(extra: &str) -> String {
    format!("[greylist]\ndelay = 300\n\n[admin]\ntoken = \"{TOKEN}\"\n{extra}")
}

/// A plain HTTP client that reports every status instead of failing on 4xx/5xx.
pub struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    pub fn new(d: &Daemon) -> Self {
        Http {
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build()
                .into(),
            base: d.admin_url(),
        }
    }

    fn finish(mut r: ureq::http::Response<ureq::Body>) -> (u16, String) {
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        Self::finish(
            self.agent
                .get(format!("{}{path}", self.base))
                .call()
                .unwrap(),
        )
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut r = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        let (s, b) = Self::finish(r.send_json(body).unwrap());
        (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
    }

    pub fn delete(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut r = self.agent.delete(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        let (s, b) = Self::finish(r.call().unwrap());
        (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
    }
}

/// `/metrics` parsed by a Prometheus text parser: value by name and sorted labels.
pub fn scrape(http: &Http) -> HashMap<String, f64> {
    let (status, body) = http.get("/metrics");
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => {
                out.insert(
                    format!("{}_count{{{}}}", s.metric, labels.join(",")),
                    h.iter().map(|b| b.count).fold(0.0, f64::max),
                );
                continue;
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

/// Waits until the daemon has counted `n` decisions: it counts (and logs) a decision just
/// after its reply goes out, so a reply can reach the test a moment before the count moves.
fn counted(http: &Http, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = http.get_json("/api/stats");
        let total: u64 = ["pass", "defer", "skip"]
            .iter()
            .map(|k| s[*k].as_u64().unwrap_or(0))
            .sum();
        if total >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon counted {total} decisions, not {n}: {s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no metric {key}; have {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let before = scrape(&http);
    assert_eq!(
        metric(&before, "greygate_decisions_total{rule=new,verdict=defer}"),
        0.0
    );
    assert_eq!(metric(&before, "greygate_store_available{}"), 1.0);
    assert!(before.contains_key("greygate_build_info{version=0.1.0}"));

    let mut c = d.client();
    for i in 0..3 {
        let a = c.ask(&rcpt_request(
            &format!("192.0.{i}.1"),
            "alice@example.net",
            "bob@example.org",
        ));
        assert!(a.starts_with("DEFER_IF_PERMIT"), "{a}");
    }
    let early = c.ask(&rcpt_request(
        "192.0.0.1",
        "alice@example.net",
        "bob@example.org",
    ));
    assert!(early.starts_with("DEFER_IF_PERMIT"), "{early}");
    let allowed = c.ask(&rcpt_request(
        "198.51.100.1",
        "x@example.net",
        "postmaster@example.org",
    ));
    assert_eq!(allowed, "DUNNO");

    counted(&http, 5);
    let after = scrape(&http);
    assert_eq!(
        metric(&after, "greygate_decisions_total{rule=new,verdict=defer}"),
        3.0
    );
    assert_eq!(
        metric(
            &after,
            "greygate_decisions_total{rule=early-retry,verdict=defer}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "greygate_decisions_total{rule=allow-recipient,verdict=pass}"
        ),
        1.0
    );
    assert_eq!(
        metric(&after, "greygate_decision_duration_seconds_count{}"),
        5.0
    );
    assert!(metric(&after, "greygate_store_operations_total{op=update_triplet}") >= 4.0);
    let listener = d.listeners[0].clone();
    let open = format!("greygate_connections_open{{listener={listener},protocol=policy}}");
    assert_eq!(metric(&after, &open), 1.0, "the test's connection is open");
    assert_eq!(metric(&after, "greygate_fail_open_total{}"), 0.0);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(metric(&scrape(&http), &open), 0.0, "closed again");
    // Entry counts are cached for a few seconds; they reach the new records eventually.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&http);
        if m.get("greygate_entries{state=pending}") == Some(&3.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pending entries never reached 3: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn stats_explain_and_activity_match_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let mut c = d.client();
    c.ask(&rcpt_request(
        "203.0.113.5",
        "news@lists.example",
        "bob@example.org",
    ));
    c.ask(&rcpt_request(
        "203.0.113.6",
        "news@lists.example",
        "carol@example.org",
    ));
    c.ask(&rcpt_request(
        "198.51.100.1",
        "x@example.net",
        "postmaster@example.org",
    ));

    counted(&http, 3);
    let stats = http.get_json("/api/stats");
    assert_eq!(stats["defer"], 2);
    assert_eq!(stats["pass"], 1);
    assert_eq!(stats["mode"], "enforce");
    assert_eq!(stats["store_available"], true);
    assert_eq!(stats["policy"]["delay"], 300);

    let recent = http.get_json("/api/recent?limit=10");
    let recent = recent.as_array().unwrap();
    assert_eq!(recent.len(), 3);
    assert_eq!(recent[0]["rule"], "allow-recipient", "newest first");
    assert_eq!(recent[2]["group"], "203.0.113.0/24");

    let top = http.get_json("/api/top");
    assert_eq!(top["client_groups"][0]["name"], "203.0.113.0/24");
    assert_eq!(top["client_groups"][0]["defers"], 2);
    assert_eq!(top["sender_domains"][0]["name"], "lists.example");

    let series = http.get_json("/api/series?seconds=60");
    let buckets = series["buckets"].as_array().unwrap();
    let defers: u64 = buckets.iter().map(|b| b["defer"].as_u64().unwrap()).sum();
    assert_eq!(defers, 2);

    // Explain reads the live store and changes nothing.
    let x =
        http.get_json("/api/explain?client=203.0.113.9&from=news@lists.example&to=bob@example.org");
    assert_eq!(x["decision"]["rule"], "early-retry");
    assert_eq!(x["decision"]["key"]["client"], "203.0.113.0/24");
    assert!(x["text"].as_str().unwrap().contains("early-retry"));
    let again = http.get_json("/api/stats");
    assert_eq!(again["defer"], 2, "explain is not a decision");
    let (status, body) = http.get("/api/explain?client=not-an-ip&to=a@b");
    assert_eq!(status, 400, "{body}");
}

#[test]
fn changes_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let entry = json!({"target": "client", "value": "192.0.2.0/24"});
    for token in [None, Some("wrong-token-0123456789")] {
        let (s, b) = http.post("/api/runtime/allow", token, &entry);
        assert_eq!(s, 401, "{b}");
        let (s, _) = http.post("/api/reload", token, &json!({}));
        assert_eq!(s, 401);
        let (s, _) = http.delete("/api/runtime/allow/1", token);
        assert_eq!(s, 401);
    }
    let (s, b) = http.post("/api/runtime/allow", Some(TOKEN), &entry);
    assert_eq!(s, 201, "{b}");
    // Reads stay open on loopback, but only for local Host names (DNS rebinding).
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for host in [
        "evil.example",
        "[::1].evil.example",
        "127.0.0.1.evil.example",
    ] {
        let r = agent
            .get(format!("{}/api/stats", d.admin_url()))
            .header("Host", host)
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{host}");
    }
}

#[test]
fn reads_can_require_the_token_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(&admin_toml("token_for_reads = true\n"))
        .start();
    let http = Http::new(&d);
    let (s, _) = http.get("/api/stats");
    assert_eq!(s, 401);
    let (s, _) = http.get("/metrics");
    assert_eq!(s, 401);
    let (s, _) = http.get("/healthz");
    assert_eq!(s, 200, "health checks need no token");
    // The dashboard's own files hold no data: served without the token, so that the page
    // can ask for it. Only reads of them.
    for path in ["/", "/app.js", "/app.css", "/icon.svg"] {
        let (s, b) = http.get(path);
        assert_eq!(s, 200, "{path}: {b}");
    }
    let (s, _) = http.post("/", None, &json!({}));
    assert_eq!(s, 401);
    let (s, _) = http.get("/api/entries");
    assert_eq!(s, 401);
}

#[test]
fn runtime_entries_allow_deny_expire_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml(&admin_toml(""));
    let d = cfg.start();
    let http = Http::new(&d);
    let mut c = d.client();
    let req = rcpt_request("192.0.2.7", "alice@example.net", "bob@example.org");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));

    let (s, e) = http.post(
        "/api/runtime/allow",
        Some(TOKEN),
        &json!({"value": "192.0.2.0/24", "comment": "partner relay"}),
    );
    assert_eq!(s, 201, "{e}");
    assert_eq!(c.ask(&req), "DUNNO", "allowed at once, same connection");
    d.expect_log("rule=\"runtime-allow\"");

    // A deny entry wins over the allow entry.
    let (s, deny) = http.post(
        "/api/runtime/deny",
        Some(TOKEN),
        &json!({"target": "sender", "value": "@example.net"}),
    );
    assert_eq!(s, 201, "{deny}");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));
    d.expect_log("rule=\"deny\"");
    let (s, _) = http.delete(&format!("/api/runtime/deny/{}", deny["id"]), Some(TOKEN));
    assert_eq!(s, 200);
    assert_eq!(c.ask(&req), "DUNNO");

    // Bad entries are refused with a reason.
    let (s, b) = http.post(
        "/api/runtime/allow",
        Some(TOKEN),
        &json!({"value": "10.0.0.0/99"}),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b["error"].as_str().unwrap().contains("10.0.0.0/99"), "{b}");

    // An entry with a TTL stops applying when it expires.
    let other = rcpt_request("198.51.100.20", "a@b.example", "c@example.org");
    let (s, _) = http.post(
        "/api/runtime/allow",
        Some(TOKEN),
        &json!({"value": "198.51.100.20", "ttl": "1s"}),
    );
    assert_eq!(s, 201);
    assert_eq!(c.ask(&other), "DUNNO");
    std::thread::sleep(Duration::from_millis(2100));
    assert!(c.ask(&other).starts_with("DEFER_IF_PERMIT"));
    let listed = http.get_json("/api/runtime");
    assert_eq!(listed["entries"].as_array().unwrap().len(), 1, "{listed}");
    drop(c);

    let (status, _) = d.terminate();
    assert!(status.success());
    let d = cfg.start();
    let mut c = d.client();
    assert_eq!(c.ask(&req), "DUNNO", "the allow entry survived the restart");
}

#[test]
fn sighup_reloads_allow_files_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow-clients");
    std::fs::write(&allow, "# partners\n").unwrap();
    let toml = admin_toml("").replace(
        "[admin]",
        &format!("[allow]\nclient_files = [{:?}]\n\n[admin]", allow.display()),
    );
    let cfg = DaemonConfig::new(dir.path()).toml(&toml);
    let d = cfg.start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.44", "alice@example.net", "bob@example.org");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));

    std::fs::write(&allow, "# partners\n192.0.2.44\n").unwrap();
    d.hup();
    d.expect_log("configuration reloaded");
    assert_eq!(c.ask(&req), "DUNNO", "allowed on the same connection");
    d.expect_log("rule=\"allow-client-address\"");

    // A broken configuration is refused; the old one keeps serving.
    let good = std::fs::read_to_string(dir.path().join("greygate.toml")).unwrap();
    std::fs::write(
        dir.path().join("greygate.toml"),
        format!("{good}\n[greylist]\ndelay = \"soon\"\n"),
    )
    .unwrap();
    d.hup();
    d.expect_log("configuration reload refused");
    assert_eq!(c.ask(&req), "DUNNO", "old configuration still serving");
    let http = Http::new(&d);
    let (s, b) = http.post("/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(s, 422, "{b}");
    let m = scrape(&http);
    assert_eq!(metric(&m, "greygate_config_reload_failures_total{}"), 2.0);

    // A broken allow-list file is refused the same way.
    std::fs::write(dir.path().join("greygate.toml"), &good).unwrap();
    std::fs::write(&allow, "192.0.2.44\n300.1.2.3\n").unwrap();
    let (s, b) = http.post("/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains(":2"),
        "points at the line: {b}"
    );
    assert_eq!(c.ask(&req), "DUNNO");

    // Fixed again through the API: the entry is gone, greylisting resumes.
    std::fs::write(&allow, "# nobody\n").unwrap();
    let (s, b) = http.post("/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(s, 200, "{b}");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));
    assert_eq!(
        metric(&scrape(&http), "greygate_config_reloads_total{}"),
        2.0
    );
}

#[test]
fn entries_list_by_filter_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let mut c = d.client();
    for i in 0..5 {
        c.ask(&rcpt_request(
            &format!("192.0.2.{i}"),
            &format!("sender{i}@example.net"),
            "bob@example.org",
        ));
    }
    c.ask(&rcpt_request(
        "203.0.113.9",
        "other@example.com",
        "carol@example.org",
    ));

    let all = http.get_json("/api/entries?state=pending&limit=100");
    assert_eq!(all["entries"].as_array().unwrap().len(), 6, "{all}");
    // An IP finds its group; paging visits every record once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = http.get_json(&format!("/api/entries?client=192.0.2.77&limit=2{cursor}"));
        for e in page["entries"].as_array().unwrap() {
            assert_eq!(e["key"]["client"], "192.0.2.0/24");
            seen.push(e["key"]["sender"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => cursor = format!("&cursor={n}"),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let one = http.get_json("/api/entries?recipient=carol");
    assert_eq!(one["entries"][0]["key"]["sender"], "other@example.com");
    let (s, b) = http.get("/api/entries?state=soon");
    assert_eq!(s, 400, "{b}");

    let (s, _) = http.post("/api/purge", None, &json!({"client": "192.0.2.1"}));
    assert_eq!(s, 401);
    let (s, b) = http.post("/api/purge", Some(TOKEN), &json!({}));
    assert_eq!(s, 400, "a purge without filter needs all=true: {b}");
    let (s, b) = http.post("/api/purge", Some(TOKEN), &json!({"sender": "sender3@"}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["removed"], 1);
    assert_eq!(b["complete"], true);
    let left = http.get_json("/api/entries?limit=100");
    assert_eq!(left["entries"].as_array().unwrap().len(), 5);
    // The purged triplet starts over: a first sighting again.
    c.ask(&rcpt_request(
        "192.0.2.3",
        "sender3@example.net",
        "bob@example.org",
    ));
    // The newest decision is counted a moment after its reply: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let recent = http.get_json("/api/recent?limit=1");
        if recent[0]["rule"] == "new" && recent[0]["sender"] == "sender3@example.net" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{recent}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, b) = http.post("/api/purge", Some(TOKEN), &json!({"all": true}));
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["removed"], 6);
}

/// A selective filter over a store 50 times what one store scan examines: pages come full
/// (no empty pages with a cursor mid-listing), a very selective filter is answered in one
/// request, and a cursor the store did not make is a 400 that says what is wrong.
#[test]
fn filtered_listing_fills_its_pages_over_a_big_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DaemonConfig::new(dir.path()).toml(&admin_toml(""));
    // Senders are u<n>@s<i % 50,000>.example for record i.
    let db = cfg.db_path();
    let (code, out, err) =
        crate::harness::run_cli(&["bench", "--preload", "100000", "--db", db.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let d = cfg.start();
    let http = Http::new(&d);

    // Two records of 100,000: one request, complete.
    let page = http.get_json("/api/entries?sender=@s7.example&limit=50");
    assert_eq!(page["entries"].as_array().unwrap().len(), 2, "{page}");
    assert!(page["next"].is_null(), "{page}");
    assert_eq!(page["budget_spent"], false);

    // s77, s770..s779, s7700..s7799, twice each: 222, in pages of 50, 50, 50, 50, 22.
    let mut sizes = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = http.get_json(&format!("/api/entries?sender=@s77&limit=50{cursor}"));
        assert_eq!(page["budget_spent"], false, "{page}");
        sizes.push(page["entries"].as_array().unwrap().len());
        match page["next"].as_str() {
            Some(n) => cursor = format!("&cursor={n}"),
            None => break,
        }
    }
    assert_eq!(sizes.iter().sum::<usize>(), 222, "{sizes:?}");
    let (last, full) = sizes.split_last().unwrap();
    assert!(full.iter().all(|&n| n == 50), "{sizes:?}");
    assert!(*last <= 50, "{sizes:?}");

    for junk in ["zz", "abc", "x.y"] {
        let (s, b) = http.get(&format!("/api/entries?sender=@s77&cursor={junk}"));
        assert_eq!(s, 400, "{junk}: {b}");
        assert!(b.contains("not a scan cursor of this store"), "{b}");
    }
}

/// Every answer the real handlers write reads back into the `wire` type the CLI reads it
/// with: a field renamed on one side only fails here, not as a zero in the CLI's output.
#[test]
fn every_answer_reads_into_its_wire_type() {
    use greygate::admin::wire;
    use serde::de::DeserializeOwned;

    fn typed<T: DeserializeOwned>(what: &str, v: Value) -> T {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}: {v}"))
    }

    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let http = Http::new(&d);
    let mut c = d.client();
    c.ask(&rcpt_request(
        "192.0.2.5",
        "alice@example.net",
        "bob@example.org",
    ));
    counted(&http, 1);

    let stats: wire::StatsView = typed("stats", http.get_json("/api/stats"));
    assert_eq!((stats.defer, stats.listeners.len()), (1, 1), "{stats:?}");
    assert!(stats.entries.is_some(), "{stats:?}");
    let recent: wire::Recent = typed("recent", http.get_json("/api/recent"));
    assert_eq!(recent.len(), 1);
    let series: wire::Series = typed("series", http.get_json("/api/series?seconds=60"));
    assert_eq!(series.buckets.iter().map(|b| b.defer).sum::<u64>(), 1);
    let top: wire::Top = typed("top", http.get_json("/api/top"));
    assert_eq!(top.client_groups[0].name, "192.0.2.0/24");
    let x: wire::ExplainAnswer = typed(
        "explain",
        http.get_json("/api/explain?client=192.0.2.6&from=alice@example.net&to=bob@example.org"),
    );
    assert_eq!(x.explanation.decision.rule.as_str(), "early-retry");
    assert!(x.explanation.decision.record.is_some());
    assert!(x.text.contains("early-retry"), "{}", x.text);
    let page: wire::EntriesPage = typed("entries", http.get_json("/api/entries"));
    assert_eq!((page.entries.len(), page.next), (1, None));

    let (s, e) = http.post(
        "/api/runtime/allow",
        Some(TOKEN),
        &json!({"value": "198.51.100.0/24", "ttl": 3600}),
    );
    assert_eq!(s, 201, "{e}");
    let added: greygate::engine::RuntimeEntry = typed("added", e);
    assert!(added.expires_at.is_some());
    let listed: wire::RuntimeList = typed("runtime", http.get_json("/api/runtime"));
    assert_eq!(listed.entries, vec![added.clone()]);
    let (s, r) = http.delete(&format!("/api/runtime/allow/{}", added.id), Some(TOKEN));
    assert_eq!(s, 200, "{r}");
    let removed: wire::Removed = typed("removed", r);
    assert_eq!(removed.removed, vec![added]);
    let (s, r) = http.post(
        "/api/release",
        Some(TOKEN),
        &json!({"recipient": "bob@example.org"}),
    );
    assert_eq!(s, 200, "{r}");
    let released: wire::ReleaseReport = typed("release", r);
    assert_eq!((released.count, released.complete), (1, true));
    assert_eq!(released.released[0].client, "192.0.2.0/24");
    let (s, r) = http.post("/api/purge", Some(TOKEN), &json!({"all": true}));
    assert_eq!(s, 200, "{r}");
    let purged: wire::PurgeReport = typed("purge", r);
    assert_eq!((purged.removed, purged.complete), (1, true));
    let (s, r) = http.post("/api/reload", Some(TOKEN), &json!({}));
    assert_eq!(s, 200, "{r}");
    let _: wire::ReloadReport = typed("reload", r);

    let (s, body) = http.get("/api/explain?client=not-an-ip&to=a@b");
    assert_eq!(s, 400, "{body}");
    let err: wire::ErrorBody = typed("error", serde_json::from_str(&body).unwrap());
    assert!(err.error.contains("not-an-ip"), "{}", err.error);
}

/// `greygate ARGS --config DIR/greygate.toml --admin URL`.
fn cli(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().unwrap(), "--admin", &url]);
    crate::harness::run_cli(&all)
}

#[test]
fn cli_commands_talk_to_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path()).toml(&admin_toml("")).start();
    let mut c = d.client();
    let req = rcpt_request("192.0.2.50", "Alice+news@Example.NET", "bob@example.org");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));

    counted(&Http::new(&d), 1);
    let (code, out, err) = cli(&d, &["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 passed, 1 deferred"), "{out}");
    assert!(out.contains("new"), "{out}");

    let (code, out, err) = cli(&d, &["list", "--client", "192.0.2.1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pending  192.0.2.0/24"), "{out}");
    assert!(out.contains("alice@example.net"), "{out}");
    let (code, out, _) = cli(&d, &["list", "--state", "passed", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);

    let (code, out, err) = cli(
        &d,
        &[
            "allow",
            "add",
            "192.0.2.0/24",
            "--ttl",
            "1h",
            "--comment",
            "partner",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added #1"), "{out}");
    assert_eq!(c.ask(&req), "DUNNO");
    let (_, out, _) = cli(&d, &["allow", "list"]);
    assert!(
        out.contains("192.0.2.0/24") && out.contains("partner"),
        "{out}"
    );
    let (code, out, err) = cli(
        &d,
        &[
            "explain",
            "--live",
            "--client",
            "192.0.2.9",
            "--from",
            "x@y.example",
            "--to",
            "bob@example.org",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("runtime-allow"), "{out}");
    let (code, out, err) = cli(&d, &["allow", "remove", "#1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 1"), "{out}");
    assert!(c.ask(&req).starts_with("DEFER_IF_PERMIT"));

    let (code, _, err) = cli(&d, &["deny", "add", "@example.net", "--target", "sender"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&d, &["deny", "list", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"][0]["value"], "@example.net");
    let (code, _, err) = cli(&d, &["deny", "remove", "@example.net"]);
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = cli(&d, &["purge"]);
    assert_eq!(code, 2, "a purge needs a filter: {err}");
    let (code, out, err) = cli(&d, &["purge", "--sender", "alice@"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 1"), "{out}");
    let (code, out, _) = cli(&d, &["reload"]);
    assert_eq!(code, 0);
    assert!(out.contains("reloaded"), "{out}");

    // Changes with a wrong token are refused.
    let config = d.dir.join("greygate.toml");
    let url = d.admin_url();
    let (code, _, err) = crate::harness::run_cli(&[
        "allow",
        "add",
        "10.0.0.1",
        "--config",
        config.to_str().unwrap(),
        "--admin",
        &url,
        "--token",
        "wrong-token-123456789",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong admin token"), "{err}");
}

#[test]
fn cli_commands_use_the_store_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gg.redb");
    // An admin address nothing listens on: the commands fall back to the files.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let toml = format!(
        "[greylist]\ndelay = 300\n[store]\nbackend = \"embedded\"\npath = {db:?}\n[admin]\nlisten = [\"127.0.0.1:{port}\"]\ntoken = \"{TOKEN}\"\n"
    );
    let d = DaemonConfig::new(dir.path())
        .toml(&toml)
        .args(&["--admin-listen", "127.0.0.1:0"])
        .start();
    let mut c = d.client();
    c.ask(&rcpt_request(
        "192.0.2.60",
        "a@example.net",
        "b@example.org",
    ));
    c.ask(&rcpt_request(
        "198.51.100.60",
        "c@example.net",
        "d@example.org",
    ));
    drop(c);
    let config = dir.path().join("greygate.toml");
    let cfg = config.to_str().unwrap();
    // The daemon holds the file: offline commands say so with exit 3.
    let (code, _, err) = crate::harness::run_cli(&["list", "--offline", "--config", cfg]);
    assert_eq!(code, 3, "{err}");
    let (status, _) = d.terminate();
    assert!(status.success());

    let (code, out, err) = crate::harness::run_cli(&["list", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no daemon answers"), "{err}");
    assert!(
        out.contains("192.0.2.0/24") && out.contains("198.51.100.0/24"),
        "{out}"
    );
    let (code, out, _) = crate::harness::run_cli(&["stats", "--config", cfg]);
    assert_eq!(code, 0);
    assert!(out.contains("2 pending"), "{out}");
    let (code, out, err) =
        crate::harness::run_cli(&["purge", "--client", "192.0.2.1", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 1"), "{out}");
    let (code, out, err) =
        crate::harness::run_cli(&["allow", "add", "203.0.113.0/24", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added #1"), "{out}");

    // The next daemon sees both changes.
    let d = DaemonConfig::new(dir.path())
        .toml(&toml)
        .args(&["--admin-listen", "127.0.0.1:0"])
        .start();
    let http = Http::new(&d);
    let left = http.get_json("/api/entries");
    assert_eq!(left["entries"].as_array().unwrap().len(), 1, "{left}");
    let mut c = d.client();
    assert_eq!(
        c.ask(&rcpt_request("203.0.113.1", "a@b.example", "c@example.org")),
        "DUNNO"
    );
}

/// Starts `greygate serve ARGS` without the harness's admin override; returns the child
/// and its stderr collected so far once `ready` shows up (or the process ended).
fn serve_raw(args: &[&str], ready: &str) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(crate::harness::greygate_bin())
        .arg("serve")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = crate::harness::read_some(&mut err, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !log.contains(ready) && std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(b) => log.push_str(&String::from_utf8_lossy(&b)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
    }
    (child, log)
}

#[test]
fn a_busy_default_admin_port_does_not_stop_the_mail_service() {
    // Hold the default admin address ourselves (or find it held already).
    let _held = std::net::TcpListener::bind(greygate::admin::DEFAULT_ADMIN_LISTEN);
    let (mut child, log) = serve_raw(
        &["--listen", "127.0.0.1:0", "--memory"],
        "policy listener ready",
    );
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the daemon must keep serving mail:\n{log}");
    assert!(log.contains("default admin address unavailable"), "{log}");

    // An address the operator configured must be free, and the error says which one.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (mut child, log) = serve_raw(
        &[
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "--admin-listen",
            &addr,
        ],
        "never printed",
    );
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        log.contains(&format!("cannot listen on {addr} (admin)")),
        "{log}"
    );
}
