//! cgroup v2 against the real kernel (`vpstag::cgroup`). Each test works in a subtree of its own,
//! `vpstag-test-PID-NAME` below this process's cgroup on the cgroup2 mount (on a hybrid host such
//! as the development machine: /sys/fs/cgroup/unified), which a guard kills and removes at the end,
//! failed or not. Without a cgroup2 mount every test says SKIP.
//!
//! Limits need controllers, which the development machine's cgroup v2 has none of (they are bound
//! to cgroup v1): there the tests check that a limit is refused with a clear error. The tests that
//! check that limits hold run inside the kernel-matrix VMs only (`platform-tests/run-kernels` sets
//! `VPSTAG_IN_VM=1`), where enabling controllers in the root cgroup touches nothing of the host's.
#![cfg(target_os = "linux")]

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use vpstag::cgroup::{CgroupError, CgroupRoot, Controller, KillMethod, Limits, VpsCgroup};
use vpstag::{Pid, VpsId};

const PYTHON: &str = "/usr/bin/python3";
const DEADLINE: Duration = Duration::from_secs(60);

#[path = "support/cgroup_tree.rs"]
mod cgroup_tree;

use cgroup_tree::{own_cgroup_dir, pids_below, Tree};

/// A test's own subtree, `vpstag-test-PID-NAME`; `None` (after printing SKIP) when there is no
/// cgroup2 to test on.
fn test_tree(name: &str) -> Option<Tree> {
    Tree::create("vpstag-test", name).map_err(|why| println!("SKIP: {why}")).ok()
}

/// A process of a test: killed by pid and reaped on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Proc {
    /// `/usr/bin/python3 -c SCRIPT` (or `sh -c` when `sh`), stdin and stdout piped.
    fn spawn(program: &str, script: &str) -> Proc {
        let mut child = Command::new(program)
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        Proc { child, stdin, out }
    }

    fn pid(&self) -> Pid {
        Pid::new(self.child.id() as i32).expect("a child's pid")
    }

    fn say(&mut self, line: &str) {
        let w = self.stdin.as_mut().expect("stdin still open");
        writeln!(w, "{line}").and_then(|()| w.flush()).expect("the child reads its stdin");
    }

    /// The next line it prints (the test's deadline is the harness's: a child that never prints
    /// is killed when the test's guard drops).
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("reading the child's stdout");
        assert!(!s.is_empty(), "the child ended without printing (status {:?})", self.child.try_wait());
        s.trim().to_string()
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        self.child.wait().expect("waiting for our child")
    }
}

