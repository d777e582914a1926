//! The event-loop logic, without a kernel: tracer state + one raw wait status -> the events to
//! emit and the ptrace requests to make.
//!
//! Nothing here makes a system call. What the decoder needs from the system it gets as arguments:
//! the raw `wait4` status, the CPU time in the `struct rusage` `wait4` filled with it, the
//! `PTRACE_GETEVENTMSG` value of an event stop (the caller fetches it when [`needs_event_msg`] says
//! so), and `/proc` reads through the [`Probe`] trait, which the unit tests fake.
//!
//! The numbers (`PTRACE_EVENT_*`, stop signals) are Linux's; they are spelt out here so that this
//! module builds and tests on any system.

use std::collections::{HashMap, HashSet, VecDeque};

use vpstag_tracker::{Event, EventKind, ExitStatus, Pid, StartTime, VpsId};

/// `PTRACE_EVENT_FORK`.
pub const EVENT_FORK: i32 = 1;
/// `PTRACE_EVENT_VFORK`.
pub const EVENT_VFORK: i32 = 2;
/// `PTRACE_EVENT_CLONE`.
pub const EVENT_CLONE: i32 = 3;
/// `PTRACE_EVENT_EXEC`.
pub const EVENT_EXEC: i32 = 4;
/// `PTRACE_EVENT_VFORK_DONE`.
pub const EVENT_VFORK_DONE: i32 = 5;
/// `PTRACE_EVENT_EXIT`.
pub const EVENT_EXIT: i32 = 6;
/// `PTRACE_EVENT_STOP`: group-stop, or the first stop of an auto-attached child, or an
/// interrupt/notify trap (only for `PTRACE_SEIZE`d tracees).
pub const EVENT_STOP: i32 = 128;

/// `SIGTRAP` (Linux numbering, as every number here).
pub const SIGTRAP: i32 = 5;
/// `SIGSTOP`.
pub const SIGSTOP: i32 = 19;
/// `SIGTSTP`.
pub const SIGTSTP: i32 = 20;
/// `SIGTTIN`.
pub const SIGTTIN: i32 = 21;
/// `SIGTTOU`.
pub const SIGTTOU: i32 = 22;

/// How many exits of unknown tasks are remembered (see [`Tracer`]).
const EARLY_EXIT_CAP: usize = 256;

/// Whether `sig` is one of the four signals that stop a thread group.
pub fn is_stop_signal(sig: i32) -> bool {
    matches!(sig, SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU)
}

/// A raw wait status, decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Status {
    /// The task is gone (`WIFEXITED` / `WIFSIGNALED`).
    Exited(ExitStatus),
    /// Signal-delivery-stop: the tracee is about to receive `sig`.
    Signal(i32),
    /// `PTRACE_EVENT_STOP` with a stop signal: a group-stop (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU).
    GroupStop(i32),
    /// `PTRACE_EVENT_STOP` with any other signal (SIGTRAP): the first stop of a new child, or the
    /// re-trap after `PTRACE_LISTEN` when the group-stop ended.
    TrapStop,
    /// Any other `PTRACE_EVENT_*` stop: fork, vfork, clone, exec, exit, vfork-done.
    Event(i32),
    /// Something else (`WIFCONTINUED`, never asked for): nothing to do.
    Other,
}

/// Decodes a raw status from `wait4(.., __WALL, ..)` on a `PTRACE_SEIZE`d tracee.
///
/// Unlike `nix::sys::wait::WaitStatus::from_raw`, every stop signal is accepted, real-time ones
/// included (nix returns `EINVAL` for those, nix issues 495 and 1143).
pub fn classify(status: i32) -> Status {
    if let Some(exit) = ExitStatus::from_wait_status(status) {
        return Status::Exited(exit);
    }
    if status & 0xff != 0x7f {
        return Status::Other;
    }
    let sig = (status >> 8) & 0xff;
    let event = (status >> 16) & 0xff;
    match event {
        0 => Status::Signal(sig),
        EVENT_STOP if is_stop_signal(sig) => Status::GroupStop(sig),
        EVENT_STOP => Status::TrapStop,
        e => Status::Event(e),
    }
}

/// Whether the caller must fetch `PTRACE_GETEVENTMSG` for this status before calling
/// [`Tracer::step`]: fork, vfork and clone stops (the new tid) and exec stops (the former tid).
pub fn needs_event_msg(status: i32) -> bool {
    matches!(classify(status), Status::Event(EVENT_FORK | EVENT_VFORK | EVENT_CLONE | EVENT_EXEC))
}

/// How to restart a stopped tracee.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Resume {
    /// `PTRACE_CONT` delivering this signal (0: none).
    Cont(i32),
    /// `PTRACE_LISTEN`: stay in the group-stop, but let the kernel wake it on SIGCONT.
    Listen,
}

/// One ptrace request for the caller to make, after queueing the events of the same step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Action {
    /// The tracee (thread id).
    pub tid: Pid,
    /// What to do with it.
    pub resume: Resume,
}

/// What `/proc/TID/stat` says about a task.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TaskStat {
    /// Field 3: the state letter (`R`, `S`, `t`, `Z`...).
    pub state: char,
    /// Field 4: the thread-group id of the real parent.
    pub ppid: i32,
    /// Field 20: the number of threads in its thread group.
    pub num_threads: i64,
    /// Field 22: the start time in clock ticks since boot.
    pub start: StartTime,
}

impl TaskStat {
    /// A zombie (`Z`) or dead (`X`) task.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses the text of `/proc/TID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<TaskStat> {
    parse_stat_bytes(text.as_bytes())
}

