//! The contract between vpstag and its fork-tracking backends.
//!
//! A backend (the Linux proc connector, ptrace, FreeBSD's kqueue, eBPF, or one of your own) turns
//! what its kernel reports into a stream of [`Event`]s: a process or thread was created, a process
//! exec'd, a thread or process exited, or events were lost. The `vpstag` crate consumes that
//! stream and keeps the mapping table (pid -> VPS).
//!
//! This crate holds no OS code, so a backend for a new system depends on nothing but this.
//!
//! ```
//! use vpstag_tracker::{Event, EventKind, Pid};
//!
//! let parent = Pid::new(100).unwrap();
//! let child = Pid::new(101).unwrap();
//! let ev = Event::new(EventKind::Fork { parent, child, child_thread: child, thread: false, child_start: None });
//! assert!(matches!(ev.kind, EventKind::Fork { thread: false, .. }));
//! ```
//!
//! # Features
//!
//! - `serde`: `Serialize` and `Deserialize` for the data types ([`Pid`], [`VpsId`], [`StartTime`],
//!   [`ProcessId`], [`ExitStatus`], [`Event`], [`EventKind`], [`LossReason`]). A [`Pid`], a
//!   [`VpsId`] and a [`StartTime`] are plain integers (`42`, not `{"0":42}`), so a struct that
//!   switches from raw integers to these types keeps its format byte for byte; a [`Pid`] that is
//!   not positive is refused when read. The enums are externally tagged, in snake case:
//!   `{"exited":3}`, `{"signaled":{"signal":9,"core_dumped":false}}`.
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! use vpstag_tracker::{Pid, VpsId};
//!
//! assert_eq!(serde_json::to_string(&Pid::new(42).unwrap()).unwrap(), "42");
//! assert_eq!(serde_json::from_str::<VpsId>("7").unwrap(), VpsId(7));
//! assert!(serde_json::from_str::<Pid>("0").is_err());
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

/// A process or thread id, always positive.
///
/// On Linux a thread has its own id; the id of a process is that of its thread-group leader
/// (the "tgid"). Ids are those of the initial PID namespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(i32);

impl Pid {
    /// Wraps a raw id; `None` unless it is positive.
    pub const fn new(raw: i32) -> Option<Pid> {
        if raw > 0 {
            Some(Pid(raw))
        } else {
            None
        }
    }

    /// The raw id.
    pub const fn as_raw(self) -> i32 {
        self.0
    }
}

/// The bare number, with the formatter's width and alignment (`{:>7}`).
impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The bare number, with the formatter's width and alignment (`{:>7}`).
impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A plain integer, as [`Pid::as_raw`].
#[cfg(feature = "serde")]
impl serde::Serialize for Pid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(self.0)
    }
}

/// A plain integer; one that is not positive is refused (as [`Pid::new`] does).
#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Pid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = i32::deserialize(d)?;
        Pid::new(raw).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Signed(raw.into()), &"a positive process id")
        })
    }
}

impl std::str::FromStr for Pid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw: i32 = s.trim().parse().map_err(|_| format!("not a process id: {s:?}"))?;
        Pid::new(raw).ok_or_else(|| format!("not a process id (must be positive): {s:?}"))
    }
}

/// When a process started, in the units its system reports.
///
/// On Linux this is field 22 of `/proc/PID/stat`: clock ticks since boot (`CLK_TCK`, usually 100
/// a second). On the BSDs it is `ki_start` in microseconds since the epoch. Only compare start
/// times taken on the same system.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(transparent))]
pub struct StartTime(pub u64);

/// The identity of a process: a PID is reused, a (PID, start time) pair is not.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ProcessId {
    /// The process id (thread-group id on Linux).
    pub pid: Pid,
    /// When the process started.
    pub start: StartTime,
}

/// The id of a virtual server (VPS), job or sandbox. vpstag hands them out; backends that hold
/// tags themselves (kqueue's `udata`, an eBPF map) store and report it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(transparent))]
pub struct VpsId(pub u64);