impl Drop for Proc {
    /// Ends the child and everything below it, by pid: each process of the tree is stopped (so it
    /// forks no more and its children stay its children) until the tree stops growing, then all
    /// are killed. Whatever the cgroup under test did or failed to do.
    fn drop(&mut self) {
        let root = self.child.id() as i32;
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let new: Vec<i32> = tree_of(root).into_iter().filter(|p| !seen.contains(p)).collect();
            if new.is_empty() {
                break;
            }
            for p in new {
                // SAFETY: kill with integer arguments; `p` is below our own child, found just now.
                unsafe { libc::kill(p, libc::SIGSTOP) };
                seen.insert(p);
            }
        }
        for p in seen {
            // SAFETY: as above; a stopped process's pid cannot have been reused.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `root` and its live descendants, from the parent links in /proc.
fn tree_of(root: i32) -> BTreeSet<i32> {
    let mut parent = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first().is_some_and(|s| *s == "Z" || *s == "X") {
            continue;
        }
        parent.insert(pid, f.get(1).and_then(|p| p.parse::<i32>().ok()).unwrap_or(0));
    }
    let mut out = BTreeSet::new();
    for &p in parent.keys() {
        let mut cur = p;
        for _ in 0..4096 {
            if cur == root {
                out.insert(p);
                break;
            }
            match parent.get(&cur) {
                Some(&pp) if pp > 0 => cur = pp,
                _ => break,
            }
        }
    }
    out
}

/// (state, start time) of a process from /proc/PID/stat; `None` when it is gone.
fn stat_of(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

/// Waits (at most [`DEADLINE`]) until `cond` says yes; it also says what it saw, for the failure.
fn wait_for(what: &str, mut cond: impl FnMut() -> (bool, String)) {
    let start = Instant::now();
    loop {
        let (ok, saw) = cond();
        if ok {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "waited {DEADLINE:?} for {what}; last saw: {saw}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn in_vm() -> bool {
    std::env::var_os("VPSTAG_IN_VM").is_some_and(|v| v == "1")
}

#[test]
fn a_process_moved_in_is_listed_and_the_cpu_of_its_exited_child_counts() {
    let Some(tree) = test_tree("cpu") else { return };
    let root = CgroupRoot::at(&tree.dir).expect("the test tree is a cgroup v2 root");
    let cg = root.create("cpu", VpsId(1), &Limits::default()).expect("a cgroup without limits");
    // Waits for a line; burns 0.3 s of CPU itself, then has a child burn 0.3 s and exit; reports
    // its own CPU at the start and the end, and the child's, in microseconds.
    let mut p = Proc::spawn(
        PYTHON,
        r#"
import os, sys, time
def burn(s):
    t = time.process_time()
    while time.process_time() - t < s: pass
sys.stdin.readline()
start = time.process_time()
burn(0.3)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    burn(0.3)
    os.write(w, str(int(time.process_time() * 1e6)).encode())
    os._exit(0)
os.close(w)
child = int(os.read(r, 64))
os.waitpid(pid, 0)
print(int(start * 1e6), int(time.process_time() * 1e6), child, flush=True)
sys.stdin.readline()
"#,
    );
    cg.attach(p.pid()).expect("moving our own child in");
    assert_eq!(cg.procs().expect("cgroup.procs"), vec![p.pid()]);
    assert!(cg.is_populated().expect("cgroup.events"));
    p.say("go");
    let line = p.line();
    let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(f.len(), 3, "the script printed {line:?}");
    let (own_burnt, own_total, child) = (f[1] - f[0], f[1], f[2]);
    let used = cg.usage().expect("cpu.stat").cpu_usec;
    // Counted: what the parent burnt after it was moved in, and all of the exited child's CPU.
    // Not more than everything both ever used (plus the kernel's accounting slack).
    let low = (own_burnt + child) * 9 / 10;
    let high = own_total + child + 50_000;
    assert!(
        (low..=high).contains(&used),
        "cpu.stat usage_usec {used}, want {low}..={high} (parent burnt {own_burnt} of {own_total}, child {child})"
    );
    assert_eq!(cg.procs().expect("cgroup.procs"), vec![p.pid()], "the exited child is no member");
    assert!(p.wait().success());
    wait_for("the cgroup to empty after its process exited", || match cg.is_populated() {
        Ok(populated) => (!populated, format!("populated {populated}, procs {:?}", cg.procs())),
        Err(e) => (false, e.to_string()),
    });
    assert!(cg.procs().expect("cgroup.procs").is_empty());
    cg.remove(Duration::from_secs(10)).expect("removing an empty cgroup");
    assert!(!cg.path().exists());
}

/// A shell that forks all the time, with background children and a setsid'd grandchild.
const FORKING_TREE: &str = r#"read x
for i in 1 2 3 4 5; do sleep 1000 & done
setsid sh -c 'sleep 1000 & sleep 1000' &
echo started
while :; do /bin/true; done"#;

#[test]
fn kill_ends_a_forking_tree_and_the_cgroup_can_be_removed() {
    let Some(tree) = test_tree("kill") else { return };
    let root = CgroupRoot::at(&tree.dir).expect("the test tree is a cgroup v2 root");
    let has_kill = tree.dir.join("cgroup.kill").exists();
    for method in [KillMethod::CgroupKill, KillMethod::Signals] {
        if method == KillMethod::CgroupKill && !has_kill {
            println!("method {method:?}: skipped: this kernel has no cgroup.kill (before 5.14)");
            continue;
        }
        let cg = root.create(&format!("{method:?}"), VpsId(2), &Limits::default()).expect("a cgroup");
        let mut sh = Proc::spawn("/bin/sh", FORKING_TREE);
        cg.attach(sh.pid()).expect("moving our own child in");
        sh.say("go");
        assert_eq!(sh.line(), "started");
        // sh, 5 sleeps, the setsid'd sh and its 2 sleeps, and the loop's passing /bin/true.
        let mut members = Vec::new();
        wait_for("the tree to reach 9 processes in the cgroup", || match cg.procs() {
            Ok(m) => {
                members = m;
                (members.len() >= 9, format!("members {members:?}, the shell's tree {:?}", tree_of(sh.pid().as_raw())))
            }
            Err(e) => (false, e.to_string()),
        });
        let known: Vec<(i32, u64)> =
            members.iter().filter_map(|p| Some((p.as_raw(), stat_of(p.as_raw())?.1))).collect();
        let started = Instant::now();
        match method {
            KillMethod::CgroupKill => {
                assert_eq!(cg.kill(Duration::from_secs(20)).expect("kill"), KillMethod::CgroupKill)
            }
            KillMethod::Signals => cg.kill_with(KillMethod::Signals, Duration::from_secs(20)).expect("kill by signals"),
            other => panic!("a kill method this test does not know: {other:?}"),
        }
        println!("method {method:?}: {} processes killed in {:?}", known.len(), started.elapsed());
        assert!(cg.procs().expect("cgroup.procs").is_empty(), "{method:?}: processes left");
        assert!(!cg.is_populated().expect("cgroup.events"), "{method:?}: still populated");
        let status = sh.wait();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{method:?}: {status}");
        for (pid, start) in &known {
            match stat_of(*pid) {
                Some((state, s)) if s == *start => {
                    assert!(matches!(state, 'Z' | 'X'), "{method:?}: {pid} lives on ({state})")
                }
                _ => {}
            }
        }
        let e = cg.attach(Pid::new(std::process::id() as i32).expect("our pid")).unwrap_err();
        assert!(matches!(e, CgroupError::Killed { .. }), "{method:?}: attach after kill: {e:?}");
        assert!(e.to_string().contains("create a new one"), "{e}");
        cg.remove(Duration::from_secs(10)).expect("removing the killed cgroup");
        assert!(!cg.path().exists(), "{method:?}: {} is still there", cg.path().display());
    }
}

/// Whether `controller` is bound to a cgroup v1 hierarchy on this host, and where.
fn v1_mount_of(controller: &str) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = post.split(' ').collect();
        (f.first() == Some(&"cgroup") && f.get(2)?.split(',').any(|o| o == controller))
            .then(|| pre.split(' ').nth(4).map(str::to_string))
            .flatten()
    })
}

#[test]
fn a_limit_without_its_controller_is_refused_clearly() {
    let Some(tree) = test_tree("refuse") else { return };
    // Nothing is enabled in the tree's own cgroup.subtree_control, so `inner` is offered no
    // controller, whatever the host has.
    let inner = tree.sub("inner");
    let root = CgroupRoot::at(&inner).expect("a cgroup v2 root");
    for (limits, controller) in [
        (Limits { memory_max: Some(64 << 20), ..Limits::default() }, Controller::Memory),
        (Limits { pids_max: Some(8), ..Limits::default() }, Controller::Pids),
        (Limits { cpu_max_percent: Some(50), ..Limits::default() }, Controller::Cpu),
    ] {
        let e = root.create("limited", VpsId(3), &limits).unwrap_err();
        let msg = e.to_string();
        println!("{controller}: {msg}");
        assert!(
            matches!(&e, CgroupError::ControllerUnavailable { controller: c, .. } if *c == controller),
            "{controller}: {e:?}"
        );
        assert!(msg.starts_with("cgroup v2: ") && msg.contains(&format!("the {controller} controller")), "{msg}");
        assert!(msg.contains(&inner.display().to_string()) && msg.contains(controller.limit_file()), "{msg}");
        match v1_mount_of(controller.name()) {
            Some(v1) => assert!(msg.contains(&v1) && msg.contains("systemd.unified_cgroup_hierarchy=1"), "{msg}"),
            None => assert!(msg.contains("cgroup.subtree_control") && msg.contains("Delegate=yes"), "{msg}"),
        }
        let left: Vec<_> =
            std::fs::read_dir(&inner).expect("listing").flatten().filter(|e| e.path().is_dir()).collect();
        assert!(left.is_empty(), "{controller}: a refused limit left {left:?}");
    }
    // Without limits the same root works: accounting and kill need no controller.
    let cg = root.create("unlimited", VpsId(3), &Limits::default()).expect("a cgroup without limits");
    assert_eq!(cg.limits().expect("reading limits"), Limits::default());
    cg.remove(Duration::from_secs(10)).expect("removing");
}

#[test]
fn at_refuses_what_is_not_a_writable_cgroup_v2_directory() {
    let Some(tree) = test_tree("at") else { return };
    let e = CgroupRoot::at(std::env::temp_dir()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CgroupError::NotCgroup2 { .. }), "{e:?}");
    assert!(msg.contains("not a cgroup v2 directory") && msg.contains("not a cgroup filesystem"), "{msg}");
    assert!(msg.contains("here cgroup v2 is mounted at"), "{msg}");
    let e = CgroupRoot::at(tree.dir.join("cgroup.procs")).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    let e = CgroupRoot::at("/nonexistent/vpstag").unwrap_err();
    assert!(matches!(e, CgroupError::Io { .. }) && e.to_string().contains("/nonexistent/vpstag"), "{e:?}");
    match v1_mount_of("pids").or_else(|| v1_mount_of("memory")) {
        Some(v1) => {
            let e = CgroupRoot::at(&v1).unwrap_err();
            let msg = e.to_string();
            println!("{msg}");
            assert!(matches!(e, CgroupError::NotCgroup2 { .. }) && msg.contains("a cgroup v1 hierarchy"), "{msg}");
            let e = VpsCgroup::open(&v1).unwrap_err();
            assert!(e.to_string().contains("cgroup v1"), "{e}");
        }
        None => println!("no cgroup v1 hierarchy here: the v1 refusal is not checked"),
    }
    // As a user the tree is not delegated to.
    let me = std::env::current_exe().expect("this test binary");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && std::env::var_os("VPSTAG_CGROUP_AS_NOBODY").is_none() {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"])
            .arg(&me)
            .args(["--exact", "at_as_nobody", "--nocapture", "--test-threads=1"])
            .env("VPSTAG_CGROUP_AS_NOBODY", &tree.dir)
            .output()
            .expect("setpriv");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("NotDelegated ok"), "as uid 65534: {text}");
    }
}

