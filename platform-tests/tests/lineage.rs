//! vpstag's tags checked against reality: `vpstag-scenario` builds real process trees inside
//! VPSes (and beside them, untracked), and every process must carry exactly the tag its lineage
//! gives it, on every backend this machine offers.
//!
//! Each test runs once per backend of [`BACKENDS`]; a backend that cannot be opened here is
//! skipped with a printed reason. A failure on one backend does not stop the others: the test
//! reports them all at the end. Every process a test starts is killed by pid (stamped with its
//! start time, so a recycled pid is never hit) by a [`Cleanup`] guard, on assertion failures too.
//! The tests run one at a time (a lock), so that one test's fork storm does not slow another's
//! backend.
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vpstag::{BackendChoice, Manager, Pid, Vps};
use vpstag_platform_tests::{live_descendants_of, stamp_all, Cleanup, Report, Stat};

/// eBPF runs when the `vpstag` crate is built with its `ebpf` feature (`scripts/test` does) and the
/// process may load BPF programs; otherwise it is skipped with the reason.
const BACKENDS: &[BackendChoice] = &[BackendChoice::Cnproc, BackendChoice::Ptrace, BackendChoice::Ebpf];

const SCENARIO: &str = env!("CARGO_BIN_EXE_vpstag-scenario");
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// ptrace stops the tracee at every fork: 20000 of them take a while.
const CHURN_TIMEOUT: Duration = Duration::from_secs(600);
const KILL_TIMEOUT: Duration = Duration::from_secs(15);

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `test` once per backend with a fresh manager; skips backends that cannot be opened and
/// panics at the end with every backend's failure.
fn for_each_backend(name: &str, test: impl Fn(BackendChoice, &Manager)) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    let mut ran = 0;
    for &backend in BACKENDS {
        let tracker = match vpstag::open_backend(backend) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{name}: SKIP backend {backend}: {e}");
                continue;
            }
        };
        let mgr = Manager::new(tracker).unwrap_or_else(|e| panic!("{name}: Manager::new over {backend}: {e}"));
        eprintln!("{name}: backend {backend}");
        ran += 1;
        // The manager outlives everything `test` started: its guards drop first.
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| test(backend, &mgr))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".into());
            failures.push(format!("[{backend}] {msg}"));
        }
        drop(mgr);
    }
    if ran == 0 {
        eprintln!("{name}: no backend could be opened on this machine; nothing tested");
    }
    assert!(failures.is_empty(), "{name} failed:\n{}", failures.join("\n"));
}

