//! A private postgrey (Debian's, `/usr/sbin/postgrey`) on a free loopback port, its
//! Berkeley DB files in a temp directory it owns. Stopped on drop; [`Postgrey::stop`]
//! stops it and waits for it to exit, leaving its database for a look.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::postfix::free_port;

/// A running private postgrey.
pub struct Postgrey {
    pub port: u16,
    pidfile: std::path::PathBuf,
    /// `None` once stopped.
    dir: Option<tempfile::TempDir>,
}

impl Postgrey {
    /// Starts postgrey with `--delay=DELAY` (seconds).
    pub fn start(delay: u64) -> Postgrey {
        Postgrey::start_with(delay, &[])
    }

    /// Starts postgrey with `--delay=DELAY` and further options.
    pub fn start_with(delay: u64, args: &[&str]) -> Postgrey {
        let dir = tempfile::tempdir().unwrap();
        // postgrey drops to its own user; its database directory must be its own.
        let status = Command::new("chown")
            .arg("postgrey:postgrey")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "chown postgrey");
        let port = free_port();
        let pidfile = dir.path().join("postgrey.pid");
        let out = Command::new("/usr/sbin/postgrey")
            .arg(format!("--inet=127.0.0.1:{port}"))
            .arg(format!("--dbdir={}", dir.path().display()))
            .arg(format!("--pidfile={}", pidfile.display()))
            .arg(format!("--delay={delay}"))
            .args(args)
            .arg("--daemonize")
            .stdin(Stdio::null())
            .output()
            .expect("run postgrey");
        assert!(
            out.status.success(),
            "postgrey failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "postgrey never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Postgrey {
            port,
            pidfile,
            dir: Some(dir),
        }
    }

    /// postgrey's `--dbdir`.
    pub fn dbdir(&self) -> &Path {
        self.dir.as_ref().expect("running").path()
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    }

    /// SIGTERM, then waits for postgrey to exit (SIGKILL after 20 s); returns its database
    /// directory, removed when the returned value is dropped.
    pub fn stop(self) -> tempfile::TempDir {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGKILL: postgrey ends without closing its database, as in a crash.
    pub fn kill9(self) -> tempfile::TempDir {
        self.stop_with(libc::SIGKILL)
    }

    fn stop_with(mut self, signal: i32) -> tempfile::TempDir {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid our own postgrey wrote.
            unsafe { libc::kill(pid, signal) };
            if !gone_within(pid, Duration::from_secs(20)) {
                // Seen a few times under the whole suite's load: postgrey still there 60 s
                // after SIGTERM. Say what it was doing, then end it the hard way; its
                // database environment keeps what it wrote (the import reads it all the
                // same, see postgrey_import_reads_what_a_killed_postgrey_left_in_its_cache).
                eprintln!(
                    "postgrey {pid} still running 20 s after signal {signal}: wchan {:?}, \
                     status:\n{}",
                    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default(),
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
                );
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                assert!(
                    gone_within(pid, Duration::from_secs(30)),
                    "postgrey {pid} did not exit"
                );
            }
        }
        self.dir.take().expect("running")
    }
}

/// Waits (polling) until process `pid` is gone; false if it is still there after `limit`.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Whether process `pid` still runs. postgrey daemonizes, so once it exits it waits as a
/// zombie until init reaps it: that counts as gone.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `PID (COMMAND) STATE ...`; the command may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

impl Drop for Postgrey {
    fn drop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid our own postgrey wrote.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}
