//! The system calls of the Linux ptrace backend: seize, wait, cont, listen, geteventmsg, the
//! `/proc` reads, the wake-up signal, the eventfd the reader polls. Thin wrappers; the logic is in
//! [`crate::decode`], the loop in `tracker.rs`. The one file of this crate with `unsafe`: each
//! block says why it is sound.
//!
//! Every ptrace request here must be made from the tracer thread.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use vpstag_tracker::Pid;

use crate::decode::{parse_stat_bytes, start_between, Probe, TaskStat};

/// The options the root is seized with; its descendants inherit them.
///
/// No `EXITKILL` here: when the tracer thread ends (the [`Ptrace`](crate::Ptrace) is dropped, the
/// process crashes or is killed) the kernel detaches every tracee and it runs on. See
/// [`KILL_OPTION`].
pub(crate) const BASE_OPTIONS: libc::c_int =
    libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXEC;

/// `PTRACE_O_TRACEEXIT`: one more stop per exiting thread (see [`crate::Config::exit_stops`]).
pub(crate) const EXIT_OPTION: libc::c_int = libc::PTRACE_O_TRACEEXIT;

/// `PTRACE_O_EXITKILL`: the kernel SIGKILLs every tracee when the tracer thread ends (see
/// [`crate::Config::kill_on_exit`]).
pub(crate) const KILL_OPTION: libc::c_int = libc::PTRACE_O_EXITKILL;

/// The `wait4` flags of the tracer thread: every kind of child (`__WALL`), but only its own
/// (`__WNOTHREAD`): the tasks it traces and the children it forked itself (none), never the
/// children of the program's other threads.
const WAIT_FLAGS: libc::c_int = libc::__WALL | libc::__WNOTHREAD;

fn ret(r: libc::c_long) -> io::Result<libc::c_long> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `PTRACE_SEIZE` with `options`: the tracee keeps running.
pub(crate) fn seize(pid: Pid, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE takes no pointer; addr must be 0, data carries the options.
    ret(unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            options as libc::c_long as *mut libc::c_void,
        )
    })
    .map(drop)
}

/// One task collected by [`wait_any`] or [`wait_nohang`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waited {
    /// The task (thread id).
    pub tid: Pid,
    /// The raw wait status.
    pub status: i32,
    /// `ru_utime + ru_stime` of the `struct rusage` `wait4` filled, in nanoseconds. For a reaped
    /// thread-group leader whose group is dead, the kernel's `getrusage(leader, RUSAGE_BOTH)`:
    /// the whole process plus the children it waited for (see [`crate::decode::Tracer::step`]).
    pub cpu_ns: u64,
}

/// `wait4`, then the [`Waited`] it describes; `Ok(None)` when it returned 0 (`WNOHANG`).
fn wait4(flags: libc::c_int) -> io::Result<Option<Waited>> {
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct; wait4 overwrites it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain system call with valid out pointers.
    let r = unsafe { libc::wait4(-1, &mut status, flags, &mut ru) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Pid::new(r).map(|tid| Waited { tid, status, cpu_ns: timeval_ns(ru.ru_utime) + timeval_ns(ru.ru_stime) }))
}

/// A `timeval` (as `rusage` has it) in nanoseconds; negative fields count as 0.
fn timeval_ns(t: libc::timeval) -> u64 {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u64::try_from(t.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(micros.saturating_mul(1_000))
}

/// `wait4(-1, &status, __WALL | __WNOTHREAD, &rusage)`: the next tracee of the calling thread
/// that changed state. Returns `EINTR` when the wake-up signal arrived, `ECHILD` when there is
/// nothing to wait for.
pub(crate) fn wait_any() -> io::Result<Waited> {
    wait4(WAIT_FLAGS)?.ok_or_else(|| io::Error::other("wait4 returned 0 without WNOHANG"))
}

/// As [`wait_any`] with `WNOHANG`: `None` when no tracee has changed state (or there is none).
pub(crate) fn wait_nohang() -> io::Result<Option<Waited>> {
    match wait4(WAIT_FLAGS | libc::WNOHANG) {
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        r => r,
    }
}

/// `PTRACE_CONT`, delivering `sig` (0: none).
pub(crate) fn cont(tid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: no pointer is passed; data carries the signal number.
    ret(unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            sig as libc::c_long as *mut libc::c_void,
        )
    })
    .map(drop)
}

/// `PTRACE_LISTEN` (nix has no wrapper): leave a tracee in its group-stop but let SIGCONT (or a new
/// event) wake it.
pub(crate) fn listen(tid: Pid) -> io::Result<()> {
    // SAFETY: no pointer is passed.
    ret(unsafe {
        libc::ptrace(
            libc::PTRACE_LISTEN,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    })
    .map(drop)
}

/// `PTRACE_GETEVENTMSG`: the new tid of a fork/vfork/clone stop, the former tid of an exec stop.
pub(crate) fn geteventmsg(tid: Pid) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: data points to a c_ulong the kernel writes.
    ret(unsafe {
        libc::ptrace(
            libc::PTRACE_GETEVENTMSG,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            &mut msg as *mut libc::c_ulong as *mut libc::c_void,
        )
    })?;
    Ok(msg as u64)
}

