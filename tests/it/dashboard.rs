//! The web dashboard in a real headless Chromium, driven through ChromeDriver's WebDriver
//! API: the page loads without console errors, its counters match the traffic the test
//! sent, the explain box answers, an allow entry can be added, a deferral released, and with `token_for_reads`
//! the page asks for the token before it shows data; screenshots are kept as artifacts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::admin::{TOKEN, admin_toml};
use crate::harness::{DaemonConfig, peers_required, rcpt_request};

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The end of ChromeDriver's log, for a failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A ChromeDriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts ChromeDriver and waits until it is ready. The port is free when chosen but
    /// may be taken before ChromeDriver binds it (the suite starts servers in parallel): a
    /// driver that exits before it is ready is started again on another port.
    fn start(bin: &Path, log: &Path) -> Driver {
        for _ in 0..3 {
            if let Some(d) = Driver::try_start(bin, log) {
                return d;
            }
        }
        panic!(
            "chromedriver exited before it was ready, three times; its log:\n{}",
            log_tail(log)
        );
    }

    /// `None` when ChromeDriver exited before it was ready.
    fn try_start(bin: &Path, log: &Path) -> Option<Driver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build()
                .into(),
        };
        // Generous: with two dashboard tests and the rest of the suite on a small shared
        // machine, ChromeDriver has been seen to need more than 20 s to answer.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(v) = d.call("GET", "/status", None)
                && v["value"]["ready"] == true
            {
                return Some(d);
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                eprintln!("chromedriver on port {port} exited ({status}) before it was ready");
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver never became ready; its log:\n{}",
                log_tail(log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "POST" => self
                .agent
                .post(&url)
                .send_json(body.unwrap_or_else(|| json!({}))),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.get(&url).call(),
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if status >= 400 {
            return Err(format!("{method} {path}: {status} {v}"));
        }
        Ok(v)
    }
}

