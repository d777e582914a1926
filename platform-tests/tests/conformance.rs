//! The `ForkTracker` contract, checked on every backend of this system from one list
//! ([`backends`]), each driven directly (no `Manager` in between), with real processes:
//!
//! - the events of each process come in the order they happened (fork, exec, exit), a child's
//!   `Fork` before any event of the child, each with the right parent;
//! - exit statuses: an exit code, and the signal that killed a process;
//! - threads: a thread's exit is never reported as its process's exit;
//! - loss: a burst read late is complete, or its loss is reported (and the backend goes on);
//! - watch and forget: two watched roots told apart, and a forgotten one no longer followed
//!   where the backend keeps per-VPS state.
//!
//! Each test runs its scenario once per backend. A backend that cannot be opened here (not
//! root, no BTF, another system) is skipped with its reason; a failure on one backend does not
//! stop the others, and the test fails at the end naming each backend and what it saw. The tests
//! run one at a time: the host-wide backends see every process of the machine, and one test's
//! fork burst would overflow another's buffer.
//!
//! The eBPF backend is in the list when this package is built with its `ebpf` feature
//! (`--features vpstag-platform-tests/ebpf`, as `scripts/test` does). Every process a test
//! starts is killed by pid at the end (stamped with its start time, see [`Cleanup`]), also when
//! an assertion fails; a root the backend does not reap is reaped by the test.
//!
//! Backend-specific behaviour (buffer sizes, counters, start times, map queries, job control...)
//! stays in each backend's own tests.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vpstag_platform_tests::{Cleanup, ProcessStamp};
use vpstag_tracker::{Capabilities, Event, EventKind, ExitStatus, ForkTracker, Pid, TrackerError, VpsId};

type Open = fn() -> Result<Box<dyn ForkTracker>, TrackerError>;

/// One backend of the suite.
struct Backend {
    name: &'static str,
    /// Opens it as a program would.
    open: Open,
    /// Opens it with buffers small enough that a burst of a few thousand events overflows them,
    /// for a backend that can lose events and report it. `None`: it cannot lose, or cannot be
    /// made to on purpose.
    open_small: Option<Open>,
}

/// Every backend this system has: the one list the suite runs over.
// Which pushes there are depends on the system.
#[allow(unused_mut, clippy::vec_init_then_push)]
fn backends() -> Vec<Backend> {
    let mut list: Vec<Backend> = Vec::new();
    #[cfg(target_os = "linux")]
    {
        use vpstag_cnproc::{CnProc, Config};
        list.push(Backend {
            name: "cnproc",
            open: || Ok(Box::new(CnProc::new()?)),
            // The smallest receive buffer the kernel grants holds a handful of events.
            open_small: Some(|| Ok(Box::new(CnProc::with_config(Config { receive_buffer: 1, ..Config::default() })?))),
        });
        list.push(Backend { name: "ptrace", open: || Ok(Box::new(vpstag_ptrace::Ptrace::new()?)), open_small: None });
    }
    #[cfg(all(target_os = "linux", feature = "ebpf"))]
    {
        use vpstag_ebpf::{Config, Ebpf};
        list.push(Backend {
            name: "ebpf",
            open: || Ok(Box::new(Ebpf::new()?)),
            // One page of ring buffer: 64 records.
            open_small: Some(|| Ok(Box::new(Ebpf::with_config(Config { ring_bytes: 4096, ..Config::default() })?))),
        });
    }
    #[cfg(not(target_os = "linux"))]
    list.push(Backend { name: "kqueue", open: || Ok(Box::new(vpstag_kqueue::Kqueue::new()?)), open_small: None });
    list
}

static SERIAL: Mutex<()> = Mutex::new(());

/// How long a scenario waits for what it expects.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `scenario` once per backend that opens here, with a fresh tracker; panics at the end
/// with every backend's failure.
fn for_each_backend(test: &str, scenario: impl Fn(&Backend, Box<dyn ForkTracker>)) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    let mut ran = 0;
    if cfg!(all(target_os = "linux", not(feature = "ebpf"))) {
        eprintln!("{test}: SKIP backend ebpf: built without --features vpstag-platform-tests/ebpf");
    }
    for b in backends() {
        let tracker = match (b.open)() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{test}: SKIP backend {}: {e}", b.name);
                continue;
            }
        };
        eprintln!("{test}: backend {}", b.name);
        ran += 1;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| scenario(&b, tracker))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            failures.push(format!("[{}] {msg}", b.name));
        }
    }
    if ran == 0 {
        eprintln!("{test}: no backend could be opened on this machine; nothing tested");
    }
    assert!(failures.is_empty(), "{test} failed:\n{}", failures.join("\n"));
}

