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
//!   `wait4(-1, &status, __WALL | __WNOTHREAD, &rusage)` (its own tracees only, never the
//!   children of the program's other threads), decodes the raw status itself (nix's `waitpid`
//!   rejects stops by real-time signals, nix issues 495 and 1143), asks the pure state machine in [`decode`]
//!   what to report and how to restart the tracee, and restarts it. Events are queued in
//!   batches: always before a new task is resumed, so a new child's `Fork` is queued, and
//!   [`as_fd`](ForkTracker::as_fd) readable, before the child runs; otherwise when the thread is
//!   about to sleep in `wait4`, or has 64 events waiting.
//! - Waking the tracer thread for [`watch`](ForkTracker::watch): `watch` sends a request on a
//!   channel and signals the tracer thread with `tgkill(SIGRTMAX-3)`, whose handler does nothing
//!   and is installed without `SA_RESTART`, so `wait4` returns `EINTR` and the thread reads the
//!   channel. A signal that lands between the thread's check of the channel and its entry into
//!   `wait4` would be lost (there is no `pwaitpid` to unblock it atomically), so `watch` sends
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
//! table, so [`Capabilities::holds_tags`] stays false. A process's exit (`group_dead: Some(true)`)
//! carries its CPU time in [`Event::exit_cpu_ns`] ([`Capabilities::exit_usage`]): `ru_utime +
//! ru_stime` of the `struct rusage` that `wait4` fills when the tracer thread collects the
//! process's thread-group leader, its last task (the kernel hands over a leader only once the
//! rest of its group is released). The kernel fills it with `getrusage(leader, RUSAGE_BOTH)` in
//! `wait_task_zombie`, for a tracer as for the real parent, before the process can be reaped by
//! anyone else: the user + system time of all its threads, to the end of their `exit`, plus that
//! of the children it has waited for, in microseconds. No `/proc` read, no extra system call.
//! There with [`Config::exit_stops`] off too (it comes with the reap, not the exit stop); missing
//! only when the last task collected is not the leader (the leader was not followed).
//!
//! Cost per fork: the creator's event stop and the child's first stop, one `PTRACE_GETEVENTMSG`,
//! and on x86-64 one `PTRACE_GETREGS` (the clone flags: thread or process, `CLONE_PARENT`); the
//! start time comes from `CLOCK_BOOTTIME` when the creator's run since its last restart lies
//! within one clock tick, else (and on other architectures, and for `CLONE_PARENT`) from one read
//! of `/proc/CHILD/stat` (see `ProcProbe` in `source.rs`). Per exit: the `PTRACE_EVENT_EXIT` stop
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
//!   `wait4(-1, .., __WALL | __WNOTHREAD, ..)`: a thread then collects only its own tracees (and
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
//! # Layout
//!
//! As in every vpstag backend: [`decode`] is the sans-IO state machine (a wait status in, events
//! and ptrace requests out) and the `/proc/PID/stat` parser, pure and unit-tested on every OS;
//! `source.rs` holds the system calls (ptrace requests, `wait4`, `/proc` reads, the wake-up
//! signal, the eventfd) and every `unsafe` block; `tracker.rs` the [`ForkTracker`] impl and the
//! tracer thread's loop; `unsupported.rs` the stand-in for other systems.
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
#![deny(unsafe_code)]
#![warn(missing_docs)]

use vpstag_tracker::{BackendKind, Capabilities};
#[allow(unused_imports)] // for the docs' links
use vpstag_tracker::{Event, EventKind, ForkTracker, TrackerError};

pub mod decode;

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        #[allow(unsafe_code)]
        mod source;
        mod tracker;
        pub use tracker::Ptrace;
    } else {
        mod unsupported;
        pub use unsupported::{Ptrace, UNSUPPORTED};
    }
}

/// What this backend promises (with any [`Config`]).
pub const CAPABILITIES: Capabilities =
    Capabilities::new().synchronous(true).thread_events(true).reaps(true).exit_usage(true);

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
