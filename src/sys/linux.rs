//! Linux: `/proc` through the `procfs` crate, `CLOCK_BOOTTIME`, `PR_SET_CHILD_SUBREAPER`, and the
//! cnproc, ptrace and (with the `ebpf` feature) eBPF backends.
//!
//! Why `procfs` and not a hand-rolled `/proc/PID/stat` reader: a scan is only needed at start-up
//! and after lost events (never per event), and a hand-rolled reader was measured only ~15%
//! faster; `procfs` parses the `comm` field (which may hold spaces and parentheses) correctly and
//! is well kept. Identity is keyed on the raw `starttime` ticks (not its date helper, which goes
//! through f32 and loses precision).

use std::io;

use vpstag_tracker::{ForkTracker, Pid, ProcessId, StartTime, TrackerError};

use super::ProcInfo;
use crate::{BackendChoice, Error};

fn to_io(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::NotFound(_) => io::Error::from(io::ErrorKind::NotFound),
        procfs::ProcError::Io(e, _) => e,
        procfs::ProcError::PermissionDenied(_) => io::Error::from(io::ErrorKind::PermissionDenied),
        other => io::Error::other(other.to_string()),
    }
}

fn info_of(p: &procfs::process::Process) -> Result<Option<ProcInfo>, procfs::ProcError> {
    let stat = p.stat()?;
    let Some(pid) = Pid::new(stat.pid) else { return Ok(None) };
    let uid = p.uid().unwrap_or(u32::MAX);
    Ok(Some(ProcInfo {
        id: ProcessId { pid, start: StartTime(stat.starttime) },
        ppid: Pid::new(stat.ppid),
        uid,
        threads: u32::try_from(stat.num_threads).unwrap_or(1),
        zombie: matches!(stat.state, 'Z' | 'X' | 'x'),
        name: stat.comm,
    }))
}

/// Every process (thread-group leaders only).
pub(crate) fn scan() -> io::Result<Vec<ProcInfo>> {
    let mut out = Vec::new();
    for p in procfs::process::all_processes().map_err(to_io)? {
        let Ok(p) = p else { continue };
        // A process that exited between the directory listing and the read is simply gone.
        if let Ok(Some(info)) = info_of(&p) {
            out.push(info);
        }
    }
    Ok(out)
}

/// One process, or `None` if it does not exist.
pub(crate) fn process(pid: Pid) -> io::Result<Option<ProcInfo>> {
    let p = match procfs::process::Process::new(pid.as_raw()) {
        Ok(p) => p,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(to_io(e)),
    };
    match info_of(&p) {
        Ok(i) => Ok(i),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(procfs::ProcError::Io(e, _)) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// The command line of a process, for display.
pub fn cmdline(pid: Pid) -> Option<String> {
    let p = procfs::process::Process::new(pid.as_raw()).ok()?;
    let args = p.cmdline().ok()?;
    if args.is_empty() {
        p.stat().ok().map(|s| format!("[{}]", s.comm))
    } else {
        Some(args.join(" "))
    }
}

/// The command line of a process, for display, reading at most `max` bytes of it (a command line
/// may be megabytes long): the arguments joined by spaces, `[comm]` when it has none (a kernel
/// thread, a zombie). One `open` and `read` of `/proc/PID/cmdline`.
pub(crate) fn cmdline_prefix(pid: Pid, max: usize) -> Option<(String, bool)> {
    use std::io::Read;
    let f = std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let mut buf = Vec::with_capacity(max.min(4096) + 1);
    f.take(max as u64 + 1).read_to_end(&mut buf).ok()?;
    let cut = buf.len() > max;
    buf.truncate(max);
    while buf.last() == Some(&0) {
        buf.pop();
    }
    if buf.is_empty() {
        return cmdline(pid).map(|c| (c, false));
    }
    for b in &mut buf {
        if *b == 0 {
            *b = b' ';
        }
    }
    Some((String::from_utf8_lossy(&buf).into_owned(), cut))
}

/// Start times are exact clock ticks on Linux.
pub(crate) fn start_tolerance() -> u64 {
    0
}

/// Nanoseconds per clock tick (`CLK_TCK`).
pub(crate) fn ns_per_start_unit() -> u64 {
    1_000_000_000 / procfs::ticks_per_second().max(1)
}

/// Now on `CLOCK_BOOTTIME`, the clock of `/proc` start times and of our events.
pub(crate) fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// Makes the calling process the reaper of its orphaned descendants. Async-signal-safe.
pub fn become_subreaper() -> i32 {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
    }
}

/// Sets this process's name as `ps` shows it. Async-signal-safe.
pub(crate) fn set_process_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `name` is one.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// The peer of an accepted Unix socket connection: `SO_PEERCRED` for its pid and uid, and
/// `SO_PEERPIDFD` (Linux 6.5+) for a pidfd of the very process. Where the kernel has no
/// `SO_PEERPIDFD`, the peer's start time is read now and must be no later than `accepted_ns` (the
/// boot-clock time the connection was accepted): a process born after that is not the peer.
///
/// # References
/// - [`unix(7)`](https://man7.org/linux/man-pages/man7/unix.7.html): `SO_PEERCRED`, `SO_PEERPIDFD`
pub(crate) fn socket_peer(sock: std::os::fd::BorrowedFd<'_>, accepted_ns: u64) -> io::Result<super::SocketPeer> {
    use nix::sys::socket::{getsockopt, sockopt};
    let cred = getsockopt(&sock, sockopt::PeerCredentials).map_err(io::Error::from)?;
    let pid = Pid::new(cred.pid())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the peer has no pid in this PID namespace"))?;
    let pidfd = getsockopt(&sock, sockopt::PeerPidfd).ok();
    let start = match &pidfd {
        Some(_) => None,
        None => match process(pid)? {
            Some(info) if info.id.start.0.saturating_mul(ns_per_start_unit()) <= accepted_ns => Some(info.id.start),
            _ => None,
        },
    };
    Ok(super::SocketPeer { pid, uid: cred.uid(), pidfd, start })
}

/// Whether a pidfd's process still exists (not yet reaped): `pidfd_send_signal` with signal 0.
fn pidfd_alive(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal with a valid descriptor, signal 0 and no siginfo.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0) };
    r == 0
}