/// [`parse_stat`] on raw bytes, without allocating.
pub fn parse_stat_bytes(bytes: &[u8]) -> Option<TaskStat> {
    let rest = &bytes[bytes.iter().rposition(|&b| b == b')')? + 1..];
    let mut fields = rest.split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty());
    // Field N is the (N - 3)th after the command name: 3 state, 4 ppid, 20 threads, 22 start.
    let state = char::from(*fields.next()?.first()?);
    let ppid = parse_int(fields.next()?)?;
    let num_threads = parse_int(fields.nth(15)?)?;
    let start = parse_int(fields.nth(1)?)?;
    Some(TaskStat { state, ppid: i32::try_from(ppid).ok()?, num_threads, start: StartTime(u64::try_from(start).ok()?) })
}

/// A decimal integer, possibly negative.
fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// The state letter (field 3) of `/proc/PID/stat`.
pub fn parse_state(text: &str) -> Option<char> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_ascii_whitespace().next()?.chars().next()
}

/// The start time, in clock ticks of `tick_ns`, of a task created between `lo` and `hi` (ns of
/// the same clock), when that interval lies within one tick.
pub fn start_between(lo: u64, hi: u64, tick_ns: u64) -> Option<StartTime> {
    if tick_ns == 0 || lo == 0 || hi < lo || lo / tick_ns != hi / tick_ns {
        return None;
    }
    Some(StartTime(lo / tick_ns))
}

/// The system reads the decoder needs. The live implementation reads `/proc`.
pub trait Probe {
    /// `/proc/TID/stat`, or `None` when it cannot be read.
    fn stat(&mut self, tid: Pid) -> Option<TaskStat>;
    /// The thread-group id of `tid` (`Tgid:` in `/proc/TID/status`).
    fn tgid(&mut self, tid: Pid) -> Option<Pid>;
    /// What `/proc/CHILD/stat` says of `child`, just created by thread `creator` (of process
    /// `creator_tgid`), which is stopped at its fork/vfork/clone event, and not reaped: the caller
    /// knows of no exit of `child`. An implementation may answer without `/proc`, from the
    /// creator's registers and clocks, as long as the answer is the same: state not dead, `ppid`
    /// the real parent, `num_threads` above 1 exactly for a thread, the exact start time.
    fn new_task(&mut self, creator: Pid, creator_tgid: Pid, child: Pid) -> Option<TaskStat> {
        let _ = (creator, creator_tgid);
        self.stat(child)
    }
}

#[derive(Clone, Copy, Debug)]
struct Task {
    tgid: Pid,
}

#[derive(Clone, Debug)]
struct Group {
    threads: HashSet<Pid>,
    vps: VpsId,
}

/// The tracer's state: which tasks it follows, in which processes, and the new tasks whose creator
/// has not reported them yet.
///
/// The ordering problems it solves:
/// - a new child's first stop (`PTRACE_EVENT_STOP`) can be reported before its creator's fork
///   event: the child is then kept stopped (no [`Action`] for it) until the creator's event says
///   whose it is;
/// - the creator's event can be lost for good when the creator is killed (SIGKILL) between the
///   fork and its event stop: when a followed process dies, the children still waiting are
///   resolved from `/proc/CHILD/stat` (their real parent) instead;
/// - a child can be killed before its first stop and be reaped before its creator's event: its
///   exit is remembered (a bounded list) and reported after the `Fork` once the event arrives.
#[derive(Default, Debug)]
pub struct Tracer {
    tasks: HashMap<Pid, Task>,
    groups: HashMap<Pid, Group>,
    /// New tasks stopped before their creator's event: tid -> the resume their first stop needs.
    early: HashMap<Pid, Resume>,
    /// Exits of tasks we did not know (yet), newest last.
    early_exit: VecDeque<(Pid, ExitStatus)>,
    /// Children reported from /proc (see `resolve_orphans`) whose creator's event may still
    /// come: tid -> (start time, the process taken as creator).
    resolved: HashMap<Pid, (StartTime, Pid)>,
    /// Counters, for [`Tracer::counters`].
    counters: Counters,
}

/// What the decoder has seen so far (diagnostics, tests).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Wait statuses handled.
    pub statuses: u64,
    /// New tasks whose first stop came before their creator's event (held until it came).
    pub held: u64,
    /// New tasks resolved from `/proc` because their creator died without reporting them.
    pub orphans: u64,
    /// New tasks described without reading `/proc` (from the creator's registers and the clock;
    /// counted by the live backend, see `source::ProcProbe`).
    pub new_without_proc: u64,
    /// New tasks described from `/proc/CHILD/stat` (counted by the live backend).
    pub new_from_proc: u64,
}

fn first_stop_resume(status: Status) -> Resume {
    match status {
        Status::GroupStop(_) => Resume::Listen,
        _ => Resume::Cont(0),
    }
}

impl Tracer {
    /// An empty tracer.
    pub fn new() -> Tracer {
        Tracer::default()
    }

    /// Records `root`, just seized, as the first process of `vps`.
    pub fn add_root(&mut self, root: Pid, vps: VpsId) {
        self.tasks.insert(root, Task { tgid: root });
        let mut threads = HashSet::new();
        threads.insert(root);
        self.groups.insert(root, Group { threads, vps });
    }

    /// Follows one more thread `tid` of the followed process `tgid` (a process that already had
    /// threads when it was watched). Returns false when `tgid` is not followed.
    pub fn add_thread(&mut self, tgid: Pid, tid: Pid) -> bool {
        let Some(g) = self.groups.get_mut(&tgid) else { return false };
        g.threads.insert(tid);
        self.tasks.insert(tid, Task { tgid });
        true
    }

    /// Whether `tid` is followed.
    pub fn knows(&self, tid: Pid) -> bool {
        self.tasks.contains_key(&tid)
    }

