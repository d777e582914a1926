//! The manager's lifecycle against a scripted system and a scripted tracker: restore with dead
//! and reused members, a first process whose exit event was lost, a name used again, refusals,
//! the order of signals. (Starting a process needs a real fork: tests/spawn.rs does that.)

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};

use vpstag_tracker::{EventKind, LossReason, StartTime, TrackerError};

use super::*;
use crate::sys::{ProcInfo, ProcUsage, Reaped};
use crate::tracking::ProcView;

fn p(pid: i32) -> Pid {
    Pid::new(pid).unwrap()
}

fn info(pid: i32, start: u64, ppid: i32) -> ProcInfo {
    ProcInfo {
        id: ProcessId { pid: p(pid), start: StartTime(start) },
        ppid: Pid::new(ppid),
        uid: 0,
        threads: 1,
        zombie: false,
        name: "x".into(),
    }
}

/// The scripted tracker's queue of events.
type Queue = Arc<Mutex<VecDeque<Event>>>;

/// The processes of the scripted system, what a reap returns, and what was signalled.
#[derive(Default)]
struct World {
    procs: HashMap<Pid, ProcInfo>,
    /// Children of ours that have exited: their wait status.
    exited: HashMap<Pid, i32>,
    /// What each process has used: (own CPU, waited-for children's CPU) in ns, resident bytes.
    used: HashMap<Pid, (u64, u64, u64)>,
    /// The CPU (ns) `wait4` reports for a child of ours that has exited.
    reaped_cpu: HashMap<Pid, u64>,
    /// Processes that ignore SIGCHLD.
    ignore_sigchld: HashSet<Pid>,
    signalled: Vec<(Pid, i32)>,
    now: u64,
    /// Events that reach the tracker's queue just after the next scan: what happened before the
    /// scan but was not read yet (a fork the tracer handles a moment later).
    late: Option<(Queue, Vec<Event>)>,
}

#[derive(Clone)]
struct FakeSystem(Arc<Mutex<World>>);

impl Default for FakeSystem {
    /// The clock starts at 1000 s of uptime, after every start time the tests use (a start time
    /// unit is 10 ms).
    fn default() -> FakeSystem {
        FakeSystem(Arc::new(Mutex::new(World { now: 1_000_000_000_000, ..World::default() })))
    }
}

impl FakeSystem {
    fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }
    fn add(&self, pid: i32, start: u64, ppid: i32) {
        self.world().procs.insert(p(pid), info(pid, start, ppid));
    }
    /// `pid` exits with `code`; a child of ours until reaped.
    fn exit(&self, pid: i32, code: i32) {
        let mut w = self.world();
        w.procs.remove(&p(pid));
        w.exited.insert(p(pid), code << 8);
    }
}

impl ProcView for FakeSystem {
    fn scan(&mut self) -> std::io::Result<Vec<ProcInfo>> {
        let mut w = self.world();
        if let Some((queue, events)) = w.late.take() {
            queue.lock().unwrap().extend(events);
        }
        Ok(w.procs.values().cloned().collect())
    }
    fn process(&mut self, pid: Pid) -> std::io::Result<Option<ProcInfo>> {
        Ok(self.world().procs.get(&pid).cloned())
    }
    fn now_ns(&mut self) -> u64 {
        let mut w = self.world();
        w.now += 1_000;
        w.now
    }
    fn ns_per_start_unit(&self) -> u64 {
        10_000_000
    }
    fn start_tolerance(&self) -> u64 {
        0
    }
}

