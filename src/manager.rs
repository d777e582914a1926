//! The manager: owns the backend and the table, starts first processes, answers queries.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use vpstag_tracker::{BackendKind, Capabilities, Event, EventKind, ExitStatus, ForkTracker, Pid, ProcessId, VpsId};

use crate::init::{Pipes, Plan};
use crate::table::{Change, MappingTable, Source};
use crate::tracking::{ProcView, Stats, SystemView, TaggedEvent, Tracking};
use crate::{BackendChoice, Error, Result, Signal};

/// A VPS: its id, its name, and its first process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Vps {
    /// The id the table and backends use.
    #[serde(serialize_with = "ser_vps_id")]
    pub id: VpsId,
    /// The name it was started under.
    pub name: String,
    /// Its first process (the vpstag init, or the process that came in through the loader).
    #[serde(serialize_with = "ser_pid")]
    pub first: Pid,
}

fn ser_vps_id<S: serde::Serializer>(v: &VpsId, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(v.0)
}

fn ser_pid<S: serde::Serializer>(v: &Pid, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_i32(v.as_raw())
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

struct VpsRecord {
    vps: Vps,
    first: ProcessId,
    started: SystemTime,
    /// The user's command: the first child of the first process.
    command: Option<Pid>,
    command_exit: Option<ExitStatus>,
    first_exit: Option<ExitStatus>,
    first_gone: bool,
}

/// Receives batches of table changes (for a journal).
type Observer = Box<dyn FnMut(&[Change]) + Send>;
/// Receives the members whose parent exited while they live on (see [`Manager::on_orphans`]).
type OrphanObserver = Box<dyn FnMut(&[(ProcessId, VpsId)]) + Send>;

struct State {
    tracker: Box<dyn ForkTracker>,
    caps: Capabilities,
    tracking: Tracking,
    view: SystemView,
    vpses: HashMap<VpsId, VpsRecord>,
    names: HashMap<String, VpsId>,
    next_id: u64,
    subscribers: Vec<Sender<TaggedEvent>>,
    /// Receivers of whole batches (one send per drain, not per event).
    batch_subscribers: Vec<Sender<Arc<[TaggedEvent]>>>,
    /// The events of the drain in progress, for `batch_subscribers`.
    batch: Vec<TaggedEvent>,
    buf: Vec<Event>,
    to_reap: Vec<Pid>,
    failed: Option<String>,
    observer: Option<Observer>,
    orphan_observer: Option<OrphanObserver>,
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

fn validate_name(name: &str) -> Result<()> {
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
    /// Applies everything the backend has queued.
    fn pump(&mut self) -> Result<()> {
        if let Some(f) = &self.failed {
            return Err(Error::BackendFailed(f.clone()));
        }
        // Everything queued when this call began is read within the first (queue capacity)
        // events, since the queue is first-in first-out; stopping after that bound keeps a fork
        // storm from holding the lock forever while still answering every query with all it
        // could have seen. 100,000 is more than a 16 MiB socket buffer can hold (~820 bytes an
        // event).
        let mut budget: usize = 100_000;
        while budget > 0 {
            self.buf.clear();
            match self.tracker.read_events(&mut self.buf, Some(Duration::ZERO)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return Err(Error::BackendFailed(e.to_string()));
                }
            }
            let events = std::mem::take(&mut self.buf);
            budget = budget.saturating_sub(events.len());
            for ev in &events {
                let tagged = self.tracking.apply(ev, &mut self.view);
                self.note_lifecycle(&tagged);
                if !self.subscribers.is_empty() {
                    self.subscribers.retain(|s| s.send(tagged).is_ok());
                }
                if !self.batch_subscribers.is_empty() {
                    self.batch.push(tagged);
                }
                if self.tracking.resync_due {
                    self.resync()?;
                }
            }
            self.buf = events;
        }
        self.send_batch();
        self.tracking.recheck_suspects(&mut self.view);
        if let Some((every, last)) = self.periodic_resync {
            if last.elapsed() >= every {
                self.periodic_resync = Some((every, Instant::now()));
                self.resync()?;
            }
        }
        self.reap();
        self.flush_changes();
        Ok(())
    }

    /// Resynchronises from a scan; a backend that follows only what it was told to watch (ptrace,
    /// kqueue) or keeps its own tags (eBPF) is then told to watch each process the scan added,
    /// and the scan is repeated until it adds nothing (a process may fork before it is watched).
    fn resync(&mut self) -> Result<()> {
        let follow = !self.caps.host_wide || self.caps.holds_tags;
        for _ in 0..8 {
            let added =
                self.tracking.resync(&mut self.view).map_err(|e| Error::io("resynchronising from a scan", e))?;
            if !follow || added.is_empty() {
                break;
            }
            for (pid, vps) in added {
                // A process that died meanwhile, or is already followed, is fine.
                let _ = self.tracker.watch(pid, vps);
            }
        }
        self.note_lost_first_exits();
        Ok(())
    }

    /// Makes the start time of every member of `vps` exact (see [`Tracking::settle_start`]), so that
    /// identities handed out (to signal by pidfd, to `member_details`) compare exactly.
    fn settle_starts(&mut self, vps: VpsId) {
        let approx: Vec<Pid> = self
            .tracking
            .table
            .members(vps)
            .filter(|p| self.tracking.table.get(*p).is_some_and(|e| e.start_approx))
            .collect();
        for pid in approx {
            self.tracking.settle_start(pid, &mut self.view);
        }
    }

    /// Hands the events of this drain to the batch subscribers, one send each.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch: Arc<[TaggedEvent]> = std::mem::take(&mut self.batch).into();
        self.batch_subscribers.retain(|s| s.send(Arc::clone(&batch)).is_ok());
    }

    fn flush_changes(&mut self) {
        let orphans = self.tracking.table.take_orphaned();
        if self.orphan_observer.is_some() && !orphans.is_empty() {
            // Their identities go to a journal and are compared exactly after a restart: settle
            // start times estimated from events first.
            let mut v: Vec<(ProcessId, VpsId)> = Vec::with_capacity(orphans.len());
            for e in &orphans {
                self.tracking.settle_start(e.id.pid, &mut self.view);
                let id = self.tracking.table.get(e.id.pid).map_or(e.id, |now| now.id);
                v.push((id, e.vps));
            }
            if let Some(obs) = &mut self.orphan_observer {
                obs(&v);
            }
        }
        if let Some(obs) = &mut self.observer {
            let changes = self.tracking.table.take_changes();
            if !changes.is_empty() {
                obs(&changes);
            }
        }
    }

    /// Follows the first process and the command of each VPS.
    fn note_lifecycle(&mut self, t: &TaggedEvent) {
        let Some(vps) = t.vps else { return };
        let Some(rec) = self.vpses.get_mut(&vps) else { return };
        match t.event.kind {
            EventKind::Fork { parent, child, thread: false, .. }
                if parent == rec.first.pid && rec.command.is_none() && child != rec.first.pid =>
            {
                rec.command = Some(child);
            }
            EventKind::Exit { pid, thread, status, group_dead } if thread == pid || group_dead == Some(true) => {
                if Some(pid) == rec.command {
                    rec.command_exit = status.or(rec.command_exit);
                }
                if pid == rec.first.pid && !rec.first_gone {
                    rec.first_exit = status;
                    rec.first_gone = true;
                    // It is dead: waiting for it cannot take a ptrace stop from a backend that
                    // follows it, and if such a backend reaped it already, waitpid says ECHILD.
                    self.to_reap.push(pid);
                }
            }
            _ => {}
        }
    }

    /// Reaps first processes (our children) that have exited, unless the backend reaps.
    fn reap(&mut self) {
        let mut reaped = Vec::new();
        self.to_reap.retain(|pid| match crate::sys::try_reap(*pid) {
            Ok(None) => true,
            Ok(Some(status)) => {
                reaped.push((*pid, status));
                false
            }
            Err(_) => false,
        });
        // Where the exit event itself was lost, the status comes from waitpid.
        for (pid, status) in reaped {
            for rec in self.vpses.values_mut().filter(|r| r.first.pid == pid && r.first_exit.is_none()) {
                rec.first_exit = ExitStatus::from_wait_status(status);
            }
        }
    }

    /// After a resync: a first process whose exit event was lost is gone from the table; mark it
    /// gone (so `wait` returns) and reap it.
    fn note_lost_first_exits(&mut self) {
        let tol = crate::sys::start_tolerance();
        for rec in self.vpses.values_mut().filter(|r| !r.first_gone) {
            let in_table = self.tracking.table.get(rec.first.pid).is_some_and(|e| e.same_start(rec.first.start, tol));
            if !in_table {
                rec.first_gone = true;
                self.to_reap.push(rec.first.pid);
            }
        }
    }

    fn record(&self, vps: &Vps) -> Result<&VpsRecord> {
        self.vpses.get(&vps.id).ok_or_else(|| Error::UnknownVps(vps.name.clone()))
    }

    fn name_in_use(&self, name: &str) -> bool {
        match self.names.get(name) {
            Some(id) => self.tracking.table.member_count(*id) > 0 || self.vpses.get(id).is_some_and(|r| !r.first_gone),
            None => false,
        }
    }

    fn new_vps(&mut self, name: &str, first: ProcessId) -> Vps {
        if let Some(old) = self.names.remove(name) {
            self.vpses.remove(&old);
        }
        self.next_id += 1;
        let id = VpsId(self.next_id);
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
            },
        );
        self.names.insert(name.to_string(), id);
        vps
    }
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
        let kind = tracker.kind();
        let caps = tracker.capabilities();
        let poll_fd: OwnedFd =
            tracker.as_fd().try_clone_to_owned().map_err(|e| Error::io("duplicating the backend's descriptor", e))?;
        let mut state = State {
            tracker,
            caps,
            tracking: Tracking::new(),
            view: SystemView::new(),
            vpses: HashMap::new(),
            names: HashMap::new(),
            next_id: 0,
            subscribers: Vec::new(),
            batch_subscribers: Vec::new(),
            batch: Vec::new(),
            buf: Vec::with_capacity(1024),
            to_reap: Vec::new(),
            failed: None,
            observer: None,
            orphan_observer: None,
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

    /// Starts VPS `name` running `cmd` under a new first process, and returns once `cmd` has
    /// been executed (or failed to be).
    ///
    /// The first process is recorded in the table (and followed by the backend) before it is let
    /// past its start gate, so nothing of the VPS ever runs untagged.
    pub fn start(&self, name: &str, cmd: &mut Command) -> Result<Vps> {
        validate_name(name)?;
        let plan = Plan::new(cmd)
            .map_err(|source| Error::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source })?;
        let pipes = Pipes::new().map_err(|e| Error::io("creating the start-gate pipes", e))?;
        let mut st = self.synced()?;
        if st.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let child = crate::init::fork_first_process(&plan, &pipes).map_err(|e| Error::io("fork", e))?;
        let Pipes { gate_read, gate_write, err_read, err_write } = pipes;
        drop(gate_read);
        drop(err_write);
        let abort = |st: &mut State| {
            crate::sys::kill_child(child);
            if !st.caps.reaps {
                let _ = crate::sys::reap(child);
            }
        };
        let info = match crate::sys::process(child) {
            Ok(Some(i)) => i,
            Ok(None) => {
                abort(&mut st);
                return Err(Error::io("reading the new first process", std::io::ErrorKind::NotFound.into()));
            }
            Err(e) => {
                abort(&mut st);
                return Err(Error::io("reading the new first process", e));
            }
        };
        let vps = st.new_vps(name, info.id);
        if let Err(e) = st.tracker.watch(child, vps.id) {
            abort(&mut st);
            st.names.remove(name);
            st.vpses.remove(&vps.id);
            return Err(e.into());
        }
        st.tracking.insert_member(&info, vps.id, Source::First);
        // Open the gate.
        let opened = nix::unistd::write(&gate_write, &[1u8]);
        drop(gate_write);
        drop(st);
        if let Err(e) = opened {
            return Err(Error::io("opening the start gate", e.into()));
        }
        let reported =
            crate::init::read_exec_errno(err_read).map_err(|e| Error::io("waiting for the command to start", e))?;
        if let Some(errno) = reported {
            // The first process exits at once; forget the VPS so that its name is free again.
            let _ = self.wait(&vps, Some(Duration::from_secs(5)));
            let mut st = self.lock();
            st.tracking.table.remove_vps(vps.id);
            st.vpses.remove(&vps.id);
            st.names.remove(name);
            return Err(Error::Spawn {
                program: plan.program().to_string(),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(vps)
    }

    /// Brings the running process `pid` (and its live descendants) into VPS `name`: the loader's
    /// way in. Creates the VPS when no VPS of that name is running.
    pub fn adopt(&self, name: &str, pid: Pid) -> Result<Vps> {
        validate_name(name)?;
        let mut st = self.synced()?;
        let info = crate::sys::process(pid)
            .map_err(|e| Error::io("reading the process", e))?
            .ok_or(Error::NoSuchProcess(pid))?;
        let vps = match st.names.get(name).copied() {
            Some(id) if st.name_in_use(name) => {
                st.vpses.get(&id).map(|r| r.vps.clone()).ok_or_else(|| Error::UnknownVps(name.into()))?
            }
            _ => st.new_vps(name, info.id),
        };
        st.tracker.watch(pid, vps.id)?;
        st.tracking.insert_member(&info, vps.id, Source::Loader);
        // Its descendants that already exist are found by a scan; anything born from now on
        // comes as events after the scan's start.
        st.resync()?;
        st.flush_changes();
        Ok(vps)
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

    /// Sends `sig` to every member of `vps`; returns how many were signalled. Each member is held
    /// by a pidfd where the kernel has them (Linux 5.3+) and checked by start time, so a member
    /// that exits meanwhile is skipped and a later holder of its pid is never signalled.
    pub fn signal(&self, vps: &Vps, sig: Signal) -> Result<usize> {
        let targets: Vec<ProcessId> = {
            let mut st = self.synced()?;
            st.record(vps)?;
            st.settle_starts(vps.id);
            let t = &st.tracking.table;
            t.members(vps.id).filter_map(|p| t.get(p)).map(|e| e.id).collect()
        };
        Ok(targets.into_iter().filter(|id| matches!(crate::sys::signal_exact(*id, sig.as_raw()), Ok(true))).count())
    }

    /// Sends SIGKILL to every member of `vps`, again and again, until none is left (a member
    /// forking meanwhile cannot escape: its child is a member too), or `timeout` passes.
    pub fn kill_all(&self, vps: &Vps, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
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

    fn wait_change(&self, max: Duration) {
        let st = self.lock();
        let _ = self.shared.changed.wait_timeout(st, max);
    }

    /// Forgets `vps`: its processes lose their tags (they keep running).
    pub fn forget(&self, vps: &Vps) -> Result<()> {
        let mut st = self.synced()?;
        st.record(vps)?;
        st.tracking.table.remove_vps(vps.id);
        if let Some(rec) = st.vpses.remove(&vps.id) {
            if st.names.get(&rec.vps.name) == Some(&vps.id) {
                st.names.remove(&rec.vps.name);
            }
        }
        st.tracker.forget(vps.id)?;
        Ok(())
    }

    /// A stream of every event with its tag, from now on.
    pub fn subscribe(&self) -> Receiver<TaggedEvent> {
        let (tx, rx) = mpsc::channel();
        self.lock().subscribers.push(tx);
        rx
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

/// A VPS as saved by [`Manager::export`] and given back to [`Manager::restore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedVps {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its first process.
    pub first_pid: i32,
    /// The first process's start time (system units).
    pub first_start: u64,
    /// When it was started, in seconds since the epoch.
    pub started: u64,
}

/// A tagged process as saved by [`Manager::export`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedMember {
    /// Process id.
    pub pid: i32,
    /// Start time (system units): a process with this pid but another start time is not it.
    pub start: u64,
    /// Its VPS id.
    pub vps: u64,
    /// How it was learned.
    pub source: Source,
}

/// What [`Manager::check`] found wrong between the table and the system now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Divergence {
    /// A live process below a tagged ancestor that the table does not have.
    Missing {
        /// Process id.
        pid: i32,
        /// The VPS its ancestry says.
        expected: String,
    },
    /// A table entry whose process is gone (or whose pid now belongs to another process).
    Extra {
        /// Process id.
        pid: i32,
        /// The VPS the table has.
        vps: String,
    },
    /// A process born from a tagged parent (never re-parented, no loader involved) whose tag
    /// differs from its parent's.
    WrongTag {
        /// Process id.
        pid: i32,
        /// The VPS the table has.
        vps: String,
        /// Its parent's VPS.
        expected: String,
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
        let mut st = self.synced()?;
        if let Some(id) = st.tracking.table.vps_of(pid) {
            let other = st.vpses.get(&id).map_or_else(|| id.to_string(), |r| r.vps.name.clone());
            return Err(Error::AlreadyMember { pid, vps: other });
        }
        if st.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let info = crate::sys::process(pid)
            .map_err(|e| Error::io("reading the process", e))?
            .ok_or(Error::NoSuchProcess(pid))?;
        let vps = st.new_vps(name, info.id);
        if let Err(e) = st.tracker.watch(pid, vps.id) {
            st.names.remove(name);
            st.vpses.remove(&vps.id);
            return Err(e.into());
        }
        st.tracking.insert_member(&info, vps.id, Source::First);
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
        let info = crate::sys::process(pid)
            .map_err(|e| Error::io("reading the process", e))?
            .ok_or(Error::NoSuchProcess(pid))?;
        st.tracker.watch(pid, vps.id)?;
        st.tracking.insert_member(&info, vps.id, Source::Loader);
        st.flush_changes();
        Ok(vps)
    }

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
                id: r.vps.id.0,
                name: r.vps.name.clone(),
                first_pid: r.first.pid.as_raw(),
                first_start: r.first.start.0,
                started: r.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
            .collect();
        let members = st
            .tracking
            .table
            .entries()
            .map(|e| SavedMember { pid: e.id.pid.as_raw(), start: e.id.start.0, vps: e.vps.0, source: e.source })
            .collect();
        Ok((vpses, members))
    }

    /// Brings back what [`export`](Manager::export) (or a journal) saved: every VPS, and each
    /// member whose process still lives with the same start time (a reused pid is not it). Then
    /// a resync adds what was born meanwhile below a restored member. Returns how many members
    /// came back.
    pub fn restore(&self, vpses: &[SavedVps], members: &[SavedMember]) -> Result<usize> {
        let mut st = self.synced()?;
        let tol = crate::sys::start_tolerance();
        for v in vpses {
            let (Some(first), id) = (Pid::new(v.first_pid), VpsId(v.id)) else { continue };
            st.next_id = st.next_id.max(v.id);
            let vps = Vps { id, name: v.name.clone(), first };
            let first_alive =
                matches!(crate::sys::process(first), Ok(Some(i)) if i.id.start.0.abs_diff(v.first_start) <= tol);
            st.vpses.insert(
                id,
                VpsRecord {
                    vps,
                    first: ProcessId { pid: first, start: vpstag_tracker::StartTime(v.first_start) },
                    started: SystemTime::UNIX_EPOCH + Duration::from_secs(v.started),
                    command: None,
                    command_exit: None,
                    first_exit: None,
                    first_gone: !first_alive,
                },
            );
            st.names.insert(v.name.clone(), id);
        }
        let mut n = 0;
        for m in members {
            let Some(pid) = Pid::new(m.pid) else { continue };
            if !st.vpses.contains_key(&VpsId(m.vps)) {
                continue;
            }
            match crate::sys::process(pid) {
                Ok(Some(info)) if info.id.start.0.abs_diff(m.start) <= tol && !(info.zombie && info.threads <= 1) => {
                    let _ = st.tracker.watch(pid, VpsId(m.vps));
                    st.tracking.insert_member(&info, VpsId(m.vps), m.source);
                    n += 1;
                }
                _ => {}
            }
        }
        st.resync()?;
        st.flush_changes();
        Ok(n)
    }

    /// Compares the table with a fresh scan of the system and reports every divergence
    /// (expected: none), with the loss and resync counters. The table is not changed.
    pub fn check(&self) -> Result<CheckReport> {
        let st = self.synced()?;
        let mut fresh = st.tracking.clone();
        let view = SystemView::new();
        let t0 = crate::sys::now_ns();
        let procs = crate::sys::scan().map_err(|e| Error::io("scanning the process table", e))?;
        let processes = procs.len();
        let ppid_of: HashMap<Pid, Option<Pid>> = procs.iter().map(|p| (p.id.pid, p.ppid)).collect();
        fresh.table.record_changes(false);
        fresh.reconcile(t0, procs, view.start_tolerance());
        let name = |id: VpsId| st.vpses.get(&id).map(|r| r.vps.name.clone()).unwrap_or_else(|| id.to_string());
        let mut out = Vec::new();
        for e in st.tracking.table.entries() {
            match fresh.table.get(e.id.pid) {
                Some(f) if f.id.start == e.id.start || f.same_start(e.id.start, 1) => {}
                _ => out.push(Divergence::Extra { pid: e.id.pid.as_raw(), vps: name(e.vps) }),
            }
            if e.source == Source::Event {
                if let (Some(parent), Some(Some(live_parent))) = (e.parent, ppid_of.get(&e.id.pid)) {
                    if parent == *live_parent {
                        if let Some(pe) = st.tracking.table.get(parent) {
                            if pe.vps != e.vps && pe.source != Source::Loader && e.source != Source::Loader {
                                out.push(Divergence::WrongTag {
                                    pid: e.id.pid.as_raw(),
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
                out.push(Divergence::Missing { pid: f.id.pid.as_raw(), expected: name(f.vps) });
            }
        }
        Ok(CheckReport { divergences: out, entries: st.tracking.table.len(), processes, stats: st.tracking.stats })
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

/// Under load the pump drains the backend at most this often, so that a fork storm costs one
/// wake-up of the pump (and one hand-off to batch subscribers and the change observer) per batch
/// instead of one per event. An event after a quiet spell is drained at once. Queries drain
/// synchronously before answering, so this delays no answer.
const PUMP_INTERVAL: Duration = Duration::from_millis(5);

fn pump_loop(shared: &Shared, fd: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut last_drain = Instant::now();
    // Whether the last drain found events: then more are likely, and a backend that wakes its
    // reader at most once per interval (eBPF) may hold the tail of a burst without a wake-up, so
    // look again after one interval instead of waiting for the next wake-up.
    let mut flowing = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let busy = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.tracking.has_suspects() || !st.to_reap.is_empty()
        };
        let ms: u16 = if flowing {
            PUMP_INTERVAL.as_millis() as u16
        } else if busy {
            20
        } else {
            100
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let since = last_drain.elapsed();
        if since < PUMP_INTERVAL {
            std::thread::sleep(PUMP_INTERVAL - since);
        }
        last_drain = Instant::now();
        let failed = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let before = st.tracking.stats.events;
            let failed = st.failed.is_some() || st.pump().is_err();
            flowing = st.tracking.stats.events != before;
            failed
        };
        if failed {
            // Queries report the failure; don't spin on a descriptor nobody drains.
            std::thread::sleep(Duration::from_millis(100));
        }
        shared.changed.notify_all();
    }
}

// Added for the daemon (issue 3): kept apart from the rest on purpose.
impl Manager {
    /// Marks the first process of each VPS gone when the system says it is (exited, a zombie,
    /// or its pid now another process's). For the daemon after [`restore`](Manager::restore): a
    /// first process that is a zombie when restored, or exits between the restore's reading and
    /// its scan, sends no exit the table applies. Returns how many were marked.
    pub fn recheck_first_processes(&self) -> Result<usize> {
        let mut st = self.synced()?;
        let tol = crate::sys::start_tolerance();
        let mut n = 0;
        for rec in st.vpses.values_mut().filter(|r| !r.first_gone) {
            let alive = matches!(crate::sys::process(rec.first.pid),
                Ok(Some(i)) if i.id.start.0.abs_diff(rec.first.start.0) <= tol && !(i.zombie && i.threads <= 1));
            if !alive {
                rec.first_gone = true;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.prod_a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }
}
