//! Live tests against the running kernel. They need root (or CAP_BPF + CAP_PERFMON) and BTF;
//! without root they print why and pass. Every process they start is killed by pid and reaped,
//! also when an assertion fails; nothing system-wide is changed.
//!
//! What every backend must do (fork/exec/exit order, exit statuses, threads, reported loss,
//! watch/forget) is checked by `platform-tests/tests/conformance.rs`; these are this backend's
//! own: the tag map and its queries, reporting modes, wake-ups, full map and ring, capabilities.
#![cfg(target_os = "linux")]

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vpstag_ebpf::{Config, Ebpf, Reporting};
use vpstag_tracker::{Event, EventKind, ExitStatus, ForkTracker, LossReason, Pid, StartTime, TrackerError, VpsId};

const TIMEOUT: Duration = Duration::from_secs(90);

fn pid(raw: i32) -> Pid {
    Pid::new(raw).expect("positive pid")
}

fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{test}: skipped, needs root (BPF programs)");
        return true;
    }
    false
}

/// (state, ppid, start time) from /proc/PID/stat.
fn stat(p: i32) -> Option<(char, i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

fn threads(p: i32) -> usize {
    std::fs::read_dir(format!("/proc/{p}/task")).map(|d| d.count()).unwrap_or(0)
}

fn comm(p: i32) -> String {
    std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim().to_owned()
}

/// Every live process below `root` by /proc ppid links (not `root` itself).
fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, ppid, _)) = stat(p) {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn read_pid(d: &Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(d.join(name)).ok()?.trim().parse().ok()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "vpstag-ebpf-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child held at a start gate (blocked reading a pipe) until [`open_gate`](Held::open_gate);
/// then it execs `argv`. On drop it and everything below it (and `extra`) are killed by pid and
/// the child is reaped.
struct Held {
    pid: i32,
    gate: Option<i32>,
    extra: Vec<i32>,
}

impl Held {
    fn spawn(argv: &[&str], env: &[(&str, &str)]) -> Held {
        // Everything the child needs is prepared before fork: after it, only async-signal-safe
        // calls (read, execve, _exit).
        let path = CString::new(argv[0]).unwrap();
        let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argp.push(std::ptr::null());
        let envs: Vec<CString> = env.iter().map(|(k, v)| CString::new(format!("{k}={v}")).unwrap()).collect();
        let mut envp: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut fds = [0; 2];
        // SAFETY: plain syscalls on valid pointers; the child only makes async-signal-safe calls.
        unsafe {
            assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
            let child = libc::fork();
            assert!(child >= 0, "fork");
            if child == 0 {
                let mut b = 0u8;
                libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                libc::execve(path.as_ptr(), argp.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
            libc::close(fds[0]);
            Held { pid: child, gate: Some(fds[1]), extra: Vec::new() }
        }
    }

    fn pid(&self) -> Pid {
        pid(self.pid)
    }

    fn open_gate(&mut self) {
        if let Some(fd) = self.gate.take() {
            // SAFETY: fd is our pipe's write end.
            unsafe {
                assert_eq!(libc::write(fd, b"g".as_ptr().cast(), 1), 1, "open the gate");
                libc::close(fd);
            }
        }
    }

    /// Kills everything below the child, `extra` and the child, by pid; reaps the child.
    fn kill_all(&mut self) {
        let mut victims = descendants(self.pid);
        victims.extend(self.extra.iter().copied());
        for p in victims {
            // SAFETY: kill by pid.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if self.pid > 0 {
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
            self.pid = -self.pid;
        }
        if let Some(fd) = self.gate.take() {
            // SAFETY: our pipe's write end.
            unsafe { libc::close(fd) };
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn drain(t: &mut Ebpf, events: &mut Vec<Event>) {
    t.read_events(events, Some(Duration::ZERO)).expect("read_events");
}

/// Checks that every live process in `pids` has `want`. A process that exits meanwhile is skipped
/// (an exited one has no tag; a zombie leader whose threads live keeps it), and a lookup that
/// misses is retried briefly: a new child shows in /proc an instant before its fork tracepoint
/// runs (it has not run yet then).
fn check_tagged(t: &Ebpf, pids: impl IntoIterator<Item = i32>, want: VpsId, at: &str) -> usize {
    let mut checked = 0;
    'each: for p in pids {
        for _ in 0..50 {
            let Some((state, _, start)) = stat(p) else {
                continue 'each;
            };
            if (state == 'Z' && threads(p) <= 1) || state == 'X' {
                continue 'each;
            }
            let got = t.lookup(pid(p));
            if got == Some(want) {
                checked += 1;
                continue 'each;
            }
            // Still the same live process? Then the miss is real, unless in the fork window.
            match stat(p) {
                Some((s, _, again)) if again == start && s != 'Z' && s != 'X' => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Some((s, _, again)) if again == start && s == 'Z' && threads(p) > 1 => {
                    panic!("{at}: zombie leader {p} with live threads: lookup = {got:?}, want {want:?}")
                }
                _ => continue 'each,
            }
        }
        panic!("{at}: live descendant {p} ({}) has lookup {:?}, want {want:?}", comm(p), t.lookup(pid(p)));
    }
    checked
}

const SCRIPT: &str = r#"
sleep 1000 & echo $! > "$D/bg"
setsid sh -c 'sleep 1000 & echo $! > "$D/orphan"' &
sh -c 'exit 3' & echo $! > "$D/exit3"; wait $!
sleep 1000 & k=$!; echo $k > "$D/killed"; kill -9 $k; wait $k 2>/dev/null
touch "$D/forking"
i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done
python3 -c "$PY" & echo $! > "$D/py"
touch "$D/ready"
wait
"#;

/// The main thread leaves with a raw exit(2) (the process lives on in its worker thread, the
/// leader a zombie); the worker forks a child, then execs /bin/sleep when the test says so.
const PY: &str = r#"
import ctypes, os, platform, threading, time
d = os.environ['D']
tgid = os.getpid()
def leader_state():
    with open('/proc/self/task/%d/stat' % tgid) as f:
        return f.read().rsplit(')', 1)[1].split()[0]
def worker():
    while leader_state() != 'Z':
        time.sleep(0.01)
    child = os.fork()
    if child == 0:
        os.execv('/bin/sleep', ['sleep', '1000'])
    with open(d + '/py_child', 'w') as f:
        f.write(str(child))
    with open(d + '/py_leader_dead', 'w') as f:
        f.write(str(threading.get_native_id()))
    while not os.path.exists(d + '/go_exec'):
        time.sleep(0.01)
    os.execv('/bin/sleep', ['sleep', '1000'])
threading.Thread(target=worker).start()
nr = {'x86_64': 60, 'aarch64': 93, 'riscv64': 93}[platform.machine()]
ctypes.CDLL(None).syscall(nr, 0)
"#;

#[test]
fn tags_follow_the_whole_lineage() {
    if skip_unless_root("tags_follow_the_whole_lineage") {
        return;
    }
    let mut t = Ebpf::new().expect("load the eBPF backend");
    let vps = VpsId(7);
    let dir = TempDir::new("lineage");
    let d = dir.0.to_str().unwrap().to_owned();
    let mut held = Held::spawn(&["/bin/sh", "-c", SCRIPT], &[("PATH", "/usr/bin:/bin"), ("D", &d), ("PY", PY)]);
    let root = held.pid;

    // An unrelated process: never tagged.
    let mut stranger = std::process::Command::new("/bin/sleep").arg("1000").spawn().expect("spawn sleep");
    let stranger_pid = stranger.id() as i32;

    t.watch(held.pid(), vps).expect("watch");
    assert_eq!(t.lookup(held.pid()), Some(vps), "the held first process is tagged");
    assert_eq!(t.tag_of(held.pid()).unwrap().map(|(v, _)| v), Some(vps));
    assert_eq!(t.tag_of(held.pid()).unwrap().map(|(_, s)| s), Some(StartTime(stat(root).unwrap().2)));
    held.open_gate();

    let mut events = Vec::new();
    let untracked = |t: &Ebpf, at: &str| {
        for p in [std::process::id() as i32, 1, stranger_pid] {
            assert_eq!(t.lookup(pid(p)), None, "{at}: untracked process {p} ({}) has a tag", comm(p));
        }
    };

    // Point 1: while the shell forks 1,000 short-lived children.
    wait_for("the fork loop", || dir.0.join("forking").exists());
    let mut rounds = 0;
    while !dir.0.join("ready").exists() {
        let mut all = descendants(root);
        all.push(root);
        check_tagged(&t, all, vps, "during the fork loop");
        untracked(&t, "during the fork loop");
        drain(&mut t, &mut events);
        rounds += 1;
        assert!(rounds < 20_000, "the script never got ready");
    }
    let orphan = {
        let mut o = None;
        wait_for("the orphan's pid", || {
            o = read_pid(&dir.0, "orphan");
            o.is_some()
        });
        o.unwrap()
    };
    held.extra.push(orphan);
    let bg = read_pid(&dir.0, "bg").expect("bg pid");
    let py = read_pid(&dir.0, "py").expect("python pid");
    held.extra.push(py);

    // Point 2: python's leader is a zombie, its worker thread lives on.
    wait_for("python's leader to exit", || read_pid(&dir.0, "py_leader_dead").is_some());
    let worker = read_pid(&dir.0, "py_leader_dead").unwrap();
    assert_eq!(stat(py).map(|s| s.0), Some('Z'), "python's leader is a zombie");
    assert!(threads(py) >= 2, "python's worker thread lives");
    assert_eq!(t.lookup(pid(py)), Some(vps), "a zombie leader with live threads keeps its tag");
    assert_eq!(t.lookup(pid(worker)), None, "threads are not keys: only processes are looked up");
    let py_child = read_pid(&dir.0, "py_child").expect("the worker's child");
    assert_eq!(stat(py_child).map(|s| s.1), Some(py));
    assert_eq!(t.lookup(pid(py_child)), Some(vps), "a child forked by a thread of a zombie-led process");
    assert_ne!(stat(orphan).map(|s| s.1), Some(root), "the orphan was reparented");
    assert!(!descendants(root).contains(&orphan), "the orphan is outside the ppid tree");
    assert_eq!(t.lookup(pid(orphan)), Some(vps), "the setsid double-fork orphan keeps its tag");
    let mut all = descendants(root);
    all.push(root);
    let n = check_tagged(&t, all.iter().copied().chain([orphan]), vps, "with python's leader dead");
    assert!(n >= 4, "sh, bg sleep, orphan and python are tagged (checked {n})");
    untracked(&t, "with python's leader dead");
    drain(&mut t, &mut events);

    // Point 3: the worker thread execs.
    std::fs::write(dir.0.join("go_exec"), b"").unwrap();
    wait_for("python's worker to exec sleep", || comm(py) == "sleep");
    assert_eq!(t.lookup(pid(py)), Some(vps), "a process that exec'd from a thread keeps its tag");
    let mut all = descendants(root);
    all.push(root);
    check_tagged(&t, all.iter().copied().chain([orphan]), vps, "after the exec from a thread");
    untracked(&t, "after the exec from a thread");

    // The map holds exactly the live members.
    let members: HashSet<i32> = t.members(vps).unwrap().iter().map(|m| m.pid.as_raw()).collect();
    for p in all.iter().copied().chain([orphan]) {
        if stat(p).is_some_and(|s| s.0 != 'Z') {
            assert!(members.contains(&p), "live member {p} is in the map");
        }
    }
    assert!(!members.contains(&stranger_pid) && !members.contains(&(std::process::id() as i32)));

    // The event stream.
    drain(&mut t, &mut events);
    let lost = events.iter().any(|e| matches!(e.kind, EventKind::Lost { .. }));
    assert!(events.iter().all(|e| e.tag == Some(vps) || matches!(e.kind, EventKind::Lost { .. })));
    assert!(events.iter().all(|e| e.time_ns.is_some() && e.cpu.is_some()));
    let forks: Vec<_> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Fork { parent, child, child_thread, thread, child_start } => {
                assert!(!thread);
                assert_eq!(child, child_thread);
                Some((parent.as_raw(), child.as_raw(), child_start))
            }
            _ => None,
        })
        .collect();
    eprintln!(
        "lineage: {} events, {} forks, {rounds} checks during the fork loop, {} members at the end, lost: {lost}",
        events.len(),
        forks.len(),
        members.len()
    );
    if !lost {
        assert!(forks.len() >= 1000, "1,000 short forks and more were reported (got {})", forks.len());
        let bg_fork = forks.iter().find(|f| f.1 == bg).expect("the background job's fork");
        assert_eq!(bg_fork.0, root);
        assert_eq!(bg_fork.2, Some(StartTime(stat(bg).unwrap().2)), "fork start time = /proc start time");
        let exits: HashMap<i32, Option<ExitStatus>> = events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Exit { pid, status, group_dead, .. } => {
                    assert_eq!(group_dead, Some(true));
                    Some((pid.as_raw(), status))
                }
                _ => None,
            })
            .collect();
        let exit3 = read_pid(&dir.0, "exit3").unwrap();
        let killed = read_pid(&dir.0, "killed").unwrap();
        assert_eq!(exits.get(&exit3), Some(&Some(ExitStatus::Exited(3))));
        assert_eq!(exits.get(&killed), Some(&Some(ExitStatus::Signaled { signal: 9, core_dumped: false })));
        assert!(
            events.iter().any(|e| e.kind == EventKind::Exec { pid: pid(py), thread: pid(worker) }),
            "the exec from python's worker thread {worker} was reported"
        );
        assert!(!forks.iter().any(|f| f.1 == worker), "thread creation is not reported");
    } else {
        eprintln!("notifications were lost ({} events); event checks skipped", events.len());
    }

    // Kill everything by pid: the kernel drops the entries as the processes exit.
    let live_before: Vec<i32> = descendants(root);
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
    for p in live_before {
        assert_eq!(t.lookup(pid(p)), None, "killed member {p} has no tag");
    }
    drain(&mut t, &mut events);
    if !events.iter().any(|e| matches!(e.kind, EventKind::Lost { .. })) {
        assert!(events.iter().any(|e| matches!(e.kind, EventKind::Exit { pid, .. } if pid.as_raw() == orphan)));
        assert!(events.iter().any(|e| matches!(e.kind, EventKind::Exit { pid, .. } if pid.as_raw() == py)));
    }
    t.forget(vps).unwrap();
    assert!(t.members(vps).unwrap().is_empty());
    let c = t.counters().unwrap();
    assert_eq!(c.insert_failed, 0, "the map never was full");
    assert!(lost || c.ringbuf_full == 0, "no Lost event, so no notification was dropped: {c:?}");

    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[test]
fn a_full_map_is_reported() {
    if skip_unless_root("a_full_map_is_reported") {
        return;
    }
    let mut t = Ebpf::with_config(Config { map_entries: 4, ..Config::default() }).expect("load");
    let vps = VpsId(9);
    let dir = TempDir::new("full");
    let d = dir.0.to_str().unwrap().to_owned();
    let script = r#"for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1000 & done; : > "$D/ready"; wait"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();

    let mut events = Vec::new();
    let start = Instant::now();
    while !events.iter().any(|e: &Event| matches!(e.kind, EventKind::Lost { reason: LossReason::TrackingError, .. })) {
        assert!(start.elapsed() < TIMEOUT, "no Lost event for a full map: {events:?}");
        t.read_events(&mut events, Some(Duration::from_millis(100))).expect("read_events");
    }
    wait_for("the script", || dir.0.join("ready").exists());
    wait_for("ten children", || descendants(held.pid).len() >= 10);
    let c = t.counters().unwrap();
    assert!(c.insert_failed >= 6, "10 children, at most 3 free entries: {c:?}");
    assert_eq!(c.ringbuf_full, 0);
    let lost: u64 = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Lost { count, reason: LossReason::TrackingError } => count,
            _ => None,
        })
        .sum();
    // More may have failed after the last read.
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    let lost_total: u64 = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Lost { count, reason: LossReason::TrackingError } => count,
            _ => None,
        })
        .sum();
    assert!(lost >= 1 && lost_total == t.counters().unwrap().insert_failed, "{lost} {lost_total} {c:?}");
    let members = t.members(vps).unwrap();
    assert!(!members.is_empty() && members.len() <= 4, "{members:?}");
    // The untagged children were still reported, with their parent's tag.
    let forks = events.iter().filter(|e| matches!(e.kind, EventKind::Fork { .. }) && e.tag == Some(vps)).count();
    assert!(forks >= 10, "{forks} forks reported");

    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
}

