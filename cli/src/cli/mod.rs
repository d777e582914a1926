//! Command-line parsing and the subcommands.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Parser, Subcommand};
use vpstag::{BackendChoice, Signal};

mod ctl;
mod man;
mod run;

/// Tag every process of a virtual server (VPS), job or sandbox by its lineage.
#[derive(Parser, Debug)]
#[command(name = "vpstag", version, about, long_about = None)]
pub(crate) struct Cli {
    /// The daemon's socket (default: $VPSTAG_SOCKET, else /run/vpstag/vpstag.sock).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Say more about what the library does (repeat for more: -v info, -vv debug); without
    /// it, $VPSTAG_LOG (warn, info, debug) sets the level, else warnings only.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    /// Which tracking backend.
    #[arg(long, default_value = "auto", value_parser = BackendParser)]
    pub backend: BackendChoice,
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
    /// Where VPS cgroups (cgroup v2) are made. Without this option only a VPS started with limits
    /// gets one, below `vpstag/` in the daemon's own cgroup; `auto`: every VPS gets one there;
    /// PATH: every VPS gets one below this delegated directory (it must hold no process itself);
    /// `none`: no cgroups, and limits are refused. With a cgroup, `kill` uses `cgroup.kill` and
    /// `check` also compares the cgroup's processes with the VPS's members.
    #[arg(long, value_name = "PATH|auto|none", value_parser = parse_cgroup_root)]
    pub cgroup_root: Option<crate::daemon::Cgroups>,
    /// Seconds after which a connection with no request under way is closed (clients reconnect);
    /// 60 when not given.
    #[arg(long, value_name = "SECS", value_parser = parse_idle)]
    pub idle_timeout: Option<f64>,
}

/// `--cgroup-root`: `auto`, `none`, or an absolute path.
fn parse_cgroup_root(s: &str) -> Result<crate::daemon::Cgroups, String> {
    use crate::daemon::Cgroups;
    match s {
        "auto" => Ok(Cgroups::Auto),
        "none" => Ok(Cgroups::Off),
        p if p.starts_with('/') => Ok(Cgroups::Root(PathBuf::from(p))),
        _ => Err(format!("{s:?}: give `auto`, `none` or an absolute path such as /sys/fs/cgroup/vpstag")),
    }
}

/// Resource limits of a new VPS (cgroup v2): `vpstag start` and `vpstag run`.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct LimitArgs {
    /// Memory limit of the whole VPS (cgroup `memory.max`), in bytes or with a suffix K, M, G or
    /// T (powers of 1024): above it the kernel reclaims, then its OOM killer ends a process of
    /// the VPS, and only of the VPS.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory_max: Option<u64>,
    /// At most N processes and threads in the VPS at once (cgroup `pids.max`); a fork beyond it
    /// fails with EAGAIN.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub pids_max: Option<u64>,
    /// CPU limit of the whole VPS in percent of one CPU (150: one and a half CPUs; cgroup
    /// `cpu.max`).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..))]
    pub cpu_max: Option<u32>,
}

impl LimitArgs {
    /// The limits asked for (empty when none).
    pub(crate) fn limits(&self) -> vpstag::cgroup::Limits {
        vpstag::cgroup::Limits { memory_max: self.memory_max, pids_max: self.pids_max, cpu_max_percent: self.cpu_max }
    }
}