/// The bare number, with the formatter's width and alignment.
impl fmt::Display for VpsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How a process ended, as `wait(2)` would report it.
///
/// Exhaustive on purpose: `wait(2)` knows these two endings, and a consumer should be able to
/// match on them without a catch-all.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "snake_case"))]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// Decodes a raw wait status (`WIFEXITED`, `WTERMSIG`, ...). `None` for a stop status.
    pub fn from_wait_status(status: i32) -> Option<ExitStatus> {
        let sig = status & 0x7f;
        if sig == 0 {
            Some(ExitStatus::Exited((status >> 8) & 0xff))
        } else if sig != 0x7f {
            Some(ExitStatus::Signaled { signal: sig, core_dumped: status & 0x80 != 0 })
        } else {
            None
        }
    }

    /// The exit code a shell would report: the code, or 128 + signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled { signal, core_dumped: true } => {
                write!(f, "killed by signal {signal} (core dumped)")
            }
            ExitStatus::Signaled { signal, .. } => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Why a backend reports [`EventKind::Lost`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum LossReason {
    /// The receive buffer overflowed (`ENOBUFS` on a netlink socket).
    Overflow,
    /// A gap in the kernel's sequence numbers: messages were dropped before they reached us.
    SequenceGap,
    /// The kernel could not follow a child (FreeBSD `NOTE_TRACKERR`, a full eBPF map).
    TrackingError,
    /// Anything else; the backend says what in its own docs.
    Other,
    /// Not the backend: a subscriber's queue was full, so the events it would have held were
    /// dropped (the table has them; only that subscriber missed them).
    SubscriberBehind,
}

/// What happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum EventKind {
    /// A process or thread was created.
    Fork {
        /// The process (thread-group id) the child counts as a child of: for `clone(CLONE_PARENT)`
        /// the caller's parent, as the kernel records it.
        parent: Pid,
        /// The process (thread-group id) of the new task; equal to `parent` when `thread` is true.
        child: Pid,
        /// The id of the new task itself (its thread id).
        child_thread: Pid,
        /// True when a thread was created inside `parent`, not a new process.
        thread: bool,
        /// The child's start time, when the backend could read it while the child was known to be
        /// that process (ptrace reads it while the child is stopped). `None` otherwise.
        child_start: Option<StartTime>,
    },
    /// A process replaced its program. `thread` is the task that called `execve`; after the call
    /// it has become the thread-group leader, so the process keeps its id `pid`.
    Exec {
        /// The process (thread-group id).
        pid: Pid,
        /// The thread that called `execve`.
        thread: Pid,
    },
    /// A thread or a whole process exited.
    Exit {
        /// The process (thread-group id).
        pid: Pid,
        /// The task that exited; equal to `pid` for the thread-group leader.
        thread: Pid,
        /// The wait status, when known.
        status: Option<ExitStatus>,
        /// `Some(true)` when the whole process is gone, `Some(false)` when other threads live on,
        /// `None` when the backend cannot tell (the proc connector reports each thread's exit, and
        /// a leader may exit before its threads).
        group_dead: Option<bool>,
    },
    /// Events were lost: the consumer must resynchronise from a fresh scan of the system.
    Lost {
        /// How many were lost, when known.
        count: Option<u64>,
        /// How the loss was noticed.
        reason: LossReason,
    },
}

/// One thing the kernel reported.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// When, in nanoseconds of the boot clock (Linux `CLOCK_BOOTTIME`), if the backend knows.
    /// The core uses it to ignore events older than a table entry (PID reuse) or than a resync.
    pub time_ns: Option<u64>,
    /// The VPS this event belongs to, when the backend holds tags itself (see
    /// [`Capabilities::holds_tags`]).
    pub tag: Option<VpsId>,
    /// The CPU that reported it, if known.
    pub cpu: Option<u32>,
    /// With the [`Exit`](EventKind::Exit) of a whole process (`group_dead` not `Some(false)`):
    /// the CPU time the process had used when it exited, in nanoseconds: user + system time of
    /// all its threads plus that of the children it had waited for (Linux `utime + stime +
    /// cutime + cstime`). Set only by a backend that read it before anyone could reap the process
    /// (see [`Capabilities::exit_usage`]), so that it is the process's final figure whoever
    /// reaps it; `None` otherwise, and on every other event.
    ///
    /// Absent from the serialised form when `None`, so older readers and writers still agree.
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "Option::is_none"))]
    pub exit_cpu_ns: Option<u64>,
}

impl Event {
    /// An event with no time, tag, CPU or exit figure.
    pub const fn new(kind: EventKind) -> Event {
        Event { kind, time_ns: None, tag: None, cpu: None, exit_cpu_ns: None }
    }
}