/// What became of `peer`: the process that now holds its pid is it (and alive), it is gone, or
/// this cannot be told. With a pidfd, the process is read first and the pidfd checked after: while
/// the pidfd's process is not reaped its pid cannot be reused, so what was read was the peer.
pub(crate) fn peer_state(peer: &super::SocketPeer) -> super::PeerState {
    use super::PeerState;
    use std::os::fd::AsFd;
    let info = match process(peer.pid) {
        Ok(Some(i)) => i,
        Ok(None) => return PeerState::Gone,
        Err(_) => return PeerState::Unsure,
    };
    let same = match (&peer.pidfd, peer.start) {
        (Some(fd), _) => {
            if !pidfd_alive(fd.as_fd()) {
                return PeerState::Gone;
            }
            true
        }
        (None, Some(start)) => info.id.start == start,
        (None, None) => return PeerState::Unsure,
    };
    if !same || info.zombie {
        return PeerState::Gone;
    }
    PeerState::Alive(info)
}

/// Sends `sig` (0: only checks) to the process `id` and to no other: the pid is held with a pidfd
/// (Linux 5.3+) before its start time is checked, so if the process exits and its pid is reused in
/// between, the signal goes to the dead process (and fails), never to the new one. `Ok(false)`
/// when `id` is gone. Falls back to `kill` after the start-time check where pidfds are missing.
///
/// # References
/// - [`pidfd_open(2)`](https://man7.org/linux/man-pages/man2/pidfd_open.2.html),
///   [`pidfd_send_signal(2)`](https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html)
pub(crate) fn signal_exact(id: ProcessId, sig: i32) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let Some(rpid) = rustix::process::Pid::from_raw(id.pid.as_raw()) else { return Ok(false) };
    let fd = match rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::SRCH) => return Ok(false),
        Err(rustix::io::Errno::NOSYS) => None,
        Err(e) => return Err(e.into()),
    };
    match process(id.pid)? {
        Some(info) if info.id.start == id.start => {}
        _ => return Ok(false),
    }
    let r = match &fd {
        // SAFETY: pidfd_send_signal with a valid descriptor and no siginfo.
        Some(fd) => unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0)
        },
        // SAFETY: kill with integer arguments.
        None => libc::c_long::from(unsafe { libc::kill(id.pid.as_raw(), sig) }),
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(false);
    }
    Err(e)
}

fn open_cnproc() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_cnproc::CnProc::new()?))
}

fn open_ptrace() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_ptrace::Ptrace::new()?))
}

#[cfg(feature = "ebpf")]
fn open_ebpf() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Ok(Box::new(vpstag_ebpf::Ebpf::new()?))
}

#[cfg(not(feature = "ebpf"))]
fn open_ebpf() -> Result<Box<dyn ForkTracker>, TrackerError> {
    Err(TrackerError::Unsupported("this vpstag was built without the eBPF backend (cargo feature `ebpf`)".into()))
}

