//! The Debian package (`scripts/package`) installed into this machine with `dpkg -i` and
//! used as an administrator and systemd would: `greygate check-config` against the shipped
//! configuration, the daemon started as the unit starts it (its ExecStartPre and ExecStart,
//! as its User and Group, read from the installed unit file) answering a policy request,
//! the lists timer enabled,
//! every manual page rendered by `man` without a warning, the bash completion loaded,
//! lintian without errors, then `dpkg --remove` (keeps the data) and `dpkg --purge` (leaves
//! nothing behind).
//!
//! Which package: the one `GREYGATE_DEB` names (a release build's, say); otherwise the test
//! packages the binary under test with `scripts/package --binary`, the same script, layout
//! and maintainer scripts as a release package without a second, release, build.
//!
//! It changes the machine: the package, the system user greygate, `/etc/greygate`,
//! `/var/lib/greygate`, and the shipped configuration's ports (127.0.0.1:10023, admin
//! 127.0.0.1:9025; no other test uses them). A package left by an earlier run is purged
//! first, and the package is purged at the end even when the test fails. Needs root and
//! dpkg-deb, dpkg-shlibdeps, lintian, man and setpriv: skipped without them under plain
//! `cargo test`, failed under `GREYGATE_REQUIRE_PEERS=1`. Every command and wait is bounded.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{PolicyClient, greygate_bin, peers_required, rcpt_request, tool_available};

const UNIT: &str = "/usr/lib/systemd/system/greygate.service";
const LISTS_SERVICE: &str = "/usr/lib/systemd/system/greygate-lists.service";
const LISTS_TIMER: &str = "/usr/lib/systemd/system/greygate-lists.timer";
const LISTS_WANTS: &str = "/etc/systemd/system/timers.target.wants/greygate-lists.timer";
const CONFIG: &str = "/etc/greygate/greygate.toml";
const STATE: &str = "/var/lib/greygate";

/// What a finished command said.
struct Ran {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    #[track_caller]
    fn ok(self) -> Ran {
        assert_eq!(
            self.code,
            Some(0),
            "{} failed:\n{}\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion within `limit` (killed and failed past it); its output goes
/// to files, so a chatty command never blocks on a full pipe.
fn run(cmd: &mut Command, limit: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
    Ran {
        what,
        code: status.code(),
        stdout: read(&out),
        stderr: read(&err),
    }
}

/// `dpkg ARGS`, waiting (bounded) while another dpkg or apt holds its lock.
fn dpkg(args: &[&str]) -> Ran {
    let mut attempts = 0;
    loop {
        let ran = run(
            Command::new("dpkg")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(300),
        );
        attempts += 1;
        if ran.code != Some(0) && ran.stderr.contains("locked by another process") && attempts < 60
        {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        return ran;
    }
}

/// The package's dpkg status (`install ok installed`), or `None` when dpkg knows no
/// installed or half-removed greygate.
fn package_status() -> Option<String> {
    let ran = run(
        Command::new("dpkg-query").args(["-W", "-f=${Status}", "greygate"]),
        Duration::from_secs(60),
    );
    let status = ran.stdout.trim().to_string();
    (ran.code == Some(0) && !status.ends_with("not-installed")).then_some(status)
}

/// A `getent DATABASE NAME` entry's fields, or `None`.
fn getent(database: &str, name: &str) -> Option<Vec<String>> {
    let ran = run(
        Command::new("getent").args([database, name]),
        Duration::from_secs(30),
    );
    (ran.code == Some(0)).then(|| ran.stdout.trim().split(':').map(String::from).collect())
}

/// Purges the package (and stops the daemon this test started) when the test ends, failed
/// or not; `purge` does the same on the success path and checks what it did.
struct Installation {
    daemon: Option<Child>,
}

impl Drop for Installation {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if package_status().is_some() {
            let _ = dpkg(&["--purge", "greygate"]);
        }
    }
}

/// The `[Service]` settings of a unit file, in order (comments and other sections skipped).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        assert!(!line.ends_with('\\'), "continued unit line: {line}");
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("key=value in [Service]");
            settings.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    settings
}

/// The one value of `key`.
fn setting<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "{key}= in {UNIT}: {values:?}");
    values[0]
}

/// An Exec line as argv. The test reads the unit rather than repeating it, so it only
/// takes what it can run without systemd: no prefixes (`-`, `@`, `+`, `!`), quotes,
/// variables or specifiers.
fn argv(exec: &str) -> Vec<String> {
    assert!(
        !exec.starts_with(['-', '@', '+', '!', ':'])
            && !exec.contains(['"', '\'', '$', '%', '\\', ';']),
        "an Exec line this test cannot run as systemd would: {exec}"
    );
    exec.split_whitespace().map(String::from).collect()
}

