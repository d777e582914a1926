//! The daemon and the commands that talk to it: start, exec, ps, which, list, kill, stop,
//! events, check; and completions and the man page, from the same clap definitions.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use vpstag::client::{Client, ClientError};
use vpstag::protocol::{EventInfo, ProcessInfo};
use vpstag::{Pid, Signal};

use super::{Cli, Cmd};

/// `println!` that ends the program quietly (status 0) when standard output is a pipe whose
/// reader has gone (`vpstag ps | head -1`), as `ls` does, instead of panicking; any other write
/// error is reported (status 2).
macro_rules! outln {
    ($($arg:tt)*) => {
        out_or_exit(writeln!(std::io::stdout(), $($arg)*))
    };
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        out_or_exit(write!(std::io::stdout(), $($arg)*))
    };
}

fn out_or_exit(r: std::io::Result<()>) {
    if let Err(e) = r.and_then(|()| std::io::stdout().flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("vpstag: writing to standard output: {e}");
        std::process::exit(2);
    }
}

enum Failure {
    Client(ClientError),
    Lib(vpstag::Error),
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        Failure::Client(e)
    }
}

impl From<vpstag::Error> for Failure {
    fn from(e: vpstag::Error) -> Failure {
        Failure::Lib(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Client(e) => write!(f, "{e}"),
            Failure::Lib(e) => write!(f, "{e}"),
            Failure::Other(s) => f.write_str(s),
        }
    }
}

type R = Result<i32, Failure>;

pub(crate) fn main(cmd: Cmd, socket: &Path) -> i32 {
    let r = match cmd {
        Cmd::Run(_) => unreachable!("handled by run"),
        Cmd::Daemon(a) => daemon(a, socket),
        Cmd::Start(a) => start(a, socket),
        Cmd::Exec(a) => exec(a, socket),
        Cmd::Ps(a) => ps(a, socket),
        Cmd::Which(a) => which(a, socket),
        Cmd::List(a) => list(a, socket),
        Cmd::Kill(a) => kill(a, socket),
        Cmd::Stop(a) => stop(a, socket),
        Cmd::Events(a) => events(a, socket),
        Cmd::Check(a) => check(a, socket),
        Cmd::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "vpstag", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man(a) => man(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpstag: error: {e}");
            2
        }
    }
}

fn man(a: super::ManArgs) -> R {
    let err = |e: std::io::Error| Failure::Other(format!("writing the man page: {e}"));
    let Some(dir) = a.dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut out).map_err(err)?;
        std::io::stdout().write_all(&out).map_err(err)?;
        return Ok(0);
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let mut pages = vec![("vpstag.1".to_string(), Cli::command())];
    for sub in Cli::command().get_subcommands() {
        let name: &'static str = Box::leak(format!("vpstag-{}", sub.get_name()).into_boxed_str());
        pages.push((format!("{name}.1"), sub.clone().name(name)));
    }
    for (file, cmd) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out).map_err(err)?;
        std::fs::write(dir.join(&file), out).map_err(err)?;
        outln!("{}", dir.join(file).display());
    }
    Ok(0)
}

fn daemon(a: super::DaemonArgs, socket: &Path) -> R {
    let backend: vpstag::BackendChoice = a.backend.parse()?;
    crate::daemon::run(crate::daemon::Config {
        backend,
        socket: socket.to_path_buf(),
        state_dir: a.state_dir,
        discard_bad_journal: a.discard_bad_journal,
        metrics: a.metrics,
    })?;
    Ok(0)
}

fn start(a: super::StartArgs, socket: &Path) -> R {
    let mut c = Client::connect_to(socket)?;
    // Ask first, so that "no daemon" is said before anything is forked.
    c.hello()?;
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    let pid = c.start(&a.name, &cmd, a.output.as_deref())?;
    outln!("{pid}");
    Ok(0)
}

fn exec(a: super::ExecArgs, socket: &Path) -> R {
    Err(vpstag::client::exec_in(socket, &a.name, &a.cmd[0], &a.cmd[1..]).into())
}

fn which(a: super::WhichArgs, socket: &Path) -> R {
    let pid: Pid = a.pid.parse().map_err(Failure::Other)?;
    match Client::connect_to(socket)?.vps_of(pid)? {
        Some(name) => {
            outln!("{name}");
            Ok(0)
        }
        None => {
            eprintln!("vpstag: process {pid} has no tag");
            Ok(1)
        }
    }
}

