//! Everything that differs per operating system, selected at this one place: the process-table
//! snapshot used for resynchronisation, a process's CPU and memory, reaping our own children with
//! their CPU time, the clock, how a first process becomes the reaper of its descendants, and which
//! backends exist. Every OS file has the same function names (`scan`, `process`, `proc_usage`,
//! `try_reap`, ...).

pub(crate) use crate::process::{Peer as SocketPeer, PeerState, ProcessInfo as ProcInfo};

mod child;
pub(crate) use child::*;

use vpstag_tracker::{Pid, ProcessId};

/// What one process has used so far, as the system reports it (`proc_usage`): the accounting's
/// raw material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcUsage {
    /// Its pid and start time (to tell it from a later holder of the pid).
    pub(crate) id: ProcessId,
    /// Its parent now: the process that will reap it.
    pub(crate) ppid: Option<Pid>,
    /// Its own user + system CPU time, every thread included (Linux `utime + stime`, FreeBSD
    /// `ki_rusage`), in nanoseconds.
    pub(crate) cpu_self_ns: u64,
    /// The CPU time of the children it has waited for, and of theirs (Linux `cutime + cstime`,
    /// FreeBSD `ki_rusage_ch`), in nanoseconds.
    pub(crate) cpu_children_ns: u64,
    /// Resident memory, in bytes.
    pub(crate) rss_bytes: u64,
    /// Whether it has exited and waits for its reaper.
    pub(crate) zombie: bool,
}

/// A child of ours that `try_reap` collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reaped {
    /// Its wait status.
    pub(crate) status: i32,
    /// Its CPU time and that of the children it waited for (`wait4`'s rusage), in nanoseconds,
    /// where the system reports it.
    pub(crate) cpu_ns: Option<u64>,
}

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        mod linux;
        mod wait4;
        pub use linux::*;
        pub(crate) use wait4::*;
    } else if #[cfg(target_os = "freebsd")] {
        mod freebsd;
        mod unix_common;
        mod wait4;
        pub use freebsd::*;
        pub(crate) use wait4::*;
        pub(crate) use unix_common::*;
    } else {
        mod other;
        mod unix_common;
        pub use other::*;
        pub(crate) use unix_common::*;
    }
}
