//! The registry of VPSes, and the ways a process comes in: registered first process, loader join, adoption.

use std::sync::Arc;
use std::time::SystemTime;

use vpstag_tracker::{ExitStatus, ForkTracker, Pid, ProcessId, VpsId};

use super::{Manager, State, Vps};
use crate::table::Source;
use crate::{Error, Result};
pub(super) struct VpsRecord {
    pub(super) vps: Vps,
    pub(super) first: ProcessId,
    pub(super) started: SystemTime,
    /// The user's command: the first child of the first process.
    pub(super) command: Option<Pid>,
    pub(super) command_exit: Option<ExitStatus>,
    pub(super) first_exit: Option<ExitStatus>,
    pub(super) first_gone: bool,
    /// Its cgroup, when the manager gave it one (see `Manager::use_cgroups`).
    pub(super) cgroup: Option<Arc<crate::cgroup::VpsCgroup>>,
}

impl VpsRecord {
    /// The record goes: its cgroup is removed if nothing is left in it (else it stays, with its
    /// limits, for the processes that still run there).
    pub(super) fn release(&self) {
        if let Some(cg) = &self.cgroup {
            let _ = cg.remove(std::time::Duration::ZERO);
        }
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let bad = |why| Err(Error::InvalidName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("use only letters, digits, '.', '_' and '-'");
    }
    if name.starts_with('-') || name.starts_with('.') {
        return bad("it must not start with '-' or '.'");
    }
    Ok(())
}

impl State {
    /// An id no VPS has had.
    pub(super) fn reserve_id(&mut self) -> VpsId {
        self.next_id += 1;
        VpsId(self.next_id)
    }

    pub(super) fn record(&self, vps: &Vps) -> Result<&VpsRecord> {
        self.vpses.get(&vps.id).ok_or_else(|| Error::UnknownVps(vps.name.clone()))
    }

    pub(super) fn name_in_use(&self, name: &str) -> bool {
        match self.names.get(name) {
            Some(id) => self.tracking.table.member_count(*id) > 0 || self.vpses.get(id).is_some_and(|r| !r.first_gone),
            None => false,
        }
    }

    pub(super) fn new_vps(&mut self, name: &str, first: ProcessId) -> Vps {
        self.new_vps_as(name, first, None)
    }

    /// A new VPS record; `id` when one was reserved for it (`reserve_id`), else the next.
    pub(super) fn new_vps_as(&mut self, name: &str, first: ProcessId, id: Option<VpsId>) -> Vps {
        if let Some(old) = self.names.remove(name) {
            if let Some(rec) = self.vpses.remove(&old) {
                rec.release();
            }
        }
        let id = id.unwrap_or_else(|| self.reserve_id());
        let vps = Vps { id, name: name.to_string(), first: first.pid };
        self.vpses.insert(
            id,
            VpsRecord {
                vps: vps.clone(),
                first,
                started: SystemTime::now(),
                command: None,
                command_exit: None,
                first_exit: None,
                first_gone: false,
                cgroup: None,
            },
        );
        self.names.insert(name.to_string(), id);
        vps
    }
}

impl Manager {
    /// Brings the running process `pid` (and its live descendants) into VPS `name`: the loader's
    /// way in. Creates the VPS when no VPS of that name is running.
    pub fn adopt(&self, name: &str, pid: Pid) -> Result<Vps> {
        validate_name(name)?;
        let mut st = self.synced()?;
        let info =
            st.view.process(pid).map_err(|e| Error::io("reading the process", e))?.ok_or(Error::NoSuchProcess(pid))?;
        let vps = match st.names.get(name).copied() {
            Some(id) if st.name_in_use(name) => {
                st.vpses.get(&id).map(|r| r.vps.clone()).ok_or_else(|| Error::UnknownVps(name.into()))?
            }
            _ => {
                let vps = st.new_vps(name, info.id);
                st.journal_new_vps(vps.id);
                vps
            }
        };
        st.tracker.watch(pid, vps.id)?;
        st.tracking.insert_member(&info, vps.id, Source::Loader);
        st.journal_root(info.id, vps.id, Source::Loader);
        // Its descendants that already exist are found by a scan; anything born from now on
        // comes as events after the scan's start.
        st.resync()?;
        st.flush_changes();
        Ok(vps)
    }
}

impl Manager {
    /// Checks a VPS name: 1 to 64 letters, digits, '.', '_' or '-', not starting with '-' or '.'
    /// ([`Error::InvalidName`] says why not).
    ///
    /// ```
    /// assert!(vpstag::Manager::validate_name("web-1").is_ok());
    /// assert!(vpstag::Manager::validate_name("-x").is_err());
    /// ```
    pub fn validate_name(name: &str) -> Result<()> {
        validate_name(name)
    }

    /// Registers `pid`, a process someone else forked and holds at a start gate, as the first
    /// process of a new VPS `name` (the daemon's way: the client forks the first process with its
    /// own credentials). The caller opens the gate after this returns.
    pub fn register_first(&self, name: &str, pid: Pid) -> Result<Vps> {
        validate_name(name)?;
        self.register_first_as(name, pid)
    }

