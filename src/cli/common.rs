//! What every command shares: the `--config` argument, loading and checking the
//! configuration, and the exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use greygate::config::{self, Config, ConfigErrors, DEFAULT_CONFIG_PATH, RawConfig, Source};

/// The exit codes every command shares (`probe` adds its own verdicts, 4 to 7; `release`
/// 4 when nothing was pending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Runtime failure: something the command needed did not work.
    Failure = 1,
    /// Bad usage or configuration (clap also exits 2 on usage errors).
    Usage = 2,
    /// The store is held by a running daemon that does not answer on its admin address.
    StoreBusy = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// Configuration file [default: /etc/greygate/greygate.toml if it exists, else built-in defaults]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArgs {
    /// The file to read, and whether the user named it (then it must exist).
    pub fn path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        }
    }

    /// Reads and checks the configuration; `tweak` applies command-line overrides first.
    pub fn load(&self, tweak: impl FnOnce(&mut RawConfig)) -> Result<Config, ConfigErrors> {
        let (path, explicit) = self.path();
        let (mut raw, text) = config::load_raw(&path, explicit)?;
        tweak(&mut raw);
        let name = path.display().to_string();
        let src = text.as_deref().map(|text| Source { name: &name, text });
        raw.validate(src.as_ref())
    }
}

/// Prints every configuration problem and gives the exit code for them.
pub fn config_failed(e: &ConfigErrors) -> ExitCode {
    eprintln!("greygate: invalid configuration:\n{e}");
    Exit::Usage.into()
}

/// A runtime for one command's async work on this thread.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGTERM or SIGINT as a future that completes with the signal's name. The handlers are
/// installed by this call (inside a runtime), so a signal sent after it is not lost.
pub fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