/// Which mechanism a backend uses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum BackendKind {
    /// Linux netlink proc connector.
    Cnproc,
    /// ptrace fork following.
    Ptrace,
    /// BSD kqueue `EVFILT_PROC` with `NOTE_TRACK`.
    Kqueue,
    /// An eBPF program keeping the table in the kernel.
    Ebpf,
    /// A third-party backend.
    Other(&'static str),
}

impl BackendKind {
    /// The name used on the command line (`--backend NAME`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cnproc => "cnproc",
            BackendKind::Ptrace => "ptrace",
            BackendKind::Kqueue => "kqueue",
            BackendKind::Ebpf => "ebpf",
            BackendKind::Other(n) => n,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a backend can promise; the core adapts to it.
///
/// New promises may be added in later versions, so a backend builds its value from
/// [`Capabilities::new`] (nothing promised) and switches on what it does; a flag it does not
/// know about stays at its conservative default.
///
/// ```
/// use vpstag_tracker::Capabilities;
///
/// // A backend that follows only what it was asked to watch, synchronously, without threads.
/// const CAPS: Capabilities = Capabilities::new().synchronous(true).can_lose(true);
/// assert!(CAPS.synchronous && CAPS.can_lose && !CAPS.host_wide && CAPS.resync_every.is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// It sees every process on the host (proc connector, eBPF), not just the ones it was asked to
    /// [`watch`](ForkTracker::watch).
    pub host_wide: bool,
    /// It holds the tags itself and reports them in [`Event::tag`] (kqueue `udata`, eBPF map).
    pub holds_tags: bool,
    /// A child is recorded before it runs its first instruction (ptrace, kqueue, eBPF).
    pub synchronous: bool,
    /// It reports thread creation and thread exits, not just processes.
    pub thread_events: bool,
    /// It waits for (reaps) the processes it follows, so nobody else in this process may call
    /// `waitpid` on them (ptrace).
    pub reaps: bool,
    /// It can lose events and then reports [`EventKind::Lost`].
    pub can_lose: bool,
    /// It can also miss a child *without* reporting it (FreeBSD's `knote_fork` skips a parent
    /// knote that is "in flux"): the consumer should resynchronise this often.
    pub resync_every: Option<Duration>,
    /// It reads each exiting process's CPU time before anyone can reap the process and reports
    /// it in [`Event::exit_cpu_ns`] with the process's exit (ptrace: `wait4`'s rusage when its
    /// tracer collects the process; eBPF: in the kernel at `sched_process_exit`). The backend's
    /// docs say when the figure can still be missing; the consumer then falls back on what it
    /// read itself.
    pub exit_usage: bool,
}

impl Capabilities {
    /// Nothing promised: every flag `false`, `resync_every` `None` (the same as `Default`).
    pub const fn new() -> Capabilities {
        Capabilities {
            host_wide: false,
            holds_tags: false,
            synchronous: false,
            thread_events: false,
            reaps: false,
            can_lose: false,
            resync_every: None,
            exit_usage: false,
        }
    }

    /// Sets [`host_wide`](Capabilities#structfield.host_wide).
    pub const fn host_wide(mut self, yes: bool) -> Capabilities {
        self.host_wide = yes;
        self
    }

    /// Sets [`holds_tags`](Capabilities#structfield.holds_tags).
    pub const fn holds_tags(mut self, yes: bool) -> Capabilities {
        self.holds_tags = yes;
        self
    }

    /// Sets [`synchronous`](Capabilities#structfield.synchronous).
    pub const fn synchronous(mut self, yes: bool) -> Capabilities {
        self.synchronous = yes;
        self
    }

    /// Sets [`thread_events`](Capabilities#structfield.thread_events).
    pub const fn thread_events(mut self, yes: bool) -> Capabilities {
        self.thread_events = yes;
        self
    }

    /// Sets [`reaps`](Capabilities#structfield.reaps).
    pub const fn reaps(mut self, yes: bool) -> Capabilities {
        self.reaps = yes;
        self
    }

    /// Sets [`can_lose`](Capabilities#structfield.can_lose).
    pub const fn can_lose(mut self, yes: bool) -> Capabilities {
        self.can_lose = yes;
        self
    }