/// `s` safe to print to a terminal: every control character spelled out, so that text another
/// user chose (a command line) cannot drive the terminal of whoever reads it (clear the screen,
/// set the title, move the cursor, answer back). C0 controls (ESC, BEL, newline, tab, ...) and
/// DEL become `\x1b`-style escapes; C1 controls (CSI U+009B, ...) and the bidirectional
/// overrides and isolates (which reorder what is shown) become `\u{9b}`-style escapes.
/// JSON output is not passed through this: JSON escapes them already.
fn printable(s: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        matches!(c, '\0'..='\x1f' | '\x7f'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\0'..='\x1f' | '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn ps(a: super::PsArgs, socket: &Path) -> R {
    let procs = Client::connect_to(socket)?.ps(a.name.as_deref())?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&procs).expect("serialises"));
    } else if a.tree {
        out!("{}", draw_trees(&procs));
    } else {
        outln!("{:<16} {:>7} {:>7} {:>6} {:<7} CMD", "VPS", "PID", "PPID", "UID", "SOURCE");
        for p in &procs {
            outln!(
                "{:<16} {:>7} {:>7} {:>6} {:<7} {}",
                printable(&p.vps),
                p.pid,
                p.ppid,
                p.uid,
                printable(&p.source),
                printable(&p.cmd)
            );
        }
    }
    Ok(0)
}

/// Each VPS as a process tree, as `systemd-cgls` draws control groups: a process whose parent is
/// not a member of the VPS (an escaped daemon, re-parented outside) is a root of its own.
fn draw_trees(procs: &[ProcessInfo]) -> String {
    let mut by_vps: BTreeMap<&str, Vec<&ProcessInfo>> = BTreeMap::new();
    for p in procs {
        by_vps.entry(&p.vps).or_default().push(p);
    }
    let mut out = String::new();
    for (vps, members) in by_vps {
        out.push_str(&format!("VPS {} ({} processes)\n", printable(vps), members.len()));
        let pids: HashSet<i32> = members.iter().map(|p| p.pid).collect();
        let mut children: HashMap<i32, Vec<&ProcessInfo>> = HashMap::new();
        let mut roots = Vec::new();
        for p in &members {
            if p.ppid != p.pid && pids.contains(&p.ppid) {
                children.entry(p.ppid).or_default().push(p);
            } else {
                roots.push(*p);
            }
        }
        fn walk(
            out: &mut String,
            p: &ProcessInfo,
            prefix: &str,
            last: bool,
            children: &HashMap<i32, Vec<&ProcessInfo>>,
        ) {
            out.push_str(&format!("{prefix}{}{} {}\n", if last { "└─" } else { "├─" }, p.pid, printable(&p.cmd)));
            let kids = children.get(&p.pid).map(Vec::as_slice).unwrap_or(&[]);
            let next = format!("{prefix}{}", if last { "  " } else { "│ " });
            for (i, k) in kids.iter().enumerate() {
                walk(out, k, &next, i + 1 == kids.len(), children);
            }
        }
        for (i, r) in roots.iter().enumerate() {
            walk(&mut out, r, "", i + 1 == roots.len(), &children);
        }
    }
    out
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn list(a: super::ListArgs, socket: &Path) -> R {
    let vpses = Client::connect_to(socket)?.list()?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&vpses).expect("serialises"));
        return Ok(0);
    }
    outln!(
        "{:<16} {:>4} {:>6} {:>7} {:<7} {:>7} {:<20} {:>9} {:>9}",
        "NAME",
        "ID",
        "OWNER",
        "FIRST",
        "STATE",
        "MEMBERS",
        "STARTED",
        "CPU",
        "MEM"
    );
    for v in &vpses {
        let started = crate::daemon::format_time(SystemTime::UNIX_EPOCH + Duration::from_secs(v.started));
        outln!(
            "{:<16} {:>4} {:>6} {:>7} {:<7} {:>7} {:<20} {:>8.2}s {:>9}",
            printable(&v.name),
            v.id,
            v.owner,
            v.first,
            if v.first_alive {
                "running"
            } else if v.members > 0 {
                "orphan"
            } else {
                "exited"
            },
            v.members,
            &started[..19],
            v.cpu_ms as f64 / 1000.0,
            human_bytes(v.rss_bytes)
        );
    }
    Ok(0)
}

fn kill(a: super::KillArgs, socket: &Path) -> R {
    let sig: Signal = a.signal.parse()?;
    let n = Client::connect_to(socket)?.kill(&a.name, sig)?;
    eprintln!("vpstag: sent {sig} to {n} processes of VPS {:?}", a.name);
    Ok(0)
}