impl System for FakeSystem {
    fn try_reap(&mut self, pid: Pid) -> std::io::Result<Option<Reaped>> {
        let mut w = self.world();
        match w.exited.remove(&pid) {
            Some(status) => Ok(Some(Reaped { status, cpu_ns: w.reaped_cpu.remove(&pid) })),
            None if w.procs.contains_key(&pid) => Ok(None),
            None => Err(std::io::Error::from_raw_os_error(libc::ECHILD)),
        }
    }
    fn usage(&mut self, pid: Pid) -> std::io::Result<Option<ProcUsage>> {
        let w = self.world();
        let Some(info) = w.procs.get(&pid) else { return Ok(None) };
        let (own, children, rss) = w.used.get(&pid).copied().unwrap_or_default();
        Ok(Some(ProcUsage {
            id: info.id,
            ppid: info.ppid,
            cpu_self_ns: own,
            cpu_children_ns: children,
            rss_bytes: rss,
            zombie: info.zombie,
        }))
    }
    fn sigchld_ignored(&mut self, pid: Pid) -> std::io::Result<Option<bool>> {
        let w = self.world();
        Ok(w.procs.contains_key(&pid).then(|| w.ignore_sigchld.contains(&pid)))
    }
    fn signal_exact(&mut self, id: ProcessId, sig: i32) -> std::io::Result<bool> {
        let mut w = self.world();
        if w.procs.get(&id.pid).is_some_and(|i| i.id.start == id.start) {
            w.signalled.push((id.pid, sig));
            return Ok(true);
        }
        Ok(false)
    }
    fn as_view(&mut self) -> &mut dyn ProcView {
        self
    }
}

/// A backend that reports what the test queued; it follows nothing itself (like the proc
/// connector, it sees the whole host and does not reap).
struct ScriptedTracker {
    events: Arc<Mutex<VecDeque<Event>>>,
    quiet: OwnedFd,
    _writer: OwnedFd,
}

impl ForkTracker for ScriptedTracker {
    fn kind(&self) -> BackendKind {
        BackendKind::Cnproc
    }
    #[allow(clippy::field_reassign_with_default)] // Capabilities is #[non_exhaustive] to other crates
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.host_wide = true;
        c.can_lose = true;
        c
    }
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.quiet.as_fd()
    }
    fn read_events(
        &mut self,
        out: &mut Vec<Event>,
        _timeout: Option<Duration>,
    ) -> std::result::Result<usize, TrackerError> {
        let mut q = self.events.lock().unwrap();
        let n = q.len();
        out.extend(q.drain(..));
        Ok(n)
    }
}

struct Fixture {
    mgr: Manager,
    sys: FakeSystem,
    events: Arc<Mutex<VecDeque<Event>>>,
}

impl Fixture {
    fn new(sys: FakeSystem) -> Fixture {
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let (quiet, writer) = nix::unistd::pipe().unwrap();
        let tracker = ScriptedTracker { events: Arc::clone(&events), quiet, _writer: writer };
        let mgr = Manager::with_system(Box::new(tracker), Box::new(sys.clone())).unwrap();
        Fixture { mgr, sys, events }
    }
    /// A system with one process, 100 (started at 5, parent 1), registered as VPS `a`'s first.
    fn with_vps_a() -> (Fixture, Vps) {
        let sys = FakeSystem::default();
        sys.add(100, 5, 1);
        let f = Fixture::new(sys);
        let a = f.mgr.register_first("a", p(100)).unwrap();
        (f, a)
    }
    fn push(&self, kind: EventKind) {
        let mut ev = Event::new(kind);
        ev.time_ns = Some(self.sys.world().now + 1);
        self.events.lock().unwrap().push_back(ev);
    }
    /// `parent` forks `child` (started at `start`): the system has it, then the event comes.
    fn fork(&self, parent: i32, child: i32, start: u64) {
        self.sys.add(child, start, parent);
        self.push(EventKind::Fork {
            parent: p(parent),
            child: p(child),
            child_thread: p(child),
            thread: false,
            child_start: Some(StartTime(start)),
        });
    }
    fn exit(&self, pid: i32, code: i32) {
        self.sys.exit(pid, code);
        self.push(EventKind::Exit {
            pid: p(pid),
            thread: p(pid),
            status: Some(ExitStatus::Exited(code)),
            group_dead: Some(true),
        });
    }
    /// `pid` exits having used `cpu_ms` (own and waited-for children's), the figure its backend
    /// read before anyone could reap it; what the system still shows of it is the test's business.
    fn exit_with_cpu(&self, pid: i32, cpu_ms: u64) {
        let mut ev = Event::new(EventKind::Exit {
            pid: p(pid),
            thread: p(pid),
            status: Some(ExitStatus::Exited(0)),
            group_dead: Some(true),
        });
        ev.time_ns = Some(self.sys.world().now + 1);
        ev.exit_cpu_ns = Some(cpu_ms * MS);
        self.events.lock().unwrap().push_back(ev);
    }
    /// Moves the events queued since the last read so that they arrive only after the next scan.
    fn hold_until_next_scan(&self) {
        let held: Vec<Event> = self.events.lock().unwrap().drain(..).collect();
        self.sys.world().late = Some((Arc::clone(&self.events), held));
    }
    fn members(&self, vps: &Vps) -> Vec<i32> {
        self.mgr.members(vps).unwrap().into_iter().map(Pid::as_raw).collect()
    }
}