    /// Sets [`exit_usage`](Capabilities#structfield.exit_usage).
    pub const fn exit_usage(mut self, yes: bool) -> Capabilities {
        self.exit_usage = yes;
        self
    }

    /// Sets [`resync_every`](Capabilities#structfield.resync_every).
    pub const fn resync_every(mut self, every: Option<Duration>) -> Capabilities {
        self.resync_every = every;
        self
    }
}

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// The system refused for lack of privilege; `hint` says what to do about it.
    #[error("{what}: permission denied; {hint}")]
    PermissionDenied {
        /// What was attempted.
        what: String,
        /// How to fix it.
        hint: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// This backend cannot work on this system; the message says why and what to use instead.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The process does not exist (any more).
    #[error("no such process: {0}")]
    NoSuchProcess(Pid),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl TrackerError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> TrackerError {
        TrackerError::Io { context: context.into(), source }
    }
}

/// A source of fork/exec/exit events.
///
/// Contract:
/// - Events of one process arrive in the order they happened, and a child's creation arrives
///   before any event of that child (for the proc connector the kernel queues the fork event before
///   the child can run).
/// - When the backend may have missed an event it says so with [`EventKind::Lost`], never silently.
/// - [`as_fd`](ForkTracker::as_fd) becomes readable when [`read_events`](ForkTracker::read_events)
///   has something to return, so the tracker can sit in a `poll`/mio/tokio loop.
pub trait ForkTracker: Send {
    /// Which mechanism this is.
    fn kind(&self) -> BackendKind;

    /// What it promises.
    fn capabilities(&self) -> Capabilities;

    /// A descriptor that polls readable when events are waiting.
    fn as_fd(&self) -> BorrowedFd<'_>;

    /// Appends the events that are ready to `out` and returns how many were appended.
    ///
    /// `timeout`: `None` blocks until at least one event is ready; `Some(Duration::ZERO)` only
    /// drains what is queued; otherwise waits at most that long (and may return 0). Backends
    /// drain in batches: one call returns everything already queued.
    fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError>;

    /// Starts following `root` (and, from now on, every descendant) as a member of `vps`.
    ///
    /// The caller holds `root` still (a start gate) until this returns, so that it cannot fork
    /// before the backend follows it. Host-wide backends that need nothing (the proc connector)
    /// keep the default, which does nothing.
    fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
        let _ = (root, vps);
        Ok(())
    }

    /// Stops following the processes of `vps`, where the backend holds per-VPS state.
    fn forget(&mut self, vps: VpsId) -> Result<(), TrackerError> {
        let _ = vps;
        Ok(())
    }

    /// The tag a backend that holds tags itself has for `pid` (see [`Capabilities::holds_tags`]).
    /// `None` when the backend keeps no tags.
    fn lookup(&self, pid: Pid) -> Option<VpsId> {
        let _ = pid;
        None
    }
}