fn report_path(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("vpstag-lineage-{}-{what}-{n}.report", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn pid(raw: i32) -> Pid {
    Pid::new(raw).unwrap_or_else(|| panic!("not a pid: {raw}"))
}

fn scenario(args: &[&str], report: &PathBuf) -> Command {
    let mut c = Command::new(SCENARIO);
    c.args(args).arg("--report").arg(report).stdin(Stdio::null());
    c
}

/// Starts a scenario inside VPS `name`; its first process becomes a clean-up root.
fn start_in_vps(mgr: &Manager, guard: &mut Cleanup, name: &str, args: &[&str]) -> (Vps, PathBuf) {
    let report = report_path(name);
    let vps = mgr
        .start(name, &mut scenario(args, &report))
        .unwrap_or_else(|e| panic!("starting VPS {name} with {args:?}: {e}"));
    guard.add_root(vps.first.as_raw());
    guard.add_file(&report);
    (vps, report)
}

/// Starts a scenario outside any VPS.
fn start_untracked(guard: &mut Cleanup, args: &[&str]) -> PathBuf {
    let report = report_path("untracked");
    let child = scenario(args, &report).spawn().expect("start an untracked vpstag-scenario");
    guard.add_child(child);
    guard.add_file(&report);
    report
}

/// Waits for READY, records the reported pids in the guard, and checks the scenario went well.
fn ready(guard: &mut Cleanup, report: &PathBuf, timeout: Duration) -> Report {
    let r = Report::wait_ready(report, timeout).unwrap_or_else(|e| panic!("{e}"));
    guard.add(r.pids());
    assert!(r.failed.is_empty(), "scenario failures in {}: {:?}", report.display(), r.failed);
    assert_eq!(r.ready, Some(r.live.len()), "READY must count every live line: {r:?}");
    for (shape, why) in &r.skipped {
        eprintln!("  scenario skipped {shape}: {why}");
    }
    r
}

fn tag_of(mgr: &Manager, raw: i32) -> Option<String> {
    mgr.vps_of(pid(raw)).unwrap_or_else(|e| panic!("vps_of({raw}): {e}")).map(|v| v.name)
}

fn describe(raw: i32) -> String {
    match Stat::of(raw) {
        Some(s) => format!(
            "{raw} ({} state {} ppid {} threads {} start {})",
            s.comm, s.state, s.ppid, s.num_threads, s.start_ticks
        ),
        None => format!("{raw} (gone)"),
    }
}

/// Every reported process carries `want` (a VPS name, or no tag).
fn check_tags(mgr: &Manager, report: &Report, want: Option<&str>, errors: &mut Vec<String>) {
    for (p, role) in &report.live {
        let got = tag_of(mgr, *p);
        if got.as_deref() != want {
            errors.push(format!("{role} {}: tag {got:?}, want {want:?}", describe(*p)));
        }
    }
}

/// Every live descendant of the VPS's first process per /proc carries its tag.
fn check_descendants(mgr: &Manager, vps: &Vps, errors: &mut Vec<String>) {
    for p in live_descendants_of(vps.first.as_raw()) {
        let got = tag_of(mgr, p);
        if got.as_deref() != Some(vps.name.as_str()) {
            errors.push(format!("descendant {} of {}'s first process: tag {got:?}", describe(p), vps.name));
        }
    }
}

/// `members(vps)` is exactly the reported live processes plus the VPS's first process (vpstag's
/// init, which runs the scenario's top as its child): nothing stale, nothing missing.
///
/// A member that is already gone from /proc may still be listed for a moment: the kernel sends a
/// process's proc-connector exit event only after `exit_notify()` has let its parent reap it
/// (`do_exit()` calls `proc_exit_connector()` after `exit_notify()`), so a scenario can report its
/// children dead before their exit events are queued. Such a member is asked about again until
/// the deadline (generous: a VM emulated in software on a busy machine can stall a vCPU for
/// seconds); one that stays is stale.
fn check_members(mgr: &Manager, vps: &Vps, report: &Report, errors: &mut Vec<String>) {
    let mut want: BTreeSet<i32> = report.pids().into_iter().collect();
    want.insert(vps.first.as_raw());
    let since = Instant::now();
    let deadline = since + Duration::from_secs(30);
    let mut waited_for = BTreeSet::new();
    let members = loop {
        let members: BTreeSet<i32> = mgr
            .members(vps)
            .unwrap_or_else(|e| panic!("members({}): {e}", vps.name))
            .iter()
            .map(|p| p.as_raw())
            .collect();
        let settling = members.difference(&want).all(|p| Stat::of(*p).is_none());
        if members.difference(&want).next().is_none() || !settling || Instant::now() >= deadline {
            break members;
        }
        waited_for.extend(members.difference(&want).copied());
        std::thread::sleep(Duration::from_millis(20));
    };
    if !waited_for.is_empty() {
        eprintln!("  {}: exits of {waited_for:?} applied after {:?}", vps.name, since.elapsed());
    }
    if members.difference(&want).next().is_some() {
        // What the table holds of each stale member, and what the manager saw, for the report.
        let details = mgr.member_details(vps).unwrap_or_default();
        for p in members.difference(&want) {
            let held = details.iter().find(|m| m.id.pid.as_raw() == *p);
            errors.push(format!(
                "{}: stale member {} after {:?}; the table holds {held:?}; stats {:?}",
                vps.name,
                describe(*p),
                since.elapsed(),
                mgr.stats()
            ));
        }
    }
    for p in want.difference(&members) {
        let role = report.live.iter().find(|(q, _)| q == p).map(|(_, r)| r.as_str()).unwrap_or("first process");
        errors.push(format!("{}: missing member {role} {}", vps.name, describe(*p)));
    }
}

fn assert_no_errors(what: &str, errors: &[String]) {
    assert!(errors.is_empty(), "{what}: {} problem(s):\n  {}", errors.len(), errors.join("\n  "));
}

/// Kills a VPS through the manager and checks that every process it reported is gone.
fn kill_vps(mgr: &Manager, vps: &Vps, report: &Report) {
    let mut pids = report.pids();
    pids.push(vps.first.as_raw());
    let stamps = stamp_all(pids);
    if let Err(e) = mgr.kill_all(vps, KILL_TIMEOUT) {
        let left: Vec<String> = mgr.members(vps).unwrap_or_default().iter().map(|p| describe(p.as_raw())).collect();
        panic!("kill_all({}): {e}\n  members now: {}", vps.name, left.join(", "));
    }
    let left = vpstag_platform_tests::wait_gone(&stamps, Duration::from_secs(5));
    assert!(left.is_empty(), "{}: kill_all left {left:?}", vps.name);
}

#[test]
fn all_shapes_in_a_and_fork_chain_in_b_are_tagged_by_lineage_beside_an_untracked_chain() {
    for_each_backend("all_shapes", |_backend, mgr| {
        let mut guard = Cleanup::new();
        let untracked_path = start_untracked(&mut guard, &["fork-chain"]);
        let (a, a_path) = start_in_vps(mgr, &mut guard, "a", &["all"]);
        let (b, b_path) = start_in_vps(mgr, &mut guard, "b", &["fork-chain"]);
        let ra = ready(&mut guard, &a_path, READY_TIMEOUT);
        let rb = ready(&mut guard, &b_path, READY_TIMEOUT);
        let ru = ready(&mut guard, &untracked_path, READY_TIMEOUT);

        // The scenario's top is the user command, the child of vpstag's first process.
        for (vps, r, top_role) in [(&a, &ra, "all/top"), (&b, &rb, "fork-chain/top")] {
            let top = r.pid_of(top_role).unwrap_or_else(|| panic!("no {top_role}: {r:?}"));
            assert_eq!(Stat::of(top).map(|s| s.ppid), Some(vps.first.as_raw()), "{top_role}'s parent");
        }

        let mut errors = Vec::new();
        check_tags(mgr, &ra, Some("a"), &mut errors);
        check_tags(mgr, &rb, Some("b"), &mut errors);
        check_tags(mgr, &ru, None, &mut errors);
        check_descendants(mgr, &a, &mut errors);
        check_descendants(mgr, &b, &mut errors);
        // The first process reaps orphans (it is a subreaper), so even the re-parented daemon,
        // orphans and relay's last generation are still below it.
        let below_a: BTreeSet<i32> = live_descendants_of(a.first.as_raw()).into_iter().collect();
        for (p, role) in &ra.live {
            if !below_a.contains(p) {
                errors.push(format!("{role} {} is not below a's first process in /proc", describe(*p)));
            }
        }
        check_members(mgr, &a, &ra, &mut errors);
        check_members(mgr, &b, &rb, &mut errors);
        assert_no_errors("tags after READY", &errors);

        kill_vps(mgr, &a, &ra);
        kill_vps(mgr, &b, &rb);
        // kill_all(a), kill_all(b) spared the untracked chain.
        for (p, role) in &ru.live {
            assert!(vpstag_platform_tests::is_live(*p), "untracked {role} {} was killed", describe(*p));
        }
    });
}

/// The last pid handed out (read only).
fn last_pid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").ok()?.trim().parse().ok()
}

/// The system's pid_max (read only).
fn pid_max() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max").ok()?.trim().parse().ok()
}

