//! Command-line parsing and the subcommands.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod ctl;
mod run;

/// Tag every process of a virtual server (VPS), job or sandbox by its lineage.
#[derive(Parser, Debug)]
#[command(name = "vpstag", version, about, long_about = None)]
pub(crate) struct Cli {
    /// The daemon's socket (default: $VPSTAG_SOCKET, else /run/vpstag/vpstag.sock).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

impl Cli {
    /// The socket: --socket, else $VPSTAG_SOCKET, else the default.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(vpstag::client::default_socket)
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Run CMD as VPS NAME in the foreground, tracking every descendant and printing its
    /// fork/exec/exit events; exit with CMD's status.
    Run(RunArgs),
    /// Run the daemon in the foreground: one manager holding the table for the whole host,
    /// serving the other commands over its socket. Stops cleanly on SIGTERM; the VPSes keep
    /// running.
    Daemon(DaemonArgs),
    /// Start VPS NAME running CMD under a new first process (with your credentials); print the
    /// first process's PID. The VPS runs in its own session, stdin from /dev/null.
    Start(StartArgs),
    /// Register this process as a member of the running VPS NAME, then execute CMD in its place
    /// (the loader): CMD and all it spawns carry the tag.
    Exec(ExecArgs),
    /// Live processes (not threads) of every VPS you may see, or of NAME, with their VPS.
    Ps(PsArgs),
    /// Print the VPS of PID; exit status 1 when PID has no tag, 2 on error.
    Which(WhichArgs),
    /// Each VPS with its first PID, member count, start time, CPU time and memory.
    List(ListArgs),
    /// Send a signal to every member of VPS NAME, escaped daemons too, without racing new forks
    /// (SIGKILL: again and again until none is left).
    Kill(KillArgs),
    /// End every member of VPS NAME (SIGTERM, SIGKILL after --grace) and forget the VPS.
    Stop(StopArgs),
    /// The fork/exec/exit events of the VPSes (recent ones; with --follow, then every new one).
    Events(EventsArgs),
    /// Compare the daemon's table with a fresh scan of the system and print every divergence
    /// (exit status 1 when there is one) and the loss and resync counters.
    Check(CheckArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) on standard output, or write one page per command to --dir.
    Man(ManArgs),
}

/// `vpstag man`.
#[derive(clap::Args, Debug)]
pub(crate) struct ManArgs {
    /// Write vpstag.1 and vpstag-COMMAND.1 into DIR instead.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `vpstag daemon`.
#[derive(clap::Args, Debug)]
pub(crate) struct DaemonArgs {
    /// Which tracking backend: auto, cnproc, ptrace or ebpf (Linux), kqueue (FreeBSD).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Where the journal and snapshot live (created if missing).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/vpstag")]
    pub state_dir: PathBuf,
    /// Start even when the journal or the snapshot has an unreadable line (the daemon otherwise
    /// stops and names the file and line): keep a copy of the bad file (FILE.bad-TIME), start
    /// from what can be read, and log it.
    #[arg(long)]
    pub discard_bad_journal: bool,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (per VPS: processes, CPU seconds,
    /// memory, forks; the daemon's event, loss and resync counters and backend). A bare PORT or
    /// :PORT listens on 127.0.0.1; any other address only when given (0.0.0.0:PORT: every
    /// interface; whoever can connect sees every VPS's name, owner and figures). Port 0 takes a
    /// free port, logged at start. Examples for Prometheus and Grafana: contrib/prometheus/,
    /// contrib/grafana/.
    #[arg(long, value_name = "ADDR:PORT", value_parser = crate::daemon::metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `vpstag start`.
#[derive(clap::Args, Debug)]
pub(crate) struct StartArgs {
    /// Append the VPS's standard output and error to FILE (default: /dev/null).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The VPS name.
    pub name: String,
    /// The command and its arguments (after an optional `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `vpstag exec`.
#[derive(clap::Args, Debug)]
pub(crate) struct ExecArgs {
    /// The VPS name.
    pub name: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `vpstag ps`.
#[derive(clap::Args, Debug)]
pub(crate) struct PsArgs {
    /// Only this VPS.
    pub name: Option<String>,
    /// One JSON array of objects (pid, ppid, vps, cmd, uid, source, start).
    #[arg(long, conflicts_with = "tree")]
    pub json: bool,
    /// Draw each VPS as a process tree.
    #[arg(long)]
    pub tree: bool,
}

/// `vpstag which`.
#[derive(clap::Args, Debug)]
pub(crate) struct WhichArgs {
    /// The process id.
    pub pid: String,
}

/// `vpstag list`.
#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    /// One JSON array of objects.
    #[arg(long)]
    pub json: bool,
}

/// `vpstag kill`.
#[derive(clap::Args, Debug)]
pub(crate) struct KillArgs {
    /// The VPS name.
    pub name: String,
    /// The signal, by name (TERM, KILL, HUP...) or number.
    #[arg(long, short, default_value = "TERM", value_name = "SIG")]
    pub signal: String,
}

/// `vpstag stop`.
#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The VPS name.
    pub name: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub grace: f64,
}

/// `vpstag events`.
#[derive(clap::Args, Debug)]
pub(crate) struct EventsArgs {
    /// Only this VPS.
    pub name: Option<String>,
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events until interrupted.
    #[arg(long, short)]
    pub follow: bool,
}

/// `vpstag check`.
#[derive(clap::Args, Debug)]
pub(crate) struct CheckArgs {
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `vpstag completions`.
#[derive(clap::Args, Debug)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `vpstag run`.
#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Which tracking backend: auto, cnproc, ptrace, ebpf (Linux) or kqueue (FreeBSD).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Write events as JSON lines to FILE (`-`: standard output) instead of printing them.
    #[arg(long, value_name = "FILE")]
    pub json_events: Option<PathBuf>,
    /// When CMD exits, give the VPS's remaining processes this many seconds after SIGTERM before
    /// SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
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

/// The longest grace period accepted: a day.
const MAX_SECS: f64 = 86_400.0;

/// A number of seconds, from 0 to a day (`inf`, `NaN` and negative numbers are refused here, at
/// parse time, rather than reaching a `Duration` that cannot hold them).
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && (0.0..=MAX_SECS).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?}: give a number of seconds from 0 to {MAX_SECS}"))
    }
}

pub(crate) fn main() -> i32 {
    let cli = Cli::parse();
    let socket = cli.socket();
    let r = match cli.command {
        Cmd::Run(a) => run::run(a),
        other => return ctl::main(other, &socket),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpstag: error: {e}");
            run_failure_code(&e)
        }
    }
}

/// The exit status of a `vpstag run` that failed itself, in the convention of `env`, `timeout`
/// and `docker run`, so that it is never taken for CMD's own status: 127 when CMD was not found,
/// 126 when it was found but could not be executed, 125 for any other failure of vpstag.
fn run_failure_code(e: &vpstag::Error) -> i32 {
    match e {
        vpstag::Error::Spawn { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ENOENT) =>
        {
            127
        }
        vpstag::Error::Spawn { .. } => 126,
        _ => 125,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_secs;

    #[test]
    fn grace_periods_are_finite_and_bounded() {
        assert_eq!(parse_secs("5"), Ok(5.0));
        assert_eq!(parse_secs("0.25"), Ok(0.25));
        for bad in ["inf", "-inf", "NaN", "-1", "1e9", "soon", ""] {
            assert!(parse_secs(bad).is_err(), "{bad:?} accepted");
        }
    }
}