#[test]
fn a_full_ring_buffer_is_reported_and_tags_survive() {
    if skip_unless_root("a_full_ring_buffer_is_reported_and_tags_survive") {
        return;
    }
    // One page holds 64 records; the loop makes 900 notifications without us reading.
    let mut t = Ebpf::with_config(Config { ring_bytes: 4096, ..Config::default() }).expect("load");
    assert!(t.config().ring_bytes.is_power_of_two());
    let vps = VpsId(11);
    let dir = TempDir::new("ring");
    let d = dir.0.to_str().unwrap().to_owned();
    let script = r#"i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done; sleep 1000 & : > "$D/done"; wait"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();
    wait_for("the fork loop", || dir.0.join("done").exists());
    wait_for("the last child", || !descendants(held.pid).is_empty());

    let mut events = Vec::new();
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    let overflow: u64 = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Lost { count, reason: LossReason::Overflow } => count,
            _ => None,
        })
        .sum();
    assert!(overflow > 0, "a full ring buffer gives Lost(Overflow)");
    assert_eq!(overflow, t.counters().unwrap().ringbuf_full);
    // Tags do not depend on notifications.
    assert_eq!(t.lookup(held.pid()), Some(vps));
    check_tagged(&t, descendants(held.pid), vps, "after the overflow");

    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
}