// ---- processes

/// The Python interpreter for the thread scenario (not a pyenv shim).
fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3"].into_iter().find(|p| std::path::Path::new(p).exists())
}

/// A process the test started, held at a start gate (it reads one line from its stdin first)
/// until [`open_gate`](Root::open_gate), so that it is watched before it can fork.
struct Root {
    pid: Pid,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Root {
    /// `sh -c 'read gate; SCRIPT'`.
    fn shell(script: &str) -> Root {
        Root::spawn(Command::new("/bin/sh").arg("-c").arg(format!("read gate; {script}")))
    }

    /// `python3 -c CODE`; CODE reads the gate line itself.
    fn python(code: &str) -> Option<Root> {
        Some(Root::spawn(Command::new(python()?).arg("-c").arg(code)))
    }

    fn spawn(cmd: &mut Command) -> Root {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = Pid::new(child.id() as i32).expect("a child's pid is positive");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Root { pid, child, stdin, stdout }
    }

    /// Sends one line (the gate, or a request to the script).
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to {}: {e}", self.pid));
    }

    fn open_gate(&mut self) {
        self.send("go");
    }

    /// Reads the script's next output line.
    fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(n) if n > 0 && line.trim_end() == want => {}
            r => panic!("process {} said {line:?} ({r:?}), expected {want:?}", self.pid),
        }
    }

    /// Closes its stdin (a script that reads lines then ends).
    fn hang_up(&mut self) {
        self.stdin = None;
    }
}

/// The processes of a scenario. On drop (also on a failed assertion), everything the roots
/// started is killed by pid, then the roots a non-reaping backend leaves to us are killed and
/// reaped. Declare it after the [`Session`], so that it drops first, while the tracker (which
/// may be the one reaping them, ptrace) still runs.
struct Procs {
    guard: Cleanup,
    roots: Vec<Root>,
    reaps: bool,
}

impl Procs {
    fn new(caps: Capabilities) -> Procs {
        Procs { guard: Cleanup::new(), roots: Vec::new(), reaps: caps.reaps }
    }

    /// Takes a root; returns its index.
    fn add(&mut self, root: Root) -> usize {
        self.guard.add_root(root.pid.as_raw());
        self.roots.push(root);
        self.roots.len() - 1
    }