/// A number of bytes, optionally with a binary suffix (`512M`, `2G`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: the suffix must be K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a number of bytes (e.g. 536870912 or 512M)"))?;
    match n.checked_mul(mult) {
        Some(0) => Err(format!("{s:?}: a memory limit must be at least 1 byte (give a few MiB at least)")),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

/// `vpstag start`.
#[derive(clap::Args, Debug)]
pub(crate) struct StartArgs {
    /// Append the VPS's standard output and error to FILE (default: /dev/null).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print {"vps": NAME, "pid": PID} (one JSON object) instead of the bare pid.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
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
    /// The process id (a thread id stands for its process).
    pub pid: String,
    /// Print {"pid": PID, "vps": NAME} (one JSON object; "vps" is null when PID has no tag, and
    /// the exit status is still 1 then).
    #[arg(long)]
    pub json: bool,
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
    /// The signal, by name (TERM, KILL, HUP..., with or without SIG, any case) or number.
    #[arg(long, short, default_value = "TERM", value_name = "SIG", value_parser = SignalParser, hide_possible_values = true)]
    pub signal: Signal,
    /// Print {"vps": NAME, "signal": "TERM", "signalled": N} (one JSON object) instead of a
    /// sentence on standard error.
    #[arg(long)]
    pub json: bool,
}

/// `vpstag stop`.
#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The VPS name.
    pub name: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub grace: f64,
    /// Print {"vps": NAME, "signalled": N} (one JSON object) when done, instead of a sentence on
    /// standard error, and no progress report while waiting.
    #[arg(long)]
    pub json: bool,
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
    /// Resume a follow: every event after the one numbered SEQ (the `seq` field of `--json`),
    /// none twice and none left out, then new ones as `--follow` does. Events the daemon no
    /// longer keeps are announced by a `lost` event (reason `expired`) first.
    #[arg(long, value_name = "SEQ")]
    pub after: Option<u64>,
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
    /// Which tracking backend.
    #[arg(long, default_value = "auto", value_parser = BackendParser)]
    pub backend: BackendChoice,
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
    #[command(flatten)]
    pub limits: LimitArgs,
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

/// `--idle-timeout`: a number of seconds as [`parse_secs`] takes, above 0.
fn parse_idle(s: &str) -> Result<f64, String> {
    parse_secs(s).and_then(|v| if v > 0.0 { Ok(v) } else { Err(format!("{s:?}: give a number of seconds above 0")) })
}

/// The backends `--backend` takes, with what each is (for completions and `--help`).
const BACKENDS: [(&str, &str); 5] = [
    ("auto", "the best this system allows"),
    ("cnproc", "Linux proc connector"),
    ("ptrace", "ptrace fork following, unprivileged"),
    ("ebpf", "Linux eBPF (built with the ebpf feature)"),
    ("kqueue", "FreeBSD kqueue"),
];

/// `--backend`: one of [`BACKENDS`], read by [`BackendChoice`]'s own parser, and listed for
/// completions.
#[derive(Clone, Copy)]
struct BackendParser;

impl TypedValueParser for BackendParser {
    type Value = BackendChoice;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<BackendChoice, clap::Error> {
        value.to_string_lossy().parse().map_err(|e| invalid_value(cmd, arg, e))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(BACKENDS.iter().map(|(n, help)| PossibleValue::new(n).help(help))))
    }
}

/// `--signal`: a name (`TERM`, `SIGTERM`, `term`) or a number, read by [`Signal`]'s own parser;
/// the names of this system's signals are listed for completions.
#[derive(Clone, Copy)]
struct SignalParser;

impl TypedValueParser for SignalParser {
    type Value = Signal;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<Signal, clap::Error> {
        value.to_string_lossy().parse().map_err(|e| invalid_value(cmd, arg, e))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(signal_names().into_iter().map(PossibleValue::new)))
    }
}

/// A value the library refused, as clap reports a usage error (`e` says what is expected).
fn invalid_value(cmd: &clap::Command, arg: Option<&clap::Arg>, e: vpstag::Error) -> clap::Error {
    let arg = arg.map_or_else(String::new, |a| format!(" for {a}"));
    clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("invalid value{arg}: {e}\n")).with_cmd(cmd)
}

/// This system's signal names without `SIG` (`HUP`, `INT`, ...), in signal-number order.
fn signal_names() -> Vec<&'static str> {
    nix::sys::signal::Signal::iterator().map(|s| s.as_str().trim_start_matches("SIG")).collect()
}

/// Whether the command line names `run` or `exec` (the subcommands that run a CMD, whose status
/// they return): its first word that is neither an option nor the value of the global `--socket`.
fn names_run(args: impl IntoIterator<Item = OsString>) -> bool {
    let mut args = args.into_iter().skip(1);
    while let Some(a) = args.next() {
        if a == "--socket" {
            args.next();
        } else if !a.as_encoded_bytes().starts_with(b"-") {
            return a == "run" || a == "exec";
        }
    }
    false
}