impl<T: ForkTracker + ?Sized> ForkTracker for Box<T> {
    fn kind(&self) -> BackendKind {
        (**self).kind()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn as_fd(&self) -> BorrowedFd<'_> {
        (**self).as_fd()
    }
    fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
        (**self).read_events(out, timeout)
    }
    fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
        (**self).watch(root, vps)
    }
    fn forget(&mut self, vps: VpsId) -> Result<(), TrackerError> {
        (**self).forget(vps)
    }
    fn lookup(&self, pid: Pid) -> Option<VpsId> {
        (**self).lookup(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_rejects_non_positive() {
        assert!(Pid::new(0).is_none());
        assert!(Pid::new(-5).is_none());
        assert_eq!(Pid::new(7).map(Pid::as_raw), Some(7));
        assert!("abc".parse::<Pid>().is_err());
        assert!("0".parse::<Pid>().is_err());
        assert_eq!("42".parse::<Pid>().unwrap().as_raw(), 42);
    }

    #[test]
    fn wait_status_decodes() {
        assert_eq!(ExitStatus::from_wait_status(0), Some(ExitStatus::Exited(0)));
        assert_eq!(ExitStatus::from_wait_status(3 << 8), Some(ExitStatus::Exited(3)));
        assert_eq!(ExitStatus::from_wait_status(9), Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
        assert_eq!(
            ExitStatus::from_wait_status(11 | 0x80),
            Some(ExitStatus::Signaled { signal: 11, core_dumped: true })
        );
        // A stop status (WIFSTOPPED) is not an exit.
        assert_eq!(ExitStatus::from_wait_status((19 << 8) | 0x7f), None);
        assert_eq!(ExitStatus::Signaled { signal: 15, core_dumped: false }.shell_code(), 143);
    }

    #[test]
    fn capabilities_start_from_nothing() {
        assert_eq!(Capabilities::new(), Capabilities::default());
        let c = Capabilities::new()
            .host_wide(true)
            .holds_tags(true)
            .synchronous(true)
            .thread_events(true)
            .reaps(true)
            .can_lose(true)
            .exit_usage(true)
            .resync_every(Some(Duration::from_secs(5)));
        assert!(c.host_wide && c.holds_tags && c.synchronous && c.thread_events && c.reaps && c.can_lose);
        assert!(c.exit_usage);
        assert_eq!(c.resync_every, Some(Duration::from_secs(5)));
        assert_eq!(c.host_wide(false).reaps(false), Capabilities { host_wide: false, reaps: false, ..c });
    }

    #[test]
    fn pid_formats_with_width() {
        let p = Pid::new(42).unwrap();
        assert_eq!(format!("[{p:>5}] [{p:<4}] [{p:?}]"), "[   42] [42  ] [42]");
        assert_eq!(format!("[{:>3}]", VpsId(7)), "[  7]");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn ids_serialise_as_plain_integers() {
        let pid = Pid::new(42).unwrap();
        assert_eq!(serde_json::to_string(&pid).unwrap(), "42");
        assert_eq!(serde_json::from_str::<Pid>("42").unwrap(), pid);
        for bad in ["0", "-3", "\"42\"", "4294967296"] {
            assert!(serde_json::from_str::<Pid>(bad).is_err(), "{bad} was accepted as a pid");
        }
        assert_eq!(serde_json::to_string(&VpsId(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<VpsId>("7").unwrap(), VpsId(7));
        assert_eq!(serde_json::to_string(&StartTime(5)).unwrap(), "5");
        let id = ProcessId { pid, start: StartTime(5) };
        assert_eq!(serde_json::to_string(&id).unwrap(), r#"{"pid":42,"start":5}"#);
        assert_eq!(serde_json::from_str::<ProcessId>(r#"{"pid":42,"start":5}"#).unwrap(), id);
        assert!(serde_json::from_str::<ProcessId>(r#"{"pid":0,"start":5}"#).is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn statuses_and_events_round_trip() {
        let exited = ExitStatus::Exited(3);
        let killed = ExitStatus::Signaled { signal: 9, core_dumped: false };
        assert_eq!(serde_json::to_string(&exited).unwrap(), r#"{"exited":3}"#);
        assert_eq!(serde_json::to_string(&killed).unwrap(), r#"{"signaled":{"signal":9,"core_dumped":false}}"#);
        let pid = Pid::new(10).unwrap();
        let events = [
            Event::new(EventKind::Fork { parent: pid, child: pid, child_thread: pid, thread: true, child_start: None }),
            Event {
                tag: Some(VpsId(2)),
                time_ns: Some(5),
                cpu: Some(1),
                ..Event::new(EventKind::Exec { pid, thread: pid })
            },
            Event::new(EventKind::Exit { pid, thread: pid, status: Some(killed), group_dead: Some(true) }),
            Event {
                exit_cpu_ns: Some(300_000_000),
                ..Event::new(EventKind::Exit { pid, thread: pid, status: None, group_dead: Some(true) })
            },
            Event::new(EventKind::Lost { count: Some(4), reason: LossReason::SequenceGap }),
        ];
        for ev in events {
            let json = serde_json::to_string(&ev).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), ev, "{json}");
        }
        // Without an exit figure the form is what it was before the field existed.
        let plain = serde_json::to_string(&events[0]).unwrap();
        assert!(!plain.contains("exit_cpu_ns"), "{plain}");
        let old = r#"{"kind":{"exec":{"pid":10,"thread":10}},"time_ns":null,"tag":null,"cpu":null}"#;
        assert_eq!(serde_json::from_str::<Event>(old).unwrap(), Event::new(EventKind::Exec { pid, thread: pid }));
        let lost = serde_json::to_string(&events[4].kind).unwrap();
        assert_eq!(lost, r#"{"lost":{"count":4,"reason":"sequence_gap"}}"#);
    }
}