#[test]
fn churn_of_20000_or_more_forks_leaves_no_stale_member_after_pid_wrap() {
    for_each_backend("churn", |_backend, mgr| {
        let mut guard = Cleanup::new();
        let started = Instant::now();
        let last_pid_before = last_pid();
        // 20000 forks (VPSTAG_CHURN overrides: the kernel matrix asks for fewer inside slow VMs,
        // where it also lowers pid_max), or as many more as it takes to wrap the pid counter.
        let floor: i32 = std::env::var("VPSTAG_CHURN").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let count = match (last_pid_before, pid_max()) {
            (Some(last), Some(max)) => floor.max(max - last + 2_000),
            _ => floor,
        };
        let (vps, path) = start_in_vps(mgr, &mut guard, "churn", &["churn", "--count", &count.to_string()]);
        let r = ready(&mut guard, &path, CHURN_TIMEOUT);
        // Pids are handed out in a cycle, so `pid_max - last` forks are sure to wrap it.
        let wrapped = matches!((last_pid_before, pid_max()), (Some(last), Some(max)) if count >= max - last);
        eprintln!(
            "  {count} forks in {:?} (pid counter sure to have wrapped: {wrapped}); stats {:?}",
            started.elapsed(),
            mgr.stats()
        );
        assert_eq!(r.live.len(), 1, "{r:?}");
        let mut errors = Vec::new();
        check_tags(mgr, &r, Some("churn"), &mut errors);
        check_members(mgr, &vps, &r, &mut errors);
        check_descendants(mgr, &vps, &mut errors);
        assert_no_errors("members after churn", &errors);
        kill_vps(mgr, &vps, &r);
    });
}