/// The clone flags of the `clone`, `clone3`, `fork` or `vfork` call thread `tid` is stopped in
/// (at its `PTRACE_EVENT_FORK`/`VFORK`/`CLONE` stop), from its registers (`PTRACE_GETREGS`, and
/// `PTRACE_PEEKDATA` of the `clone_args` for `clone3`). `None` when they cannot be read, for a
/// 32-bit or x32 task, and on other architectures than x86-64.
#[cfg(target_arch = "x86_64")]
pub(crate) fn clone_flags(tid: Pid) -> Option<u64> {
    // SAFETY: an all-zero user_regs_struct is valid (plain integers).
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one user_regs_struct to data.
    ret(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            &mut regs as *mut libc::user_regs_struct as *mut libc::c_void,
        )
    })
    .ok()?;
    // 0x33: the 64-bit user code segment (a 32-bit task has other syscall numbers).
    if regs.cs != 0x33 {
        return None;
    }
    let sigchld = libc::SIGCHLD as u64;
    match regs.orig_rax as i64 {
        libc::SYS_clone => Some(regs.rdi),
        libc::SYS_fork => Some(sigchld),
        libc::SYS_vfork => Some((libc::CLONE_VFORK | libc::CLONE_VM) as u64 | sigchld),
        libc::SYS_clone3 => {
            // The first field of struct clone_args is the flags.
            // SAFETY: errno is thread-local; PEEKDATA reads a word of the stopped tracee's memory.
            let word = unsafe {
                *libc::__errno_location() = 0;
                libc::ptrace(
                    libc::PTRACE_PEEKDATA,
                    tid.as_raw(),
                    regs.rdi as *mut libc::c_void,
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            // SAFETY: reads the thread-local errno.
            if word == -1 && unsafe { *libc::__errno_location() } != 0 {
                return None;
            }
            Some(word as u64)
        }
        _ => None,
    }
}

/// See the x86-64 version: not read on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn clone_flags(_tid: Pid) -> Option<u64> {
    None
}

/// Reads `/proc`, and describes new tasks without it where it can (see [`Probe::new_task`]).
///
/// `/proc/TID/stat` is read with one `open`, one `read` into a buffer kept from call to call, and
/// one `close`: no allocation, no `statx`. A new task is described without `/proc` when:
/// - its creator's registers give the clone flags ([`clone_flags`]: `CLONE_THREAD` says thread
///   or process; `CLONE_PARENT`, whose real parent is not the creator, goes to `/proc`), and
/// - its start time is known exactly from the clock: the kernel stamps a new task with
///   `CLOCK_BOOTTIME` while its creator runs, between the creator's last restart (the time read
///   just before that ptrace request, see [`ProcProbe::resuming`]) and the moment its event stop
///   was collected ([`ProcProbe::collected`]); `/proc` shows that time in whole clock ticks
///   (`USER_HZ`, 10 ms), so when both bounds fall in the same tick, that tick is the start time.
///   Otherwise (about one fork in a hundred when the creator runs for 100 µs) `/proc` is read.
pub(crate) struct ProcProbe {
    buf: Vec<u8>,
    /// `CLOCK_BOOTTIME` read just before each tracee thread was last restarted.
    resumed: HashMap<Pid, u64>,
    /// `CLOCK_BOOTTIME` read just after the status being decoded was collected.
    now: u64,
    /// Nanoseconds per clock tick of `/proc`'s start times.
    tick_ns: u64,
    /// New tasks described without `/proc`.
    pub(crate) fast: u64,
    /// New tasks described from `/proc`.
    pub(crate) slow: u64,
}

impl Default for ProcProbe {
    fn default() -> ProcProbe {
        // SAFETY: plain library call.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // 0: no fast path (every start time from /proc).
        let tick_ns = if hz > 0 && 1_000_000_000 % hz == 0 { 1_000_000_000 / hz as u64 } else { 0 };
        ProcProbe { buf: Vec::new(), resumed: HashMap::new(), now: 0, tick_ns, fast: 0, slow: 0 }
    }
}

