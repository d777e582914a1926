//! Live tests: real processes followed by a real `Ptrace`: what only this backend does (start
//! times, stop counts, job control, signals, reaping, the tracer's life). What every backend must
//! do (fork/exec/exit order, exit statuses, threads, watch/forget) is checked by
//! `platform-tests/tests/conformance.rs`.
//!
//! The tests run one at a time (a global lock): some count the tracer's stops, and a `Ptrace`
//! collects the roots these tests fork. Every test cleans up the processes it started, by pid:
//! a dropped `Ptrace` leaves its tracees running (no PTRACE_O_EXITKILL by default), so `Session`
//! kills whatever is still followed before dropping it.
#![cfg(target_os = "linux")]

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vpstag_ptrace::decode::parse_state;
use vpstag_ptrace::Ptrace;
use vpstag_tracker::{Event, EventKind, ExitStatus, ForkTracker, Pid, TrackerError, VpsId};

const PY: &str = "/usr/bin/python3";

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn sigrtmin() -> i32 {
    libc::SIGRTMIN()
}

/// A scratch directory for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vpstag-ptrace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// Removes the scratch directory (the tests that use it run one at a time).
fn clean_scratch() {
    let dir = std::env::temp_dir().join(format!("vpstag-ptrace-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(dir);
}

fn script(name: &str, code: &str) -> String {
    let p = scratch(name);
    std::fs::write(&p, code).unwrap();
    p.to_str().unwrap().to_owned()
}

/// Forks a child that blocks reading a pipe (the start gate), then execs `argv`.
/// Only async-signal-safe calls happen in the child before exec.
fn spawn_gated(argv: &[&str]) -> (Pid, i32) {
    let cargs: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let mut fds = [0; 2];
    // SAFETY: valid array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child only calls read, execv and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: async-signal-safe calls on valid buffers.
        unsafe {
            loop {
                let r = libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                if r == 1 {
                    break;
                }
                if r == 0 {
                    libc::_exit(126);
                }
            }
            libc::execv(ptrs[0], ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fds[0]) };
    (Pid::new(pid).unwrap(), fds[1])
}

struct Session {
    pt: Option<Ptrace>,
    root: Pid,
    /// Every root watched (`root` first).
    roots: Vec<Pid>,
    events: Vec<Event>,
    root_done: bool,
}

impl Session {
    fn start(argv: &[&str]) -> Session {
        Session::start_with(Ptrace::new().expect("Ptrace::new"), argv)
    }

    fn start_with(mut pt: Ptrace, argv: &[&str]) -> Session {
        let (root, gate) = spawn_gated(argv);
        let r = pt.watch(root, VpsId(1));
        // Open the gate either way (on error the child just runs untraced and is killed below).
        // SAFETY: our own descriptor and a valid byte.
        unsafe {
            libc::write(gate, b"g".as_ptr().cast(), 1);
            libc::close(gate);
        }
        let s = Session { pt: Some(pt), root, roots: vec![root], events: Vec::new(), root_done: false };
        r.expect("watch");
        s
    }

    fn pt(&mut self) -> &mut Ptrace {
        self.pt.as_mut().unwrap()
    }

    /// Reads for at most `ms` milliseconds; returns how many events came.
    fn pump(&mut self, ms: u64) -> usize {
        let mut out = Vec::new();
        let n = self.pt().read_events(&mut out, Some(Duration::from_millis(ms))).expect("read_events");
        assert_eq!(n, out.len());
        for ev in &out {
            if let EventKind::Exit { pid, thread, group_dead: Some(true), .. } = ev.kind {
                if pid == self.root && thread == self.root {
                    self.root_done = true;
                }
            }
        }
        self.events.extend(out);
        n
    }

    /// Reads until `done(events)` or the deadline.
    fn until(&mut self, secs: u64, done: impl Fn(&Session) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            self.pump(50);
        }
        done(self)
    }

    /// Reads until the root has exited and every task followed has exited; returns the root's
    /// exit status.
    fn finish(&mut self) -> ExitStatus {
        let ok = self.until(20, |s| s.root_done && lineage(&s.roots, &s.events).is_empty());
        assert!(ok, "not finished: {:#?}", self.events);
        self.exit_of(self.root).expect("root exit")
    }

    fn exit_of(&self, pid: Pid) -> Option<ExitStatus> {
        self.events.iter().find_map(|e| match e.kind {
            EventKind::Exit { pid: p, thread, status, group_dead: Some(true) } if p == pid && thread == pid => status,
            _ => None,
        })
    }

    fn forks(&self) -> Vec<(Pid, Pid, Pid, bool)> {
        self.events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Fork { parent, child, child_thread, thread, .. } => {
                    Some((parent, child, child_thread, thread))
                }
                _ => None,
            })
            .collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(pt) = self.pt.as_mut() {
            // Kill every process still followed, until each exit is reported (no assertion here:
            // this may run while a test panics). A followed task stays unreaped until the tracer
            // reports its exit, so its pid cannot have been reused.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut out = Vec::new();
            loop {
                let _ = pt.read_events(&mut out, Some(Duration::ZERO));
                self.events.append(&mut out);
                let alive = alive_tasks(&self.roots, &self.events);
                if alive.is_empty() || Instant::now() >= deadline {
                    break;
                }
                for t in alive {
                    // SAFETY: plain system call on an unreaped tracee (see above).
                    unsafe { libc::kill(tgid_of(&self.events, t).as_raw(), libc::SIGKILL) };
                }
                let _ = pt.read_events(&mut out, Some(Duration::from_millis(50)));
                self.events.append(&mut out);
            }
        } else if !self.root_done {
            // The test dropped the tracker itself and cleans up the rest; the root is our child,
            // unreaped (see below): no pid reuse.
            // SAFETY: plain system call.
            unsafe { libc::kill(self.root.as_raw(), libc::SIGKILL) };
        }
        drop(self.pt.take());
        let mut st = 0;
        // Reap the root as its real parent if the tracer did not (ECHILD otherwise).
        // SAFETY: plain system call.
        unsafe { libc::waitpid(self.root.as_raw(), &mut st, libc::__WALL) };
    }
}