#[test]
fn members_after_forget_and_blocking_reads() {
    if skip_unless_root("members_after_forget_and_blocking_reads") {
        return;
    }
    let mut t = Ebpf::new().expect("load");
    assert_eq!(t.kind().name(), "ebpf");
    let caps = t.capabilities();
    assert!(caps.host_wide && caps.holds_tags && caps.synchronous && caps.can_lose);
    assert!(!caps.thread_events && !caps.reaps);

    // Nothing tagged yet: a bounded read returns nothing.
    let mut events = Vec::new();
    assert_eq!(t.read_events(&mut events, Some(Duration::from_millis(20))).unwrap(), 0);

    // A process that does not exist.
    let mut gone = std::process::Command::new("/bin/true").spawn().unwrap();
    let gone_pid = gone.id() as i32;
    gone.wait().unwrap();
    assert!(matches!(t.watch(pid(gone_pid), VpsId(3)), Err(TrackerError::NoSuchProcess(_))));

    // Two VPSs side by side; forget drops one of them only.
    let mut a = Held::spawn(&["/bin/sh", "-c", "sleep 1000 & wait"], &[("PATH", "/usr/bin:/bin")]);
    let mut b = Held::spawn(&["/bin/sh", "-c", "sleep 1000 & wait"], &[("PATH", "/usr/bin:/bin")]);
    t.watch(a.pid(), VpsId(21)).unwrap();
    t.watch(b.pid(), VpsId(22)).unwrap();
    a.open_gate();
    b.open_gate();

    // A blocking read returns once the first notification is there.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let n = t.read_events(&mut out, None).unwrap();
        tx.send(()).unwrap();
        (t, out, n)
    });
    rx.recv_timeout(TIMEOUT).expect("a blocking read_events returns when events arrive");
    let (mut t, events, n) = reader.join().unwrap();
    assert!(n > 0 && n == events.len());

    wait_for("both sleeps", || descendants(a.pid).len() == 1 && descendants(b.pid).len() == 1);
    let sleep_a = descendants(a.pid)[0];
    check_tagged(&t, [a.pid, sleep_a], VpsId(21), "vps 21");
    check_tagged(&t, [b.pid, descendants(b.pid)[0]], VpsId(22), "vps 22");
    assert_eq!(t.members(VpsId(21)).unwrap().len(), 2);

    // That forget stops the events and lookups of a VPS is checked for every backend by
    // platform-tests/tests/conformance.rs; here, the map's own view.
    t.forget(VpsId(21)).unwrap();
    assert!(t.members(VpsId(21)).unwrap().is_empty());
    assert_eq!(t.members(VpsId(22)).unwrap().len(), 2, "the other VPS is untouched");
    a.kill_all();
    b.kill_all();
    wait_for("vps 22's entries to go", || t.members(VpsId(22)).unwrap().is_empty());
}

