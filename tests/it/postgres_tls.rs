//! TLS to PostgreSQL: a private server with `ssl = on` and a certificate signed by a test
//! CA. greygate verifies it with `tls_ca_file` (`sslmode=verify-full`, `verify-ca`),
//! refuses a server its CA did not sign or whose certificate names another host, and says
//! so at start and in `check-config --connect`; `sslmode=require` against a server without
//! TLS fails with a message that says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use greygate::store::{PostgresStore, conformance};

use crate::harness::postgres::Postgres;
use crate::harness::tls::TestCa;
use crate::harness::{DaemonConfig, rcpt_request, run_cli, tool_available};

const SECOND: Duration = Duration::from_secs(1);
/// Certificate names of the test server: the host of `Postgres::url`.
const NAMES: &str = "DNS:localhost,IP:127.0.0.1";

/// The harness's URL with a query appended.
fn url(pg: &Postgres, query: &str) -> String {
    format!("{}?{query}", pg.url())
}

/// `(application_name, ssl, version)` of the server's client connections, as the server
/// sees them (`pg_stat_ssl`), over a plain connection of the test's own.
async fn connections(pg: &Postgres) -> Vec<(String, bool, Option<String>)> {
    let (client, conn) = tokio_postgres::connect(
        &format!("{}?sslmode=disable", pg.url()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    client
        .query(
            "SELECT a.application_name, s.ssl, s.version FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.pid <> pg_backend_pid() \
             AND a.backend_type = 'client backend'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn write_config(dir: &std::path::Path, url: &str, ca: Option<&std::path::Path>) -> String {
    let cfg = dir.join("greygate.toml");
    let ca = ca.map_or(String::new(), |ca| {
        format!("tls_ca_file = {:?}\n", ca.display().to_string())
    });
    std::fs::write(
        &cfg,
        format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\nconnect_timeout = \"2s\"\n{ca}"),
    )
    .unwrap();
    cfg.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_over_verified_tls_conforms_and_is_encrypted() {
    let Some((pg, ca)) = Postgres::start_tls(
        "postgres_store_over_verified_tls_conforms_and_is_encrypted",
        NAMES,
    ) else {
        return;
    };
    let store = Arc::new(
        PostgresStore::with_tls_ca(
            &url(&pg, "sslmode=verify-full"),
            Some(&ca),
            4,
            5 * SECOND,
            5 * SECOND,
        )
        .expect("store"),
    );
    assert_eq!(store.tls(), "verify-full");
    conformance::run(store.clone()).await;
    let seen = connections(&pg).await;
    let ours: Vec<_> = seen.iter().filter(|c| c.0 == "greygate").collect();
    assert!(!ours.is_empty(), "no greygate connection: {seen:?}");
    assert!(
        ours.iter()
            .all(|c| c.1 && c.2.as_deref().is_some_and(|v| v.starts_with("TLSv1."))),
        "a greygate connection without TLS: {seen:?}"
    );
    drop(store);

    // The CA may come as libpq's sslrootcert= in the URL instead.
    let escaped = ca.display().to_string().replace('/', "%2F");
    let store = PostgresStore::with_tls_ca(
        &url(&pg, &format!("sslmode=verify-full&sslrootcert={escaped}")),
        None,
        1,
        5 * SECOND,
        5 * SECOND,
    )
    .expect("store");
    let who = store.check().await.expect("check");
    assert!(who.contains(", TLS TLSv1."), "{who}");
    assert!(who.ends_with("(verify-full)"), "{who}");
}

#[test]
fn greygate_serves_from_postgres_over_verify_full_tls() {
    let Some((pg, ca)) =
        Postgres::start_tls("greygate_serves_from_postgres_over_verify_full_tls", NAMES)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pg_url = url(&pg, "sslmode=verify-full");
    let cfg = write_config(dir.path(), &pg_url, Some(&ca));
    let (code, out, err) = run_cli(&["check-config", "--config", &cfg, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("store server answered: PostgreSQL "), "{out}");
    assert!(out.contains(", TLS TLSv1."), "{out}");
    assert!(out.contains("(verify-full)"), "{out}");

    let d = DaemonConfig::new(dir.path())
        .toml(&format!(
            "[greylist]\ndelay = 2\n\n[store]\nbackend = \"postgres\"\nurl = \"{pg_url}\"\n\
             tls_ca_file = {:?}\n",
            ca.display().to_string()
        ))
        .start();
    d.expect_log("tls=\"verify-full\"");
    let answer = d
        .client()
        .ask(&rcpt_request("192.0.2.1", "a@example.net", "b@example.org"));
    assert!(
        answer.starts_with("DEFER_IF_PERMIT "),
        "greylisted through the store: {answer}\n{}",
        d.log()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(connections(&pg));
    let ours: Vec<_> = seen.iter().filter(|c| c.0 == "greygate").collect();
    assert!(!ours.is_empty(), "no greygate connection: {seen:?}");
    assert!(ours.iter().all(|c| c.1), "a plain connection: {seen:?}");
}

#[test]
fn postgres_with_an_untrusted_certificate_is_refused_clearly() {
    let Some((pg, _right)) = Postgres::start_tls(
        "postgres_with_an_untrusted_certificate_is_refused_clearly",
        NAMES,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = TestCa::new(dir.path(), "other-ca").cert;
    let refused = format!(
        "PostgreSQL server certificate not trusted by tls_ca_file {}",
        wrong.display()
    );

    // check-config --connect: a runtime failure that names the CA file.
    let cfg = write_config(dir.path(), &url(&pg, "sslmode=verify-full"), Some(&wrong));
    let t = Instant::now();
    let (code, out, err) = run_cli(&["check-config", "--config", &cfg, "--connect"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&refused), "{err}");
    assert!(t.elapsed() < 10 * SECOND, "{:?}", t.elapsed());

    // The daemon starts, answers per fail_mode (open), and logs why.
    let d = DaemonConfig::new(dir.path())
        .toml(&format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\ntls_ca_file = {:?}\n",
            url(&pg, "sslmode=verify-ca"),
            wrong.display().to_string()
        ))
        .start();
    let answer = d
        .client()
        .ask(&rcpt_request("192.0.2.1", "a@example.net", "b@example.org"));
    assert_eq!(answer, "DUNNO", "fail-open: {}", d.log());
    assert!(d.wait_log(&refused, 5 * SECOND), "{}", d.log());
    d.expect_log("store server unreachable");
}

#[test]
fn verify_full_refuses_a_certificate_for_another_host_that_verify_ca_accepts() {
    let Some((pg, ca)) = Postgres::start_tls(
        "verify_full_refuses_a_certificate_for_another_host_that_verify_ca_accepts",
        "DNS:db.example",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let check = |mode: &str| {
        let cfg = write_config(dir.path(), &url(&pg, &format!("sslmode={mode}")), Some(&ca));
        run_cli(&["check-config", "--config", &cfg, "--connect"])
    };
    let (code, out, err) = check("verify-ca");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(verify-ca)"), "{out}");
    // A CA with plain `require` checks the chain, as libpq does.
    let (code, out, err) = check("require");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(verify-ca)"), "{out}");
    let (code, out, err) = check("verify-full");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("PostgreSQL server certificate is not valid for host 127.0.0.1"),
        "{err}"
    );
    // Connecting to 127.0.0.1 under the certificate's name passes.
    let pg_url = format!(
        "postgres://postgres@db.example:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full",
        pg.port
    );
    let cfg = write_config(dir.path(), &pg_url, Some(&ca));
    let (code, out, err) = run_cli(&["check-config", "--config", &cfg, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(verify-full)"), "{out}");
}

#[test]
fn require_against_a_server_without_tls_fails_clearly() {
    let Some(pg) = Postgres::start("require_against_a_server_without_tls_fails_clearly") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &url(&pg, "sslmode=require"), None);
    let (code, out, err) = run_cli(&["check-config", "--config", &cfg, "--connect"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("server does not support TLS"), "{err}");
    assert!(err.contains("turn ssl on in the server"), "{err}");
    // Without sslmode (libpq's prefer) the same server is used in clear, and says so.
    let cfg = write_config(dir.path(), &pg.url(), None);
    let (code, out, err) = run_cli(&["check-config", "--config", &cfg, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(", no TLS"), "{out}");
}

#[test]
fn tls_settings_are_checked_with_the_configuration() {
    if !tool_available(
        "tls_settings_are_checked_with_the_configuration",
        "/usr/bin/openssl",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let check = |url: &str, ca: Option<&std::path::Path>| {
        let cfg = write_config(dir.path(), url, ca);
        run_cli(&["check-config", "--config", &cfg])
    };
    let (code, out, err) = check("postgres://gg@db.example/gg?sslmode=verify-full", None);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("sslmode=verify-full needs the CA") && err.contains("greygate.toml:3:"),
        "{err}"
    );
    let missing = dir.path().join("missing.pem");
    let (code, out, err) = check(
        "postgres://gg@db.example/gg?sslmode=verify-full",
        Some(&missing),
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("cannot read tls_ca_file {}", missing.display()))
            && err.contains("greygate.toml:5:"),
        "{err}"
    );
    let ca = TestCa::new(dir.path(), "ca").cert;
    let (code, out, err) = check("postgres://gg@db.example/gg", Some(&ca));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("add sslmode=verify-full"), "{err}");
    let (code, out, err) = check("postgres://gg@db.example/gg?sslmode=verify-full", Some(&ca));
    assert_eq!(code, 0, "{out}{err}");
}
