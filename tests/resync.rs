//! Lost events and scans against the real kernel: the table must notice a loss, say so, and come
//! back exact; processes born while a scan runs must not be missed.
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use vpstag::{Manager, Pid};

/// Live processes (not zombies) below `root`, from `/proc` parent links, `root` included.
fn live_tree(root: i32) -> BTreeSet<i32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f[0] == "Z" || f[0] == "X" {
            continue;
        }
        parent.insert(pid, f[1].parse::<i32>().unwrap_or(0));
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

fn raw(v: Vec<Pid>) -> BTreeSet<i32> {
    v.into_iter().map(Pid::as_raw).collect()
}

/// Kills every process below `root` (and root) by pid, repeatedly, until none is left.
fn kill_tree(root: i32) {
    for _ in 0..50 {
        let t = live_tree(root);
        if t.is_empty() {
            return;
        }
        for p in t {
            // SAFETY: kill by a pid found below our own child.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A manager over the proc connector with `receive_buffer` bytes (`None`: the default 8 MiB), or
/// `None` (with the reason printed) where this kernel does not let us listen.
fn cnproc_manager(receive_buffer: Option<usize>) -> Option<Manager> {
    let cfg = vpstag_cnproc::Config {
        receive_buffer: receive_buffer.unwrap_or(vpstag_cnproc::Config::DEFAULT_RECEIVE_BUFFER),
        kernel_filter: false,
    };
    match vpstag_cnproc::CnProc::with_config(cfg) {
        Ok(t) => Some(Manager::new(Box::new(t)).unwrap()),
        Err(e) => {
            eprintln!("skipped: cannot open the proc connector here: {e}");
            None
        }
    }
}

#[test]
fn overflow_is_noticed_and_a_resync_makes_the_table_exact() {
    // A receive buffer far too small for a fork burst: the kernel reports ENOBUFS.
    let Some(mgr) = cnproc_manager(Some(4096)) else { return };
    let dir = std::env::temp_dir().join(format!("vpstag-resync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready");
    // Two parallel bursts of double-forked sleepers (their parents exit at once, so each sleeper
    // is re-parented to the VPS's first process), then a marker.
    let script = format!(
        "burst() {{ i=0; while [ $i -lt 150 ]; do (sleep 60 &); i=$((i+1)); done; }}; burst & burst & wait; touch {}; sleep 60",
        ready.display()
    );
    let vps = mgr.start("burst", Command::new("sh").args(["-c", &script])).unwrap();
    let t = Instant::now();
    while !ready.exists() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.exists(), "the burst did not finish");
    // Let the manager read what is left and resync.
    let mut members = BTreeSet::new();
    let mut expected = BTreeSet::new();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        members = raw(mgr.members(&vps).unwrap());
        expected = live_tree(vps.first.as_raw());
        if members == expected {
            break;
        }
    }
    let stats = mgr.stats();
    kill_tree(vps.first.as_raw());
    let _ = mgr.kill_all(&vps, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stats.loss_reports >= 1, "the burst did not overflow a 4 KiB buffer; this test proves nothing: {stats:?}");
    assert!(stats.resyncs >= 2, "a loss must trigger a resync (one more than the start-up scan): {stats:?}");
    assert!(expected.len() >= 300, "expected 300 sleepers and the shell, found {}", expected.len());
    let missing: Vec<_> = expected.difference(&members).collect();
    let extra: Vec<_> = members.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "after resync: missing {missing:?}, extra {extra:?}; {stats:?}");
}

#[test]
fn adopting_a_tree_that_keeps_forking_misses_nothing_born_during_the_scan() {
    let Some(mgr) = cnproc_manager(None) else { return };
    let dir = std::env::temp_dir().join(format!("vpstag-adopt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stop = dir.join("stop");
    // An untracked shell that keeps starting children until told to stop (at most 400).
    let script =
        format!("i=0; while [ ! -e {} ] && [ $i -lt 400 ]; do sleep 60 & i=$((i+1)); done; wait", stop.display());
    let mut child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let root = Pid::new(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    // The loader's way in, while it forks: the scan runs while children are being born.
    let vps = mgr.adopt("adopted", root).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(&stop, b"").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let expected = live_tree(root.as_raw());
    let members = raw(mgr.members(&vps).unwrap());
    kill_tree(root.as_raw());
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(expected.len() > 10, "the shell started too few children to test anything: {}", expected.len());
    let missing: Vec<_> = expected.difference(&members).collect();
    assert!(missing.is_empty(), "children missed around the scan: {missing:?} of {}", expected.len());
    assert!(
        members.is_subset(&expected),
        "members that are not in the tree: {:?}",
        members.difference(&expected).collect::<Vec<_>>()
    );
}

#[test]
fn check_reports_no_divergence_on_a_quiet_vps() {
    let Some(mgr) = cnproc_manager(None) else { return };
    let vps = mgr.start("quiet", Command::new("sh").args(["-c", "sleep 60 & (sleep 60 &); sleep 60"])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let report = mgr.check().unwrap();
    let n = mgr.members(&vps).unwrap().len();
    mgr.kill_all(&vps, Duration::from_secs(10)).unwrap();
    assert_eq!(n, 5, "init, sh and three sleeps");
    assert!(report.divergences.is_empty(), "{:?}", report.divergences);
}

#[test]
fn a_command_that_cannot_start_leaves_its_name_free() {
    let Some(mgr) = cnproc_manager(None) else { return };
    let err = mgr.start("again", &mut Command::new("/nonexistent/x")).unwrap_err();
    assert!(matches!(err, vpstag::Error::Spawn { .. }), "{err}");
    let vps = mgr.start("again", Command::new("true").arg("ok")).unwrap();
    assert_eq!(mgr.wait(&vps, Some(Duration::from_secs(10))).unwrap(), Some(vpstag::ExitStatus::Exited(0)));
    let err = mgr.start("again", &mut Command::new("sleep")).map(|_| ());
    // `sleep` without an argument exits at once with status 1; the start itself succeeds.
    assert!(err.is_ok(), "{err:?}");
}

#[test]
fn wait_returns_even_when_the_first_process_exit_event_is_lost() {
    // A 4 KiB buffer and a burst right before the command exits: the exit events of the command
    // and of the first process are often among the lost ones. The resync must still notice that
    // the first process is gone, and its status then comes from waitpid.
    for round in 0..3 {
        let Some(mgr) = cnproc_manager(Some(4096)) else { return };
        let script = "i=0; while [ $i -lt 300 ]; do /bin/true & i=$((i+1)); done; wait; exit 7";
        let vps = mgr.start("lost-exit", Command::new("sh").args(["-c", script])).unwrap();
        let status = mgr.wait(&vps, Some(Duration::from_secs(60))).unwrap();
        let stats = mgr.stats();
        kill_tree(vps.first.as_raw());
        assert_eq!(status, Some(vpstag::ExitStatus::Exited(7)), "round {round}: {stats:?}");
    }
}