/// A process that enters a VPS's PID namespace from outside (`nsenter -t PID -p`) is NOT tagged.
///
/// A tag follows lineage, not namespaces: the `sleep` nsenter starts is a child of nsenter, whose
/// ancestry is outside every VPS, so nothing in the VPS begat it. Namespace membership is no proof
/// of belonging (the host can enter any namespace, and a VPS need not have one); the only way an
/// outside process comes into a VPS is the loader ([`Manager::adopt`]), on purpose.
#[test]
fn nsenter_into_a_vps_pid_namespace_is_not_tagged() {
    for_each_backend("nsenter", |_backend, mgr| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("  SKIP: entering a PID namespace (nsenter -p) needs CAP_SYS_ADMIN; not root");
            return;
        }
        let mut guard = Cleanup::new();
        let (vps, path) = start_in_vps(mgr, &mut guard, "ns", &["pid-namespace"]);
        let r = ready(&mut guard, &path, READY_TIMEOUT);
        if r.skipped.iter().any(|(s, _)| s == "pid-namespace") {
            eprintln!("  SKIP: no PID namespace on this machine");
            return;
        }
        let init = r.pid_of("pid-namespace/init").expect("pid-namespace/init");
        let nsenter = Command::new("nsenter")
            .args(["-t", &init.to_string(), "-p", "--", "sleep", "30"])
            .stdin(Stdio::null())
            .spawn();
        let nsenter = match nsenter {
            Ok(c) => c,
            Err(e) => {
                eprintln!("  SKIP: cannot run nsenter: {e}");
                return;
            }
        };
        let nsenter_pid = nsenter.id() as i32;
        guard.add_child(nsenter);
        // nsenter forks (a new PID namespace applies to children only) and the child execs sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        let sleeper = loop {
            let found =
                live_descendants_of(nsenter_pid).into_iter().find(|p| Stat::of(*p).is_some_and(|s| s.comm == "sleep"));
            if let Some(p) = found {
                break p;
            }
            assert!(Instant::now() < deadline, "nsenter's sleep did not appear");
            std::thread::sleep(Duration::from_millis(10));
        };
        guard.add([sleeper]);
        let ns = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap_or_default();
        let levels = ns.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().count());
        assert_eq!(levels, Some(2), "the sleep is inside the VPS's PID namespace");

        let mut errors = Vec::new();
        for p in [nsenter_pid, sleeper] {
            if let Some(tag) = tag_of(mgr, p) {
                errors.push(format!("{} entered from outside but has tag {tag:?}", describe(p)));
            }
        }
        check_tags(mgr, &r, Some("ns"), &mut errors);
        check_members(mgr, &vps, &r, &mut errors);
        assert_no_errors("nsenter", &errors);
        // kill_all signals members only, but once the namespace's init dies the kernel kills every
        // process left in the namespace (the nsenter'ed sleep too): that is not kill_all's doing.
        kill_vps(mgr, &vps, &r);
    });
}

/// The loader's way in: adopting a running, untracked tree tags the process and its live
/// descendants, and nothing else.
#[test]
fn adopt_brings_a_running_fork_chain_in_with_its_descendants() {
    for_each_backend("adopt", |_backend, mgr| {
        let mut guard = Cleanup::new();
        let path = start_untracked(&mut guard, &["fork-chain"]);
        let other_path = start_untracked(&mut guard, &["fork-chain"]);
        let r = ready(&mut guard, &path, READY_TIMEOUT);
        let other = ready(&mut guard, &other_path, READY_TIMEOUT);
        let top = r.pid_of("fork-chain/top").expect("fork-chain/top");
        let mut errors = Vec::new();
        check_tags(mgr, &r, None, &mut errors);
        assert_no_errors("before adopt", &errors);

        let vps = mgr.adopt("loaded", pid(top)).unwrap_or_else(|e| panic!("adopt: {e}"));
        assert_eq!(vps.first.as_raw(), top);
        check_tags(mgr, &r, Some("loaded"), &mut errors);
        check_tags(mgr, &other, None, &mut errors);
        let members: BTreeSet<i32> = mgr.members(&vps).unwrap().iter().map(|p| p.as_raw()).collect();
        let want: BTreeSet<i32> = r.pids().into_iter().collect();
        if members != want {
            errors.push(format!("members {members:?}, want {want:?}"));
        }
        assert_no_errors("after adopt", &errors);
        kill_vps(mgr, &vps, &r);
    });
}
