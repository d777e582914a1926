//! Who is asking, and what that user may do to a process.

use super::*;

/// The peer: who sent a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub(super) pid: i32,
    pub(super) uid: u32,
}

pub(super) use vpstag::process::may_signal;

/// CPU time (ms) and resident memory (bytes) of a process, where the system says.
pub(super) fn usage(pid: Pid) -> (u64, u64) {
    vpstag::process::usage(pid).map_or((0, 0), |u| (u.cpu_ms, u.rss_bytes))
}