/// Run by `at_refuses_what_is_not_a_writable_cgroup_v2_directory` as uid 65534.
#[test]
fn at_as_nobody() {
    let Some(dir) = std::env::var_os("VPSTAG_CGROUP_AS_NOBODY") else { return };
    let e = CgroupRoot::at(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CgroupError::NotDelegated { .. }), "{e:?}");
    assert!(msg.contains("Delegate=yes") && msg.contains("--cgroup-root"), "{msg}");
    println!("NotDelegated ok: {msg}");
}

#[test]
fn odd_names_get_safe_unique_directories() {
    let Some(tree) = test_tree("names") else { return };
    let root = CgroupRoot::at(&tree.dir).expect("a cgroup v2 root");
    let long = "x".repeat(300);
    let names = ["../../etc", "a/b", "cgroup.procs", "", "x\ny", "é", " -", "web", "web", long.as_str()];
    let mut made: Vec<VpsCgroup> = Vec::new();
    for name in names {
        let cg = root.create(name, VpsId(4), &Limits::default()).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(cg.path().parent(), Some(tree.dir.as_path()), "{name:?} -> {}", cg.path().display());
        let file = cg.path().file_name().and_then(|f| f.to_str()).expect("a UTF-8 file name").to_string();
        assert!(file.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)), "{name:?} -> {file}");
        assert!(file.len() < 200, "{name:?} -> {} bytes", file.len());
        assert!(made.iter().all(|m| m.path() != cg.path()), "{name:?} reused {file}");
        made.push(cg);
    }
    for cg in made {
        cg.remove(Duration::from_secs(10)).expect("removing");
    }
}

