//! The workload: a fixed count of process creations, timed by the workload itself.
//!
//! `seq`: fork + _exit + waitpid, one at a time. `burst`: fork 50, then wait for all of them.
//! `spawn`: posix_spawn of /bin/true + waitpid. With `parallel > 1`, that many forker processes
//! share the count; with a `rate`, they pace themselves to that many creations per second in all.

use std::io;

use serde::{Deserialize, Serialize};

use crate::sys;

/// The shape of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Mode {
    /// fork + _exit + waitpid, sequentially.
    Seq,
    /// fork 50, then wait for all.
    Burst,
    /// posix_spawn /bin/true + waitpid.
    Spawn,
}

impl Mode {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Burst => "burst",
            Mode::Spawn => "spawn",
        }
    }

    /// The proc-connector events one operation causes (fork and exit; exec too for spawn).
    pub fn events_per_op(self) -> f64 {
        match self {
            Mode::Seq | Mode::Burst => 2.0,
            Mode::Spawn => 3.0,
        }
    }
}

/// What a workload run reports.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct WorkResult {
    /// Creations done.
    pub ops: u64,
    /// Wall seconds they took.
    pub secs: f64,
    /// ops / secs.
    pub rate: f64,
}

const BURST: u64 = 50;

fn one_forker(mode: Mode, count: u64, rate: f64) -> io::Result<()> {
    let spawner = sys::Spawner::new(&["/bin/true"]);
    let t0 = sys::now_secs();
    let mut done = 0u64;
    let mut pids = Vec::with_capacity(BURST as usize);
    while done < count {
        if rate > 0.0 {
            // Pace: never ahead of `rate` creations per second.
            let due = t0 + done as f64 / rate;
            let now = sys::now_secs();
            if due > now {
                std::thread::sleep(std::time::Duration::from_secs_f64(due - now));
            }
        }
        match mode {
            Mode::Seq => {
                let pid = fork_exit()?;
                sys::reap(pid);
                done += 1;
            }
            Mode::Burst => {
                let n = BURST.min(count - done);
                for _ in 0..n {
                    pids.push(fork_exit()?);
                }
                for p in pids.drain(..) {
                    sys::reap(p);
                }
                done += n;
            }
            Mode::Spawn => {
                let pid = spawner.spawn()?;
                sys::reap(pid);
                done += 1;
            }
        }
    }
    Ok(())
}

/// fork; the child exits at once.
fn fork_exit() -> io::Result<i32> {
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe { libc::_exit(0) };
    }
    Ok(pid)
}

/// Runs the workload and returns its rate.
pub fn run(mode: Mode, count: u64, parallel: u32, rate: f64, cpu: Option<usize>) -> io::Result<WorkResult> {
    if let Some(c) = cpu {
        sys::pin_to_cpu(c)?;
    }
    if parallel <= 1 {
        let t0 = sys::now_secs();
        one_forker(mode, count, rate)?;
        let secs = sys::now_secs() - t0;
        return Ok(WorkResult { ops: count, secs, rate: count as f64 / secs });
    }
    // Several forkers, released together by closing a pipe.
    let (gate_r, gate_w) = sys::pipe(true)?;
    let mut kids = Vec::new();
    let share = count / u64::from(parallel);
    for _ in 0..parallel {
        // SAFETY: the child runs the single-threaded forker loop and exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            sys::close(gate_w);
            let mut b = [0u8; 1];
            let _ = sys::read_exact(gate_r, &mut b);
            let code = i32::from(one_forker(mode, share, rate / f64::from(parallel)).is_err());
            unsafe { libc::_exit(code) };
        }
        kids.push(pid);
    }
    sys::close(gate_r);
    let t0 = sys::now_secs();
    sys::close(gate_w);
    let mut failed = false;
    for k in kids {
        let (st, _) = sys::wait_child(k)?;
        failed |= st != 0;
    }
    let secs = sys::now_secs() - t0;
    if failed {
        return Err(io::Error::other("a forker failed"));
    }
    let ops = share * u64::from(parallel);
    Ok(WorkResult { ops, secs, rate: ops as f64 / secs })
}
