//! Our own children, the same on every Unix: waiting for a first process (`try_reap`, which
//! also reads the CPU time, is per OS).

use std::io;

use vpstag_tracker::Pid;

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

/// User + system time of a `rusage`, in nanoseconds.
#[allow(dead_code)] // used where the system reports rusage (sys/linux.rs, sys/freebsd.rs)
pub(crate) fn rusage_ns(ru: &libc::rusage) -> u64 {
    timeval_ns(&ru.ru_utime).saturating_add(timeval_ns(&ru.ru_stime))
}

fn timeval_ns(tv: &libc::timeval) -> u64 {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let usecs = u64::try_from(tv.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(usecs.saturating_mul(1_000))
}