#[test]
fn names_are_checked() {
    assert!(validate_name("web-1.prod_a").is_ok());
    assert!(validate_name("").is_err());
    assert!(validate_name("-x").is_err());
    assert!(validate_name("a b").is_err());
    assert!(validate_name("a/b").is_err());
    assert!(validate_name(&"x".repeat(65)).is_err());
}

#[test]
fn restore_brings_back_live_members_only_and_marks_a_dead_first_process_gone() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1); // a's first process, alive
    sys.add(101, 9, 1); // a member's pid, now another process's (start 9, saved 7)
    sys.add(103, 11, 100); // born below 100 while nobody watched: the resync finds it
    let f = Fixture::new(sys);
    let saved = [
        SavedVps {
            id: VpsId(4),
            name: "a".into(),
            first_pid: p(100),
            first_start: StartTime(5),
            started: 0,
            cgroup: None,
        },
        SavedVps {
            id: VpsId(6),
            name: "b".into(),
            first_pid: p(200),
            first_start: StartTime(3),
            started: 0,
            cgroup: None,
        },
    ];
    let members = [
        SavedMember { pid: p(100), start: StartTime(5), vps: VpsId(4), source: Source::First },
        SavedMember { pid: p(101), start: StartTime(7), vps: VpsId(4), source: Source::Event },
        SavedMember { pid: p(102), start: StartTime(8), vps: VpsId(4), source: Source::Event },
        SavedMember { pid: p(200), start: StartTime(3), vps: VpsId(6), source: Source::First },
    ];
    assert_eq!(f.mgr.restore(&saved, &members).unwrap(), 1, "only 100 is still the process saved");
    let a = f.mgr.vps("a").unwrap();
    let b = f.mgr.vps("b").unwrap();
    assert_eq!(f.members(&a), vec![100, 103]);
    assert_eq!(f.mgr.vps_of(p(101)).unwrap(), None, "a reused pid is not a member");
    assert!(f.mgr.is_running(&a).unwrap());
    assert!(!f.mgr.is_running(&b).unwrap());
    assert_eq!(f.mgr.wait(&b, Some(Duration::ZERO)).unwrap(), None, "gone, with no status known");
    // Ids handed out after a restore never collide with restored ones.
    f.sys.add(300, 20, 1);
    assert!(f.mgr.register_first("c", p(300)).unwrap().id.0 > 6);
}

#[test]
fn a_first_process_whose_exit_event_was_lost_is_found_by_the_resync_and_wait_gets_its_status() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    let f = Fixture::new(sys);
    let job = f.mgr.register_first("job", p(100)).unwrap();
    // It exits, and the backend loses the event (and says so).
    f.sys.exit(100, 7);
    f.push(EventKind::Lost { count: None, reason: LossReason::Overflow });
    assert_eq!(f.mgr.wait(&job, Some(Duration::from_secs(10))).unwrap(), Some(ExitStatus::Exited(7)));
    assert!(f.members(&job).is_empty());
    assert_eq!(f.mgr.stats().loss_reports, 1);
}

