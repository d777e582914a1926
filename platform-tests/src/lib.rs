//! Scenario programs and harness for vpstag's platform tests.
//!
//! The `vpstag-scenario` binary builds real process trees (see its docs for the shapes and the
//! report format). This library reads its report ([`Report`]), identifies processes robustly
//! against PID reuse ([`ProcessStamp`]), walks `/proc` ([`live_descendants_of`]) and cleans up by
//! pid ([`kill_pids`], [`Cleanup`]).
//!
//! The `/proc` helpers are Linux-only at run time (they compile everywhere and find nothing where
//! there is no Linux-style `/proc`).
//!
//! ```text
//! vpstag-scenario SHAPE [--report FILE] [--count N]
//!   SHAPE: fork-chain vfork-exec posix-spawn fork-from-thread double-fork-setsid clone-parent
//!          clone3 pthread-exit-main exec-from-thread pid-namespace relay orphan-reparent
//!          nested-subreaper churn all
//! report lines:  PID SHAPE/ROLE | READY N | SKIP SHAPE REASON | FAIL SHAPE REASON
//! ```
//!
//! Tests (as root, for the proc connector, PID namespaces and ptrace of adopted processes):
//!
//! ```text
//! cargo test -p vpstag-platform-tests --test shapes    # the scenarios alone, checked in /proc
//! cargo test -p vpstag-platform-tests --test lineage   # the tracker's tags, once per backend
//! ```

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// What a `vpstag-scenario` run reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `PID ROLE` lines: processes meant to be alive, in the order they reported.
    pub live: Vec<(i32, String)>,
    /// `READY N`: the count of live lines, written once the whole tree is in place.
    pub ready: Option<usize>,
    /// `SKIP SHAPE REASON` lines: shapes the system does not offer.
    pub skipped: Vec<(String, String)>,
    /// `FAIL SHAPE REASON` lines: shapes that went wrong.
    pub failed: Vec<(String, String)>,
}

impl Report {
    /// Parses report text. A last line without its newline (still being written) is ignored,
    /// and so are lines that fit no known form.
    pub fn parse(text: &str) -> Report {
        let mut r = Report::default();
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        for line in complete.lines() {
            let line = line.trim_end();
            let (head, rest) = match line.split_once(' ') {
                Some((h, rest)) => (h, rest.trim()),
                None => (line, ""),
            };
            match head {
                "READY" => r.ready = rest.parse().ok(),
                "SKIP" | "FAIL" => {
                    let (shape, reason) = match rest.split_once(' ') {
                        Some((s, why)) => (s.to_string(), why.trim().to_string()),
                        None => (rest.to_string(), String::new()),
                    };
                    if head == "SKIP" {
                        r.skipped.push((shape, reason));
                    } else {
                        r.failed.push((shape, reason));
                    }
                }
                pid => {
                    if let Ok(pid) = pid.parse::<i32>() {
                        if pid > 0 && !rest.is_empty() {
                            r.live.push((pid, rest.to_string()));
                        }
                    }
                }
            }
        }
        r
    }

    /// Reads and parses the report file.
    pub fn read(path: impl AsRef<Path>) -> io::Result<Report> {
        Ok(Report::parse(&std::fs::read_to_string(path)?))
    }

    /// Polls the report until it holds `READY`; `TimedOut` (with what was there) otherwise. A
    /// file that does not exist yet counts as empty.
    pub fn wait_ready(path: impl AsRef<Path>, timeout: Duration) -> io::Result<Report> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        loop {
            let report = match Report::read(path) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Report::default(),
                Err(e) => return Err(e),
            };
            if report.ready.is_some() {
                return Ok(report);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no READY in {} after {timeout:?}; so far: {report:?}", path.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pids of the live lines (deduplicated, sorted).
    pub fn pids(&self) -> Vec<i32> {
        self.live.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// The pid reported under exactly `role` (e.g. `"fork-chain/3"`).
    pub fn pid_of(&self, role: &str) -> Option<i32> {
        self.live.iter().find(|(_, r)| r == role).map(|(p, _)| *p)
    }

    /// The live lines whose role starts with `SHAPE/`.
    pub fn of_shape<'a>(&'a self, shape: &'a str) -> impl Iterator<Item = (i32, &'a str)> + 'a {
        self.live
            .iter()
            .filter(move |(_, r)| r.split_once('/').map(|(s, _)| s) == Some(shape))
            .map(|(p, r)| (*p, r.as_str()))
    }
}

