//! vpstag backend: **ptrace** fork following.
//!
//! [`Ptrace`] follows a VPS's first process (the *root*, see [`ForkTracker::watch`]) and every
//! process and thread descending from it with `ptrace(2)`, and reports each creation, exec and
//! exit as an [`Event`]. It needs no privilege to follow one's own children, works where the
//! proc connector is not available (containers without `CAP_NET_ADMIN`), and is *synchronous*:
//! a new child is reported before it runs its first instruction.
//!
//! # How it works
//!
//! - The root is attached with `PTRACE_SEIZE` and the options `PTRACE_O_TRACEFORK`,
//!   `TRACEVFORK`, `TRACECLONE`, `TRACEEXEC`, and `TRACEEXIT` unless [`Config::exit_stops`] is
//!   off; `EXITKILL` only if [`Config::kill_on_exit`] asks for it. The kernel then attaches every
//!   new task automatically, before it runs. No syscall stops are asked for.
//! - **One tracer thread** (`vpstag-ptrace`) makes every ptrace request, as the kernel requires
//!   (a tracee belongs to the thread that attached it). It sits in
//!   `waitpid(-1, &status, __WALL | __WNOTHREAD)` (its own tracees only, never the children of
//!   the program's other threads), decodes the raw status itself (nix's `waitpid` rejects stops
//!   by real-time signals, nix issues 495 and 1143), asks the pure state machine in [`decode`]
//!   what to report and how to restart the tracee, and restarts it. Events are queued in
//!   batches: always before a new task is resumed, so a new child's `Fork` is queued, and
//!   [`as_fd`](ForkTracker::as_fd) readable, before the child runs; otherwise when the thread is
//!   about to sleep in `waitpid`, or has 64 events waiting.
//! - Waking the tracer thread for [`watch`](ForkTracker::watch): `watch` sends a request on a
//!   channel and signals the tracer thread with `tgkill(SIGRTMAX-3)`, whose handler does nothing
//!   and is installed without `SA_RESTART`, so `waitpid` returns `EINTR` and the thread reads the
//!   channel. A signal that lands between the thread's check of the channel and its entry into
//!   `waitpid` would be lost (there is no `pwaitpid` to unblock it atomically), so `watch` sends
//!   it again every 5 ms until it has its answer: no lost wake-up, a bounded delay in that rare
//!   race. When nothing is followed the thread blocks on the channel instead, with no signal
//!   needed. The handler is installed once per process; [`Ptrace::new`] fails if the program has
//!   its own handler on that signal.
//! - Events go into a queue; an `eventfd` is readable whenever the queue is not empty. It is
//!   written only when a batch lands in an empty queue, so a waiting reader is woken once per
//!   batch, and after the queue's lock is released, so the woken reader does not block on it:
//!   the fd can then be readable for a moment with nothing to read (a read returns no event and
//!   clears it).
//!
//! What a tracee can do, and what this backend does about it:
//! - A new child's first stop can be reported before its creator's fork event: the child is kept
//!   stopped until the event says whose it is. If the creator is killed between its fork and its
//!   event stop, the kernel never reports the event: so whenever a followed process dies while
//!   children are held, they are resolved from `/proc/CHILD/stat` (real parent, thread count,
//!   start time) and resumed. For a creator that is merely slow this gives the same answer as
//!   its event, and the late event, recognised by the child's start time, adds nothing. A child
//!   killed before its first stop and reaped before its creator's event is reported (`Fork`, then
//!   `Exit`) when the event comes.
//! - Signals are re-injected unchanged at their signal-delivery stop (`PTRACE_CONT` with the
//!   same signal keeps the original `siginfo`), so a traced program behaves as untraced.
//! - Group stops (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU) are left in place with `PTRACE_LISTEN`,
//!   so `kill -STOP`/`SIGCONT` and a shell's job control work; the real parent still sees the stop
//!   with `WUNTRACED`. (`ps` shows such a process as `t`, tracing stop, rather than `T`.)
//! - exec from a thread other than the main one: the reported tid is the process id and
//!   `PTRACE_GETEVENTMSG` gives the former tid, reported as the `thread` of [`EventKind::Exec`]; the
//!   old leader vanishes without an exit report, as the kernel does it.
//! - `vfork`, `clone(CLONE_PARENT)` (the parent reported is the real parent, as the kernel
//!   records it), `clone(CLONE_THREAD)` (`thread: true`, the parent is the process).
//! - `ESRCH` from a ptrace request on a tracee killed meanwhile is normal: its exit follows.
//!
//! Events: `Fork` (with `child_start`, the start time of `/proc/CHILD/stat` field 22, known before
//! the child is resumed — it is stopped, or about to stop at its first trap, and unreaped, so the
//! pid cannot have been reused: the start time is the child's identity), `Exec { pid, thread }` and
//! `Exit { pid, thread, status, group_dead }` for every thread, the root included. Events also
//! carry the VPS in [`Event::tag`] as a hint (this backend knows it for free); the core keeps the
//! table, so [`Capabilities::holds_tags`] stays false.
//!
//! Cost per fork: the creator's event stop and the child's first stop, one `PTRACE_GETEVENTMSG`,
//! and on x86-64 one `PTRACE_GETREGS` (the clone flags: thread or process, `CLONE_PARENT`); the
//! start time comes from `CLOCK_BOOTTIME` when the creator's run since its last restart lies
//! within one clock tick, else (and on other architectures, and for `CLONE_PARENT`) from one read
//! of `/proc/CHILD/stat` (see [`source::ProcProbe`]). Per exit: the `PTRACE_EVENT_EXIT` stop
//! (unless disabled) and the parent's SIGCHLD signal-delivery stop, which no ptrace option can
//! avoid. Measurements: `PERFORMANCE.md` and `examples/ptrace_overhead.rs`.
//!
//! # Example
//!
//! ```no_run
//! use vpstag_ptrace::Ptrace;
//! use vpstag_tracker::{EventKind, ForkTracker, Pid, VpsId};
//!
//! # fn main() -> Result<(), vpstag_tracker::TrackerError> {
//! let mut tracker = Ptrace::new()?;
//! # let child = Pid::new(1234).unwrap();
//! // `child`: forked by this process, blocked reading the start gate.
//! tracker.watch(child, VpsId(1))?;
//! // ... open the gate: from now on every descendant is reported before it runs.
//! let mut events = Vec::new();
//! loop {
//!     events.clear();
//!     tracker.read_events(&mut events, None)?;
//!     for ev in &events {
//!         if let EventKind::Exit { pid, group_dead: Some(true), status, .. } = ev.kind {
//!             println!("{pid} ended: {status:?}");
//!         }
//!     }
//! #   break;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Caveats
//!
//! - **It reaps the processes it follows, and only those.** The tracer thread waits with
//!   `waitpid(-1, .., __WALL | __WNOTHREAD)`: a thread then collects only its own tracees (and
//!   the children it forked itself: none), so the program's other children, started with
//!   `std::process::Command` or `fork` from any other thread, are left to their own `waitpid`. A
//!   root the program forked itself is collected by the tracer thread (its exit status comes in
//!   the `Exit` event), so do not wait for it yourself, and never call `waitpid(-1, ..)` without
//!   `__WNOTHREAD` in another thread: the kernel lets any thread of the process collect the
//!   tracer thread's tracees that way. Only one `Ptrace` should follow a given process.
//!   `SIGCHLD` must not be ignored (`SIG_IGN` or `SA_NOCLDWAIT` would let the kernel reap tracees
//!   and lose their status); [`Ptrace::new`] checks it.
//! - **The followed processes outlive the tracker.** When the tracer thread ends — the [`Ptrace`]
//!   is dropped, the process crashes or is killed — the kernel detaches every tracee: it runs on,
//!   untraced (one in a job-control stop stays stopped, as untraced, until `SIGCONT`). A restarted
//!   tracker can [`watch`](ForkTracker::watch) each of them again (every thread is seized); what
//!   they forked meanwhile is not reported. [`Config::kill_on_exit`] (`PTRACE_O_EXITKILL`) makes
//!   the kernel SIGKILL them instead, so that no VPS process ever runs untracked.
//! - A process can have only one tracer: a VPS process cannot be debugged with gdb/strace while
//!   followed, and a program that checks `TracerPid` in `/proc/self/status` sees it.
//! - A root that already has threads when watched (a loader member, a process a scan found) has
//!   each of its threads seized too, listing `/proc/PID/task` until no new thread appears.
//! - [`forget`](ForkTracker::forget) does nothing: the processes of a VPS stay followed until they
//!   exit.
//! - Permissions: following a process needs the right to ptrace it: the same user and a
//!   dumpable process, or `CAP_SYS_PTRACE`; under Yama `ptrace_scope=1` the root must be a child
//!   of this process or have named it with `prctl(PR_SET_PTRACER, pid)`; `ptrace_scope=2` needs
//!   `CAP_SYS_PTRACE`, `3` forbids ptrace altogether. A refusal is a
//!   [`TrackerError::PermissionDenied`] whose hint names the cause, never a silently untracked
//!   VPS.
//!
//! # Other systems
//!
//! The pure [`decode`] module builds everywhere. The live backend is Linux-only. On FreeBSD (and
//! any other system) the crate builds but [`Ptrace::new`] returns
//! [`TrackerError::Unsupported`]: FreeBSD's ptrace follows forks differently (`PT_FOLLOW_FORK`,
//! `PT_LWP_EVENTS`, and `PT_LWPINFO` flags `PL_FLAG_FORKED`/`PL_FLAG_CHILD`/`PL_FLAG_BORN`/
//! `PL_FLAG_EXITED` instead of `PTRACE_EVENT_*` stops in the wait status, no `PTRACE_SEIZE` or
//! `PTRACE_LISTEN`, so stopping a tracee with SIGSTOP cannot be left to job control the same way),
//! and that event loop is not written yet. Use the kqueue backend (`EVFILT_PROC` with
//! `NOTE_TRACK`) there, which is also synchronous.
#![warn(missing_docs)]