    /// Whether nothing is followed and no new task is waiting: the tracer may stop waiting.
    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty() && self.early.is_empty()
    }

    /// How many tasks (threads) are followed.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The VPS a followed process belongs to.
    pub fn vps_of(&self, tgid: Pid) -> Option<VpsId> {
        self.groups.get(&tgid).map(|g| g.vps)
    }

    /// Forgets every task (after `ECHILD`: nothing is traced any more); keeps the counters.
    pub fn clear(&mut self) {
        *self = Tracer { counters: self.counters, ..Tracer::default() };
    }

    /// What has been seen so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Handles one wait status of task `tid`: appends the events to emit to `events` and the
    /// requests to make to `actions`. The caller queues the events *before* making the requests,
    /// so that a new child is reported before it runs.
    ///
    /// `event_msg` is the `PTRACE_GETEVENTMSG` value when [`needs_event_msg`] is true. `cpu_ns` is
    /// the CPU time in the `struct rusage` that `wait4` filled with `status` (`ru_utime + ru_stime`
    /// in nanoseconds), `None` when there is none. For the reap of a thread-group leader whose
    /// group is dead, the kernel fills it with `getrusage(leader, RUSAGE_BOTH)` before releasing
    /// the leader (`wait_task_zombie`, tracer or real parent alike): the user + system time of
    /// every thread of the process plus that of the children it has waited for. That figure is
    /// reported with the process's `Exit` in [`Event::exit_cpu_ns`]; any other is ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        tid: Pid,
        status: i32,
        event_msg: Option<u64>,
        cpu_ns: Option<u64>,
        probe: &mut dyn Probe,
        events: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        self.counters.statuses += 1;
        let st = classify(status);
        if let Status::Exited(exit) = st {
            self.on_exit(tid, exit, cpu_ns, probe, events, actions);
            return;
        }
        if st == Status::Other {
            return;
        }
        let Some(task) = self.tasks.get(&tid).copied() else {
            self.on_unknown_stop(tid, st, event_msg, events, actions);
            return;
        };
        let resume = match st {
            Status::Signal(sig) => Resume::Cont(sig),
            Status::GroupStop(_) => Resume::Listen,
            Status::TrapStop => Resume::Cont(0),
            Status::Event(EVENT_FORK | EVENT_VFORK | EVENT_CLONE) => {
                if let Some(child) = event_msg.and_then(|m| Pid::new(m as i32)) {
                    let clone = st == Status::Event(EVENT_CLONE);
                    self.on_new_task(tid, task.tgid, child, clone, probe, events, actions);
                }
                Resume::Cont(0)
            }
            Status::Event(EVENT_EXEC) => {
                let former = event_msg.and_then(|m| Pid::new(m as i32)).unwrap_or(tid);
                self.on_exec(tid, former, task.tgid, events);
                Resume::Cont(0)
            }
            // EVENT_EXIT, EVENT_VFORK_DONE, anything newer: nothing to report.
            _ => Resume::Cont(0),
        };
        actions.push(Action { tid, resume });
    }

    fn on_unknown_stop(
        &mut self,
        tid: Pid,
        st: Status,
        event_msg: Option<u64>,
        events: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        match st {
            // The first stop of an auto-attached child whose creator has not reported it: hold it.
            Status::TrapStop | Status::GroupStop(_) => {
                self.counters.held += 1;
                self.early.insert(tid, first_stop_resume(st));
            }
            // An exec whose former thread we know: the reported tid is the (new) leader.
            Status::Event(EVENT_EXEC) => {
                let former = event_msg.and_then(|m| Pid::new(m as i32));
                if let Some(t) = former.and_then(|f| self.tasks.get(&f).copied()) {
                    self.tasks.insert(tid, Task { tgid: t.tgid });
                    if let Some(g) = self.groups.get_mut(&t.tgid) {
                        g.threads.insert(tid);
                    }
                    self.on_exec(tid, former.unwrap_or(tid), t.tgid, events);
                }
                // Ours or not, restart it.
                actions.push(Action { tid, resume: Resume::Cont(0) });
            }
            // Not ours to judge: restart it as an untraced task would go on.
            Status::Signal(sig) => actions.push(Action { tid, resume: Resume::Cont(sig) }),
            _ => actions.push(Action { tid, resume: Resume::Cont(0) }),
        }
    }

    /// A creator (thread `creator` of process `creator_tgid`) reported a new task `child`;
    /// `clone`: by a `PTRACE_EVENT_CLONE` stop (a thread, or a process with a non-SIGCHLD exit
    /// signal).
    #[allow(clippy::too_many_arguments)]
    fn on_new_task(
        &mut self,
        creator: Pid,
        creator_tgid: Pid,
        child: Pid,
        clone: bool,
        probe: &mut dyn Probe,
        events: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        if let Some((start, _)) = self.resolved.remove(&child) {
            // The late event of a child resolved from /proc: reported already, and it may have
            // run and exited meanwhile. Unless the tid now belongs to another process.
            if self.tasks.contains_key(&child) {
                return;
            }
            match probe.stat(child) {
                Some(s) if s.start != start && !s.is_dead() => {}
                _ => return,
            }
        }
        if self.tasks.contains_key(&child) {
            return;
        }
        if let Some(resume) = self.early.remove(&child) {
            // Stopped, so alive.
            let stat = probe.new_task(creator, creator_tgid, child);
            self.report_fork(creator_tgid, child, stat, events);
            actions.push(Action { tid: child, resume });
            return;
        }
        // An exit of this tid was seen: ask /proc whether that was this child.
        let stat = if self.early_exit.iter().any(|(t, _)| *t == child) {
            probe.stat(child)
        } else {
            probe.new_task(creator, creator_tgid, child)
        };
        // Gone, or a zombie left for its real parent after we reaped it.
        let dead = stat.map_or(true, |s| s.is_dead());
        if let Some(i) = self.early_exit.iter().rposition(|(t, _)| *t == child) {
            let (_, exit) = self.early_exit.remove(i).expect("index from rposition");
            if dead {
                // Killed before its first stop and reaped already: report its birth and death.
                self.report_dead_child(creator_tgid, child, clone, stat, Some(exit), events);
                return;
            }
            // A stale entry (the tid was reused by this child): go on.
        }
        if dead && stat.is_some() {
            // Reaped by us with its exit no longer remembered: birth and death, status unknown.
            self.report_dead_child(creator_tgid, child, clone, stat, None, events);
            return;
        }
        // The child has not stopped yet; it will before it runs its first instruction.
        self.report_fork(creator_tgid, child, stat, events);
    }

    /// Reports a child that is dead already. Without a /proc entry, a clone event is taken for a
    /// thread (what clone events nearly always are), a fork or vfork event for a process.
    fn report_dead_child(
        &mut self,
        creator_tgid: Pid,
        child: Pid,
        clone: bool,
        stat: Option<TaskStat>,
        exit: Option<ExitStatus>,
        events: &mut Vec<Event>,
    ) {
        let thread = stat.map_or(clone, |s| s.num_threads > 1);
        let (parent, child_tgid) = if thread {
            (creator_tgid, creator_tgid)
        } else {
            (stat.and_then(|s| Pid::new(s.ppid)).unwrap_or(creator_tgid), child)
        };
        let vps = self.vps_of(creator_tgid);
        let mut fork = Event::new(EventKind::Fork {
            parent,
            child: child_tgid,
            child_thread: child,
            thread,
            child_start: stat.map(|s| s.start),
        });
        fork.tag = vps;
        let mut exit =
            Event::new(EventKind::Exit { pid: child_tgid, thread: child, status: exit, group_dead: Some(!thread) });
        exit.tag = vps;
        events.push(fork);
        events.push(exit);
    }

    /// Records `child` and emits its `Fork`. `stat` decides thread vs process: a new process has
    /// exactly one thread until it runs, a new thread shares a group of two or more.
    fn report_fork(&mut self, creator_tgid: Pid, child: Pid, stat: Option<TaskStat>, events: &mut Vec<Event>) {
        let thread = stat.is_some_and(|s| s.num_threads > 1);
        let vps = self.groups.get(&creator_tgid).map(|g| g.vps);
        let (parent, child_tgid) = if thread {
            (creator_tgid, creator_tgid)
        } else {
            // The real parent as the kernel records it (the creator's parent for CLONE_PARENT).
            let parent = stat.and_then(|s| Pid::new(s.ppid)).unwrap_or(creator_tgid);
            (parent, child)
        };
        self.tasks.insert(child, Task { tgid: child_tgid });
        if thread {
            if let Some(g) = self.groups.get_mut(&creator_tgid) {
                g.threads.insert(child);
            }
        } else {
            let mut threads = HashSet::new();
            threads.insert(child);
            self.groups.insert(child, Group { threads, vps: vps.unwrap_or(VpsId(0)) });
        }
        let mut ev = Event::new(EventKind::Fork {
            parent,
            child: child_tgid,
            child_thread: child,
            thread,
            child_start: stat.map(|s| s.start),
        });
        ev.tag = vps;
        events.push(ev);
    }

    fn on_exec(&mut self, tid: Pid, former: Pid, tgid: Pid, events: &mut Vec<Event>) {
        if former != tid {
            // The execing thread took the leader's id; the old leader vanished without a report.
            self.tasks.remove(&former);
            if let Some(g) = self.groups.get_mut(&tgid) {
                g.threads.remove(&former);
                g.threads.insert(tid);
            }
            self.tasks.insert(tid, Task { tgid });
        }
        let mut ev = Event::new(EventKind::Exec { pid: tgid, thread: former });
        ev.tag = self.vps_of(tgid);
        events.push(ev);
    }

    fn on_exit(
        &mut self,
        tid: Pid,
        exit: ExitStatus,
        cpu_ns: Option<u64>,
        probe: &mut dyn Probe,
        events: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        let Some(task) = self.tasks.remove(&tid) else {
            // Not followed (yet): a new task killed before its creator reported it, or a plain
            // child of this process (a root's second reap, as its real parent).
            self.early.remove(&tid);
            if self.early_exit.len() >= EARLY_EXIT_CAP {
                self.early_exit.pop_front();
            }
            self.early_exit.push_back((tid, exit));
            return;
        };
        let mut group_dead = true;
        let mut vps = None;
        if let Some(g) = self.groups.get_mut(&task.tgid) {
            g.threads.remove(&tid);
            group_dead = g.threads.is_empty();
            vps = Some(g.vps);
        }
        // The kernel reaps a leader only once the rest of its group is released, so the leader's
        // rusage then covers every thread. A non-leader's is the group's so far: not final.
        let exit_cpu_ns = cpu_ns.filter(|_| group_dead && tid == task.tgid);
        if group_dead {
            // A dead creator reports nothing any more.
            if !self.resolved.is_empty() {
                self.resolved.retain(|_, (_, creator)| *creator != task.tgid);
            }
            if !self.early.is_empty() {
                // Before the Exit, so that the dead parent is still known to the consumer.
                self.resolve_orphans(task.tgid, probe, events, actions);
            }
            self.groups.remove(&task.tgid);
        }
        let mut ev = Event::new(EventKind::Exit {
            pid: task.tgid,
            thread: tid,
            status: Some(exit),
            group_dead: Some(group_dead),
        });
        ev.tag = vps;
        ev.exit_cpu_ns = exit_cpu_ns;
        events.push(ev);
    }

    /// Process `dead` is gone: new tasks still waiting for their creator's event may never get
    /// one (a creator killed between its fork and its event stop). Report them from `/proc`.
    /// For a child whose creator is merely slow the answer is the same as the event's, and the
    /// event, when it comes, finds the child known and adds nothing. A child already reparented
    /// away (its real parent is no longer followed) is reported as a child of `dead`, the best
    /// creator known.
    fn resolve_orphans(
        &mut self,
        dead: Pid,
        probe: &mut dyn Probe,
        events: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        let waiting: Vec<(Pid, Resume)> = self.early.iter().map(|(t, r)| (*t, *r)).collect();
        for (child, resume) in waiting {
            let Some(stat) = probe.stat(child) else { continue };
            let creator = if stat.num_threads > 1 {
                match probe.tgid(child) {
                    Some(tgid) if self.groups.contains_key(&tgid) => {
                        self.report_fork(tgid, child, Some(stat), events);
                        tgid
                    }
                    // Not a thread of a followed process: leave it to its creator's event.
                    _ => continue,
                }
            } else {
                let parent = Pid::new(stat.ppid).filter(|p| self.groups.contains_key(p)).unwrap_or(dead);
                self.report_fork(parent, child, Some(TaskStat { ppid: parent.as_raw(), ..stat }), events);
                parent
            };
            if creator != dead {
                // Its creator may only be slow: remember it, so that the late event adds nothing.
                self.resolved.insert(child, (stat.start, creator));
            }
            self.early.remove(&child);
            self.counters.orphans += 1;
            actions.push(Action { tid: child, resume });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: i32 = 100;

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    fn stopped(sig: i32, event: i32) -> i32 {
        (event << 16) | (sig << 8) | 0x7f
    }

    fn exited(code: i32) -> i32 {
        code << 8
    }

    #[derive(Default)]
    struct FakeProc {
        /// tid -> (ppid, num_threads, start, tgid)
        tasks: HashMap<i32, (i32, i64, u64, i32)>,
        zombies: HashSet<i32>,
        /// What `new_task` answers without /proc, by child.
        described: HashMap<i32, TaskStat>,
        /// `new_task` calls: (creator, creator_tgid, child).
        new_task_calls: Vec<(i32, i32, i32)>,
    }

    impl FakeProc {
        fn add(&mut self, tid: i32, ppid: i32, threads: i64, tgid: i32) {
            self.tasks.insert(tid, (ppid, threads, 1000 + tid as u64, tgid));
        }
    }

    impl Probe for FakeProc {
        fn stat(&mut self, tid: Pid) -> Option<TaskStat> {
            let state = if self.zombies.contains(&tid.as_raw()) { 'Z' } else { 'S' };
            self.tasks.get(&tid.as_raw()).map(|&(ppid, num_threads, start, _)| TaskStat {
                state,
                ppid,
                num_threads,
                start: StartTime(start),
            })
        }
        fn tgid(&mut self, tid: Pid) -> Option<Pid> {
            self.tasks.get(&tid.as_raw()).and_then(|t| Pid::new(t.3))
        }
        fn new_task(&mut self, creator: Pid, creator_tgid: Pid, child: Pid) -> Option<TaskStat> {
            self.new_task_calls.push((creator.as_raw(), creator_tgid.as_raw(), child.as_raw()));
            match self.described.get(&child.as_raw()) {
                Some(s) => Some(*s),
                None => self.stat(child),
            }
        }
    }

    struct Harness {
        t: Tracer,
        p: FakeProc,
    }

    impl Harness {
        fn new() -> Harness {
            let mut t = Tracer::new();
            t.add_root(pid(ROOT), VpsId(7));
            let mut p = FakeProc::default();
            p.add(ROOT, 1, 1, ROOT);
            Harness { t, p }
        }

        fn step(&mut self, tid: i32, status: i32, msg: Option<u64>) -> (Vec<Event>, Vec<Action>) {
            self.step_with_cpu(tid, status, msg, None)
        }

        /// As `step`, with the CPU figure of `wait4`'s rusage.
        fn step_with_cpu(
            &mut self,
            tid: i32,
            status: i32,
            msg: Option<u64>,
            cpu: Option<u64>,
        ) -> (Vec<Event>, Vec<Action>) {
            let (mut ev, mut ac) = (Vec::new(), Vec::new());
            self.t.step(pid(tid), status, msg, cpu, &mut self.p, &mut ev, &mut ac);
            (ev, ac)
        }
    }

    fn cont(tid: i32, sig: i32) -> Action {
        Action { tid: pid(tid), resume: Resume::Cont(sig) }
    }

    fn fork_of(ev: &Event) -> (i32, i32, i32, bool, Option<u64>) {
        match ev.kind {
            EventKind::Fork { parent, child, child_thread, thread, child_start } => {
                (parent.as_raw(), child.as_raw(), child_thread.as_raw(), thread, child_start.map(|s| s.0))
            }
            k => panic!("not a fork: {k:?}"),
        }
    }

    fn exit_of(ev: &Event) -> (i32, i32, Option<ExitStatus>, Option<bool>) {
        match ev.kind {
            EventKind::Exit { pid, thread, status, group_dead } => (pid.as_raw(), thread.as_raw(), status, group_dead),
            k => panic!("not an exit: {k:?}"),
        }
    }

    #[test]
    fn classify_statuses() {
        assert_eq!(classify(exited(3)), Status::Exited(ExitStatus::Exited(3)));
        assert_eq!(classify(9), Status::Exited(ExitStatus::Signaled { signal: 9, core_dumped: false }));
        assert_eq!(classify(stopped(10, 0)), Status::Signal(10));
        // A real-time signal (nix would give EINVAL here).
        assert_eq!(classify(stopped(35, 0)), Status::Signal(35));
        assert_eq!(classify(stopped(SIGSTOP, EVENT_STOP)), Status::GroupStop(SIGSTOP));
        assert_eq!(classify(stopped(SIGTTOU, EVENT_STOP)), Status::GroupStop(SIGTTOU));
        assert_eq!(classify(stopped(SIGTRAP, EVENT_STOP)), Status::TrapStop);
        assert_eq!(classify(stopped(SIGTRAP, EVENT_FORK)), Status::Event(EVENT_FORK));
        assert_eq!(classify(0xffff), Status::Other);
        assert!(needs_event_msg(stopped(SIGTRAP, EVENT_CLONE)));
        assert!(needs_event_msg(stopped(SIGTRAP, EVENT_EXEC)));
        assert!(!needs_event_msg(stopped(SIGTRAP, EVENT_EXIT)));
        assert!(!needs_event_msg(stopped(SIGCHLD_NUM, 0)));
    }

    const SIGCHLD_NUM: i32 = 17;

    #[test]
    fn signals_are_reinjected_unchanged() {
        let mut h = Harness::new();
        for sig in [SIGCHLD_NUM, 10, 12, 35, 64, SIGSTOP, SIGTRAP] {
            let (ev, ac) = h.step(ROOT, stopped(sig, 0), None);
            assert!(ev.is_empty());
            assert_eq!(ac, vec![cont(ROOT, sig)]);
        }
    }

    #[test]
    fn group_stop_listens_and_trap_continues() {
        let mut h = Harness::new();
        let (ev, ac) = h.step(ROOT, stopped(SIGTSTP, EVENT_STOP), None);
        assert!(ev.is_empty());
        assert_eq!(ac, vec![Action { tid: pid(ROOT), resume: Resume::Listen }]);
        // SIGCONT ended the group-stop: the listening tracee re-traps with SIGTRAP.
        let (_, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_STOP), None);
        assert_eq!(ac, vec![cont(ROOT, 0)]);
    }

    #[test]
    fn fork_then_child_stop() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(ev.len(), 1);
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(1101)));
        assert_eq!(ev[0].tag, Some(VpsId(7)));
        assert_eq!(ac, vec![cont(ROOT, 0)]);
        let (ev, ac) = h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        assert!(ev.is_empty());
        assert_eq!(ac, vec![cont(101, 0)]);
        let (ev, _) = h.step(101, exited(3), None);
        assert_eq!(exit_of(&ev[0]), (101, 101, Some(ExitStatus::Exited(3)), Some(true)));
    }

    #[test]
    fn child_stop_before_parent_event_is_held() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        let (ev, ac) = h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        assert!(ev.is_empty());
        assert!(ac.is_empty(), "the child must stay stopped until its parent is known");
        assert_eq!(h.t.counters().held, 1);
        assert!(!h.t.is_idle());
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_VFORK), Some(101));
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(1101)));
        assert_eq!(ac, vec![cont(101, 0), cont(ROOT, 0)]);
    }

    #[test]
    fn early_child_in_group_stop_is_listened() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(101, stopped(SIGSTOP, EVENT_STOP), None);
        let (_, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(ac[0], Action { tid: pid(101), resume: Resume::Listen });
    }

    #[test]
    fn clone_parent_reports_the_kernel_parent() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        // 101 calls clone(CLONE_PARENT): 102's real parent is ROOT.
        h.p.add(102, ROOT, 1, 102);
        let (ev, _) = h.step(101, stopped(SIGTRAP, EVENT_CLONE), Some(102));
        assert_eq!(fork_of(&ev[0]), (ROOT, 102, 102, false, Some(1102)));
    }

    #[test]
    fn threads_and_group_dead() {
        let mut h = Harness::new();
        h.p.add(101, 1, 2, ROOT);
        let (ev, _) = h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(101));
        assert_eq!(fork_of(&ev[0]), (ROOT, ROOT, 101, true, Some(1101)));
        h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        // A thread exit stop, then its reap.
        let (ev, ac) = h.step(101, stopped(SIGTRAP, EVENT_EXIT), None);
        assert!(ev.is_empty());
        assert_eq!(ac, vec![cont(101, 0)]);
        let (ev, _) = h.step(101, exited(0), None);
        assert_eq!(exit_of(&ev[0]), (ROOT, 101, Some(ExitStatus::Exited(0)), Some(false)));
        let (ev, _) = h.step(ROOT, exited(0), None);
        assert_eq!(exit_of(&ev[0]), (ROOT, ROOT, Some(ExitStatus::Exited(0)), Some(true)));
        assert!(h.t.is_idle());
    }

    #[test]
    fn exec_from_a_thread() {
        let mut h = Harness::new();
        h.p.add(101, 1, 2, ROOT);
        h.p.add(102, 1, 3, ROOT);
        h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(101));
        h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(102));
        // 101 execs: it is reported as ROOT, the former tid comes from GETEVENTMSG.
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_EXEC), Some(101));
        assert_eq!(ev[0].kind, EventKind::Exec { pid: pid(ROOT), thread: pid(101) });
        assert_eq!(ac, vec![cont(ROOT, 0)]);
        assert!(!h.t.knows(pid(101)));
        // The other thread dies as if by _exit(0).
        let (ev, _) = h.step(102, exited(0), None);
        assert_eq!(exit_of(&ev[0]), (ROOT, 102, Some(ExitStatus::Exited(0)), Some(false)));
        let (ev, _) = h.step(ROOT, exited(4), None);
        assert_eq!(exit_of(&ev[0]), (ROOT, ROOT, Some(ExitStatus::Exited(4)), Some(true)));
        assert!(h.t.is_idle());
    }

    #[test]
    fn child_killed_before_its_first_stop() {
        let mut h = Harness::new();
        // Killed and reaped before the parent's event.
        let (ev, ac) = h.step(101, 9, None);
        assert!(ev.is_empty() && ac.is_empty());
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, None));
        assert_eq!(
            exit_of(&ev[1]),
            (101, 101, Some(ExitStatus::Signaled { signal: 9, core_dumped: false }), Some(true))
        );
        assert_eq!(ac, vec![cont(ROOT, 0)]);
        assert!(!h.t.knows(pid(101)));
    }

    #[test]
    fn thread_killed_before_its_first_stop() {
        let mut h = Harness::new();
        h.step(101, 9, None);
        let (ev, _) = h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(101));
        assert_eq!(fork_of(&ev[0]), (ROOT, ROOT, 101, true, None));
        assert_eq!(exit_of(&ev[1]).3, Some(false));
        // The process itself lives on.
        let (ev, _) = h.step(ROOT, exited(0), None);
        assert_eq!(exit_of(&ev[0]).3, Some(true));
    }

    #[test]
    fn stale_early_exit_is_ignored_when_the_tid_lives() {
        let mut h = Harness::new();
        h.step(101, exited(0), None); // some unrelated reap of a plain child 101
        h.p.add(101, ROOT, 1, 101); // 101 reused by a new child of ROOT
        let (ev, _) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(ev.len(), 1);
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(1101)));
        assert!(h.t.knows(pid(101)));
    }

    #[test]
    fn orphan_resolved_when_its_creator_dies_without_event() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        // 101 forks 102 and is SIGKILLed before its event stop: only 102's first stop comes.
        h.p.add(102, 101, 1, 102);
        let (ev, ac) = h.step(102, stopped(SIGTRAP, EVENT_STOP), None);
        assert!(ev.is_empty() && ac.is_empty());
        let (ev, ac) = h.step(101, 9, None);
        assert_eq!(ev.len(), 2);
        // The orphan's Fork comes first, while its parent is still known.
        assert_eq!(fork_of(&ev[0]), (101, 102, 102, false, Some(1102)));
        assert_eq!(exit_of(&ev[1]).3, Some(true));
        assert_eq!(ac, vec![cont(102, 0)]);
        assert!(h.t.knows(pid(102)));
        assert_eq!(h.t.counters().orphans, 1);
        // The lost event never comes; if a late one did, it would add nothing.
    }

    #[test]
    fn orphan_reparented_to_init_is_still_reported() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        h.p.add(102, 1, 1, 102);
        h.step(102, stopped(SIGTRAP, EVENT_STOP), None);
        let (ev, ac) = h.step(101, 9, None);
        // Its real parent (init) is not followed: the dead process is the best creator known.
        assert_eq!(fork_of(&ev[0]), (101, 102, 102, false, Some(1102)));
        assert_eq!(ev[0].tag, Some(VpsId(7)));
        assert_eq!(exit_of(&ev[1]).0, 101);
        assert_eq!(ac, vec![cont(102, 0)]);
    }

    #[test]
    fn late_event_after_orphan_resolution_adds_nothing() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        // ROOT forks 102; 102 stops first; 101 dies meanwhile and 102 is resolved from /proc.
        h.p.add(102, ROOT, 1, 102);
        h.step(102, stopped(SIGTRAP, EVENT_STOP), None);
        let (ev, _) = h.step(101, exited(0), None);
        assert_eq!(fork_of(&ev[0]), (ROOT, 102, 102, false, Some(1102)));
        // 102 runs and exits; it stays a zombie for its real parent, ROOT.
        h.step(102, exited(0), None);
        h.p.zombies.insert(102);
        // ROOT's fork event, late: nothing more.
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(102));
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(ac, vec![cont(ROOT, 0)]);
        assert!(!h.t.knows(pid(102)));
    }

    #[test]
    fn early_exit_left_as_zombie_is_genuine() {
        let mut h = Harness::new();
        // 101 killed before its first stop, reaped by us, left a zombie for ROOT.
        h.step(101, 9, None);
        h.p.add(101, ROOT, 1, 101);
        h.p.zombies.insert(101);
        let (ev, _) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(1101)));
        assert_eq!(exit_of(&ev[1]).2, Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
        assert!(!h.t.knows(pid(101)));
    }

    #[test]
    fn new_child_is_described_by_the_probe_from_its_creator() {
        let mut h = Harness::new();
        // A second thread of ROOT forks: no /proc read needed.
        h.t.add_thread(pid(ROOT), pid(150));
        let described = TaskStat { state: 't', ppid: ROOT, num_threads: 1, start: StartTime(55) };
        h.p.described.insert(101, described);
        let (ev, ac) = h.step(150, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert_eq!(h.p.new_task_calls, vec![(150, ROOT, 101)]);
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(55)));
        assert_eq!(ac, vec![cont(150, 0)]);
        // A thread, described the same way; its first stop came first (held).
        h.p.described.insert(102, TaskStat { num_threads: 2, start: StartTime(56), ..described });
        h.step(102, stopped(SIGTRAP, EVENT_STOP), None);
        let (ev, ac) = h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(102));
        assert_eq!(fork_of(&ev[0]), (ROOT, ROOT, 102, true, Some(56)));
        assert_eq!(ac, vec![cont(102, 0), cont(ROOT, 0)]);
    }

    #[test]
    fn a_seen_exit_of_the_tid_sends_the_decoder_to_proc() {
        let mut h = Harness::new();
        // 101 killed before its first stop and reaped; the probe would call it alive.
        h.step(101, 9, None);
        h.p.described.insert(101, TaskStat { state: 't', ppid: ROOT, num_threads: 1, start: StartTime(55) });
        h.p.add(101, ROOT, 1, 101);
        h.p.zombies.insert(101);
        let (ev, _) = h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        assert!(h.p.new_task_calls.is_empty());
        assert_eq!(fork_of(&ev[0]), (ROOT, 101, 101, false, Some(1101)));
        assert_eq!(exit_of(&ev[1]).2, Some(ExitStatus::Signaled { signal: 9, core_dumped: false }));
    }

    #[test]
    fn unknown_signal_stop_is_resumed_unchanged() {
        let mut h = Harness::new();
        let (ev, ac) = h.step(555, stopped(10, 0), None);
        assert!(ev.is_empty());
        assert_eq!(ac, vec![cont(555, 10)]);
    }

    #[test]
    fn start_time_from_the_clock_only_within_one_tick() {
        let tick = 10_000_000;
        assert_eq!(start_between(1_230_000_001, 1_239_999_999, tick), Some(StartTime(123)));
        assert_eq!(start_between(1_230_000_000, 1_230_000_000, tick), Some(StartTime(123)));
        // Across a tick boundary, with no lower bound, no tick, or bounds the wrong way round.
        assert_eq!(start_between(1_239_999_999, 1_240_000_000, tick), None);
        assert_eq!(start_between(0, 5, tick), None);
        assert_eq!(start_between(1_230_000_001, 1_230_000_002, 0), None);
        assert_eq!(start_between(1_230_000_002, 1_230_000_001, tick), None);
    }

    #[test]
    fn stat_with_odd_command_name() {
        let line = "1234 (a) b (c)) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000 100 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.ppid, 77);
        assert_eq!(s.num_threads, 3);
        assert_eq!(s.start, StartTime(98765));
        assert_eq!(parse_state(line), Some('S'));
    }

    fn exit_cpu_of(ev: &Event) -> Option<u64> {
        assert!(matches!(ev.kind, EventKind::Exit { .. }), "not an exit: {ev:?}");
        ev.exit_cpu_ns
    }

    #[test]
    fn a_process_exit_carries_the_cpu_of_its_leaders_reap() {
        let mut h = Harness::new();
        h.p.add(101, ROOT, 1, 101);
        h.step(ROOT, stopped(SIGTRAP, EVENT_FORK), Some(101));
        h.step(101, stopped(SIGTRAP, EVENT_STOP), None);
        // The exit stop reads nothing and reports nothing.
        let (ev, ac) = h.step_with_cpu(101, stopped(SIGTRAP, EVENT_EXIT), None, Some(5));
        assert!(ev.is_empty());
        assert_eq!(ac, vec![cont(101, 0)]);
        let (ev, _) = h.step_with_cpu(101, exited(0), None, Some(300_000_000));
        assert_eq!(exit_of(&ev[0]), (101, 101, Some(ExitStatus::Exited(0)), Some(true)));
        assert_eq!(exit_cpu_of(&ev[0]), Some(300_000_000));
        // Without an exit stop (a second SIGKILL pending, or exit stops off) all the same.
        let (ev, _) = h.step_with_cpu(ROOT, 9, None, Some(700_000_000));
        assert_eq!(exit_of(&ev[0]).3, Some(true));
        assert_eq!(exit_cpu_of(&ev[0]), Some(700_000_000));
    }

    #[test]
    fn an_exit_without_a_rusage_figure_carries_none() {
        let mut h = Harness::new();
        let (ev, _) = h.step(ROOT, 9, None);
        assert_eq!(exit_of(&ev[0]).3, Some(true));
        assert_eq!(exit_cpu_of(&ev[0]), None);
    }

    #[test]
    fn only_the_leaders_reap_of_a_dead_group_carries_the_figure() {
        let mut h = Harness::new();
        h.p.add(101, 1, 2, ROOT);
        h.p.add(102, 1, 3, ROOT);
        h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(101));
        h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(102));
        // A thread ends while the others live on: its rusage (the group's so far) is not final.
        let (ev, _) = h.step_with_cpu(101, exited(0), None, Some(100));
        assert_eq!((exit_of(&ev[0]).3, exit_cpu_of(&ev[0])), (Some(false), None));
        let (ev, _) = h.step_with_cpu(102, exited(0), None, Some(200));
        assert_eq!((exit_of(&ev[0]).3, exit_cpu_of(&ev[0])), (Some(false), None), "a thread's exit");
        let (ev, _) = h.step_with_cpu(ROOT, exited(0), None, Some(900));
        assert_eq!((exit_of(&ev[0]).3, exit_cpu_of(&ev[0])), (Some(true), Some(900)));
    }

    #[test]
    fn a_dead_group_whose_last_reap_is_not_its_leader_carries_no_figure() {
        // Only a thread of an already-running process is followed (the leader is not ours).
        let mut t = Tracer::new();
        t.add_root(pid(ROOT), VpsId(7));
        assert!(t.add_thread(pid(ROOT), pid(101)));
        let mut p = FakeProc::default();
        let (mut ev, mut ac) = (Vec::new(), Vec::new());
        t.step(pid(ROOT), exited(0), None, Some(50), &mut p, &mut ev, &mut ac);
        assert_eq!(exit_cpu_of(&ev[0]), None, "the leader goes first: the group lives on");
        ev.clear();
        t.step(pid(101), exited(0), None, Some(60), &mut p, &mut ev, &mut ac);
        assert_eq!(exit_of(&ev[0]).3, Some(true));
        assert_eq!(exit_cpu_of(&ev[0]), None, "a thread's rusage is not the process's final figure");
    }

    #[test]
    fn after_an_exec_from_a_thread_the_new_leaders_reap_carries_the_figure() {
        let mut h = Harness::new();
        h.p.add(101, 1, 2, ROOT);
        h.step(ROOT, stopped(SIGTRAP, EVENT_CLONE), Some(101));
        // 101 execs: the leader is killed (it stops at its exit), then 101 takes its id.
        h.step(ROOT, stopped(SIGTRAP, EVENT_EXIT), None);
        h.step(ROOT, stopped(SIGTRAP, EVENT_EXEC), Some(101));
        let (ev, _) = h.step_with_cpu(ROOT, exited(0), None, Some(70));
        assert_eq!((exit_of(&ev[0]).3, exit_cpu_of(&ev[0])), (Some(true), Some(70)));
    }
}