/// The fields of `/proc/PID/stat` the harness uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 1.
    pub pid: i32,
    /// Field 2, without its parentheses; may hold spaces and `)`.
    pub comm: String,
    /// Field 3: R, S, D, Z, T, t, X, I...
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 5.
    pub pgrp: i32,
    /// Field 6.
    pub session: i32,
    /// Field 20.
    pub num_threads: i64,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
}

impl Stat {
    /// Parses the text of `/proc/PID/stat`. The command name is everything between the first `(`
    /// and the *last* `)`, since it can hold both spaces and parentheses.
    pub fn parse(text: &str) -> Option<Stat> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        if close < open {
            return None;
        }
        let pid = text[..open].trim().parse().ok()?;
        let comm = text[open + 1..close].to_string();
        // Field 3 onwards; index k here is field k + 3.
        let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3).copied();
        let state = field(3)?.chars().next()?;
        Some(Stat {
            pid,
            comm,
            state,
            ppid: field(4)?.parse().ok()?,
            pgrp: field(5)?.parse().ok()?,
            session: field(6)?.parse().ok()?,
            num_threads: field(20)?.parse().ok()?,
            start_ticks: field(22)?.parse().ok()?,
        })
    }

    /// Reads `/proc/PID/stat`; `None` when there is no such process.
    pub fn of(pid: i32) -> Option<Stat> {
        if pid <= 0 {
            return None;
        }
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Whether the process is alive: not a zombie, or a zombie *leader* whose other threads still
    /// run (a main thread that called pthread_exit).
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x') || self.num_threads > 1
    }
}