// ------------------------------------------------------------------------------------------------
// Inside the kernel-matrix VM only: limits that hold.

/// The default root below this process's cgroup (in the VM: the root cgroup), for a VM test.
fn vm_root(test: &str) -> Option<CgroupRoot> {
    if !in_vm() {
        println!(
            "SKIP: {test} runs inside the kernel-matrix VM only (platform-tests/run-kernels sets VPSTAG_IN_VM=1), \
             where it may enable controllers in the root cgroup"
        );
        return None;
    }
    if let Err(why) = own_cgroup_dir() {
        panic!("no cgroup v2 in the VM: {why}");
    }
    Some(CgroupRoot::find().expect("CgroupRoot::find in the VM"))
}

/// Kills and removes a VM test's cgroup on the way out, failed or not.
struct Removed<'a>(&'a VpsCgroup);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill(Duration::from_secs(20));
        let _ = self.0.remove(Duration::from_secs(20));
    }
}

#[test]
fn pids_max_stops_the_fork_beyond_it() {
    let Some(root) = vm_root("pids_max_stops_the_fork_beyond_it") else { return };
    let limits = Limits { pids_max: Some(8), ..Limits::default() };
    let cg = root.create("forks", VpsId(5), &limits).expect("a cgroup with pids.max");
    let _cleanup = Removed(&cg);
    assert_eq!(cg.limits().expect("reading limits").pids_max, Some(8));
    // Forks until a fork fails; the children wait for the parent's pipe to close.
    let mut p = Proc::spawn(
        PYTHON,
        r#"
import os, sys, errno
sys.stdin.readline()
r, w = os.pipe()
kids, err = [], None
for _ in range(20):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    kids.append(pid)
print(len(kids), err, flush=True)
os.close(w)
for k in kids:
    os.waitpid(k, 0)
"#,
    );
    cg.attach(p.pid()).expect("moving our own child in");
    p.say("go");
    let line = p.line();
    // The parent is one of the 8: 7 forks succeed, the 8th fails with EAGAIN.
    assert_eq!(line, "7 EAGAIN", "forks that succeeded, and the error of the first that did not");
    assert!(p.wait().success());
    let usage = cg.usage().expect("usage");
    assert!(usage.pids_refused.is_some_and(|n| n >= 1), "pids.events max: {usage:?}");
}

