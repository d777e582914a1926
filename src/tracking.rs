//! Applying a backend's events to the mapping table, and resynchronising from a scan.
//!
//! Data flows one way: backend -> [`Event`] -> [`Tracking::apply`] -> table (and a tagged event
//! for subscribers); a `Lost` event -> [`Tracking::resync`] (scan) -> table.
//!
//! Ordering facts this relies on (Linux; the other backends give the same guarantees):
//! - the proc connector queues a child's fork event inside `copy_process()`, before
//!   `wake_up_new_task()`, so every event of a child comes after its fork event;
//! - a process's exit event is queued in `do_exit()` right after `exit_notify()`, which is what lets
//!   its parent reap it and free its pid. A reused pid's fork event therefore comes after the
//!   previous holder's exit event unless the pid counter goes all the way round (pids are handed out
//!   in a cycle) inside those few microseconds between the reap and `proc_exit_connector()`; and a
//!   query in that window may still list a process its parent has just reaped (it goes with the
//!   exit event).
//!
//! So events applied in order give an exact table. Time stamps guard what order cannot: after a
//! resync, events older than the scan are not applied (the scan already reflects them), and an
//! event older than a table entry's start time is about a previous holder of that pid.

use std::collections::{HashMap, HashSet};
use std::io;

use serde::Serialize;

use crate::sys::{ProcInfo, ProcUsage, Reaped};
use crate::table::{Entry, MappingTable, Source};
use crate::{Event, EventKind, Pid, ProcessId, StartTime, VpsId};

/// What the core needs from the system: a scan of all processes, one process, the clock.
pub(crate) trait ProcView {
    fn scan(&mut self) -> io::Result<Vec<ProcInfo>>;
    fn process(&mut self, pid: Pid) -> io::Result<Option<ProcInfo>>;
    /// Now, on the clock of `Event::time_ns` (Linux: CLOCK_BOOTTIME), in nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// Nanoseconds per start-time unit (Linux: 10^9 / CLK_TCK).
    fn ns_per_start_unit(&self) -> u64;
    /// Two start times this close are the same process.
    fn start_tolerance(&self) -> u64;
}

/// Everything the manager asks the system, beyond what the table logic needs ([`ProcView`]): the
/// seam that lets the manager's lifecycle be tested against a scripted system.
pub(crate) trait System: ProcView + Send {
    /// Reaps `pid`, a child of ours, if it has exited: its wait status, and its CPU time with
    /// that of the children it waited for, where the system reports it (`wait4`'s rusage).
    fn try_reap(&mut self, pid: Pid) -> io::Result<Option<Reaped>>;
    /// What `pid` has used so far (CPU of its own and of the children it waited for, resident
    /// memory); `None` when it is gone.
    fn usage(&mut self, pid: Pid) -> io::Result<Option<ProcUsage>>;
    /// Whether `pid` ignores `SIGCHLD` (its exited children are reaped by the kernel and their
    /// time added to nobody); `None` when it is gone (see `sys::sigchld_ignored`).
    fn sigchld_ignored(&mut self, pid: Pid) -> io::Result<Option<bool>>;
    /// Sends `sig` to the process `id` only if that very process still lives (see
    /// `sys::signal_exact`); whether it was sent.
    fn signal_exact(&mut self, id: ProcessId, sig: i32) -> io::Result<bool>;
    /// This system as a [`ProcView`] (written out: trait upcasting needs Rust 1.86, newer than
    /// our `rust-version`).
    fn as_view(&mut self) -> &mut dyn ProcView;
}

/// The real system.
pub(crate) struct SystemView {
    ns_per_unit: u64,
}

impl SystemView {
    pub(crate) fn new() -> SystemView {
        SystemView { ns_per_unit: crate::sys::ns_per_start_unit() }
    }
}

impl ProcView for SystemView {
    fn scan(&mut self) -> io::Result<Vec<ProcInfo>> {
        crate::sys::scan()
    }
    fn process(&mut self, pid: Pid) -> io::Result<Option<ProcInfo>> {
        crate::sys::process(pid)
    }
    fn now_ns(&mut self) -> u64 {
        crate::sys::now_ns()
    }
    fn ns_per_start_unit(&self) -> u64 {
        self.ns_per_unit
    }
    fn start_tolerance(&self) -> u64 {
        crate::sys::start_tolerance()
    }
}

