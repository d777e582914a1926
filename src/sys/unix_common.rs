//! Portable fallbacks shared by the non-Linux systems.

use std::io;

use vpstag_tracker::ProcessId;

use super::{PeerState, SocketPeer};

/// The peer of a Unix socket: not available here (the daemon's peer checks use Linux's
/// `SO_PEERCRED`/`SO_PEERPIDFD`; FreeBSD's `LOCAL_PEERCRED` has no pid).
pub(crate) fn socket_peer(sock: std::os::fd::BorrowedFd<'_>, accepted_ns: u64) -> io::Result<SocketPeer> {
    let _ = (sock, accepted_ns);
    Err(io::Error::new(io::ErrorKind::Unsupported, "peer credentials with a pid are Linux-only in this version"))
}

/// Never sure without a pidfd or start time.
pub(crate) fn peer_state(peer: &SocketPeer) -> PeerState {
    let _ = peer;
    PeerState::Unsure
}

/// `kill` after checking the start time (no pidfds here: a pid reused in between is a risk).
pub(crate) fn signal_exact(id: ProcessId, sig: i32) -> io::Result<bool> {
    match super::process(id.pid)? {
        Some(info) if info.id.start.0.abs_diff(id.start.0) <= super::start_tolerance() => {}
        _ => return Ok(false),
    }
    // SAFETY: kill with integer arguments.
    if unsafe { libc::kill(id.pid.as_raw(), sig) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(e)
}

/// The command line of a process, for display, cut to `max` bytes (`true` when cut).
pub(crate) fn cmdline_prefix(pid: vpstag_tracker::Pid, max: usize) -> Option<(String, bool)> {
    let c = super::cmdline(pid)?;
    let cut = c.len() > max;
    let mut end = max.min(c.len());
    while !c.is_char_boundary(end) {
        end -= 1;
    }
    Some((c[..end].to_string(), cut))
}

/// A new Unix stream socket (close-on-exec is not needed: the caller execs only after closing
/// it), or -1 (errno set). Async-signal-safe.
pub(crate) fn unix_stream_socket() -> libc::c_int {
    // SAFETY: socket(2) with integer arguments only.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }
}

/// The pid of a Unix socket's peer: not available here (FreeBSD's `LOCAL_PEERCRED` has no pid).
pub(crate) fn peer_pid(fd: std::os::fd::RawFd) -> Option<i32> {
    let _ = fd;
    None
}

/// Nothing to do here (Yama's `PR_SET_PTRACER` is Linux's).
pub(crate) fn allow_ptracer(pid: i32) {
    let _ = pid;
}

/// Whether a user with uid `uid` could signal `pid` itself: root, or the process's real uid (the
/// saved uid is not read here).
pub(crate) fn may_signal(uid: u32, pid: vpstag_tracker::Pid) -> bool {
    uid == 0 || matches!(super::process(pid), Ok(Some(i)) if i.uid == uid)
}

/// The process a thread belongs to: not read on this system yet.
pub(crate) fn thread_group(tid: vpstag_tracker::Pid) -> Option<vpstag_tracker::Pid> {
    let _ = tid;
    None
}

/// CPU time and memory of a process: not read on this system yet.
pub(crate) fn usage(pid: vpstag_tracker::Pid) -> Option<(u64, u64)> {
    let _ = pid;
    None
}
