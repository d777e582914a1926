//! vpstag backend for the BSDs: kqueue `EVFILT_PROC` with `NOTE_TRACK`, the VPS id in `udata`.
//!
//! `Kqueue::watch` registers a VPS's first process with `NOTE_TRACK|NOTE_EXEC|NOTE_EXIT` and the
//! VPS id as `udata`. From then on the kernel follows every fork by itself: inside `fork`, before
//! the child can run, it attaches knotes to the child that carry the same `udata` and reports the
//! child with `NOTE_CHILD` (`data` = parent PID). So every event arrives with its VPS
//! ([`Event::tag`](vpstag_tracker::Event::tag)), and a descendant goes unfollowed only when the
//! kernel says so (`NOTE_TRACKERR`, reported as `EventKind::Lost` with
//! `LossReason::TrackingError`; the core then resynchronises, on FreeBSD from
//! [`reaper_descendants`]) or in the race listed under "Known kernel limits" below.
//!
//! | Capability | | why |
//! |---|---|---|
//! | `host_wide` | no | only what was [`watch`](vpstag_tracker::ForkTracker::watch)ed and its descendants |
//! | `holds_tags` | yes | `udata`; [`lookup`](vpstag_tracker::ForkTracker::lookup) answers from the events read |
//! | `synchronous` | yes | the child's knotes exist before the child runs |
//! | `thread_events` | no | `EVFILT_PROC` is about processes |
//! | `reaps` | no | kqueue never waits for anyone |
//! | `can_lose` | yes | `NOTE_TRACKERR` (allocation failure in `fork`) |
//!
//! # Why `nix::sys::event`
//!
//! The `kqueue` crate (1.x) cannot set or read `udata`, resubmits every watch in one batch (so one
//! vanished process fails them all) and reads one event per call. rustix's kqueue has what is
//! needed but its event carries `udata` as a raw pointer, which makes a stored event buffer
//! `!Send` (and `ForkTracker` is `Send`), and its `kevent` is `unsafe` for the sake of fd filters
//! we do not use. nix's `KEvent` takes and returns `udata` as an integer, is `Send`, and its
//! `Kqueue::kevent` takes a whole change list and a whole event buffer, so changes go in with
//! `EV_RECEIPT` (one receipt per change: a failing change cannot abort the others) and events come
//! out in batches. rustix is used for `procctl(PROC_REAP_*)` on FreeBSD, where libc has the
//! constants but not the structs.
//!
//! # What arrives, and in which order
//!
//! Events of one knote keep their order, and a child's `Fork` is queued (at its `fork`) before any
//! event of the child. A knote that fires again while queued keeps its place and ORs the new bits
//! in, so a parent's `Exit` may come before the `Fork` of a child it made after its last read
//! event: the `Fork` still carries the tag. `Exit` events carry the wait status and
//! `group_dead: Some(true)`; `Fork` has no `child_start` (read it with a snapshot while the child
//! lives); no event has a time (`time_ns` is `None`: kevents carry none).
//!
//! # Platforms
//!
//! - FreeBSD: the target of this backend. Semantics read from `sys/kern/kern_event.c`.
//! - NetBSD 10: the same design in its `kern_event.c` (two knotes per child, `udata` preserved,
//!   `NOTE_TRACKERR` on allocation failure). No reaper lists, so [`reaper_descendants`] is
//!   unsupported there.
//! - OpenBSD, DragonFly: one knote per child: `NOTE_CHILD` and a quick `NOTE_EXIT` can share one
//!   kevent, whose `data` is then the exit status and the parent is unknown; [`decode::decode`]
//!   reports the exit only. Not compiled here (no prebuilt standard library for those targets).
//! - macOS: `NOTE_TRACK` fails with `ENOTSUP` since Mac OS X 10.5, so `Kqueue::new` returns
//!   [`TrackerError::Unsupported`]; the Endpoint Security framework
//!   (`ES_EVENT_TYPE_NOTIFY_FORK`) is the way there.
//! - Linux, illumos and the rest: the pure [`decode`] module and [`CAPABILITIES`] build as
//!   here; `Kqueue::new` and [`reaper_descendants`] return [`TrackerError::Unsupported`], saying
//!   why. illumos should use process contracts (a later backend).
//!
//! Which systems have a kqueue to try is written once, in `build.rs` (the `kqueue` cfg alias).
//!
//! # Layout
//!
//! As in every vpstag backend: [`decode`] turns kevents into events (pure, unit-tested on every
//! OS, the kernel constants checked against `libc` where the headers exist), `source.rs` holds the
//! system calls (the kqueue, the reaper list), `tracker.rs` the
//! [`ForkTracker`](vpstag_tracker::ForkTracker) impl, `unsupported.rs` the stand-in for other
//! systems.
//!
//! # Known kernel limits (read in FreeBSD's sources, not observed)
//!
//! - `knote_fork` skips a parent knote that is "in flux" and not being scanned, without setting
//!   `NOTE_TRACKERR`. A knote is in flux while `knote_fork` itself works on it with the process
//!   lock dropped, so two threads of one process forking at the same instant may leave one child
//!   unfollowed and unreported. The reaper list ([`reaper_descendants`]) still has it: the core
//!   should also resynchronise periodically, not only on `EventKind::Lost`.
//! - A child that forks before its own `NOTE_CHILD` was read gets its child announced twice (the
//!   waiting one-shot knote keeps `NOTE_TRACK`); duplicates are dropped here
//!   ([`decode::TagTable`]).
#![deny(unsafe_code)]
#![warn(missing_docs)]

use vpstag_tracker::{Capabilities, Pid, TrackerError};

pub mod decode;

// `kqueue`: the systems whose kqueue has EVFILT_PROC and NOTE_TRACK (build.rs names them).
cfg_if::cfg_if! {
    if #[cfg(kqueue)] {
        mod source;
        mod tracker;
        use tracker as imp;
    } else {
        mod unsupported;
        use unsupported as imp;
    }
}

pub use imp::Kqueue;

/// What this backend promises (see the table in the crate docs).
pub const CAPABILITIES: Capabilities = Capabilities::new()
    .holds_tags(true)
    .synchronous(true)
    .can_lose(true)
    // knote_fork() skips a parent knote that is "in flux" without NOTE_TRACKERR.
    .resync_every(Some(std::time::Duration::from_secs(5)));

/// Every descendant of `reaper`, a process that took `procctl(PROC_REAP_ACQUIRE)` (the VPS's first
/// process does, see the core's `become_subreaper`), as the kernel keeps them: FreeBSD's
/// `PROC_REAP_GETPIDS`, descending into sub-reapers, whose descendants the kernel lists only
/// under them. Sorted, without `reaper` itself; zombies not yet reaped are included.
///
/// Errors: [`TrackerError::NoSuchProcess`] when `reaper` is gone; [`TrackerError::Io`] with
/// `InvalidInput` when it is not a reaper (the kernel would list its reaper's descendants
/// instead, most likely init's: all the system); [`TrackerError::PermissionDenied`] when this
/// process may not look at it; [`TrackerError::Unsupported`] on every OS but FreeBSD.
///
/// Cost: rustix's `get_reaper_pids` asks the kernel for up to 99 999 entries per reaper, a
/// buffer of about 7 MB for the duration of the call; this is for resynchronisation, not for
/// every event.
///
/// Races: the list is a snapshot. A sub-reaper that exits during the walk hands its descendants
/// to its own reaper, already read, so they can be missing from that one answer; call again.
pub fn reaper_descendants(reaper: Pid) -> Result<Vec<Pid>, TrackerError> {
    imp::reaper_descendants(reaper)
}
