//! A private PostgreSQL per test: `initdb` in a temp directory, the server on a free
//! loopback port with its socket in that directory, trust authentication, no fsync (the
//! tests crash the server on purpose, never the machine, so the OS keeps what was
//! committed). It can be stopped the hard way
//! (`pg_ctl stop -m immediate`: every backend exits at once, as in a crash) and started
//! again on the same port and data. Stopped on drop; never the system's cluster.
//! [`Postgres::start_on`] runs one on a host of a multi-host test bed instead (`netns.rs`),
//! listening on that host's address and trusting the bed's network.
//!
//! PostgreSQL refuses to run as root, so as root the harness runs `initdb` and `pg_ctl` as
//! the `postgres` user, which owns the temp directory. Without the server binaries the
//! tests that need them skip with a printed reason under plain `cargo test` and fail under
//! the README's test command (`GREYGATE_REQUIRE_PEERS=1`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::netns::{self, Host};
use super::peers_required;
use super::postfix::free_port;

/// The newest installed server's `bin` directory (Debian: /usr/lib/postgresql/N/bin).
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A running private PostgreSQL.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    running: bool,
    dir: tempfile::TempDir,
    /// The address it listens on: 127.0.0.1, or its bed host's address.
    host: Ipv4Addr,
    /// The network namespace it runs in, when on a bed host.
    netns: Option<String>,
    /// `ssl = on` with this certificate and key (`start_tls`).
    tls: Option<(PathBuf, PathBuf)>,
}

impl Postgres {
    /// Creates and starts one, or returns `None` (after printing why) when PostgreSQL is
    /// missing and real peers are not required; panics when they are.
    pub fn start(test: &str) -> Option<Postgres> {
        Self::start_at(test, None, None)
    }

    /// One on `host` of a multi-host test bed, listening on the host's address and port
    /// 5432 (the namespace is its own), trusting clients from `network` (the bed's /24),
    /// or `None` as for `start`.
    pub fn start_on(test: &str, host: &Host, network: &str) -> Option<Postgres> {
        Self::start_at(test, Some((host, network)), None)
    }

    /// Like `start`, with `ssl = on`: the server's certificate, for `names` (`DNS:localhost`,
    /// `IP:127.0.0.1`...), is signed by a test CA made for it; returns the server and the
    /// CA's certificate (PEM). Plain connections are still accepted.
    pub fn start_tls(test: &str, names: &str) -> Option<(Postgres, PathBuf)> {
        if !super::tool_available(test, "/usr/bin/openssl") {
            return None;
        }
        let certs = tempfile::tempdir().expect("temp dir");
        let ca = super::tls::TestCa::new(certs.path(), "server-ca");
        let (cert, key) = ca.issue(certs.path(), "server", names);
        let pg = Self::start_at(test, None, Some((cert, key)))?;
        let ca_file = pg.dir().join("ca.pem");
        std::fs::copy(&ca.cert, &ca_file).expect("copy CA");
        Some((pg, ca_file))
    }

    fn start_at(
        test: &str,
        on: Option<(&Host, &str)>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            let why = "PostgreSQL server binaries (initdb, pg_ctl) not installed \
                       (scripts/test installs postgresql)";
            assert!(
                !peers_required(),
                "{test}: real PostgreSQL required but {why}"
            );
            eprintln!("skipped {test}: {why}");
            return None;
        };
        // As root, in /tmp: the `postgres` user must be able to reach the directory, which
        // a private TMPDIR may not allow.
        let parent = if is_root() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("gg-pg-")
            .tempdir_in(parent)
            .expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let pg = Postgres {
            port: if on.is_some() { 5432 } else { free_port() },
            bin,
            running: false,
            dir,
            host: on.map_or(Ipv4Addr::LOCALHOST, |(h, _)| h.addr),
            netns: on.map(|(h, _)| h.ns.clone()),
            tls: None,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
        );
        if let Some((_, network)) = on {
            // initdb trusts loopback only; the bed's hosts connect from their addresses.
            use std::io::Write;
            let hba = Path::new(&data).join("pg_hba.conf");
            std::fs::OpenOptions::new()
                .append(true)
                .open(&hba)
                .and_then(|mut f| writeln!(f, "host all all {network} trust"))
                .unwrap_or_else(|e| panic!("{}: {e}", hba.display()));
        }
        let mut pg = pg;
        if let Some((cert, key)) = tls {
            // In the server's directory, owned by the server's user, the key private: the
            // server refuses a key others can read.
            let (c, k) = (pg.dir().join("server.pem"), pg.dir().join("server.key"));
            std::fs::copy(cert, &c).expect("copy certificate");
            std::fs::copy(key, &k).expect("copy key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            if is_root() {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&c)
                    .arg(&k)
                    .status()
                    .expect("chown");
                assert!(status.success());
            }
            pg.tls = Some((c, k));
        }
        pg.start_again();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a server program, as `postgres` when we are root; panics with its output on
    /// failure.
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        if let Some(ns) = &self.netns {
            // The server that `pg_ctl start` forks stays in the namespace.
            netns::enter(&mut cmd, ns);
        }
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Connection URL for the `postgres` superuser's database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.host, self.port)
    }

    /// Starts the server (again) on the same port and data; returns when it accepts
    /// connections.
    pub fn start_again(&mut self) {
        let data = self.data();
        let dir = self.dir.path().display().to_string();
        let mut options = format!(
            "-p {} -k {dir} -c listen_addresses={} -c fsync=off \
             -c full_page_writes=off -c max_connections=200",
            self.port, self.host
        );
        if let Some((cert, key)) = &self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let log = format!("{dir}/server.log");
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &options, "-l", &log, "-w", "-t", "60", "start",
            ],
        );
        self.running = true;
    }

    /// Stops the server the hard way: backends exit at once, clients see their
    /// connections drop, and the next start runs crash recovery.
    pub fn crash(&mut self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        self.running = false;
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let path = self.bin.join("pg_ctl");
            let mut cmd = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&path);
                c
            } else {
                Command::new(&path)
            };
            let _ = cmd
                .args(["-D", &data, "-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