    /// [`register_first`](Manager::register_first) under a key the caller has checked with
    /// [`Manager::validate_name`] and made unique its own way (the daemon's `uid:name` keys: names
    /// are per owner). A process that is already a member of a VPS is refused: it would leave it.
    pub fn register_first_as(&self, name: &str, pid: Pid) -> Result<Vps> {
        self.register_first_with(name, pid, None)
    }

    /// [`register_first_as`](Manager::register_first_as), and the process enters a cgroup of the
    /// new VPS's own, with `limits` (see [`spawn_limited`](Manager::spawn_limited)): made below
    /// the root given to [`use_cgroups`](Manager::use_cgroups), or, when limits are asked for and
    /// no root was set, the one [`CgroupRoot::find`](crate::cgroup::CgroupRoot::find) finds.
    /// Without a root and without limits, the VPS gets no cgroup. The process must still be held
    /// at its start gate (it enters the cgroup before it runs anything of the VPS); a limit that
    /// cannot be applied is refused before anything is registered.
    pub fn register_first_limited(&self, name: &str, pid: Pid, limits: Option<&crate::cgroup::Limits>) -> Result<Vps> {
        if let Some(l) = limits {
            l.validate()?;
        }
        let Some((id, cg)) = self.cgroup_for(name, limits)? else {
            return self.register_first_as(name, pid);
        };
        self.register_first_with(name, pid, Some((id, cg.clone()))).inspect_err(|_| {
            let _ = cg.remove(std::time::Duration::ZERO);
        })
    }

    /// Registers `pid` as the first process of a new VPS `name`, in the cgroup `cg` (made for
    /// the VPS id given with it) when there is one: one step under the lock, so that what is
    /// journaled is the whole VPS.
    fn register_first_with(
        &self,
        name: &str,
        pid: Pid,
        cg: Option<(VpsId, std::sync::Arc<crate::cgroup::VpsCgroup>)>,
    ) -> Result<Vps> {
        let id = cg.as_ref().map(|(id, _)| *id);
        let mut st = self.synced()?;
        if let Some(id) = st.tracking.table.vps_of(pid) {
            let other = st.vpses.get(&id).map_or_else(|| id.to_string(), |r| r.vps.name.clone());
            return Err(Error::AlreadyMember { pid, vps: other });
        }
        if st.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let info =
            st.view.process(pid).map_err(|e| Error::io("reading the process", e))?.ok_or(Error::NoSuchProcess(pid))?;
        let vps = st.new_vps_as(name, info.id, id);
        let entered: Result<()> = match &cg {
            Some((_, cg)) => cg.attach(pid).map_err(Error::from),
            None => Ok(()),
        };
        if let Err(e) = entered.and_then(|()| st.tracker.watch(pid, vps.id).map_err(Error::from)) {
            st.names.remove(name);
            st.vpses.remove(&vps.id);
            let _ = st.tracker.forget(vps.id);
            return Err(e);
        }
        st.tracking.insert_member(&info, vps.id, Source::First);
        if let Some(rec) = st.vpses.get_mut(&vps.id) {
            rec.cgroup = cg.map(|(_, cg)| cg);
        }
        st.journal_new_vps(vps.id);
        st.flush_changes();
        Ok(vps)
    }

    /// Adds `pid` (a process without children, held until this returns: the loader) to the
    /// running VPS `name`.
    pub fn join(&self, name: &str, pid: Pid) -> Result<Vps> {
        let vps = {
            let st = self.synced()?;
            let id = st
                .names
                .get(name)
                .copied()
                .filter(|_| st.name_in_use(name))
                .ok_or_else(|| Error::UnknownVps(name.into()))?;
            st.vpses.get(&id).map(|r| r.vps.clone()).ok_or_else(|| Error::UnknownVps(name.into()))?
        };
        self.join_vps(&vps, pid)
    }

    /// [`join`](Manager::join) the VPS `vps` by its id: a VPS stopped meanwhile (whose name another
    /// may have taken) is refused, never confused with the new one. A process that is a member of
    /// another VPS is refused: it would leave it.
    pub fn join_vps(&self, vps: &Vps, pid: Pid) -> Result<Vps> {
        let mut st = self.synced()?;
        let running =
            st.vpses.get(&vps.id).is_some_and(|r| !r.first_gone || st.tracking.table.member_count(vps.id) > 0);
        if !running {
            return Err(Error::UnknownVps(vps.name.clone()));
        }
        let vps = st.vpses.get(&vps.id).map(|r| r.vps.clone()).ok_or_else(|| Error::UnknownVps(vps.name.clone()))?;
        match st.tracking.table.vps_of(pid) {
            Some(id) if id == vps.id => return Ok(vps),
            Some(id) => {
                let other = st.vpses.get(&id).map_or_else(|| id.to_string(), |r| r.vps.name.clone());
                return Err(Error::AlreadyMember { pid, vps: other });
            }
            None => {}
        }
        let info =
            st.view.process(pid).map_err(|e| Error::io("reading the process", e))?.ok_or(Error::NoSuchProcess(pid))?;
        st.tracker.watch(pid, vps.id)?;
        st.tracking.insert_member(&info, vps.id, Source::Loader);
        st.journal_root(info.id, vps.id, Source::Loader);
        st.flush_changes();
        Ok(vps)
    }
}