/// Checks the order contract on `events` and returns the tasks still alive at the end:
/// every task's Fork comes before any event of it, a thread's parent is its process, no task is
/// created twice, every exit has a status.
fn lineage(roots: &[Pid], events: &[Event]) -> HashSet<Pid> {
    let mut alive: HashSet<Pid> = roots.iter().copied().collect();
    let mut procs: HashSet<Pid> = roots.iter().copied().collect();
    for ev in events {
        match ev.kind {
            EventKind::Fork { parent, child, child_thread, thread, child_start } => {
                assert!(!alive.contains(&child_thread), "Fork of a live task {child_thread}: {events:#?}");
                assert!(procs.contains(&parent), "Fork from an unknown parent {parent}: {events:#?}");
                assert!(child_start.is_some(), "no child_start: {ev:?}");
                if thread {
                    assert_eq!(parent, child);
                } else {
                    assert_eq!(child, child_thread);
                    procs.insert(child);
                }
                alive.insert(child_thread);
            }
            EventKind::Exec { pid, thread } => {
                assert!(procs.contains(&pid), "Exec of unknown process {pid}: {events:#?}");
                assert!(alive.contains(&thread), "Exec by unknown thread {thread}: {events:#?}");
                alive.remove(&thread);
                alive.insert(pid);
            }
            EventKind::Exit { pid, thread, status, group_dead } => {
                assert!(procs.contains(&pid), "Exit of unknown process {pid}: {events:#?}");
                assert!(alive.remove(&thread), "Exit of unknown task {thread}: {events:#?}");
                assert!(status.is_some());
                if group_dead == Some(true) {
                    assert!(alive.iter().all(|t| !procs.contains(t) || *t != pid));
                    procs.remove(&pid);
                }
            }
            _ => panic!("ptrace never loses events: {ev:?}"),
        }
    }
    alive
}

/// The tasks started and not ended according to `events`, without checking their order (for
/// cleaning up).
fn alive_tasks(roots: &[Pid], events: &[Event]) -> HashSet<Pid> {
    let mut alive: HashSet<Pid> = roots.iter().copied().collect();
    for ev in events {
        match ev.kind {
            EventKind::Fork { child_thread, .. } => {
                alive.insert(child_thread);
            }
            EventKind::Exec { pid, thread } => {
                alive.remove(&thread);
                alive.insert(pid);
            }
            EventKind::Exit { thread, .. } => {
                alive.remove(&thread);
            }
            _ => {}
        }
    }
    alive
}

fn proc_stat(pid: Pid) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

