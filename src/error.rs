//! The one error type of the `vpstag` crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vpstag_tracker::{Pid, TrackerError};

use crate::protocol::ErrorKind;

/// What went wrong. Each variant says what to do about it where there is something to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend failed or refused (its message names the fix, e.g. a missing privilege).
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// No VPS has that name.
    #[error("unknown VPS {0:?} (`vpstag list` shows the VPSes)")]
    UnknownVps(String),
    /// A VPS of that name is running.
    #[error("a VPS named {0:?} is already running; stop it first or pick another name")]
    AlreadyRunning(String),
    /// The process is already a member of another VPS; registering or joining it elsewhere would
    /// take it out of that VPS's reach.
    #[error("process {pid} is already a member of VPS {vps:?}; it cannot start or join another VPS from there")]
    AlreadyMember {
        /// The process.
        pid: Pid,
        /// The VPS it is in.
        vps: String,
    },
    /// A VPS name must be 1-64 characters of letters, digits, `.`, `_` or `-`.
    #[error("invalid VPS name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The process does not exist.
    #[error("no such process: {0}")]
    NoSuchProcess(Pid),
    /// Not a process id.
    #[error("not a valid process id: {0:?}")]
    BadPid(String),
    /// The command could not be started.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program named.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An unknown backend name.
    #[error("unknown backend {0:?} (expected auto, cnproc, ptrace, kqueue or ebpf)")]
    UnknownBackend(String),
    /// The backend exists, but not in this build or on this system.
    #[error("the {backend} backend is not available: {why}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: &'static str,
        /// Why not.
        why: String,
    },
    /// An unknown signal name or number.
    #[error("unknown signal {0:?} (use a name such as TERM, KILL, INT, HUP or a number)")]
    UnknownSignal(String),
    /// The backend stopped working; the manager cannot vouch for its table any more.
    #[error("the tracking backend failed: {0}")]
    BackendFailed(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A cgroup could not be found, created, limited, joined, killed or removed
    /// ([`crate::cgroup`]).
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// Nobody listens on the daemon's socket ([`crate::client`]).
    #[error("no vpstag daemon is listening on {}: start it with `vpstag daemon` (or point --socket / VPSTAG_SOCKET at the right socket)", socket.display())]
    NoDaemon {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon's socket exists but this user may not connect to it ([`crate::client`]).
    #[error("permission denied connecting to {}: ask root to run the daemon with a socket you can reach (its mode must allow you to write)", socket.display())]
    SocketPermission {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon refused a request ([`crate::client`]): `kind` says why (the table in
    /// `docs/protocol.md`), the message what to do. A VPS of another user or an operation that
    /// needs root is [`ErrorKind::PermissionDenied`]; too many connections open is
    /// [`ErrorKind::Busy`] (nothing was done: try again once some have closed). An unknown VPS
    /// named in the request is [`Error::UnknownVps`] when the daemon said no more than that.
    #[error("{}", refusal_text(*kind, message))]
    Refused {
        /// Why ([`ErrorKind::Other`] for a kind this library does not know: the message then
        /// begins with the kind's name).
        kind: ErrorKind,
        /// What the daemon said.
        message: String,
    },
    /// The daemon said something this library does not understand ([`crate::client`]).
    #[error("protocol error: {0} (is the daemon the same version as this client?)")]
    Protocol(String),
    /// The daemon did not answer a request in time ([`crate::client::Client::set_timeout`]).
    #[error("the vpstag daemon on {} did not answer within {after:?}: it may be stuck or overloaded (see its log), or allow it longer (Client::set_timeout)", socket.display())]
    DaemonTimeout {
        /// The socket.
        socket: PathBuf,
        /// How long the client waited.
        after: Duration,
    },
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

impl Error {
    /// An [`Error::Io`] with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// The protocol's kind of this error: for a refusal by the daemon ([`Error::Refused`]) the
    /// kind it named; for an error of the library the kind the daemon refuses it with (an
    /// unknown VPS, a name in use or invalid, a process that is gone, a missing privilege, a
    /// timeout, a limit refused...); `None` for the rest (the daemon's `failed`).
    ///
    /// ```
    /// use vpstag::protocol::ErrorKind;
    /// use vpstag::Error;
    ///
    /// let e = Error::Refused { kind: ErrorKind::Busy, message: "uid 7 has 16 connections open".into() };
    /// assert_eq!(e.kind(), Some(ErrorKind::Busy));
    /// assert_eq!(e.to_string(), "the daemon is busy: uid 7 has 16 connections open; try again in a moment");
    /// ```
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Refused { kind, .. } => Some(*kind),
            Error::UnknownVps(_) => Some(ErrorKind::UnknownVps),
            Error::AlreadyRunning(_) => Some(ErrorKind::AlreadyRunning),
            Error::AlreadyMember { .. } => Some(ErrorKind::Nested),
            Error::InvalidName { .. } => Some(ErrorKind::InvalidName),
            Error::NoSuchProcess(_) => Some(ErrorKind::NoSuchProcess),
            Error::UnknownSignal(_) => Some(ErrorKind::BadRequest),
            Error::Tracker(crate::TrackerError::PermissionDenied { .. }) => Some(ErrorKind::BackendRefused),
            Error::Timeout(_) => Some(ErrorKind::Timeout),
            Error::Cgroup(_) => Some(ErrorKind::LimitRefused),
            _ => None,
        }
    }
}

/// How a refusal by the daemon reads: the daemon's own message names the fix; some kinds say
/// more.
fn refusal_text(kind: ErrorKind, message: &str) -> String {
    match kind {
        ErrorKind::PermissionDenied => format!("permission denied: {message}"),
        ErrorKind::UnknownVps | ErrorKind::AlreadyRunning => message.to_string(),
        ErrorKind::Busy => format!("the daemon is busy: {message}; try again in a moment"),
        kind => format!("the daemon refused ({kind}): {message}"),
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
