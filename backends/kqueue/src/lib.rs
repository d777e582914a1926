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
//! - Linux, illumos and the rest: the pure [`decode`] module, [`CAPABILITIES`] and
//!   [`reaper_descendants`] (which says `Unsupported`) build; there is no `Kqueue` type. illumos
//!   should use process contracts (a later backend).
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
#![warn(missing_docs)]

pub mod decode;

#[cfg(any(
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly",
    target_os = "macos"
))]
mod source;

#[cfg(any(
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly",
    target_os = "macos"
))]
pub use backend::Kqueue;

use vpstag_tracker::{Capabilities, Pid, TrackerError};

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
    #[cfg(target_os = "freebsd")]
    {
        source::reaper_descendants(reaper).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => TrackerError::NoSuchProcess(reaper),
            Some(libc::EPERM) | Some(libc::EACCES) => TrackerError::PermissionDenied {
                what: format!("procctl(PROC_REAP_GETPIDS) on process {reaper}"),
                hint: "run vpstag as root, or as the user of the VPS; jails and security.bsd.see_other_uids \
                       hide processes"
                    .into(),
                source: e,
            },
            _ => TrackerError::io(format!("listing the descendants of reaper {reaper}"), e),
        })
    }
    #[cfg(not(target_os = "freebsd"))]
    {
        Err(TrackerError::Unsupported(format!(
            "reaper_descendants({reaper}): reaper lists (procctl PROC_REAP_GETPIDS) exist on FreeBSD only"
        )))
    }
}

#[cfg(any(
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly",
    target_os = "macos"
))]
mod backend {
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::time::Duration;

    use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, TrackerError, VpsId};

    use crate::decode::{self, RawKevent, TagTable};
    use crate::source::{self, Queue};

    /// The kqueue backend. See the crate docs.
    pub struct Kqueue {
        queue: Queue,
        table: TagTable,
        /// Kevents read but not yet decoded (from a change call, or read ahead).
        pending: Vec<RawKevent>,
        /// Scratch: kevents of the current read.
        raw: Vec<RawKevent>,
        /// Scratch: processes of forgotten VPSs whose knotes still live.
        stale: Vec<Pid>,
    }

    impl std::fmt::Debug for Kqueue {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Kqueue").field("tagged", &self.table.len()).finish_non_exhaustive()
        }
    }

    fn errno_error(what: String, errno: i32, pid: Pid) -> TrackerError {
        let e = io::Error::from_raw_os_error(errno);
        match errno {
            libc::ESRCH => TrackerError::NoSuchProcess(pid),
            libc::EPERM | libc::EACCES => TrackerError::PermissionDenied {
                what,
                hint: "a kqueue may only watch processes this process can see (p_cansee): run vpstag as root \
                       or as the VPS's user, outside any jail that hides them"
                    .into(),
                source: e,
            },
            n if n == libc::ENOTSUP || n == libc::EOPNOTSUPP => TrackerError::Unsupported(format!(
                "{what}: the kernel refused NOTE_TRACK ({e}); this system cannot follow forks with kqueue"
            )),
            _ => TrackerError::io(what, e),
        }
    }

    impl Kqueue {
        /// Opens a kqueue.
        ///
        /// On macOS this is [`TrackerError::Unsupported`]: `NOTE_TRACK` returns `ENOTSUP` there
        /// since Mac OS X 10.5.
        pub fn new() -> Result<Kqueue, TrackerError> {
            if cfg!(target_os = "macos") {
                return Err(TrackerError::Unsupported(
                    "kqueue NOTE_TRACK returns ENOTSUP on macOS since 10.5, so it cannot follow forks; use the \
                     Endpoint Security framework (ES_EVENT_TYPE_NOTIFY_FORK/EXEC/EXIT) instead"
                        .into(),
                ));
            }
            let queue = Queue::new().map_err(|e| TrackerError::io("kqueue()", e))?;
            Ok(Kqueue { queue, table: TagTable::default(), pending: Vec::new(), raw: Vec::new(), stale: Vec::new() })
        }

        /// Deletes one knote of each of `pids`; a knote or process already gone is no error.
        fn delete(&mut self, pids: &[Pid]) -> Result<(), TrackerError> {
            let changes: Vec<_> = pids.iter().map(|p| source::delete_change(*p)).collect();
            let receipts =
                self.queue.submit(&changes, &mut self.pending).map_err(|e| TrackerError::io("kevent(EV_DELETE)", e))?;
            for (ident, errno) in receipts {
                if errno != 0 && errno != libc::ENOENT && errno != libc::ESRCH {
                    return Err(TrackerError::io(
                        format!("kevent(EV_DELETE) of process {ident}"),
                        io::Error::from_raw_os_error(errno),
                    ));
                }
            }
            Ok(())
        }
    }

    impl ForkTracker for Kqueue {
        fn kind(&self) -> BackendKind {
            BackendKind::Kqueue
        }

        fn capabilities(&self) -> Capabilities {
            crate::CAPABILITIES
        }

        fn as_fd(&self) -> BorrowedFd<'_> {
            self.queue.fd()
        }

        fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
            let start = out.len();
            loop {
                let mut raw = std::mem::take(&mut self.raw);
                raw.clear();
                raw.append(&mut self.pending);
                // Something is already in hand: only drain what else is queued.
                let wait = if raw.is_empty() { timeout } else { Some(Duration::ZERO) };
                let read = self.queue.read(&mut raw, wait);
                decode::decode_batch(&raw, &mut self.table, out, &mut self.stale);
                self.raw = raw;
                if let Err(e) = read {
                    if out.len() > start {
                        // Hand over what was read; the error comes back on the next call.
                        break;
                    }
                    return Err(TrackerError::io("kevent()", e));
                }
                if !self.stale.is_empty() {
                    let stale = std::mem::take(&mut self.stale);
                    self.delete(&stale)?;
                }
                // `None` blocks until there is something to return: wait again after a signal, or
                // after a batch that held only events of forgotten VPSs.
                if out.len() > start || timeout.is_some() {
                    break;
                }
            }
            Ok(out.len() - start)
        }

        fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
            let what = format!("kevent(EVFILT_PROC, NOTE_TRACK) on process {root}");
            let udata = decode::udata_for(vps).ok_or_else(|| {
                TrackerError::Unsupported(format!("VPS id {vps} does not fit in this system's kevent udata"))
            })?;
            let receipts = self
                .queue
                .submit(&[source::watch_change(root, udata)], &mut self.pending)
                .map_err(|e| TrackerError::io(what.clone(), e))?;
            if let Some(&(_, errno)) = receipts.first() {
                if errno != 0 {
                    return Err(errno_error(what, errno, root));
                }
            }
            self.table.watch(root, vps);
            Ok(())
        }

        fn forget(&mut self, vps: VpsId) -> Result<(), TrackerError> {
            let pids = self.table.forget(vps);
            self.delete(&pids)
        }

        fn lookup(&self, pid: Pid) -> Option<VpsId> {
            self.table.get(pid)
        }
    }
}
