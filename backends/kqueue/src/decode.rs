//! The kevent -> [`Event`] translation: pure, so that it is tested on every OS (Linux included).
//!
//! [`RawKevent`] mirrors the fields of a BSD `struct kevent` that an `EVFILT_PROC` event uses;
//! `source.rs` fills it from the kernel's kevent and checks the filter first, so everything here
//! is about `EVFILT_PROC`.
//!
//! What the kernel reports, read from FreeBSD's `sys/kern/kern_event.c` (`filt_procattach`,
//! `filt_proc`, `knote_fork`):
//!
//! - A tracked process forks: the kernel attaches two knotes to the child inside `fork`, before
//!   the child can run (`do_fork` calls `knote_fork` before `sched_add`), both carrying the parent knote's `udata` ("preserve udata"). The first is
//!   a one-shot knote activated at once with `fflags = NOTE_CHILD`, `ident` = child and
//!   `data` = parent PID. The second follows the child (`NOTE_TRACK|NOTE_EXEC|NOTE_EXIT`, like
//!   its parent's).
//! - It could not attach them (the allocation is `M_NOWAIT`): `NOTE_TRACKERR` on the parent's
//!   knote. The child's PID is not reported.
//! - `NOTE_EXEC` on the process's own knote.
//! - `NOTE_EXIT` with `EV_EOF`, `data` = wait status (`KW_EXITCODE`); the knote is then gone.
//!
//! A knote that fires again before it is read keeps one queue slot and ORs the new bits in
//! (`EV_CLEAR`): one kevent may carry `NOTE_EXEC|NOTE_TRACKERR|NOTE_EXIT`. NetBSD 10 behaves the
//! same way (two knotes, udata preserved). OpenBSD (and DragonFly, in the old `kern_event.c` we
//! could read) keep one knote per child, so a child that exits before its `NOTE_CHILD` was read shows
//! `NOTE_CHILD|NOTE_EXIT` with `data` overwritten by the wait status: the parent is unknown then,
//! and [`decode`] reports only the exit (the event's tag still says which VPS it was).

use std::collections::{HashMap, HashSet};

use vpstag_tracker::{Event, EventKind, ExitStatus, LossReason, Pid, VpsId};

/// `NOTE_EXIT`: the process exited (`data` = wait status). Same value on every BSD and macOS.
pub const NOTE_EXIT: u32 = 0x8000_0000;
/// `NOTE_FORK`: the process forked (we do not ask for it: `NOTE_CHILD` says more).
pub const NOTE_FORK: u32 = 0x4000_0000;
/// `NOTE_EXEC`: the process called `execve`.
pub const NOTE_EXEC: u32 = 0x2000_0000;
/// `NOTE_TRACK`: follow across `fork` (a registration flag, never reported).
pub const NOTE_TRACK: u32 = 0x0000_0001;
/// `NOTE_TRACKERR`: the kernel could not attach a knote to a new child.
pub const NOTE_TRACKERR: u32 = 0x0000_0002;
/// `NOTE_CHILD`: this is a new child of a tracked process (`data` = parent PID).
pub const NOTE_CHILD: u32 = 0x0000_0004;
/// `EV_EOF`: the process is gone.
pub const EV_EOF: u32 = 0x8000;
/// `EV_ERROR`: a change failed (or, with `EV_RECEIPT`, its receipt); `data` = errno.
pub const EV_ERROR: u32 = 0x4000;

// The values above are those of the system headers; check them where the headers exist.
#[cfg(kqueue)]
#[allow(clippy::unnecessary_cast)] // kevent flags are u16 on most BSDs, u32 on NetBSD
const _: () = {
    assert!(NOTE_EXIT == libc::NOTE_EXIT);
    assert!(NOTE_FORK == libc::NOTE_FORK);
    assert!(NOTE_EXEC == libc::NOTE_EXEC);
    assert!(NOTE_TRACK == libc::NOTE_TRACK);
    assert!(NOTE_TRACKERR == libc::NOTE_TRACKERR);
    assert!(NOTE_CHILD == libc::NOTE_CHILD);
    assert!(EV_EOF == libc::EV_EOF as u32);
    assert!(EV_ERROR == libc::EV_ERROR as u32);
};

/// The fflags the backend registers a VPS's first process with.
pub const WATCH_FFLAGS: u32 = NOTE_TRACK | NOTE_EXEC | NOTE_EXIT;

