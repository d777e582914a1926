//! Every other Unix (NetBSD, OpenBSD, DragonFly, macOS, illumos, ...): no process-table reader and
//! no reaper yet, so vpstag builds but says at run time what is missing.
//!
//! - NetBSD, OpenBSD, DragonFly: the kqueue backend opens (it follows forks there), but the
//!   snapshot below is unsupported, so vpstag cannot adopt existing processes or resynchronise
//!   after a loss. A `kern.proc2` reader (NetBSD, OpenBSD) is the missing piece.
//! - macOS: the kqueue backend itself refuses (`NOTE_TRACK` returns `ENOTSUP` since 10.5).
//! - illumos: process contracts (`contract(5)`) are the mechanism; a later backend.

use std::ffi::CStr;
use std::io;

use vpstag_tracker::{ForkTracker, Pid, TrackerError};

use super::ProcInfo;
use crate::{BackendChoice, Error};

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "vpstag cannot read the process table on {} yet (it reads /proc on Linux and sysctl kern.proc on \
             FreeBSD)",
            std::env::consts::OS
        ),
    )
}

/// Every process: unsupported here.
pub(crate) fn scan() -> io::Result<Vec<ProcInfo>> {
    Err(unsupported())
}

/// One process: unsupported here.
pub(crate) fn process(pid: Pid) -> io::Result<Option<ProcInfo>> {
    let _ = pid;
    Err(unsupported())
}

/// The command line of a process, for display: not known here.
pub fn cmdline(pid: Pid) -> Option<String> {
    let _ = pid;
    None
}

/// As on FreeBSD (start times in microseconds that move with clock steps); unused while
/// [`scan`] is unsupported.
pub(crate) fn start_tolerance() -> u64 {
    2_000_000
}

/// Start times are microseconds since the epoch on the BSDs.
pub(crate) fn ns_per_start_unit() -> u64 {
    1_000
}

/// Now, in nanoseconds since the epoch.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// No reaper facility is used here: `ENOSYS`. Async-signal-safe.
pub fn become_subreaper() -> i32 {
    libc::ENOSYS
}

/// Not done here (no allocation-free way is wired up); the name stays that of the executable.
pub(crate) fn set_process_name(name: &CStr) {
    let _ = name;
}

/// The kqueue backend where the system has one; elsewhere (illumos) the kqueue crate's stand-in
/// says why not, reported as [`Error::BackendUnavailable`]. Which systems have one is decided
/// once, in the kqueue crate.
fn open_kqueue() -> Result<Box<dyn ForkTracker>, Error> {
    match vpstag_kqueue::Kqueue::new() {
        Ok(k) => Ok(Box::new(k)),
        Err(TrackerError::Unsupported(why)) => Err(Error::BackendUnavailable { backend: "kqueue", why }),
        Err(e) => Err(e.into()),
    }
}

/// Opens a backend: kqueue where the system has it, nothing else.
pub(crate) fn open_backend(choice: BackendChoice, notes: &mut Vec<String>) -> Result<Box<dyn ForkTracker>, Error> {
    let _ = notes;
    match choice {
        BackendChoice::Auto | BackendChoice::Kqueue => open_kqueue(),
        BackendChoice::Cnproc | BackendChoice::Ptrace | BackendChoice::Ebpf => Err(Error::BackendUnavailable {
            backend: match choice {
                BackendChoice::Cnproc => "cnproc",
                BackendChoice::Ptrace => "ptrace",
                _ => "ebpf",
            },
            why: format!("this backend is Linux-only; vpstag has no backend of that kind on {}", std::env::consts::OS),
        }),
    }
}

/// What a process has used: unsupported here (no process-table reader yet).
pub(crate) fn proc_usage(pid: Pid) -> io::Result<Option<super::ProcUsage>> {
    let _ = pid;
    Err(unsupported())
}

/// Whether `pid` ignores `SIGCHLD`: not known here (no process-table reader yet).
pub(crate) fn sigchld_ignored(pid: Pid) -> io::Result<Option<bool>> {
    let _ = pid;
    Err(unsupported())
}

/// Reaps `pid`, a child of ours, if it has exited (`waitpid` with `WNOHANG`: not every system
/// here has `wait4`, so the CPU time is not reported); `None` while it runs.
///
/// # References
/// - [`waitpid(2)`](https://man7.org/linux/man-pages/man2/waitpid.2.html)
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<super::Reaped>> {
    let mut status = 0;
    // SAFETY: waitpid on one pid with a valid out pointer on this stack.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid.as_raw() => Ok(Some(super::Reaped { status, cpu_ns: None })),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Closes every descriptor from `first` to `max_fd`. Async-signal-safe.
pub(crate) fn close_from(first: i32, max_fd: i32) {
    for fd in first..=max_fd {
        // SAFETY: close on an integer; a descriptor that is not open gives EBADF.
        unsafe { libc::close(fd) };
    }
}

/// No cgroups here: an `Unsupported` error (`crate::cgroup` finds no cgroup v2 mount before it
/// would ask).
pub(crate) fn fs_magic(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    let _ = fd;
    Err(io::Error::new(io::ErrorKind::Unsupported, "cgroups are a Linux facility"))
}