impl ProcProbe {
    /// The content of `/proc/TID/stat`, or `None` when it cannot be read (the task is gone).
    fn read_stat(&mut self, tid: Pid) -> Option<&[u8]> {
        // "/proc/" + at most 10 digits + "/stat" + NUL.
        let mut path = [0u8; 32];
        let mut n = 0;
        for &b in b"/proc/" {
            path[n] = b;
            n += 1;
        }
        let mut digits = [0u8; 10];
        let mut v = tid.as_raw().unsigned_abs();
        let mut d = digits.len();
        loop {
            d -= 1;
            digits[d] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &b in digits[d..].iter().chain(b"/stat") {
            path[n] = b;
            n += 1;
        }
        // SAFETY: `path` is NUL-terminated (zeroed, at most 21 bytes written).
        let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor nobody else owns; closed when dropped.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        if self.buf.len() < 1024 {
            self.buf.resize(1024, 0);
        }
        let mut len = 0;
        loop {
            let room = &mut self.buf[len..];
            // SAFETY: reads at most `room.len()` bytes into `room`.
            let r = unsafe { libc::read(fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
            if r < 0 {
                return None;
            }
            let r = r as usize;
            len += r;
            // procfs hands the whole line to the first read that has room for it.
            if r == 0 || len < self.buf.len() {
                break;
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        Some(&self.buf[..len])
    }
}

impl ProcProbe {
    /// The status being decoded was collected at `now` (`CLOCK_BOOTTIME`, read just after
    /// `wait4` returned).
    pub(crate) fn collected(&mut self, now: u64) {
        self.now = now;
    }

    /// Thread `tid` is about to be restarted; `now` was read just before the request. `listen`:
    /// it stays in its group stop, and may run later without another restart by us (after
    /// `SIGCONT`), so its start bound is dropped.
    pub(crate) fn resuming(&mut self, tid: Pid, now: u64, listen: bool) {
        if listen {
            self.resumed.remove(&tid);
            return;
        }
        if self.resumed.len() >= 1 << 16 {
            // Threads that vanished without a reap (exec from a thread): start over.
            self.resumed.clear();
        }
        self.resumed.insert(tid, now);
    }

    /// Thread `tid` was reaped.
    pub(crate) fn forget(&mut self, tid: Pid) {
        self.resumed.remove(&tid);
    }

    fn describe_new_task(&mut self, creator: Pid, creator_tgid: Pid) -> Option<TaskStat> {
        let start = start_between(*self.resumed.get(&creator)?, self.now, self.tick_ns)?;
        let flags = clone_flags(creator)?;
        if flags & libc::CLONE_PARENT as u64 != 0 {
            return None;
        }
        let thread = flags & libc::CLONE_THREAD as u64 != 0;
        // Stopped or about to stop at its first trap; the real parent is the creator's process.
        Some(TaskStat { state: 't', ppid: creator_tgid.as_raw(), num_threads: if thread { 2 } else { 1 }, start })
    }
}

impl Probe for ProcProbe {
    fn stat(&mut self, tid: Pid) -> Option<TaskStat> {
        parse_stat_bytes(self.read_stat(tid)?)
    }

    fn new_task(&mut self, creator: Pid, creator_tgid: Pid, child: Pid) -> Option<TaskStat> {
        if let Some(stat) = self.describe_new_task(creator, creator_tgid) {
            self.fast += 1;
            return Some(stat);
        }
        self.slow += 1;
        self.stat(child)
    }

    fn tgid(&mut self, tid: Pid) -> Option<Pid> {
        status_field(tid, "Tgid:").and_then(|v| v.parse().ok()).and_then(Pid::new)
    }
}

/// The first value of a `/proc/PID/status` line.
pub(crate) fn status_field(pid: Pid, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()).map(str::to_owned)
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub(crate) fn boottime_ns() -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The calling thread's id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The signal that wakes the tracer thread out of `wait4`: `SIGRTMAX - 3`.
pub(crate) fn wake_signal() -> i32 {
    libc::SIGRTMAX() - 3
}

extern "C" fn on_wake(_: libc::c_int) {}

static INSTALL: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the no-op handler of [`wake_signal`], without `SA_RESTART` so that it interrupts
/// `wait4` with `EINTR`. Done once per process. Fails if the program already handles that signal.
pub(crate) fn install_wake_handler() -> Result<(), String> {
    INSTALL
        .get_or_init(|| {
            let sig = wake_signal();
            // SAFETY: sigaction with valid pointers; the handler does nothing, so it is signal safe.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    return Err(format!("sigaction({sig}): {}", io::Error::last_os_error()));
                }
                if old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t
                {
                    return Err(format!(
                        "signal {sig} (SIGRTMAX-3), which this backend uses to wake its tracer thread, \
                         already has a handler in this program"
                    ));
                }
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = 0; // no SA_RESTART: wait4 must return EINTR
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                    return Err(format!("sigaction({sig}): {}", io::Error::last_os_error()));
                }
            }
            Ok(())
        })
        .clone()
}

/// Unblocks [`wake_signal`] in the calling thread (the tracer thread).
pub(crate) fn unblock_wake_signal() {
    // SAFETY: valid sigset pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, wake_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Sends [`wake_signal`] to thread `tid` of this process.
pub(crate) fn wake(tid: i32) {
    // SAFETY: plain system call.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, wake_signal());
    }
}

/// Why `SIGCHLD`'s disposition forbids this backend, if it does: with `SIG_IGN` or
/// `SA_NOCLDWAIT` the kernel reaps exited tracees itself and their exit status is lost.
pub(crate) fn sigchld_problem() -> Option<String> {
    // SAFETY: query only.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) != 0 {
            return None;
        }
        if old.sa_sigaction == libc::SIG_IGN {
            return Some("SIGCHLD is ignored (SIG_IGN) in this process: exited tracees would be reaped by the kernel and their exit status lost; restore SIG_DFL".into());
        }
        if old.sa_flags & libc::SA_NOCLDWAIT != 0 {
            return Some("SIGCHLD has SA_NOCLDWAIT in this process: exited tracees would be reaped by the kernel and their exit status lost".into());
        }
    }
    None
}