/// Opens a backend; `notes` receives what `auto` tried and why it fell back.
pub(crate) fn open_backend(choice: BackendChoice, notes: &mut Vec<String>) -> Result<Box<dyn ForkTracker>, Error> {
    match choice {
        BackendChoice::Cnproc => Ok(open_cnproc()?),
        BackendChoice::Ptrace => Ok(open_ptrace()?),
        BackendChoice::Ebpf => Ok(open_ebpf()?),
        BackendChoice::Kqueue => Err(Error::BackendUnavailable {
            backend: "kqueue",
            why: "kqueue is the BSD backend; on Linux use cnproc, ptrace or ebpf".into(),
        }),
        BackendChoice::Auto => {
            if cfg!(feature = "ebpf") {
                match open_ebpf() {
                    Ok(t) => return Ok(t),
                    Err(e) => notes.push(format!("ebpf backend unavailable ({e}); trying cnproc")),
                }
            }
            match open_cnproc() {
                Ok(t) => return Ok(t),
                Err(e) => notes.push(format!("cnproc backend unavailable ({e}); falling back to ptrace")),
            }
            Ok(open_ptrace()?)
        }
    }
}

/// A new close-on-exec Unix stream socket, or -1 (errno set). Async-signal-safe.
pub(crate) fn unix_stream_socket() -> libc::c_int {
    // SAFETY: socket(2) with integer arguments only.
    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }
}

/// The pid of the process at the other end of the Unix socket `fd` (`SO_PEERCRED`), if the
/// system says. Async-signal-safe.
///
/// # References
/// - [`unix(7)`](https://man7.org/linux/man-pages/man7/unix.7.html): `SO_PEERCRED`
pub(crate) fn peer_pid(fd: std::os::fd::RawFd) -> Option<i32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred on this stack; a
    // bad `fd` only makes it fail.
    let r = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Lets `pid` ptrace the calling process under Yama `ptrace_scope=1` (`PR_SET_PTRACER`).
/// Async-signal-safe; errors are ignored (without Yama the call fails and is not needed).
///
/// # References
/// - [`PR_SET_PTRACER`](https://man7.org/linux/man-pages/man2/PR_SET_PTRACER.2const.html)
pub(crate) fn allow_ptracer(pid: i32) {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_PTRACER, pid as libc::c_ulong, 0, 0, 0);
    }
}

/// Whether a user with uid `uid` could signal `pid` itself (kill(2): the sender's uid is the
/// target's real or saved uid; root may signal anyone), from `/proc/PID/status` (procfs).
pub(crate) fn may_signal(uid: u32, pid: Pid) -> bool {
    if uid == 0 {
        return true;
    }
    // Real or saved uid, as kill(2) checks them.
    match procfs::process::Process::new(pid.as_raw()).and_then(|p| p.status()) {
        Ok(s) => s.ruid == uid || s.suid == uid,
        Err(_) => false,
    }
}

/// User + system CPU time (ms) and resident memory (bytes) of a process.
pub(crate) fn usage(pid: Pid) -> Option<(u64, u64)> {
    let st = procfs::process::Process::new(pid.as_raw()).ok()?.stat().ok()?;
    let tps = procfs::ticks_per_second().max(1);
    Some(((st.utime + st.stime) * 1000 / tps, st.rss * procfs::page_size()))
}

/// What `pid` has used so far (`/proc/PID/stat`: `utime + stime` of every thread, `cutime +
/// cstime` of the children it waited for, `rss`); `None` when it is gone. A zombie (exited, not
/// yet reaped) still reports its final figures.
///
/// # References
/// - [`proc_pid_stat(5)`](https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html)
pub(crate) fn proc_usage(pid: Pid) -> io::Result<Option<super::ProcUsage>> {
    let stat = match procfs::process::Process::new(pid.as_raw()).and_then(|p| p.stat()) {
        Ok(s) => s,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(procfs::ProcError::Io(e, _)) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(to_io(e)),
    };
    let tick_ns = ns_per_start_unit();
    let ticks = |t: u64| t.saturating_mul(tick_ns);
    Ok(Some(super::ProcUsage {
        id: ProcessId { pid, start: StartTime(stat.starttime) },
        ppid: Pid::new(stat.ppid),
        cpu_self_ns: ticks(stat.utime.saturating_add(stat.stime)),
        cpu_children_ns: ticks(
            u64::try_from(stat.cutime).unwrap_or(0).saturating_add(u64::try_from(stat.cstime).unwrap_or(0)),
        ),
        rss_bytes: stat.rss.saturating_mul(procfs::page_size()),
        zombie: stat.state == 'Z',
    }))
}

