//! The mapping table: pid -> VPS and VPS -> members, keyed by process identity.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::{Pid, ProcessId, StartTime, VpsId};

/// How the table learned that a process belongs to its VPS, so users can see why it is tagged.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Source {
    /// It is the VPS's first process, started by the manager.
    First,
    /// A fork or clone event from a tagged parent.
    Event,
    /// A scan of the system (start-up or after lost events) found it below a tagged ancestor.
    Scan,
    /// It registered itself through the loader (`vpstag exec`) or was adopted.
    Loader,
}

/// One tagged process.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The process's identity.
    pub id: ProcessId,
    /// Its VPS.
    pub vps: VpsId,
    /// How the table learned it.
    pub source: Source,
    /// The parent the table saw it born from, when known.
    pub parent: Option<Pid>,
    /// The start time was estimated from an event's time stamp (within one clock tick), not read.
    pub(crate) start_approx: bool,
    /// Live threads, as counted from events.
    pub(crate) threads: u32,
    /// `threads` is exact: counted from the process's birth event on. Otherwise it came from a
    /// scan and only hints; a count reaching zero is then checked against the system.
    pub(crate) threads_exact: bool,
    /// The thread-group leader has exited (pthread_exit in main) while other threads may live.
    pub(crate) leader_exited: bool,
    /// Live entries born from (or found below) this one: when this process exits with children
    /// left, they are re-parented, possibly out of their VPS's subtree (see
    /// [`MappingTable::take_orphaned`]).
    pub(crate) children: u32,
}

impl Entry {
    /// A new entry for a single-threaded process.
    pub(crate) fn new(id: ProcessId, vps: VpsId, source: Source, parent: Option<Pid>) -> Entry {
        Entry {
            id,
            vps,
            source,
            parent,
            start_approx: false,
            threads: 1,
            threads_exact: source == Source::Event || source == Source::First,
            leader_exited: false,
            children: 0,
        }
    }

    /// Whether `start`, read from the system, is this entry's process (`tolerance` in start-time
    /// units; one more tick when the entry's start was estimated).
    pub(crate) fn same_start(&self, start: StartTime, tolerance: u64) -> bool {
        let tol = tolerance + u64::from(self.start_approx);
        self.id.start.0.abs_diff(start.0) <= tol
    }
}

/// pid -> VPS and VPS -> members, O(1) both ways.
///
/// A PID is reused, so each entry carries the process's identity (pid and start time); the
/// manager removes an entry when its process exits and checks identities whenever it reads the
/// system.
///
/// ```
/// use vpstag::{MappingTable, Pid, ProcessId, StartTime, VpsId};
///
/// let table = MappingTable::new();
/// assert!(table.vps_of(Pid::new(1).unwrap()).is_none());
/// assert_eq!(table.len(), 0);
/// ```
#[derive(Default, Clone, Debug)]
pub struct MappingTable {
    by_pid: HashMap<Pid, Entry>,
    members: HashMap<VpsId, HashSet<Pid>>,
    /// When enabled, every insertion and removal, for a journal.
    log: Option<Vec<Change>>,
    /// Processes that left the table with children still in it, since the last
    /// [`take_orphaned`](MappingTable::take_orphaned).
    orphaning: Vec<Pid>,
}

/// One change to the table, as a journal records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Change {
    /// A process was tagged.
    Added {
        /// Process id.
        pid: Pid,
        /// Start time (system units).
        start: StartTime,
        /// Its VPS.
        vps: VpsId,
        /// How it was learned.
        source: Source,
        /// The parent it was seen born from.
        parent: Option<Pid>,
    },
    /// A tagged process is gone (or its VPS was forgotten).
    Removed {
        /// Process id.
        pid: Pid,
        /// Start time (system units).
        start: StartTime,
        /// The VPS it had.
        vps: VpsId,
    },
}

impl MappingTable {
    /// An empty table.
    pub fn new() -> MappingTable {
        MappingTable::default()
    }

    /// How many processes are tagged.
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// Whether no process is tagged.
    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// The VPS of the process that holds `pid` now, as far as the table knows.
    pub fn vps_of(&self, pid: Pid) -> Option<VpsId> {
        self.by_pid.get(&pid).map(|e| e.vps)
    }

    /// The entry of `pid`.
    pub fn get(&self, pid: Pid) -> Option<&Entry> {
        self.by_pid.get(&pid)
    }

    pub(crate) fn get_mut(&mut self, pid: Pid) -> Option<&mut Entry> {
        self.by_pid.get_mut(&pid)
    }

