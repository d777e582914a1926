//! What a VPS has used: CPU time that counts the processes that have exited, memory and its
//! peak, forks. See [`Manager::usage`] for where each figure comes from and where it can fall
//! short.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use vpstag_tracker::{Event, EventKind, Pid, StartTime, VpsId};

use super::{Manager, State, Vps};
use crate::sys::{ProcUsage, Reaped};
use crate::table::Source;
use crate::Result;

/// What a VPS has used, from [`Manager::usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VpsUsage {
    /// User + system CPU time of every process that has ever been in the VPS, exited ones
    /// included. It never decreases (it can be exported as a counter).
    pub cpu: Duration,
    /// Where [`cpu`](VpsUsage::cpu) comes from.
    pub cpu_source: CpuSource,
    /// Resident memory of the live members now, summed, in bytes.
    pub memory_bytes: u64,
    /// The highest memory figure known: the cgroup's `memory.peak` when the VPS has a cgroup with
    /// memory accounting, else the highest [`memory_bytes`](VpsUsage::memory_bytes) sum seen by a
    /// call to [`Manager::usage`] (a peak between two calls is not seen).
    pub memory_peak_bytes: u64,
    /// Live processes (not threads).
    pub processes: usize,
    /// Processes created in the VPS (fork events, not threads) since this manager knows it.
    pub forks: u64,
}

/// Where a VPS's CPU figure comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CpuSource {
    /// Its lineage, read from the process table: live members' own and waited-for children's
    /// time, plus what left the VPS (see [`Manager::usage`]). Unprivileged, on every backend.
    #[default]
    Lineage,
    /// Its cgroup's `cpu.stat` `usage_usec`, which the kernel keeps for every process that was
    /// ever in it: exact.
    Cgroup,
}

/// One VPS's running account.
#[derive(Clone, Debug, Default)]
pub(super) struct Account {
    /// CPU (ns) of processes that left the VPS without leaving their time to a member: what the
    /// manager reaped (wait4's rusage), the last sample of members reaped from outside.
    dead_ns: u64,
    /// The figure last reported: the reported one is never lower.
    shown_ns: u64,
    /// Where `shown_ns` came from last.
    source: CpuSource,
    /// Fork events seen for the VPS.
    forks: u64,
    /// The highest resident memory sum seen.
    peak_rss: u64,
    /// Members whose reaper (their parent now) is outside the VPS: the time they and their
    /// waited-for children had used at the last sample. When such a member goes, its time goes to
    /// its reaper, outside: this sample is what the VPS keeps of it.
    outside: HashMap<Pid, (StartTime, u64)>,
    /// First processes whose exit figure ([`Event::exit_cpu_ns`]) was counted: what `wait4` gives
    /// for them when the manager reaps them adds only what the figure lacks.
    exit_counted: HashMap<Pid, u64>,
}

impl Account {
    fn sample_outside(&mut self, u: &ProcUsage) {
        let ns = u.cpu_self_ns.saturating_add(u.cpu_children_ns);
        let slot = self.outside.entry(u.id.pid).or_insert((u.id.start, 0));
        if slot.0 != u.id.start {
            *slot = (u.id.start, 0);
        }
        slot.1 = slot.1.max(ns);
    }
}

impl State {
    fn account(&mut self, vps: VpsId) -> &mut Account {
        self.accounts.entry(vps).or_default()
    }

    /// Before an event is applied: the exit of a member.
    ///
    /// With the process's CPU at its exit ([`Event::exit_cpu_ns`]), see [`State::account_exit`].
    /// Without it, a member whose reaper is outside the VPS is read once more as it exits (still
    /// there, a zombie, until that reaper collects it), so the VPS keeps its final time rather
    /// than the last query's.
    pub(super) fn account_before(&mut self, ev: &Event) {
        let EventKind::Exit { pid, group_dead, .. } = ev.kind else { return };
        if group_dead == Some(false) {
            return;
        }
        let Some(e) = self.tracking.table.get(pid) else { return };
        let (vps, start, first) = (e.vps, e.id.start, e.source == Source::First);
        // Its parent at birth, if that is still a member of the VPS: then it is its reaper.
        let birth_parent = e.parent.filter(|p| self.tracking.table.vps_of(*p) == Some(vps));
        let born_inside = e.source == Source::Event && birth_parent.is_some();
        let known_outside = self.accounts.get(&vps).is_some_and(|a| a.outside.contains_key(&pid));
        if let Some(ns) = ev.exit_cpu_ns {
            self.account_exit(vps, pid, start, ns, first, birth_parent, known_outside);
            return;
        }
        if born_inside && !known_outside {
            return;
        }
        if let Some(u) = self.still_there(pid, start) {
            if !self.reaper_inside(&u, vps) {
                self.account(vps).sample_outside(&u);
            }
        }
    }

