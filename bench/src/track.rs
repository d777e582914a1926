//! The tracking process: a process that runs only a `Manager` (so its CPU time is the tracker's)
//! and starts a workload as a VPS's command.

use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vpstag::{BackendChoice, Manager};

use crate::sys;

/// The trackers of vpstag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Backend {
    /// Linux proc connector.
    Cnproc,
    /// ptrace.
    Ptrace,
    /// eBPF (cargo feature `ebpf`).
    Ebpf,
}

impl Backend {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cnproc => "cnproc",
            Backend::Ptrace => "ptrace",
            Backend::Ebpf => "ebpf",
        }
    }
}

/// Opens a manager over `backend`; `rcvbuf` sizes the proc connector's receive buffer (None: the
/// backend's default, 8 MiB).
pub fn open(backend: Backend, rcvbuf: Option<usize>) -> Result<Manager, String> {
    match backend {
        Backend::Cnproc => {
            let cfg = vpstag_cnproc::Config {
                receive_buffer: rcvbuf.unwrap_or(vpstag_cnproc::Config::DEFAULT_RECEIVE_BUFFER),
                kernel_filter: false,
            };
            let t = vpstag_cnproc::CnProc::with_config(cfg).map_err(|e| e.to_string())?;
            Manager::new(Box::new(t)).map_err(|e| e.to_string())
        }
        Backend::Ptrace => Manager::with_backend(BackendChoice::Ptrace).map_err(|e| e.to_string()),
        Backend::Ebpf => Manager::with_backend(BackendChoice::Ebpf).map_err(|e| e.to_string()),
    }
}

/// What a tracked run reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrackResult {
    /// CPU seconds (user + system) of the tracking process from the VPS's start to its end.
    pub tracker_cpu: f64,
    /// Voluntary context switches of the tracking process in that span (its threads' wake-ups).
    pub wakeups: u64,
    /// Wall seconds of the same span.
    pub wall: f64,
    /// Events the manager applied.
    pub events: u64,
    /// Loss reports from the backend.
    pub loss_reports: u64,
    /// Events known lost.
    pub lost_events: u64,
    /// Resyncs done.
    pub resyncs: u64,
    /// Entries added by resyncs.
    pub resync_added: u64,
    /// Entries removed by resyncs.
    pub resync_removed: u64,
    /// Table entries left once the VPS was empty (expected 0).
    pub table_left: usize,
    /// Divergences `Manager::check` found at the end (expected 0).
    pub divergences: usize,
    /// Seconds an explicit `resync()` took at the end.
    pub resync_secs: f64,
    /// The command's exit code.
    pub exit_code: i32,
    /// `Manager::wait` did not see the first process end although it had (its exit event was
    /// among the lost ones): the bench noticed from /proc and reaped it itself.
    #[serde(default)]
    pub wait_missed: bool,
}

/// `Manager::wait`, with a way out: if the first process is dead (a zombie or gone) and the
/// manager still has not noticed after a few seconds, report that and reap it here (unless the
/// backend reaps).
fn wait_first(mgr: &Manager, vps: &vpstag::Vps) -> Result<(i32, bool), String> {
    let first = vps.first.as_raw();
    let mut dead_since: Option<f64> = None;
    loop {
        if let Some(st) = mgr.wait(vps, Some(Duration::from_millis(500))).map_err(|e| e.to_string())? {
            return Ok((st.shell_code(), false));
        }
        let dead = sys::read_stat(first).is_none_or(|s| s.state == b'Z' || s.state == b'X');
        if !dead {
            dead_since = None;
            continue;
        }
        let since = *dead_since.get_or_insert_with(sys::now_secs);
        if sys::now_secs() - since < 3.0 {
            continue;
        }
        let mut raw = 0;
        let code = if mgr.capabilities().reaps {
            -1
        } else {
            // SAFETY: waitpid on our own child, with a valid out pointer.
            let r = unsafe { libc::waitpid(first, &mut raw, libc::WNOHANG) };
            if r == first {
                vpstag::ExitStatus::from_wait_status(raw).map(|s| s.shell_code()).unwrap_or(-1)
            } else {
                -1
            }
        };
        return Ok((code, true));
    }
}