impl System for SystemView {
    fn try_reap(&mut self, pid: Pid) -> io::Result<Option<Reaped>> {
        crate::sys::try_reap(pid)
    }
    fn usage(&mut self, pid: Pid) -> io::Result<Option<ProcUsage>> {
        crate::sys::proc_usage(pid)
    }
    fn sigchld_ignored(&mut self, pid: Pid) -> io::Result<Option<bool>> {
        crate::sys::sigchld_ignored(pid)
    }
    fn signal_exact(&mut self, id: ProcessId, sig: i32) -> io::Result<bool> {
        crate::sys::signal_exact(id, sig)
    }
    fn as_view(&mut self) -> &mut dyn ProcView {
        self
    }
}

/// Counters an operator can watch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Events applied.
    pub events: u64,
    /// Times the backend reported lost events.
    pub loss_reports: u64,
    /// Events known lost (where the backend could count them).
    pub lost_events: u64,
    /// Resynchronisations from a scan.
    pub resyncs: u64,
    /// Entries a resync removed (their process was gone).
    pub resync_removed: u64,
    /// Entries a resync added (found below a tagged ancestor).
    pub resync_added: u64,
    /// Events ignored because they predated a resync or the entry they named.
    pub stale_events: u64,
}

/// An event with the VPS it belongs to, as subscribers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaggedEvent {
    /// What the backend reported.
    pub event: Event,
    /// The VPS of the process it is about, if tagged (for an exit: the tag it had).
    pub vps: Option<VpsId>,
}

#[derive(Clone)]
pub(crate) struct Tracking {
    pub(crate) table: MappingTable,
    pub(crate) stats: Stats,
    /// Events stamped earlier than this predate the last resync's scan: not applied.
    ignore_before_ns: Option<u64>,
    /// Entries whose death must be confirmed by reading the system (a zombie leader with threads,
    /// a thread count that came from a scan).
    suspects: HashSet<Pid>,
    /// A resync is due (lost events).
    pub(crate) resync_due: bool,
}

impl Tracking {
    pub(crate) fn new() -> Tracking {
        Tracking {
            table: MappingTable::new(),
            stats: Stats::default(),
            ignore_before_ns: None,
            suspects: HashSet::new(),
            resync_due: false,
        }
    }

    /// Whether the entry of `pid` was born after `t` (so an event at `t` is about an earlier
    /// holder of the pid).
    fn predates(entry: &Entry, t: Option<u64>, ns_per_unit: u64) -> bool {
        match t {
            Some(t) => entry.id.start.0.saturating_mul(ns_per_unit) > t,
            None => false,
        }
    }

    /// Applies one event; returns it with its tag.
    pub(crate) fn apply(&mut self, ev: &Event, view: &mut dyn ProcView) -> TaggedEvent {
        self.stats.events += 1;
        let unit = view.ns_per_start_unit();
        let before_resync = matches!((ev.time_ns, self.ignore_before_ns), (Some(t), Some(b)) if t < b);
        let vps = match ev.kind {
            EventKind::Lost { count, .. } => {
                self.stats.loss_reports += 1;
                self.stats.lost_events += count.unwrap_or(0);
                self.resync_due = true;
                None
            }
            _ if before_resync => {
                self.stats.stale_events += 1;
                self.tag_of_event(ev)
            }
            EventKind::Fork { parent, child, child_thread: _, thread, child_start } => {
                if thread {
                    match self.table.get_mut(parent) {
                        Some(e) if !Self::predates(e, ev.time_ns, unit) => {
                            e.threads = e.threads.saturating_add(1);
                            Some(e.vps)
                        }
                        _ => None,
                    }
                } else {
                    self.apply_fork(ev, parent, child, child_start, view)
                }
            }
            EventKind::Exec { pid, thread } => match self.table.get_mut(pid) {
                Some(e) if !Self::predates(e, ev.time_ns, unit) => {
                    if thread != pid {
                        // execve from a non-main thread: the other threads (and the old leader)
                        // are gone, the caller took over the process id.
                        e.threads = 1;
                        e.leader_exited = false;
                    }
                    Some(e.vps)
                }
                _ => None,
            },
            EventKind::Exit { pid, thread, group_dead, .. } => self.apply_exit(ev, pid, thread, group_dead, view),
            // A kind of event this version does not know: it changes nothing here.
            _ => self.tag_of_event(ev),
        };
        TaggedEvent { event: *ev, vps }
    }

