//! Runs every shape of `vpstag-scenario` directly (no tracker) and checks, in `/proc`, that the
//! tree it reports is the tree that exists; then kills everything by pid and checks nothing is
//! left. Linux only (it reads `/proc`).
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vpstag_platform_tests::{live_descendants_of, stamp_all, Cleanup, Report, Stat};

const SCENARIO: &str = env!("CARGO_BIN_EXE_vpstag-scenario");
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn report_path(shape: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("vpstag-shapes-{}-{shape}-{n}.report", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A running scenario: its guard, its report and its top pid.
struct Run {
    guard: Cleanup,
    report: Report,
    top: i32,
    path: PathBuf,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        let path = report_path(args[0]);
        let child = Command::new(SCENARIO)
            .args(args)
            .arg("--report")
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vpstag-scenario");
        let top = child.id() as i32;
        let mut guard = Cleanup::new();
        guard.add_child(child);
        guard.add_file(&path);
        let report = match Report::wait_ready(&path, READY_TIMEOUT) {
            Ok(r) => r,
            Err(e) => panic!("{args:?}: {e}"),
        };
        // Everything reported is stamped at once, so clean-up never hits a recycled pid.
        guard.add(report.pids());
        let run = Run { guard, report, top, path };
        assert!(run.report.failed.is_empty(), "{args:?} failed: {:?}", run.report.failed);
        assert_eq!(run.report.ready, Some(run.report.live.len()), "READY must count every live line: {:?}", run.report);
        run
    }

    fn pid(&self, role: &str) -> i32 {
        self.report.pid_of(role).unwrap_or_else(|| panic!("no {role} in {:?}", self.report))
    }

    fn stat(&self, role: &str) -> Stat {
        let pid = self.pid(role);
        Stat::of(pid).unwrap_or_else(|| panic!("{role} ({pid}) is gone"))
    }

    fn skipped(&self, shape: &str) -> bool {
        if let Some((_, why)) = self.report.skipped.iter().find(|(s, _)| s == shape) {
            eprintln!("{shape} skipped: {why}");
            true
        } else {
            false
        }
    }

    /// Every reported process is alive, then kill all by pid and check nothing is left.
    fn check_alive_then_clean_up(mut self) {
        for (pid, role) in &self.report.live {
            let st = Stat::of(*pid).unwrap_or_else(|| panic!("{role} ({pid}) is gone"));
            assert!(st.is_live(), "{role} ({pid}) is not alive: {st:?}");
        }
        let mut all = self.report.pids();
        all.extend(live_descendants_of(self.top));
        all.push(self.top);
        let stamps = stamp_all(all);
        let left = self.guard.kill_all(Duration::from_secs(10));
        assert!(left.is_empty(), "still alive after clean-up: {left:?}");
        assert!(stamps.iter().all(|s| !s.is_live()), "a stamped process survived: {stamps:?}");
        assert!(live_descendants_of(self.top).is_empty());
        let _ = std::fs::remove_file(&self.path);
    }
}

fn nspid(pid: i32) -> Vec<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

fn me() -> i32 {
    std::process::id() as i32
}

#[test]
fn fork_chain_generations_are_parent_and_child() {
    let run = Run::start(&["fork-chain"]);
    assert_eq!(run.report.live.len(), 6);
    let mut parent = run.top;
    for g in 1..=5 {
        let st = run.stat(&format!("fork-chain/{g}"));
        assert_eq!(st.ppid, parent, "generation {g}");
        parent = st.pid;
    }
    assert_eq!(run.pid("fork-chain/top"), run.top);
    run.check_alive_then_clean_up();
}

#[test]
fn vfork_exec_runs_sleep_as_a_child() {
    let run = Run::start(&["vfork-exec"]);
    let st = run.stat("vfork-exec/sleep");
    assert_eq!((st.comm.as_str(), st.ppid), ("sleep", run.top));
    run.check_alive_then_clean_up();
}

#[test]
fn posix_spawn_runs_sleep_as_a_child() {
    let run = Run::start(&["posix-spawn"]);
    let st = run.stat("posix-spawn/sleep");
    assert_eq!((st.comm.as_str(), st.ppid), ("sleep", run.top));
    run.check_alive_then_clean_up();
}

#[test]
fn fork_from_thread_child_belongs_to_the_process() {
    let run = Run::start(&["fork-from-thread"]);
    let st = run.stat("fork-from-thread/child");
    assert_eq!(st.ppid, run.top);
    assert_eq!(st.num_threads, 1);
    run.check_alive_then_clean_up();
}

#[test]
fn double_fork_setsid_daemon_is_orphaned_in_its_own_session() {
    let run = Run::start(&["double-fork-setsid"]);
    let daemon = run.stat("double-fork-setsid/daemon");
    let top = Stat::of(run.top).unwrap();
    assert_ne!(daemon.ppid, run.top, "re-parented away from the top");
    assert_ne!(daemon.session, top.session, "in the middle's new session");
    assert_eq!(daemon.pgrp, daemon.session, "the middle led both");
    assert_ne!(daemon.session, daemon.pid, "the daemon did not call setsid itself");
    assert!(!live_descendants_of(run.top).contains(&daemon.pid));
    run.check_alive_then_clean_up();
}

#[test]
fn clone_parent_sibling_is_a_child_of_the_scenarios_parent() {
    let run = Run::start(&["clone-parent"]);
    if run.skipped("clone-parent") {
        return run.check_alive_then_clean_up();
    }
    let st = run.stat("clone-parent/sibling");
    assert_eq!(st.ppid, Stat::of(run.top).unwrap().ppid);
    assert_eq!(st.ppid, me(), "this test started the scenario, so the sibling is ours");
    run.check_alive_then_clean_up();
}

#[test]
fn clone3_child_is_a_plain_child() {
    let run = Run::start(&["clone3"]);
    if run.skipped("clone3") {
        return run.check_alive_then_clean_up();
    }
    assert_eq!(run.stat("clone3/child").ppid, run.top);
    run.check_alive_then_clean_up();
}

#[test]
fn pthread_exit_main_leaves_a_zombie_leader_with_live_threads() {
    let run = Run::start(&["pthread-exit-main"]);
    let process = run.stat("pthread-exit-main/process");
    assert_eq!(process.state, 'Z', "{process:?}");
    assert!(process.num_threads > 1, "{process:?}");
    assert_eq!(process.ppid, run.top);
    let child = run.stat("pthread-exit-main/child");
    assert_eq!(child.ppid, process.pid, "the worker's child counts as the process's child");
    assert!(live_descendants_of(run.top).contains(&process.pid));
    run.check_alive_then_clean_up();
}

#[test]
fn exec_from_thread_process_is_now_sleep() {
    let run = Run::start(&["exec-from-thread"]);
    let st = run.stat("exec-from-thread/sleep");
    assert_eq!(st.comm, "sleep");
    assert_eq!(st.ppid, run.top);
    assert_eq!(st.num_threads, 1, "exec leaves one thread");
    let exe = std::fs::read_link(format!("/proc/{}/exe", st.pid)).unwrap();
    assert!(exe.to_string_lossy().ends_with("/sleep"), "{exe:?}");
    run.check_alive_then_clean_up();
}

#[test]
fn pid_namespace_init_and_child_have_two_level_pids() {
    let run = Run::start(&["pid-namespace"]);
    if run.skipped("pid-namespace") {
        return run.check_alive_then_clean_up();
    }
    let init = run.stat("pid-namespace/init");
    let child = run.stat("pid-namespace/child");
    assert_eq!(nspid(init.pid), vec![init.pid, 1]);
    let ns = nspid(child.pid);
    assert_eq!(ns.len(), 2, "{ns:?}");
    assert_eq!(ns[0], child.pid);
    assert_eq!(init.ppid, run.top);
    assert_eq!(child.ppid, init.pid);
    run.check_alive_then_clean_up();
}

#[test]
fn relay_last_generation_is_orphaned() {
    let run = Run::start(&["relay"]);
    let last = run.stat("relay/50");
    assert_ne!(last.ppid, run.top);
    assert!(!live_descendants_of(run.top).contains(&last.pid));
    run.check_alive_then_clean_up();
}

#[test]
fn orphan_reparent_children_share_a_new_parent() {
    let run = Run::start(&["orphan-reparent"]);
    let a = run.stat("orphan-reparent/orphan1");
    let b = run.stat("orphan-reparent/orphan2");
    assert_ne!(a.ppid, run.top);
    assert_eq!(a.ppid, b.ppid, "both adopted by the same reaper");
    run.check_alive_then_clean_up();
}

#[test]
fn nested_subreaper_adopts_the_great_grandchild() {
    let run = Run::start(&["nested-subreaper"]);
    let reaper = run.stat("nested-subreaper/subreaper");
    let adopted = run.stat("nested-subreaper/adopted");
    assert_eq!(reaper.ppid, run.top);
    assert_eq!(adopted.ppid, reaper.pid);
    run.check_alive_then_clean_up();
}

#[test]
fn churn_leaves_only_the_top() {
    let run = Run::start(&["churn", "--count", "2000"]);
    assert_eq!(run.report.live, vec![(run.top, "churn/top".to_string())]);
    assert!(live_descendants_of(run.top).is_empty());
    run.check_alive_then_clean_up();
}

/// Shapes whose survivors `all` leaves re-parented away from its tree (to init, since this test
/// is no subreaper).
const ORPHANED_ROLES: &[&str] =
    &["double-fork-setsid/daemon", "relay/50", "orphan-reparent/orphan1", "orphan-reparent/orphan2"];

#[test]
fn all_shapes_under_one_top() {
    let run = Run::start(&["all"]);
    let shapes: BTreeSet<&str> =
        run.report.live.iter().filter_map(|(_, r)| r.split_once('/')).map(|(s, _)| s).collect();
    for shape in [
        "fork-chain",
        "vfork-exec",
        "posix-spawn",
        "fork-from-thread",
        "double-fork-setsid",
        "clone-parent",
        "clone3",
        "pthread-exit-main",
        "exec-from-thread",
        "pid-namespace",
        "relay",
        "orphan-reparent",
        "nested-subreaper",
    ] {
        assert!(shapes.contains(shape) || run.skipped(shape), "{shape} missing: {:?}", run.report);
        if shapes.contains(shape) {
            assert!(run.report.pid_of(&format!("{shape}/runner")).is_some(), "{shape} has no runner line");
        }
    }
    assert_eq!(run.pid("all/top"), run.top);
    // The clone-parent sibling is the top's child here: its caller was the shape's runner.
    if let Some(sib) = run.report.pid_of("clone-parent/sibling") {
        assert_eq!(Stat::of(sib).unwrap().ppid, run.top);
    }
    // /proc's tree under the top is exactly the report minus the orphans.
    let reported: BTreeSet<i32> = run.report.pids().into_iter().collect();
    let orphans: BTreeSet<i32> = ORPHANED_ROLES.iter().filter_map(|r| run.report.pid_of(r)).collect();
    let descendants: BTreeSet<i32> = live_descendants_of(run.top).into_iter().collect();
    let mut expected = &reported - &orphans;
    expected.remove(&run.top);
    assert_eq!(descendants, expected);
    run.check_alive_then_clean_up();
}