#[test]
fn a_name_is_free_again_once_its_vps_ended_and_the_new_vps_is_not_the_old_one() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    let f = Fixture::new(sys);
    let old = f.mgr.register_first("web", p(100)).unwrap();
    f.sys.add(200, 6, 1);
    assert!(matches!(f.mgr.register_first("web", p(200)), Err(Error::AlreadyRunning(_))));
    f.exit(100, 0);
    assert_eq!(f.mgr.wait(&old, Some(Duration::from_secs(10))).unwrap(), Some(ExitStatus::Exited(0)));
    let new = f.mgr.register_first("web", p(200)).unwrap();
    assert_ne!(new.id, old.id);
    f.sys.add(300, 7, 1);
    assert!(matches!(f.mgr.join_vps(&old, p(300)), Err(Error::UnknownVps(_))), "the old VPS by id");
    assert_eq!(f.mgr.join("web", p(300)).unwrap().id, new.id, "the name means the new one");
}

#[test]
fn a_member_can_neither_register_a_vps_nor_join_another() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    sys.add(200, 6, 1);
    let f = Fixture::new(sys);
    let a = f.mgr.register_first("a", p(100)).unwrap();
    let b = f.mgr.register_first("b", p(200)).unwrap();
    f.fork(100, 101, 8);
    assert!(matches!(f.mgr.register_first("c", p(101)), Err(Error::AlreadyMember { .. })));
    assert!(matches!(f.mgr.join_vps(&b, p(101)), Err(Error::AlreadyMember { .. })));
    assert_eq!(f.mgr.join_vps(&a, p(101)).unwrap().id, a.id, "joining one's own VPS is a no-op");
    assert!(matches!(f.mgr.register_first("d", p(999)), Err(Error::NoSuchProcess(_))));
}

#[test]
fn signals_reach_ancestors_before_descendants_and_never_a_reused_pid() {
    let sys = FakeSystem::default();
    sys.add(300, 5, 1);
    let f = Fixture::new(sys);
    let a = f.mgr.register_first("a", p(300)).unwrap();
    // Pids out of tree order: the grandchild has the lowest.
    f.fork(300, 200, 6);
    f.fork(200, 100, 7);
    assert_eq!(f.mgr.signal(&a, Signal::TERM).unwrap(), 3);
    let order: Vec<i32> = f.sys.world().signalled.iter().map(|(pid, _)| pid.as_raw()).collect();
    assert_eq!(order, vec![300, 200, 100]);
    // 100 exits unseen and its pid is taken by an unrelated process: it is not signalled.
    f.sys.world().signalled.clear();
    f.sys.world().procs.insert(p(100), info(100, 42, 1));
    assert_eq!(f.mgr.signal(&a, Signal::TERM).unwrap(), 2);
    assert!(f.sys.world().signalled.iter().all(|(pid, _)| pid.as_raw() != 100));
}

#[test]
fn forget_untags_and_frees_the_name() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    assert_eq!(f.members(&a), vec![100, 101]);
    f.mgr.forget(&a).unwrap();
    assert_eq!(f.mgr.vps_of(p(101)).unwrap(), None);
    assert!(matches!(f.mgr.vps("a"), Err(Error::UnknownVps(_))));
    assert!(matches!(f.mgr.members(&a), Err(Error::UnknownVps(_))));
}