    fn tag_of_event(&self, ev: &Event) -> Option<VpsId> {
        let pid = match ev.kind {
            EventKind::Fork { child, .. } => child,
            EventKind::Exec { pid, .. } | EventKind::Exit { pid, .. } => pid,
            _ => return None,
        };
        ev.tag.or_else(|| self.table.vps_of(pid))
    }

    fn apply_fork(
        &mut self,
        ev: &Event,
        parent: Pid,
        child: Pid,
        child_start: Option<StartTime>,
        view: &mut dyn ProcView,
    ) -> Option<VpsId> {
        let unit = view.ns_per_start_unit();
        if let Some(old) = self.table.get(child) {
            let same_process = match (child_start, ev.time_ns) {
                (Some(s), _) => old.same_start(s, view.start_tolerance()),
                // The fork event is stamped just after the child's start time: an entry that
                // started within a tick of it is this very child, recorded already (a first
                // process or a loader member, registered before its fork event was read).
                (None, Some(t)) => old.id.start.0.saturating_add(1) >= t / unit.max(1),
                (None, None) => true,
            };
            if same_process || Self::predates(old, ev.time_ns, unit) {
                return Some(old.vps);
            }
            // The previous holder's exit was never applied (it was lost): it is gone now.
            self.table.remove(child);
            self.suspects.remove(&child);
        }
        let vps = match ev.tag {
            Some(t) => t,
            None => match self.table.get(parent) {
                Some(p) if !Self::predates(p, ev.time_ns, unit) => p.vps,
                _ => return None,
            },
        };
        let (start, approx) = match (child_start, ev.time_ns) {
            (Some(s), _) => (s, false),
            // The child's start time is within one tick before the fork event's time stamp.
            (None, Some(t)) => (StartTime(t / unit.max(1)), true),
            (None, None) => match view.process(child) {
                Ok(Some(info)) => (info.id.start, false),
                _ => (StartTime(view.now_ns() / unit.max(1)), true),
            },
        };
        let mut e = Entry::new(ProcessId { pid: child, start }, vps, Source::Event, Some(parent));
        e.start_approx = approx;
        self.table.insert(e);
        Some(vps)
    }

    fn apply_exit(
        &mut self,
        ev: &Event,
        pid: Pid,
        thread: Pid,
        group_dead: Option<bool>,
        view: &mut dyn ProcView,
    ) -> Option<VpsId> {
        let unit = view.ns_per_start_unit();
        let e = self.table.get_mut(pid)?;
        if Self::predates(e, ev.time_ns, unit) {
            self.stats.stale_events += 1;
            return None;
        }
        let vps = e.vps;
        match group_dead {
            Some(true) => {
                self.table.remove(pid);
                self.suspects.remove(&pid);
            }
            Some(false) => {
                e.threads = e.threads.saturating_sub(1).max(1);
                if thread == pid {
                    e.leader_exited = true;
                }
            }
            None => {
                e.threads = e.threads.saturating_sub(1);
                if thread == pid {
                    e.leader_exited = true;
                }
                if e.threads == 0 {
                    if e.threads_exact {
                        self.table.remove(pid);
                        self.suspects.remove(&pid);
                    } else {
                        self.verify(pid, view);
                    }
                } else if e.leader_exited && !e.threads_exact {
                    self.suspects.insert(pid);
                }
            }
        }
        Some(vps)
    }

    /// Replaces the estimated start time of `pid`'s entry (from an event's time stamp, within one
    /// tick) by the one the system reports, when that process is still the entry's: after this the
    /// entry's identity can be compared exactly (a signal by pidfd checks it so). Nothing else of
    /// the entry changes; an entry whose process is gone is left to the events.
    pub(crate) fn settle_start(&mut self, pid: Pid, view: &mut dyn ProcView) {
        let tol = view.start_tolerance();
        let Some(e) = self.table.get_mut(pid) else { return };
        if !e.start_approx {
            return;
        }
        if let Ok(Some(info)) = view.process(pid) {
            if e.same_start(info.id.start, tol) {
                e.id.start = info.id.start;
                e.start_approx = false;
            }
        }
    }