/// The fields of one `EVFILT_PROC` kevent that [`decode`] needs, widened to fixed-size types
/// (`flags` is `u16` on FreeBSD, `u32` on NetBSD; `udata` a pointer or an `intptr_t`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RawKevent {
    /// `ident`: the process the knote is attached to.
    pub ident: u64,
    /// `flags` (`EV_EOF`, `EV_ERROR`, ...).
    pub flags: u32,
    /// `fflags` (`NOTE_*`).
    pub fflags: u32,
    /// `data`: parent PID for `NOTE_CHILD`, wait status for `NOTE_EXIT`, errno for `EV_ERROR`.
    pub data: i64,
    /// `udata`: the VPS id given at registration, copied by the kernel to every descendant.
    pub udata: u64,
}

/// What one kevent turned out to be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Decoded {
    /// It produced this many events (appended to `out`).
    Events(usize),
    /// A change's outcome (`EV_ERROR`, from `EV_RECEIPT` or a failed change): errno 0 is success.
    Receipt {
        /// The `ident` of the change.
        ident: u64,
        /// The errno, 0 for success.
        errno: i32,
    },
    /// Nothing vpstag uses (ident not a PID, no bits we know).
    Ignored,
}

/// The VPS id as `udata` carries it. `None` when it does not fit this system's `udata`.
pub fn udata_for(vps: VpsId) -> Option<usize> {
    usize::try_from(vps.0).ok()
}

/// Translates one `EVFILT_PROC` kevent into events appended to `out`.
///
/// Order within one kevent: `Fork` (`NOTE_CHILD`), `Exec`, `Lost` (`NOTE_TRACKERR`), `Exit`: a
/// knote accumulates bits while it waits in the queue, and exit is always last.
pub fn decode(ev: &RawKevent, out: &mut Vec<Event>) -> Decoded {
    if ev.flags & EV_ERROR != 0 {
        return Decoded::Receipt { ident: ev.ident, errno: i32::try_from(ev.data).unwrap_or(i32::MAX) };
    }
    let Some(pid) = i32::try_from(ev.ident).ok().and_then(Pid::new) else {
        return Decoded::Ignored;
    };
    let tag = Some(VpsId(ev.udata));
    let start = out.len();
    let push = |out: &mut Vec<Event>, kind| out.push(Event { tag, ..Event::new(kind) });
    let exit = ev.fflags & NOTE_EXIT != 0;

    if ev.fflags & NOTE_CHILD != 0 && !exit {
        // data = parent PID. A non-PID here would be a kernel we do not understand: say so
        // rather than invent a parent.
        match i32::try_from(ev.data).ok().and_then(Pid::new) {
            Some(parent) => {
                push(out, EventKind::Fork { parent, child: pid, child_thread: pid, thread: false, child_start: None })
            }
            None => push(out, EventKind::Lost { count: None, reason: LossReason::Other }),
        }
    }
    if ev.fflags & NOTE_EXEC != 0 {
        push(out, EventKind::Exec { pid, thread: pid });
    }
    if ev.fflags & NOTE_TRACKERR != 0 {
        // Some child of `pid` (we are not told which, nor how many) is not followed.
        push(out, EventKind::Lost { count: None, reason: LossReason::TrackingError });
    }
    if exit || ev.flags & EV_EOF != 0 {
        let status = if exit { i32::try_from(ev.data).ok().and_then(ExitStatus::from_wait_status) } else { None };
        push(out, EventKind::Exit { pid, thread: pid, status, group_dead: Some(true) });
    }
    match out.len() - start {
        0 => Decoded::Ignored,
        n => Decoded::Events(n),
    }
}

/// Decodes a batch of kevents in order, appending the events to `out` and keeping `table` up to
/// date (duplicates and events of forgotten VPSs dropped, their live PIDs added to `stale`).
/// Receipts are skipped: changes are submitted apart. Returns how many events were appended.
pub fn decode_batch(batch: &[RawKevent], table: &mut TagTable, out: &mut Vec<Event>, stale: &mut Vec<Pid>) -> usize {
    let start = out.len();
    for ev in batch {
        let from = out.len();
        if let Decoded::Events(_) = decode(ev, out) {
            table.apply(out, from, stale);
        }
    }
    out.len() - start
}