#[test]
fn a_vps_is_plain_numbers_in_json() {
    let vps = Vps { id: VpsId(3), name: "web".into(), first: p(1234) };
    assert_eq!(serde_json::to_string(&vps).unwrap(), r#"{"id":3,"name":"web","first":1234}"#);
}

const MS: u64 = 1_000_000;

impl FakeSystem {
    /// `pid` has used `own` ms itself and `children` ms in the children it waited for.
    fn used(&self, pid: i32, own: u64, children: u64, rss: u64) {
        self.world().used.insert(p(pid), (own * MS, children * MS, rss));
    }
}

fn cpu_ms(f: &Fixture, vps: &Vps) -> u128 {
    f.mgr.usage(vps).unwrap().cpu.as_millis()
}

#[test]
fn a_child_reaped_by_a_member_moves_into_its_waited_for_time_and_the_figure_never_dips() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    f.sys.used(100, 10, 0, 4096);
    f.sys.used(101, 500, 0, 8192);
    let u = f.mgr.usage(&a).unwrap();
    assert_eq!((u.cpu.as_millis(), u.memory_bytes, u.memory_peak_bytes, u.processes), (510, 12288, 12288, 2));
    assert_eq!(u.cpu_source, CpuSource::Lineage);
    // 101 exits; its parent has not collected it yet: its time is nowhere for a moment...
    f.exit(101, 0);
    let u = f.mgr.usage(&a).unwrap();
    assert_eq!(u.cpu.as_millis(), 510, "the figure must not go back while the zombie waits");
    assert_eq!((u.memory_bytes, u.memory_peak_bytes, u.processes), (4096, 12288, 1));
    // ...then 100 reaps it, and it is in 100's waited-for time: counted once, not twice.
    f.sys.used(100, 10, 500, 4096);
    assert_eq!(cpu_ms(&f, &a), 510);
    f.sys.used(100, 30, 500, 4096);
    assert_eq!(cpu_ms(&f, &a), 530);
}

#[test]
fn the_first_process_reaped_by_the_manager_brings_its_wait4_time_instead_of_its_last_sample() {
    let (f, a) = Fixture::with_vps_a();
    f.sys.used(100, 10, 500, 0);
    assert_eq!(cpu_ms(&f, &a), 510);
    // It reaps more before it exits (unseen: nobody asked meanwhile); wait4 says all of it.
    f.sys.world().reaped_cpu.insert(p(100), 1_200 * MS);
    f.exit(100, 0);
    assert_eq!(f.mgr.wait(&a, Some(Duration::from_secs(10))).unwrap(), Some(ExitStatus::Exited(0)));
    assert_eq!(cpu_ms(&f, &a), 1_200, "wait4's figure replaces the last sample (510), never adds to it");
    assert_eq!(cpu_ms(&f, &a), 1_200);
}

#[test]
fn a_member_reaped_outside_the_vps_keeps_its_figure_read_at_its_exit() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    sys.add(200, 7, 1); // its parent (1) is not of the VPS
    let f = Fixture::new(sys);
    let a = f.mgr.register_first("a", p(100)).unwrap();
    f.mgr.join("a", p(200)).unwrap();
    f.sys.used(200, 300, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 300);
    // It burns 150 ms more and exits: the exit event comes while it is a zombie (read then)...
    f.sys.used(200, 450, 0, 0);
    f.push(EventKind::Exit { pid: p(200), thread: p(200), status: None, group_dead: Some(true) });
    f.mgr.sync().unwrap();
    // ...and its parent outside collects it: its time is gone from the system, not from the VPS.
    f.sys.world().procs.remove(&p(200));
    assert_eq!(cpu_ms(&f, &a), 450);
    f.sys.used(100, 5, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 455);
}

#[test]
fn forks_are_counted_per_vps_without_threads_and_a_forgotten_vps_starts_afresh() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    f.fork(101, 102, 7);
    f.push(EventKind::Fork { parent: p(101), child: p(101), child_thread: p(150), thread: true, child_start: None });
    f.fork(999, 500, 8); // not of the VPS
    assert_eq!(f.mgr.usage(&a).unwrap().forks, 2);
    f.mgr.forget(&a).unwrap();
    assert!(matches!(f.mgr.usage(&a), Err(Error::UnknownVps(_))));
    f.sys.add(300, 9, 1);
    let b = f.mgr.register_first("a", p(300)).unwrap();
    assert_eq!(f.mgr.usage(&b).unwrap().forks, 0);
}