/// `argv` as the unit's user and group, with no supplementary groups, no new privileges
/// (NoNewPrivileges=yes) and a clean environment, as systemd starts it.
fn as_unit_user(user: &str, group: &str, argv: &[String]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}"))
        .arg(format!("--regid={group}"))
        .args(["--clear-groups", "--no-new-privs", "--reset-env"])
        .args(argv);
    cmd
}

/// Waits for `needle` in a log collected by a reader thread; panics with the log if the
/// process exits or `limit` passes first.
fn wait_log(child: &mut Child, log: &Mutex<String>, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = log.lock().unwrap().clone();
        if text.contains(needle) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("greygate exited ({status}):\n{}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The .deb to test: `GREYGATE_DEB`, or the binary under test packaged into `out`.
fn package(out: &Path) -> PathBuf {
    if let Some(deb) = std::env::var_os("GREYGATE_DEB") {
        return PathBuf::from(deb);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/package");
    let ran = run(
        Command::new(&script)
            .arg("--binary")
            .arg(greygate_bin())
            .arg("--out")
            .arg(out)
            // Quicker than xz for a test's package; the contents are the same.
            .args(["--compress", "gzip"]),
        Duration::from_secs(300),
    )
    .ok();
    let deb = PathBuf::from(ran.stdout.lines().last().expect("the package's path"));
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("greygate_{}-", env!("CARGO_PKG_VERSION")))
            && name.ends_with(".deb"),
        "package name {name}"
    );
    deb
}

#[test]
fn debian_package_installs_serves_and_purges() {
    let test = "debian_package";
    for tool in [
        "/usr/bin/dpkg-deb",
        "/usr/bin/dpkg-shlibdeps",
        "/usr/bin/lintian",
        "/usr/bin/man",
        "/usr/bin/setpriv",
    ] {
        if !tool_available(test, tool) {
            return;
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!peers_required(), "{test}: must run as root (dpkg -i)");
        eprintln!("skipped {test}: not root");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    let deb = package(dir.path());
    let deb_s = deb.to_str().unwrap();
    let field = |name: &str| {
        run(
            Command::new("dpkg-deb").args(["-f", deb_s, name]),
            Duration::from_secs(60),
        )
        .ok()
        .stdout
        .trim()
        .to_string()
    };
    // The control fields an installation relies on.
    assert_eq!(field("Package"), "greygate");
    let version = field("Version");
    assert!(
        version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>= ")
            && depends.contains("libgcc-s1")
            && depends.contains("adduser"),
        "Depends: {depends}"
    );
    let installed_size: u64 = field("Installed-Size").parse().expect("Installed-Size");
    assert!(installed_size > 1000, "Installed-Size: {installed_size}");
    assert!(field("Maintainer").contains('@'));
    assert!(field("Description").starts_with("greylisting gateway"));

    // lintian: no errors (warnings and notes are reported, not failed).
    let lint = run(
        Command::new("lintian").args(["--fail-on", "error", deb_s]),
        Duration::from_secs(600),
    );
    let errors: Vec<&str> = lint
        .stdout
        .lines()
        .filter(|l| l.starts_with("E:"))
        .collect();
    assert!(
        lint.code == Some(0) && errors.is_empty(),
        "lintian ({:?}):\n{}\n{}",
        lint.code,
        lint.stdout,
        lint.stderr
    );
    if !lint.stdout.trim().is_empty() {
        eprintln!("lintian:\n{}", lint.stdout);
    }

    // A package left by an interrupted earlier run goes first; from here on the guard
    // purges whatever happens.
    if package_status().is_some() {
        dpkg(&["--purge", "greygate"]).ok();
    }
    assert!(
        getent("passwd", "greygate").is_none(),
        "user greygate exists before installation"
    );
    let mut installation = Installation { daemon: None };
    dpkg(&["-i", deb_s]).ok();
    assert_eq!(package_status().as_deref(), Some("install ok installed"));
    let listed = run(
        Command::new("dpkg-query").args(["-L", "greygate"]),
        Duration::from_secs(60),
    )
    .ok()
    .stdout;
    let files: Vec<&str> = listed.lines().filter(|l| l.starts_with('/')).collect();
    for want in [
        "/usr/sbin/greygate",
        CONFIG,
        UNIT,
        LISTS_SERVICE,
        LISTS_TIMER,
        "/usr/share/man/man8/greygate.8.gz",
        "/usr/share/man/man8/greygate-serve.8.gz",
        "/usr/share/bash-completion/completions/greygate",
        "/usr/share/zsh/vendor-completions/_greygate",
        "/usr/share/fish/vendor_completions.d/greygate.fish",
        "/usr/share/doc/greygate/README.md.gz",
        "/usr/share/doc/greygate/ARCHITECTURE.md.gz",
        "/usr/share/doc/greygate/copyright",
        "/usr/share/doc/greygate/changelog.Debian.gz",
    ] {
        assert!(
            files.contains(&want),
            "{want} not in the package:\n{listed}"
        );
        assert!(Path::new(want).exists(), "{want} not installed");
    }
    let conffiles = run(
        Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "greygate"]),
        Duration::from_secs(60),
    )
    .ok()
    .stdout;
    assert!(conffiles.contains(CONFIG), "conffiles: {conffiles}");
    let copyright = std::fs::read_to_string("/usr/share/doc/greygate/copyright").unwrap();
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    assert!(copyright.contains("\nLicense: MIT or Apache-2.0\n"));

    // The unit is enabled, as deb-systemd-helper does without a running systemd too.
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/greygate.service");
    let target = std::fs::read_link(wants).expect("postinst enables the unit");
    assert!(
        target.ends_with("systemd/system/greygate.service"),
        "{} -> {}",
        wants.display(),
        target.display()
    );

    // The daily refresh of the big senders' list: its timer enabled, its service running
    // the installed binary as the daemon's user (not started here: it asks real DNS).
    let target = std::fs::read_link(LISTS_WANTS).expect("postinst enables the lists timer");
    assert!(target.ends_with("systemd/system/greygate-lists.timer"));
    let lists_unit = std::fs::read_to_string(LISTS_SERVICE).unwrap();
    let lists_service = service_settings(&lists_unit);
    assert_eq!(
        setting(&lists_service, "ExecStart"),
        "/usr/sbin/greygate lists update --config /etc/greygate/greygate.toml --reload"
    );
    assert_eq!(setting(&lists_service, "User"), "greygate");
    assert_eq!(setting(&lists_service, "ReadWritePaths"), STATE);
    let timer = std::fs::read_to_string(LISTS_TIMER).unwrap();
    assert!(timer.contains("\nOnCalendar=daily\n"), "{timer}");

    // Installing again (dpkg's reconfigure of an installed version) keeps the user.
    let user = getent("passwd", "greygate").expect("postinst creates the user greygate");
    assert_eq!(user[5], STATE, "home of greygate: {user:?}");
    assert_eq!(user[6], "/usr/sbin/nologin", "shell of greygate: {user:?}");
    let group = getent("group", "greygate").expect("postinst creates the group greygate");
    assert_eq!(user[3], group[2], "primary group of greygate");
    dpkg(&["-i", deb_s]).ok();
    assert_eq!(getent("passwd", "greygate"), Some(user.clone()));
    let uid: u32 = user[2].parse().unwrap();
    let gid: u32 = group[2].parse().unwrap();
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(STATE).expect("postinst creates the state directory");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "owner of {STATE}");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750, "mode of {STATE}");
    }

    // The installed check-config reads the shipped configuration by default.
    let check = run(
        Command::new("/usr/sbin/greygate").arg("check-config"),
        Duration::from_secs(60),
    )
    .ok();
    assert!(
        check
            .stdout
            .contains(&format!("{CONFIG}: configuration OK"))
            && check
                .stdout
                .contains(&format!("store embedded {STATE}/greygate.redb")),
        "{}",
        check.stdout
    );

    // The unit as systemd would run it.
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let service = service_settings(&unit);
    let (unit_user, unit_group) = (setting(&service, "User"), setting(&service, "Group"));
    assert_eq!((unit_user, unit_group), ("greygate", "greygate"));
    assert_eq!(setting(&service, "StateDirectory"), "greygate");
    assert_eq!(setting(&service, "ReadWritePaths"), STATE);
    assert_eq!(setting(&service, "NoNewPrivileges"), "yes");
    assert_eq!(setting(&service, "ProtectSystem"), "strict");
    assert_eq!(setting(&service, "ExecReload"), "/bin/kill -HUP $MAINPID");
    let pre = argv(setting(&service, "ExecStartPre"));
    let start = argv(setting(&service, "ExecStart"));
    assert_eq!(start[0], "/usr/sbin/greygate");
    run(
        &mut as_unit_user(unit_user, unit_group, &pre),
        Duration::from_secs(60),
    )
    .ok();
    let mut cmd = as_unit_user(unit_user, unit_group, &start);
    let mut daemon = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start greygate as the unit does");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = daemon.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let pid = daemon.id();
    installation.daemon = Some(daemon);
    let daemon = installation.daemon.as_mut().unwrap();
    let text = wait_log(
        daemon,
        &log,
        "admin listener ready",
        Duration::from_secs(20),
    );
    let policy: SocketAddr = text
        .lines()
        .filter(|l| l.contains("policy listener ready"))
        .find_map(|l| l.split("listener=").nth(1)?.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no policy listener:\n{text}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |field: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"))
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![uid; 4], "the daemon runs as greygate");
    assert_eq!(ids("Gid:"), vec![gid; 4]);
    assert_eq!(ids("NoNewPrivs:"), vec![1]);
    let mut client = PolicyClient::tcp(policy);
    let reply = client.ask(&rcpt_request(
        "192.0.2.55",
        "sender@example.net",
        "rcpt@example.org",
    ));
    assert!(reply.starts_with("DEFER_IF_PERMIT Greylisted"), "{reply}");
    drop(client);
    wait_log(daemon, &log, "rule=\"new\"", Duration::from_secs(10));
    // SAFETY: kill(2) on the child this test started and has not reaped.
    let pid = i32::try_from(pid).expect("pid fits i32");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "greygate did not stop:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    installation.daemon = None;
    assert!(exit.success(), "{exit}:\n{}", log.lock().unwrap());
    // What it wrote is in its state directory, owned by it; the store kept the triplet.
    for name in ["greygate.redb", "admin.token"] {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(Path::new(STATE).join(name))
            .unwrap_or_else(|e| panic!("{STATE}/{name}: {e}"));
        assert_eq!(meta.uid(), uid, "owner of {STATE}/{name}");
    }
    let listed_records = run(
        Command::new("/usr/sbin/greygate").args(["list", "--offline"]),
        Duration::from_secs(60),
    )
    .ok();
    assert!(
        listed_records.stdout.contains("sender@example.net"),
        "{}",
        listed_records.stdout
    );

    // Every manual page renders without a warning; there is one per subcommand.
    let help = run(
        Command::new("/usr/sbin/greygate").arg("--help"),
        Duration::from_secs(30),
    )
    .ok()
    .stdout;
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A name starts a line at two spaces; deeper lines continue a description.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"serve"), "{help}");
    let pages: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| f.starts_with("/usr/share/man/"))
        .filter(|f| f.ends_with(".gz"))
        .collect();
    for c in &commands {
        let page = format!("/usr/share/man/man8/greygate-{c}.8.gz");
        assert!(pages.contains(&page.as_str()), "no page for {c}");
    }
    for page in &pages {
        let ran = run(
            Command::new("man")
                .args(["--warnings", "-l", page])
                .env("MANWIDTH", "80")
                .env("LC_ALL", "C.UTF-8"),
            Duration::from_secs(60),
        )
        .ok();
        assert!(ran.stderr.is_empty(), "man {page}:\n{}", ran.stderr);
        assert!(ran.stdout.contains("NAME"), "man {page}:\n{}", ran.stdout);
    }
    // man finds the pages by name too.
    let found = run(
        Command::new("man").args(["-w", "8", "greygate-serve"]),
        Duration::from_secs(60),
    )
    .ok();
    assert_eq!(
        found.stdout.trim(),
        "/usr/share/man/man8/greygate-serve.8.gz"
    );

    // The bash completion loads and completes a subcommand.
    let completion = run(
        Command::new("bash").args([
            "--norc",
            "-c",
            "source /usr/share/bash-completion/completions/greygate && complete -p greygate && \
             COMP_WORDS=(greygate check-c) COMP_CWORD=1 && _greygate greygate check-c greygate && \
             echo \"${COMPREPLY[*]}\"",
        ]),
        Duration::from_secs(30),
    )
    .ok();
    assert!(
        completion.stdout.contains("-F _greygate greygate")
            && completion.stdout.lines().last() == Some("check-config"),
        "{}\n{}",
        completion.stdout,
        completion.stderr
    );

    // Remove keeps the configuration, the data and the user; purge takes them.
    dpkg(&["--remove", "greygate"]).ok();
    assert!(!Path::new("/usr/sbin/greygate").exists());
    assert!(
        Path::new(CONFIG).exists(),
        "remove deleted the configuration"
    );
    assert!(
        Path::new(STATE).join("greygate.redb").exists(),
        "remove deleted the store"
    );
    assert!(
        getent("passwd", "greygate").is_some(),
        "remove deleted the user"
    );
    dpkg(&["--purge", "greygate"]).ok();
    assert_eq!(package_status(), None);
    for gone in [
        "/etc/greygate",
        STATE,
        "/usr/share/doc/greygate",
        "/etc/systemd/system/multi-user.target.wants/greygate.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/greygate.service.dsh-also",
        LISTS_WANTS,
        "/var/lib/systemd/deb-systemd-helper-enabled/greygate-lists.timer.dsh-also",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    for f in &files {
        let p = Path::new(f);
        // Directories shared with other packages (/usr/share/man/man8) stay.
        if !p.is_dir() {
            assert!(
                !p.exists() && p.symlink_metadata().is_err(),
                "{f} left after purge"
            );
        }
    }
    assert!(
        getent("passwd", "greygate").is_none(),
        "user greygate left after purge"
    );
    assert!(
        getent("group", "greygate").is_none(),
        "group greygate left after purge"
    );
}