    /// Reads `pid` from the system and removes its entry if that process is gone.
    fn verify(&mut self, pid: Pid, view: &mut dyn ProcView) {
        let tol = view.start_tolerance();
        let Some(e) = self.table.get_mut(pid) else {
            self.suspects.remove(&pid);
            return;
        };
        match view.process(pid) {
            Ok(Some(info)) if e.same_start(info.id.start, tol) && !(info.zombie && info.threads <= 1) => {
                e.threads = info.threads.max(1);
                e.threads_exact = false;
                if !e.start_approx || info.id.start != e.id.start {
                    e.id.start = info.id.start;
                }
                e.start_approx = false;
                if info.zombie || e.leader_exited {
                    // A zombie leader with live threads: check again later.
                    self.suspects.insert(pid);
                } else {
                    self.suspects.remove(&pid);
                }
            }
            Ok(_) => {
                self.table.remove(pid);
                self.suspects.remove(&pid);
            }
            // Could not read: keep it and look again later rather than guess.
            Err(_) => {
                self.suspects.insert(pid);
            }
        }
    }

    /// Re-examines entries whose death could not be confirmed from events alone.
    pub(crate) fn recheck_suspects(&mut self, view: &mut dyn ProcView) {
        if self.suspects.is_empty() {
            return;
        }
        let pids: Vec<Pid> = self.suspects.iter().copied().collect();
        for pid in pids {
            self.verify(pid, view);
        }
    }

    /// Whether some entry waits for a re-check.
    pub(crate) fn has_suspects(&self) -> bool {
        !self.suspects.is_empty()
    }

    /// Rebuilds the table against a scan of the system: drops entries whose process is gone, and
    /// tags every live process below a tagged ancestor. The table stays the authority: a tagged
    /// process keeps its tag whoever its parent is now.
    ///
    /// Call it after subscribing: events stamped before the scan began are then not applied, and
    /// events after it are, so nothing born during the scan is missed.
    /// Returns the processes it added.
    pub(crate) fn resync(&mut self, view: &mut dyn ProcView) -> io::Result<Vec<(Pid, VpsId)>> {
        let t0 = view.now_ns();
        let procs = view.scan()?;
        Ok(self.reconcile(t0, procs, view.start_tolerance()))
    }

