//! Reaping a child of ours with its CPU time (`wait4`), on the systems that have it (Linux,
//! FreeBSD; illumos has none: `other.rs` waits without it).

use std::io;

use vpstag_tracker::Pid;

/// Reaps `pid`, a child of ours, if it has exited (`wait4` with `WNOHANG`): its wait status and
/// its CPU time together with that of the children it waited for (the kernel's `RUSAGE_BOTH` of
/// the child); `None` while it runs.
///
/// # References
/// - [`wait4(2)`](https://man7.org/linux/man-pages/man2/wait4.2.html)
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<super::Reaped>> {
    let mut status = 0;
    // SAFETY: rusage is plain integers: all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on one pid with valid out pointers on this stack.
    let r = unsafe { libc::wait4(pid.as_raw(), &mut status, libc::WNOHANG, &mut ru) };
    match r {
        0 => Ok(None),
        r if r == pid.as_raw() => Ok(Some(super::Reaped { status, cpu_ns: Some(super::rusage_ns(&ru)) })),
        _ => Err(io::Error::last_os_error()),
    }
}
