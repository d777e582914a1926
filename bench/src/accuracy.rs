//! Accuracy under load: N processes across several VPSes, in four creation shapes, with PIDs
//! wrapping; the table is checked against /proc ancestry at checkpoints while processes live, and
//! must hold nothing once every process is gone.
//!
//! Each VPS runs `acc-worker`, which creates processes in turn by fork, double fork (the
//! grandchild is re-parented to the VPS's init), posix_spawn and fork from a second thread. One
//! creation in `sleeper_every` makes a process that stays alive (blocked) until the worker has
//! more than `cap` of them; the others exit at once. At each checkpoint every worker stops (its
//! live processes are then still) and the tracking process compares:
//! - *missed*: a live process below a VPS's first process (by /proc ppid chain) that the table
//!   does not have;
//! - *mis-tagged*: one the table gives another VPS, or a tagged process below no VPS;
//! - *stale*: a table entry whose process is gone, or whose pid now belongs to another process
//!   (start time differs).
//!
//! A discrepancy counts only if it is still there on a second look (table and /proc read again),
//! so a process that exits between the two reads is not counted.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vpstag::{MappingTable, Pid, VpsId};

use crate::sys::{self, Stat};
use crate::track::{self, Backend};

/// What an accuracy run reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccuracyResult {
    pub vpses: usize,
    /// Processes the workers created.
    pub created: u64,
    /// Times the PID counter wrapped (largest count any worker saw).
    pub wraps: u32,
    pub checkpoints: u32,
    /// Live VPS processes compared, summed over checkpoints.
    pub checked: u64,
    pub missed: u64,
    pub mistagged: u64,
    pub stale: u64,
    /// Table entries for zombies (exited, not yet reaped), not counted as stale.
    pub zombie_entries: u64,
    /// Entries left in the table at the end, every VPS process being gone.
    pub stale_end: usize,
    /// VPS processes still alive at the end (should be 0: they were all killed).
    pub alive_end: usize,
    pub loss_reports: u64,
    pub resyncs: u64,
    pub secs: f64,
    /// Examples of discrepancies, for the report.
    pub examples: Vec<String>,
}

/// Parameters.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub procs: u64,
    pub vpses: usize,
    pub checkpoints: u64,
    pub sleeper_every: u64,
    pub cap: usize,
}

pub fn run(backend: Backend, p: Params) -> Result<AccuracyResult, String> {
    let mgr = track::open(backend, None)?;
    let s0 = mgr.stats();
    let per = p.procs / p.vpses as u64;
    let every = (per / p.checkpoints.max(1)).max(1);
    let t0 = sys::now_secs();
    let mut socks = Vec::new();
    let mut vpses = Vec::new();
    for k in 0..p.vpses {
        let (mine, theirs) = sys::socketpair().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(sys::self_exe());
        cmd.args([
            "acc-worker",
            "--count",
            &per.to_string(),
            "--every",
            &every.to_string(),
            "--sleeper-every",
            &p.sleeper_every.to_string(),
            "--cap",
            &p.cap.to_string(),
            "--fd",
            &theirs.to_string(),
        ])
        .env("VPSBENCH_ACC", k.to_string());
        let vps = mgr.start(&format!("acc-{k}"), &mut cmd).map_err(|e| e.to_string())?;
        sys::close(theirs);
        socks.push(mine);
        vpses.push(vps);
    }
    let firsts: HashMap<i32, VpsId> = vpses.iter().map(|v| (v.first.as_raw(), v.id)).collect();
    let by_idx: HashMap<String, VpsId> = vpses.iter().enumerate().map(|(i, v)| (i.to_string(), v.id)).collect();
    let mut res = AccuracyResult { vpses: p.vpses, ..Default::default() };
    let mut active: Vec<bool> = vec![true; socks.len()];
    while active.iter().any(|a| *a) {
        let mut waiting = Vec::new();
        for (i, &fd) in socks.iter().enumerate() {
            if !active[i] {
                continue;
            }
            let mut tag = [0u8; 1];
            if !sys::read_exact(fd, &mut tag).map_err(|e| e.to_string())? {
                active[i] = false;
                continue;
            }
            match tag[0] {
                b'c' => waiting.push(fd),
                b'd' => {
                    let mut m = [0u8; 12];
                    if sys::read_exact(fd, &mut m).map_err(|e| e.to_string())? {
                        res.created += u64::from_ne_bytes(m[..8].try_into().unwrap());
                        res.wraps = res.wraps.max(u32::from_ne_bytes(m[8..].try_into().unwrap()));
                    }
                    active[i] = false;
                }
                _ => return Err("bad message from a worker".into()),
            }
        }
        if !waiting.is_empty() {
            let c = checkpoint(&mgr, &firsts, &by_idx)?;
            res.checkpoints += 1;
            res.checked += c.checked;
            res.missed += c.missed;
            res.mistagged += c.mistagged;
            res.stale += c.stale;
            res.zombie_entries += c.zombies;
            for e in c.examples {
                if res.examples.len() < 10 {
                    res.examples.push(e);
                }
            }
            eprint!("\r  accuracy {}: checkpoint {} ({} live compared)   ", backend.name(), res.checkpoints, c.checked);
            for fd in waiting {
                sys::write_all(fd, b"g").map_err(|e| e.to_string())?;
            }
        }
    }
    eprintln!();
    for fd in &socks {
        sys::close(*fd);
    }
    for v in &vpses {
        let _ = mgr.wait(v, Some(Duration::from_secs(30)));
        let _ = mgr.kill_all(v, Duration::from_secs(10));
        let _ = mgr.wait_empty(v, Some(Duration::from_secs(10)));
    }
    res.secs = sys::now_secs() - t0;
    std::thread::sleep(Duration::from_millis(200));
    let table = mgr.table().map_err(|e| e.to_string())?;
    for e in table.entries() {
        match sys::read_stat(e.id.pid.as_raw()) {
            Some(st) if st.start.abs_diff(e.id.start.0) <= 1 && st.state != b'Z' => res.alive_end += 1,
            _ => res.stale_end += 1,
        }
    }
    let s = mgr.stats();
    res.loss_reports = s.loss_reports - s0.loss_reports;
    res.resyncs = s.resyncs - s0.resyncs;
    Ok(res)
}