fn stop(a: super::StopArgs, socket: &Path) -> R {
    Client::connect_to(socket)?.stop(&a.name, Duration::from_secs_f64(a.grace.max(0.0)))?;
    eprintln!("vpstag: VPS {:?} stopped and forgotten", a.name);
    Ok(0)
}

fn print_event(e: &EventInfo, json: bool) -> bool {
    let line = if json {
        serde_json::to_string(e).expect("serialises")
    } else {
        let vps = printable(&e.vps);
        match e.event.as_str() {
            "fork" => format!("[{vps}] fork {} -> {}", e.parent.unwrap_or(0), e.pid),
            "exec" => format!("[{vps}] exec {} {}", e.pid, printable(e.cmd.as_deref().unwrap_or("?"))),
            "exit" => match (e.code, e.signal) {
                (Some(c), _) => format!("[{vps}] exit {} (exit code {c})", e.pid),
                (_, Some(s)) => format!("[{vps}] exit {} (killed by signal {s})", e.pid),
                _ => format!("[{vps}] exit {}", e.pid),
            },
            other => format!("[{vps}] {} {}", printable(other), e.pid),
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn events(a: super::EventsArgs, socket: &Path) -> R {
    for e in Client::connect_to(socket)?.events(a.name.as_deref(), a.follow)? {
        if !print_event(&e?, a.json) {
            break;
        }
    }
    Ok(0)
}

fn check(a: super::CheckArgs, socket: &Path) -> R {
    let r = Client::connect_to(socket)?.check()?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&r).expect("serialises"));
    } else {
        for d in &r.divergences {
            match d.kind.as_str() {
                "missing" => outln!(
                    "missing   {:>7}  untagged, but its ancestry says VPS {}",
                    d.pid,
                    printable(d.expected.as_deref().unwrap_or("?"))
                ),
                "extra" => outln!(
                    "extra     {:>7}  tagged {} but gone (or its pid reused)",
                    d.pid,
                    printable(d.vps.as_deref().unwrap_or("?"))
                ),
                _ => outln!(
                    "{:<9} {:>7}  tagged {} but its parent is in {}",
                    printable(&d.kind),
                    d.pid,
                    printable(d.vps.as_deref().unwrap_or("?")),
                    printable(d.expected.as_deref().unwrap_or("?"))
                ),
            }
        }
        outln!(
            "{} divergences; {} table entries, {} processes on the system",
            r.divergences.len(),
            r.entries,
            r.processes
        );
        let stats: Vec<String> = r.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!("counters: {}", stats.join(" "));
    }
    Ok(i32::from(!r.divergences.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, vps: &str) -> ProcessInfo {
        ProcessInfo { pid, ppid, vps: vps.into(), cmd: format!("c{pid}"), uid: 0, source: "event".into(), start: 0 }
    }

    #[test]
    fn control_characters_are_spelled_out_and_the_rest_kept() {
        assert!(matches!(printable("sleep 1 é ü 日本"), Cow::Borrowed("sleep 1 é ü 日本")));
        assert_eq!(printable("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(printable("\x07\x00\n\t\x7f"), "\\x07\\x00\\x0a\\x09\\x7f");
        assert_eq!(printable("x\u{9b}31m\u{85}"), "x\\u{9b}31m\\u{85}");
        assert_eq!(printable("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        assert_eq!(printable("\u{a0}\u{a9}"), "\u{a0}\u{a9}", "printable Latin-1 stays");
    }

    #[test]
    fn a_tree_escapes_command_lines() {
        let mut evil = p(10, 1, "a");
        evil.cmd = "sh \x1b]0;pwned\x07".into();
        let t = draw_trees(&[evil]);
        assert!(!t.contains('\x1b') && !t.contains('\x07'), "{t:?}");
        assert!(t.contains("sh \\x1b]0;pwned\\x07"), "{t:?}");
    }

    #[test]
    fn trees_nest_children_and_root_escapees() {
        let t = draw_trees(&[p(10, 1, "a"), p(11, 10, "a"), p(12, 11, "a"), p(20, 1, "a"), p(30, 1, "b")]);
        assert_eq!(
            t,
            "VPS a (4 processes)\n├─10 c10\n│ └─11 c11\n│   └─12 c12\n└─20 c20\nVPS b (1 processes)\n└─30 c30\n"
        );
    }
}
