//! [`Ptrace`]: the [`ForkTracker`] impl. A tracer thread runs the loop (requests, `wait4`, the
//! state machine of [`crate::decode`], the ptrace requests of `source.rs`) and queues events for
//! the reader behind an eventfd. Linux only.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vpstag_tracker::{BackendKind, Capabilities, Event, EventKind, ForkTracker, Pid, TrackerError, VpsId};

use crate::decode::{needs_event_msg, Action, Counters, Resume, Tracer};
use crate::source::{self, EventFd, ProcProbe, Waited};
use crate::Config;

/// How often `watch` re-sends the wake-up signal until the tracer thread answers.
const WAKE_RETRY: Duration = Duration::from_millis(5);

enum Request {
    Watch { root: Pid, vps: VpsId, reply: Sender<Result<(), TrackerError>> },
    Stop,
}

struct Inner {
    queue: VecDeque<Event>,
    failed: Option<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    efd: EventFd,
    /// [`Counters`] in field order, stored by the tracer thread whenever it queues events or
    /// goes to sleep.
    counters: [AtomicU64; 5],
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) {
        self.efd.signal();
    }

    fn set_counters(&self, c: Counters) {
        let values = [c.statuses, c.held, c.orphans, c.new_without_proc, c.new_from_proc];
        for (a, v) in self.counters.iter().zip(values) {
            a.store(v, Ordering::Relaxed);
        }
    }

    fn counters(&self) -> Counters {
        let v = |i: usize| self.counters[i].load(Ordering::Relaxed);
        Counters { statuses: v(0), held: v(1), orphans: v(2), new_without_proc: v(3), new_from_proc: v(4) }
    }

    /// Queues `events` (emptying it). The eventfd is written only when the queue was empty
    /// (one write per batch the reader has not taken yet, one wake-up of a sleeping reader),
    /// and after the lock is released, so that the woken reader does not block on it. The
    /// reader may have taken the batch in between: the eventfd is then readable with an empty
    /// queue, and its next read finds nothing, clears it, and waits again.
    fn push(&self, events: &mut Vec<Event>, counters: Counters) {
        self.set_counters(counters);
        if events.is_empty() {
            return;
        }
        let was_empty = {
            let mut inner = self.lock();
            let was_empty = inner.queue.is_empty();
            inner.queue.extend(events.drain(..));
            was_empty
        };
        if was_empty {
            self.signal();
        }
    }

    fn fail(&self, msg: String) {
        let mut inner = self.lock();
        inner.failed = Some(msg);
        self.signal();
    }

    /// Moves every queued event to `out` and clears the eventfd, atomically.
    ///
    /// With nothing queued the eventfd is cleared only if `clear_when_empty` (it may be
    /// readable for a moment with an empty queue, see [`Shared::push`]); a caller that polls
    /// next passes `false` and saves the `read`: poll then returns at once and the next drain
    /// clears it.
    fn drain(&self, out: &mut Vec<Event>, clear_when_empty: bool) -> Result<usize, TrackerError> {
        let mut inner = self.lock();
        let n = inner.queue.len();
        out.extend(inner.queue.drain(..));
        if n > 0 || clear_when_empty {
            self.efd.clear();
        }
        if n == 0 {
            if let Some(msg) = &inner.failed {
                // Keep the fd readable so a poll loop comes back to see the error.
                self.signal();
                return Err(TrackerError::io("ptrace tracer thread", io::Error::other(msg.clone())));
            }
        }
        Ok(n)
    }
}

/// The ptrace fork-following backend (see the [crate docs](crate)).
pub struct Ptrace {
    shared: Arc<Shared>,
    requests: Sender<Request>,
    tracer_tid: i32,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Ptrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ptrace").field("tracer_tid", &self.tracer_tid).finish_non_exhaustive()
    }
}

impl Ptrace {
    /// Starts the tracer thread with the default [`Config`]. Follows nothing until
    /// [`watch`](ForkTracker::watch).
    ///
    /// Fails when `SIGCHLD` is ignored in this process, or when the wake-up signal
    /// (`SIGRTMAX-3`) already has a handler.
    pub fn new() -> Result<Ptrace, TrackerError> {
        Ptrace::with_config(Config::default())
    }

    /// Like [`new`](Ptrace::new) with [`Config::exit_stops`] set to `exit_stops`.
    pub fn with_exit_stops(exit_stops: bool) -> Result<Ptrace, TrackerError> {
        Ptrace::with_config(Config::default().exit_stops(exit_stops))
    }

