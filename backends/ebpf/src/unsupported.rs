//! Every system but Linux: the crate builds (its decoder is tested everywhere) and
//! [`Ebpf::new`] says that eBPF is Linux's.

use std::convert::Infallible;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, StartTime, TrackerError, VpsId};

use crate::{Config, Counters, Member, Reporting, CAPABILITIES};

/// The eBPF fork tracker: Linux only; here [`Ebpf::new`] always fails.
#[derive(Debug)]
pub struct Ebpf {
    never: Infallible,
}

fn unsupported() -> TrackerError {
    TrackerError::Unsupported("the eBPF backend is Linux only; use --backend kqueue or ptrace".to_owned())
}

impl Ebpf {
    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn new() -> Result<Ebpf, TrackerError> {
        Err(unsupported())
    }

    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn with_config(_config: Config) -> Result<Ebpf, TrackerError> {
        Err(unsupported())
    }

    /// Always [`TrackerError::Unsupported`] on this system.
    pub fn check_system() -> Result<(), TrackerError> {
        Err(unsupported())
    }

    /// Never called: no value exists.
    pub fn config(&self) -> Config {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn counters(&self) -> Result<Counters, TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn set_reporting(&mut self, _reporting: Reporting) -> Result<(), TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn reporting(&self) -> Reporting {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn set_wakeup_interval(&mut self, _interval: Duration) -> Result<(), TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn tag_of(&self, _pid: Pid) -> Result<Option<(VpsId, StartTime)>, TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn raw_entry(&self, _pid: Pid) -> Result<Option<Member>, TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn tag(&self, _pid: Pid, _vps: VpsId) -> Result<(), TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn tag_root(&self, _pid: Pid, _vps: VpsId) -> Result<(), TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn entries(&self) -> Result<Vec<Member>, TrackerError> {
        match self.never {}
    }

    /// Never called: no value exists.
    pub fn members(&self, _vps: VpsId) -> Result<Vec<Member>, TrackerError> {
        match self.never {}
    }
}

impl ForkTracker for Ebpf {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebpf
    }
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.never {}
    }
    fn read_events(&mut self, _out: &mut Vec<Event>, _timeout: Option<Duration>) -> Result<usize, TrackerError> {
        match self.never {}
    }
}