#[test]
fn memory_max_is_written_read_back_and_enforced_inside_the_vps_only() {
    let Some(root) = vm_root("memory_max_is_written_read_back_and_enforced_inside_the_vps_only") else { return };
    let limits = Limits { memory_max: Some(32 << 20), cpu_max_percent: Some(50), ..Limits::default() };
    let cg = root.create("memory", VpsId(6), &limits).expect("a cgroup with memory.max and cpu.max");
    let _cleanup = Removed(&cg);
    assert_eq!(cg.limits().expect("reading limits"), limits);
    let raw = std::fs::read_to_string(cg.path().join("memory.max")).expect("memory.max");
    assert_eq!(raw.trim(), (32u64 << 20).to_string());
    let raw = std::fs::read_to_string(cg.path().join("cpu.max")).expect("cpu.max");
    assert_eq!(raw.trim(), "50000 100000");
    // 8 MiB fit; then 96 MiB, touched page by page, cannot (the VM has no swap).
    let mut p = Proc::spawn(
        PYTHON,
        r#"
import sys
sys.stdin.readline()
small = b"x" * (8 << 20)
print("small ok", flush=True)
big = b"y" * (96 << 20)
print("big ok", flush=True)
"#,
    );
    cg.attach(p.pid()).expect("moving our own child in");
    p.say("go");
    assert_eq!(p.line(), "small ok");
    let status = p.wait();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the OOM killer ends the process that went over memory.max: {status}"
    );
    let usage = cg.usage().expect("usage");
    assert!(usage.oom_kills.is_some_and(|n| n >= 1), "memory.events oom_kill: {usage:?}");
    if let Some(peak) = usage.memory_peak {
        assert!(peak <= 32 << 20, "memory.peak {peak} over memory.max");
        assert!(peak >= 8 << 20, "memory.peak {peak}: the 8 MiB were not counted");
    }
}