/// Runs `f` in a new thread whose effective capabilities are only `keep` (capability numbers).
/// Capabilities are per thread, so the rest of the test process keeps its own.
fn with_only_caps<T: Send + 'static>(keep: &'static [u32], f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let mut h = Header { version: V3, pid: 0 };
        let mut d = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data structs, for this thread only.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()), 0);
            d[0].effective = 0;
            d[1].effective = 0;
            for &c in keep {
                d[(c / 32) as usize].effective |= 1 << (c % 32);
            }
            assert_eq!(libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()), 0);
        }
        f()
    })
    .join()
    .unwrap()
}

const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[test]
fn missing_capabilities_are_a_clear_error() {
    if skip_unless_root("missing_capabilities_are_a_clear_error") {
        return;
    }
    let (checked, loaded) = with_only_caps(&[], || (Ebpf::check_system(), Ebpf::new().map(|_| ())));
    for r in [checked, loaded] {
        match r {
            Err(TrackerError::PermissionDenied { hint, .. }) => {
                assert!(hint.contains("CAP_BPF") && hint.contains("CAP_PERFMON"), "{hint}")
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }
    let only_bpf = with_only_caps(&[CAP_BPF], || Ebpf::new().map(|_| ()));
    assert!(matches!(only_bpf, Err(TrackerError::PermissionDenied { .. })), "{only_bpf:?}");
}

#[test]
fn cap_bpf_and_cap_perfmon_suffice() {
    if skip_unless_root("cap_bpf_and_cap_perfmon_suffice") {
        return;
    }
    with_only_caps(&[CAP_BPF, CAP_PERFMON], || {
        Ebpf::check_system().expect("CAP_BPF + CAP_PERFMON pass the checks");
        let mut t = Ebpf::new().expect("load with CAP_BPF + CAP_PERFMON only");
        let mut held = Held::spawn(&["/bin/sh", "-c", "sleep 1000 & wait"], &[("PATH", "/usr/bin:/bin")]);
        t.watch(held.pid(), VpsId(31)).expect("watch");
        held.open_gate();
        wait_for("the sleep", || descendants(held.pid).len() == 1);
        check_tagged(&t, [held.pid, descendants(held.pid)[0]], VpsId(31), "with CAP_BPF + CAP_PERFMON");
        let mut events = Vec::new();
        t.read_events(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert!(events.iter().any(|e| matches!(e.kind, EventKind::Fork { .. })), "{events:?}");
        held.kill_all();
        wait_for("the entries to go", || t.members(VpsId(31)).unwrap().is_empty());
    });
}

/// Waits until the ring buffer's descriptor polls readable, up to `timeout`; whether it did.
fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// A named pipe in `dir`, for a script to read its steps from.
fn fifo(dir: &Path) -> PathBuf {
    let path = dir.join("fifo");
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    path
}

fn forks_of(events: &[Event], parent: i32) -> Vec<i32> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Fork { parent: p, child, .. } if p.as_raw() == parent => Some(child.as_raw()),
            _ => None,
        })
        .collect()
}

