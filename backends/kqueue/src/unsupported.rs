//! Every system without a kqueue that follows forks (Linux, illumos, ...): the crate builds (its
//! decoder is tested everywhere), and [`Kqueue::new`] says why there is nothing to open.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, TrackerError, VpsId};

fn unsupported() -> TrackerError {
    TrackerError::Unsupported(format!(
        "{} has no kqueue process tracking; on illumos process contracts (contract(5)) are the mechanism, \
         not implemented yet; on Linux use cnproc, ptrace or ebpf",
        std::env::consts::OS
    ))
}

/// The kqueue backend: only on the BSDs; here [`Kqueue::new`] always fails.
#[derive(Debug)]
pub struct Kqueue {
    never: std::convert::Infallible,
}

impl Kqueue {
    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn new() -> Result<Kqueue, TrackerError> {
        Err(unsupported())
    }
}

impl ForkTracker for Kqueue {
    fn kind(&self) -> BackendKind {
        BackendKind::Kqueue
    }

    fn capabilities(&self) -> Capabilities {
        crate::CAPABILITIES
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.never {}
    }

    fn read_events(&mut self, _out: &mut Vec<Event>, _timeout: Option<Duration>) -> Result<usize, TrackerError> {
        match self.never {}
    }

    fn watch(&mut self, _root: Pid, _vps: VpsId) -> Result<(), TrackerError> {
        match self.never {}
    }
}

/// See [`crate::reaper_descendants`]: FreeBSD only.
pub(crate) fn reaper_descendants(reaper: Pid) -> Result<Vec<Pid>, TrackerError> {
    Err(TrackerError::Unsupported(format!(
        "reaper_descendants({reaper}): reaper lists (procctl PROC_REAP_GETPIDS) exist on FreeBSD only"
    )))
}
