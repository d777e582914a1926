//! The one error type of the `vpstag` crate.

use std::io;

use vpstag_tracker::{Pid, TrackerError};

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
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
