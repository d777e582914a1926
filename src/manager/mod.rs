//! The manager: owns the backend and the table, starts first processes, answers queries.
//!
//! One file per concern: this one holds the handle and the queries; `registry` the VPSes and
//! how processes come in (register, join, adopt); `start` the start of a first process; `pump`
//! the event thread and how events change the state; `persist` snapshot, restore and the
//! journal's hooks; `audit` the comparison of the table with the system.

mod accounting;
mod audit;
mod persist;
mod pump;
mod registry;
mod resources;
mod start;
#[cfg(test)]
mod tests;

pub use accounting::{CpuSource, VpsUsage};
pub use audit::{CheckReport, Divergence};
pub use persist::JournalEntry;
pub use persist::{SavedMember, SavedVps};
use pump::pump_loop;
pub(crate) use registry::validate_name;
use registry::VpsRecord;
pub use start::VpsChild;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use vpstag_tracker::{BackendKind, Capabilities, Event, ExitStatus, ForkTracker, Pid, ProcessId, VpsId};

use crate::subscription::Subscription;
use crate::table::{Change, MappingTable, Source};
use crate::tracking::{Stats, System, SystemView, TaggedEvent, Tracking};
use crate::{BackendChoice, Error, Result, Signal};

/// A VPS: its id, its name, and its first process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Vps {
    /// The id the table and backends use.
    pub id: VpsId,
    /// The name it was started under.
    pub name: String,
    /// Its first process (the vpstag init, or the process that came in through the loader).
    pub first: Pid,
}

/// A tagged process, with how the table learned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its identity.
    pub id: ProcessId,
    /// How the table learned it.
    pub source: Source,
    /// The parent it was seen born from, when known.
    pub parent: Option<Pid>,
}
/// Receives batches of table changes (for a journal).
type Observer = Box<dyn FnMut(&[Change]) + Send>;
/// Receives what must survive a restart (see [`Manager::on_journal`]).
type JournalObserver = Box<dyn FnMut(&[JournalEntry]) + Send>;