use vpstag_tracker::{BackendKind, Capabilities};
#[allow(unused_imports)] // for the docs' links
use vpstag_tracker::{Event, EventKind, ForkTracker, TrackerError};

pub mod decode;

#[cfg(target_os = "linux")]
pub mod source;

#[cfg(not(target_os = "linux"))]
mod freebsd;
#[cfg(not(target_os = "linux"))]
pub use freebsd::{Ptrace, UNSUPPORTED};

#[cfg(target_os = "linux")]
pub use linux::Ptrace;

/// What this backend promises.
pub const CAPABILITIES: Capabilities = Capabilities::new().synchronous(true).thread_events(true).reaps(true);

/// [`BackendKind::Ptrace`].
pub const KIND: BackendKind = BackendKind::Ptrace;

/// How a [`Ptrace`] follows processes: the ptrace options its tracees are seized with.
///
/// The default is what [`Ptrace::new`] uses: exit stops on, and the followed processes left alive
/// (detached) when the tracker goes away.
///
/// ```
/// use vpstag_ptrace::Config;
///
/// let config = Config::default().exit_stops(false);
/// assert!(!config.exit_stops && !config.kill_on_exit);
/// // let tracker = vpstag_ptrace::Ptrace::with_config(config)?;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// `PTRACE_O_TRACEEXIT` (default `true`): every exiting thread stops once more, while it can
    /// still be seen in `/proc`. `false` saves that stop; exits are reported either way (from the
    /// reaped status).
    pub exit_stops: bool,
    /// `PTRACE_O_EXITKILL` (default `false`): when the tracer thread ends — the [`Ptrace`] is
    /// dropped, or the process crashes or is killed — the kernel SIGKILLs every followed process,
    /// so none is left running untracked. With `false` they are detached and run on, untraced: a
    /// restarted tracker can [`watch`](ForkTracker::watch) them again.
    pub kill_on_exit: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config { exit_stops: true, kill_on_exit: false }
    }
}

