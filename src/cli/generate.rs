//! `greygate generate` (hidden): the manual pages and shell completions that packages
//! install, made from the clap definitions themselves so they never drift from the
//! command line. `scripts/package` runs it; users never need to.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory, Subcommand};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Write greygate.8 and one page per subcommand (greygate-serve.8, greygate-allow-add.8, ...) into DIR
    Man {
        /// Directory to write the pages into (created if missing)
        dir: PathBuf,
    },
    /// Print the completion script for SHELL
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell
        shell: Shell,
    },
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    match &args.what {
        What::Man { dir } => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            // No `help` subcommand in the pages: it is `--help` in other words.
            let mut cmd = documented().disable_help_subcommand(true);
            cmd.build();
            write_pages(cmd, dir, &page_date()?)?;
        }
        What::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut documented(), "greygate", &mut out);
            out.flush().context("cannot write the completion script")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The page of `cmd` (section 8: greygate is a daemon and administration tool) and of each
/// of its visible subcommands, recursively; pages are named by the path of subcommands.
fn write_pages(cmd: clap::Command, dir: &std::path::Path, date: &str) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, date)?;
    }
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .date(date)
        .source(concat!("greygate ", env!("CARGO_PKG_VERSION")))
        .manual("System Administration");
    let path = man
        .generate_to(dir)
        .with_context(|| format!("cannot write a manual page into {}", dir.display()))?;
    println!("{}", path.display());
    Ok(())
}

/// The date in the pages' footers: that of `SOURCE_DATE_EPOCH` (the reproducible-builds
/// convention; `scripts/package` sets it to the commit's time), else today. Never empty:
/// an empty date would shift the other fields of the title line.
fn page_date() -> anyhow::Result<String> {
    let now = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => {
            let secs: i64 = s
                .trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH {s:?} is not a number of seconds"))?;
            jiff::Timestamp::from_second(secs).context("SOURCE_DATE_EPOCH out of range")?
        }
        Err(_) => jiff::Timestamp::now(),
    };
    Ok(now.strftime("%Y-%m-%d").to_string())
}

/// The command line as users see it: [`Cli`]'s, less its hidden subcommands (this one).
/// clap cannot remove a subcommand, so the top level is rebuilt from the parsed one's
/// settings; the test below checks that its help is the same.
fn documented() -> clap::Command {
    let full = Cli::command();
    let mut doc = clap::Command::new("greygate")
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(full.is_propagate_version_set())
        .subcommand_required(full.is_subcommand_required_set())
        .arg_required_else_help(full.is_arg_required_else_help_set())
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        doc = doc.about(about.clone());
    }
    if let Some(about) = full.get_long_about() {
        doc = doc.long_about(about.clone());
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_is_the_parsed_command_line_less_hidden_subcommands() {
        let mut full = Cli::command();
        let mut doc = documented();
        assert_eq!(
            full.render_long_help().to_string(),
            doc.render_long_help().to_string()
        );
        assert_eq!(
            full.render_usage().to_string(),
            doc.render_usage().to_string()
        );
        assert_eq!(full.get_name(), doc.get_name());
        assert_eq!(full.render_version(), doc.render_version());
        let visible: Vec<&str> = full
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name())
            .collect();
        let documented: Vec<&str> = doc.get_subcommands().map(|s| s.get_name()).collect();
        assert_eq!(visible, documented);
        assert!(!documented.contains(&"generate"));
        doc.debug_assert();
    }
}
