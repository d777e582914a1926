//! Command-line parsing and the subcommands.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod run;

/// Tag every process of a virtual server (VPS), job or sandbox by its lineage.
#[derive(Parser, Debug)]
#[command(name = "vpstag", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Run CMD as VPS NAME in the foreground, tracking every descendant and printing its
    /// fork/exec/exit events; exit with CMD's status.
    Run(RunArgs),
}

/// `vpstag run`.
#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Which tracking backend: auto, cnproc, ptrace, ebpf (Linux) or kqueue (FreeBSD).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Write events as JSON lines to FILE instead of printing them.
    #[arg(long, value_name = "FILE")]
    pub json_events: Option<PathBuf>,
    /// When CMD exits, give the VPS's remaining processes this many seconds after SIGTERM before
    /// SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub grace: f64,
    /// When CMD exits, wait until every process of the VPS has exited instead of ending them.
    #[arg(long)]
    pub wait_all: bool,
    /// Print no events (errors and the end-of-run summary only).
    #[arg(long, short)]
    pub quiet: bool,
    /// The VPS name.
    pub name: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

pub(crate) fn main() -> i32 {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Run(a) => run::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpstag: error: {e}");
            2
        }
    }
}