fn exits(events: &[Event]) -> HashMap<i32, Option<ExitStatus>> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Exit { pid, status, .. } => Some((pid.as_raw(), status)),
            _ => None,
        })
        .collect()
}

fn per_event_records(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Fork { .. } | EventKind::Exec { .. } | EventKind::Exit { .. }))
        .collect()
}

#[test]
fn a_burst_is_all_delivered_with_batched_wakeups_when_drained_synchronously() {
    if skip_unless_root("a_burst_is_all_delivered_with_batched_wakeups_when_drained_synchronously") {
        return;
    }
    let mut t = Ebpf::new().expect("load");
    assert_eq!(t.config().wakeup_interval, Config::DEFAULT_WAKEUP_INTERVAL, "batched wake-ups by default");
    assert_eq!(t.reporting(), Reporting::All);
    let vps = VpsId(41);
    let dir = TempDir::new("burst");
    let d = dir.0.to_str().unwrap().to_owned();
    // 500 children at once, then reaped together.
    let script = r#"i=0; while [ $i -lt 500 ]; do /bin/true & i=$((i+1)); done; wait; : > "$D/done"; sleep 1000"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();
    wait_for("the burst", || dir.0.join("done").exists());

    // One synchronous drain sees every record, woken for or not.
    let mut events = Vec::new();
    t.read_events(&mut events, Some(Duration::ZERO)).expect("read_events");
    let lost: Vec<_> = events.iter().filter(|e| matches!(e.kind, EventKind::Lost { .. })).collect();
    assert!(lost.is_empty(), "no loss in a 1 MiB ring: {lost:?}");
    let children = forks_of(&events, held.pid);
    let exits = exits(&events);
    let done: Vec<i32> = children.iter().copied().filter(|c| exits.contains_key(c)).collect();
    assert_eq!(
        done.len(),
        500,
        "500 forked children with their exits ({} forks, {} exits)",
        children.len(),
        exits.len()
    );
    for c in &done {
        assert_eq!(exits[c], Some(ExitStatus::Exited(0)), "/bin/true {c} exited 0");
        assert!(
            events.iter().any(|e| matches!(e.kind, EventKind::Exec { pid, .. } if pid.as_raw() == *c)),
            "the exec of {c} was reported"
        );
    }
    assert_eq!(t.counters().unwrap(), Default::default());
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
}