    /// `pid` as the system shows it now, if it is still the process that started at `start` (a
    /// zombie until its reaper collects it).
    fn still_there(&mut self, pid: Pid, start: StartTime) -> Option<ProcUsage> {
        let tol = self.view.start_tolerance();
        match self.view.usage(pid) {
            // A start time estimated from an event may be off by a tick.
            Ok(Some(u)) if u.id.start.0.abs_diff(start.0) <= tol.max(1) => Some(u),
            _ => None,
        }
    }

    /// A member `pid` of `vps` exited having used `ns` of CPU (its own and its waited-for
    /// children's), as its backend read it before anyone could reap it. Where that time goes:
    /// - its reaper is outside the VPS: the VPS keeps exactly `ns` (instead of its last sample);
    /// - its reaper is a member that will wait for it: into that member's waited-for time, so
    ///   nothing is added here (adding `ns` would count it twice);
    /// - its reaper is a member that ignores `SIGCHLD`: the kernel reaped it and gave its time to
    ///   nobody; the VPS keeps `ns`.
    ///
    /// Who the reaper is: the parent the system shows while the process is still there (a
    /// zombie, or, under eBPF, a process still in `exit`: the exit is read before the kernel
    /// notifies the parent); once it is gone, its birth parent if that is still a member, the
    /// manager (or whoever registered it) for a first process, an outside reaper if the last
    /// sample saw one; otherwise it is not known, and the figure is not used (its last sample
    /// stays, as without a figure). A reaper that is a member waits for it unless it ignores
    /// `SIGCHLD` (its disposition now: see [`Manager::usage`]); a zombie whose parent ignores
    /// `SIGCHLD` is never left for that parent, so asking is right whether it is still there or
    /// not.
    #[allow(clippy::too_many_arguments)]
    fn account_exit(
        &mut self,
        vps: VpsId,
        pid: Pid,
        start: StartTime,
        ns: u64,
        first: bool,
        birth_parent: Option<Pid>,
        known_outside: bool,
    ) {
        let keep = match birth_parent {
            // A child of a member that is still there: that member reaps it, or the kernel does
            // if it ignores SIGCHLD, unless it is a zombie already (left to that parent). The
            // common case costs one read of the parent per drain, none of the child.
            Some(parent) if !first => {
                Some(self.ignores_sigchld(parent) && !matches!(self.view.process(pid), Ok(Some(i)) if i.zombie))
            }
            _ => self.kept_without_member_parent(pid, start, first, known_outside, vps),
        };
        let Some(keep) = keep else { return };
        let a = self.account(vps);
        a.outside.remove(&pid);
        if keep {
            a.dead_ns = a.dead_ns.saturating_add(ns);
            if first {
                a.exit_counted.insert(pid, ns);
            }
        }
    }

    /// Whether `parent` ignores SIGCHLD, read once per drain of the backend (a burst of exits of
    /// one parent's children costs one read).
    fn ignores_sigchld(&mut self, parent: Pid) -> bool {
        if let Some(v) = self.sigchld_ignored.get(&parent) {
            return *v;
        }
        let v = matches!(self.view.sigchld_ignored(parent), Ok(Some(true)));
        self.sigchld_ignored.insert(parent, v);
        v
    }