    /// Waits for root `i` to exit and reaps it, if the backend does not (it is our child);
    /// `None` when the backend reaps it. Returns its status as `wait` reports it.
    fn reap(&mut self, i: usize) -> Option<ExitStatus> {
        if self.reaps {
            return None;
        }
        let status = self.roots[i].child.wait().unwrap_or_else(|e| panic!("waiting for {}: {e}", self.roots[i].pid));
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Some(ExitStatus::Exited(c)),
            (None, Some(s)) => Some(ExitStatus::Signaled { signal: s, core_dumped: status.core_dumped() }),
            _ => panic!("{} ended in no known way: {status:?}", self.roots[i].pid),
        }
    }

    /// Waits until root `i` is gone, however the backend handles it: reaped by us, or (ptrace)
    /// by the backend's own thread, which then removes it from `/proc`.
    fn wait_gone(&mut self, i: usize) {
        if self.reap(i).is_some() {
            return;
        }
        let pid = self.roots[i].pid;
        let Some(stamp) = ProcessStamp::of(pid.as_raw()) else { return };
        let deadline = Instant::now() + DEADLINE;
        while stamp.still_exists() {
            assert!(Instant::now() < deadline, "process {pid} still exists after {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let left = self.guard.kill_all(Duration::from_secs(10));
        if !left.is_empty() {
            eprintln!("conformance: still alive after SIGKILL: {left:?}");
        }
        if !self.reaps {
            for r in &mut self.roots {
                // Our unreaped child: its pid cannot have been reused.
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }
}

// ---- events

/// A tracker and every event it has returned.
struct Session {
    name: &'static str,
    tracker: Box<dyn ForkTracker>,
    caps: Capabilities,
    events: Vec<Event>,
}

impl Session {
    fn new(b: &Backend, tracker: Box<dyn ForkTracker>) -> Session {
        let caps = tracker.capabilities();
        Session { name: b.name, tracker, caps, events: Vec::new() }
    }

    fn watch(&mut self, root: &Root, vps: VpsId) {
        self.tracker.watch(root.pid, vps).unwrap_or_else(|e| panic!("{}: watch({}, {vps}): {e}", self.name, root.pid));
    }

    /// Reads with a short timeout until `done(self)` holds; panics with `what` and the events of
    /// `roots`' lineage when it does not within [`DEADLINE`].
    fn read_until(&mut self, what: &str, roots: &[Pid], done: impl Fn(&Session) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not seen after {DEADLINE:?}; events of the lineage:\n{}",
                    show(&lineage(&self.events, roots))
                );
            }
            self.read(Some(Duration::from_millis(50)));
        }
    }

    fn read(&mut self, timeout: Option<Duration>) -> usize {
        let before = self.events.len();
        let n = self
            .tracker
            .read_events(&mut self.events, timeout)
            .unwrap_or_else(|e| panic!("{}: read_events: {e}", self.name));
        assert_eq!(
            n,
            self.events.len() - before,
            "read_events returned {n} but appended {}",
            self.events.len() - before
        );
        n
    }

    /// Reads what is queued until a read returns nothing.
    fn drain(&mut self) {
        while self.read(Some(Duration::ZERO)) > 0 {}
    }

    /// The events of `roots` and their descendants (and every `Lost`), in order.
    fn of(&self, roots: &[Pid]) -> Vec<Event> {
        lineage(&self.events, roots)
    }
}

/// The events of `roots` and their descendants, and every `Lost`, in the order read.
///
/// The descendants are found from the `Fork`s in any order, so that an event of a process read
/// before the `Fork` that made it is kept (and caught by the order checks), not dropped. (A pid
/// reused within one scenario would mix two processes; the pid counter does not wrap that fast.)
fn lineage(events: &[Event], roots: &[Pid]) -> Vec<Event> {
    let mut procs: HashSet<Pid> = roots.iter().copied().collect();
    loop {
        let before = procs.len();
        for e in events {
            if let EventKind::Fork { parent, child, thread: false, .. } = e.kind {
                if procs.contains(&parent) {
                    procs.insert(child);
                }
            }
        }
        if procs.len() == before {
            break;
        }
    }
    let mine = |e: &Event| match e.kind {
        EventKind::Fork { parent, child, .. } => procs.contains(&parent) || procs.contains(&child),
        EventKind::Exec { pid, .. } | EventKind::Exit { pid, .. } => procs.contains(&pid),
        EventKind::Lost { .. } => true,
        _ => false,
    };
    events.iter().filter(|e| mine(e)).copied().collect()
}

/// One line per event, for failure messages.
fn show(events: &[Event]) -> String {
    let lines: Vec<String> = events
        .iter()
        .map(|e| {
            let what = match e.kind {
                EventKind::Fork { parent, child, child_thread, thread: true, .. } => {
                    format!("thread {child_thread} created in {parent} ({child})")
                }
                EventKind::Fork { parent, child, .. } => format!("fork {parent} -> {child}"),
                EventKind::Exec { pid, thread } => format!("exec {pid} (by thread {thread})"),
                EventKind::Exit { pid, thread, status, group_dead } => {
                    format!("exit {pid} thread {thread} status {status:?} group_dead {group_dead:?}")
                }
                EventKind::Lost { count, reason } => format!("LOST {count:?} ({reason:?})"),
                other => format!("{other:?}"),
            };
            format!("  {what}  tag {:?}", e.tag)
        })
        .collect();
    if lines.is_empty() {
        "  (none)".into()
    } else {
        lines.join("\n")
    }
}