#[test]
fn a_root_with_processes_of_its_own_cannot_limit_and_says_why() {
    let Some(default_root) = vm_root("a_root_with_processes_of_its_own_cannot_limit_and_says_why") else { return };
    // The default root enables memory and pids in the VM's root cgroup, so the tree below is
    // offered them.
    default_root.ensure(&[Controller::Memory, Controller::Pids]).expect("memory and pids for the default root");
    let Some(tree) = test_tree("internal") else { return };
    let root = CgroupRoot::at(&tree.dir).expect("a cgroup v2 root");
    assert!(root.available().expect("cgroup.controllers").iter().any(|c| c == "memory"));
    // A process in the root itself, as when vpstag runs in the cgroup it creates VPSes in.
    let p = Proc::spawn("/bin/sh", "read x");
    std::fs::write(tree.dir.join("cgroup.procs"), p.pid().to_string()).expect("moving our child into the tree");
    // memory is a domain controller: refused. (pids and cpu are threaded controllers, which the
    // kernel lets a cgroup with processes enable for its children.)
    let e = root.create("inner", VpsId(7), &Limits { memory_max: Some(64 << 20), ..Limits::default() }).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(matches!(e, CgroupError::ControllerUnavailable { controller: Controller::Memory, .. }), "{e:?}");
    assert!(msg.contains("holds processes of its own") && msg.contains("no internal processes"), "{msg}");
    let pids = root.create("inner", VpsId(7), &Limits { pids_max: Some(4), ..Limits::default() });
    let pids = pids.expect("pids, a threaded controller, is enabled beside processes");
    assert_eq!(pids.limits().expect("limits").pids_max, Some(4));
    drop(p);
}

// The manager with cgroups: `Manager::use_cgroups`, `spawn`, `spawn_limited`, `kill_all`, `check`.

fn manager_in(tree: &Tree) -> vpstag::Manager {
    let mgr = vpstag::Manager::with_backend(vpstag::BackendChoice::Cnproc).expect("a manager");
    mgr.use_cgroups(CgroupRoot::at(&tree.dir).expect("the test tree as a cgroup root"));
    mgr
}