    /// [`account_exit`](State::account_exit) for a process whose birth parent is no member
    /// (or a first process): whether the VPS keeps its exit figure, `None` when its reaper is not
    /// known.
    fn kept_without_member_parent(
        &mut self,
        pid: Pid,
        start: StartTime,
        first: bool,
        known_outside: bool,
        vps: VpsId,
    ) -> Option<bool> {
        match self.still_there(pid, start) {
            // Its parent now is its reaper: outside, or a member (the subreaper that took it
            // in). A zombie waits for that member; a process still in `exit` (an eBPF exit is
            // read before the parent is notified) is reaped by it unless it ignores SIGCHLD.
            Some(u) => match u.ppid.filter(|p| self.tracking.table.vps_of(*p) == Some(vps)) {
                Some(parent) => Some(!u.zombie && self.ignores_sigchld(parent)),
                None => Some(true),
            },
            // Gone, reaped outside: a first process (by the manager or whoever registered it),
            // or one whose parent a query saw outside. Otherwise the reaper is not known.
            None if first || known_outside => Some(true),
            None => None,
        }
    }

    /// After an event is applied: counts the forks.
    pub(super) fn account_after(&mut self, ev: &Event, vps: Option<VpsId>) {
        if let (EventKind::Fork { thread: false, .. }, Some(vps)) = (ev.kind, vps) {
            if self.vpses.contains_key(&vps) {
                self.account(vps).forks += 1;
            }
        }
    }

    /// The manager reaped `pid`, the first process of `vps`: its whole time (and that of every
    /// child it waited for) comes with it, exactly, from `wait4`. Without it (the system does not
    /// report it, or someone else reaped it), its last sample stays.
    pub(super) fn account_reaped(&mut self, vps: VpsId, pid: Pid, reaped: &Reaped) {
        let Some(ns) = reaped.cpu_ns else { return };
        let a = self.account(vps);
        a.outside.remove(&pid);
        // Its exit figure was counted already: only what wait4 has beyond it.
        let counted = a.exit_counted.remove(&pid).unwrap_or(0);
        a.dead_ns = a.dead_ns.saturating_add(ns.saturating_sub(counted));
    }

    fn reaper_inside(&self, u: &ProcUsage, vps: VpsId) -> bool {
        u.ppid.and_then(|p| self.tracking.table.vps_of(p)) == Some(vps)
    }

    /// The figures of `vps` now.
    fn usage_of(&mut self, vps: &Vps) -> Result<VpsUsage> {
        let cgroup = self.record(vps)?.cgroup.clone();
        let id = vps.id;
        let tol = self.view.start_tolerance();
        let members: Vec<(Pid, StartTime)> = self
            .tracking
            .table
            .members(id)
            .filter_map(|p| self.tracking.table.get(p))
            .map(|e| (e.id.pid, e.id.start))
            .collect();
        let (mut live_ns, mut rss) = (0u64, 0u64);
        let mut outside = Vec::new();
        let mut inside = Vec::new();
        for (pid, start) in &members {
            let Ok(Some(u)) = self.view.usage(*pid) else { continue };
            // A start time estimated from an event may be off by a tick.
            if u.id.start.0.abs_diff(start.0) > tol.max(1) {
                continue;
            }
            live_ns = live_ns.saturating_add(u.cpu_self_ns).saturating_add(u.cpu_children_ns);
            rss = rss.saturating_add(u.rss_bytes);
            if self.reaper_inside(&u, id) {
                inside.push(*pid);
            } else {
                outside.push(u);
            }
        }
        let live: HashMap<Pid, StartTime> = members.iter().copied().collect();
        let pending_reap: Vec<Pid> = self.to_reap.clone();
        let a = self.account(id);
        for u in &outside {
            a.sample_outside(u);
        }
        for pid in inside {
            a.outside.remove(&pid);
        }
        // Members reaped from outside since the last look: keep their last sample. (A first
        // process the manager is about to reap waits for its exact figure.)
        let gone: Vec<Pid> = a
            .outside
            .iter()
            .filter(|(pid, (start, _))| live.get(pid) != Some(start) && !pending_reap.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some((_, ns)) = a.outside.remove(&pid) {
                a.dead_ns = a.dead_ns.saturating_add(ns);
            }
        }
        let lineage = a.dead_ns.saturating_add(live_ns);
        let cg = cgroup.and_then(|cg| cg.usage().ok());
        a.peak_rss = a.peak_rss.max(rss);
        match cg {
            Some(c) => {
                a.shown_ns = a.shown_ns.max(c.cpu_usec.saturating_mul(1_000));
                a.source = CpuSource::Cgroup;
            }
            None => {
                a.shown_ns = a.shown_ns.max(lineage);
                a.source = CpuSource::Lineage;
            }
        }
        let peak = match cg.and_then(|c| c.memory_peak) {
            Some(p) => p,
            None => a.peak_rss,
        };
        Ok(VpsUsage {
            cpu: Duration::from_nanos(a.shown_ns),
            cpu_source: a.source,
            memory_bytes: rss,
            memory_peak_bytes: peak,
            processes: members.len(),
            forks: a.forks,
        })
    }
}

