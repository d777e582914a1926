//! vpstag backend for the Linux netlink **proc connector** (`NETLINK_CONNECTOR`, `CN_IDX_PROC`).
//!
//! The kernel reports every fork, exec and exit on the host to the listeners of the proc
//! connector. [`CnProc`] subscribes and turns those reports into [`vpstag_tracker::Event`]s. It
//! watches the whole host (nothing to [`watch`](vpstag_tracker::ForkTracker::watch)), reports
//! threads, does not reap, and is asynchronous: a child may run before its fork event is read,
//! although the kernel queues the fork event before the child can run, so the order of events
//! is right.
//!
//! # Privileges
//!
//! | kernel | who may listen |
//! |---|---|
//! | before 6.6 (e.g. Debian 12's 6.1) | only `CAP_NET_ADMIN`: `bind` to the multicast group fails with `EPERM` otherwise, reported as [`TrackerError::PermissionDenied`](vpstag_tracker::TrackerError::PermissionDenied) |
//! | 6.6 and later | any user |
//!
//! On every kernel the listener must be in the initial user, PID and network namespaces: the
//! kernel silently ignores subscriptions from elsewhere (containers). [`CnProc::new`] notices the
//! missing acknowledgement and fails with
//! [`TrackerError::Unsupported`](vpstag_tracker::TrackerError::Unsupported) instead of reporting
//! nothing forever.
//!
//! The receive buffer is enlarged with `SO_RCVBUFFORCE`, which needs `CAP_NET_ADMIN`; without it
//! the backend falls back to `SO_RCVBUF`, which the kernel caps at `net.core.rmem_max`.
//! [`CnProc::receive_buffer_bytes`] says what was obtained. Each queued event costs about 820
//! bytes of buffer, so the system default (~200 KiB) overflows under a fork burst.
//!
//! # Losing events
//!
//! Events can be lost, and are then reported as [`EventKind::Lost`](vpstag_tracker::EventKind::Lost):
//!
//! - `reason: Overflow`, `count: None`: the socket buffer overflowed (`ENOBUFS`).
//! - `reason: SequenceGap`, `count: Some(n)`: the kernel numbers proc events per CPU; a jump in
//!   one CPU's numbers means `n` messages never reached us (an overflow shows up this way too, so
//!   one overflow may be reported twice: once as `Overflow`, then with its size as a gap).
//! - `reason: Other`: a datagram from the kernel could not be decoded.
//!
//! # The kernel event filter (off by default)
//!
//! Linux 6.6 lets a listener ask for some event types only ([`Config::kernel_filter`]); vpstag
//! would then receive only fork, exec and exit, which saves buffer space and wake-ups on a host
//! that changes uids or thread names a lot. But the kernel's per-CPU sequence counter also counts
//! the events it filters out, so with the filter on, gaps no longer mean loss and sequence-gap
//! detection is turned off: only buffer overflows are still noticed. Losses the kernel causes
//! without an overflow (an allocation failure while building the message) then go unreported.
//! The filter is sent only to kernels whose release is 6.6 or later (older kernels silently
//! ignore the request form); [`CnProc::kernel_filter_active`] says whether it is in effect.
//!
//! # Forged messages
//!
//! Any process may send a datagram to a netlink port. The socket is `connect`ed to the kernel's
//! port, so the kernel refuses unicasts from other sockets (`ECONNREFUSED` for the sender), and
//! the decoder drops anything whose sender is not the kernel (counted in [`Stats::rejected`]).
//!
//! # Cleanup
//!
//! Dropping a [`CnProc`] unsubscribes (`PROC_CN_MCAST_IGNORE`) before closing: the kernel keeps a
//! global listener count that a socket that merely closes does not decrement while other
//! listeners exist, and every fork on the host pays for building events while it is non-zero.
//!
//! # Portability
//!
//! On other systems the crate contains only [`decode`], the pure decoder, so that its tests run
//! everywhere.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod decode;

mod source;

use vpstag_tracker::Capabilities;

/// What [`CnProc`] promises: host-wide, asynchronous, with thread events, can lose events (and
/// says so), does not reap.
pub const CAPABILITIES: Capabilities = Capabilities::new().host_wide(true).thread_events(true).can_lose(true);

#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::BorrowedFd;
    use std::time::Duration;

    use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, TrackerError};

    use crate::source::Connection;

    /// How to open the proc connector.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct Config {
        /// Receive buffer to ask for, in bytes (default 8 MiB). Obtained with `SO_RCVBUFFORCE`
        /// when privileged, else with `SO_RCVBUF` up to `net.core.rmem_max`. 0 keeps the system
        /// default.
        pub receive_buffer: usize,
        /// Ask the kernel (6.6+) for fork, exec and exit events only. Off by default: it turns
        /// sequence-gap loss detection off (see the crate docs).
        pub kernel_filter: bool,
    }

    impl Config {
        /// The default receive buffer: 8 MiB, about 10,000 queued events.
        pub const DEFAULT_RECEIVE_BUFFER: usize = 8 << 20;
    }

    impl Default for Config {
        fn default() -> Config {
            Config { receive_buffer: Config::DEFAULT_RECEIVE_BUFFER, kernel_filter: false }
        }
    }

    /// Counters since the connector was opened.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct Stats {
        /// Receive buffer overflows (`ENOBUFS`), each reported as `Lost { reason: Overflow }`.
        pub overflows: u64,
        /// Gaps in the kernel's per-CPU sequence numbers, each reported as
        /// `Lost { reason: SequenceGap }`.
        pub sequence_gaps: u64,
        /// Messages missing in those gaps.
        pub lost_by_gap: u64,
        /// Proc connector messages received from the kernel, of every type (acks included).
        pub messages: u64,
        /// Of those, messages that give no event: acks and event types vpstag does not use (uid,
        /// gid, sid, ptrace, comm, coredump).
        pub ignored: u64,
        /// Datagrams dropped unread because they did not come from the kernel.
        pub rejected: u64,
        /// Datagrams or messages from the kernel that could not be decoded (each reported as
        /// `Lost { reason: Other }`).
        pub malformed: u64,
    }

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
}