impl Config {
    /// Sets [`exit_stops`](Config::exit_stops).
    pub fn exit_stops(mut self, on: bool) -> Config {
        self.exit_stops = on;
        self
    }

    /// Sets [`kill_on_exit`](Config::kill_on_exit).
    pub fn kill_on_exit(mut self, on: bool) -> Config {
        self.kill_on_exit = on;
        self
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::VecDeque;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use vpstag_tracker::{BackendKind, Capabilities, Event, EventKind, ForkTracker, Pid, TrackerError, VpsId};

    use crate::decode::{needs_event_msg, Action, Counters, Resume, Tracer};
    use crate::source::{self, ProcProbe};
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
        efd: OwnedFd,
        /// [`Counters`] in field order, stored by the tracer thread whenever it queues events or
        /// goes to sleep.
        counters: [AtomicU64; 5],
    }

    impl Shared {
        fn lock(&self) -> MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(|p| p.into_inner())
        }

        fn signal(&self) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
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
                let mut buf: u64 = 0;
                // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
                unsafe { libc::read(self.efd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
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
            // SAFETY: plain system call; the fd is owned right away.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(TrackerError::io("eventfd", io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor nobody else owns.
            let efd = unsafe { OwnedFd::from_raw_fd(fd) };
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
            let tracer_tid = tid_rx
                .recv()
                .map_err(|_| TrackerError::io("ptrace tracer thread", io::Error::other("died at start")))?;
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
                let mut pfd = libc::pollfd { fd: self.shared.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut pfd, 1, ms) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(TrackerError::io("poll on the ptrace event queue", e));
                    }
                }
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
        // by a later waitpid. Nothing else can fail for a tracee in a ptrace stop.
        let _ = r;
    }

    /// At most this many decoded events wait in the tracer thread before they are queued.
    const MAX_BATCH: usize = 64;

    /// The tracer thread: requests, then `waitpid`, forever.
    ///
    /// Decoded events wait in `pending` and are queued in batches: before a new task is resumed
    /// (its `Fork` must be readable before it runs), before the thread sleeps in `waitpid`, and
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
                    while let Ok(Some((tid, status))) = source::wait_nohang() {
                        handle(shared, &mut st, &mut probe, tid, status, &mut pending, &mut actions);
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
                Ok((tid, status)) => handle(shared, &mut st, &mut probe, tid, status, &mut pending, &mut actions),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Nothing left to wait for: whatever we still thought followed is gone.
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    shared.push(&mut pending, counts(&st, &probe));
                    st.clear();
                }
                Err(e) => {
                    shared.push(&mut pending, counts(&st, &probe));
                    shared.fail(format!("waitpid: {e}"));
                    return;
                }
            }
        }
    }

    /// One wait status: decode it, stamp the new events, make the ptrace requests. A task whose
    /// `Fork` is still pending is resumed only after the pending events are queued.
    fn handle(
        shared: &Shared,
        st: &mut Tracer,
        probe: &mut ProcProbe,
        tid: Pid,
        status: i32,
        pending: &mut Vec<Event>,
        actions: &mut Vec<Action>,
    ) {
        let now = source::boottime_ns();
        probe.collected(now.unwrap_or(0));
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            probe.forget(tid);
        }
        let msg = if needs_event_msg(status) { source::geteventmsg(tid).ok() } else { None };
        let before = pending.len();
        st.step(tid, status, msg, probe, pending, actions);
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
}