impl Manager {
    /// What `vps` has used: CPU time counting every process that has ever been in it, exited ones
    /// included; resident memory now and its peak; live processes; forks.
    ///
    /// ```no_run
    /// use std::process::Command;
    ///
    /// let mgr = vpstag::Manager::with_backend(vpstag::BackendChoice::Auto)?;
    /// let job = mgr.start("job", Command::new("sh").args(["-c", "(yes >/dev/null & sleep 1; kill $!)"]))?;
    /// mgr.wait(&job, None)?;
    /// let u = mgr.usage(&job)?; // about 1 s, though every process of the VPS has exited
    /// println!("{:?} of CPU ({:?}), {} forks", u.cpu, u.cpu_source, u.forks);
    /// # Ok::<(), vpstag::Error>(())
    /// ```
    ///
    /// # Where the CPU time comes from
    ///
    /// When the VPS has a cgroup ([`use_cgroups`](Manager::use_cgroups),
    /// [`spawn_limited`](Manager::spawn_limited)), its `cpu.stat` `usage_usec`: the kernel's
    /// exact figure for every process that was ever in the cgroup ([`CpuSource::Cgroup`]).
    ///
    /// Otherwise the lineage ([`CpuSource::Lineage`]), unprivileged and on every backend: when
    /// a process is reaped, the kernel adds its time, and that of the children it had waited
    /// for, to its reaper's "waited-for children" time (Linux `cutime`/`cstime`, FreeBSD
    /// `ki_rusage_ch`); a VPS's first process is the reaper of its orphans. So the VPS's time is
    /// - each live member's own time plus its waited-for children's (a member that has exited but
    ///   is not yet reaped is a zombie and still counts as itself until its reaper, a member,
    ///   collects it);
    /// - plus what the manager reaped itself: a first process it started ([`spawn`](Manager::spawn)),
    ///   whose `wait4` rusage holds all of the above once everything has ended;
    /// - plus, for a member whose reaper is outside the VPS (a process brought in by
    ///   [`adopt`](Manager::adopt) or [`join`](Manager::join), a first process registered by
    ///   someone else, an orphan re-parented outside after its VPS's first process ended), the
    ///   last figure read of it: at every call of this method and once more when its exit event
    ///   is applied (a zombie still shows its final figure until its reaper collects it);
    /// - but, with a backend that reads each process's CPU as it exits, before anyone can reap it
    ///   ([`Capabilities::exit_usage`](vpstag_tracker::Capabilities#structfield.exit_usage): the
    ///   ptrace backend, from `wait4`'s rusage when its tracer collects the process's leader,
    ///   before the real parent can; the eBPF
    ///   backend, in the kernel at `sched_process_exit` of its last thread), that exit
    ///   figure ([`Event::exit_cpu_ns`]: its own time and its waited-for children's) for a member
    ///   whose reaper is outside the VPS, instead of its last sample; and for a member whose parent,
    ///   a member, ignores `SIGCHLD` (the kernel reaps such a child itself and gives its time to
    ///   nobody). A member whose parent, a member, waits for it is left to that parent's
    ///   waited-for time: its exit figure is not added (that would count it twice).
    ///
    /// The figure is the highest ever reported, so it never decreases, not even in the instant
    /// when a member has exited and its reaper has not yet collected it.
    ///
    /// ## What is exact with an exit figure, and what is not
    ///
    /// Under ptrace the figure is the kernel's whole account of the process (all its threads to
    /// the end of `exit`, and its waited-for children), in microseconds. Under eBPF it misses
    /// what the process does after it is read (the rest of `exit`: microseconds as a rule); it
    /// is the scheduler's run time in ns, which lags by at most a tick of the last thread's run
    /// and misses a thread of the process still exiting at that instant (killed together with the
    /// others and not yet released). Who the reaper is, is decided when the exit is applied:
    /// - the process is still there: its parent then is its reaper. One outside the VPS keeps the
    ///   figure for the VPS. A member that it is a zombie for will wait for it (the kernel
    ///   decided): nothing is added. A process still in `exit` (under eBPF, whose exit is read in
    ///   the kernel before the parent is notified) is reaped by that member, or by the kernel if
    ///   the member ignores `SIGCHLD`: read as below.
    /// - it is gone: its birth parent if that is still a member; then it was either collected by
    ///   that parent or auto-reaped, and the parent's `SIGCHLD` disposition *now* (Linux `SigIgn` of
    ///   `/proc/PID/status`, FreeBSD `ki_sigignore`) tells which. Not exact: a parent that changes
    ///   its disposition between the kernel's decision and this read is judged on the new one, a
    ///   parent that has exited meanwhile is taken for one that waited (the child's time lost, never
    ///   doubled), and `SA_NOCLDWAIT` with a handler is not shown by the system (taken for a parent
    ///   that waits).
    /// - gone, and a first process: its reaper is the manager or whoever registered it, outside.
    ///   When the manager reaps it itself, `wait4`'s figure adds only what the exit figure lacks.
    /// - gone, and a query saw its parent outside: outside. Otherwise (an orphan re-parented, a
    ///   process brought in by [`join`](Manager::join) that no query saw) the reaper is not known
    ///   and the exit figure is not used: its last sample stays, as without one.
    ///
    /// # Where it falls short
    ///
    /// - **A parent that ignores `SIGCHLD`** (`SIG_IGN`, or `SA_NOCLDWAIT`): the kernel reaps
    ///   its children itself and adds their time to nobody. A child that exits between two reads
    ///   is lost; its own children, waited for before, with it. Closed with an exit figure
    ///   (ptrace, eBPF) for `SIG_IGN`, within the limits above.
    /// - **A member reaped from outside the VPS** (see above): only its last read figure counts;
    ///   what it did after it (and what the children it waited for in between did) is lost. The
    ///   read at its exit event closes most of this gap, but the reaper may collect it before the
    ///   manager reads (a race the manager loses under load). Closed with an exit figure (ptrace,
    ///   eBPF) where the reaper is known (above).
    /// - **A child whose parent exits first** and that is a zombie at that moment is reaped by
    ///   the new reaper without its time reaching the old parent: inside the VPS that is the first
    ///   process (fine); after the first process has gone, it is whoever the system re-parents it
    ///   to.
    /// - The peak memory without a cgroup is sampled at calls, not kept by the kernel.
    ///
    /// Under cnproc these holes stay open (its exit notification comes without a figure). A
    /// cgroup closes them all. On FreeBSD, `rctl(8)` (RACCT) keeps per-jail
    /// and per-login-class CPU, memory and process counts in the kernel, and could later give
    /// exact figures (and limits) for a VPS placed in a jail or login class of its own.
    ///
    /// Each call reads every member's `/proc/PID/stat` (FreeBSD: one `kern.proc.pid` sysctl) while
    /// holding the manager's lock: a few microseconds per member.
    pub fn usage(&self, vps: &Vps) -> Result<VpsUsage> {
        let mut st = self.synced()?;
        let State { accounts, vpses, .. } = &mut *st;
        accounts.retain(|id, _| vpses.contains_key(id));
        st.usage_of(vps)
    }
}

/// Forgets the account of a VPS that goes.
pub(super) fn release(st: &mut State, vps: VpsId) {
    st.accounts.remove(&vps);
}