#[test]
fn an_isolated_event_wakes_a_waiting_reader_and_a_burst_tail_is_not_stranded() {
    if skip_unless_root("an_isolated_event_wakes_a_waiting_reader_and_a_burst_tail_is_not_stranded") {
        return;
    }
    let mut t = Ebpf::new().expect("load");
    let interval = t.config().wakeup_interval;
    assert!(!interval.is_zero());
    let vps = VpsId(42);
    let dir = TempDir::new("isolated");
    let d = dir.0.to_str().unwrap().to_owned();
    let steps = fifo(&dir.0);
    let script = r#"exec 3<"$D/fifo"
read x <&3; /bin/true
read x <&3; i=0; while [ $i -lt 300 ]; do /bin/true & i=$((i+1)); done; wait; : > "$D/burst"
read x <&3; ( i=0; while [ $i -lt 400 ]; do i=$((i+1)); done; exit 7 )
read x <&3"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();
    let mut go = std::fs::OpenOptions::new().write(true).open(&steps).expect("open the fifo");

    // Quiet: the shell waits on the fifo. Drain, and let the interval pass since the last record.
    let mut events = Vec::new();
    wait_for("the shell's exec", || {
        t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
        events.iter().any(|e| matches!(e.kind, EventKind::Exec { .. }))
    });
    let quiet_since = Instant::now();
    wait_for("one wake-up interval of quiet", || quiet_since.elapsed() > interval * 2);
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    events.clear();

    // A reader asleep in poll(2) is woken by the first record.
    let fd = t.as_fd().as_raw_fd();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let poller = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let ok = poll_readable(fd, TIMEOUT);
        (ok, Instant::now())
    });
    let tid = tid_rx.recv().unwrap();
    wait_for("the poller to sleep", || {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('S')))
            .unwrap_or(false)
    });
    let sent = Instant::now();
    go.write_all(b"1\n").expect("step 1");
    let (woken, at) = poller.join().unwrap();
    assert!(woken, "poll(2) on the ring timed out after {TIMEOUT:?}: the isolated fork woke nobody");
    let latency = at.saturating_duration_since(sent);
    eprintln!("isolated event: the sleeping reader woke {latency:?} after the step was sent");
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    assert_eq!(forks_of(&events, held.pid).len(), 1, "the one fork: {events:?}");

    // A burst, then a lone short-lived child, read only by blocking reads (no zero-timeout
    // drain). The child's fork wakes the reader; its exit, a fraction of a millisecond later,
    // comes without a wake-up: the reader must look again by itself.
    go.write_all(b"2\n").expect("step 2");
    let want = 300;
    let root = held.pid;
    let reader = std::thread::spawn(move || {
        // Kept up to date as events come, so that the reader is back in its wait at once.
        let (mut all, mut children, mut exited, mut lone) = (Vec::new(), HashSet::new(), HashSet::new(), None);
        let start = Instant::now();
        loop {
            let from = all.len();
            t.read_events(&mut all, Some(TIMEOUT)).unwrap();
            for e in &all[from..] {
                match e.kind {
                    EventKind::Fork { parent, child, .. } if parent.as_raw() == root => {
                        children.insert(child.as_raw());
                    }
                    EventKind::Exit { pid, status: Some(ExitStatus::Exited(0)), .. } => {
                        exited.insert(pid.as_raw());
                    }
                    EventKind::Exit { status: Some(ExitStatus::Exited(7)), .. } => lone = Some(Instant::now()),
                    _ => {}
                }
            }
            let burst = exited.iter().filter(|p| children.contains(p)).count();
            if (burst >= want && lone.is_some()) || start.elapsed() > TIMEOUT {
                return (t, all, burst, lone);
            }
        }
    });
    wait_for("the burst", || dir.0.join("burst").exists());
    let sent = Instant::now();
    go.write_all(b"3\n").expect("step 3");
    let (mut t, burst, exited, lone) = reader.join().unwrap();
    assert_eq!(exited, want, "300 burst children, each forked and exited, seen through blocking reads only");
    let lone = lone.expect("the lone child's exit (status 7) reached the blocking reader");
    let late = lone.saturating_duration_since(sent);
    eprintln!("lone child: its exit reached the blocking reader {late:?} after the step was sent");
    assert!(late < TIMEOUT / 4, "the exit without a wake-up waited {late:?}: the reader did not look again");
    assert!(burst.iter().all(|e| !matches!(e.kind, EventKind::Lost { .. })), "no loss");
    drop(go);
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
}

/// Now, in the clock ticks of /proc/PID/stat's start time.
fn boot_ticks() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec; sysconf has no preconditions.
    let hz = unsafe {
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
        libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64
    };
    ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000
}

/// Starts an untracked child of the test process with the pid `want` (clone3 with set_tid,
/// Linux 5.5, root in the initial PID namespace); it blocks reading a pipe until a byte is
/// written to the returned write end (closing it is not enough: the child holds a copy). Errors
/// when the kernel refuses (e.g. the pid is taken).
fn spawn_with_pid(want: i32) -> std::io::Result<(i32, i32)> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let mut fds = [0; 2];
    let tids = [want];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: a pipe, then clone3 without CLONE_VM (a fork); the child only makes
    // async-signal-safe calls (read, _exit).
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
        let pid = libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>());
        if pid == 0 {
            let mut b = 0u8;
            libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fds[0]);
        if pid < 0 {
            libc::close(fds[1]);
            return Err(err);
        }
        Ok((pid as i32, fds[1]))
    }
}

