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

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        mod linux;
        pub use linux::*;
    } else if #[cfg(target_os = "freebsd")] {
        mod freebsd;
        pub use freebsd::*;
    } else {
        mod other;
        pub use other::*;
    }
}
