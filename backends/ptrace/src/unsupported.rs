//! Every system but Linux (FreeBSD first): the crate builds, [`Ptrace::new`] says why it cannot
//! work here. See "Other systems" in the [crate docs](crate).

use std::os::fd::BorrowedFd;
use std::time::Duration;

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, TrackerError, VpsId};

/// Why there is no live ptrace backend on this system.
pub const UNSUPPORTED: &str = "the ptrace backend is implemented for Linux only: FreeBSD's ptrace \
    reports forks through PT_FOLLOW_FORK/PT_LWP_EVENTS and PT_LWPINFO flags (PL_FLAG_FORKED, \
    PL_FLAG_CHILD, PL_FLAG_BORN, PL_FLAG_EXITED) rather than PTRACE_EVENT_* wait statuses, and has \
    no PTRACE_SEIZE/PTRACE_LISTEN to leave job-control stops to the program; that event loop is \
    not written yet. Use the kqueue backend (EVFILT_PROC with NOTE_TRACK), which is synchronous too";

/// The ptrace backend; cannot be created on this system.
#[derive(Debug)]
pub struct Ptrace {
    never: std::convert::Infallible,
}

impl Ptrace {
    /// Always [`TrackerError::Unsupported`] on this system; see [`UNSUPPORTED`].
    pub fn new() -> Result<Ptrace, TrackerError> {
        Err(TrackerError::Unsupported(UNSUPPORTED.into()))
    }

    /// As [`new`](Ptrace::new).
    pub fn with_exit_stops(_exit_stops: bool) -> Result<Ptrace, TrackerError> {
        Ptrace::new()
    }

    /// As [`new`](Ptrace::new).
    pub fn with_config(_config: crate::Config) -> Result<Ptrace, TrackerError> {
        Ptrace::new()
    }
}

impl ForkTracker for Ptrace {
    fn kind(&self) -> BackendKind {
        crate::KIND
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
