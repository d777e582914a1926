//! `Manager::usage` counts the CPU of processes that have exited, under every backend, with real
//! processes: a child reaped by its parent, a setsid-orphaned grandchild reaped by the first
//! process (the VPS's subreaper), and the first process reaped by the manager (or, under ptrace,
//! by the backend). What the processes burned is measured by themselves (`getrusage`), never from
//! wall time: on a busy machine wall time says nothing about CPU time.
#![cfg(target_os = "linux")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vpstag::{BackendChoice, CpuSource, Manager, Vps};

/// The backends this machine has; eBPF when built with it and allowed to load it.
fn managers() -> Vec<(BackendChoice, Manager)> {
    let mut v = vec![BackendChoice::Cnproc, BackendChoice::Ptrace];
    if cfg!(feature = "ebpf") {
        v.push(BackendChoice::Ebpf);
    }
    v.into_iter()
        .filter_map(|b| match Manager::with_backend(b) {
            Ok(m) => Some((b, m)),
            // Loading the eBPF program needs privileges (CAP_BPF and CAP_PERFMON, or root).
            Err(e) if b == BackendChoice::Ebpf => {
                eprintln!("SKIPPED under {b:?}: {e}");
                None
            }
            Err(e) => panic!("{b:?}: {e}"),
        })
        .collect()
}

const PY: &str = "/usr/bin/python3";

/// What every script below begins with: `cpu(who)`, the seconds of CPU (user + system) of this
/// process or of its waited-for children, and `burn(secs)`, which spins until this process has
/// used `secs` of CPU.
const PRELUDE: &str = r#"
import os, resource, signal, sys, time
def cpu(who=resource.RUSAGE_SELF):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
def burn(secs):
    x = 0
    while cpu() < secs:
        for i in range(20000):
            x += i
"#;

/// `python3 -c` running `script` after [`PRELUDE`].
fn python(script: &str) -> Command {
    let mut c = Command::new(PY);
    c.arg("-c").arg(format!("{PRELUDE}{script}"));
    c
}

/// The VPS's command: a child that burns ~1 s and is reaped by the command; a child that calls
/// setsid, forks a grandchild and exits at once, so that the grandchild (which burns ~1 s) is
/// re-parented to the VPS's first process and reaped by it. The command waits until the
/// grandchild has been reaped (its /proc entry gone), then prints what was burned: its own time
/// and its waited-for children's (`getrusage`), and the grandchild's own.
const BURN: &str = r#"
pid = os.fork()
if pid == 0:
    burn(1.0)
    os._exit(0)
os.waitpid(pid, 0)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        burn(1.0)
        os.write(w, ("%d %.6f\n" % (os.getpid(), cpu(resource.RUSAGE_SELF))).encode())
        os._exit(0)
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
data = b""
while True:
    b = os.read(r, 100)
    if not b:
        break
    data += b
gpid, gcpu = data.split()
t = time.monotonic()
while os.path.exists("/proc/%d" % int(gpid)) and time.monotonic() - t < 60:
    time.sleep(0.01)
print("%.6f %.6f" % (cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN), float(gcpu)), flush=True)
"#;

