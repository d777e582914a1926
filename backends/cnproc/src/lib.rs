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
//! # Layout
//!
//! As in every vpstag backend: [`decode`] turns datagrams into events (pure, unit-tested on every
//! OS), `source.rs` holds the system calls and every `unsafe` block, `tracker.rs` the
//! [`ForkTracker`](vpstag_tracker::ForkTracker) impl that glues them, and `unsupported.rs` the
//! stand-in for other systems.
//!
//! # Portability
//!
//! On other systems [`decode`], [`Config`], [`Stats`] and [`CAPABILITIES`] build as here, and
//! [`CnProc::new`] returns [`TrackerError::Unsupported`](vpstag_tracker::TrackerError::Unsupported).
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use vpstag_tracker::Capabilities;

pub mod decode;

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        #[allow(unsafe_code)]
        mod source;
        mod tracker;
        pub use tracker::CnProc;
    } else {
        mod unsupported;
        pub use unsupported::CnProc;
    }
}

/// What [`CnProc`] promises: host-wide, asynchronous, with thread events, can lose events (and
/// says so), does not reap.
pub const CAPABILITIES: Capabilities = Capabilities::new().host_wide(true).thread_events(true).can_lose(true);

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
