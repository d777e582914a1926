//! The daemon with cgroups (`vpstag daemon --cgroup-root`, `vpstag start --pids-max ...`): a VPS
//! lives in a cgroup of its own, `check` compares that cgroup with the tag table (also after a
//! daemon restart), `stop` ends the VPS and removes its cgroup, and a limit the host cannot apply
//! is refused before anything of the VPS runs.
//!
//! Each test gives its daemon a root of its own, `vpstag-clitest-PID-NAME` below this process's
//! cgroup on the cgroup2 mount (/sys/fs/cgroup/unified on the development machine's hybrid
//! layout), which a guard empties and removes at the end, failed or not. Needs root and a cgroup2
//! mount (skips, saying why, otherwise). Linux only.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

#[path = "../../tests/support/cgroup_tree.rs"]
mod cgroup_tree;

use cgroup_tree::{pids_in, subdirs, Tree};

/// The test's cgroup subtree, `vpstag-clitest-PID-NAME`; `None` (saying why) without root, the
/// proc connector or a cgroup2 mount.
fn test_tree(name: &str) -> Option<Tree> {
    if !is_root() || !cnproc_available() {
        return None;
    }
    Tree::create("vpstag-clitest", name).map_err(|why| eprintln!("skipping: {why}")).ok()
}

/// A daemon (cnproc) with the given extra arguments, on a temporary socket and state directory.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
    /// Processes the test started or saw as members, killed by pid at the end.
    seen: std::cell::RefCell<Vec<(i32, u64)>>,
}