#[derive(Default)]
struct Check {
    checked: u64,
    missed: u64,
    mistagged: u64,
    stale: u64,
    zombies: u64,
    examples: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Problem {
    Missed(i32),
    Mistagged(i32),
    Stale(i32),
}

fn snapshot() -> HashMap<i32, Stat> {
    sys::all_pids().into_iter().filter_map(|p| sys::read_stat(p).map(|s| (p, s))).collect()
}

/// The VPS a process belongs to by its ancestry (or, for one re-parented out of every VPS, by
/// the environment marker it inherited).
fn expected(
    pid: i32,
    procs: &HashMap<i32, Stat>,
    firsts: &HashMap<i32, VpsId>,
    by_idx: &HashMap<String, VpsId>,
) -> Option<VpsId> {
    let mut p = pid;
    for _ in 0..256 {
        if let Some(v) = firsts.get(&p) {
            return Some(*v);
        }
        match procs.get(&p) {
            Some(s) if s.ppid > 1 => p = s.ppid,
            _ => break,
        }
    }
    sys::environ_var(pid, "VPSBENCH_ACC").and_then(|k| by_idx.get(&k).copied())
}

fn problems(
    table: &MappingTable,
    procs: &HashMap<i32, Stat>,
    firsts: &HashMap<i32, VpsId>,
    by_idx: &HashMap<String, VpsId>,
    only: Option<&HashSet<Problem>>,
) -> (Vec<Problem>, u64, u64) {
    let mut out = Vec::new();
    let (mut checked, mut zombies) = (0, 0);
    let wanted = |pid: i32| {
        only.is_none_or(|o| {
            o.iter().any(|q| matches!(q, Problem::Missed(p) | Problem::Mistagged(p) | Problem::Stale(p) if *p == pid))
        })
    };
    for (&pid, st) in procs {
        if st.state == b'Z' || !wanted(pid) {
            continue;
        }
        let exp = expected(pid, procs, firsts, by_idx);
        let have = table.get(Pid::new(pid).unwrap());
        match (exp, have) {
            (Some(v), Some(e)) => {
                checked += 1;
                if e.id.start.0.abs_diff(st.start) > 1 {
                    out.push(Problem::Stale(pid));
                    out.push(Problem::Missed(pid));
                } else if e.vps != v {
                    out.push(Problem::Mistagged(pid));
                }
            }
            (Some(_), None) => {
                checked += 1;
                out.push(Problem::Missed(pid));
            }
            (None, Some(e)) => {
                if e.id.start.0.abs_diff(st.start) > 1 {
                    out.push(Problem::Stale(pid));
                } else {
                    out.push(Problem::Mistagged(pid));
                }
            }
            (None, None) => {}
        }
    }
    for e in table.entries() {
        let pid = e.id.pid.as_raw();
        if !wanted(pid) {
            continue;
        }
        match procs.get(&pid) {
            None => out.push(Problem::Stale(pid)),
            Some(st) if st.state == b'Z' => zombies += 1,
            Some(_) => {}
        }
    }
    (out, checked, zombies)
}

fn checkpoint(
    mgr: &vpstag::Manager,
    firsts: &HashMap<i32, VpsId>,
    by_idx: &HashMap<String, VpsId>,
) -> Result<Check, String> {
    let table = mgr.table().map_err(|e| e.to_string())?;
    let procs = snapshot();
    let (first, checked, zombies) = problems(&table, &procs, firsts, by_idx, None);
    let mut c = Check { checked, zombies, ..Default::default() };
    if first.is_empty() {
        return Ok(c);
    }
    // A second look at the suspects only.
    std::thread::sleep(Duration::from_millis(20));
    let table = mgr.table().map_err(|e| e.to_string())?;
    let procs = snapshot();
    let suspects: HashSet<Problem> = first.iter().copied().collect();
    let (second, _, _) = problems(&table, &procs, firsts, by_idx, Some(&suspects));
    for p in second.into_iter().filter(|p| suspects.contains(p)) {
        match p {
            Problem::Missed(_) => c.missed += 1,
            Problem::Mistagged(_) => c.mistagged += 1,
            Problem::Stale(_) => c.stale += 1,
        }
        let pid = match p {
            Problem::Missed(x) | Problem::Mistagged(x) | Problem::Stale(x) => x,
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        c.examples.push(format!("{p:?} {} ppid {:?}", comm.trim(), procs.get(&pid).map(|s| s.ppid)));
    }
    Ok(c)
}

/// The worker inside a VPS.
pub fn worker(count: u64, every: u64, sleeper_every: u64, cap: usize, fd: i32) -> std::io::Result<()> {
    let true_ = sys::Spawner::new(&["/bin/true"]);
    let sleep_ = sys::Spawner::new(&["/bin/sleep", "100000"]);
    let (dp_r, dp_w) = sys::pipe(true)?;
    // (pid, is our child)
    let mut sleepers: std::collections::VecDeque<(i32, bool)> = Default::default();
    let mut last_pid = 0;
    let mut wraps = 0u32;
    let mut note = |pid: i32| {
        if pid < last_pid - 1000 {
            wraps += 1;
        }
        last_pid = pid;
    };
    for i in 0..count {
        let sleeper = sleeper_every > 0 && i % sleeper_every == 0;
        match i % 4 {
            0 => {
                let pid = fork_then(sleeper)?;
                note(pid);
                if sleeper {
                    sleepers.push_back((pid, true));
                } else {
                    sys::reap(pid);
                }
            }
            1 => {
                // Double fork: the grandchild is re-parented to the VPS's init.
                // SAFETY: the child only forks, writes and exits.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if pid == 0 {
                    let g = fork_then(sleeper).unwrap_or(-1);
                    let _ = sys::write_all(dp_w, &g.to_ne_bytes());
                    unsafe { libc::_exit(0) };
                }
                sys::reap(pid);
                let mut b = [0u8; 4];
                sys::read_exact(dp_r, &mut b)?;
                let g = i32::from_ne_bytes(b);
                note(g);
                if sleeper && g > 0 {
                    sleepers.push_back((g, false));
                }
            }
            2 => {
                let pid = if sleeper { sleep_.spawn()? } else { true_.spawn()? };
                note(pid);
                if sleeper {
                    sleepers.push_back((pid, true));
                } else {
                    sys::reap(pid);
                }
            }
            _ => {
                // fork from a second thread.
                let pid = std::thread::spawn(move || fork_then(sleeper))
                    .join()
                    .map_err(|_| std::io::Error::other("thread"))??;
                note(pid);
                if sleeper {
                    sleepers.push_back((pid, true));
                } else {
                    sys::reap(pid);
                }
            }
        }
        while sleepers.len() > cap {
            let (pid, mine) = sleepers.pop_front().unwrap();
            sys::kill(pid, libc::SIGKILL);
            if mine {
                sys::reap(pid);
            }
        }
        if (i + 1) % every == 0 && i + 1 < count {
            sys::write_all(fd, b"c")?;
            let mut g = [0u8; 1];
            if !sys::read_exact(fd, &mut g)? {
                break;
            }
        }
    }
    for (pid, mine) in sleepers.drain(..) {
        sys::kill(pid, libc::SIGKILL);
        if mine {
            sys::reap(pid);
        }
    }
    let mut m = vec![b'd'];
    m.extend_from_slice(&count.to_ne_bytes());
    m.extend_from_slice(&wraps.to_ne_bytes());
    sys::write_all(fd, &m)?;
    Ok(())
}

/// fork; the child blocks forever when `sleeper`, else exits at once.
fn fork_then(sleeper: bool) -> std::io::Result<i32> {
    // SAFETY: the child only pauses or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        if sleeper {
            loop {
                unsafe { libc::pause() };
            }
        }
        unsafe { libc::_exit(0) };
    }
    Ok(pid)
}