/// Whether `pid` ignores `SIGCHLD` (`SIG_IGN`), so that the kernel reaps its exited children
/// itself and adds their CPU time to nobody; `None` when it is gone. Read from
/// `/proc/PID/stat`'s `sigignore` (bit `SIGCHLD - 1`; the field shows signals 1 to 31, which
/// is enough here), the same parse as [`proc_usage`]. `SA_NOCLDWAIT` with a handler has the same
/// effect but is not shown in `/proc`: it reads as `false`.
///
/// # References
/// - [`proc_pid_stat(5)`](https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html)
/// - [`sigaction(2)`](https://man7.org/linux/man-pages/man2/sigaction.2.html), `SA_NOCLDWAIT`
pub(crate) fn sigchld_ignored(pid: Pid) -> io::Result<Option<bool>> {
    match procfs::process::Process::new(pid.as_raw()).and_then(|p| p.stat()) {
        Ok(st) => Ok(Some(st.sigignore & (1 << (libc::SIGCHLD - 1)) != 0)),
        Err(procfs::ProcError::NotFound(_)) => Ok(None),
        Err(procfs::ProcError::Io(e, _)) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(to_io(e)),
    }
}

/// Closes every descriptor from `first` on (`close_range`, Linux 5.9+; before, one by one up to
/// `max_fd`). Async-signal-safe.
pub(crate) fn close_from(first: i32, max_fd: i32) {
    // SAFETY: close_range takes integers only.
    let r =
        unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0 as libc::c_uint) };
    if r != 0 {
        for fd in first..=max_fd {
            // SAFETY: close on an integer; a descriptor that is not open gives EBADF.
            unsafe { libc::close(fd) };
        }
    }
}

/// The thread group (process) of a task: `/proc/TID/status`'s `Tgid` (a thread's directory is
/// there though `readdir` of `/proc` does not list it).
pub(crate) fn thread_group(tid: Pid) -> Option<Pid> {
    let st = procfs::process::Process::new(tid.as_raw()).ok()?.status().ok()?;
    Pid::new(st.tgid)
}

/// The filesystem type (`f_type` of `fstatfs(2)`) of an open file, for telling a cgroup v2
/// directory from a cgroup v1 one or any other (`crate::cgroup`).
///
/// # References
/// - [`statfs(2)`](https://man7.org/linux/man-pages/man2/statfs.2.html)
#[allow(clippy::unnecessary_cast)] // `f_type`'s integer type differs per architecture
pub(crate) fn fs_magic(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstatfs(fd)?.f_type as u64)
}

// The magic numbers `crate::cgroup` spells by hand (it builds on every OS), checked here.
const _: () = assert!(libc::CGROUP2_SUPER_MAGIC as u64 == crate::cgroup::CGROUP2_SUPER_MAGIC);
const _: () = assert!(libc::CGROUP_SUPER_MAGIC as u64 == crate::cgroup::CGROUP_SUPER_MAGIC);

#[cfg(test)]
mod tests {