#[test]
fn roots_only_sends_no_per_event_records_but_the_map_is_exact() {
    if skip_unless_root("roots_only_sends_no_per_event_records_but_the_map_is_exact") {
        return;
    }
    let mut t = Ebpf::with_config(Config { reporting: Reporting::RootsOnly, ..Config::default() }).expect("load");
    assert_eq!(t.reporting(), Reporting::RootsOnly);
    let vps = VpsId(43);
    let dir = TempDir::new("roots");
    let d = dir.0.to_str().unwrap().to_owned();
    let script = r#"sleep 1000 & echo $! > "$D/a"
sh -c 'sleep 1000 & echo $! > "$D/b"; wait' & echo $! > "$D/sh_b"
i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done
: > "$D/done"
wait"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    let root = held.pid;
    let mut stranger = std::process::Command::new("/bin/sleep").arg("1000").spawn().expect("spawn sleep");
    let stranger_pid = stranger.id() as i32;
    t.watch(held.pid(), vps).expect("watch");
    assert!(t.raw_entry(held.pid()).unwrap().is_some_and(|m| m.root && m.vps == vps), "watch marks a root");
    held.open_gate();

    // During the 2,000 forks: every live descendant is tagged, strangers are not.
    let mut rounds = 0;
    while !dir.0.join("done").exists() {
        let mut all = descendants(root);
        all.push(root);
        check_tagged(&t, all, vps, "during 2,000 forks in RootsOnly");
        for p in [stranger_pid, std::process::id() as i32, 1] {
            assert_eq!(t.tag_of(pid(p)).unwrap(), None, "untracked {p} ({})", comm(p));
        }
        rounds += 1;
        assert!(rounds < 100_000, "the script never finished");
    }
    let (a, b, sh_b) =
        (read_pid(&dir.0, "a").expect("a"), read_pid(&dir.0, "b").expect("b"), read_pid(&dir.0, "sh_b").expect("sh_b"));
    held.extra.extend([a, b, sh_b]);

    // No per-event record for any of it.
    let mut events = Vec::new();
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    assert!(events.is_empty(), "RootsOnly sends nothing for forks, execs and exits of non-roots: {events:?}");

    // The map is the table: exactly the live processes of the tree, with their /proc start times.
    let mut want: HashSet<i32> = descendants(root).into_iter().collect();
    want.insert(root);
    assert_eq!(want, HashSet::from([root, a, b, sh_b]), "the tree after the loop");
    let members: HashMap<i32, vpstag_ebpf::Member> =
        t.members(vps).unwrap().into_iter().map(|m| (m.pid.as_raw(), m)).collect();
    assert_eq!(members.keys().copied().collect::<HashSet<_>>(), want, "members() after 2,000 forks");
    for p in &want {
        let start = StartTime(stat(*p).unwrap().2);
        assert_eq!(t.tag_of(pid(*p)).unwrap(), Some((vps, start)), "tag_of({p})");
        assert_eq!(members[p].start, start);
        assert_eq!(members[p].root, *p == root, "only the watched process is a root");
    }
    let everyone: HashSet<i32> = t.entries().unwrap().iter().filter(|m| m.vps == vps).map(|m| m.pid.as_raw()).collect();
    assert_eq!(everyone, want, "entries() agrees");

    // A zombie cannot be tagged: its exit already ran, nothing would delete the entry.
    // SAFETY: fork; the child only calls _exit.
    let zombie = unsafe {
        let c = libc::fork();
        if c == 0 {
            libc::_exit(0);
        }
        c
    };
    assert!(zombie > 0, "fork");
    wait_for("the child to be a zombie", || stat(zombie).is_some_and(|s| s.0 == 'Z'));
    let tagged = t.tag(pid(zombie), vps);
    assert!(matches!(tagged, Err(TrackerError::NoSuchProcess(_))), "tagging a zombie: {tagged:?}");
    assert_eq!(t.raw_entry(pid(zombie)).unwrap(), None, "no entry left for the zombie");
    // SAFETY: reap our own child.
    unsafe { libc::waitpid(zombie, std::ptr::null_mut(), 0) };

    // PID reuse: `a` exits, its pid goes to an untracked process; tag_of and members say no.
    let a_start = stat(a).unwrap().2;
    // SAFETY: kill by pid a process of the test's tree.
    unsafe { libc::kill(a, libc::SIGKILL) };
    wait_for("a to be reaped by the shell", || stat(a).is_none());
    assert_eq!(t.tag_of(pid(a)).unwrap(), None, "an exited member");
    assert_eq!(t.raw_entry(pid(a)).unwrap(), None, "the exit program deleted it");
    wait_for("the boot clock to move two ticks past a's start", || boot_ticks() > a_start + 2);
    match spawn_with_pid(a) {
        Ok((reused, gate)) => {
            assert_eq!(reused, a);
            assert_ne!(stat(reused).map(|s| s.2), Some(a_start), "a new process, a new start time");
            assert_eq!(t.tag_of(pid(reused)).unwrap(), None, "the reused pid {reused} is not the tagged process");
            assert!(!t.members(vps).unwrap().iter().any(|m| m.pid.as_raw() == reused));
            // SAFETY: release our child through its pipe, then kill it by pid anyway and reap it.
            unsafe {
                libc::write(gate, b"g".as_ptr().cast(), 1);
                libc::close(gate);
                libc::kill(reused, libc::SIGKILL);
                libc::waitpid(reused, std::ptr::null_mut(), 0);
            }
        }
        Err(e) => eprintln!("roots-only: clone3 with set_tid={a} refused ({e}); the pid-reuse step is skipped"),
    }
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    assert!(events.is_empty(), "still nothing for non-roots: {events:?}");

    // The root's exit is reported, and wakes a sleeping reader.
    // SAFETY: kill our own child by pid.
    unsafe { libc::kill(root, libc::SIGKILL) };
    assert!(poll_readable(t.as_fd().as_raw_fd(), TIMEOUT), "the root's exit woke no reader within {TIMEOUT:?}");
    wait_for("the root's exit", || {
        t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
        exits(&events).contains_key(&root)
    });
    assert_eq!(exits(&events)[&root], Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    let records = per_event_records(&events);
    assert_eq!(records.len(), 1, "only the root's exit, not its orphans': {records:?}");
    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[test]
fn reporting_switches_at_run_time() {
    if skip_unless_root("reporting_switches_at_run_time") {
        return;
    }
    let mut t = Ebpf::new().expect("load");
    let vps = VpsId(44);
    let dir = TempDir::new("switch");
    let d = dir.0.to_str().unwrap().to_owned();
    let steps = fifo(&dir.0);
    let script = r#"exec 3<"$D/fifo"
read x <&3; /bin/true; : > "$D/s1"
read x <&3; /bin/true; : > "$D/s2"
read x <&3; /bin/true; : > "$D/s3"
read x <&3"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    let root = held.pid;
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();
    let mut go = std::fs::OpenOptions::new().write(true).open(&steps).expect("open the fifo");
    let mut step = |t: &mut Ebpf, n: u32| -> Vec<Event> {
        go.write_all(format!("{n}\n").as_bytes()).expect("step");
        wait_for(&format!("step {n}"), || dir.0.join(format!("s{n}")).exists());
        let mut events = Vec::new();
        t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
        events
    };

    let all = step(&mut t, 1);
    assert_eq!(forks_of(&all, held.pid).len(), 1, "All: the fork is reported: {all:?}");
    assert!(exits(&all).values().any(|s| *s == Some(ExitStatus::Exited(0))), "All: its exit too: {all:?}");

    t.set_reporting(Reporting::RootsOnly).unwrap();
    assert_eq!(t.reporting(), Reporting::RootsOnly);
    assert_eq!(t.config().reporting, Reporting::RootsOnly);
    let quiet = step(&mut t, 2);
    assert!(per_event_records(&quiet).is_empty(), "RootsOnly: nothing for the fork: {quiet:?}");
    assert_eq!(t.tag_of(held.pid()).unwrap().map(|(v, _)| v), Some(vps), "the map still has the root");

    t.set_reporting(Reporting::All).unwrap();
    t.set_wakeup_interval(Duration::ZERO).unwrap();
    assert_eq!(t.config().wakeup_interval, Duration::ZERO);
    let again = step(&mut t, 3);
    assert_eq!(forks_of(&again, held.pid).len(), 1, "All again: the fork is reported: {again:?}");

    drop(go);
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
    let mut events = Vec::new();
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    assert!(exits(&events).contains_key(&root), "the root's exit: {events:?}");
}

#[test]
fn roots_only_still_reports_a_full_map() {
    if skip_unless_root("roots_only_still_reports_a_full_map") {
        return;
    }
    let config = Config { map_entries: 4, reporting: Reporting::RootsOnly, ..Config::default() };
    let mut t = Ebpf::with_config(config).expect("load");
    let vps = VpsId(45);
    let dir = TempDir::new("roots-full");
    let d = dir.0.to_str().unwrap().to_owned();
    let script = r#"for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1000 & done; : > "$D/ready"; wait"#;
    let mut held = Held::spawn(&["/bin/sh", "-c", script], &[("PATH", "/usr/bin:/bin"), ("D", &d)]);
    t.watch(held.pid(), vps).expect("watch");
    held.open_gate();
    wait_for("the script", || dir.0.join("ready").exists());

    // The untagged children's records wake the reader and come with a Lost event.
    let mut events = Vec::new();
    assert!(poll_readable(t.as_fd().as_raw_fd(), TIMEOUT), "a loss woke no reader within {TIMEOUT:?}");
    t.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    let lost: u64 = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Lost { count, reason: LossReason::TrackingError } => count,
            _ => None,
        })
        .sum();
    let c = t.counters().unwrap();
    assert!(c.insert_failed >= 6, "10 children, at most 3 free entries: {c:?}");
    assert_eq!(lost, c.insert_failed, "every failed insertion is reported: {events:?}");
    let untagged = forks_of(&events, held.pid).len() as u64;
    assert_eq!(untagged, c.insert_failed, "RootsOnly reports exactly the forks that were lost: {events:?}");
    assert!(!events.iter().any(|e| matches!(e.kind, EventKind::Exec { .. } | EventKind::Exit { .. })), "{events:?}");
    held.kill_all();
    wait_for("the VPS's entries to go", || t.members(vps).unwrap().is_empty());
}

