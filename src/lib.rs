//! vpstag tags every process of a virtual server (VPS), job or sandbox by its lineage.
//!
//! Each VPS gets an id and one *first process*; every process that descends from it, however it
//! was born (fork, vfork, clone, clone3, posix_spawn, a fork from a thread, a double-forked
//! daemon, a new PID namespace...), carries the VPS's tag, so a host can list, account for,
//! signal and isolate each VPS's processes.
//!
//! The story in one screen:
//! - a backend implements [`ForkTracker`] and reports [`Event`]s (Linux: the proc connector,
//!   ptrace, eBPF; FreeBSD: kqueue); [`open_backend`] picks one;
//! - the [`Manager`] owns the backend and the [`MappingTable`] (pid -> VPS, keyed by
//!   [`ProcessId`]: pid and start time), starts each VPS's first process ([`Manager::start`]),
//!   lets running processes in ([`Manager::adopt`], the loader's way) and answers
//!   [`Manager::vps_of`], [`Manager::members`], [`Manager::signal`];
//! - when a backend loses events it says so, and the manager resynchronises from a scan of the
//!   system; [`Stats`] counts both;
//! - where the host delegates cgroup v2, [`cgroup`] gives each VPS a cgroup: the kernel's exact
//!   figures, limits, and `cgroup.kill`.
//!
//! ```no_run
//! use std::process::Command;
//! use vpstag::{BackendChoice, Manager, Signal};
//!
//! let mgr = Manager::with_backend(BackendChoice::Auto)?;
//! let vps = mgr.start("job-1", Command::new("make").arg("-j2"))?;
//! println!("job-1 has {} processes", mgr.members(&vps)?.len());
//! mgr.signal(&vps, Signal::TERM)?;
//! # Ok::<(), vpstag::Error>(())
//! ```
//!
//! # A supervisor
//!
//! [`Manager::spawn`] takes a `std::process::Command` with all its options (user, environment,
//! pipes, process group, `pre_exec`), and [`Manager::subscribe_vps`] follows one VPS's events in
//! a bounded queue that reports what it missed. With the `tokio` feature, a subscription is a
//! `Stream` and [`Manager`] has `wait_async`. This is `examples/supervisor.rs`, which the tests
//! run under every backend:
//!
//! ```ignore
#![doc = include_str!("../examples/supervisor.rs")]
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod backend;
pub mod cgroup;
pub mod client;
mod error;
#[allow(unsafe_code)] // fork and the async-signal-safe first process
mod init;
mod manager;
pub mod process;
pub mod protocol;
mod signal;
pub mod subscription;
#[allow(unsafe_code)] // every system call vpstag makes itself
mod sys;
mod table;
mod tracking;

pub use backend::{open_backend, open_backend_with_notes, BackendChoice};
pub use error::{Error, Result};
pub use manager::{
    CheckReport, CpuSource, Divergence, JournalEntry, Manager, Member, SavedMember, SavedVps, Vps, VpsChild,
    VpsSummary, VpsUsage,
};
pub use signal::Signal;
pub use subscription::Subscription;
pub use table::{Change, Entry, MappingTable, Source};
pub use tracking::{Stats, TaggedEvent};
pub use vpstag_tracker::{
    BackendKind, Capabilities, Event, EventKind, ExitStatus, ForkTracker, LossReason, Pid, ProcessId, StartTime,
    TrackerError, VpsId,
};
