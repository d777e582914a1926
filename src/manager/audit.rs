//! The comparison of the table with a fresh scan of the system.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use vpstag_tracker::{Pid, VpsId};

use super::Manager;
use crate::table::Source;
use crate::tracking::Stats;
use crate::{Error, Result};
/// How long a divergence must last for [`Manager::check`] to report it: the time a backend may
/// take, on a loaded machine, to bring a fork or an exit that already happened into the table.
const CHECK_CONFIRM: Duration = Duration::from_secs(1);

/// What [`Manager::check`] found wrong between the table and the system now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Divergence {
    /// A live process below a tagged ancestor that the table does not have.
    Missing {
        /// Process id.
        pid: Pid,
        /// The VPS its ancestry says.
        expected: String,
    },
    /// A table entry whose process is gone (or whose pid now belongs to another process).
    Extra {
        /// Process id.
        pid: Pid,
        /// The VPS the table has.
        vps: String,
    },
    /// A process born from a tagged parent (never re-parented, no loader involved) whose tag
    /// differs from its parent's.
    WrongTag {
        /// Process id.
        pid: Pid,
        /// The VPS the table has.
        vps: String,
        /// Its parent's VPS.
        expected: String,
    },
    /// A member of a VPS that has a cgroup, found outside that cgroup (moved out).
    OutOfCgroup {
        /// Process id.
        pid: Pid,
        /// Its VPS.
        vps: String,
    },
    /// A process inside a VPS's cgroup that the table does not have as a member of that VPS.
    InCgroupUntagged {
        /// Process id.
        pid: Pid,
        /// The VPS whose cgroup it is in.
        vps: String,
    },
}

/// The result of [`Manager::check`].
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// Every divergence found (expected: none).
    pub divergences: Vec<Divergence>,
    /// Table entries compared.
    pub entries: usize,
    /// Processes on the system.
    pub processes: usize,
    /// The loss and resync counters.
    pub stats: Stats,
}

impl Manager {
    /// Compares the table with a fresh scan of the system and reports every divergence
    /// (expected: none), with the loss and resync counters. The table is not changed.
    ///
    /// The system moves while it is read: a process forked just before the scan is on the system
    /// before its fork event reaches the table (under ptrace the tracer sees it a moment later),
    /// and one that exited is in the table until its exit event is read. So a divergence is
    /// reported only when it is still there in every comparison over a second; when the
    /// first comparison finds none, one is all it costs.
    pub fn check(&self) -> Result<CheckReport> {
        let began = Instant::now();
        let mut report = self.compare()?;
        let mut pause = Duration::from_millis(10);
        while !report.divergences.is_empty() {
            let elapsed = began.elapsed();
            if elapsed >= CHECK_CONFIRM {
                break;
            }
            std::thread::sleep(pause.min(CHECK_CONFIRM - elapsed));
            pause = (pause * 2).min(Duration::from_millis(200));
            let again = self.compare()?;
            // Only what every comparison found; the counters and sizes are the latest.
            report.divergences.retain(|d| again.divergences.contains(d));
            report = CheckReport { divergences: report.divergences, ..again };
        }
        Ok(report)
    }

    /// One comparison of the table with a scan (what [`Manager::check`] repeats to confirm).
    fn compare(&self) -> Result<CheckReport> {
        let mut st = self.synced()?;
        let mut fresh = st.tracking.clone();
        let t0 = st.view.now_ns();
        let procs = st.view.scan().map_err(|e| Error::io("scanning the process table", e))?;
        let tol = st.view.start_tolerance();
        let processes = procs.len();
        let ppid_of: HashMap<Pid, Option<Pid>> = procs.iter().map(|p| (p.id.pid, p.ppid)).collect();
        fresh.table.record_changes(false);
        fresh.reconcile(t0, procs, tol);
        let name = |id: VpsId| st.vpses.get(&id).map(|r| r.vps.name.clone()).unwrap_or_else(|| id.to_string());
        let mut out = Vec::new();
        for e in st.tracking.table.entries() {
            match fresh.table.get(e.id.pid) {
                Some(f) if f.id.start == e.id.start || f.same_start(e.id.start, 1) => {}
                _ => out.push(Divergence::Extra { pid: e.id.pid, vps: name(e.vps) }),
            }
            if e.source == Source::Event {
                if let (Some(parent), Some(Some(live_parent))) = (e.parent, ppid_of.get(&e.id.pid)) {
                    if parent == *live_parent {
                        if let Some(pe) = st.tracking.table.get(parent) {
                            if pe.vps != e.vps && pe.source != Source::Loader && e.source != Source::Loader {
                                out.push(Divergence::WrongTag {
                                    pid: e.id.pid,
                                    vps: name(e.vps),
                                    expected: name(pe.vps),
                                });
                            }
                        }
                    }
                }
            }
        }
        for f in fresh.table.entries() {
            if st.tracking.table.get(f.id.pid).is_none() {
                out.push(Divergence::Missing { pid: f.id.pid, expected: name(f.vps) });
            }
        }
        // Each VPS with a cgroup: its members are in it, and what is in it is its members.
        for rec in st.vpses.values() {
            let Some(cg) = &rec.cgroup else { continue };
            let Ok(inside) = cg.procs() else { continue };
            let vps = rec.vps.id;
            for pid in &inside {
                // One born after the scan may not be applied yet: only those the scan saw.
                if st.tracking.table.vps_of(*pid) != Some(vps) && procs_alive(&ppid_of, *pid) {
                    out.push(Divergence::InCgroupUntagged { pid: *pid, vps: name(vps) });
                }
            }
            for pid in st.tracking.table.members(vps) {
                // A member that exited meanwhile is not "out".
                if !inside.contains(&pid) && procs_alive(&ppid_of, pid) {
                    out.push(Divergence::OutOfCgroup { pid, vps: name(vps) });
                }
            }
        }
        Ok(CheckReport { divergences: out, entries: st.tracking.table.len(), processes, stats: st.tracking.stats })
    }
}

/// Whether `pid` was in the scan (so it was alive when the check began).
fn procs_alive(ppid_of: &HashMap<Pid, Option<Pid>>, pid: Pid) -> bool {
    ppid_of.contains_key(&pid)
}