    /// Like [`new`](Ptrace::new), with the options of `config`.
    pub fn with_config(config: Config) -> Result<Ptrace, TrackerError> {
        if let Some(why) = source::sigchld_problem() {
            return Err(TrackerError::Unsupported(why));
        }
        source::install_wake_handler().map_err(TrackerError::Unsupported)?;
        let efd = EventFd::new().map_err(|e| TrackerError::io("eventfd", e))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { queue: VecDeque::new(), failed: None }),
            efd,
            counters: Default::default(),
        });
        let options = source::BASE_OPTIONS
            | if config.exit_stops { source::EXIT_OPTION } else { 0 }
            | if config.kill_on_exit { source::KILL_OPTION } else { 0 };
        let on_panic = if config.kill_on_exit {
            "the tracer thread panicked; every followed process was killed (kill_on_exit)"
        } else {
            "the tracer thread panicked; every followed process was detached and runs on untracked"
        };
        let (tx, rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vpstag-ptrace".into())
            .spawn(move || {
                source::unblock_wake_signal();
                let _ = tid_tx.send(source::gettid());
                let run = std::panic::AssertUnwindSafe(|| tracer_main(&sh, rx, options));
                if std::panic::catch_unwind(run).is_err() {
                    sh.fail(on_panic.into());
                }
            })
            .map_err(|e| TrackerError::io("spawning the ptrace tracer thread", e))?;
        let tracer_tid =
            tid_rx.recv().map_err(|_| TrackerError::io("ptrace tracer thread", io::Error::other("died at start")))?;
        Ok(Ptrace { shared, requests: tx, tracer_tid, thread: Some(thread) })
    }

    /// What the tracer thread has handled so far: wait statuses (each one a tracee stop or
    /// exit), children held until their creator's event, orphans resolved from `/proc`, new
    /// tasks described with and without reading `/proc`.
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// The thread id of the tracer thread (the tracer a tracee's `TracerPid` names).
    pub fn tracer_tid(&self) -> i32 {
        self.tracer_tid
    }
}

/// Ends the tracer thread. The kernel then detaches every followed process (or kills them all,
/// with [`Config::kill_on_exit`]): one in a ptrace stop is restarted, one in a job-control stop
/// stays stopped as it would untraced (`T`) until `SIGCONT`. Returns once the thread is gone,
/// and so every tracee released (at most about a second is spent waiting for that).
impl Drop for Ptrace {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                source::wake(self.tracer_tid);
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
            // `join` returns when the thread has released its memory, a little before the
            // kernel detaches its tracees (in exit_notify); its /proc entry goes after that.
            let task = format!("/proc/self/task/{}", self.tracer_tid);
            let deadline = Instant::now() + Duration::from_secs(1);
            while std::path::Path::new(&task).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl AsFd for Ptrace {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.efd.as_fd()
    }
}

impl ForkTracker for Ptrace {
    fn kind(&self) -> BackendKind {
        crate::KIND
    }

    fn capabilities(&self) -> Capabilities {
        crate::CAPABILITIES
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.efd.as_fd()
    }

    fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
        // Without a wait, leave the fd clear for the caller's own poll loop.
        let n = self.shared.drain(out, timeout == Some(Duration::ZERO))?;
        if n > 0 || timeout == Some(Duration::ZERO) {
            return Ok(n);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(0);
                    }
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            source::poll_in(self.shared.efd.as_fd(), ms)
                .map_err(|e| TrackerError::io("poll on the ptrace event queue", e))?;
            let n = self.shared.drain(out, true)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
        let gone = || TrackerError::io("ptrace tracer thread", io::Error::other("the tracer thread has stopped"));
        let (tx, rx) = mpsc::channel();
        self.requests.send(Request::Watch { root, vps, reply: tx }).map_err(|_| gone())?;
        loop {
            source::wake(self.tracer_tid);
            match rx.recv_timeout(WAKE_RETRY) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }
}

fn seize_root(st: &mut Tracer, root: Pid, vps: VpsId, options: libc::c_int) -> Result<(), TrackerError> {
    if st.knows(root) {
        return Err(TrackerError::io(
            format!("watch({root})"),
            io::Error::new(io::ErrorKind::AlreadyExists, "already followed"),
        ));
    }
    match source::status_field(root, "Tgid:").and_then(|v| v.parse::<i32>().ok()) {
        None => return Err(TrackerError::NoSuchProcess(root)),
        Some(tgid) if tgid != root.as_raw() => {
            return Err(TrackerError::io(
                format!("watch({root})"),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{root} is a thread of process {tgid}, not a process"),
                ),
            ))
        }
        Some(_) => {}
    }
    match source::seize(root, options) {
        Ok(()) => {
            st.add_root(root, vps);
            seize_other_threads(st, root, options);
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(TrackerError::PermissionDenied {
            what: format!("PTRACE_SEIZE of process {root}"),
            hint: source::eperm_hint(root),
            source: e,
        }),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(TrackerError::NoSuchProcess(root)),
        Err(e) => Err(TrackerError::io(format!("PTRACE_SEIZE of process {root}"), e)),
    }
}