    /// The pids tagged with `vps`, in no particular order.
    pub fn members(&self, vps: VpsId) -> impl Iterator<Item = Pid> + '_ {
        self.members.get(&vps).into_iter().flat_map(|s| s.iter().copied())
    }

    /// How many processes carry `vps`.
    pub fn member_count(&self, vps: VpsId) -> usize {
        self.members.get(&vps).map_or(0, HashSet::len)
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.by_pid.values()
    }

    /// Starts (or stops) recording changes; see [`MappingTable::take_changes`].
    pub(crate) fn record_changes(&mut self, on: bool) {
        self.log = if on { Some(self.log.take().unwrap_or_default()) } else { None };
    }

    /// The changes recorded since the last call.
    pub(crate) fn take_changes(&mut self) -> Vec<Change> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn note_removed(&mut self, e: &Entry) {
        if let Some(log) = &mut self.log {
            log.push(Change::Removed { pid: e.id.pid, start: e.id.start, vps: e.vps });
        }
    }

    /// Inserts or replaces the entry for `entry.id.pid`; returns the replaced one.
    pub(crate) fn insert(&mut self, entry: Entry) -> Option<Entry> {
        let pid = entry.id.pid;
        let vps = entry.vps;
        if let Some(log) = &mut self.log {
            log.push(Change::Added { pid, start: entry.id.start, vps, source: entry.source, parent: entry.parent });
        }
        let mut entry = entry;
        match self.by_pid.get(&pid).map(|o| (o.id == entry.id, o.parent, o.children)) {
            // The same process re-tagged: it keeps its children (and its parent's count).
            Some((true, _, children)) => entry.children = children,
            prior => {
                // A new process (or a later holder of a reused pid, which replaces the earlier).
                if let Some((_, parent, children)) = prior {
                    self.leave(pid, parent, children);
                }
                if let Some(pe) = entry.parent.and_then(|pp| self.by_pid.get_mut(&pp)) {
                    pe.children += 1;
                }
            }
        }
        let old = self.by_pid.insert(pid, entry);
        if let Some(o) = &old {
            if o.vps != vps {
                self.unlink(o.vps, pid);
            }
        }
        self.members.entry(vps).or_default().insert(pid);
        old
    }

    /// Removes the entry of `pid`.
    pub(crate) fn remove(&mut self, pid: Pid) -> Option<Entry> {
        let old = self.by_pid.remove(&pid)?;
        self.unlink(old.vps, pid);
        self.leave(pid, old.parent, old.children);
        self.note_removed(&old);
        Some(old)
    }

    /// The entry of `pid` leaves the table: its parent has one child less, and its own children
    /// (if it has any) are orphans.
    fn leave(&mut self, pid: Pid, parent: Option<Pid>, children: u32) {
        if let Some(pe) = parent.and_then(|pp| self.by_pid.get_mut(&pp)) {
            pe.children = pe.children.saturating_sub(1);
        }
        if children > 0 {
            self.orphaning.push(pid);
        }
    }

    /// The entries whose parent left the table while they live on, since the last call: the
    /// kernel re-parents them (to the nearest child subreaper, or to init), so they may now be
    /// outside their VPS's subtree, and a scan could no longer find them from the VPS's root. A
    /// journal that records only roots records these too. Cheap when nothing was orphaned.
    pub(crate) fn take_orphaned(&mut self) -> Vec<Entry> {
        if self.orphaning.is_empty() {
            return Vec::new();
        }
        let parents: HashSet<Pid> = self.orphaning.drain(..).collect();
        let mut out = Vec::new();
        for e in self.by_pid.values_mut() {
            if e.parent.is_some_and(|p| parents.contains(&p)) {
                // Its birth parent is gone: it counts against no later holder of that pid.
                e.parent = None;
                out.push(e.clone());
            }
        }
        out
    }

    /// Removes every entry of `vps`.
    pub(crate) fn remove_vps(&mut self, vps: VpsId) -> usize {
        let pids = self.members.remove(&vps).unwrap_or_default();
        for p in &pids {
            if let Some(old) = self.by_pid.remove(p) {
                // Its children go with it (same VPS) or are no longer this VPS's business.
                self.leave(*p, old.parent, 0);
                self.note_removed(&old);
            }
        }
        pids.len()
    }

    fn unlink(&mut self, vps: VpsId, pid: Pid) {
        if let Some(set) = self.members.get_mut(&vps) {
            set.remove(&pid);
            if set.is_empty() {
                self.members.remove(&vps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    fn id(n: i32, start: u64) -> ProcessId {
        ProcessId { pid: pid(n), start: StartTime(start) }
    }

    #[test]
    fn insert_lookup_remove_both_ways() {
        let mut t = MappingTable::new();
        t.insert(Entry::new(id(10, 1), VpsId(1), Source::First, None));
        t.insert(Entry::new(id(11, 2), VpsId(1), Source::Event, Some(pid(10))));
        t.insert(Entry::new(id(20, 2), VpsId(2), Source::First, None));
        assert_eq!(t.vps_of(pid(11)), Some(VpsId(1)));
        assert_eq!(t.member_count(VpsId(1)), 2);
        let mut m: Vec<_> = t.members(VpsId(1)).collect();
        m.sort();
        assert_eq!(m, vec![pid(10), pid(11)]);
        assert_eq!(t.remove(pid(11)).map(|e| e.vps), Some(VpsId(1)));
        assert_eq!(t.member_count(VpsId(1)), 1);
        assert!(t.remove(pid(11)).is_none());
        assert_eq!(t.remove_vps(VpsId(2)), 1);
        assert!(t.vps_of(pid(20)).is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn replacing_moves_membership() {
        let mut t = MappingTable::new();
        t.insert(Entry::new(id(10, 1), VpsId(1), Source::First, None));
        // The pid is reused by a process of another VPS.
        let old = t.insert(Entry::new(id(10, 500), VpsId(2), Source::Event, None));
        assert_eq!(old.map(|e| e.id.start), Some(StartTime(1)));
        assert_eq!(t.member_count(VpsId(1)), 0);
        assert_eq!(t.member_count(VpsId(2)), 1);
    }

    #[test]
    fn changes_are_recorded_when_asked() {
        let mut t = MappingTable::new();
        t.insert(Entry::new(id(1, 1), VpsId(1), Source::First, None));
        assert!(t.take_changes().is_empty());
        t.record_changes(true);
        t.insert(Entry::new(id(2, 3), VpsId(1), Source::Event, Some(pid(1))));
        t.remove(pid(1));
        assert_eq!(
            t.take_changes(),
            vec![
                Change::Added {
                    pid: pid(2),
                    start: StartTime(3),
                    vps: VpsId(1),
                    source: Source::Event,
                    parent: Some(pid(1))
                },
                Change::Removed { pid: pid(1), start: StartTime(1), vps: VpsId(1) },
            ]
        );
        assert!(t.take_changes().is_empty());
    }

    #[test]
    fn a_parent_that_exits_with_live_children_orphans_them_once() {
        let mut t = MappingTable::new();
        let v = VpsId(1);
        t.insert(Entry::new(id(10, 1), v, Source::First, None));
        t.insert(Entry::new(id(11, 2), v, Source::Event, Some(pid(10))));
        t.insert(Entry::new(id(12, 3), v, Source::Event, Some(pid(10))));
        t.insert(Entry::new(id(13, 4), v, Source::Event, Some(pid(12))));
        // A child that exits before its parent orphans nothing.
        t.remove(pid(11));
        assert!(t.take_orphaned().is_empty());
        // The parent exits: its live child is an orphan (not the grandchild: its parent lives).
        t.remove(pid(10));
        let o: Vec<i32> = t.take_orphaned().iter().map(|e| e.id.pid.as_raw()).collect();
        assert_eq!(o, vec![12]);
        assert_eq!(t.get(pid(12)).unwrap().parent, None, "the dead parent is forgotten");
        assert!(t.take_orphaned().is_empty(), "reported once");
        // A later holder of pid 10 with no children orphans nothing when it exits.
        t.insert(Entry::new(id(10, 9), v, Source::Event, Some(pid(13))));
        t.remove(pid(10));
        assert!(t.take_orphaned().is_empty());
        // Re-tagging the same process keeps its children.
        t.insert(Entry::new(id(12, 3), v, Source::Loader, None));
        t.remove(pid(12));
        let o: Vec<i32> = t.take_orphaned().iter().map(|e| e.id.pid.as_raw()).collect();
        assert_eq!(o, vec![13]);
    }

    #[test]
    fn identity_tolerance() {
        let mut e = Entry::new(id(5, 100), VpsId(1), Source::Event, None);
        assert!(e.same_start(StartTime(100), 0));
        assert!(!e.same_start(StartTime(101), 0));
        e.start_approx = true;
        assert!(e.same_start(StartTime(99), 0));
        assert!(!e.same_start(StartTime(102), 0));
    }
}
