//! Snapshot and restore, and the hooks a journal uses.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use vpstag_tracker::{ForkTracker, Pid, ProcessId, StartTime, VpsId};

use super::{Manager, Vps, VpsRecord};
use crate::table::{Change, Source};
use crate::Result;
/// A VPS as saved by [`Manager::export`] and given back to [`Manager::restore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedVps {
    /// Its id.
    pub id: VpsId,
    /// Its name.
    pub name: String,
    /// Its first process.
    pub first_pid: Pid,
    /// The first process's start time (system units).
    pub first_start: StartTime,
    /// When it was started, in seconds since the epoch.
    pub started: u64,
    /// Its cgroup's directory, when it has one (taken up again by [`Manager::restore`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
}

/// A tagged process as saved by [`Manager::export`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedMember {
    /// Process id.
    pub pid: Pid,
    /// Start time (system units): a process with this pid but another start time is not it.
    pub start: StartTime,
    /// Its VPS id.
    pub vps: VpsId,
    /// How it was learned.
    pub source: Source,
}

impl Manager {
    /// Calls `f` with every batch of table changes from now on (for a journal). Called with the
    /// manager's lock held: keep it short (buffer, write, fsync).
    pub fn on_change(&self, f: impl FnMut(&[Change]) + Send + 'static) {
        let mut st = self.lock();
        st.tracking.table.record_changes(true);
        st.observer = Some(Box::new(f));
    }

    /// Calls `f` with the members whose parent has exited while they live on, from now on. The
    /// kernel re-parents such a process to the nearest child subreaper, which is inside its VPS
    /// while the VPS's root lives, or else outside it; so a journal that records only each VPS's
    /// roots (first processes and loader joins, which are subreapers) records these too, and a
    /// restart can rebuild every member from the journal's roots and a scan. Rare in practice
    /// (double-forked daemons, a root that exits before its descendants). Called with the manager's
    /// lock held: hand the batch on, do not block.
    pub fn on_orphans(&self, f: impl FnMut(&[(ProcessId, VpsId)]) + Send + 'static) {
        self.lock().orphan_observer = Some(Box::new(f));
    }

    /// Every VPS and member, for a snapshot.
    pub fn export(&self) -> Result<(Vec<SavedVps>, Vec<SavedMember>)> {
        let st = self.synced()?;
        let vpses = st
            .vpses
            .values()
            .map(|r| SavedVps {
                id: r.vps.id,
                name: r.vps.name.clone(),
                first_pid: r.first.pid,
                first_start: r.first.start,
                started: r.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                cgroup: r.cgroup.as_ref().map(|cg| cg.path().to_path_buf()),
            })
            .collect();
        let members = st
            .tracking
            .table
            .entries()
            .map(|e| SavedMember { pid: e.id.pid, start: e.id.start, vps: e.vps, source: e.source })
            .collect();
        Ok((vpses, members))
    }

    /// Brings back what [`export`](Manager::export) (or a journal) saved: every VPS, and each
    /// member whose process still lives with the same start time (a reused pid is not it). Then
    /// a resync adds what was born meanwhile below a restored member. Returns how many members
    /// came back.
    pub fn restore(&self, vpses: &[SavedVps], members: &[SavedMember]) -> Result<usize> {
        let mut st = self.synced()?;
        let tol = st.view.start_tolerance();
        for v in vpses {
            let (first, id) = (v.first_pid, v.id);
            st.next_id = st.next_id.max(id.0);
            let vps = Vps { id, name: v.name.clone(), first };
            let first_alive =
                matches!(st.view.process(first), Ok(Some(i)) if i.id.start.0.abs_diff(v.first_start.0) <= tol);
            st.vpses.insert(
                id,
                VpsRecord {
                    vps,
                    first: ProcessId { pid: first, start: v.first_start },
                    started: SystemTime::UNIX_EPOCH + Duration::from_secs(v.started),
                    command: None,
                    command_exit: None,
                    first_exit: None,
                    first_gone: !first_alive,
                    // A cgroup that is gone (or is no cgroup v2 directory) is not taken up.
                    cgroup: v
                        .cgroup
                        .as_ref()
                        .and_then(|p| crate::cgroup::VpsCgroup::open(p).ok())
                        .map(std::sync::Arc::new),
                },
            );
            st.names.insert(v.name.clone(), id);
        }
        let mut n = 0;
        for m in members {
            let pid = m.pid;
            if !st.vpses.contains_key(&m.vps) {
                continue;
            }
            match st.view.process(pid) {
                Ok(Some(info)) if info.id.start.0.abs_diff(m.start.0) <= tol && !(info.zombie && info.threads <= 1) => {
                    let _ = st.tracker.watch(pid, m.vps);
                    st.tracking.insert_member(&info, m.vps, m.source);
                    n += 1;
                }
                _ => {}
            }
        }
        st.resync()?;
        st.flush_changes();
        Ok(n)
    }

    /// Marks the first process of each VPS gone when the system says it is (exited, a zombie,
    /// or its pid now another process's). For the daemon after [`restore`](Manager::restore): a
    /// first process that is a zombie when restored, or exits between the restore's reading and
    /// its scan, sends no exit the table applies. Returns how many were marked.
    pub fn recheck_first_processes(&self) -> Result<usize> {
        let mut st = self.synced()?;
        let tol = st.view.start_tolerance();
        let mut n = 0;
        let st = &mut *st;
        for rec in st.vpses.values_mut().filter(|r| !r.first_gone) {
            let alive = matches!(st.view.process(rec.first.pid),
                Ok(Some(i)) if i.id.start.0.abs_diff(rec.first.start.0) <= tol && !(i.zombie && i.threads <= 1));
            if !alive {
                rec.first_gone = true;
                n += 1;
            }
        }
        Ok(n)
    }
}
