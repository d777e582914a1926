//! A VPS's cgroup (cgroup v2, where the host delegates one): made before the VPS's first process
//! runs anything, entered by it and its command at the start gate, read for figures, killed
//! through `cgroup.kill`, compared with the table by `check`.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Manager, Vps};
use crate::cgroup::{CgroupRoot, CgroupUsage, Limits, VpsCgroup};
use crate::Result;

impl Manager {
    /// From now on, every VPS this manager starts ([`spawn`](Manager::spawn),
    /// [`spawn_limited`](Manager::spawn_limited)) gets a cgroup of its own below `root`: its
    /// processes are in it before the command runs, [`kill_all`](Manager::kill_all) ends it through
    /// `cgroup.kill`, [`cgroup_usage`](Manager::cgroup_usage) reads the kernel's figures, and
    /// [`check`](Manager::check) reports processes that left it or entered it untagged.
    pub fn use_cgroups(&self, root: CgroupRoot) {
        self.lock().cgroup_root = Some(Arc::new(root));
    }

    /// The cgroup root set by [`use_cgroups`](Manager::use_cgroups), if any.
    pub fn cgroup_root(&self) -> Option<PathBuf> {
        self.lock().cgroup_root.as_ref().map(|r| r.path().to_path_buf())
    }

    /// A cgroup for a new VPS `name`, made before anything of it runs: below the root set by
    /// [`use_cgroups`](Manager::use_cgroups), or, when limits are asked for and no root was set,
    /// below the one [`CgroupRoot::find`] finds. `None` when neither applies. A limit that cannot
    /// be applied is an error (naming cgroup v2, the controller and what to delegate), never
    /// dropped.
    pub(super) fn cgroup_for(
        &self,
        name: &str,
        limits: Option<&Limits>,
    ) -> Result<Option<(crate::VpsId, Arc<VpsCgroup>)>> {
        let wanted = limits.is_some_and(|l| !l.is_empty());
        let root = match self.lock().cgroup_root.clone() {
            Some(r) => r,
            None if wanted => Arc::new(CgroupRoot::find()?),
            None => return Ok(None),
        };
        let id = self.lock().reserve_id();
        let cg = root.create(name, id, limits.unwrap_or(&Limits::default()))?;
        Ok(Some((id, Arc::new(cg))))
    }

    /// The cgroup of `vps`, when it has one.
    pub(super) fn cgroup_of(&self, vps: &Vps) -> Result<Option<Arc<VpsCgroup>>> {
        Ok(self.lock().record(vps)?.cgroup.clone())
    }

    /// The kernel's figures for `vps`'s cgroup (CPU of every process that was ever in it, exited
    /// ones included; memory and pids where those controllers are on); `None` when it has no
    /// cgroup.
    pub fn cgroup_usage(&self, vps: &Vps) -> Result<Option<CgroupUsage>> {
        match self.cgroup_of(vps)? {
            Some(cg) => Ok(Some(cg.usage()?)),
            None => Ok(None),
        }
    }

    /// The directory of `vps`'s cgroup, when it has one.
    pub fn cgroup_path(&self, vps: &Vps) -> Result<Option<PathBuf>> {
        Ok(self.cgroup_of(vps)?.map(|cg| cg.path().to_path_buf()))
    }
}