/// Whether `e` ends the whole process `p`: its group exit, or (for a backend that cannot tell,
/// `group_dead: None`) its leader's exit.
fn ends_process(e: &Event, p: Pid) -> bool {
    matches!(e.kind, EventKind::Exit { pid, thread, group_dead, .. }
        if pid == p && (group_dead == Some(true) || (group_dead.is_none() && thread == p)))
}

fn exit_status(events: &[Event], p: Pid) -> Option<Option<ExitStatus>> {
    events.iter().find(|e| ends_process(e, p)).map(|e| match e.kind {
        EventKind::Exit { status, .. } => status,
        _ => None,
    })
}

/// The processes `parent` forked, in order.
fn children(events: &[Event], parent: Pid) -> Vec<Pid> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Fork { parent: p, child, thread: false, .. } if p == parent => Some(child),
            _ => None,
        })
        .collect()
}

/// Whether `e` is about process `p` (as the child of a fork, or as the process that execs or
/// exits).
fn is_of(e: &Event, p: Pid) -> bool {
    match e.kind {
        EventKind::Fork { child, thread: false, .. } => child == p,
        EventKind::Exec { pid, .. } | EventKind::Exit { pid, .. } => pid == p,
        _ => false,
    }
}

fn position(events: &[Event], what: impl Fn(&Event) -> bool) -> Option<usize> {
    events.iter().position(what)
}

fn is_lost(e: &Event) -> bool {
    matches!(e.kind, EventKind::Lost { .. })
}

// ---- scenarios

/// `sh` runs `sh -c '/bin/true & wait'`: root -> A (execs sh) -> B (execs true). For A and B:
/// the `Fork` that made it, then its `Exec`, then its exit, each once and in that order, with
/// nothing of it before its `Fork`; every process exits 0.
#[test]
fn fork_then_exec_then_exit_of_each_process_in_a_chain() {
    for_each_backend("fork_then_exec_then_exit_of_each_process_in_a_chain", |b, tracker| {
        let mut s = Session::new(b, tracker);
        let mut procs = Procs::new(s.caps);
        let r = procs.add(Root::shell("/bin/sh -c '/bin/true & wait'; exit 0"));
        let root = procs.roots[r].pid;
        s.watch(&procs.roots[r], VpsId(1));
        procs.roots[r].open_gate();
        s.read_until("the root's exit", &[root], |s| exit_status(&s.of(&[root]), root).is_some());
        let waited = procs.reap(r);

        let ev = s.of(&[root]);
        let seen = show(&ev);
        assert!(!ev.iter().any(is_lost), "events lost in a quiet chain:\n{seen}");
        let a = match children(&ev, root)[..] {
            [a] => a,
            _ => panic!("the root forks exactly one process:\n{seen}"),
        };
        let b_ = match children(&ev, a)[..] {
            [b] => b,
            _ => panic!("{a} forks exactly one process:\n{seen}"),
        };
        for p in [a, b_] {
            let fork = position(&ev, |e| is_of(e, p)).expect("a first event");
            assert!(matches!(ev[fork].kind, EventKind::Fork { .. }), "the first event of {p} is its Fork:\n{seen}");
            let execs: Vec<usize> =
                (0..ev.len()).filter(|&i| matches!(ev[i].kind, EventKind::Exec { pid, .. } if pid == p)).collect();
            let exits: Vec<usize> = (0..ev.len()).filter(|&i| ends_process(&ev[i], p)).collect();
            assert_eq!(execs.len(), 1, "{p} execs once:\n{seen}");
            assert_eq!(exits.len(), 1, "{p} exits once:\n{seen}");
            assert!(fork < execs[0] && execs[0] < exits[0], "{p}: fork, exec, exit in that order:\n{seen}");
            assert!(!ev[exits[0] + 1..].iter().any(|e| is_of(e, p)), "nothing of {p} after its exit:\n{seen}");
            assert_eq!(exit_status(&ev, p), Some(Some(ExitStatus::Exited(0))), "{p} exits 0:\n{seen}");
        }
        assert_eq!(exit_status(&ev, root), Some(Some(ExitStatus::Exited(0))), "the root exits 0:\n{seen}");
        if let Some(w) = waited {
            assert_eq!(w, ExitStatus::Exited(0), "wait(2) on the root");
        }
    });
}

