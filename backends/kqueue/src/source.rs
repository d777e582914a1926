//! The OS calls: the kqueue itself (through `nix::sys::event`) and, on FreeBSD, the reaper's
//! list of descendants (through rustix's `procctl` bindings). No `unsafe`: nix and rustix wrap
//! every call.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::event::{EvFlags, EventFilter, FilterFlag, KEvent, Kqueue as Kq};
use vpstag_tracker::Pid;

use crate::decode::{RawKevent, WATCH_FFLAGS};

/// Kevents read per `kevent` call at first; the buffer doubles up to [`MAX_BATCH`] while calls
/// come back full.
const FIRST_BATCH: usize = 256;
const MAX_BATCH: usize = 16 * 1024;
/// `kevent` calls per drain at most: a fork storm can keep the queue from ever being empty, and a
/// read must end.
const MAX_ROUNDS: usize = 64;

/// A kqueue and the buffer its events are read into.
pub(crate) struct Queue {
    kq: Kq,
    buf: Vec<KEvent>,
}

fn blank() -> KEvent {
    KEvent::new(0, EventFilter::EVFILT_PROC, EvFlags::empty(), FilterFlag::empty(), 0, 0)
}

/// `flags` is `u16` on most BSDs and `u32` on NetBSD; a generic widening keeps clippy quiet on both.
fn widen<T: Into<u32>>(x: T) -> u32 {
    x.into()
}

fn raw(ev: &KEvent) -> RawKevent {
    RawKevent {
        ident: ev.ident() as u64,
        flags: widen(ev.flags().bits()),
        fflags: ev.fflags().bits(),
        data: ev.data() as i64,
        udata: ev.udata() as usize as u64,
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10^9: fits every c_long.
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// The change that starts following `pid` (and its future descendants) with `udata`.
pub(crate) fn watch_change(pid: Pid, udata: usize) -> KEvent {
    KEvent::new(
        pid.as_raw() as usize,
        EventFilter::EVFILT_PROC,
        EvFlags::EV_ADD | EvFlags::EV_RECEIPT,
        FilterFlag::from_bits_retain(WATCH_FFLAGS),
        0,
        udata as isize,
    )
}

/// The change that drops one knote of `pid`.
pub(crate) fn delete_change(pid: Pid) -> KEvent {
    KEvent::new(
        pid.as_raw() as usize,
        EventFilter::EVFILT_PROC,
        EvFlags::EV_DELETE | EvFlags::EV_RECEIPT,
        FilterFlag::empty(),
        0,
        0,
    )
}

impl Queue {
    pub(crate) fn new() -> io::Result<Queue> {
        let kq = Kq::new().map_err(io::Error::from)?;
        Ok(Queue { kq, buf: vec![blank(); FIRST_BATCH] })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.kq.as_fd()
    }

    /// Submits `changes`, each with `EV_RECEIPT`, so that one failing change does not stop the
    /// others: returns `(ident, errno)` for each receipt, errno 0 for success. A kernel that
    /// ignores `EV_RECEIPT` (old DragonFly) reports failures only, and may return queued events in
    /// the same call: those are appended to `pending` for the next read (the kqueue descriptor
    /// does not poll readable for them; FreeBSD and NetBSD never do this).
    pub(crate) fn submit(&self, changes: &[KEvent], pending: &mut Vec<RawKevent>) -> io::Result<Vec<(u64, i32)>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut receipts = vec![blank(); changes.len()];
        let n = loop {
            match self.kq.kevent(changes, &mut receipts, Some(timespec(Duration::ZERO))) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut out = Vec::with_capacity(n);
        for ev in &receipts[..n] {
            let r = raw(ev);
            if r.flags & crate::decode::EV_ERROR != 0 {
                out.push((r.ident, i32::try_from(r.data).unwrap_or(i32::MAX)));
            } else if ev.filter().ok() == Some(EventFilter::EVFILT_PROC) {
                pending.push(r);
            }
        }
        Ok(out)
    }

    /// Reads what is queued into `out`: waits as `timeout` says for the first batch, then drains
    /// without waiting while batches come back full. `Ok(false)` when a wait was interrupted by
    /// a signal before anything was read.
    pub(crate) fn read(&mut self, out: &mut Vec<RawKevent>, timeout: Option<Duration>) -> io::Result<bool> {
        let mut wait = timeout.map(timespec);
        for round in 0..MAX_ROUNDS {
            let n = match self.kq.kevent(&[], &mut self.buf, wait) {
                Ok(n) => n,
                Err(Errno::EINTR) if round == 0 => return Ok(false),
                Err(Errno::EINTR) => break,
                Err(e) => return Err(e.into()),
            };
            out.extend(self.buf[..n].iter().filter(|ev| ev.filter().ok() == Some(EventFilter::EVFILT_PROC)).map(raw));
            if n < self.buf.len() {
                break;
            }
            if self.buf.len() < MAX_BATCH {
                let len = self.buf.len() * 2;
                self.buf.resize(len, blank());
            }
            wait = Some(timespec(Duration::ZERO));
        }
        Ok(true)
    }
}

/// Every descendant of the reaper `reaper`, from the kernel's reaper lists
/// (`procctl(PROC_REAP_GETPIDS)`), descending into sub-reapers. Not `reaper` itself.
#[cfg(target_os = "freebsd")]
pub(crate) fn reaper_descendants(reaper: Pid) -> io::Result<Vec<Pid>> {
    use rustix::process::{self as rp, IdType, PidInfoFlags, ReaperStatusFlags};
    use std::collections::{BTreeSet, HashSet};

    let sel = |p: Pid| rp::Pid::from_raw(p.as_raw()).map(|r| (IdType::Pid, r));
    // PROC_REAP_GETPIDS on a process that is not a reaper lists its reaper's descendants (init's,
    // for most): check that `p` itself owns the reaper status first.
    let owns = |p: Pid| -> io::Result<bool> {
        let st = rp::get_reaper_status(sel(p))?;
        Ok(st.flags.contains(ReaperStatusFlags::OWNED) && st.reaper.as_raw_nonzero().get() == p.as_raw())
    };
    if !owns(reaper)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("process {reaper} is not a reaper (it did not take procctl(PROC_REAP_ACQUIRE))"),
        ));
    }
    let mut found = BTreeSet::new();
    let mut seen = HashSet::from([reaper]);
    let mut todo = vec![reaper];
    while let Some(r) = todo.pop() {
        if r != reaper {
            // A sub-reaper that exited or gave up the status meanwhile: its children went to its
            // own reaper, already read. Skip it rather than read someone else's list.
            match owns(r) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => return Err(e),
            }
        }
        let infos = match rp::get_reaper_pids(sel(r)) {
            Ok(v) => v,
            Err(e) if r != reaper && e == rustix::io::Errno::SRCH => continue,
            Err(e) => return Err(e.into()),
        };
        for info in infos {
            let Some(pid) = Pid::new(info.pid.as_raw_nonzero().get()) else { continue };
            found.insert(pid);
            if info.flags.contains(PidInfoFlags::REAPER) && seen.insert(pid) {
                todo.push(pid);
            }
        }
    }
    // The reaper may have exited (and its PID been reused) during the walk.
    if !owns(reaper)? {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(found.into_iter().collect())
}

/// Reaper lists are FreeBSD's: `Unsupported` here.
#[cfg(not(target_os = "freebsd"))]
pub(crate) fn reaper_descendants(reaper: Pid) -> io::Result<Vec<Pid>> {
    let _ = reaper;
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