/// The exit record carries the process's CPU time read in the kernel before anyone can reap it:
/// its own and that of the child it waited for. Checked against what `wait4` then gives for it
/// (`RUSAGE_BOTH`: the same two parts, from the same run-time accounting).
#[test]
fn an_exit_carries_the_process_cpu_time() {
    if skip_unless_root("an_exit_carries_the_process_cpu_time") {
        return;
    }
    let mut t = Ebpf::new().expect("load");
    assert!(t.capabilities().exit_usage, "{:?}", t.capabilities());
    // Busy itself, then waits for a busy child, then exits 3 (not an exec of its last command).
    let busy = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done";
    let script = format!("{busy}; /bin/sh -c '{busy}'; {busy}; exit 3");
    let mut held = Held::spawn(&["/bin/sh", "-c", &script], &[("PATH", "/usr/bin:/bin")]);
    let me = held.pid;
    t.watch(held.pid(), VpsId(31)).unwrap();
    held.open_gate();

    let mut events = Vec::new();
    let start = Instant::now();
    let exit = loop {
        assert!(start.elapsed() < TIMEOUT, "no exit of {me} in {events:?}");
        t.read_events(&mut events, Some(Duration::from_millis(100))).expect("read_events");
        if let Some(e) = events.iter().find(|e| matches!(e.kind, EventKind::Exit { pid, .. } if pid.as_raw() == me)) {
            break *e;
        }
    };
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: reap our own child, with valid out pointers.
    let reaped = unsafe { libc::wait4(me, &mut status, 0, &mut ru) };
    assert_eq!(reaped, me, "wait4");
    held.pid = -me; // reaped: Held's drop must not wait again
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3, "status {status:#x}");

    let tv_ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000;
    let waited = tv_ns(ru.ru_utime) + tv_ns(ru.ru_stime);
    let figure = exit.exit_cpu_ns.unwrap_or_else(|| panic!("no CPU figure in {exit:?}"));
    assert!(waited >= 100_000_000, "the script was meant to run for a while: {waited} ns");
    // The figure misses the tail of exit and at most a tick of the last run; wait4's figure is
    // in microseconds.
    let slack = (waited / 20).max(10_000_000);
    assert!(
        figure.abs_diff(waited) <= slack,
        "exit figure {figure} ns, wait4 {waited} ns (own and waited-for children's): more than {slack} ns apart"
    );
}
