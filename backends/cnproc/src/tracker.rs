//! [`CnProc`]: the [`ForkTracker`] impl, gluing the socket (`source.rs`) to the decoder
//! ([`crate::decode`]). Linux only.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, TrackerError};

use crate::source::Connection;
use crate::{Config, Stats};

/// The proc connector backend. See the [crate docs](crate).
pub struct CnProc {
    conn: Connection,
}

impl CnProc {
    /// Opens the proc connector with the default [`Config`].
    pub fn new() -> Result<CnProc, TrackerError> {
        CnProc::with_config(Config::default())
    }

    /// Opens the proc connector: creates the socket, binds it to the proc connector group,
    /// sizes its buffer, subscribes, and waits (briefly) for the kernel to acknowledge.
    ///
    /// Errors: [`TrackerError::PermissionDenied`] when the kernel lets only `CAP_NET_ADMIN`
    /// listen (before 6.6); [`TrackerError::Unsupported`] without a proc connector, or outside
    /// the initial namespaces.
    pub fn with_config(config: Config) -> Result<CnProc, TrackerError> {
        Ok(CnProc { conn: Connection::open(&config)? })
    }

    /// The receive buffer the kernel granted, in bytes, as `getsockopt(SO_RCVBUF)` reports
    /// it (the kernel doubles a request to cover its bookkeeping, so 8 MiB asked shows as
    /// 16 MiB; without privilege the request is first capped at `net.core.rmem_max`).
    pub fn receive_buffer_bytes(&self) -> usize {
        self.conn.receive_buffer()
    }

    /// Whether the kernel event filter is in effect (asked for in [`Config::kernel_filter`]
    /// and supported by this kernel); sequence-gap detection is then off.
    pub fn kernel_filter_active(&self) -> bool {
        self.conn.filter_active()
    }

    /// Counters since the connector was opened.
    pub fn stats(&self) -> Stats {
        self.conn.stats()
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
        self.conn.as_fd()
    }

    /// Drains every queued datagram after waiting up to `timeout` for the first one.
    ///
    /// Events that arrived while [`CnProc::new`] waited for the kernel's acknowledgement are
    /// returned by the first call even though the descriptor may not poll readable for them.
    fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
        self.conn.read_events(out, timeout)
    }
}
