//! Linux: `/proc` through the `procfs` crate, `CLOCK_BOOTTIME`, `PR_SET_CHILD_SUBREAPER`, and the
//! cnproc, ptrace and (with the `ebpf` feature) eBPF backends.
//!
//! Why `procfs` and not a hand-rolled `/proc/PID/stat` reader: a scan is only needed at start-up
//! and after lost events (never per event), and a hand-rolled reader was measured only ~15%
//! faster; `procfs` parses the `comm` field (which may hold spaces and parentheses) correctly and
//! is well kept. Identity is keyed on the raw `starttime` ticks (not its date helper, which goes
//! through f32 and loses precision).

use std::io;

use vpstag_tracker::{ForkTracker, Pid, ProcessId, StartTime, TrackerError};

use super::ProcInfo;
use crate::{BackendChoice, Error};

fn to_io(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::from(io::ErrorKind::NotFound),
        procfs::ProcError::Io(e, _) => e,
        procfs::ProcError::PermissionDenied(_) => io::Error::from(io::ErrorKind::PermissionDenied),
        other => io::Error::other(other.to_string()),
    }
}

fn info_of(p: &procfs::process::Process) -> Result<Option<ProcInfo>, procfs::ProcError> {
    let stat = p.stat()?;
    let Some(pid) = Pid::new(stat.pid) else { return Ok(None) };
    let uid = p.uid().unwrap_or(u32::MAX);
    Ok(Some(ProcInfo {
        id: ProcessId { pid, start: StartTime(stat.starttime) },
        ppid: Pid::new(stat.ppid),
        uid,
        threads: u32::try_from(stat.num_threads).unwrap_or(1),
        zombie: matches!(stat.state, 'Z' | 'X' | 'x'),
        name: stat.comm,
    }))
}

/// Every process (thread-group leaders only).
pub(crate) fn scan() -> io::Result<Vec<ProcInfo>> {
    let mut out = Vec::new();
    for p in procfs::process::all_processes().map_err(to_io)? {
        let Ok(p) = p else { continue };
        // A process that exited between the directory listing and the read is simply gone.
        if let Ok(Some(info)) = info_of(&p) {
            out.push(info);
        }
    }
    Ok(out)
}

/// One process, or `None` if it does not exist.
pub(crate) fn process(pid: Pid) -> io::Result<Option<ProcInfo>> {
    let p = match procfs::process::Process::new(pid.as_raw()) {
        Ok(p) => p,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(to_io(e)),
    };
    match info_of(&p) {
        Ok(i) => Ok(i),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(procfs::ProcError::Io(e, _)) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// The command line of a process, for display.
pub fn cmdline(pid: Pid) -> Option<String> {
    let p = procfs::process::Process::new(pid.as_raw()).ok()?;
    let args = p.cmdline().ok()?;
    if args.is_empty() {
        p.stat().ok().map(|s| format!("[{}]", s.comm))
    } else {
        Some(args.join(" "))
    }
}

/// Start times are exact clock ticks on Linux.
pub(crate) fn start_tolerance() -> u64 {
    0
}

/// Nanoseconds per clock tick (`CLK_TCK`).
pub(crate) fn ns_per_start_unit() -> u64 {
    1_000_000_000 / procfs::ticks_per_second().max(1)
}

/// Now on `CLOCK_BOOTTIME`, the clock of `/proc` start times and of our events.
pub(crate) fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// Makes the calling process the reaper of its orphaned descendants. Async-signal-safe.
pub fn become_subreaper() -> i32 {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
    }
}

/// Sets this process's name as `ps` shows it. Async-signal-safe.
pub(crate) fn set_process_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `name` is one.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

fn open_cnproc() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_cnproc::CnProc::new()?))
}

fn open_ptrace() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_ptrace::Ptrace::new()?))
}

#[cfg(feature = "ebpf")]
fn open_ebpf() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_ebpf::Ebpf::new()?))
}

#[cfg(not(feature = "ebpf"))]
fn open_ebpf() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Err(TrackerError::Unsupported("this vpstag was built without the eBPF backend (cargo feature `ebpf`)".into()))
}

/// Opens a backend; `notes` receives what `auto` tried and why it fell back.
pub(crate) fn open_backend(choice: BackendChoice, notes: &mut Vec<String>) -> Result<Box<dyn ForkTracker>, Error> {
    match choice {
        BackendChoice::Cnproc => Ok(open_cnproc()?),
        BackendChoice::Ptrace => Ok(open_ptrace()?),
        BackendChoice::Ebpf => Ok(open_ebpf()?),
        BackendChoice::Kqueue => Err(Error::BackendUnavailable {
            backend: "kqueue",
            why: "kqueue is the BSD backend; on Linux use cnproc, ptrace or ebpf".into(),
        }),
        BackendChoice::Auto => {
            if cfg!(feature = "ebpf") {
                match open_ebpf() {
                    Ok(t) => return Ok(t),
                    Err(e) => notes.push(format!("ebpf backend unavailable ({e}); trying cnproc")),
                }
            }
            match open_cnproc() {
                Ok(t) => return Ok(t),
                Err(e) => notes.push(format!("cnproc backend unavailable ({e}); falling back to ptrace")),
            }
            Ok(open_ptrace()?)
        }
    }
}
