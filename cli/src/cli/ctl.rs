//! The daemon and the commands that talk to it: start, exec, ps, which, list, kill, stop,
//! events, check; and completions and the man page, from the same clap definitions.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use clap::CommandFactory;
use serde_json::json;
use vpstag::client::Client;
use vpstag::protocol::{EventInfo, ProcessInfo};
use vpstag::Pid;

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

/// One JSON document on standard output, pretty-printed: the `--json` of every command that
/// prints one answer (`events` prints one compact object a line instead).
fn print_json(v: &impl serde::Serialize) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serialises"));
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
    Lib(vpstag::Error),
    Other(String),
}

impl From<vpstag::Error> for Failure {
    fn from(e: vpstag::Error) -> Failure {
        Failure::Lib(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Lib(e) => write!(f, "{e}"),
            Failure::Other(s) => f.write_str(s),
        }
    }
}

type R = Result<i32, Failure>;

pub(crate) fn main(cmd: Cmd, socket: &Path) -> i32 {
    let r = match cmd {
        Cmd::Run(_) | Cmd::Exec(_) => unreachable!("handled by cli::main, like run"),
        Cmd::Daemon(a) => daemon(a, socket),
        Cmd::Start(a) => start(a, socket),
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
        let page = super::man::page(Cli::command(), None).map_err(err)?;
        out!("{}", String::from_utf8_lossy(&page));
        return Ok(0);
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let mut pages = vec![("vpstag.1".to_string(), Cli::command(), None)];
    for sub in Cli::command().get_subcommands() {
        let name: &'static str = Box::leak(format!("vpstag-{}", sub.get_name()).into_boxed_str());
        pages.push((format!("{name}.1"), sub.clone().name(name), Some(sub.get_name().to_string())));
    }
    for (file, cmd, sub) in pages {
        let page = super::man::page(cmd, sub.as_deref()).map_err(err)?;
        std::fs::write(dir.join(&file), page).map_err(err)?;
        outln!("{}", dir.join(file).display());
    }
    Ok(0)
}

fn daemon(a: super::DaemonArgs, socket: &Path) -> R {
    crate::daemon::run(crate::daemon::Config {
        backend: a.backend,
        socket: socket.to_path_buf(),
        state_dir: a.state_dir,
        discard_bad_journal: a.discard_bad_journal,
        metrics: a.metrics,
        cgroups: a.cgroup_root.unwrap_or_default(),
        idle_timeout: a.idle_timeout.map_or(crate::daemon::IDLE_TIMEOUT, Duration::from_secs_f64),
    })?;
    Ok(0)
}

fn start(a: super::StartArgs, socket: &Path) -> R {
    let mut c = Client::connect_to(socket)?;
    // Ask first, so that "no daemon" is said before anything is forked.
    c.hello()?;
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    let limits = a.limits.limits();
    let pid = if limits.is_empty() {
        c.start(&a.name, &cmd, a.output.as_deref())?
    } else {
        c.start_limited(&a.name, &cmd, a.output.as_deref(), &limits)?
    };
    if a.json {
        print_json(&json!({ "vps": a.name, "pid": pid.as_raw() }));
    } else {
        outln!("{pid}");
    }
    Ok(0)
}

fn which(a: super::WhichArgs, socket: &Path) -> R {
    let pid: Pid = a.pid.parse().map_err(Failure::Other)?;
    let vps = Client::connect_to(socket)?.vps_of(pid)?.map(|v| v.name);
    if a.json {
        print_json(&json!({ "pid": pid.as_raw(), "vps": vps }));
    } else if let Some(name) = &vps {
        outln!("{name}");
    } else {
        eprintln!("vpstag: process {pid} has no tag");
    }
    Ok(i32::from(vps.is_none()))
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
        print_json(&procs);
    } else if a.tree {
        out!("{}", draw_trees(&procs));
    } else {
        outln!("{:<16} {:>7} {:>7} {:>6} {:<7} CMD", "VPS", "PID", "PPID", "UID", "SOURCE");
        for p in &procs {
            outln!(
                "{:<16} {:>7} {:>7} {:>6} {:<7} {}",
                printable(&p.vps),
                p.pid,
                p.ppid.map_or(0, Pid::as_raw),
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
        let pids: HashSet<Pid> = members.iter().map(|p| p.pid).collect();
        let mut children: HashMap<Pid, Vec<&ProcessInfo>> = HashMap::new();
        let mut roots = Vec::new();
        for p in &members {
            match p.ppid {
                Some(pp) if pp != p.pid && pids.contains(&pp) => children.entry(pp).or_default().push(p),
                _ => roots.push(*p),
            }
        }
        fn walk(
            out: &mut String,
            p: &ProcessInfo,
            prefix: &str,
            last: bool,
            children: &HashMap<Pid, Vec<&ProcessInfo>>,
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
        print_json(&vpses);
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
    let sig = a.signal;
    let n = Client::connect_to(socket)?.kill(&a.name, sig)?;
    if a.json {
        print_json(&json!({ "vps": a.name, "signal": sig.name(), "signalled": n }));
    } else {
        eprintln!("vpstag: sent {sig} to {n} processes of VPS {:?}", a.name);
    }
    Ok(0)
}

/// How often `stop` says what it is waiting for.
const STOP_REPORT_EVERY: Duration = Duration::from_secs(1);

fn stop(a: super::StopArgs, socket: &Path) -> R {
    let grace = Duration::from_secs_f64(a.grace.max(0.0));
    let mut c = Client::connect_to(socket)?;
    let began = Instant::now();
    let (tx, rx) = mpsc::channel();
    let name = a.name.clone();
    std::thread::Builder::new()
        .name("vpstag-stop".into())
        .spawn(move || {
            let _ = tx.send(c.stop(&name, grace));
        })
        .map_err(|e| Failure::Other(format!("starting a thread: {e}")))?;
    // While the daemon works, a second connection asks which members are left, once a second.
    let mut watcher: Option<Client> = None;
    let n = loop {
        match rx.recv_timeout(STOP_REPORT_EVERY) {
            Ok(signalled) => break signalled?,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Failure::Other("the stop request ended without a reply".into()))
            }
            Err(RecvTimeoutError::Timeout) if a.json => {}
            Err(RecvTimeoutError::Timeout) => {
                if watcher.is_none() {
                    watcher = Client::connect_to(socket).ok();
                }
                // Members already gone, or the VPS already forgotten: nothing to say this time.
                match watcher.as_mut().map(|w| w.members(&a.name)) {
                    Some(Ok(left)) if !left.is_empty() => {
                        eprintln!("{}", stop_progress(&a.name, &left, began.elapsed(), grace));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => watcher = None,
                }
            }
        }
    };
    if a.json {
        print_json(&json!({ "vps": a.name, "signalled": n }));
    } else {
        eprintln!("vpstag: VPS {:?} stopped ({n} processes signalled) and forgotten", a.name);
    }
    Ok(0)
}

/// What `stop` is waiting for, `elapsed` after it asked with grace period `grace`: the VPS, how
/// many members are left and which, and how long until SIGKILL.
fn stop_progress(name: &str, left: &[Pid], elapsed: Duration, grace: Duration) -> String {
    const SHOWN: usize = 10;
    let mut pids: Vec<String> = left.iter().take(SHOWN).map(ToString::to_string).collect();
    if left.len() > SHOWN {
        pids.push(format!("and {} more", left.len() - SHOWN));
    }
    let when = match grace.checked_sub(elapsed) {
        Some(d) if !d.is_zero() => format!("SIGKILL in {}s", d.as_secs_f64().ceil() as u64),
        _ => format!("SIGKILL sent {}s ago", (elapsed - grace).as_secs()),
    };
    format!(
        "vpstag: stopping VPS {:?}: {} {} left ({}); {when}",
        printable(name),
        left.len(),
        if left.len() == 1 { "process" } else { "processes" },
        pids.join(" ")
    )
}

/// An event as one line of text (`vpstag events`, `vpstag run`), control characters escaped.
pub(super) fn event_text(e: &EventInfo) -> String {
    let vps = if e.vps.is_empty() { Cow::Borrowed("*") } else { printable(&e.vps) };
    let num = |p: Option<Pid>| p.map_or(0, Pid::as_raw);
    let pid = num(e.pid);
    let count = || match e.count {
        Some(1) => "1 event".to_string(),
        Some(n) => format!("{n} events"),
        None => "events".to_string(),
    };
    match e.event.as_str() {
        "fork" => format!("[{vps}] fork {} -> {pid}", num(e.parent)),
        "exec" => format!("[{vps}] exec {pid} {}", printable(e.cmd.as_deref().unwrap_or("?"))),
        "exit" => match (e.code, e.signal) {
            (Some(c), _) => format!("[{vps}] exit {pid} (exit code {c})"),
            (_, Some(s)) => format!("[{vps}] exit {pid} (killed by signal {s})"),
            _ => format!("[{vps}] exit {pid}"),
        },
        "lost" if e.reason.as_deref() == Some("expired") => {
            let n = if e.count.is_some() { format!("up to {}", count()) } else { count() };
            format!("[{vps}] lost {n} (no longer kept by the daemon when this stream resumed)")
        }
        "lost" => format!("[{vps}] lost {} (the table was repaired from a scan, but events are missing here)", count()),
        other => format!("[{vps}] {} {pid}", printable(other)),
    }
}

fn print_event(e: &EventInfo, json: bool) -> bool {
    let line = if json { serde_json::to_string(e).expect("serialises") } else { event_text(e) };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn events(a: super::EventsArgs, socket: &Path) -> R {
    let client = Client::connect_to(socket)?;
    let events = match a.after {
        Some(seq) => client.events_after(a.name.as_deref(), seq)?,
        None => client.events(a.name.as_deref(), a.follow)?,
    };
    for e in events {
        if !print_event(&e?, a.json) {
            break;
        }
    }
    Ok(0)
}

fn check(a: super::CheckArgs, socket: &Path) -> R {
    let r = Client::connect_to(socket)?.check()?;
    if a.json {
        print_json(&r);
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
        ProcessInfo {
            pid: Pid::new(pid).unwrap(),
            ppid: Pid::new(ppid),
            vps: vps.into(),
            cmd: format!("c{pid}"),
            uid: 0,
            source: "event".into(),
            start: 0,
        }
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
    fn stop_says_which_vps_how_many_and_which_processes_are_left_and_when_sigkill_comes() {
        let pids: Vec<Pid> = (101..=103).filter_map(Pid::new).collect();
        let s = |left: &[Pid], elapsed: f64| {
            stop_progress("web", left, Duration::from_secs_f64(elapsed), Duration::from_secs(5))
        };
        assert_eq!(s(&pids, 1.2), "vpstag: stopping VPS \"web\": 3 processes left (101 102 103); SIGKILL in 4s");
        assert_eq!(s(&pids[..1], 4.5), "vpstag: stopping VPS \"web\": 1 process left (101); SIGKILL in 1s");
        assert_eq!(s(&pids[..1], 7.1), "vpstag: stopping VPS \"web\": 1 process left (101); SIGKILL sent 2s ago");
        let many: Vec<Pid> = (1000..1012).filter_map(Pid::new).collect();
        let line = s(&many, 1.0);
        assert!(
            line.contains("12 processes left (1000 1001") && line.ends_with("1009 and 2 more); SIGKILL in 4s"),
            "{line}"
        );
    }

    #[test]
    fn a_lost_event_says_how_many_and_of_which_stream() {
        let lost =
            |vps: &str, count| EventInfo { event: "lost".into(), vps: vps.into(), count, ..EventInfo::default() };
        assert_eq!(
            event_text(&lost("", Some(3))),
            "[*] lost 3 events (the table was repaired from a scan, but events are missing here)"
        );
        assert_eq!(
            event_text(&lost("web", None)),
            "[web] lost events (the table was repaired from a scan, but events are missing here)"
        );
        assert_eq!(
            event_text(&EventInfo::expired("web", Some(4), 99)),
            "[web] lost up to 4 events (no longer kept by the daemon when this stream resumed)"
        );
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