/// Yama's `ptrace_scope`, if Yama is there.
pub(crate) fn yama_scope() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

/// Explains an `EPERM` from `PTRACE_SEIZE` of `pid`: what to do about it.
pub(crate) fn eperm_hint(pid: Pid) -> String {
    // SAFETY: no arguments.
    let (my_uid, has_cap) = unsafe { (libc::geteuid(), libc::geteuid() == 0) };
    let mut why = Vec::new();
    match yama_scope() {
        Some(3) => why.push(
            "Yama kernel.yama.ptrace_scope=3 forbids every ptrace attach until reboot; use the cnproc backend"
                .to_owned(),
        ),
        Some(2) => why.push(
            "Yama kernel.yama.ptrace_scope=2 allows only CAP_SYS_PTRACE to attach; run as root or use the cnproc backend"
                .to_owned(),
        ),
        Some(1) => why.push(format!(
            "Yama kernel.yama.ptrace_scope=1: only descendants may be traced; the process must be a child of this one \
             or call prctl(PR_SET_PTRACER, {})",
            std::process::id()
        )),
        _ => {}
    }
    let owner = status_field(pid, "Uid:").and_then(|u| u.parse::<u32>().ok());
    if let Some(uid) = owner {
        if uid != my_uid && !has_cap {
            why.push(format!(
                "process {pid} belongs to uid {uid}, this one runs as uid {my_uid}: tracing another user's process needs CAP_SYS_PTRACE"
            ));
        }
    }
    if why.is_empty() {
        why.push(format!(
            "process {pid} may be already traced, set-uid/non-dumpable, or owned by another user \
             (tracing it needs CAP_SYS_PTRACE)"
        ));
    }
    why.join("; ")
}

/// An eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`): readable while its counter is not zero.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain system call; the fd is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter: the fd polls readable.
    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (a read that finds it zero does nothing: the fd is non-blocking).
    pub(crate) fn clear(&self) {
        let mut buf: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// `poll` for `POLLIN` on `fd` for at most `ms` milliseconds (-1: forever). A timeout, and an
/// interruption by a signal, are `Ok` like readiness: the caller looks at its queue either way.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, ms: i32) -> io::Result<()> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_stat_parses() {
        let me = Pid::new(std::process::id() as i32).unwrap();
        let mut probe = ProcProbe::default();
        let s = probe.stat(me).unwrap();
        // SAFETY: no arguments.
        assert_eq!(s.ppid, unsafe { libc::getppid() });
        assert!(s.num_threads >= 1);
        assert_eq!(probe.tgid(me), Some(me));
        let text = fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        assert_eq!(crate::decode::parse_stat(&text).map(|t| t.start), Some(s.start));
        assert!(probe.stat(Pid::new(i32::MAX - 7).unwrap()).is_none());
    }

    #[test]
    fn wait_any_gives_the_reaped_childs_cpu() {
        // SAFETY: the child only reads a clock and calls _exit, both async-signal-safe.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", io::Error::last_os_error());
        if child == 0 {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            loop {
                // SAFETY: valid out pointer; async-signal-safe.
                unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
                if ts.tv_sec > 0 || ts.tv_nsec >= 80_000_000 {
                    // SAFETY: ends the child without running the parent's atexit handlers.
                    unsafe { libc::_exit(3) };
                }
            }
        }
        // __WNOTHREAD: only this thread's child, whatever the other tests fork.
        let w = wait_any().unwrap();
        assert_eq!(w.tid.as_raw(), child);
        assert_eq!(
            crate::decode::classify(w.status),
            crate::decode::Status::Exited(vpstag_tracker::ExitStatus::Exited(3))
        );
        assert!((79_000_000..2_000_000_000).contains(&w.cpu_ns), "the child burned 80 ms, wait4 says {} ns", w.cpu_ns);
        assert!(wait_nohang().unwrap().is_none());
    }
}
