//! The `greygate` binary: parse the command line, run the command, exit with its code.
//! Everything else of the binary's side is in `cli/`; anyhow is used only there.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration, 3 the store is
//! held by a running daemon; `probe`: 0 accepted, 4 greylisted, 5 other temporary failure,
//! 6 rejected, 7 no connection; `release`: 4 nothing was pending.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
