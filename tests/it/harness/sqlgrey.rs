//! A private sqlgrey (Debian's, `/usr/sbin/sqlgrey`, Perl) on a free loopback port with
//! its own configuration directory (empty whitelists and regexps), its database in SQLite
//! or a private PostgreSQL. It runs in the foreground as a child of the test and is
//! stopped on drop.
//!
//! sqlgrey needs DBD::SQLite or DBD::Pg (Debian: libdbd-sqlite3-perl, libdbd-pg-perl);
//! scripts/test installs them with it. Without it the tests that need it skip with a
//! printed reason under plain `cargo test` and fail under `GREYGATE_REQUIRE_PEERS=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::peers_required;
use super::postfix::free_port;

const SQLGREY: &str = "/usr/sbin/sqlgrey";

/// Where sqlgrey keeps its tables.
pub enum SqlgreyDb {
    /// An SQLite file (created by sqlgrey).
    Sqlite(PathBuf),
    /// A database on a PostgreSQL server on 127.0.0.1, as the `postgres` superuser.
    Postgres { port: u16, dbname: String },
}

/// Whether sqlgrey and the Perl driver for `db` are installed: false (after printing
/// why) when the test should be skipped; panics when real peers are required.
pub fn available(test: &str, db: &SqlgreyDb) -> bool {
    let (module, package) = match db {
        SqlgreyDb::Sqlite(_) => ("DBD::SQLite", "libdbd-sqlite3-perl"),
        SqlgreyDb::Postgres { .. } => ("DBD::Pg", "libdbd-pg-perl"),
    };
    let why = if !Path::new(SQLGREY).exists() {
        Some(format!(
            "{SQLGREY} is not installed (Debian package sqlgrey)"
        ))
    } else {
        let ok = Command::new("perl")
            .args(["-e", &format!("use {module}; 1")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!ok).then(|| format!("Perl's {module} is not installed (Debian package {package})"))
    };
    match why {
        None => true,
        Some(why) => {
            assert!(!peers_required(), "{test}: real sqlgrey required but {why}");
            eprintln!("skipped {test}: {why}");
            false
        }
    }
}

/// A running private sqlgrey.
pub struct Sqlgrey {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Sqlgrey {
    /// Starts sqlgrey on `db` with `reconnect_delay = 0` (a retry a second later passes)
    /// and the other settings at their defaults (`greymethod = smart`: a client with a
    /// host name is keyed by its first three octets, one without by its whole address).
    pub fn start(db: &SqlgreyDb) -> Sqlgrey {
        // As root, in /tmp: sqlgrey drops to its own user, who must reach the directory.
        let dir = if is_root() {
            tempfile::Builder::new()
                .prefix("gg-sqlgrey-")
                .tempdir_in("/tmp")
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let (user, group) = if is_root() {
            ("sqlgrey".to_string(), "sqlgrey".to_string())
        } else {
            (id("-un"), id("-gn"))
        };
        let port = free_port();
        let db_lines = match db {
            SqlgreyDb::Sqlite(path) => format!("db_type = SQLite\ndb_name = {}\n", path.display()),
            SqlgreyDb::Postgres { port, dbname } => format!(
                "db_type = Pg\ndb_name = {dbname}\ndb_host = 127.0.0.1\ndb_port = {port}\n\
                 db_user = postgres\n"
            ),
        };
        let conf = dir.path().join("sqlgrey.conf");
        std::fs::write(
            &conf,
            format!(
                "conf_dir = {}\ninet = 127.0.0.1:{port}\nuser = {user}\ngroup = {group}\n\
                 pidfile = {}\nreconnect_delay = 0\nloglevel = 3\n{db_lines}",
                dir.path().display(),
                dir.path().join("sqlgrey.pid").display(),
            ),
        )
        .expect("write sqlgrey.conf");
        if is_root() {
            let status = Command::new("chown")
                .arg("-R")
                .arg("sqlgrey:sqlgrey")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown sqlgrey");
        }
        let log = std::fs::File::create(dir.path().join("sqlgrey.log")).expect("log file");
        let child = Command::new(SQLGREY)
            .arg("-f")
            .arg(&conf)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("run sqlgrey");
        let mut s = Sqlgrey { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("sqlgrey exited ({status}):\n{}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "sqlgrey never listened:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// A directory sqlgrey's user may write (for its SQLite file).
    pub fn dir_for_db() -> tempfile::TempDir {
        let dir = if is_root() {
            tempfile::Builder::new()
                .prefix("gg-sqlgrey-db-")
                .tempdir_in("/tmp")
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .arg("sqlgrey:sqlgrey")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown sqlgrey");
        }
        dir
    }

    /// sqlgrey's log so far (its stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sqlgrey.log")).unwrap_or_default()
    }

    /// SIGTERM, and waits (at most 15 s) for sqlgrey to exit.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = i32::try_from(self.child.id()).expect("pid fits i32");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sqlgrey {
    fn drop(&mut self) {
        self.terminate();
    }
}