#[test]
fn check_does_not_report_a_fork_or_an_exit_whose_event_arrives_just_after_the_scan() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    assert_eq!(f.members(&a), vec![100, 101]);
    // 102 is born and 101 exits; the scan sees both before their events are read.
    f.fork(100, 102, 7);
    f.exit(101, 0);
    f.sys.world().exited.clear();
    f.hold_until_next_scan();
    let report = f.mgr.check().unwrap();
    assert_eq!(report.divergences, vec![], "{report:?}");
    assert_eq!(f.members(&a), vec![100, 102]);
}

#[test]
fn check_reports_a_divergence_that_lasts() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    assert_eq!(f.members(&a), vec![100, 101]);
    // 102 is born and no event ever says so; 101 exits unseen.
    f.sys.add(102, 7, 100);
    f.sys.world().procs.remove(&p(101));
    let report = f.mgr.check().unwrap();
    let mut d = report.divergences.clone();
    d.sort_by_key(|d| format!("{d:?}"));
    assert_eq!(
        d,
        vec![
            Divergence::Extra { pid: p(101), vps: "a".into() },
            Divergence::Missing { pid: p(102), expected: "a".into() },
        ],
        "{report:?}"
    );
}

#[test]
fn the_journal_hook_gets_every_vps_root_and_forget_in_the_order_they_happen() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    sys.add(300, 9, 1);
    let f = Fixture::new(sys);
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    f.mgr.on_journal(move |entries| g.lock().unwrap().extend_from_slice(entries));
    let a = f.mgr.register_first("a", p(100)).unwrap();
    f.fork(100, 101, 6);
    f.fork(101, 102, 7);
    // 101 exits while its child lives on: 102 is an orphan, a root of its own.
    f.exit(101, 0);
    f.sys.world().procs.get_mut(&p(102)).unwrap().ppid = Pid::new(100);
    assert_eq!(f.members(&a), vec![100, 102]);
    f.mgr.join_vps(&a, p(300)).unwrap();
    f.mgr.join_vps(&a, p(300)).unwrap(); // already a member: nothing new
    f.mgr.forget(&a).unwrap();
    let root = |pid: i32, start: u64, source: Source| {
        JournalEntry::Root(SavedMember { pid: p(pid), start: StartTime(start), vps: a.id, source })
    };
    let got = got.lock().unwrap().clone();
    let JournalEntry::Vps(saved) = &got[0] else { panic!("first a VPS: {got:?}") };
    assert_eq!((saved.id, saved.name.as_str(), saved.first_pid, saved.first_start), (a.id, "a", p(100), StartTime(5)));
    assert_eq!(
        got[1..].to_vec(),
        vec![
            root(100, 5, Source::First),
            root(102, 7, Source::Event),
            root(300, 9, Source::Loader),
            JournalEntry::Forgotten(a.id)
        ]
    );
}

#[test]
fn a_member_reaped_outside_the_vps_counts_exactly_its_exit_figure_even_when_gone_before_the_event() {
    let sys = FakeSystem::default();
    sys.add(100, 5, 1);
    sys.add(200, 7, 1); // its parent (1) is not of the VPS
    let f = Fixture::new(sys);
    let a = f.mgr.register_first("a", p(100)).unwrap();
    f.mgr.join("a", p(200)).unwrap();
    f.sys.used(200, 300, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 300);
    // It burns 170 ms more and exits; its parent outside collects it before the manager reads
    // the event: no zombie to read, but the backend read 470 ms at its exit.
    f.sys.world().procs.remove(&p(200));
    f.exit_with_cpu(200, 470);
    assert_eq!(cpu_ms(&f, &a), 470, "the exit figure, not the last sample (300)");
    f.sys.used(100, 5, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 475, "and only once");
    // Still a zombie when the event comes: the same.
    f.sys.add(201, 9, 1);
    f.mgr.join("a", p(201)).unwrap();
    f.sys.used(201, 20, 0, 0);
    f.exit_with_cpu(201, 40);
    assert_eq!(cpu_ms(&f, &a), 515);
    f.sys.world().procs.remove(&p(201));
    assert_eq!(cpu_ms(&f, &a), 515);
}