/// The root's two children end by `exit 3` and by SIGKILL, the root by `exit 5`: each status as
/// `wait(2)` would give it (and, where the test reaps the root, as it did).
#[test]
fn exit_code_and_killing_signal_are_reported() {
    for_each_backend("exit_code_and_killing_signal_are_reported", |b, tracker| {
        let mut s = Session::new(b, tracker);
        let mut procs = Procs::new(s.caps);
        let r = procs.add(Root::shell("/bin/sh -c 'exit 3'; /bin/sh -c 'kill -KILL $$'; exit 5"));
        let root = procs.roots[r].pid;
        s.watch(&procs.roots[r], VpsId(2));
        procs.roots[r].open_gate();
        s.read_until("the root's exit", &[root], |s| exit_status(&s.of(&[root]), root).is_some());
        let waited = procs.reap(r);

        let ev = s.of(&[root]);
        let seen = show(&ev);
        let kids = children(&ev, root);
        assert_eq!(kids.len(), 2, "the root forks twice:\n{seen}");
        let statuses: Vec<_> = kids.iter().map(|k| exit_status(&ev, *k)).collect();
        assert_eq!(
            statuses,
            vec![Some(Some(ExitStatus::Exited(3))), Some(Some(ExitStatus::Signaled { signal: 9, core_dumped: false }))],
            "the children's exits:\n{seen}"
        );
        assert_eq!(exit_status(&ev, root), Some(Some(ExitStatus::Exited(5))), "the root's exit:\n{seen}");
        if let Some(w) = waited {
            assert_eq!(w, ExitStatus::Exited(5), "wait(2) on the root");
        }
    });
}

/// A Python process starts four threads, joins them, waits until they are gone, then forks a
/// child (it is still followed after its threads are gone) and exits 0. No exit of a thread is the process's exit: the one
/// group exit of the process is its last event. A backend that reports threads reports each
/// one's creation (a `thread: true` fork inside the process) and its exit.
#[test]
fn a_thread_exit_is_not_the_exit_of_its_process() {
    // join() returns before the thread is gone from the kernel: wait until /proc lists only the
    // main thread (where there is a /proc) before forking.
    const CODE: &str = "import os, sys, threading, time\n\
                        sys.stdin.readline()\n\
                        ts = [threading.Thread(target=lambda: None) for _ in range(4)]\n\
                        [t.start() for t in ts]\n\
                        [t.join() for t in ts]\n\
                        while os.path.isdir('/proc/self/task') and len(os.listdir('/proc/self/task')) > 1:\n    time.sleep(0.001)\n\
                        pid = os.fork()\n\
                        if pid == 0:\n    os._exit(0)\n\
                        os.waitpid(pid, 0)\n";
    for_each_backend("a_thread_exit_is_not_the_exit_of_its_process", |b, tracker| {
        let mut s = Session::new(b, tracker);
        let mut procs = Procs::new(s.caps);
        let Some(root) = Root::python(CODE) else {
            eprintln!("  SKIP: no python3 in /usr/bin or /usr/local/bin");
            return;
        };
        let r = procs.add(root);
        let root = procs.roots[r].pid;
        s.watch(&procs.roots[r], VpsId(3));
        procs.roots[r].open_gate();
        s.read_until("the process's exit", &[root], |s| exit_status(&s.of(&[root]), root).is_some());
        procs.reap(r);

        let ev = s.of(&[root]);
        let seen = show(&ev);
        let group_exits: Vec<usize> = (0..ev.len()).filter(|&i| ends_process(&ev[i], root)).collect();
        assert_eq!(group_exits.len(), 1, "one exit of the process:\n{seen}");
        let end = group_exits[0];
        assert!(!ev[end + 1..].iter().any(|e| is_of(e, root)), "nothing of the process after its exit:\n{seen}");
        assert_eq!(exit_status(&ev, root), Some(Some(ExitStatus::Exited(0))), "it exits 0:\n{seen}");
        let child_fork =
            position(&ev, |e| matches!(e.kind, EventKind::Fork { parent, thread: false, .. } if parent == root))
                .unwrap_or_else(|| panic!("the fork after the threads ended:\n{seen}"));

        let threads: Vec<(usize, Pid)> = ev
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e.kind {
                EventKind::Fork { parent, child, child_thread, thread: true, .. } => {
                    assert!(
                        parent == root && child == root && child_thread != root,
                        "a thread of the process:\n{seen}"
                    );
                    Some((i, child_thread))
                }
                _ => None,
            })
            .collect();
        if !s.caps.thread_events {
            assert!(threads.is_empty(), "thread_events is false, yet threads were reported:\n{seen}");
            return;
        }
        assert!(threads.len() >= 4, "four threads created:\n{seen}");
        for (fork, t) in threads {
            let exit = position(&ev, |e| matches!(e.kind, EventKind::Exit { thread, .. } if thread == t))
                .unwrap_or_else(|| panic!("no exit of thread {t}:\n{seen}"));
            match ev[exit].kind {
                EventKind::Exit { pid, group_dead, .. } => {
                    assert!(pid == root && group_dead != Some(true), "thread {t}'s exit is not the process's:\n{seen}")
                }
                _ => unreachable!(),
            }
            assert!(
                fork < exit && exit < child_fork && exit < end,
                "thread {t}: created, ended, then the fork:\n{seen}"
            );
        }
    });
}

