//! Tag latency: from `fork()` returning in a VPS process to `Manager::vps_of(child)` answering.
//!
//! The VPS's command (`lat-child`) forks a child, takes CLOCK_MONOTONIC as soon as `fork()`
//! returns, and sends (pid, time) to the tracking process over an inherited socket; the tracking
//! process asks `vps_of(pid)` until it answers with the VPS and takes the time again. The child is
//! held alive (blocked on a pipe) until the tracking process acknowledges. The figure includes
//! the socket hop (reported separately as `hop`), so it is an upper bound.

use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stats::percentile;
use crate::sys;
use crate::track::{self, Backend};

/// What a latency run reports (seconds).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyResult {
    pub samples: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// The socket hop alone (fork return to the tracking process reading the message).
    pub hop_p50: f64,
    pub hop_p99: f64,
    /// Children `vps_of` did not tag within a second.
    pub untagged: usize,
    /// Samples that needed more than one `vps_of` call.
    pub retried: usize,
}

/// The tracking side.
pub fn run(backend: Backend, samples: usize) -> Result<LatencyResult, String> {
    let mgr = track::open(backend, None)?;
    let (mine, theirs) = sys::socketpair().map_err(|e| e.to_string())?;
    let vps = mgr
        .start(
            "latency",
            Command::new(sys::self_exe()).args([
                "lat-child",
                "--samples",
                &samples.to_string(),
                "--fd",
                &theirs.to_string(),
            ]),
        )
        .map_err(|e| e.to_string())?;
    sys::close(theirs);
    let mut lat = Vec::with_capacity(samples);
    let mut hop = Vec::with_capacity(samples);
    let (mut untagged, mut retried) = (0, 0);
    let mut msg = [0u8; 12];
    while sys::read_exact(mine, &mut msg).map_err(|e| e.to_string())? {
        let pid = i32::from_ne_bytes(msg[..4].try_into().unwrap());
        let t1 = u64::from_ne_bytes(msg[4..].try_into().unwrap());
        let t_recv = sys::mono_ns();
        let pid = vpstag::Pid::new(pid).ok_or("bad pid")?;
        let mut tries = 0;
        let t2 = loop {
            tries += 1;
            let v = mgr.vps_of(pid).map_err(|e| e.to_string())?;
            let now = sys::mono_ns();
            if v.is_some() {
                break Some(now);
            }
            if now - t_recv > 1_000_000_000 {
                break None;
            }
        };
        match t2 {
            Some(t2) => {
                lat.push((t2 - t1) as f64 / 1e9);
                hop.push((t_recv - t1) as f64 / 1e9);
            }
            None => untagged += 1,
        }
        if tries > 1 {
            retried += 1;
        }
        sys::write_all(mine, b"k").map_err(|e| e.to_string())?;
    }
    sys::close(mine);
    let _ = mgr.wait(&vps, Some(Duration::from_secs(10)));
    let max = lat.iter().copied().fold(0.0, f64::max);
    Ok(LatencyResult {
        samples: lat.len(),
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max,
        hop_p50: percentile(&hop, 50.0),
        hop_p99: percentile(&hop, 99.0),
        untagged,
        retried,
    })
}

/// The VPS side: forks `samples` children one at a time and reports each.
pub fn child(samples: usize, fd: i32) -> std::io::Result<()> {
    for _ in 0..samples {
        let (r, w) = sys::pipe(true)?;
        // SAFETY: the child only reads and exits.
        let pid = unsafe { libc::fork() };
        let t1 = sys::mono_ns();
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            sys::close(w);
            let mut b = [0u8; 1];
            let _ = sys::read_exact(r, &mut b);
            unsafe { libc::_exit(0) };
        }
        sys::close(r);
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&pid.to_ne_bytes());
        msg[4..].copy_from_slice(&t1.to_ne_bytes());
        sys::write_all(fd, &msg)?;
        let mut ack = [0u8; 1];
        let ok = sys::read_exact(fd, &mut ack)?;
        sys::close(w);
        sys::reap(pid);
        if !ok {
            break;
        }
    }
    Ok(())
}