struct Session<'a> {
    d: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let p = format!("/session/{}{path}", self.id);
        self.d
            .call(method, &p, body)
            .unwrap_or_else(|e| panic!("{e}"))["value"]
            .clone()
    }

    fn script(&self, js: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    fn text(&self, css: &str) -> String {
        let js =
            format!("const e = document.querySelector({css:?}); return e ? e.textContent : null;");
        self.script(&js).as_str().unwrap_or_default().to_string()
    }

    fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let t = self.text(css);
            if ok(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "{what}: {css} shows {t:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn element(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// Console messages at level SEVERE (errors, failed loads, CSP violations).
    fn console_errors(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", Some(json!({"type": "browser"})));
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["level"] == "SEVERE")
            .map(|m| m["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// Chromium and ChromeDriver, or `None` (the test is skipped, or fails when peers are
/// required) when they are not installed.
fn browser(test: &str) -> Option<(PathBuf, PathBuf)> {
    let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver"]);
    let (Some(chromium), Some(driver_bin)) = (chromium, driver) else {
        let why = "chromium and chromium-driver are not installed (scripts/test installs them)";
        assert!(
            !peers_required(),
            "{test}: real Chromium required but {why}"
        );
        eprintln!("skipped {test}: {why}");
        return None;
    };
    Some((chromium, driver_bin))
}

/// A new headless Chromium session with a fresh profile in `profile`.
fn open_session<'a>(drv: &'a Driver, chromium: &Path, profile: &Path) -> Session<'a> {
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:loggingPrefs": {"browser": "ALL"},
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1400,1300",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    }}});
    let created = drv
        .call("POST", "/session", Some(caps))
        .unwrap_or_else(|e| panic!("cannot start Chromium: {e}"));
    let id = created["value"]["sessionId"].as_str().unwrap().to_string();
    Session { d: drv, id }
}

/// Keeps a screenshot of the page as `target/tmp/artifacts/NAME`.
fn keep_screenshot(s: &Session<'_>, name: &str) {
    let shot = s.cmd("GET", "/screenshot", None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let path = artifacts.join(name);
    std::fs::write(&path, &png).unwrap();
    eprintln!("dashboard screenshot: {}", path.display());
}

#[test]
fn dashboard_in_headless_chromium() {
    let Some((chromium, driver_bin)) = browser("dashboard_in_headless_chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A section that changes nothing but its name, shown with the recent decisions.
    let section = "\n[[domains]]\nname = \"org-mail\"\nrecipients = [\"example.org\"]\n";
    let d = DaemonConfig::new(dir.path())
        .toml(&admin_toml(section))
        .start();
    let mut c = d.client();
    for i in 1..=3 {
        let r = c.ask(&rcpt_request(
            &format!("203.0.{i}.10"),
            "newsletter@shop.example",
            "bob@example.org",
        ));
        assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    }
    assert_eq!(
        c.ask(&rcpt_request(
            "198.51.100.1",
            "x@example.net",
            "postmaster@example.org"
        )),
        "DUNNO"
    );

    let profile = tempfile::tempdir().unwrap();
    let drv = Driver::start(&driver_bin, &dir.path().join("chromedriver.log"));
    let s = open_session(&drv, &chromium, profile.path());

    s.cmd("POST", "/url", Some(json!({"url": d.admin_url() + "/"})));
    assert_eq!(s.script("return document.title;"), "greygate");
    s.wait_text("#count-defer", |t| t == "3", "deferred counter");
    assert_eq!(s.text("#count-pass"), "1");
    assert_eq!(s.text("#count-skip"), "0");
    s.wait_text(
        "#top-groups tbody",
        |t| t.contains("203.0.1.0/24"),
        "top groups",
    );
    s.wait_text(
        "#top-domains tbody",
        |t| t.contains("shop.example"),
        "top domains",
    );
    s.wait_text(
        "#recent tbody",
        |t| t.contains("allow-recipient"),
        "recent decisions",
    );
    assert!(
        s.text("#recent tbody").contains("org-mail"),
        "the section is shown"
    );
    let points = s.script("return document.querySelectorAll('#chart polyline').length;");
    assert_eq!(points, 2, "pass and defer lines drawn");

    // The explain box answers from the live store.
    s.type_into("#explain-client", "203.0.1.99");
    s.type_into("#explain-from", "newsletter@shop.example");
    s.type_into("#explain-to", "bob@example.org");
    s.click("#explain-submit");
    let x = s.wait_text("#explain-result", |t| t.contains("rule:"), "explain result");
    assert!(x.contains("early-retry"), "{x}");

    // Changes without the token are refused and say why; with it they apply.
    s.type_into("#entry-value", "203.0.2.0/24");
    s.click("#entry-submit");
    s.wait_text("#entry-message", |t| t.contains("token"), "refusal");
    s.type_into("#entry-value", "203.0.2.0/24");
    s.type_into("#entry-comment", "partner relay");
    s.type_into("#entry-token", TOKEN);
    s.click("#entry-submit");
    s.wait_text("#entry-message", |t| t.starts_with("added #1"), "added");
    s.wait_text(
        "#entries tbody",
        |t| t.contains("partner relay"),
        "entry listed",
    );
    assert_eq!(
        c.ask(&rcpt_request(
            "203.0.2.10",
            "newsletter@shop.example",
            "bob@example.org"
        )),
        "DUNNO",
        "the entry added in the browser applies"
    );
    s.wait_text("#count-pass", |t| t == "2", "counter follows traffic");

    // The release button beside a deferral (the token is in the form): the sender's next
    // retry is accepted at once, long before the 300 s delay.
    s.wait_text(
        "#recent tbody",
        |t| t.contains("203.0.3.0/24"),
        "deferral listed",
    );
    let buttons = s.script("return document.querySelectorAll('#recent button.release').length;");
    assert!(buttons.as_u64().unwrap_or(0) >= 3, "{buttons}");
    // Found and clicked in one script: the table is redrawn every few seconds.
    let clicked = s.script(
        "for (const tr of document.querySelectorAll('#recent tbody tr')) { \
           if (tr.textContent.includes('203.0.3.0/24')) { \
             tr.querySelector('button.release').click(); return true; } } \
         return false;",
    );
    assert_eq!(clicked, true);
    s.wait_text(
        "#release-message",
        |t| t.contains("released 203.0.3.0/24 / newsletter@shop.example / bob@example.org"),
        "release message",
    );
    let reply = c.ask(&rcpt_request(
        "203.0.3.10",
        "newsletter@shop.example",
        "bob@example.org",
    ));
    assert!(reply.starts_with("PREPEND X-Greylist: delayed"), "{reply}");
    s.wait_text(
        "#recent tbody",
        |t| t.contains("released"),
        "the released pass listed",
    );
    d.expect_log("released who=\"admin token from 127.0.0.1:");

    keep_screenshot(&s, "dashboard.png");

    // Only the 401 of the refused change may show up (Chromium logs failed fetches).
    end_without_console_errors_but_401s(&drv, &s);
}

/// With `token_for_reads` the page itself loads without the token (it holds no data),
/// asks for the token, and shows the data once it is given; a wrong one is refused with
/// the reason. The token is kept in the tab's session storage only: no cookie, nothing in
/// localStorage, and a reload of the page in the same tab needs no second entry.
#[test]
fn dashboard_asks_for_the_token_when_reads_need_it() {
    let Some((chromium, driver_bin)) = browser("dashboard_asks_for_the_token_when_reads_need_it")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonConfig::new(dir.path())
        .toml(&admin_toml("token_for_reads = true\n"))
        .start();
    let mut c = d.client();
    for i in 1..=2 {
        let r = c.ask(&rcpt_request(
            &format!("203.0.{i}.10"),
            "newsletter@shop.example",
            "bob@example.org",
        ));
        assert!(r.starts_with("DEFER_IF_PERMIT"), "{r}");
    }

    let profile = tempfile::tempdir().unwrap();
    let drv = Driver::start(&driver_bin, &dir.path().join("chromedriver.log"));
    let s = open_session(&drv, &chromium, profile.path());
    let visible = "return !document.querySelector('#token-panel').hidden;";

    s.cmd("POST", "/url", Some(json!({"url": d.admin_url() + "/"})));
    assert_eq!(s.script("return document.title;"), "greygate");
    s.wait_text("#status", |t| t == "admin token needed", "token asked for");
    assert_eq!(s.script(visible), true, "the token form shows");
    assert_eq!(s.text("#count-defer"), "–", "no data without the token");

    s.type_into("#token-input", "wrong-token-0123456789");
    s.click("#token-submit");
    s.wait_text(
        "#token-message",
        |t| t.contains("wrong admin token"),
        "refusal",
    );
    assert_eq!(s.script(visible), true);
    keep_screenshot(&s, "dashboard-token-asked.png");

    s.type_into("#token-input", TOKEN);
    s.click("#token-submit");
    s.wait_text("#count-defer", |t| t == "2", "deferred counter");
    s.wait_text(
        "#top-groups tbody",
        |t| t.contains("203.0.1.0/24"),
        "top groups",
    );
    assert_eq!(s.script(visible), false, "the token form is gone");
    let kept = s.script(
        "return [sessionStorage.getItem('greygate-token'), localStorage.length, document.cookie];",
    );
    assert_eq!(kept, json!([TOKEN, 0, ""]), "session storage only");

    // The same tab keeps it across a reload; the explain box reads with it too.
    s.cmd("POST", "/refresh", Some(json!({})));
    s.wait_text("#count-defer", |t| t == "2", "counter after a reload");
    assert_eq!(s.script(visible), false);
    s.type_into("#explain-client", "203.0.1.99");
    s.type_into("#explain-from", "newsletter@shop.example");
    s.type_into("#explain-to", "bob@example.org");
    s.click("#explain-submit");
    s.wait_text("#explain-result", |t| t.contains("rule:"), "explain result");
    keep_screenshot(&s, "dashboard-token.png");

    // Only the refused reads before the token may show up.
    end_without_console_errors_but_401s(&drv, &s);
}

/// Asserts the page logged no console error other than refused (401) fetches, which
/// Chromium logs; ends the browser session.
fn end_without_console_errors_but_401s(drv: &Driver, s: &Session<'_>) {
    let errors: Vec<String> = s
        .console_errors()
        .into_iter()
        .filter(|m| !m.contains("401 (Unauthorized)"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    let _ = drv.call("DELETE", &format!("/session/{}", s.id), None);
}