/// A process that already has threads when it is watched (the loader or a scan brings it in):
/// seize each of them too, and list again until no new thread appears (a thread created by a
/// thread not yet seized is not auto-attached).
fn seize_other_threads(st: &mut Tracer, root: Pid, options: libc::c_int) {
    for _ in 0..16 {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{root}/task")) else { return };
        let mut new = 0;
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()).and_then(Pid::new) else {
                continue;
            };
            if st.knows(tid) {
                continue;
            }
            // ESRCH: the thread exited meanwhile.
            if source::seize(tid, options).is_ok() && st.add_thread(root, tid) {
                new += 1;
            }
        }
        if new == 0 {
            return;
        }
    }
}

/// The counters of the decoder and of the probe.
fn counts(st: &Tracer, probe: &ProcProbe) -> Counters {
    Counters { new_without_proc: probe.fast, new_from_proc: probe.slow, ..st.counters() }
}

fn apply(probe: &mut ProcProbe, action: Action) {
    let listen = action.resume == Resume::Listen;
    probe.resuming(action.tid, source::boottime_ns().unwrap_or(0), listen);
    let r = match action.resume {
        Resume::Cont(sig) => source::cont(action.tid, sig),
        Resume::Listen => source::listen(action.tid),
    };
    // ESRCH: the tracee was killed meanwhile (SIGKILL ends any stop); its exit is reported
    // by a later wait4. Nothing else can fail for a tracee in a ptrace stop.
    let _ = r;
}

/// At most this many decoded events wait in the tracer thread before they are queued.
const MAX_BATCH: usize = 64;

/// The tracer thread: requests, then `wait4`, forever.
///
/// Decoded events wait in `pending` and are queued in batches: before a new task is resumed
/// (its `Fork` must be readable before it runs), before the thread sleeps in `wait4`, and
/// every [`MAX_BATCH`] events. So a busy tracee is resumed without waiting for the queue, and
/// the reader is woken once per batch, not once per event.
fn tracer_main(shared: &Shared, rx: Receiver<Request>, options: libc::c_int) {
    let mut st = Tracer::new();
    let mut probe = ProcProbe::default();
    let mut pending = Vec::new();
    let mut actions = Vec::new();
    loop {
        loop {
            let req = if st.is_idle() {
                // Nothing to wait for: reap what children are left, then sleep on the channel.
                while let Ok(Some(w)) = source::wait_nohang() {
                    handle(shared, &mut st, &mut probe, w, &mut pending, &mut actions);
                }
                shared.push(&mut pending, counts(&st, &probe));
                if !st.is_idle() {
                    break;
                }
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            match req {
                Request::Stop => return,
                Request::Watch { root, vps, reply } => {
                    let _ = reply.send(seize_root(&mut st, root, vps, options));
                }
            }
        }
        let next = if pending.is_empty() {
            source::wait_any()
        } else {
            match source::wait_nohang() {
                Ok(Some(next)) => Ok(next),
                // About to sleep: queue what was decoded first.
                Ok(None) => {
                    shared.push(&mut pending, counts(&st, &probe));
                    source::wait_any()
                }
                Err(e) => Err(e),
            }
        };
        match next {
            Ok(w) => handle(shared, &mut st, &mut probe, w, &mut pending, &mut actions),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // Nothing left to wait for: whatever we still thought followed is gone.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                shared.push(&mut pending, counts(&st, &probe));
                st.clear();
            }
            Err(e) => {
                shared.push(&mut pending, counts(&st, &probe));
                shared.fail(format!("wait4: {e}"));
                return;
            }
        }
    }
}

/// One wait status: decode it, stamp the new events, make the ptrace requests. A task whose
/// `Fork` is still pending is resumed only after the pending events are queued; `wait4`'s CPU
/// figure goes to the decoder (see [`Tracer::step`]).
fn handle(
    shared: &Shared,
    st: &mut Tracer,
    probe: &mut ProcProbe,
    w: Waited,
    pending: &mut Vec<Event>,
    actions: &mut Vec<Action>,
) {
    let (tid, status) = (w.tid, w.status);
    let now = source::boottime_ns();
    probe.collected(now.unwrap_or(0));
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        probe.forget(tid);
    }
    let msg = if needs_event_msg(status) { source::geteventmsg(tid).ok() } else { None };
    let before = pending.len();
    st.step(tid, status, msg, Some(w.cpu_ns), probe, pending, actions);
    for ev in &mut pending[before..] {
        ev.time_ns = now;
    }
    for a in actions.drain(..) {
        let born = |e: &Event| matches!(e.kind, EventKind::Fork { child_thread, .. } if child_thread == a.tid);
        if pending.iter().any(born) {
            shared.push(pending, counts(st, probe));
        }
        apply(probe, a);
    }
    if pending.len() >= MAX_BATCH {
        shared.push(pending, counts(st, probe));
    }
}