/// The backend's own pid -> VPS table (for [`ForkTracker::lookup`](vpstag_tracker::ForkTracker::lookup)),
/// kept from the events it reports. It also filters them:
///
/// - A `Fork` of a child already known with the same tag is a duplicate and is dropped. FreeBSD's
///   one-shot `NOTE_CHILD` knote keeps `NOTE_TRACK` while it waits to be read, so a child that
///   forks before its own `NOTE_CHILD` was read gets its child announced twice (read from
///   `knote_fork`/`filt_procattach`; not seen on a running system).
/// - Events of a VPS that was [`forget`](TagTable::forget)-ten are dropped, and the PIDs whose
///   knotes still live are handed back so that the caller can delete those knotes.
#[derive(Default, Debug)]
pub struct TagTable {
    tags: HashMap<Pid, VpsId>,
    active: HashSet<VpsId>,
}

impl TagTable {
    /// `root` starts `vps`.
    pub fn watch(&mut self, root: Pid, vps: VpsId) {
        self.active.insert(vps);
        self.tags.insert(root, vps);
    }

    /// Stops tagging `vps`; returns its processes (whose knotes the caller deletes).
    pub fn forget(&mut self, vps: VpsId) -> Vec<Pid> {
        self.active.remove(&vps);
        let mut gone: Vec<Pid> = self.tags.iter().filter(|(_, v)| **v == vps).map(|(p, _)| *p).collect();
        gone.sort_unstable();
        for p in &gone {
            self.tags.remove(p);
        }
        gone
    }

    /// The tag of `pid`, if it is a live member of a watched VPS.
    pub fn get(&self, pid: Pid) -> Option<VpsId> {
        self.tags.get(&pid).copied()
    }

    /// How many processes are tagged.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether no process is tagged.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Updates the table from `events[from..]` (just decoded) and drops duplicates and events
    /// of forgotten VPSs from it. PIDs whose knotes belong to a forgotten VPS and still live are
    /// appended to `stale`.
    pub fn apply(&mut self, events: &mut Vec<Event>, from: usize, stale: &mut Vec<Pid>) {
        let mut i = from;
        while i < events.len() {
            if self.keep(&events[i], stale) {
                i += 1;
            } else {
                events.remove(i);
            }
        }
    }