struct State {
    tracker: Box<dyn ForkTracker>,
    caps: Capabilities,
    tracking: Tracking,
    /// The system, as the manager sees it (the real one; a scripted one in unit tests).
    view: Box<dyn System>,
    vpses: HashMap<VpsId, VpsRecord>,
    /// What each VPS has used (see `Manager::usage`).
    accounts: HashMap<VpsId, accounting::Account>,
    names: HashMap<String, VpsId>,
    next_id: u64,
    subscribers: Vec<crate::subscription::Slot>,
    /// Receivers of whole batches (one send per drain, not per event).
    batch_subscribers: Vec<Sender<Arc<[TaggedEvent]>>>,
    /// The events of the drain in progress, for `batch_subscribers`.
    batch: Vec<TaggedEvent>,
    buf: Vec<Event>,
    to_reap: Vec<Pid>,
    /// First processes whose `Command::spawn` has not returned yet: the standard library may
    /// wait for them, so the manager must not.
    spawning: Vec<Pid>,
    /// Where VPS cgroups go (`Manager::use_cgroups`).
    cgroup_root: Option<Arc<crate::cgroup::CgroupRoot>>,
    failed: Option<String>,
    observer: Option<Observer>,
    journal: Option<JournalObserver>,
    /// Whether a parent ignores SIGCHLD, as read during this drain of the backend (see
    /// `accounting.rs`); emptied at each drain.
    sigchld_ignored: HashMap<Pid, bool>,
    /// Journal entries made under the lock, handed to `journal` by `flush_changes`.
    journal_pending: Vec<JournalEntry>,
    /// [`Capabilities::resync_every`], and when the last periodic resync ran.
    periodic_resync: Option<(Duration, Instant)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

/// Starts VPSes and keeps the table of which process belongs to which.
///
/// A background thread reads the backend's events as they come (in batches); every query first
/// applies whatever the backend has queued, so an answer is never older than the question. Since
/// the kernel queues a child's creation before the child runs, a process the caller can see is
/// always known to the table by the time it answers (unless events were lost, which the manager
/// notices and repairs by a resync).
///
/// ```no_run
/// use std::process::Command;
/// use vpstag::{BackendChoice, Manager};
///
/// let mgr = Manager::with_backend(BackendChoice::Auto)?;
/// let web = mgr.start("web", Command::new("sh").args(["-c", "sleep 1 & sleep 1; wait"]))?;
/// for pid in mgr.members(&web)? {
///     assert_eq!(mgr.vps_of(pid)?.map(|v| v.name), Some("web".to_string()));
/// }
/// let status = mgr.wait(&web, None)?;
/// println!("web ended: {status:?}");
/// # Ok::<(), vpstag::Error>(())
/// ```
pub struct Manager {
    shared: Arc<Shared>,
    pump: Option<JoinHandle<()>>,
    kind: BackendKind,
}
/// A summary of one VPS.
#[derive(Clone, Debug, Serialize)]
pub struct VpsSummary {
    /// The VPS.
    pub vps: Vps,
    /// Live members now.
    pub members: usize,
    /// When it was started.
    #[serde(serialize_with = "ser_time")]
    pub started: SystemTime,
    /// Whether its first process is still alive.
    pub first_alive: bool,
}

fn ser_time<S: serde::Serializer>(v: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(v.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

impl Manager {
    /// A manager over `tracker`. It scans the system once (the start-up resync) after the
    /// backend has subscribed, so nothing born meanwhile is missed.
    pub fn new(tracker: Box<dyn ForkTracker>) -> Result<Manager> {
        Manager::with_system(tracker, Box::new(SystemView::new()))
    }

    /// A manager over `tracker` and `view` (the real system, or a scripted one in tests).
    pub(crate) fn with_system(tracker: Box<dyn ForkTracker>, view: Box<dyn System>) -> Result<Manager> {
        let kind = tracker.kind();
        let caps = tracker.capabilities();
        let poll_fd: OwnedFd =
            tracker.as_fd().try_clone_to_owned().map_err(|e| Error::io("duplicating the backend's descriptor", e))?;
        let mut state = State {
            tracker,
            caps,
            tracking: Tracking::new(),
            view,
            vpses: HashMap::new(),
            accounts: HashMap::new(),
            names: HashMap::new(),
            next_id: 0,
            subscribers: Vec::new(),
            batch_subscribers: Vec::new(),
            batch: Vec::new(),
            buf: Vec::with_capacity(1024),
            to_reap: Vec::new(),
            spawning: Vec::new(),
            cgroup_root: None,
            failed: None,
            observer: None,
            journal: None,
            journal_pending: Vec::new(),
            sigchld_ignored: HashMap::new(),
            periodic_resync: caps.resync_every.map(|every| (every, Instant::now())),
        };
        state.resync()?;
        let shared =
            Arc::new(Shared { state: Mutex::new(state), changed: Condvar::new(), stop: AtomicBool::new(false) });
        let s2 = Arc::clone(&shared);
        let pump = std::thread::Builder::new()
            .name("vpstag-pump".into())
            .spawn(move || pump_loop(&s2, &poll_fd))
            .map_err(|e| Error::io("starting the event thread", e))?;
        Ok(Manager { shared, pump: Some(pump), kind })
    }

    /// A manager over the backend `choice` (see [`open_backend`](crate::open_backend)).
    pub fn with_backend(choice: BackendChoice) -> Result<Manager> {
        Manager::new(crate::open_backend(choice)?)
    }

    /// Which backend this manager uses.
    pub fn backend_kind(&self) -> BackendKind {
        self.kind
    }

    /// What the backend promises (e.g. whether it reaps the processes it follows).
    pub fn capabilities(&self) -> Capabilities {
        self.lock().caps
    }

    /// Whether the first process of `vps` is still alive.
    pub fn is_running(&self, vps: &Vps) -> Result<bool> {
        let st = self.synced()?;
        Ok(!st.record(vps)?.first_gone)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not turn every later query into a panic: the state is still
        // consistent between events.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn synced(&self) -> Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        st.pump()?;
        Ok(st)
    }
    /// The VPS of the process `pid` holds now; `None` when it is untagged.
    pub fn vps_of(&self, pid: Pid) -> Result<Option<Vps>> {
        let st = self.synced()?;
        Ok(st.tracking.table.vps_of(pid).and_then(|id| st.vpses.get(&id)).map(|r| r.vps.clone()))
    }

    /// The VPS called `name`.
    pub fn vps(&self, name: &str) -> Result<Vps> {
        let st = self.lock();
        st.names
            .get(name)
            .and_then(|id| st.vpses.get(id))
            .map(|r| r.vps.clone())
            .ok_or_else(|| Error::UnknownVps(name.into()))
    }

    /// Every VPS the manager knows, with its member count.
    pub fn list(&self) -> Result<Vec<VpsSummary>> {
        let st = self.synced()?;
        let mut v: Vec<VpsSummary> = st
            .vpses
            .values()
            .map(|r| VpsSummary {
                vps: r.vps.clone(),
                members: st.tracking.table.member_count(r.vps.id),
                started: r.started,
                first_alive: !r.first_gone,
            })
            .collect();
        v.sort_by_key(|s| s.vps.id);
        Ok(v)
    }

    /// The live processes of `vps` (processes, not threads).
    pub fn members(&self, vps: &Vps) -> Result<Vec<Pid>> {
        let st = self.synced()?;
        st.record(vps)?;
        let mut v: Vec<Pid> = st.tracking.table.members(vps.id).collect();
        v.sort();
        Ok(v)
    }

    /// The members of `vps` with their identities and how each was learned.
    pub fn member_details(&self, vps: &Vps) -> Result<Vec<Member>> {
        let mut st = self.synced()?;
        st.record(vps)?;
        st.settle_starts(vps.id);
        let t = &st.tracking.table;
        let mut v: Vec<Member> = t
            .members(vps.id)
            .filter_map(|p| t.get(p))
            .map(|e| Member { id: e.id, source: e.source, parent: e.parent })
            .collect();
        v.sort_by_key(|m| m.id.pid);
        Ok(v)
    }

    /// Sends `sig` to every member of `vps`, ancestors before descendants; returns how many were
    /// signalled. Each member is held by a pidfd where the kernel has them (Linux 5.3+) and
    /// checked by start time, so a member that exits meanwhile is skipped and a later holder of
    /// its pid is never signalled.
    pub fn signal(&self, vps: &Vps, sig: Signal) -> Result<usize> {
        let targets: Vec<ProcessId> = {
            let mut st = self.synced()?;
            st.record(vps)?;
            st.settle_starts(vps.id);
            let t = &st.tracking.table;
            // Ancestors first: a parent that would react to its child's end (a shell's `wait`
            // returning, a supervisor restarting it) gets the signal before the child does.
            let depth = |e: &crate::Entry| {
                let mut d = 0usize;
                let mut parent = e.parent;
                while let Some(pe) = parent.and_then(|p| t.get(p)).filter(|pe| pe.vps == vps.id) {
                    d += 1;
                    if d >= 4096 {
                        break;
                    }
                    parent = pe.parent;
                }
                d
            };
            let mut v: Vec<(usize, ProcessId)> =
                t.members(vps.id).filter_map(|p| t.get(p)).map(|e| (depth(e), e.id)).collect();
            v.sort_by_key(|(d, id)| (*d, id.pid));
            v.into_iter().map(|(_, id)| id).collect()
        };
        // The lock is taken for each member in turn, not for the whole round.
        let mut sent = 0;
        for id in targets {
            if matches!(self.lock().view.signal_exact(id, sig.as_raw()), Ok(true)) {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Sends SIGKILL to every member of `vps`, again and again, until none is left (a member
    /// forking meanwhile cannot escape: its child is a member too), or `timeout` passes.
    pub fn kill_all(&self, vps: &Vps, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // A VPS with a cgroup is killed at once through it (`cgroup.kill`: no fork can race it);
        // the loop below then ends whatever left the cgroup.
        if let Some(cg) = self.cgroup_of(vps)? {
            let _ = cg.kill(timeout);
        }
        loop {
            if self.signal(vps, Signal::KILL)? == 0 && self.members(vps)?.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let left = self.members(vps)?;
                return Err(Error::Timeout(format!(
                    "{} members of VPS {:?} still alive: {:?}",
                    left.len(),
                    vps.name,
                    left
                )));
            }
            self.wait_change(Duration::from_millis(20));
        }
    }

    /// Waits until `vps` has no member left; false if `timeout` passed first.
    pub fn wait_empty(&self, vps: &Vps, timeout: Option<Duration>) -> Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.members(vps)?.is_empty() {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            self.wait_change(Duration::from_millis(50));
        }
    }

    /// Waits until the first process of `vps` has exited and returns the status of the user's
    /// command (or of the first process when the command never ran). `Ok(None)` on timeout.
    pub fn wait(&self, vps: &Vps, timeout: Option<Duration>) -> Result<Option<ExitStatus>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            {
                let st = self.synced()?;
                let r = st.record(vps)?;
                if r.first_gone {
                    return Ok(r.command_exit.or(r.first_exit));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            self.wait_change(Duration::from_millis(50));
        }
    }

    /// [`wait`](Manager::wait) for async code (feature `tokio`): resolves once the first process
    /// of `vps` has exited, with the status of the user's command (or of the first process when
    /// the command never ran), without holding a thread meanwhile. Must be awaited within a tokio
    /// runtime with I/O enabled.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&self, vps: &Vps) -> Result<Option<ExitStatus>> {
        let mut events =
            self.subscribe_vps(vps)?.into_async().map_err(|e| Error::io("subscribing to the VPS's events", e))?;
        loop {
            if let Some(status) = self.finished(vps)? {
                return Ok(status);
            }
            // Its first process's exit is one of its events (a lost one comes as a loss); look
            // again after each.
            if events.recv().await.is_none() {
                return Err(Error::BackendFailed("the manager's event thread ended".into()));
            }
        }
    }

    /// `Some(status)` once the first process of `vps` has exited.
    #[cfg(feature = "tokio")]
    fn finished(&self, vps: &Vps) -> Result<Option<Option<ExitStatus>>> {
        let st = self.synced()?;
        let r = st.record(vps)?;
        Ok(r.first_gone.then_some(r.command_exit.or(r.first_exit)))
    }

    fn wait_change(&self, max: Duration) {
        let st = self.lock();
        let _ = self.shared.changed.wait_timeout(st, max);
    }

    /// Forgets `vps`: its processes lose their tags (they keep running). Its cgroup, if it has one,
    /// is removed when it is empty (else left to its processes, with its limits).
    pub fn forget(&self, vps: &Vps) -> Result<()> {
        let mut st = self.synced()?;
        st.record(vps)?;
        st.tracking.table.remove_vps(vps.id);
        if let Some(rec) = st.vpses.remove(&vps.id) {
            if st.names.get(&rec.vps.name) == Some(&vps.id) {
                st.names.remove(&rec.vps.name);
            }
            rec.release();
        }
        accounting::release(&mut st, vps.id);
        st.journal_forgotten(vps.id);
        st.flush_changes();
        st.tracker.forget(vps.id)?;
        Ok(())
    }

    /// Every event with its tag, from now on, in a queue of
    /// [`DEFAULT_CAPACITY`](crate::subscription::DEFAULT_CAPACITY) events; a subscriber that falls
    /// further behind is told how many it missed (see [`Subscription`]).
    pub fn subscribe(&self) -> Result<Subscription> {
        self.subscribe_with(None, crate::subscription::DEFAULT_CAPACITY)
    }

    /// The events of `vps` only (and every loss, which may concern it), from now on.
    pub fn subscribe_vps(&self, vps: &Vps) -> Result<Subscription> {
        self.subscribe_with(Some(vps), crate::subscription::DEFAULT_CAPACITY)
    }

    /// [`subscribe`](Manager::subscribe) or [`subscribe_vps`](Manager::subscribe_vps) with a
    /// queue of `capacity` events.
    pub fn subscribe_with(&self, vps: Option<&Vps>, capacity: usize) -> Result<Subscription> {
        let (slot, sub) = crate::subscription::channel(vps.map(|v| v.id), capacity)
            .map_err(|e| Error::io("creating a subscription", e))?;
        self.lock().subscribers.push(slot);
        Ok(sub)
    }

    /// Like [`subscribe`](Manager::subscribe), but one message per drain of the backend: every
    /// event applied since the last message, in order. Under load the manager drains at most every
    /// few milliseconds, so this costs one hand-off per batch instead of one per event.
    pub fn subscribe_batches(&self) -> Receiver<Arc<[TaggedEvent]>> {
        let (tx, rx) = mpsc::channel();
        self.lock().batch_subscribers.push(tx);
        rx
    }

    /// The counters: events, losses, resyncs.
    pub fn stats(&self) -> Stats {
        self.lock().tracking.stats
    }

    /// Applies everything the backend has queued now.
    pub fn sync(&self) -> Result<()> {
        self.synced().map(drop)
    }

    /// Rescans the system and reconciles the table with it (as after lost events).
    pub fn resync(&self) -> Result<()> {
        let mut st = self.synced()?;
        st.resync()
    }

    /// A copy of the table as it is now.
    pub fn table(&self) -> Result<MappingTable> {
        Ok(self.synced()?.tracking.table.clone())
    }

    /// The name of a VPS id.
    pub fn name_of(&self, id: VpsId) -> Option<String> {
        self.lock().vpses.get(&id).map(|r| r.vps.name.clone())
    }

    /// The pid of the user's command in `vps` (the first child of its first process), once known.
    pub fn command_pid(&self, vps: &Vps) -> Result<Option<Pid>> {
        let st = self.synced()?;
        Ok(st.record(vps)?.command)
    }
}
impl Drop for Manager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.pump.take() {
            let _ = h.join();
        }
    }
}
