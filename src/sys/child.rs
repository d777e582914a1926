//! Our own children, the same on every Unix: waiting for and killing a first process.

use std::io;

use vpstag_tracker::Pid;

/// Reaps `pid`, a child of ours, if it has exited: `Some(wait status)`; `None` while it runs.
///
/// # References
/// - [`waitpid(2)`](https://man7.org/linux/man-pages/man2/waitpid.2.html)
pub(crate) fn try_reap(pid: Pid) -> io::Result<Option<i32>> {
    let mut status = 0;
    // SAFETY: waitpid on one pid with a valid out pointer on this stack.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::WNOHANG) };
    match r {
        0 => Ok(None),
        r if r == pid.as_raw() => Ok(Some(status)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Waits for `pid`, a child of ours, to exit and reaps it; its wait status.
pub(crate) fn reap(pid: Pid) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on one pid with a valid out pointer on this stack.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
        if r == pid.as_raw() {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