/// The exit status of a command line clap refused: 0 for `--help` and `--version`; for `run`
/// and `exec`, 125 (vpstag's own failure: 1-124 belong to CMD, see [`run_failure_code`]); clap's usual 2
/// for every other command.
fn usage_error_code(e: &clap::Error, args: impl IntoIterator<Item = OsString>) -> i32 {
    match e.exit_code() {
        0 => 0,
        _ if names_run(args) => 125,
        code => code,
    }
}

pub(crate) fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A closed standard output (`vpstag --help | head -1`) is no reason to fail.
            let _ = e.print();
            return usage_error_code(&e, std::env::args_os());
        }
    };
    crate::logger::install(crate::logger::level(cli.verbose, std::env::var("VPSTAG_LOG").ok().as_deref()));
    let socket = cli.socket();
    let r = match cli.command {
        Cmd::Run(a) => run::run(a),
        // Like `run`: CMD's status is its own, so vpstag's failures are 125, 126 and 127. It
        // returns only when it failed: else this process is CMD now.
        Cmd::Exec(a) => Err(vpstag::client::exec_in(&socket, &a.name, &a.cmd[0], &a.cmd[1..])),
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

/// The exit status of a `vpstag run` (or `vpstag exec`) that failed itself, in the convention of `env`, `timeout`
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
    use super::*;

    #[test]
    fn grace_periods_are_finite_and_bounded() {
        assert_eq!(parse_secs("5"), Ok(5.0));
        assert_eq!(parse_secs("0.25"), Ok(0.25));
        for bad in ["inf", "-inf", "NaN", "-1", "1e9", "soon", ""] {
            assert!(parse_secs(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn run_usage_errors_exit_125_and_other_commands_keep_2() {
        for line in [
            &["vpstag", "run"][..],
            &["vpstag", "run", "name"],
            &["vpstag", "run", "--bogus", "x", "--", "true"],
            &["vpstag", "run", "--backend", "nope", "x", "--", "true"],
            &["vpstag", "run", "--grace", "inf", "x", "--", "true"],
            &["vpstag", "--socket", "run", "run", "--grace", "-1", "x", "--", "true"],
            &["vpstag", "--socket=/s", "run"],
        ] {
            let e = Cli::try_parse_from(line).expect_err("a usage error");
            assert_eq!(usage_error_code(&e, args(line)), 125, "{line:?}");
        }
        for line in [
            &["vpstag", "kill"][..],
            &["vpstag", "kill", "x", "--signal", "NOPE"],
            &["vpstag", "daemon", "--backend", "nope"],
            &["vpstag", "--socket", "run", "which"],
            &["vpstag", "bogus"],
            &["vpstag"],
        ] {
            let e = Cli::try_parse_from(line).expect_err("a usage error");
            assert_eq!(usage_error_code(&e, args(line)), 2, "{line:?}");
        }
        for line in [&["vpstag", "run", "--help"][..], &["vpstag", "--version"], &["vpstag", "help", "run"]] {
            let e = Cli::try_parse_from(line).expect_err("help is an early exit");
            assert_eq!(usage_error_code(&e, args(line)), 0, "{line:?}");
        }
    }

    #[test]
    fn backends_and_signals_parse_as_the_library_reads_them() {
        for (name, _) in BACKENDS {
            let cli = Cli::try_parse_from(["vpstag", "run", "--backend", name, "x", "--", "true"]).expect(name);
            let Cmd::Run(a) = cli.command else { panic!("run") };
            assert_eq!(a.backend.to_string(), name);
        }
        let kill = |sig: &str| match Cli::try_parse_from(["vpstag", "kill", "x", "--signal", sig]).map(|c| c.command) {
            Ok(Cmd::Kill(a)) => Some(a.signal),
            _ => None,
        };
        assert_eq!(kill("9"), Some(Signal::KILL), "a number still works");
        assert_eq!(kill("sigterm"), Some(Signal::TERM));
        assert_eq!(kill("HUP"), Some(Signal::HUP));
        assert_eq!(kill("NOPE"), None);
        assert_eq!(kill("0"), None);
        let names = signal_names();
        assert!(names.contains(&"TERM") && names.contains(&"KILL") && names.contains(&"USR1"), "{names:?}");
        for n in names {
            assert!(n.parse::<Signal>().is_ok(), "{n} is listed but not accepted");
        }
    }
}
