//! Everything that differs per operating system, selected at this one place: the process-table
//! snapshot used for resynchronisation, the clock, how a first process becomes the reaper of its
//! descendants, and which backends exist.

use vpstag_tracker::{Pid, ProcessId};

/// One process as the system reports it now.
#[derive(Clone, Debug)]
pub(crate) struct ProcInfo {
    pub id: ProcessId,
    pub ppid: Option<Pid>,
    #[allow(dead_code)]
    pub uid: u32,
    pub threads: u32,
    /// Exited, not yet reaped (on Linux: a leader that exited while other threads may live on).
    pub zombie: bool,
    #[allow(dead_code)]
    pub name: String,
}

/// The process at the other end of a Unix socket, pinned when the connection was accepted, so that
/// a later holder of its pid is never taken for it (see [`PeerState`]).
#[derive(Debug)]
pub(crate) struct SocketPeer {
    /// Its pid when it connected.
    pub pid: Pid,
    /// Its effective uid when it connected.
    pub uid: u32,
    /// A pidfd of the very process (Linux 6.5+ `SO_PEERPIDFD`).
    #[allow(dead_code)]
    pub(crate) pidfd: Option<std::os::fd::OwnedFd>,
    /// Its start time, read right after the connection was accepted and checked to be no later than
    /// that (where no pidfd is to be had).
    #[allow(dead_code)]
    pub(crate) start: Option<vpstag_tracker::StartTime>,
}

/// What became of a [`SocketPeer`].
#[derive(Debug)]
pub(crate) enum PeerState {
    /// It still runs, as this process.
    Alive(ProcInfo),
    /// It has exited (its pid may already be another process's).
    Gone,
    /// Its identity cannot be checked on this system (no pidfd, and no start time was read).
    Unsure,
}

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        mod linux;
        pub use linux::*;
    } else if #[cfg(target_os = "freebsd")] {
        mod freebsd;
        mod unix_common;
        pub use freebsd::*;
        pub(crate) use unix_common::*;
    } else {
        mod other;
        mod unix_common;
        pub use other::*;
        pub(crate) use unix_common::*;
    }
}
