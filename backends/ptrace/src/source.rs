//! The system calls of the Linux ptrace backend: seize, wait, cont, listen, geteventmsg, the
//! `/proc` reads, the wake-up signal. Thin wrappers; the logic is in `decode`, the loop in `lib`.
//!
//! Every ptrace request here must be made from the tracer thread.

use std::fs;
use std::io;
use std::sync::OnceLock;

use vpstag_tracker::{Pid, StartTime};

use crate::decode::{Probe, TaskStat};

/// The options the root is seized with; its descendants inherit them.
///
/// No `EXITKILL` here: when the tracer thread ends (the [`Ptrace`](crate::Ptrace) is dropped, the
/// process crashes or is killed) the kernel detaches every tracee and it runs on. See
/// [`KILL_OPTION`].
pub const BASE_OPTIONS: libc::c_int =
    libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXEC;

/// `PTRACE_O_TRACEEXIT`: one more stop per exiting thread (see [`crate::Config::exit_stops`]).
pub const EXIT_OPTION: libc::c_int = libc::PTRACE_O_TRACEEXIT;

/// `PTRACE_O_EXITKILL`: the kernel SIGKILLs every tracee when the tracer thread ends (see
/// [`crate::Config::kill_on_exit`]).
pub const KILL_OPTION: libc::c_int = libc::PTRACE_O_EXITKILL;

/// The `waitpid` flags of the tracer thread: every kind of child (`__WALL`), but only its own
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
pub fn seize(pid: Pid, options: libc::c_int) -> io::Result<()> {
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

/// `waitpid(-1, &status, __WALL | __WNOTHREAD)`: the next tracee of the calling thread that
/// changed state. Returns `EINTR` when the wake-up signal arrived, `ECHILD` when there is nothing
/// to wait for.
pub fn wait_any() -> io::Result<(Pid, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: plain system call with a valid out pointer.
    let r = unsafe { libc::waitpid(-1, &mut status, WAIT_FLAGS) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = Pid::new(r).ok_or_else(|| io::Error::other("waitpid returned 0 without WNOHANG"))?;
    Ok((pid, status))
}

/// As [`wait_any`] with `WNOHANG`: `None` when no tracee has changed state (or there is none).
pub fn wait_nohang() -> io::Result<Option<(Pid, i32)>> {
    let mut status: libc::c_int = 0;
    // SAFETY: plain system call with a valid out pointer.
    let r = unsafe { libc::waitpid(-1, &mut status, WAIT_FLAGS | libc::WNOHANG) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ECHILD) { Ok(None) } else { Err(e) };
    }
    Ok(Pid::new(r).map(|p| (p, status)))
}

/// `PTRACE_CONT`, delivering `sig` (0: none).
pub fn cont(tid: Pid, sig: i32) -> io::Result<()> {
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
pub fn listen(tid: Pid) -> io::Result<()> {
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
pub fn geteventmsg(tid: Pid) -> io::Result<u64> {
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

/// Parses the text of `/proc/TID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<TaskStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state): field N is fields[N - 3].
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let num_threads = fields.get(17)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some(TaskStat { state, ppid, num_threads, start: StartTime(start) })
}

/// The state letter (field 3) of `/proc/PID/stat`.
pub fn parse_state(text: &str) -> Option<char> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_ascii_whitespace().next()?.chars().next()
}

/// Reads `/proc`.
#[derive(Default)]
pub struct ProcProbe;

impl Probe for ProcProbe {
    fn stat(&mut self, tid: Pid) -> Option<TaskStat> {
        parse_stat(&fs::read_to_string(format!("/proc/{tid}/stat")).ok()?)
    }

    fn tgid(&mut self, tid: Pid) -> Option<Pid> {
        status_field(tid, "Tgid:").and_then(|v| v.parse().ok()).and_then(Pid::new)
    }
}

/// The first value of a `/proc/PID/status` line.
pub fn status_field(pid: Pid, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()).map(str::to_owned)
}

/// `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_ns() -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The signal that wakes the tracer thread out of `waitpid`: `SIGRTMAX - 3`.
pub fn wake_signal() -> i32 {
    libc::SIGRTMAX() - 3
}

extern "C" fn on_wake(_: libc::c_int) {}

static INSTALL: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the no-op handler of [`wake_signal`], without `SA_RESTART` so that it interrupts
/// `waitpid` with `EINTR`. Done once per process. Fails if the program already handles that signal.
pub fn install_wake_handler() -> Result<(), String> {
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
                sa.sa_flags = 0; // no SA_RESTART: waitpid must return EINTR
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
pub fn unblock_wake_signal() {
    // SAFETY: valid sigset pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, wake_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Sends [`wake_signal`] to thread `tid` of this process.
pub fn wake(tid: i32) {
    // SAFETY: plain system call.
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, wake_signal());
    }
}

/// Why `SIGCHLD`'s disposition forbids this backend, if it does: with `SIG_IGN` or
/// `SA_NOCLDWAIT` the kernel reaps exited tracees itself and their exit status is lost.
pub fn sigchld_problem() -> Option<String> {
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
pub fn yama_scope() -> Option<u32> {
    fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok()?.trim().parse().ok()
}

/// Explains an `EPERM` from `PTRACE_SEIZE` of `pid`: what to do about it.
pub fn eperm_hint(pid: Pid) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn own_stat_parses() {
        let me = Pid::new(std::process::id() as i32).unwrap();
        let s = ProcProbe.stat(me).unwrap();
        // SAFETY: no arguments.
        assert_eq!(s.ppid, unsafe { libc::getppid() });
        assert!(s.num_threads >= 1);
        assert_eq!(ProcProbe.tgid(me), Some(me));
    }
}