    fn keep(&mut self, ev: &Event, stale: &mut Vec<Pid>) -> bool {
        let Some(tag) = ev.tag else { return true };
        if !self.active.contains(&tag) {
            match ev.kind {
                EventKind::Fork { child, .. } => stale.push(child),
                EventKind::Exec { pid, .. } => stale.push(pid),
                EventKind::Exit { pid, .. } => {
                    self.tags.remove(&pid);
                }
                _ => {}
            }
            return false;
        }
        match ev.kind {
            EventKind::Fork { child, .. } => self.tags.insert(child, tag) != Some(tag),
            EventKind::Exec { pid, .. } => {
                self.tags.entry(pid).or_insert(tag);
                true
            }
            EventKind::Exit { pid, .. } => {
                self.tags.remove(&pid);
                true
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    fn one(ev: RawKevent) -> (Decoded, Vec<Event>) {
        let mut out = Vec::new();
        let d = decode(&ev, &mut out);
        (d, out)
    }

    #[test]
    fn child_note_is_a_fork_with_the_parent_from_data_and_the_tag_from_udata() {
        let (d, out) = one(RawKevent { ident: 201, fflags: NOTE_CHILD, data: 200, udata: 7, ..Default::default() });
        assert_eq!(d, Decoded::Events(1));
        assert_eq!(
            out[0].kind,
            EventKind::Fork {
                parent: pid(200),
                child: pid(201),
                child_thread: pid(201),
                thread: false,
                child_start: None
            }
        );
        assert_eq!(out[0].tag, Some(VpsId(7)));
        assert_eq!(out[0].time_ns, None);
    }

    #[test]
    fn exit_decodes_the_wait_status() {
        let (_, out) = one(RawKevent { ident: 300, flags: EV_EOF, fflags: NOTE_EXIT, data: 3 << 8, udata: 1 });
        assert_eq!(
            out,
            vec![Event {
                tag: Some(VpsId(1)),
                ..Event::new(EventKind::Exit {
                    pid: pid(300),
                    thread: pid(300),
                    status: Some(ExitStatus::Exited(3)),
                    group_dead: Some(true)
                })
            }]
        );
        let (_, out) = one(RawKevent { ident: 300, flags: EV_EOF, fflags: NOTE_EXIT, data: 9, ..Default::default() });
        assert!(matches!(
            out[0].kind,
            EventKind::Exit { status: Some(ExitStatus::Signaled { signal: 9, core_dumped: false }), .. }
        ));
    }

    #[test]
    fn accumulated_bits_come_out_in_order_exec_lost_exit() {
        let (d, out) = one(RawKevent {
            ident: 42,
            flags: EV_EOF,
            fflags: NOTE_EXEC | NOTE_TRACKERR | NOTE_EXIT,
            data: 0,
            udata: 5,
        });
        assert_eq!(d, Decoded::Events(3));
        assert!(matches!(out[0].kind, EventKind::Exec { pid: p, thread: t } if p == pid(42) && t == pid(42)));
        assert_eq!(out[1].kind, EventKind::Lost { count: None, reason: LossReason::TrackingError });
        assert!(matches!(out[2].kind, EventKind::Exit { status: Some(ExitStatus::Exited(0)), .. }));
        assert!(out.iter().all(|e| e.tag == Some(VpsId(5))));
    }

    #[test]
    fn trackerr_alone_is_a_loss_that_names_no_child() {
        let (d, out) = one(RawKevent { ident: 10, fflags: NOTE_TRACKERR, udata: 2, ..Default::default() });
        assert_eq!(d, Decoded::Events(1));
        assert_eq!(out[0].kind, EventKind::Lost { count: None, reason: LossReason::TrackingError });
        assert_eq!(out[0].tag, Some(VpsId(2)));
    }

    #[test]
    fn child_and_exit_on_one_knote_report_only_the_exit() {
        // OpenBSD: data was overwritten by the wait status, so it is no parent PID.
        let (d, out) =
            one(RawKevent { ident: 77, flags: EV_EOF, fflags: NOTE_CHILD | NOTE_EXIT, data: 1 << 8, udata: 4 });
        assert_eq!(d, Decoded::Events(1));
        assert!(
            matches!(out[0].kind, EventKind::Exit { pid: p, status: Some(ExitStatus::Exited(1)), .. } if p == pid(77))
        );
    }

    #[test]
    fn child_then_exec_on_one_knote_keeps_the_parent() {
        let (_, out) = one(RawKevent { ident: 8, fflags: NOTE_CHILD | NOTE_EXEC, data: 3, ..Default::default() });
        assert_eq!(out.len(), 2);
        assert!(matches!(out[0].kind, EventKind::Fork { parent: p, .. } if p == pid(3)));
        assert!(matches!(out[1].kind, EventKind::Exec { .. }));
    }

    #[test]
    fn eof_without_note_exit_is_an_exit_of_unknown_status() {
        let (_, out) = one(RawKevent { ident: 9, flags: EV_EOF, ..Default::default() });
        assert!(matches!(out[0].kind, EventKind::Exit { status: None, group_dead: Some(true), .. }));
    }

    #[test]
    fn a_child_note_without_a_parent_pid_is_reported_as_a_loss() {
        let (_, out) = one(RawKevent { ident: 9, fflags: NOTE_CHILD, data: 0, ..Default::default() });
        assert_eq!(out[0].kind, EventKind::Lost { count: None, reason: LossReason::Other });
    }

    #[test]
    fn receipts_and_junk() {
        assert_eq!(
            one(RawKevent { ident: 5, flags: EV_ERROR, data: 3, ..Default::default() }).0,
            Decoded::Receipt { ident: 5, errno: 3 }
        );
        assert_eq!(
            one(RawKevent { ident: 5, flags: EV_ERROR, data: 0, ..Default::default() }).0,
            Decoded::Receipt { ident: 5, errno: 0 }
        );
        // ident 0 or out of PID range, and no bits at all.
        assert_eq!(one(RawKevent { ident: 0, fflags: NOTE_EXEC, ..Default::default() }).0, Decoded::Ignored);
        assert_eq!(one(RawKevent { ident: u64::MAX, fflags: NOTE_EXEC, ..Default::default() }).0, Decoded::Ignored);
        assert_eq!(one(RawKevent { ident: 5, ..Default::default() }), (Decoded::Ignored, vec![]));
        // NOTE_FORK (not asked for) alone produces nothing.
        assert_eq!(one(RawKevent { ident: 5, fflags: NOTE_FORK, ..Default::default() }).0, Decoded::Ignored);
    }

    #[test]
    fn vps_ids_map_to_udata() {
        assert_eq!(udata_for(VpsId(12)), Some(12));
        if usize::BITS < 64 {
            assert_eq!(udata_for(VpsId(u64::MAX)), None);
        }
    }

    fn fork(parent: i32, child: i32, tag: u64) -> Event {
        Event {
            tag: Some(VpsId(tag)),
            ..Event::new(EventKind::Fork {
                parent: pid(parent),
                child: pid(child),
                child_thread: pid(child),
                thread: false,
                child_start: None,
            })
        }
    }

    fn exit(p: i32, tag: u64) -> Event {
        Event {
            tag: Some(VpsId(tag)),
            ..Event::new(EventKind::Exit { pid: pid(p), thread: pid(p), status: None, group_dead: Some(true) })
        }
    }

    #[test]
    fn tag_table_follows_forks_and_exits_and_drops_duplicate_forks() {
        let mut t = TagTable::default();
        t.watch(pid(100), VpsId(1));
        let mut evs = vec![fork(100, 101, 1), fork(100, 101, 1), fork(101, 102, 1)];
        let mut stale = vec![];
        t.apply(&mut evs, 0, &mut stale);
        assert_eq!(evs, vec![fork(100, 101, 1), fork(101, 102, 1)]);
        assert_eq!(t.get(pid(101)), Some(VpsId(1)));
        assert_eq!(t.get(pid(102)), Some(VpsId(1)));
        assert_eq!(t.len(), 3);

        // Exit removes; the PID can then come back (reuse) and is announced again.
        let mut evs = vec![exit(101, 1), fork(100, 101, 1)];
        t.apply(&mut evs, 0, &mut stale);
        assert_eq!(evs.len(), 2);
        assert_eq!(t.get(pid(101)), Some(VpsId(1)));
        assert!(stale.is_empty());
    }

    #[test]
    fn tag_table_only_touches_events_from_the_offset() {
        let mut t = TagTable::default();
        t.watch(pid(1), VpsId(1));
        let mut evs = vec![fork(1, 2, 1), fork(1, 2, 1)];
        let mut stale = vec![];
        t.apply(&mut evs, 1, &mut stale);
        // The first is before `from`; the second is the first sighting of 2.
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn forgotten_vps_events_are_dropped_and_live_knotes_reported() {
        let mut t = TagTable::default();
        t.watch(pid(10), VpsId(1));
        t.watch(pid(20), VpsId(2));
        let mut stale = vec![];
        let mut evs = vec![fork(10, 11, 1)];
        t.apply(&mut evs, 0, &mut stale);
        assert_eq!(t.forget(VpsId(1)), vec![pid(10), pid(11)]);
        assert_eq!(t.get(pid(10)), None);
        let mut evs = vec![
            fork(11, 12, 1),
            Event { tag: Some(VpsId(1)), ..Event::new(EventKind::Exec { pid: pid(11), thread: pid(11) }) },
            exit(10, 1),
            Event {
                tag: Some(VpsId(1)),
                ..Event::new(EventKind::Lost { count: None, reason: LossReason::TrackingError })
            },
            fork(20, 21, 2),
        ];
        t.apply(&mut evs, 0, &mut stale);
        assert_eq!(evs, vec![fork(20, 21, 2)]);
        assert_eq!(stale, vec![pid(12), pid(11)]);
        assert_eq!(t.get(pid(21)), Some(VpsId(2)));
        assert!(!t.is_empty());
    }

    #[test]
    fn a_batch_is_decoded_in_order_through_the_table() {
        let mut t = TagTable::default();
        t.watch(pid(100), VpsId(9));
        let batch = [
            RawKevent { ident: 101, fflags: NOTE_CHILD, data: 100, udata: 9, ..Default::default() },
            // The duplicate announcement a not-yet-read one-shot knote causes.
            RawKevent { ident: 101, fflags: NOTE_CHILD, data: 100, udata: 9, ..Default::default() },
            RawKevent { ident: 5, flags: EV_ERROR, data: 0, ..Default::default() },
            RawKevent { ident: 101, fflags: NOTE_EXEC, udata: 9, ..Default::default() },
            RawKevent { ident: 101, flags: EV_EOF, fflags: NOTE_EXIT, data: 2 << 8, udata: 9 },
            RawKevent { ident: 100, fflags: NOTE_TRACKERR, udata: 9, ..Default::default() },
        ];
        let mut out = vec![];
        let mut stale = vec![];
        assert_eq!(decode_batch(&batch, &mut t, &mut out, &mut stale), 4);
        assert!(matches!(out[0].kind, EventKind::Fork { child: c, .. } if c == pid(101)));
        assert!(matches!(out[1].kind, EventKind::Exec { .. }));
        assert!(matches!(out[2].kind, EventKind::Exit { status: Some(ExitStatus::Exited(2)), .. }));
        assert_eq!(out[3].kind, EventKind::Lost { count: None, reason: LossReason::TrackingError });
        assert_eq!(t.get(pid(101)), None);
        assert_eq!(t.get(pid(100)), Some(VpsId(9)));
        assert!(stale.is_empty());
    }
}