#[test]
fn a_spawned_vps_lives_in_its_cgroup_counts_its_dead_and_is_killed_through_it() {
    let Some(tree) = test_tree("mgr-spawn") else { return };
    let mgr = manager_in(&tree);
    // A child burns 0.2 s of CPU and exits; then the shell waits for a line that never comes.
    let burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.2: pass\n";
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &format!("{PYTHON} -c '{burn}'; echo burnt; read x")]).stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = mgr.spawn("job", &mut cmd).expect("spawn");
    let vps = child.vps.clone();
    let cg_dir = mgr.cgroup_path(&vps).unwrap().expect("the VPS has a cgroup");
    assert!(cg_dir.starts_with(&tree.dir), "{}", cg_dir.display());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "burnt");
    let inside: BTreeSet<i32> = pids_below(&cg_dir).into_iter().collect();
    let members: BTreeSet<i32> = mgr.members(&vps).unwrap().into_iter().map(Pid::as_raw).collect();
    assert_eq!(inside, members, "the cgroup holds exactly the VPS's members");
    let usage = mgr.cgroup_usage(&vps).unwrap().expect("figures");
    assert!(usage.cpu_usec >= 150_000, "the exited child's CPU counts: {usage:?}");
    // The VPS's own figure comes from the cgroup: the kernel's, not the lineage's.
    let u = mgr.usage(&vps).unwrap();
    assert_eq!(u.cpu_source, vpstag::CpuSource::Cgroup, "{u:?}");
    let later = mgr.cgroup_usage(&vps).unwrap().expect("figures").cpu_usec;
    let cpu_us = u.cpu.as_micros() as u64;
    assert!(
        (usage.cpu_usec..=later).contains(&cpu_us),
        "usage() {cpu_us} us, cpu.stat {} then {later} us",
        usage.cpu_usec
    );
    assert!(mgr.check().unwrap().divergences.is_empty(), "{:?}", mgr.check().unwrap());
    mgr.kill_all(&vps, DEADLINE).expect("killed");
    assert!(mgr.wait(&vps, Some(DEADLINE)).unwrap().is_some());
    wait_for("the cgroup to empty", || {
        let left = pids_below(&cg_dir);
        (left.is_empty(), format!("{left:?}"))
    });
    drop(child.stdin.take());
    mgr.forget(&vps).unwrap();
    assert!(!cg_dir.exists(), "an empty cgroup goes with its VPS: {}", cg_dir.display());
}

#[test]
fn check_reports_a_member_moved_out_of_its_cgroup() {
    let Some(tree) = test_tree("mgr-check") else { return };
    let elsewhere = tree.sub("elsewhere");
    let mgr = manager_in(&tree);
    let vps = mgr.start("job", Command::new("/bin/sh").args(["-c", "sleep 600 & wait"])).expect("start");
    wait_for("the sleep to be a member", || {
        let m = mgr.members(&vps).unwrap();
        (m.len() == 3, format!("{m:?}"))
    });
    let members = mgr.members(&vps).unwrap();
    let moved = *members.last().unwrap();
    std::fs::write(elsewhere.join("cgroup.procs"), moved.to_string()).expect("move a member out");
    let report = mgr.check().unwrap();
    assert!(
        report.divergences.iter().any(|d| matches!(d, vpstag::Divergence::OutOfCgroup { pid, .. } if *pid == moved)),
        "{report:?}"
    );
    mgr.kill_all(&vps, DEADLINE).expect("killed");
}

#[test]
fn a_limit_this_host_cannot_apply_is_refused_before_anything_runs() {
    let Some(tree) = test_tree("mgr-limit") else { return };
    if in_vm() {
        println!("SKIP: in the VM the controllers exist; pids_max_stops_the_fork_beyond_it tests them");
        return;
    }
    let mgr = manager_in(&tree);
    let marker = std::env::temp_dir().join(format!("vpstag-limit-marker-{}", std::process::id()));
    let mut cmd = Command::new("/bin/touch");
    cmd.arg(&marker);
    let limits = Limits { pids_max: Some(8), ..Limits::default() };
    match mgr.spawn_limited("limited", &mut cmd, &limits) {
        Err(vpstag::Error::Cgroup(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("pids") && msg.contains("cgroup"), "{msg}");
        }
        other => panic!("expected a cgroup refusal, got {other:?}"),
    }
    assert!(!marker.exists(), "the command ran although its limit was refused");
    assert!(matches!(mgr.vps("limited"), Err(vpstag::Error::UnknownVps(_))));
    let left: Vec<_> = std::fs::read_dir(&tree.dir).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert!(left.is_empty(), "no cgroup left behind: {left:?}");
}