#[test]
fn a_child_auto_reaped_because_its_parent_ignores_sigchld_counts_its_exit_figure() {
    let (f, a) = Fixture::with_vps_a();
    f.sys.world().ignore_sigchld.insert(p(100));
    f.fork(100, 101, 6);
    f.sys.used(100, 10, 0, 0);
    f.sys.used(101, 100, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 110);
    // 101 burns to 250 ms and exits; the kernel reaps it at once and 100's time stays as it was.
    f.sys.world().procs.remove(&p(101));
    f.exit_with_cpu(101, 250);
    assert_eq!(cpu_ms(&f, &a), 260);
    f.sys.used(100, 20, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 270);
}

#[test]
fn a_child_its_parent_waits_for_is_not_counted_twice_with_an_exit_figure() {
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    f.fork(100, 102, 7);
    f.sys.used(100, 10, 0, 0);
    f.sys.used(101, 100, 0, 0);
    f.sys.used(102, 30, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 140);
    // 101 exits with 250 ms and 100 collects it before the manager sees the event.
    f.sys.world().procs.remove(&p(101));
    f.sys.used(100, 10, 250, 0);
    f.exit_with_cpu(101, 250);
    assert_eq!(cpu_ms(&f, &a), 290, "in 100's waited-for time, once");
    // 102 exits with 50 ms and is a zombie when the event comes (100 has not waited yet; that
    // 100 now ignores SIGCHLD does not matter: the kernel leaves a zombie to be waited for).
    f.sys.world().ignore_sigchld.insert(p(100));
    f.sys.world().procs.get_mut(&p(102)).unwrap().zombie = true;
    f.exit_with_cpu(102, 50);
    assert_eq!(cpu_ms(&f, &a), 290, "not counted while the zombie waits; the figure stays");
    f.sys.world().procs.remove(&p(102));
    f.sys.used(100, 10, 300, 0);
    assert_eq!(cpu_ms(&f, &a), 310);
}

#[test]
fn a_first_process_with_an_exit_figure_reaped_by_the_manager_is_counted_once() {
    let (f, a) = Fixture::with_vps_a();
    f.sys.used(100, 10, 500, 0);
    assert_eq!(cpu_ms(&f, &a), 510);
    // It exits with 1,100 ms read at its exit; wait4 then says 1,200 (what it did after the read).
    f.sys.world().reaped_cpu.insert(p(100), 1_200 * MS);
    f.sys.exit(100, 0);
    f.exit_with_cpu(100, 1_100);
    assert_eq!(f.mgr.wait(&a, Some(Duration::from_secs(10))).unwrap(), Some(ExitStatus::Exited(0)));
    assert_eq!(cpu_ms(&f, &a), 1_200, "wait4's figure completes the exit figure, never adds to it");
}

#[test]
fn a_child_still_exiting_when_its_exit_comes_is_counted_if_its_parent_ignores_sigchld() {
    // Under eBPF the exit is read in the kernel before the parent is notified: the process may
    // still be there, not yet a zombie. Its parent's disposition decides, as when it is gone.
    let (f, a) = Fixture::with_vps_a();
    f.fork(100, 101, 6);
    f.fork(100, 102, 7);
    f.sys.used(100, 10, 0, 0);
    assert_eq!(cpu_ms(&f, &a), 10);
    // 101 exits with 40 ms while 100 waits for its children: 100's waited-for time gets it.
    f.exit_with_cpu(101, 40);
    assert_eq!(cpu_ms(&f, &a), 10, "left to 100's waited-for time");
    f.sys.world().procs.remove(&p(101));
    f.sys.used(100, 10, 40, 0);
    assert_eq!(cpu_ms(&f, &a), 50);
    // 102 exits with 70 ms after 100 started to ignore SIGCHLD: the kernel reaps it, nobody
    // gets its time but the VPS.
    f.sys.world().ignore_sigchld.insert(p(100));
    f.exit_with_cpu(102, 70);
    assert_eq!(cpu_ms(&f, &a), 120);
    f.sys.world().procs.remove(&p(102));
    assert_eq!(cpu_ms(&f, &a), 120);
}