    pub(crate) fn reconcile(&mut self, t0: u64, procs: Vec<ProcInfo>, tol: u64) -> Vec<(Pid, VpsId)> {
        self.stats.resyncs += 1;
        self.resync_due = false;
        self.ignore_before_ns = Some(t0);
        let by_pid: HashMap<Pid, &ProcInfo> = procs.iter().map(|p| (p.id.pid, p)).collect();

        // 1. Entries whose process is gone.
        let mut dead = Vec::new();
        for e in self.table.entries() {
            match by_pid.get(&e.id.pid) {
                Some(info) if e.same_start(info.id.start, tol) && !(info.zombie && info.threads <= 1) => {}
                _ => dead.push(e.id.pid),
            }
        }
        for pid in dead {
            self.table.remove(pid);
            self.suspects.remove(&pid);
            self.stats.resync_removed += 1;
        }
        for info in &procs {
            if let Some(e) = self.table.get_mut(info.id.pid) {
                e.id.start = info.id.start;
                e.start_approx = false;
                e.threads = info.threads.max(1);
                e.threads_exact = false;
                e.leader_exited = info.zombie;
                if info.zombie {
                    self.suspects.insert(info.id.pid);
                }
            }
        }

        // 2. Untagged live processes below a tagged ancestor.
        let mut memo: HashMap<Pid, Option<VpsId>> = HashMap::new();
        let mut added = Vec::new();
        for info in &procs {
            if self.table.get(info.id.pid).is_some() || (info.zombie && info.threads <= 1) {
                continue;
            }
            let mut path = Vec::new();
            let mut cur = Some(info.id.pid);
            let mut found = None;
            while let Some(p) = cur {
                if let Some(v) = self.table.vps_of(p) {
                    found = Some(v);
                    break;
                }
                if let Some(v) = memo.get(&p) {
                    found = *v;
                    break;
                }
                if path.len() > 4096 || path.contains(&p) {
                    break;
                }
                path.push(p);
                cur = by_pid.get(&p).and_then(|i| i.ppid);
            }
            for p in path {
                memo.insert(p, found);
                if let (Some(v), Some(i)) = (found, by_pid.get(&p)) {
                    if !(i.zombie && i.threads <= 1) {
                        added.push((i.id, i.ppid, i.threads, v));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (id, ppid, threads, v) in added {
            if self.table.get(id.pid).is_none() {
                let mut e = Entry::new(id, v, Source::Scan, ppid);
                e.threads = threads.max(1);
                self.table.insert(e);
                self.stats.resync_added += 1;
                out.push((id.pid, v));
            }
        }
        out
    }

    /// Records a process the manager itself placed in a VPS (a first process, a loader member).
    pub(crate) fn insert_member(&mut self, info: &ProcInfo, vps: VpsId, source: Source) {
        let mut e = Entry::new(info.id, vps, source, info.ppid);
        e.threads = info.threads.max(1);
        // A first process is held at the start gate: single-threaded, counted exactly from here.
        e.threads_exact = source == Source::First;
        self.table.insert(e);
    }

    /// Records a process held at a start gate (single-threaded, so counted exactly from here).
    pub(crate) fn insert_held(&mut self, info: &ProcInfo, vps: VpsId, source: Source) {
        let mut e = Entry::new(info.id, vps, source, info.ppid);
        e.threads = info.threads.max(1);
        e.threads_exact = true;
        self.table.insert(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitStatus, LossReason};

    /// A scripted system for the pure logic; the real kernel is exercised in `tests/` and
    /// `platform-tests/`.
    #[derive(Default)]
    struct FakeView {
        procs: HashMap<Pid, ProcInfo>,
        now: u64,
    }

    impl FakeView {
        fn add(&mut self, pid: i32, start: u64, ppid: i32, threads: u32, zombie: bool) {
            self.procs.insert(
                p(pid),
                ProcInfo {
                    id: ProcessId { pid: p(pid), start: StartTime(start) },
                    ppid: Pid::new(ppid),
                    uid: 0,
                    threads,
                    zombie,
                    name: format!("p{pid}"),
                },
            );
        }
    }

    impl ProcView for FakeView {
        fn scan(&mut self) -> io::Result<Vec<ProcInfo>> {
            Ok(self.procs.values().cloned().collect())
        }
        fn process(&mut self, pid: Pid) -> io::Result<Option<ProcInfo>> {
            Ok(self.procs.get(&pid).cloned())
        }
        fn now_ns(&mut self) -> u64 {
            self.now
        }
        fn ns_per_start_unit(&self) -> u64 {
            10_000_000
        }
        fn start_tolerance(&self) -> u64 {
            0
        }
    }

    fn p(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    const TICK: u64 = 10_000_000;

    fn at(kind: EventKind, t_ticks: u64) -> Event {
        Event { time_ns: Some(t_ticks * TICK + 1), cpu: Some(0), ..Event::new(kind) }
    }

    fn fork(parent: i32, child: i32, t: u64) -> Event {
        at(
            EventKind::Fork {
                parent: p(parent),
                child: p(child),
                child_thread: p(child),
                thread: false,
                child_start: None,
            },
            t,
        )
    }

    fn thread(pid: i32, tid: i32, t: u64) -> Event {
        at(EventKind::Fork { parent: p(pid), child: p(pid), child_thread: p(tid), thread: true, child_start: None }, t)
    }

    fn exit(pid: i32, tid: i32, t: u64) -> Event {
        at(EventKind::Exit { pid: p(pid), thread: p(tid), status: Some(ExitStatus::Exited(0)), group_dead: None }, t)
    }

    fn first(tr: &mut Tracking, v: &mut FakeView, pid: i32, start: u64) {
        v.add(pid, start, 1, 1, false);
        let info = v.process(p(pid)).unwrap().unwrap();
        tr.insert_member(&info, VpsId(1), Source::First);
    }

    #[test]
    fn an_estimated_start_is_settled_from_the_system_before_it_is_compared_exactly() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        // A fork event at tick 6: the start is estimated as tick 6; the kernel says 5 (the child
        // was born in the tick before the event was stamped).
        tr.apply(&fork(100, 101, 6), &mut v);
        assert_eq!(tr.table.get(p(101)).map(|e| (e.id.start, e.start_approx)), Some((StartTime(6), true)));
        v.add(101, 5, 100, 1, false);
        tr.settle_start(p(101), &mut v);
        assert_eq!(tr.table.get(p(101)).map(|e| (e.id.start, e.start_approx)), Some((StartTime(5), false)));
        // A later holder of the pid (another start, beyond the estimate's tick) is not taken for it.
        tr.apply(&fork(100, 102, 20), &mut v);
        v.add(102, 30, 1, 1, false);
        tr.settle_start(p(102), &mut v);
        assert_eq!(tr.table.get(p(102)).map(|e| (e.id.start, e.start_approx)), Some((StartTime(20), true)));
    }

    #[test]
    fn fork_chain_is_tagged_and_exits_remove() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        assert_eq!(tr.apply(&fork(100, 101, 6), &mut v).vps, Some(VpsId(1)));
        assert_eq!(tr.apply(&fork(101, 102, 7), &mut v).vps, Some(VpsId(1)));
        assert_eq!(tr.apply(&fork(999, 500, 7), &mut v).vps, None, "untracked parent");
        assert_eq!(tr.table.vps_of(p(102)), Some(VpsId(1)));
        assert!(tr.table.vps_of(p(500)).is_none());
        // The middle exits: its child keeps the tag (the table, not ancestry, is the authority).
        assert_eq!(tr.apply(&exit(101, 101, 8), &mut v).vps, Some(VpsId(1)));
        assert!(tr.table.vps_of(p(101)).is_none());
        assert_eq!(tr.table.vps_of(p(102)), Some(VpsId(1)));
    }

    #[test]
    fn threads_do_not_become_processes_and_leader_exit_keeps_process() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        tr.apply(&fork(100, 101, 6), &mut v);
        tr.apply(&thread(101, 150, 7), &mut v);
        assert!(tr.table.vps_of(p(150)).is_none(), "a thread is not a process entry");
        // pthread_exit in main: the leader's exit must not drop the process.
        tr.apply(&exit(101, 101, 8), &mut v);
        assert_eq!(tr.table.vps_of(p(101)), Some(VpsId(1)));
        // A fork from the surviving worker thread is attributed by thread group.
        assert_eq!(tr.apply(&fork(101, 160, 9), &mut v).vps, Some(VpsId(1)));
        // The last thread exits: the process is gone.
        tr.apply(&exit(101, 150, 10), &mut v);
        assert!(tr.table.vps_of(p(101)).is_none());
        assert_eq!(tr.table.vps_of(p(160)), Some(VpsId(1)));
    }

    #[test]
    fn exec_from_non_main_thread_keeps_tag() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        tr.apply(&fork(100, 101, 6), &mut v);
        tr.apply(&thread(101, 150, 7), &mut v);
        tr.apply(&thread(101, 151, 7), &mut v);
        // 151 execs: 150 and the old leader exit, then the exec is reported.
        tr.apply(&exit(101, 150, 8), &mut v);
        tr.apply(&exit(101, 101, 8), &mut v);
        tr.apply(&at(EventKind::Exec { pid: p(101), thread: p(151) }, 8), &mut v);
        assert_eq!(tr.table.vps_of(p(101)), Some(VpsId(1)));
        assert_eq!(tr.apply(&fork(101, 170, 9), &mut v).vps, Some(VpsId(1)));
        tr.apply(&exit(101, 101, 10), &mut v);
        assert!(tr.table.vps_of(p(101)).is_none());
    }

    #[test]
    fn pid_reuse_gets_the_new_holders_tag() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        tr.apply(&fork(100, 101, 6), &mut v);
        tr.apply(&exit(101, 101, 7), &mut v);
        // pid 101 comes back as an untracked process.
        assert_eq!(tr.apply(&fork(999, 101, 900), &mut v).vps, None);
        assert!(tr.table.vps_of(p(101)).is_none());
        // A lost exit: the old holder is still in the table when the pid is reused.
        tr.apply(&fork(100, 102, 901), &mut v);
        assert_eq!(tr.apply(&fork(998, 102, 1800), &mut v).vps, None);
        assert!(tr.table.vps_of(p(102)).is_none(), "stale entry after pid reuse");
    }

    #[test]
    fn loss_triggers_resync_that_drops_dead_and_adds_descendants() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        tr.apply(&fork(100, 101, 6), &mut v);
        tr.apply(&fork(100, 102, 6), &mut v);
        let lost = Event::new(EventKind::Lost { count: Some(3), reason: LossReason::Overflow });
        tr.apply(&lost, &mut v);
        assert!(tr.resync_due);
        // Meanwhile: 101 died, 102 lives and forked 103 (lost), whose child 104 was orphaned
        // and re-parented to the subreaper 100; an untracked tree 200 -> 201.
        v.add(102, 6, 100, 1, false);
        v.add(104, 7, 100, 1, false);
        v.add(200, 3, 1, 1, false);
        v.add(201, 7, 200, 1, false);
        v.now = 10 * TICK;
        tr.resync(&mut v).unwrap();
        assert!(!tr.resync_due);
        assert!(tr.table.vps_of(p(101)).is_none());
        assert_eq!(tr.table.vps_of(p(102)), Some(VpsId(1)));
        assert_eq!(tr.table.vps_of(p(104)), Some(VpsId(1)));
        assert_eq!(tr.table.get(p(104)).map(|e| e.source), Some(Source::Scan));
        assert!(tr.table.vps_of(p(201)).is_none());
        assert_eq!(tr.stats.lost_events, 3);
        assert_eq!(tr.stats.resyncs, 1);
        // An event stamped before the scan is not applied (the scan already saw its effect)...
        tr.apply(&exit(102, 102, 9), &mut v);
        assert_eq!(tr.table.vps_of(p(102)), Some(VpsId(1)));
        // ...one after it is. Its thread count came from the scan, so the system is asked: the
        // exit event is sent before the task is a zombie, so it may still look alive...
        tr.apply(&exit(102, 102, 11), &mut v);
        assert!(tr.has_suspects());
        // ...and a re-check a moment later finds it gone.
        v.procs.remove(&p(102));
        tr.recheck_suspects(&mut v);
        assert!(tr.table.vps_of(p(102)).is_none());
    }