impl Daemon {
    fn new(tag: &str, extra: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vpstag-cgtest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let socket = dir.join("vpstag.sock");
        let mut d = Daemon { child: Daemon::spawn(&dir, &socket, extra), dir, socket, seen: Default::default() };
        d.wait_ready();
        d
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("creating the daemon's log");
        Command::new(BIN)
            .args(["daemon", "--backend", "cnproc", "--socket"])
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon")
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + DEADLINE;
        while !daemon_answers(&self.socket) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the daemon exited ({st}) at start:\n{}", self.log());
            }
            assert!(Instant::now() < end, "the daemon did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon (SIGTERM; the VPSes keep running) and starts it again on the same state.
    fn restart(&mut self, extra: &[&str]) {
        kill(self.child.id() as i32, libc::SIGTERM);
        let end = Instant::now() + DEADLINE;
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < end, "the daemon did not stop on SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Daemon::spawn(&self.dir, &self.socket, extra);
        self.wait_ready();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> Output {
        vpstag(&self.socket, args).output().expect("running vpstag")
    }

    /// `ps --json NAME`: the members' pids (recorded for the clean-up).
    fn members(&self, name: &str) -> Vec<i32> {
        let out = self.run(&["ps", "--json", name]);
        assert!(out.status.success(), "ps {name}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("ps --json prints JSON");
        let mut pids = Vec::new();
        for p in v.as_array().expect("ps --json prints an array") {
            let pid = p["pid"].as_i64().expect("a pid") as i32;
            self.seen.borrow_mut().push((pid, p["start"].as_u64().unwrap_or(0)));
            pids.push(pid);
        }
        pids.sort_unstable();
        pids
    }

    /// `check --json`'s divergences.
    fn divergences(&self) -> Vec<Value> {
        let out = self.run(&["check", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("check --json prints JSON ({e}): {}\n{}", text(&out.stderr), self.log()));
        let divs = v["divergences"].as_array().cloned().unwrap_or_default();
        // Exit status 1 when something diverges, 0 when nothing does.
        assert_eq!(out.status.code(), Some(if divs.is_empty() { 0 } else { 1 }), "check's status: {v}");
        divs
    }

    fn names(&self) -> Vec<String> {
        let out = self.run(&["list", "--json"]);
        assert!(out.status.success(), "list: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
        v.as_array().into_iter().flatten().filter_map(|x| x["name"].as_str().map(String::from)).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for (pid, start) in self.seen.borrow().iter() {
            if *start != 0 && start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        kill(self.child.id() as i32, libc::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process the test starts outside any VPS; killed by pid and reaped on drop.
struct Stranger(Child);

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_vps_lives_in_its_cgroup_check_compares_it_also_after_a_restart_and_stop_removes_it() {
    let Some(tree) = test_tree("life") else { return };
    let root = tree.dir.to_str().expect("a UTF-8 cgroup path").to_string();
    let mut d = Daemon::new("life", &["--cgroup-root", &root]);
    // Two children, one of them setsid'd and orphaned: all must be in the VPS's cgroup.
    let out = d.run(&["start", "web", "--", "sh", "-c", "sleep 300 & setsid sh -c 'sleep 300 &' ; sleep 300"]);
    assert!(out.status.success(), "start: {}\n{}", text(&out.stderr), d.log());
    let first: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
    d.seen.borrow_mut().push((first, start_time(first)));
    let cgs = subdirs(&tree.dir);
    assert_eq!(cgs.len(), 1, "one cgroup for the one VPS below {root}: {cgs:?}");
    let cg = cgs[0].clone();
    let mut members = Vec::new();
    wait_until("the VPS's 4 processes (init, sh, 3 sleeps less the exited setsid sh) to be tagged", DEADLINE, || {
        members = d.members("web");
        members.len() >= 5
    });
    wait_until("every member to be in the VPS's cgroup", DEADLINE, || {
        let mut inside = pids_in(&cg);
        inside.sort_unstable();
        members = d.members("web");
        inside == members
    });
    assert!(pids_in(&tree.dir).is_empty(), "nothing in the root itself");
    assert_eq!(d.divergences(), Vec::<Value>::new(), "no divergence while everything is in place");

    // A member moved out of its cgroup, and a stranger moved in: both are divergences.
    let elsewhere = tree.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("creating a sibling cgroup");
    let moved = *members.last().expect("members");
    std::fs::write(elsewhere.join("cgroup.procs"), moved.to_string()).expect("moving a member out");
    let stranger = Stranger(Command::new("sleep").arg("300").spawn().expect("starting a stranger"));
    let sp = stranger.0.id() as i32;
    std::fs::write(cg.join("cgroup.procs"), sp.to_string()).expect("moving a stranger in");
    let expect = |divs: &[Value]| {
        let has = |kind: &str, pid: i32| {
            divs.iter().any(|x| x["kind"] == kind && x["pid"].as_i64() == Some(pid as i64) && x["vps"] == "web")
        };
        assert!(has("out_of_cgroup", moved), "member {moved} moved out is reported: {divs:?}");
        assert!(has("in_cgroup_untagged", sp), "stranger {sp} moved in is reported: {divs:?}");
    };
    expect(&d.divergences());

    // After a restart the daemon knows the VPS's cgroup again (from its journal).
    d.restart(&[]);
    expect(&d.divergences());
    std::fs::write(tree.dir.join("cgroup.procs"), sp.to_string()).expect("moving the stranger out again");
    drop(stranger);

    let out = d.run(&["stop", "--grace", "5", "web"]);
    assert!(out.status.success(), "stop: {}\n{}", text(&out.stderr), d.log());
    for &p in &members {
        if p != moved {
            wait_until(&format!("member {p} to be gone after stop"), DEADLINE, || !alive(p));
        }
    }
    wait_until("the VPS's cgroup to be removed after stop", DEADLINE, || !cg.exists());
}

#[test]
fn a_limit_is_applied_or_refused_before_anything_of_the_vps_runs() {
    let Some(tree) = test_tree("limit") else { return };
    let root = tree.dir.to_str().expect("a UTF-8 cgroup path").to_string();
    let d = Daemon::new("limit", &["--cgroup-root", &root]);
    let mark = d.dir.join("ran");
    let script = format!("touch {}; exec sleep 300", mark.display());
    let out = d.run(&["start", "lim", "--pids-max", "8", "--json", "--", "sh", "-c", &script]);
    let controllers = std::fs::read_to_string(tree.dir.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "pids") {
        // A host that delegates the pids controller: the limit holds.
        assert!(out.status.success(), "start --pids-max 8: {}\n{}", text(&out.stderr), d.log());
        let v: Value = serde_json::from_slice(&out.stdout).expect("start --json prints JSON");
        let pid = v["pid"].as_i64().expect("a pid") as i32;
        d.seen.borrow_mut().push((pid, start_time(pid)));
        let cg = subdirs(&tree.dir).pop().expect("the VPS's cgroup");
        assert_eq!(std::fs::read_to_string(cg.join("pids.max")).unwrap_or_default().trim(), "8");
        return;
    }
    // This host cannot apply it (on the hybrid development machine pids is bound to cgroup v1).
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "start with a limit this host cannot apply fails: {err}");
    assert!(
        err.contains("limit_refused") && err.contains("cgroup v2") && err.contains("pids"),
        "a clear refusal: {err}"
    );
    assert!(!mark.exists(), "the command did not run");
    assert!(!d.names().contains(&"lim".to_string()), "no VPS is left registered: {:?}", d.names());
    assert!(subdirs(&tree.dir).is_empty(), "no cgroup left behind: {:?}", subdirs(&tree.dir));

    // The same daemon still starts a VPS without limits (in a cgroup of its own).
    let out = d.run(&["start", "plain", "--", "sleep", "300"]);
    assert!(out.status.success(), "start without limits: {}\n{}", text(&out.stderr), d.log());
    let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
    d.seen.borrow_mut().push((pid, start_time(pid)));
    assert_eq!(subdirs(&tree.dir).len(), 1, "one cgroup for the VPS without limits");
}

#[test]
fn a_daemon_without_cgroups_refuses_limits_clearly() {
    if !is_root() || !cnproc_available() {
        return;
    }
    let d = Daemon::new("nocg", &["--cgroup-root", "none"]);
    let mark = d.dir.join("ran");
    let script = format!("touch {}; exec sleep 300", mark.display());
    let out = d.run(&["start", "lim", "--memory-max", "64M", "--", "sh", "-c", &script]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "refused: {err}");
    assert!(err.contains("limit_refused") && err.contains("--cgroup-root none"), "says why: {err}");
    assert!(!mark.exists(), "the command did not run");
    assert!(d.names().is_empty(), "nothing registered: {:?}", d.names());
    // Bad values are refused by the command line itself.
    for bad in [["--memory-max", "0"], ["--memory-max", "12Q"], ["--pids-max", "0"], ["--cpu-max", "-5"]] {
        let out = d.run(&["start", "x", bad[0], bad[1], "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{bad:?} is a usage error: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(bad[0]), "{bad:?}: the error names the option: {}", text(&out.stderr));
    }
}

/// Inside the kernel-matrix VM only (`VPSTAG_IN_VM=1`, set by platform-tests/run-kernels), whose
/// root cgroup lends its controllers: `vpstag start --pids-max 8` through a daemon with the
/// default cgroup setting (a cgroup only for a VPS with limits, below `vpstag/` in the daemon's own
/// cgroup) stops the fork that would make a ninth process.
#[test]
fn pids_max_from_the_cli_stops_the_ninth_process_in_the_vm() {
    if std::env::var_os("VPSTAG_IN_VM").is_none_or(|v| v != "1") {
        println!(
            "SKIP: runs inside the kernel-matrix VM only (platform-tests/run-kernels sets VPSTAG_IN_VM=1), where \
             the daemon may enable controllers in the root cgroup"
        );
        return;
    }
    if !is_root() || !cnproc_available() {
        panic!("the VM runs this as root with the proc connector");
    }
    let d = Daemon::new("pids", &[]);
    let out_file = d.dir.join("out");
    // The first process (the VPS's init) and python are 2 of the 8: python's 7th fork fails.
    let script = r#"
import os, errno
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
"#;
    let out = d.run(&[
        "start",
        "forks",
        "--pids-max",
        "8",
        "--output",
        out_file.to_str().expect("a UTF-8 path"),
        "--",
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "start --pids-max 8: {}\n{}", text(&out.stderr), d.log());
    let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
    d.seen.borrow_mut().push((pid, start_time(pid)));
    let mut said = String::new();
    wait_until("the VPS to say how many forks succeeded", DEADLINE, || {
        said = std::fs::read_to_string(&out_file).unwrap_or_default();
        said.ends_with('\n')
    });
    assert_eq!(said.trim(), "6 EAGAIN", "forks that succeeded in a VPS of at most 8 processes, and the error");
}
