//! Every system but Linux: the crate builds (its decoder is tested everywhere), and
//! [`CnProc::new`] says why there is no proc connector here.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, TrackerError};

use crate::{Config, Stats};

/// Why there is no proc connector on this system.
fn unsupported() -> TrackerError {
    TrackerError::Unsupported(format!(
        "the proc connector (netlink NETLINK_CONNECTOR) is a Linux interface; {} has none",
        std::env::consts::OS
    ))
}

/// The proc connector backend: Linux only; here [`CnProc::new`] always fails.
#[derive(Debug)]
pub struct CnProc {
    never: std::convert::Infallible,
}

impl CnProc {
    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn new() -> Result<CnProc, TrackerError> {
        Err(unsupported())
    }

    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn with_config(_config: Config) -> Result<CnProc, TrackerError> {
        Err(unsupported())
    }

    /// Never called: no value exists.
    pub fn receive_buffer_bytes(&self) -> usize {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn kernel_filter_active(&self) -> bool {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn stats(&self) -> Stats {
        match self.never {}
    }
}

impl ForkTracker for CnProc {
    fn kind(&self) -> BackendKind {
        BackendKind::Cnproc
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
}