/// Runs `cmd` as VPS "bench" under a manager over `backend`, waits for it and for the VPS to be
/// empty, and reports.
pub fn run(backend: Backend, rcvbuf: Option<usize>, cmd: &[String]) -> Result<TrackResult, String> {
    let mgr = open(backend, rcvbuf)?;
    let s0 = mgr.stats();
    let cpu0 = sys::cpu_self();
    let w0 = sys::wakeups_self();
    let t0 = sys::now_secs();
    let vps = mgr.start("bench", Command::new(&cmd[0]).args(&cmd[1..])).map_err(|e| e.to_string())?;
    let (status, wait_missed) = wait_first(&mgr, &vps)?;
    let _ = mgr.wait_empty(&vps, Some(Duration::from_secs(10)));
    mgr.sync().map_err(|e| e.to_string())?;
    let cpu1 = sys::cpu_self();
    let w1 = sys::wakeups_self();
    let wall = sys::now_secs() - t0;
    let s1 = mgr.stats();
    let table_left = mgr.table().map_err(|e| e.to_string())?.len();
    let divergences = mgr.check().map(|c| c.divergences.len()).unwrap_or(usize::MAX);
    let r0 = sys::now_secs();
    mgr.resync().map_err(|e| e.to_string())?;
    let resync_secs = sys::now_secs() - r0;
    Ok(TrackResult {
        tracker_cpu: cpu1 - cpu0,
        wakeups: w1 - w0,
        wall,
        events: s1.events - s0.events,
        loss_reports: s1.loss_reports - s0.loss_reports,
        lost_events: s1.lost_events - s0.lost_events,
        resyncs: s1.resyncs - s0.resyncs,
        resync_added: s1.resync_added - s0.resync_added,
        resync_removed: s1.resync_removed - s0.resync_removed,
        table_left,
        divergences,
        resync_secs,
        exit_code: status,
        wait_missed,
    })
}

/// A bare proc-connector reader, no manager: drains the socket, then sleeps `batch_ms` before
/// reading again (so it wakes once per batch, not once per event), while `cmd` runs as a plain
/// child. For comparison: what the kernel side of the proc connector costs the workload.
pub fn raw(batch_ms: u64, cmd: &[String]) -> Result<TrackResult, String> {
    use vpstag::ForkTracker;
    let mut t = vpstag_cnproc::CnProc::new().map_err(|e| e.to_string())?;
    let cpu0 = sys::cpu_self();
    let w0 = sys::wakeups_self();
    let t0 = sys::now_secs();
    let mut child = Command::new(&cmd[0]).args(&cmd[1..]).spawn().map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(16384);
    let mut events = 0u64;
    let mut lost = 0u64;
    let status = loop {
        buf.clear();
        t.read_events(&mut buf, Some(Duration::from_millis(20))).map_err(|e| e.to_string())?;
        events += buf.len() as u64;
        lost += buf.iter().filter(|e| matches!(e.kind, vpstag::EventKind::Lost { .. })).count() as u64;
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            buf.clear();
            let _ = t.read_events(&mut buf, Some(Duration::ZERO));
            events += buf.len() as u64;
            break st;
        }
        if batch_ms > 0 {
            std::thread::sleep(Duration::from_millis(batch_ms));
        }
    };
    Ok(TrackResult {
        tracker_cpu: sys::cpu_self() - cpu0,
        wakeups: sys::wakeups_self() - w0,
        wall: sys::now_secs() - t0,
        events,
        loss_reports: lost,
        exit_code: status.code().unwrap_or(-1),
        ..Default::default()
    })
}
