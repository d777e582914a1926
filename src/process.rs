//! Processes as the system reports them: what the manager's scans see, the command line, a signal
//! that reaches one process and no later holder of its pid, and the peer of a Unix socket pinned
//! so that it is never confused with a later holder of its pid. The daemon (package `vpstag-cli`)
//! is built on these; they are the same calls the [`Manager`](crate::Manager) makes.
//!
//! ```no_run
//! use vpstag::{process, Pid};
//!
//! let pid = Pid::new(std::process::id() as i32).unwrap();
//! if let Some(p) = process::process(pid)? {
//!     println!("{} ({}), uid {}: {:?}", p.id.pid, p.name, p.uid, process::cmdline(pid));
//! }
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::os::unix::net::UnixStream;

use crate::{sys, Pid, ProcessId, Signal, StartTime};

/// One process as the system reports it now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessInfo {
    /// Its pid and start time.
    pub id: ProcessId,
    /// Its parent, when it has one in this PID namespace.
    pub ppid: Option<Pid>,
    /// Its real uid.
    pub uid: u32,
    /// Its threads (at least 1).
    pub threads: u32,
    /// Exited, not yet reaped (on Linux: a leader that exited while other threads may live on).
    pub zombie: bool,
    /// Its short name (Linux `comm`).
    pub name: String,
}

/// The process `pid`, or `None` when there is none.
///
/// # References
/// - [`proc_pid_stat(5)`](https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html) (Linux),
///   `kern.proc.pid` ([`sysctl(3)`](https://man.freebsd.org/cgi/man.cgi?query=sysctl&sektion=3), FreeBSD)
pub fn process(pid: Pid) -> io::Result<Option<ProcessInfo>> {
    sys::process(pid)
}

/// The command line of `pid`, for display: its arguments joined by spaces, `[name]` when it has
/// none (a kernel thread, a zombie); `None` when it cannot be read.
pub fn cmdline(pid: Pid) -> Option<String> {
    sys::cmdline(pid)
}

/// Like [`cmdline`], reading at most `max` bytes (a command line may be megabytes long); `true`
/// when it was longer and was cut.
pub fn cmdline_prefix(pid: Pid, max: usize) -> Option<(String, bool)> {
    sys::cmdline_prefix(pid, max)
}

/// Sends `sig` to the process `id` and to no other: where the system has pidfds (Linux 5.3+) the
/// pid is held before its start time is checked, so a process that exits and whose pid is reused
/// in between is never signalled. `Ok(false)` when `id` is gone.
///
/// # References
/// - [`pidfd_open(2)`](https://man7.org/linux/man-pages/man2/pidfd_open.2.html),
///   [`pidfd_send_signal(2)`](https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html),
///   [`kill(2)`](https://man7.org/linux/man-pages/man2/kill.2.html)
pub fn signal_exact(id: ProcessId, sig: Signal) -> io::Result<bool> {
    sys::signal_exact(id, sig.as_raw())
}

/// Makes the calling process the reaper of its orphaned descendants (Linux
/// `PR_SET_CHILD_SUBREAPER`, FreeBSD `PROC_REAP_ACQUIRE`).
///
/// # References
/// - [`PR_SET_CHILD_SUBREAPER`](https://man7.org/linux/man-pages/man2/PR_SET_CHILD_SUBREAPER.2const.html)
pub fn become_subreaper() -> io::Result<()> {
    match sys::become_subreaper() {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Whether a user with uid `uid` could signal `pid` itself, as [`kill(2)`] decides: root may
/// signal anyone, another user a process whose real or saved uid is its own (where the system
/// shows only the real uid, that one).
///
/// [`kill(2)`]: https://man7.org/linux/man-pages/man2/kill.2.html
pub fn may_signal(uid: u32, pid: Pid) -> bool {
    sys::may_signal(uid, pid)
}

/// The process (thread-group id) the task `tid` belongs to: `tid` itself for a process (a
/// thread-group leader), its process for another thread; `None` when there is no such task or
/// the system does not say (Linux only in this version).
///
/// ```no_run
/// use vpstag::{process, Pid};
///
/// let me = Pid::new(std::process::id() as i32).unwrap();
/// assert_eq!(process::thread_group(me), Some(me));
/// ```
///
/// # References
/// - [`proc_pid_status(5)`](https://man7.org/linux/man-pages/man5/proc_pid_status.5.html): `Tgid`
pub fn thread_group(tid: Pid) -> Option<Pid> {
    sys::thread_group(tid)
}

/// What a process has used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// User + system CPU time, in milliseconds.
    pub cpu_ms: u64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
}

/// The CPU time and resident memory of `pid`; `None` when it is gone or the system does not say
/// (Linux only in this version).
///
/// # References
/// - [`proc_pid_stat(5)`](https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html): `utime`,
///   `stime`, `rss`
pub fn usage(pid: Pid) -> Option<Usage> {
    sys::usage(pid).map(|(cpu_ms, rss_bytes)| Usage { cpu_ms, rss_bytes })
}

/// The process at the other end of a Unix stream socket, pinned when [`Peer::of`] was called, so
/// that a later holder of its pid is never taken for it (see [`Peer::state`]).
#[derive(Debug)]
pub struct Peer {
    pub(crate) pid: Pid,
    pub(crate) uid: u32,
    /// A pidfd of the very process (Linux 6.5+ `SO_PEERPIDFD`).
    #[allow(dead_code)]
    pub(crate) pidfd: Option<std::os::fd::OwnedFd>,
    /// Its start time, read right after [`Peer::of`] and checked to be no later than that (where
    /// no pidfd is to be had).
    #[allow(dead_code)]
    pub(crate) start: Option<StartTime>,
}

impl Peer {
    /// The peer of a connected (accepted) socket: its pid and effective uid when it connected
    /// (`SO_PEERCRED`), pinned by a pidfd (`SO_PEERPIDFD`, Linux 6.5+) or else by its start time.
    /// Linux only: elsewhere an error of kind `Unsupported`.
    ///
    /// # References
    /// - [`unix(7)`](https://man7.org/linux/man-pages/man7/unix.7.html): `SO_PEERCRED`, `SO_PEERPIDFD`
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        sys::socket_peer(std::os::fd::AsFd::as_fd(stream), sys::now_ns())
    }

    /// Its pid when it connected.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Its effective uid when it connected.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// What became of it: the process that now holds its pid is it (and alive), it is gone, or
    /// this cannot be told.
    pub fn state(&self) -> PeerState {
        sys::peer_state(self)
    }
}

/// What became of a [`Peer`].
#[derive(Debug)]
#[non_exhaustive]
pub enum PeerState {
    /// It still runs, as this process.
    Alive(ProcessInfo),
    /// It has exited (its pid may already be another process's).
    Gone,
    /// Its identity cannot be checked on this system (no pidfd, and no start time was read).
    Unsure,
}