fn start_time(pid: Pid) -> Option<u64> {
    let s = proc_stat(pid)?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn exited(code: i32) -> Option<ExitStatus> {
    Some(ExitStatus::Exited(code))
}

#[test]
fn capabilities_and_errors() {
    let _g = lock();
    let mut pt = Ptrace::new().unwrap();
    let c = pt.capabilities();
    assert!(!c.host_wide && !c.holds_tags && c.synchronous && c.thread_events && c.reaps && !c.can_lose);
    let mut out = Vec::new();
    assert_eq!(pt.read_events(&mut out, Some(Duration::ZERO)).unwrap(), 0);
    let t = Instant::now();
    assert_eq!(pt.read_events(&mut out, Some(Duration::from_millis(50))).unwrap(), 0);
    assert!(t.elapsed() >= Duration::from_millis(45));
    // No such process (above any pid_max).
    let r = pt.watch(Pid::new(i32::MAX - 7).unwrap(), VpsId(1));
    assert!(matches!(r, Err(TrackerError::NoSuchProcess(_))), "{r:?}");
}

#[test]
fn fork_chain_with_start_times() {
    let _g = lock();
    let mut s = Session::start(&["/bin/sh", "-c", "sh -c 'sleep 0.3 & wait' & wait"]);
    // The fd becomes readable with the first Fork.
    let mut pfd = libc::pollfd { fd: s.pt().as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
    // Compare each child's start time with /proc while it lives (unreaped, so no pid reuse).
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    while !s.root_done && Instant::now() < deadline {
        s.pump(20);
        for ev in &s.events[seen..] {
            if let EventKind::Fork { child, thread: false, child_start: Some(st), .. } = ev.kind {
                if let Some(now) = start_time(child) {
                    assert_eq!(now, st.0, "start time of {child}");
                    checked += 1;
                }
            }
        }
        seen = s.events.len();
    }
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    assert!(checked >= 1, "no start time could be compared");
    let forks = s.forks();
    let root = s.root;
    // root -> A (subshell) -> B (sleep)
    let a: Vec<Pid> = forks.iter().filter(|f| f.0 == root && !f.3).map(|f| f.1).collect();
    let b: Vec<Pid> = forks.iter().filter(|f| a.contains(&f.0) && !f.3).map(|f| f.1).collect();
    assert!(!a.is_empty() && !b.is_empty(), "no fork chain: {:#?}", s.events);
    // B exec'd sleep, and every process exited 0.
    assert!(s.events.iter().any(|e| matches!(e.kind, EventKind::Exec { pid, .. } if b.contains(&pid))));
    for p in a.iter().chain(&b) {
        assert_eq!(s.exit_of(*p), Some(ExitStatus::Exited(0)), "exit of {p}");
    }
    // Events carry the VPS as a hint and a boot-clock time.
    assert!(s.events.iter().all(|e| e.tag == Some(VpsId(1)) && e.time_ns.is_some()));
}

#[test]
fn fork_chain_without_exit_stops() {
    let _g = lock();
    let pt = Ptrace::with_exit_stops(false).unwrap();
    let mut s = Session::start_with(pt, &["/bin/sh", "-c", "sh -c '/bin/true & wait' & wait; exit 2"]);
    assert_eq!(s.finish(), ExitStatus::Exited(2));
    assert!(s.forks().len() >= 2);
}

#[test]
fn many_forks_each_reported_before_it_runs() {
    let _g = lock();
    let list: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let cmd = format!("for i in {}; do /bin/true & done; wait", list.join(" "));
    let mut s = Session::start(&["/bin/sh", "-c", &cmd]);
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let kids: Vec<Pid> = s.forks().iter().filter(|f| f.0 == s.root && !f.3).map(|f| f.1).collect();
    assert_eq!(kids.len(), 40);
    // Round trips: per child, its creator's fork stop, its first stop, its exec stop, its exit
    // stop, its reap and the creator's SIGCHLD stop: 6 (fewer when SIGCHLDs coalesce).
    let c = s.pt().counters();
    eprintln!("counters for 40 forks: {c:?}");
    assert!(c.statuses <= 6 * 40 + 12, "{c:?}");
    for k in &kids {
        assert_eq!(s.exit_of(*k), exited(0));
        // Fork, then Exec, then Exit: the lineage check already proved the Fork came first.
        assert!(s.events.iter().any(|e| e.kind == EventKind::Exec { pid: *k, thread: *k }));
    }
}

/// SIGKILL everything mid-way through a fork storm: creators die between their fork and its
/// event stop, children die before their first stop. Every task must still be accounted for.
#[test]
fn kill_storm_leaves_nothing_unreported() {
    let _g = lock();
    let cmd = "while :; do (sh -c '/bin/true & /bin/true & wait' &) ; /bin/true & done";
    let mut s = Session::start(&["/bin/sh", "-c", cmd]);
    s.until(1, |_| false);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Kill every live task until none is left (the storm creates more meanwhile).
    loop {
        let alive = lineage(&s.roots, &s.events);
        if alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for t in &alive {
                let evs: Vec<_> =
                    s.events.iter().filter(|e| format!("{:?}", e.kind).contains(&t.to_string())).collect();
                eprintln!(
                    "{t}: stat={:?} status={:?}\n  events={evs:#?}",
                    proc_stat(*t),
                    std::fs::read_to_string(format!("/proc/{t}/status")).ok().map(|x| x
                        .lines()
                        .filter(|l| l.starts_with("State")
                            || l.starts_with("TracerPid")
                            || l.starts_with("PPid")
                            || l.starts_with("Tgid"))
                        .collect::<Vec<_>>()
                        .join(" "))
                );
            }
            eprintln!("counters {:?}", s.pt().counters());
            panic!("still alive: {alive:?}");
        }
        for t in &alive {
            // SAFETY: a tracee whose exit was not reported is unreaped: no pid reuse.
            unsafe { libc::syscall(libc::SYS_tgkill, tgid_of(&s.events, *t).as_raw(), t.as_raw(), libc::SIGKILL) };
        }
        s.pump(100);
    }
    let c = s.pt().counters();
    eprintln!("kill storm: {} events, {c:?}", s.events.len());
    assert_eq!(s.exit_of(s.root), Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
}

fn tgid_of(events: &[Event], tid: Pid) -> Pid {
    events
        .iter()
        .find_map(|e| match e.kind {
            EventKind::Fork { child, child_thread, .. } if child_thread == tid => Some(child),
            _ => None,
        })
        .unwrap_or(tid)
}

#[test]
fn exec_from_a_thread() {
    let _g = lock();
    let code = "import threading,os\n\
                def f(): os.execv('/bin/sh', ['sh','-c','exit 4'])\n\
                t=threading.Thread(target=f); t.start(); t.join()\n";
    let mut s = Session::start(&[PY, "-c", code]);
    assert_eq!(s.finish(), ExitStatus::Exited(4));
    let root = s.root;
    let t = s.forks().iter().find(|f| f.3).map(|f| f.2).expect("a thread");
    assert_ne!(t, root);
    assert!(s.events.iter().any(|e| e.kind == EventKind::Exec { pid: root, thread: t }), "{:#?}", s.events);
    // The thread became the process: no exit of its own tid, one exit of the process.
    assert!(!s.events.iter().any(|e| matches!(e.kind, EventKind::Exit { thread, .. } if thread == t)));
    let root_exits =
        s.events.iter().filter(|e| matches!(e.kind, EventKind::Exit { thread, .. } if thread == root)).count();
    assert_eq!(root_exits, 1);
}

#[test]
fn posix_spawn_vfork() {
    let _g = lock();
    let code = "import os\n\
                p=os.posix_spawn('/bin/sh',['sh','-c','exit 6'],os.environ)\n\
                _,st=os.waitpid(p,0)\nraise SystemExit(os.waitstatus_to_exitcode(st))\n";
    let mut s = Session::start(&[PY, "-c", code]);
    assert_eq!(s.finish(), ExitStatus::Exited(6));
    let kids: Vec<Pid> = s.forks().iter().filter(|f| f.0 == s.root && !f.3).map(|f| f.1).collect();
    assert_eq!(kids.len(), 1, "{:#?}", s.events);
    assert_eq!(s.exit_of(kids[0]), exited(6));
}

#[test]
fn clone_parent_child_belongs_to_the_grandparent() {
    let _g = lock();
    let py = script(
        "clone_parent.py",
        "import ctypes,os,time\n\
         l=ctypes.CDLL(None,use_errno=True)\n\
         r=l.syscall(56, 0x00008000|17, 0, 0, 0, 0)\n\
         if r==0:\n    os._exit(9)\n\
         time.sleep(0.3)\n",
    );
    let cmd = format!("{PY} {py}; wait; exit 0");
    let mut s = Session::start(&["/bin/sh", "-c", &cmd]);
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let root = s.root;
    let forks = s.forks();
    // root -> python (P); P's CLONE_PARENT child C counts as root's child and exits 9.
    let c = forks.iter().filter(|f| f.0 == root && !f.3).map(|f| f.1).find(|c| s.exit_of(*c) == exited(9));
    assert!(c.is_some(), "{:#?}", s.events);
    assert!(forks.iter().filter(|f| f.0 == root && !f.3).count() >= 2);
    clean_scratch();
}

#[test]
fn job_control_stop_and_continue() {
    let _g = lock();
    let progress = scratch("progress");
    let code = "import time,sys\n\
                open(sys.argv[1],'w').close()\n\
                for i in range(50):\n    time.sleep(0.02)\n    open(sys.argv[1],'a').write('x')\n";
    let mut s = Session::start(&[PY, "-c", code, progress.to_str().unwrap()]);
    let root = s.root;
    assert!(s.until(10, |_| std::fs::metadata(&progress).map(|m| m.len() > 2).unwrap_or(false)));
    // SAFETY: our unreaped child.
    unsafe { libc::kill(root.as_raw(), libc::SIGSTOP) };
    let mut state = None;
    assert!(s.until(5, |_| matches!(proc_stat(root).as_deref().and_then(parse_state), Some('T' | 't'))));
    if let Some(st) = proc_stat(root).as_deref().and_then(parse_state) {
        state = Some(st);
    }
    eprintln!("state of a stopped tracee: {state:?}");
    let len = std::fs::metadata(&progress).unwrap().len();
    s.pump(400);
    assert_eq!(std::fs::metadata(&progress).unwrap().len(), len, "it ran while stopped");
    assert!(!s.root_done);
    assert!(matches!(proc_stat(root).as_deref().and_then(parse_state), Some('T' | 't')));
    // SAFETY: as above.
    unsafe { libc::kill(root.as_raw(), libc::SIGCONT) };
    assert!(s.until(5, |_| std::fs::metadata(&progress).unwrap().len() > len), "did not run again");
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    assert_eq!(std::fs::metadata(&progress).unwrap().len(), 50);
    clean_scratch();
}

#[test]
fn second_vps_while_tracing() {
    let _g = lock();
    let mut s = Session::start(&["/bin/sh", "-c", "sleep 1.5; exit 0"]);
    let root = s.root;
    // Wait until the tracer thread is busy in waitpid for the first VPS.
    assert!(s.until(5, |s| s.forks().iter().any(|f| f.0 == root)));
    let (root2, gate) = spawn_gated(&["/bin/sh", "-c", "sh -c 'exit 8'; exit 1"]);
    let t = Instant::now();
    let r = s.pt().watch(root2, VpsId(2));
    let took = t.elapsed();
    // SAFETY: our own descriptor and a valid byte.
    unsafe {
        libc::write(gate, b"g".as_ptr().cast(), 1);
        libc::close(gate);
    }
    r.expect("second watch");
    s.roots.push(root2);
    eprintln!("watch while tracing took {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert!(s.until(10, |s| s.exit_of(root2).is_some()));
    assert_eq!(s.exit_of(root2), exited(1));
    let kid = s.forks().iter().find(|f| f.0 == root2).map(|f| f.1).expect("child of the second root");
    assert_eq!(s.exit_of(kid), exited(8));
    for e in &s.events {
        let pid = match e.kind {
            EventKind::Fork { child, .. } => child,
            EventKind::Exec { pid, .. } | EventKind::Exit { pid, .. } => pid,
            _ => unreachable!(),
        };
        let expect = if pid == root2 || pid == kid { VpsId(2) } else { VpsId(1) };
        assert_eq!(e.tag, Some(expect), "{e:?}");
    }
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let mut st = 0;
    // SAFETY: reap the second root as its real parent if the tracer did not.
    unsafe { libc::waitpid(root2.as_raw(), &mut st, libc::WNOHANG) };
}

#[test]
fn job_control_multithreaded() {
    let _g = lock();
    let progress = scratch("progress-mt");
    let done = scratch("done-mt");
    // Three threads write until told to finish (a file appears), so the program cannot end on its
    // own before it was stopped, however slowly this test runs on a busy machine.
    // It first takes a process group of its own: the kernel discards SIGTSTP sent to a process of
    // an orphaned process group (POSIX job control), and the test's own group is orphaned when the
    // test runs under `setsid`, or from a shell that has exited (CI's runner may do either). Its
    // new group has its parent (this test) outside it in the same session, so it is not orphaned.
    let code = "import threading,time,sys,os\n\
                os.setpgid(0,0)\n\
                p,d=sys.argv[1],sys.argv[2]\n\
                def f():\n    while not os.path.exists(d):\n        time.sleep(0.02)\n        open(p,'a').write('x')\n\
                ts=[threading.Thread(target=f) for _ in range(3)]\n\
                [t.start() for t in ts]\n[t.join() for t in ts]\n";
    let mut s = Session::start(&[PY, "-c", code, progress.to_str().unwrap(), done.to_str().unwrap()]);
    let root = s.root;
    let len_now = || std::fs::metadata(&progress).map(|m| m.len()).unwrap_or(0);
    assert!(s.until(10, |_| len_now() > 3), "the threads never wrote: {:?}", s.events);
    // SAFETY: our unreaped child.
    unsafe { libc::kill(root.as_raw(), libc::SIGTSTP) };
    let states = || -> Result<Vec<Option<char>>, String> {
        let tasks = std::fs::read_dir(format!("/proc/{root}/task"))
            .map_err(|e| format!("/proc/{root}/task: {e} (the program is gone before it stopped)"))?;
        Ok(tasks
            .filter_map(|t| t.ok())
            .map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .map(|st| st.as_deref().and_then(parse_state))
            .collect())
    };
    let all_stopped = |st: &Result<Vec<Option<char>>, String>| {
        st.as_ref().is_ok_and(|v| v.len() == 4 && v.iter().all(|c| matches!(c, Some('T' | 't'))))
    };
    let stopped = s.until(10, |_| all_stopped(&states()) || states().is_err());
    assert!(stopped && all_stopped(&states()), "not every thread stopped: {:?}; events {:?}", states(), s.events);
    let len = len_now();
    s.pump(300);
    assert_eq!(len_now(), len, "it ran while stopped");
    // SAFETY: as above.
    unsafe { libc::kill(root.as_raw(), libc::SIGCONT) };
    assert!(s.until(10, |_| len_now() > len), "it did not run again after SIGCONT: {:?}", states());
    std::fs::write(&done, b"").unwrap();
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    clean_scratch();
}

#[test]
fn job_control_seen_by_the_real_parent() {
    let _g = lock();
    let code = "import os,signal,sys\n\
                pid=os.fork()\n\
                if pid==0:\n    os.kill(os.getpid(), signal.SIGSTOP)\n    os._exit(7)\n\
                _,st=os.waitpid(pid, os.WUNTRACED)\n\
                assert os.WIFSTOPPED(st) and os.WSTOPSIG(st)==signal.SIGSTOP, st\n\
                os.kill(pid, signal.SIGCONT)\n\
                _,st=os.waitpid(pid, 0)\n\
                sys.exit(0 if os.WIFEXITED(st) and os.WEXITSTATUS(st)==7 else 1)\n";
    let mut s = Session::start(&[PY, "-c", code]);
    assert_eq!(s.finish(), ExitStatus::Exited(0));
}

#[test]
fn signals_are_delivered_exactly() {
    let _g = lock();
    let out = scratch("signals");
    let ready = scratch("ready");
    let code = "import signal,sys,time\n\
                out,ready=sys.argv[1],sys.argv[2]\n\
                got=[]\n\
                def h(s,f):\n    got.append(s)\n    open(out,'a').write('%d\\n'%s)\n\
                for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGRTMIN+1): signal.signal(s,h)\n\
                open(ready,'w').close()\n\
                t=time.time()+15\n\
                while len(got)<5 and time.time()<t: time.sleep(0.005)\n\
                time.sleep(0.2)\n\
                sys.exit(0 if len(got)==5 else 1)\n";
    let mut s = Session::start(&[PY, "-c", code, out.to_str().unwrap(), ready.to_str().unwrap()]);
    let root = s.root.as_raw();
    let lines = |p: &PathBuf| std::fs::read_to_string(p).map(|t| t.lines().count()).unwrap_or(0);
    assert!(s.until(10, |_| ready.exists()));
    // SAFETY: our unreaped child.
    unsafe { libc::kill(root, libc::SIGUSR1) };
    assert!(s.until(5, |_| lines(&out) == 1));
    // SAFETY: as above.
    unsafe { libc::kill(root, libc::SIGUSR2) };
    assert!(s.until(5, |_| lines(&out) == 2));
    // Real-time signals, with sigqueue. One at a time: Python runs its handler once for however
    // many signals arrived since it last looked, so a burst would be counted as one.
    for i in 0..3 {
        let val = libc::sigval { sival_ptr: i as *mut libc::c_void };
        // SAFETY: plain system call.
        assert_eq!(unsafe { libc::sigqueue(root, sigrtmin() + 1, val) }, 0);
        assert!(s.until(5, |_| lines(&out) == 3 + i));
    }
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let got: Vec<i32> = std::fs::read_to_string(&out).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    let rt = sigrtmin() + 1;
    assert_eq!(got, vec![libc::SIGUSR1, libc::SIGUSR2, rt, rt, rt]);
    clean_scratch();
}

#[test]
fn killed_root_is_reported() {
    let _g = lock();
    let mut s = Session::start(&["/bin/sh", "-c", "sleep 5 & wait"]);
    let root = s.root;
    assert!(s.until(5, |s| s.forks().iter().any(|f| f.0 == root)));
    // SAFETY: our unreaped child.
    unsafe { libc::kill(root.as_raw(), libc::SIGKILL) };
    assert!(s.until(5, |s| s.root_done));
    assert_eq!(s.exit_of(root), Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
    // The orphaned sleep is still followed; kill it by pid.
    let sleep = s.forks().iter().find(|f| f.0 == root).map(|f| f.1).unwrap();
    // SAFETY: a live tracee (its exit was not reported).
    assert!(s.exit_of(sleep).is_none());
    unsafe { libc::kill(sleep.as_raw(), libc::SIGKILL) };
    assert!(s.until(5, |s| s.exit_of(sleep).is_some()));
    assert!(lineage(&s.roots, &s.events).is_empty());
}

/// Runs `nobody_mode` in a copy of this test binary as uid/gid 65534.
#[test]
fn unprivileged_follows_own_children() {
    let _g = lock();
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // A copy nobody can reach whatever the permissions on the build directory (/root/...).
    let dir = std::env::temp_dir().join(format!("vpstag-ptrace-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("live");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&exe)
        .args(["--exact", "nobody_mode", "--nocapture", "--test-threads=1"])
        .env("VPSTAG_PTRACE_NOBODY", "1")
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("NOBODY-OK"), "{text}");
}

/// Only does something when run by `unprivileged_follows_own_children`.
#[test]
fn nobody_mode() {
    if std::env::var_os("VPSTAG_PTRACE_NOBODY").is_none() {
        return;
    }
    let _g = lock();
    // SAFETY: plain system calls.
    assert_eq!(unsafe { (libc::geteuid(), libc::getegid()) }, (65534, 65534));
    let mut s = Session::start(&["/bin/sh", "-c", "sh -c 'exit 3'; exit 5"]);
    assert_eq!(s.finish(), ExitStatus::Exited(5));
    let kid = s.forks().iter().find(|f| f.0 == s.root).map(|f| f.1).unwrap();
    assert_eq!(s.exit_of(kid), exited(3));
    // Another user's process: a clear PermissionDenied.
    let r = s.pt().watch(Pid::new(1).unwrap(), VpsId(2));
    match r {
        Err(TrackerError::PermissionDenied { hint, .. }) => {
            assert!(hint.contains("CAP_SYS_PTRACE"), "{hint}");
            println!("hint: {hint}");
        }
        other => panic!("{other:?}"),
    }
    println!("NOBODY-OK");
}

#[allow(dead_code)]
fn dump(events: &[Event]) -> HashMap<i32, Vec<String>> {
    let mut m: HashMap<i32, Vec<String>> = HashMap::new();
    for e in events {
        m.entry(0).or_default().push(format!("{:?}", e.kind));
    }
    m
}

/// A tree that keeps forking: the root (3 threads) forks a child (2 threads); each of the two
/// processes forks and waits for a short-lived child every 10 ms, and appends a byte to its
/// progress file (`DIR/prog-r`, `DIR/prog-c`) each time. Gives up after `SECS` seconds.
const TREE_PY: &str = "import os,sys,threading,time\n\
    secs,d=float(sys.argv[1]),sys.argv[2]\n\
    end=time.time()+secs\n\
    def spin():\n    while time.time()<end: time.sleep(0.05)\n\
    def loop(name):\n    \
        f=open(os.path.join(d,'prog-'+name),'a')\n    \
        while time.time()<end:\n        \
            p=os.fork()\n        \
            if p==0: os._exit(0)\n        \
            os.waitpid(p,0)\n        \
            f.write('x'); f.flush()\n        \
            time.sleep(0.01)\n\
    for _ in range(2): threading.Thread(target=spin,daemon=True).start()\n\
    c=os.fork()\n\
    if c==0:\n    \
        threading.Thread(target=spin,daemon=True).start()\n    \
        loop('c'); os._exit(0)\n\
    loop('r')\n\
    os.waitpid(c,0)\n";

/// Starts [`TREE_PY`] in `dir` under `pt`; returns once the tree is complete (every thread and
/// the child reported, both processes forking): the session and the child's pid.
fn start_tree(pt: Ptrace, dir: &std::path::Path) -> (Session, Pid) {
    std::fs::create_dir_all(dir).unwrap();
    let py = dir.join("tree.py");
    std::fs::write(&py, TREE_PY).unwrap();
    let mut s = Session::start_with(pt, &[PY, py.to_str().unwrap(), "120", dir.to_str().unwrap()]);
    let root = s.root;
    let child = |s: &Session| s.forks().iter().find(|f| f.0 == root && !f.3).map(|f| f.1);
    let complete = |s: &Session| {
        let Some(c) = child(s) else { return false };
        let forks = s.forks();
        let threads = |p: Pid| forks.iter().filter(|f| f.3 && f.0 == p).count();
        threads(root) >= 2 && threads(c) >= 1 && forks.iter().any(|f| f.0 == c && !f.3) && forks.len() >= 6
    };
    assert!(s.until(30, complete), "the tree did not form: {:#?}", s.events);
    let c = child(&s).unwrap();
    (s, c)
}

/// `(tid, state, TracerPid)` of every thread of `pid`.
fn task_states(pid: Pid) -> Vec<(i32, Option<char>, Option<i32>)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.flatten()
        .map(|e| {
            let tid: i32 = e.file_name().to_str().unwrap().parse().unwrap();
            let state = std::fs::read_to_string(e.path().join("stat")).ok().as_deref().and_then(parse_state);
            let tracer = std::fs::read_to_string(e.path().join("status"))
                .ok()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok()));
            (tid, state, tracer)
        })
        .collect()
}

/// Whether every thread of `pid` is alive, untraced and in `state_ok`.
fn released(pid: Pid, threads: usize, state_ok: impl Fn(char) -> bool) -> bool {
    let t = task_states(pid);
    t.len() == threads && t.iter().all(|(_, st, tracer)| st.is_some_and(&state_ok) && *tracer == Some(0))
}

fn size(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Waits (reading no events) until `cond` holds, for at most `secs`.
fn wait_for(secs: u64, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Dropping the tracker releases its tracees alive: the busy ones (some in a ptrace stop at that
/// moment) run on, a job-control-stopped one stays stopped as untraced (`T`) and `SIGCONT` wakes it.
#[test]
fn dropped_tracker_leaves_the_tree_running() {
    let _g = lock();
    let dir = scratch("drop-tree");
    let (mut s, c) = start_tree(Ptrace::new().unwrap(), &dir);
    let root = s.root;
    // SAFETY: a followed process whose exit was not reported: unreaped.
    unsafe { libc::kill(c.as_raw(), libc::SIGSTOP) };
    let stopped = || {
        let t = task_states(c);
        t.len() == 2 && t.iter().all(|(_, st, _)| matches!(st, Some('t' | 'T')))
    };
    assert!(s.until(10, |_| stopped()), "the child did not stop: {:?}", task_states(c));
    drop(s.pt.take());
    // Both processes and every thread alive and untraced; the stopped one still stopped.
    let ok = wait_for(10, || released(root, 3, |st| !matches!(st, 't' | 'T')) && released(c, 2, |st| st == 'T'));
    assert!(ok, "after drop: root {:?}, child {:?}", task_states(root), task_states(c));
    let (r0, c0) = (size(&dir.join("prog-r")), size(&dir.join("prog-c")));
    assert!(wait_for(10, || size(&dir.join("prog-r")) > r0 + 5), "the root does not run after drop");
    assert_eq!(size(&dir.join("prog-c")), c0, "the stopped child ran");
    // SAFETY: the child is alive (checked above) and untraced; its parent, the root, is alive
    // and has not waited for it: no pid reuse.
    unsafe { libc::kill(c.as_raw(), libc::SIGCONT) };
    let ok = wait_for(10, || size(&dir.join("prog-c")) > c0 + 5);
    assert!(ok, "the child does not run after SIGCONT: {:?}", task_states(c));
    // Clean up: the child first (the root, alive, does not reap it meanwhile), then the root.
    // SAFETY: as above.
    unsafe { libc::kill(c.as_raw(), libc::SIGKILL) };
    drop(s); // kills and reaps the root
    clean_scratch();
}

/// Run by `tree_outlives_a_killed_tracker_and_is_followed_again` in a child process: follows a
/// tree, prints `TREE root child`, then keeps reading events until it is killed.
#[test]
fn tracker_process_mode() {
    let Some(dir) = std::env::var_os("VPSTAG_PTRACE_TRACKER_DIR") else { return };
    let _g = lock();
    let (mut s, c) = start_tree(Ptrace::new().unwrap(), std::path::Path::new(&dir));
    println!("TREE {} {}", s.root, c);
    // Killed by the test meanwhile; the deadline only bounds a lost helper.
    s.until(60, |_| false);
}

/// A daemon restart: the tracker's process is SIGKILLed while it follows a busy tree. The tree
/// runs on, untraced, and a fresh tracker can follow every process (every thread) of it again.
#[test]
fn tree_outlives_a_killed_tracker_and_is_followed_again() {
    let _g = lock();
    use std::io::BufRead;
    let dir = scratch("restart-tree");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tracker_process_mode", "--nocapture", "--test-threads=1"])
        .env("VPSTAG_PTRACE_TRACKER_DIR", &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = helper.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let tree = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => match l.split_once("TREE ") {
                Some((_, rest)) => {
                    break rest.split(' ').map(|p| Pid::new(p.parse().unwrap()).unwrap()).collect::<Vec<_>>()
                }
                None => seen.push(l),
            },
            Err(_) => {
                let _ = helper.kill();
                let _ = helper.wait();
                panic!("the tracker process printed no tree: {seen:#?}");
            }
        }
    };
    let (root, c) = (tree[0], tree[1]);
    assert!(task_states(root).iter().all(|t| t.2.is_some_and(|p| p > 0)), "{:?}", task_states(root));
    // A crash of the tracker's process (SIGKILL by pid: our unreaped child).
    helper.kill().unwrap();
    helper.wait().unwrap();
    let ok = wait_for(10, || {
        released(root, 3, |st| !matches!(st, 't' | 'T')) && released(c, 2, |st| !matches!(st, 't' | 'T'))
    });
    assert!(ok, "after the tracker died: root {:?}, child {:?}", task_states(root), task_states(c));
    let (r0, c0) = (size(&dir.join("prog-r")), size(&dir.join("prog-c")));
    let ok = wait_for(10, || size(&dir.join("prog-r")) > r0 + 5 && size(&dir.join("prog-c")) > c0 + 5);
    assert!(ok, "the tree does not run on: {r0} {c0} -> {:?}", (size(&dir.join("prog-r")), size(&dir.join("prog-c"))));

    // The restarted tracker: both processes again, every thread of each seized.
    let mut pt = Ptrace::new().unwrap();
    let watched = pt.watch(root, VpsId(3)).and_then(|()| pt.watch(c, VpsId(3)));
    let tracer = pt.tracer_tid();
    let traced = |p: Pid| task_states(p).iter().all(|t| t.2 == Some(tracer));
    let mut events = Vec::new();
    let mut out = Vec::new();
    // Their new children are reported, born and ended.
    let fork_and_exit = |events: &[Event], parent: Pid| {
        events.iter().any(|e| match e.kind {
            EventKind::Fork { parent: p, child, thread: false, child_start: Some(_), .. } if p == parent => events
                .iter()
                .any(|x| matches!(x.kind, EventKind::Exit { pid, group_dead: Some(true), status: Some(_), .. } if pid == child)),
            _ => false,
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while watched.is_ok() && Instant::now() < deadline && !(fork_and_exit(&events, root) && fork_and_exit(&events, c)) {
        pt.read_events(&mut out, Some(Duration::from_millis(50))).unwrap();
        events.append(&mut out);
    }
    let all_traced = traced(root) && traced(c);
    let states = (task_states(root), task_states(c));
    // Clean up before judging: kill both (followed, so unreaped) and read until they are gone.
    for p in [c, root] {
        // SAFETY: a process that is alive (seen above) and followed or our orphaned tree's.
        unsafe { libc::kill(p.as_raw(), libc::SIGKILL) };
    }
    let gone = |events: &[Event], p: Pid| {
        events.iter().any(|e| matches!(e.kind, EventKind::Exit { pid, thread, group_dead: Some(true), .. } if pid == p && thread == p))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while watched.is_ok() && Instant::now() < deadline && !(gone(&events, root) && gone(&events, c)) {
        pt.read_events(&mut out, Some(Duration::from_millis(50))).unwrap();
        events.append(&mut out);
    }
    drop(pt);
    clean_scratch();
    eprintln!("after the restart: {} events, root {root} child {c}, states {states:?}", events.len());
    watched.expect("watch after the restart");
    assert!(all_traced, "not every thread re-seized (tracer {tracer}): {states:?}");
    assert!(fork_and_exit(&events, root) && fork_and_exit(&events, c), "no new child reported: {events:#?}");
    assert!(gone(&events, root) && gone(&events, c), "exits not reported: {events:#?}");
    assert!(events.iter().all(|e| e.tag == Some(VpsId(3))));
}

/// The tracer thread collects its own tracees only: the program's other children, started from
/// another thread while the followed tree forks, are left to their own `waitpid`.
#[test]
fn other_children_of_the_program_are_left_alone() {
    let _g = lock();
    let mut s = Session::start(&["/bin/sh", "-c", "for i in $(seq 20000); do /bin/true; done"]);
    let root = s.root;
    assert!(s.until(10, |s| s.forks().iter().filter(|f| f.0 == root).count() >= 3));
    let before = s.forks().len();
    let mut failed = Vec::new();
    for i in 0..40 {
        match std::process::Command::new("/bin/true").status() {
            Ok(st) if st.success() => {}
            other => failed.push((i, format!("{other:?}"))),
        }
    }
    s.pump(100);
    let during = s.forks().len() - before;
    assert!(failed.is_empty(), "{} of 40 commands failed: {failed:?}", failed.len());
    assert!(during >= 1, "the followed tree did not fork meanwhile");
    eprintln!("40 commands ok while the tree forked {during} times");
}

/// `kill_on_exit` (PTRACE_O_EXITKILL), the opt-in: dropping the tracker kills what it follows.
#[test]
fn kill_on_exit_kills_the_tree_with_the_tracker() {
    let _g = lock();
    let pt = Ptrace::with_config(vpstag_ptrace::Config::default().kill_on_exit(true)).unwrap();
    let mut s = Session::start_with(pt, &["/bin/sh", "-c", "sleep 30 & wait"]);
    let root = s.root;
    assert!(s.until(10, |s| s.forks().iter().any(|f| f.0 == root && !f.3)));
    let sleep = s.forks().iter().find(|f| f.0 == root && !f.3).unwrap().1;
    drop(s.pt.take());
    let mut st = 0;
    // SAFETY: the root is our child; its exit was not collected (the tracker is gone).
    let r = unsafe { libc::waitpid(root.as_raw(), &mut st, 0) };
    assert_eq!((r, libc::WIFSIGNALED(st), libc::WTERMSIG(st)), (root.as_raw(), true, libc::SIGKILL), "{st:#x}");
    s.root_done = true;
    // The sleep, reparented, is killed too (a zombie until its new parent reaps it, or gone).
    let dead = || proc_stat(sleep).as_deref().and_then(parse_state).map_or(true, |c| c == 'Z' || c == 'X');
    assert!(wait_for(10, dead), "sleep {sleep} still alive: {:?}", proc_stat(sleep));
}

/// Every reported start time (most of them worked out from the clock and the creator's
/// registers, without /proc) is the one /proc shows, for processes and threads.
#[test]
fn start_times_match_proc_for_many_children() {
    let _g = lock();
    let ready = scratch("many-ready");
    let release = scratch("many-release");
    let code = "import os,sys,threading,time\n\
                r,w=os.pipe()\n\
                kids=[]\n\
                for i in range(150):\n    \
                    p=os.fork()\n    \
                    if p==0:\n        os.close(w); os.read(r,1); os._exit(0)\n    \
                    kids.append(p)\n\
                ev=threading.Event()\n\
                ts=[threading.Thread(target=ev.wait) for _ in range(20)]\n\
                [t.start() for t in ts]\n\
                open(sys.argv[1],'w').close()\n\
                end=time.time()+30\n\
                while not os.path.exists(sys.argv[2]) and time.time()<end: time.sleep(0.01)\n\
                os.close(w); ev.set(); [t.join() for t in ts]\n\
                for p in kids: os.waitpid(p,0)\n";
    let mut s = Session::start(&[PY, "-c", code, ready.to_str().unwrap(), release.to_str().unwrap()]);
    let root = s.root;
    assert!(s.until(30, |s| ready.exists() && s.forks().len() >= 170), "{} forks", s.forks().len());
    let mut compared = 0;
    let mut wrong = Vec::new();
    for ev in &s.events {
        let EventKind::Fork { child, child_thread, thread, child_start, .. } = ev.kind else { continue };
        let path =
            if thread { format!("/proc/{root}/task/{child_thread}/stat") } else { format!("/proc/{child}/stat") };
        let now = std::fs::read_to_string(&path).ok().and_then(|t| vpstag_ptrace::decode::parse_stat(&t));
        match now {
            Some(st) if !st.is_dead() => {
                compared += 1;
                if Some(st.start) != child_start {
                    wrong.push((child_thread, child_start, st.start));
                }
            }
            _ => {}
        }
    }
    let c = s.pt().counters();
    eprintln!("{compared} start times compared; {c:?}");
    std::fs::write(&release, "").unwrap();
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    clean_scratch();
    assert!(wrong.is_empty(), "(tid, reported, /proc): {wrong:?}");
    assert!(compared >= 170, "only {compared} compared");
}

/// Three children of the root: one burns 0.2 s and exits; one exits (`exit_group`) from its main
/// thread after 0.3 s while a second thread still burns; one is SIGKILLed once /proc shows it
/// burned 0.2 s. The root waits for each.
const EXIT_CPU: &str = r#"
import os, resource, signal, threading, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def burn(secs):
    x = 0
    while cpu() < secs:
        for i in range(20000):
            x += i
p = os.fork()
if p == 0:
    burn(0.2)
    os._exit(0)
os.waitpid(p, 0)
p = os.fork()
if p == 0:
    threading.Thread(target=burn, args=(1000,), daemon=True).start()
    burn(0.3)
    os._exit(0)
os.waitpid(p, 0)
p = os.fork()
if p == 0:
    burn(1000)
t = time.monotonic()
while time.monotonic() - t < 30:
    f = open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()
    if (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") >= 0.2:
        break
    time.sleep(0.01)
os.kill(p, signal.SIGKILL)
os.waitpid(p, 0)
"#;

#[test]
fn a_process_exit_carries_its_cpu_from_the_reap() {
    let _g = lock();
    let mut s = Session::start(&[PY, "-c", EXIT_CPU]);
    assert!(s.pt().capabilities().exit_usage);
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let root = s.root;
    let children: Vec<Pid> = s.forks().iter().filter(|f| f.0 == root && !f.3).map(|f| f.1).collect();
    assert_eq!(children.len(), 3, "{:#?}", s.events);
    let figure = |pid: Pid| {
        s.events.iter().find_map(|e| match e.kind {
            EventKind::Exit { pid: p, group_dead: Some(true), .. } if p == pid => Some(e.exit_cpu_ns),
            _ => None,
        })
    };
    let secs = |pid: Pid| {
        let f = figure(pid).unwrap_or_else(|| panic!("no exit of {pid}: {:#?}", s.events));
        f.unwrap_or_else(|| panic!("the exit of {pid} carries no CPU figure")) as f64 / 1e9
    };
    // wait4's rusage is in microseconds, and each child burned until its own getrusage (or its
    // /proc ticks, which lag it) said so: 2 ms of slack.
    let slack = 0.002;
    let (plain, threaded, killed) = (secs(children[0]), secs(children[1]), secs(children[2]));
    assert!((0.2 - slack..0.3).contains(&plain), "the plain child burned 0.2 s, its exit says {plain}");
    assert!(threaded >= 0.3 - slack, "the threaded child burned 0.3 s or more, its exit says {threaded}");
    assert!(killed >= 0.2 - slack, "the killed child burned 0.2 s or more, its exit says {killed}");
    // The root's figure holds what it waited for.
    let all = secs(root);
    assert!(all >= plain + threaded + killed - slack, "the root's exit says {all}");
    // Threads' exits carry nothing.
    assert!(s
        .events
        .iter()
        .all(|e| e.exit_cpu_ns.is_none() || matches!(e.kind, EventKind::Exit { group_dead: Some(true), .. })));
}

#[test]
fn without_exit_stops_a_process_exit_still_carries_its_cpu() {
    // The figure comes with the reap of the leader (wait4's rusage), not with the exit stop.
    let _g = lock();
    let pt = Ptrace::with_exit_stops(false).unwrap();
    assert!(pt.capabilities().exit_usage);
    let mut s = Session::start_with(pt, &["/bin/sh", "-c", "sh -c '/bin/true & wait' & wait"]);
    assert_eq!(s.finish(), ExitStatus::Exited(0));
    let process_exits: Vec<&Event> =
        s.events.iter().filter(|e| matches!(e.kind, EventKind::Exit { group_dead: Some(true), .. })).collect();
    assert!(process_exits.len() >= 3, "{:#?}", s.events);
    assert!(process_exits.iter().all(|e| e.exit_cpu_ns.is_some_and(|ns| ns > 0)), "{:#?}", s.events);
    // The root waited for the others (and they for theirs): its figure holds theirs.
    let root = s.root;
    let of_root = process_exits
        .iter()
        .find(|e| matches!(e.kind, EventKind::Exit { pid, .. } if pid == root))
        .and_then(|e| e.exit_cpu_ns)
        .unwrap_or_else(|| panic!("no exit figure of the root: {:#?}", s.events));
    let most = process_exits.iter().filter_map(|e| e.exit_cpu_ns).max().unwrap_or(0);
    assert_eq!(of_root, most, "the root's figure includes its waited-for children's: {:#?}", s.events);
}
