//! [`Kqueue`]: the [`ForkTracker`] impl, gluing the kqueue (`source.rs`) to the decoder
//! ([`crate::decode`]), and the error mapping of the reaper list. On the systems of the `kqueue`
//! cfg alias (build.rs).

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

/// See [`crate::reaper_descendants`].
pub(crate) fn reaper_descendants(reaper: Pid) -> Result<Vec<Pid>, TrackerError> {
    source::reaper_descendants(reaper).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => TrackerError::NoSuchProcess(reaper),
        Some(libc::EPERM) | Some(libc::EACCES) => TrackerError::PermissionDenied {
            what: format!("procctl(PROC_REAP_GETPIDS) on process {reaper}"),
            hint: "run vpstag as root, or as the user of the VPS; jails and security.bsd.see_other_uids \
                   hide processes"
                .into(),
            source: e,
        },
        _ if e.kind() == io::ErrorKind::Unsupported => TrackerError::Unsupported(format!(
            "reaper_descendants({reaper}): reaper lists (procctl PROC_REAP_GETPIDS) exist on FreeBSD only"
        )),
        _ => TrackerError::io(format!("listing the descendants of reaper {reaper}"), e),
    })
}