/// Waits until `vps` has ended (first process gone, no member left), calling `usage` every few
/// milliseconds meanwhile; fails if a figure is lower than the one before. The figures seen.
fn follow_to_the_end(b: BackendChoice, mgr: &Manager, vps: &Vps) -> Vec<Duration> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen: Vec<Duration> = Vec::new();
    let mut after_end = 0;
    while after_end < 5 {
        let u = mgr.usage(vps).unwrap_or_else(|e| panic!("{b:?}: usage: {e}"));
        if let Some(last) = seen.last() {
            assert!(u.cpu >= *last, "{b:?}: the CPU figure went back from {last:?} to {:?}", u.cpu);
        }
        seen.push(u.cpu);
        if !mgr.is_running(vps).unwrap() && mgr.members(vps).unwrap().is_empty() {
            after_end += 1;
        }
        assert!(Instant::now() < deadline, "{b:?}: the VPS did not end within 120 s; figures {seen:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

/// What the command printed: the seconds it and its children burned, and its grandchild's.
fn burned(b: BackendChoice, child: &mut vpstag::VpsChild) -> (f64, f64) {
    let mut out = String::new();
    child.stdout.take().expect("piped stdout").read_to_string(&mut out).expect("the command's output");
    let v: Vec<f64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(v.len(), 2, "{b:?}: the command printed {out:?}");
    (v[0], v[1])
}

/// Two VPSes run the same command at once: one is watched all along (`usage` every few
/// milliseconds, which must never go back), the other is not looked at until everything of it
/// has ended, so its figure can only come from what the exited processes left (the waited-for
/// times, the first process's rusage): no sample of a live member can stand in for them.
#[test]
fn cpu_of_exited_children_and_reaped_orphans_is_counted_and_never_goes_back() {
    let mut failures = Vec::new();
    for (b, mgr) in managers() {
        let spawn = |what: &str| {
            let name = format!("{what}-{b:?}").to_lowercase();
            mgr.spawn(&name, python(BURN).stdout(Stdio::piped())).unwrap_or_else(|e| panic!("{b:?}: spawn: {e}"))
        };
        let mut watched = spawn("watched");
        let mut unseen = spawn("unseen");
        let seen = follow_to_the_end(b, &mgr, &watched.vps);
        mgr.wait(&unseen.vps, Some(Duration::from_secs(120))).unwrap().expect("the unseen VPS ended");
        assert!(mgr.wait_empty(&unseen.vps, Some(Duration::from_secs(60))).unwrap(), "{b:?}: members left");
        for (what, child, seen) in [("watched", &mut watched, Some(seen)), ("unseen", &mut unseen, None)] {
            let (own, grandchild) = burned(b, child);
            let expected = own + grandchild;
            assert!(expected >= 1.9, "{b:?}: the processes burned only {expected} s");
            let u = mgr.usage(&child.vps).unwrap();
            assert_eq!(u.cpu_source, CpuSource::Lineage);
            assert_eq!(u.processes, 0);
            assert!(u.forks >= 3, "{b:?}: {} forks seen", u.forks);
            let got = u.cpu.as_secs_f64();
            let line = format!(
                "{b:?}, {what}: usage().cpu {got:.3} s, the processes burned {expected:.3} s (command and its \
                 children {own:.3}, grandchild {grandchild:.3}); figures while it ran: {:?}",
                seen.map(|s| (s.len(), s.first().copied(), s.last().copied()))
            );
            eprintln!("{line}");
            if (got - expected).abs() > 0.1 * expected {
                failures.push(line);
            }
        }
    }
    assert!(failures.is_empty(), "not within 10%:\n{}", failures.join("\n"));
}

#[test]
fn an_idle_vps_stays_near_zero() {
    for (b, mgr) in managers() {
        let name = format!("idle-{b:?}").to_lowercase();
        let vps = mgr
            .start(&name, Command::new("/bin/sh").args(["-c", "sleep 0.3; sleep 0.3 & wait"]))
            .unwrap_or_else(|e| panic!("{b:?}: start: {e}"));
        let seen = follow_to_the_end(b, &mgr, &vps);
        let u = mgr.usage(&vps).unwrap();
        assert!(u.cpu < Duration::from_millis(150), "{b:?}: an idle VPS used {:?} (figures {seen:?})", u.cpu);
    }
}

/// Kills and reaps a helper process the test started (by pid, through its `Child`) when the
/// test ends, whatever happened.
struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The seconds a VPS's processes reported burning, one figure per line of `out`, summed.
fn reported(b: BackendChoice, out: &str, lines: usize) -> f64 {
    let v: Vec<f64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(v.len(), lines, "{b:?}: the processes printed {out:?}");
    v.iter().sum()
}

/// The VPS's command ignores SIGCHLD, so the kernel reaps its child itself (auto-reap) and adds
/// the child's time to nobody. The child burns 0.3 s and prints it; the command waits until the
/// child is gone, then prints its own time.
const AUTO_REAP: &str = r#"
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    burn(0.3)
    print("%.6f" % cpu(), flush=True)
    os._exit(0)
t = time.monotonic()
while os.path.exists("/proc/%d" % pid) and time.monotonic() - t < 60:
    time.sleep(0.01)
print("%.6f" % cpu(), flush=True)
"#;

/// A child auto-reaped because its parent ignores SIGCHLD: under ptrace its time comes with its
/// reap by the tracer, under eBPF from the kernel at its exit tracepoint, and counted (within 10%); cnproc
/// loses it (a hole `Manager::usage` documents) unless a call of `usage` happened to sample it
/// while it ran, and none does here.
#[test]
fn cpu_of_a_child_auto_reaped_by_a_parent_that_ignores_sigchld() {
    for (b, mgr) in managers() {
        let name = format!("autoreap-{b:?}").to_lowercase();
        let mut child =
            mgr.spawn(&name, python(AUTO_REAP).stdout(Stdio::piped())).unwrap_or_else(|e| panic!("{b:?}: spawn: {e}"));
        mgr.wait(&child.vps, Some(Duration::from_secs(120))).unwrap().expect("the VPS ended");
        assert!(mgr.wait_empty(&child.vps, Some(Duration::from_secs(60))).unwrap(), "{b:?}: members left");
        let mut out = String::new();
        child.stdout.take().expect("piped stdout").read_to_string(&mut out).expect("the output");
        let expected = reported(b, &out, 2);
        assert!(expected >= 0.3, "{b:?}: the processes burned only {expected} s");
        let got = mgr.usage(&child.vps).unwrap().cpu.as_secs_f64();
        eprintln!("{b:?}: usage().cpu {got:.3} s, the processes burned {expected:.3} s ({out:?})");
        match b {
            BackendChoice::Ptrace | BackendChoice::Ebpf => {
                assert!(
                    (got - expected).abs() <= 0.1 * expected,
                    "{b:?}: {got:.3} s, not within 10% of {expected:.3} s"
                )
            }
            // The hole: the child's 0.3 s are nowhere once the kernel has reaped it.
            _ => assert!(
                got < expected - 0.2,
                "{b:?}: {got:.3} s of {expected:.3} s: the hole is closed, update the docs"
            ),
        }
    }
}

/// A process outside any VPS that forks the future member, registers nothing itself, and reaps
/// it as soon as it exits (it sits in `waitpid`). It prints the member's pid, waits for a line on
/// stdin, then opens the member's gate; the member burns 0.3 s and prints it.
const OUTSIDE_PARENT: &str = r#"
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)
    burn(0.3)
    print("%.6f" % cpu(), flush=True)
    os._exit(0)
os.close(r)
print(pid, flush=True)
sys.stdin.readline()
os.write(w, b"g")
os.waitpid(pid, 0)
"#;

/// A first process registered by someone else, whose parent (outside the VPS) reaps it the
/// moment it exits: under ptrace (the tracer's reap) and eBPF (its exit tracepoint) the VPS
/// keeps exactly the time read at its exit; under cnproc only what was read of it before its
/// parent collected it (here, with no call of `usage` while it ran, often nothing: the documented
/// hole).
#[test]
fn cpu_of_a_member_reaped_at_once_by_a_parent_outside_the_vps() {
    use std::io::{BufRead, BufReader, Write};
    for (b, mgr) in managers() {
        let name = format!("outside-{b:?}").to_lowercase();
        let mut helper =
            Helper(python(OUTSIDE_PARENT).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python3"));
        let mut stdout = BufReader::new(helper.0.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the member's pid");
        let pid: vpstag::Pid = line.trim().parse().unwrap_or_else(|e| panic!("{b:?}: {line:?}: {e}"));
        let vps = mgr.register_first(&name, pid).unwrap_or_else(|e| panic!("{b:?}: register_first: {e}"));
        helper.0.stdin.take().expect("piped stdin").write_all(b"go\n").expect("opening the gate");
        mgr.wait(&vps, Some(Duration::from_secs(120))).unwrap_or_else(|e| panic!("{b:?}: wait: {e}"));
        assert!(mgr.wait_empty(&vps, Some(Duration::from_secs(60))).unwrap(), "{b:?}: members left");
        let mut out = String::new();
        stdout.read_to_string(&mut out).expect("the member's output");
        let expected = reported(b, &out, 1);
        assert!(helper.0.wait().expect("the outside parent").success());
        let got = mgr.usage(&vps).unwrap().cpu.as_secs_f64();
        eprintln!("{b:?}: usage().cpu {got:.3} s, the member burned {expected:.3} s");
        if matches!(b, BackendChoice::Ptrace | BackendChoice::Ebpf) {
            assert!((got - expected).abs() <= 0.1 * expected, "{b:?}: {got:.3} s, not within 10% of {expected:.3} s");
        }
        // cnproc: the read at the exit event races with the parent's waitpid; nothing to
        // assert but that the figure is not above what was burned.
        assert!(got <= expected * 1.1, "{b:?}: {got:.3} s, above the {expected:.3} s burned");
    }
}