/// A process identity that survives PID reuse: the pid and its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessStamp {
    /// The process id.
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat`.
    pub start_ticks: u64,
}

impl ProcessStamp {
    /// Stamps `pid` as it is now; `None` when there is no such process.
    pub fn of(pid: i32) -> Option<ProcessStamp> {
        Stat::of(pid).map(|s| ProcessStamp { pid, start_ticks: s.start_ticks })
    }

    /// Whether `pid` is still this very process (not a recycled pid), zombie or not.
    pub fn still_exists(&self) -> bool {
        Stat::of(self.pid).is_some_and(|s| s.start_ticks == self.start_ticks)
    }

    /// Whether `pid` is still this very process and alive (see [`Stat::is_live`]).
    pub fn is_live(&self) -> bool {
        Stat::of(self.pid).is_some_and(|s| s.start_ticks == self.start_ticks && s.is_live())
    }
}

/// Stamps every pid that exists now (the others are left out).
pub fn stamp_all(pids: impl IntoIterator<Item = i32>) -> Vec<ProcessStamp> {
    let mut seen = BTreeSet::new();
    pids.into_iter().filter(|p| seen.insert(*p)).filter_map(ProcessStamp::of).collect()
}

/// Whether `pid` is alive now (see [`Stat::is_live`]).
pub fn is_live(pid: i32) -> bool {
    Stat::of(pid).is_some_and(|s| s.is_live())
}

/// SIGKILLs each stamped process whose pid still belongs to it. On Linux a pidfd is opened first
/// and the stamp checked afterwards, so the signal cannot reach a process that reused the pid in
/// between; elsewhere (or without pidfd) the check and the kill are as close as they can be.
/// Returns how many were signalled.
pub fn kill_pids(stamps: &[ProcessStamp]) -> usize {
    stamps.iter().filter(|s| kill_stamped(s)).count()
}

#[cfg(target_os = "linux")]
fn kill_stamped(s: &ProcessStamp) -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, s.pid, 0) };
    if fd < 0 {
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) && kill_checked(s);
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    use std::os::fd::AsRawFd;
    if !s.still_exists() {
        return false;
    }
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn kill_stamped(s: &ProcessStamp) -> bool {
    kill_checked(s)
}

fn kill_checked(s: &ProcessStamp) -> bool {
    s.still_exists() && unsafe { libc::kill(s.pid, libc::SIGKILL) } == 0
}

/// Every process (not thread) on the system with its parent, from `/proc`.
pub fn process_table() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter_map(Stat::of).collect()
}

/// The live descendants of `pid` (children, their children...) by the ppid links in `/proc`,
/// processes only (`/proc` lists thread-group leaders, not threads). `pid` itself is not included.
/// Zombies are left out but walked through, although a zombie has no children (they are
/// re-parented when it dies) unless it is a pthread_exit'ed leader, which counts as live.
pub fn live_descendants_of(pid: i32) -> Vec<i32> {
    let table = process_table();
    let mut children: HashMap<i32, Vec<&Stat>> = HashMap::new();
    for s in &table {
        children.entry(s.ppid).or_default().push(s);
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    let mut seen = BTreeSet::from([pid]);
    while let Some(p) = stack.pop() {
        for c in children.get(&p).map(|v| v.as_slice()).unwrap_or(&[]) {
            if seen.insert(c.pid) {
                if c.is_live() {
                    out.push(c.pid);
                }
                stack.push(c.pid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Waits until none of `stamps` is live (zombies count as gone); returns those still live at
/// the deadline.
pub fn wait_gone(stamps: &[ProcessStamp], timeout: Duration) -> Vec<ProcessStamp> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<ProcessStamp> = stamps.iter().copied().filter(|s| s.is_live()).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps those of `stamps` that are zombie children of this very process (a `clone-parent`
/// sibling is one), skipping `except` (children a `std::process::Child` will wait for).
pub fn reap_own_zombies(stamps: &[ProcessStamp], except: &[i32]) {
    let me = std::process::id() as i32;
    for s in stamps {
        if except.contains(&s.pid) {
            continue;
        }
        if let Some(st) = Stat::of(s.pid) {
            if st.start_ticks == s.start_ticks && st.ppid == me && matches!(st.state, 'Z' | 'X') {
                let mut status = 0;
                unsafe { libc::waitpid(s.pid, &mut status, libc::WNOHANG) };
            }
        }
    }
}

/// Kills, by pid, every process a test started, whatever way the test ends (its `Drop` runs on
/// assertion failures too).
///
/// Add the pids (they are stamped at once), or roots whose live descendants are collected at
/// clean-up time; `Child`ren are killed and waited for.
#[derive(Default)]
pub struct Cleanup {
    stamps: Vec<ProcessStamp>,
    roots: Vec<ProcessStamp>,
    children: Vec<std::process::Child>,
    files: Vec<std::path::PathBuf>,
}

impl Cleanup {
    /// An empty guard.
    pub fn new() -> Cleanup {
        Cleanup::default()
    }

    /// Records pids to kill (stamped now; pids already gone are ignored).
    pub fn add(&mut self, pids: impl IntoIterator<Item = i32>) {
        let new = stamp_all(pids);
        for s in new {
            if !self.stamps.contains(&s) {
                self.stamps.push(s);
            }
        }
    }

    /// Records a root: at clean-up its live descendants are stamped and killed too.
    pub fn add_root(&mut self, pid: i32) {
        if let Some(s) = ProcessStamp::of(pid) {
            self.roots.push(s);
            self.add([pid]);
        }
    }

    /// Takes ownership of a child process (and records it as a root).
    pub fn add_child(&mut self, child: std::process::Child) {
        self.add_root(child.id() as i32);
        self.children.push(child);
    }

    /// Records a file (a report) to delete at drop, unless the test is failing (then it stays,
    /// for a post-mortem).
    pub fn add_file(&mut self, path: impl Into<std::path::PathBuf>) {
        self.files.push(path.into());
    }

    /// Everything recorded, descendants of the roots included, as of now.
    pub fn stamps_now(&self) -> Vec<ProcessStamp> {
        let mut all = self.stamps.clone();
        for r in &self.roots {
            if r.still_exists() {
                for s in stamp_all(live_descendants_of(r.pid)) {
                    if !all.contains(&s) {
                        all.push(s);
                    }
                }
            }
        }
        all
    }

    /// Kills everything (several rounds, in case something forks while dying), waits for the
    /// children and returns what is still live after `timeout`.
    pub fn kill_all(&mut self, timeout: Duration) -> Vec<ProcessStamp> {
        let deadline = Instant::now() + timeout;
        let mut all = self.stamps_now();
        loop {
            kill_pids(&all);
            for s in self.stamps_now() {
                if !all.contains(&s) {
                    all.push(s);
                }
            }
            let child_pids: Vec<i32> = self.children.iter().map(|c| c.id() as i32).collect();
            reap_own_zombies(&all, &child_pids);
            let left = wait_gone(&all, Duration::from_millis(200));
            if left.is_empty() || Instant::now() >= deadline {
                for c in &mut self.children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                self.children.clear();
                reap_own_zombies(&all, &[]);
                self.stamps.clear();
                self.roots.clear();
                return left;
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let left = self.kill_all(Duration::from_secs(5));
        if !left.is_empty() {
            eprintln!("cleanup: still alive after SIGKILL: {left:?}");
        }
        if std::thread::panicking() {
            for f in &self.files {
                eprintln!("cleanup: kept {} for inspection", f.display());
            }
        } else {
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_parses_every_line_kind() {
        let text = "12 fork-chain/1\n13 fork-chain/2\nSKIP clone3 clone3: ENOSYS (kernel older than 5.3)\n\
                    FAIL relay timed out after 30s\n14 all/top\nREADY 3\n";
        let r = Report::parse(text);
        assert_eq!(r.live, vec![(12, "fork-chain/1".into()), (13, "fork-chain/2".into()), (14, "all/top".into())]);
        assert_eq!(r.ready, Some(3));
        assert_eq!(r.skipped, vec![("clone3".into(), "clone3: ENOSYS (kernel older than 5.3)".into())]);
        assert_eq!(r.failed, vec![("relay".into(), "timed out after 30s".into())]);
        assert_eq!(r.pids(), vec![12, 13, 14]);
        assert_eq!(r.pid_of("fork-chain/2"), Some(13));
        assert_eq!(r.of_shape("fork-chain").count(), 2);
    }

    #[test]
    fn report_ignores_partial_and_junk_lines() {
        let r = Report::parse("12 a/b\nnonsense\n-4 x\n0 zero\n13\nREADY x\n14 c/d\nREADY 2");
        assert_eq!(r.live, vec![(12, "a/b".into()), (14, "c/d".into())]);
        assert_eq!(r.ready, None, "a READY without its newline is not complete yet");
        assert_eq!(Report::parse(""), Report::default());
        assert_eq!(Report::parse("READY 0\n").ready, Some(0));
    }

    #[test]
    fn wait_ready_times_out_on_a_missing_file() {
        let e = Report::wait_ready("/nonexistent/vpstag-report", Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    const STAT_TAIL: &str = "S 1 2 3 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 123456 1000 10 \
                             18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_parses_plain_comm() {
        let s = Stat::parse(&format!("42 (sleep) {STAT_TAIL}\n")).unwrap();
        assert_eq!(s.pid, 42);
        assert_eq!(s.comm, "sleep");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 2);
        assert_eq!(s.session, 3);
        assert_eq!(s.num_threads, 3);
        assert_eq!(s.start_ticks, 123456);
    }

    #[test]
    fn stat_parses_comm_with_spaces_and_parens() {
        let s = Stat::parse(&format!("7 (a) b (c)) ) {STAT_TAIL}")).unwrap();
        assert_eq!(s.comm, "a) b (c)) ");
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start_ticks, 123456);
        let s = Stat::parse(&format!("8 () {STAT_TAIL}")).unwrap();
        assert_eq!(s.comm, "");
    }

    #[test]
    fn stat_rejects_truncated_text() {
        assert_eq!(Stat::parse("42 (sleep) S 1 2"), None);
        assert_eq!(Stat::parse("42 sleep S 1 2 3"), None);
        assert_eq!(Stat::parse(""), None);
    }

    #[test]
    fn zombie_leader_with_threads_is_live() {
        let zombie = Stat::parse(&format!("9 (x) Z{}", &STAT_TAIL[1..])).unwrap();
        assert!(zombie.is_live(), "3 threads: a pthread_exit'ed leader");
        let mut dead = zombie.clone();
        dead.num_threads = 1;
        assert!(!dead.is_live());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stamps_of_this_process() {
        let me = std::process::id() as i32;
        let s = ProcessStamp::of(me).unwrap();
        assert!(s.is_live());
        let recycled = ProcessStamp { pid: me, start_ticks: s.start_ticks + 1 };
        assert!(!recycled.still_exists());
        assert_eq!(kill_pids(&[recycled]), 0, "a stamp that does not match is never killed");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn kills_a_child_and_finds_descendants() {
        let mut guard = Cleanup::new();
        let child = std::process::Command::new("/bin/sh").args(["-c", "sleep 30 & sleep 30 & wait"]).spawn().unwrap();
        let root = child.id() as i32;
        guard.add_child(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while live_descendants_of(root).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let kids = live_descendants_of(root);
        assert_eq!(kids.len(), 2, "{kids:?}");
        let stamps = stamp_all(kids.iter().copied());
        assert_eq!(kill_pids(&stamps), 2);
        assert!(wait_gone(&stamps, Duration::from_secs(5)).is_empty());
        assert!(guard.kill_all(Duration::from_secs(5)).is_empty());
    }
}