    #[test]
    fn scanned_entry_with_unknown_threads_is_verified_before_removal() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        // A process with 3 threads found by a scan.
        v.add(110, 6, 100, 3, false);
        v.now = 10 * TICK;
        tr.resync(&mut v).unwrap();
        assert_eq!(tr.table.vps_of(p(110)), Some(VpsId(1)));
        // Exits of threads created before we subscribed: the count reaches zero, but the
        // system says the process lives on (a zombie leader with a live thread).
        v.add(110, 6, 100, 2, true);
        for tid in [111, 112, 110] {
            tr.apply(&exit(110, tid, 11), &mut v);
        }
        assert_eq!(tr.table.vps_of(p(110)), Some(VpsId(1)));
        assert!(tr.has_suspects());
        // Later the last thread is gone: a re-check removes it.
        v.procs.remove(&p(110));
        tr.recheck_suspects(&mut v);
        assert!(tr.table.vps_of(p(110)).is_none());
        assert!(!tr.has_suspects());
    }

    #[test]
    fn own_fork_event_of_a_registered_first_process_keeps_it() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        // The manager registers its child at the start gate before reading that child's fork
        // event (the manager itself is untracked).
        first(&mut tr, &mut v, 100, 5);
        assert_eq!(tr.apply(&fork(50, 100, 5), &mut v).vps, Some(VpsId(1)));
        assert_eq!(tr.table.vps_of(p(100)), Some(VpsId(1)));
    }

    #[test]
    fn backend_tags_win_and_clone_parent_child_of_first_is_tagged() {
        let (mut tr, mut v) = (Tracking::new(), FakeView::default());
        first(&mut tr, &mut v, 100, 5);
        // clone(CLONE_PARENT) from 101: the kernel names 100 (101's parent) as the parent.
        tr.apply(&fork(100, 101, 6), &mut v);
        assert_eq!(tr.apply(&fork(100, 105, 7), &mut v).vps, Some(VpsId(1)));
        // A backend that holds tags (kqueue udata) reports them directly.
        let mut ev = fork(999, 300, 8);
        ev.tag = Some(VpsId(9));
        assert_eq!(tr.apply(&ev, &mut v).vps, Some(VpsId(9)));
        assert_eq!(tr.table.vps_of(p(300)), Some(VpsId(9)));
    }
}