    #[test]
    fn sigchld_ignored_is_read_from_proc() {
        // This test process does not ignore SIGCHLD; a pid above pid_max is gone.
        let me = Pid::new(std::process::id() as i32).unwrap();
        assert_eq!(sigchld_ignored(me).unwrap(), Some(false));
        assert_eq!(sigchld_ignored(Pid::new(i32::MAX - 7).unwrap()).unwrap(), None);
        // A program whose SIGCHLD is ignored (an ignored signal stays ignored across exec; dash's
        // `trap '' CHLD` does not ignore it, so Python sets it).
        let script =
            "import signal,os; signal.signal(signal.SIGCHLD, signal.SIG_IGN); os.execvp('sleep', ['sleep', '30'])";
        let mut child =
            Command::new("python3").args(["-c", script]).stdin(Stdio::null()).spawn().expect("starting python3");
        let pid = Pid::new(child.id() as i32).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut seen = sigchld_ignored(pid);
        while !matches!(seen, Ok(Some(true))) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
            seen = sigchld_ignored(pid);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(matches!(seen, Ok(Some(true))), "python3 -c {script:?}: {seen:?}");
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::process::{Peer, PeerState};

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn may_signal_reads_the_real_and_saved_uid_from_proc() {
        let me = Pid::new(std::process::id() as i32).unwrap();
        let uid = rustix::process::getuid().as_raw();
        assert!(may_signal(uid, me), "a process may signal itself");
        assert!(may_signal(0, me), "root may signal anyone");
        let other = if uid == 4242 { 4243 } else { 4242 };
        assert!(!may_signal(other, me), "uid {other} may not signal a process of uid {uid}");
        // A pid that does not exist: nobody but root.
        let gone = Pid::new(i32::MAX - 1).unwrap();
        assert!(!may_signal(other, gone));
        // As root the checks above end before /proc is read: a process of another uid tells.
        if is_root() {
            use std::os::unix::process::CommandExt;
            let mut child = Command::new("sleep")
                .arg("30")
                .uid(4242)
                .gid(4242)
                .stdin(Stdio::null())
                .spawn()
                .expect("sleep as 4242");
            let pid = Pid::new(child.id() as i32).unwrap();
            let (of_4242, of_4243) = (may_signal(4242, pid), may_signal(4243, pid));
            let _ = child.kill();
            let _ = child.wait();
            assert!(of_4242, "uid 4242 may signal its own process");
            assert!(!of_4243, "uid 4243 may not signal a process of uid 4242");
        }
    }

    /// Starts `/bin/sleep 30` on exactly pid `pid` (clone3 with `set_tid`; root only). `None` when
    /// the pid is taken.
    fn spawn_on_pid(pid: i32) -> Option<i32> {
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs {
            flags: u64,
            pidfd: u64,
            child_tid: u64,
            parent_tid: u64,
            exit_signal: u64,
            stack: u64,
            stack_size: u64,
            tls: u64,
            set_tid: u64,
            set_tid_size: u64,
            cgroup: u64,
        }
        let (path, a0, a1) = (c"/bin/sleep", c"sleep", c"30");
        let argv = [a0.as_ptr(), a1.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        let tid = pid;
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: &tid as *const i32 as u64,
            set_tid_size: 1,
            ..Default::default()
        };
        // SAFETY: clone3 with a valid argument block; the child only calls execve and _exit on
        // data prepared before.
        let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        if r == 0 {
            // SAFETY: in the child: raw system calls only.
            unsafe {
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        (r > 0).then_some(r as i32)
    }

    /// What kernels before 6.5 get (no `SO_PEERPIDFD`): a peer pinned by its start time is alive
    /// while it runs, gone once it has exited, and a later process on the same pid (another tick)
    /// is not taken for it.
    #[test]
    fn a_peer_pinned_by_start_time_is_not_a_later_process_on_its_pid() {
        let dir = std::env::temp_dir().join(format!("vpstag-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('on', flush=True); sys.stdin.read()"])
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let pinned = socket_peer(stream.as_fd(), now_ns()).expect("peer credentials");
        let pid = pinned.pid;
        assert_eq!(pid.as_raw(), child.id() as i32);
        let start = process(pid).unwrap().expect("the peer runs").id.start;
        // The fallback: no pidfd, the start time read at accept.
        let peer = Peer { pid, uid: pinned.uid, pidfd: None, start: Some(start) };
        assert!(matches!(peer_state(&peer), PeerState::Alive(_)), "{:?}", peer_state(&peer));
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(matches!(peer_state(&peer), PeerState::Gone), "{:?}", peer_state(&peer));
        if is_root() {
            // A process born on the same pid in a later clock tick.
            let tick = 1_000_000_000 / procfs::ticks_per_second().max(1);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while now_ns() / tick <= start.0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let victim = spawn_on_pid(pid.as_raw()).expect("the dead peer's pid is free");
            let state = peer_state(&peer);
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(victim, libc::SIGKILL);
                libc::waitpid(victim, std::ptr::null_mut(), 0);
            }
            assert!(matches!(state, PeerState::Gone), "a later process on pid {pid} taken for the peer: {state:?}");
        }
        let _ = (&stream).write(b"");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_thread_id_leads_to_its_process() {
        let me = Pid::new(std::process::id() as i32).expect("a pid");
        assert_eq!(thread_group(me), Some(me));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tx.send(unsafe { libc::gettid() });
            let _ = done_rx.recv();
        });
        let tid = Pid::new(rx.recv().expect("the thread's id")).expect("a tid");
        assert_ne!(tid, me);
        assert_eq!(thread_group(tid), Some(me), "thread {tid} of process {me}");
        drop(done_tx);
        t.join().expect("the thread ends");
        // No such task (pids stop well below i32::MAX).
        assert_eq!(thread_group(Pid::new(i32::MAX).expect("a pid")), None);
    }
}
