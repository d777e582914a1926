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

/// A change to the state that must survive a restart, as the manager makes it (see
/// [`Manager::on_journal`]). Replaying them in order (a later `Vps` with the same id replaces an
/// earlier one; `Forgotten` drops the VPS and its roots) gives what [`Manager::restore`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JournalEntry {
    /// A new VPS; the `Root` of its first process follows.
    Vps(SavedVps),
    /// A root of a VPS, from which a scan finds its members: its first process
    /// ([`Source::First`]), a process that joined it ([`Source::Loader`]), or a member whose
    /// parent exited while it lives on ([`Source::Event`]). The kernel re-parents such an orphan
    /// to the nearest child subreaper, which is inside its VPS while the VPS's first process
    /// lives, or else outside it; so a scan from the other roots may not reach it. Rare in
    /// practice (double-forked daemons, a root that exits before its descendants).
    Root(SavedMember),
    /// The VPS was forgotten ([`Manager::forget`]).
    Forgotten(VpsId),
}

impl super::State {
    /// Journals the VPS `id`, just made, and its first process as its root.
    pub(super) fn journal_new_vps(&mut self, id: VpsId) {
        if self.journal.is_none() {
            return;
        }
        let Some(r) = self.vpses.get(&id) else { return };
        let saved = saved_vps(r);
        let root = SavedMember { pid: r.first.pid, start: r.first.start, vps: id, source: Source::First };
        self.journal_pending.push(JournalEntry::Vps(saved));
        self.journal_pending.push(JournalEntry::Root(root));
    }

    /// Journals `id` as a root of `vps`.
    pub(super) fn journal_root(&mut self, id: ProcessId, vps: VpsId, source: Source) {
        if self.journal.is_some() {
            self.journal_pending.push(JournalEntry::Root(SavedMember { pid: id.pid, start: id.start, vps, source }));
        }
    }

    /// Journals that `vps` was forgotten.
    pub(super) fn journal_forgotten(&mut self, vps: VpsId) {
        if self.journal.is_some() {
            self.journal_pending.push(JournalEntry::Forgotten(vps));
        }
    }
}

/// A VPS as saved.
fn saved_vps(r: &VpsRecord) -> SavedVps {
    SavedVps {
        id: r.vps.id,
        name: r.vps.name.clone(),
        first_pid: r.first.pid,
        first_start: r.first.start,
        started: r.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        cgroup: r.cgroup.as_ref().map(|c| c.path().to_path_buf()),
    }
}

impl Manager {
    /// Calls `f` with every batch of table changes from now on (for a journal). Called with the
    /// manager's lock held: keep it short (buffer, write, fsync).
    pub fn on_change(&self, f: impl FnMut(&[Change]) + Send + 'static) {
        let mut st = self.lock();
        st.tracking.table.record_changes(true);
        st.observer = Some(Box::new(f));
    }

    /// Calls `f`, from now on, with every change to what a restart needs, in the order the
    /// manager makes them: each new VPS, its roots and each VPS forgotten (see [`JournalEntry`]).
    /// With these and a scan, [`restore`](Manager::restore) rebuilds every member: the manager is
    /// the one writer of that state, and a journal only appends what it is handed. Called with
    /// the manager's lock held: hand the batch on (a channel to a writer thread), do not block.
    ///
    /// ```
    /// # fn main() -> vpstag::Result<()> {
    /// # let Ok(mgr) = vpstag::Manager::with_backend(vpstag::BackendChoice::Auto) else { return Ok(()) };
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// mgr.on_journal(move |entries| {
    ///     let _ = tx.send(entries.to_vec());
    /// });
    /// // A writer thread appends what `rx` receives to a file, in order.
    /// # drop(rx);
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_journal(&self, f: impl FnMut(&[JournalEntry]) + Send + 'static) {
        self.lock().journal = Some(Box::new(f));
    }

    /// Every VPS and member, for a snapshot.
    pub fn export(&self) -> Result<(Vec<SavedVps>, Vec<SavedMember>)> {
        let st = self.synced()?;
        let vpses = st.vpses.values().map(saved_vps).collect();
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