/// A root forks a burst of children while nobody reads; the events are read only once it is
/// gone. A backend that can be given small buffers (one that reports loss) must report the loss
/// (`Lost`) and then go on: a later process's exit still arrives. Every other backend must deliver
/// the whole burst, or (if it can lose) report a loss: never a silent gap.
#[test]
fn a_burst_read_late_is_complete_or_its_loss_is_reported() {
    for_each_backend("a_burst_read_late_is_complete_or_its_loss_is_reported", |b, tracker| {
        if let Some(open_small) = b.open_small {
            drop(tracker);
            let tracker = open_small().unwrap_or_else(|e| panic!("opening with small buffers: {e}"));
            return burst_overflows_and_is_reported(b, tracker);
        }
        const N: usize = 300;
        let mut s = Session::new(b, tracker);
        let mut procs = Procs::new(s.caps);
        let r = procs.add(Root::shell(&format!("i=0; while [ $i -lt {N} ]; do /bin/true & i=$((i+1)); done; wait")));
        let root = procs.roots[r].pid;
        s.watch(&procs.roots[r], VpsId(4));
        procs.roots[r].open_gate();
        procs.wait_gone(r);
        s.read_until("the root's exit", &[root], |s| exit_status(&s.of(&[root]), root).is_some());
        s.drain();

        let ev = s.of(&[root]);
        if s.caps.can_lose && ev.iter().any(is_lost) {
            eprintln!("  the burst was reported lost");
            return;
        }
        let kids = children(&ev, root);
        let summary = format!("{} children, {} events", kids.len(), ev.len());
        assert_eq!(kids.len(), N, "every fork of the burst, or a Lost ({summary})");
        for k in kids {
            assert_eq!(exit_status(&ev, k), Some(Some(ExitStatus::Exited(0))), "the exit of {k} ({summary})");
        }
    });
}

fn burst_overflows_and_is_reported(b: &Backend, tracker: Box<dyn ForkTracker>) {
    let mut s = Session::new(b, tracker);
    assert!(s.caps.can_lose, "a backend with small buffers for this test says it can lose");
    let mut procs = Procs::new(s.caps);
    let r = procs.add(Root::shell("i=0; while [ $i -lt 2000 ]; do /bin/true & i=$((i+1)); done; wait"));
    let root = procs.roots[r].pid;
    s.watch(&procs.roots[r], VpsId(5));
    procs.roots[r].open_gate();
    procs.wait_gone(r);
    s.drain();
    let lost = position(&s.events, is_lost);
    let seen = s.of(&[root]).len();
    let lost = lost.unwrap_or_else(|| panic!("6,000 events into a small buffer, none lost? ({seen} events read)"));
    // It goes on: a process started now is followed to its exit (the host may keep overflowing a
    // tiny buffer, so a few attempts).
    for attempt in 0..20 {
        let i = procs.add(Root::shell("exit 7"));
        let pid = procs.roots[i].pid;
        s.watch(&procs.roots[i], VpsId(6 + attempt as u64));
        procs.roots[i].open_gate();
        // Read while it runs: a tiny buffer fills up with the host's events within moments.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && exit_status(&s.of(&[pid]), pid).is_none() {
            s.read(Some(Duration::from_millis(50)));
        }
        procs.wait_gone(i);
        let at = position(&s.events, |e| ends_process(e, pid));
        if let Some(at) = at {
            assert!(at > lost);
            assert_eq!(exit_status(&s.of(&[pid]), pid), Some(Some(ExitStatus::Exited(7))), "after the loss");
            return;
        }
    }
    panic!("after the reported loss, no exit of a new process arrived in 20 attempts:\n{}", show(&s.events[lost..]));
}

/// Two roots watched as two VPSes; each forks on request. Both lineages are followed with the
/// right parents (and, for a backend that holds tags, the right tags and `lookup`). After
/// `forget` of the first VPS, a backend that holds tags no longer reports it: a child the first
/// root makes next is not reported, while one the second root makes after it is.
#[test]
fn two_watched_roots_are_told_apart_and_a_forgotten_one_is_dropped() {
    const SCRIPT: &str = "while read line; do /bin/true; echo done; done";
    for_each_backend("two_watched_roots_are_told_apart_and_a_forgotten_one_is_dropped", |b, tracker| {
        let mut s = Session::new(b, tracker);
        let mut procs = Procs::new(s.caps);
        let (i1, i2) = (procs.add(Root::shell(SCRIPT)), procs.add(Root::shell(SCRIPT)));
        let (r1, r2) = (procs.roots[i1].pid, procs.roots[i2].pid);
        let (v1, v2) = (VpsId(101), VpsId(102));
        s.watch(&procs.roots[i1], v1);
        s.watch(&procs.roots[i2], v2);
        for i in [i1, i2] {
            procs.roots[i].open_gate();
            procs.roots[i].send("fork");
            procs.roots[i].expect_line("done");
        }
        let one_child_exited = |s: &Session, r: Pid| {
            let ev = s.of(&[r]);
            children(&ev, r).iter().any(|c| exit_status(&ev, *c).is_some())
        };
        s.read_until("a child of each root, to its exit", &[r1, r2], |s| {
            one_child_exited(s, r1) && one_child_exited(s, r2)
        });
        for (r, v) in [(r1, v1), (r2, v2)] {
            let ev = s.of(&[r]);
            let seen = show(&ev);
            assert_eq!(children(&ev, r).len(), 1, "{r} forked once:\n{seen}");
            if s.caps.holds_tags {
                assert!(ev.iter().all(|e| e.tag == Some(v)), "every event of {r} is tagged {v}:\n{seen}");
                assert_eq!(s.tracker.lookup(r), Some(v), "lookup({r})");
            }
        }

        s.tracker.forget(v1).unwrap_or_else(|e| panic!("forget({v1}): {e}"));
        s.drain();
        let mark = s.events.len();
        // First root 1 forks (and its child is gone), then root 2: had root 1's child been
        // reported, it would come before root 2's.
        procs.roots[i1].send("fork");
        procs.roots[i1].expect_line("done");
        procs.roots[i2].send("fork");
        procs.roots[i2].expect_line("done");
        s.read_until("root 2's second child, to its exit", &[r2], |s| {
            let ev = s.of(&[r2]);
            let kids = children(&ev, r2);
            kids.len() == 2 && exit_status(&ev, kids[1]).is_some()
        });
        if s.caps.holds_tags {
            let after = lineage(&s.events[mark..], &[r1]);
            assert!(after.is_empty(), "events of the forgotten VPS {v1} after forget:\n{}", show(&after));
            assert_eq!(s.tracker.lookup(r1), None, "lookup of a process of the forgotten VPS");
            assert_eq!(s.tracker.lookup(r2), Some(v2), "the other VPS is untouched");
        }

        for i in [i1, i2] {
            procs.roots[i].hang_up();
        }
        s.read_until("root 2's exit", &[r2], |s| exit_status(&s.of(&[r2]), r2).is_some());
        assert_eq!(procs.reap(i2).unwrap_or(ExitStatus::Exited(0)), ExitStatus::Exited(0));
        procs.wait_gone(i1);
    });
}
