//! The VPS's first process: a small init that
//!
//! 1. makes itself the reaper of its descendants (Linux `PR_SET_CHILD_SUBREAPER`, FreeBSD
//!    `PROC_REAP_ACQUIRE`), so orphans of the VPS are re-parented inside it,
//!    `clone(CLONE_PARENT)` from the command cannot land outside, and membership can be rebuilt
//!    from parent links;
//! 2. holds the command at a start gate until it has been recorded, so nothing of the VPS can
//!    run untracked;
//! 3. forwards termination signals to the command and reaps every orphan, as tini does; it exits
//!    with the command's status when the command exits.
//!
//! It is this very program after `fork()`, not a separate executable: there is nothing extra to
//! install, and library users need no helper binary. Three ways in: [`FirstHook`] (the manager's
//! `spawn`: the standard library forks and applies the `Command`'s options, the hook turns its
//! child into the init), [`fork_first_process_socket`] (`vpstag start` through the daemon, which
//! registers the process over its socket) and [`run_loader_shim`] (`vpstag exec`). Everything
//! after `fork()` is async-signal-safe (raw system calls on data prepared before the fork; no
//! allocation, no locks), as a fork from a multithreaded process requires.

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Signals the init passes on to the command.
const FORWARDED: [libc::c_int; 7] =
    [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];

/// Everything the child needs, prepared before `fork()`.
pub(crate) struct Plan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    max_fd: RawFd,
}

// SAFETY: the raw pointers point into the CStrings owned by the same Plan; the Plan is only read.
unsafe impl Send for Plan {}

fn cstring(s: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn resolve(program: &OsStr, path_var: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path_var = path_var.map(OsString::from).unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path_var) {
        let cand = dir.join(program);
        if is_executable(&cand) {
            return Ok(cand);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "command not found in PATH"))
}

impl Plan {
    /// Prepares `cmd` (program, arguments, environment changes, working directory).
    pub(crate) fn new(cmd: &Command) -> io::Result<Plan> {
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (k, v) in cmd.get_envs() {
            env.retain(|(ek, _)| ek != k);
            if let Some(v) = v {
                env.push((k.to_owned(), v.to_owned()));
            }
        }
        let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_os_str());
        let program = cmd.get_program();
        let resolved = resolve(program, path_var)?;
        let path = cstring(resolved.as_os_str(), "the program path")?;
        let mut argv = vec![cstring(program, "the program name")?];
        for a in cmd.get_args() {
            argv.push(cstring(a, "an argument")?);
        }
        let envp: Vec<CString> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                CString::new(kv).ok()
            })
            .collect();
        let cwd = match cmd.get_current_dir() {
            Some(d) => Some(cstring(d.as_os_str(), "the working directory")?),
            None => None,
        };
        let argv_ptrs = argv.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp_ptrs = envp.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let max_fd = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => soft.min(65_536) as RawFd,
            Err(_) => 1024,
        };
        Ok(Plan { path, _argv: argv, argv_ptrs, _envp: envp, envp_ptrs, cwd, max_fd })
    }
}

fn errno() -> libc::c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Reports an errno to the manager over the error pipe (4 bytes, one write).
///
/// # Safety
/// Async-signal-safe; `fd` must be the error pipe's write end.
unsafe fn report(fd: RawFd, code: libc::c_int) {
    let b = code.to_ne_bytes();
    // SAFETY: writes 4 bytes from a stack buffer.
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}

/// Where a first process reports how far it got (`vpstag start` through the daemon): each failure
/// is 8 bytes on the error pipe, the stage and an errno.
pub(crate) mod stage {
    pub const SUBREAPER: i32 = 1;
    pub const SOCKET: i32 = 2;
    pub const CONNECT: i32 = 3;
    pub const SEND: i32 = 4;
    pub const RECV: i32 = 5;
    pub const REFUSED: i32 = 6;
    pub const FORK: i32 = 7;
    pub const EXEC: i32 = 8;
    pub const STDIO: i32 = 9;
}

/// How a first process reports a failure: 4 bytes (an errno: the loader's shim) or 8 bytes
/// (a [`stage`] and an errno, [`run_first_process_socket`]).
#[derive(Clone, Copy)]
enum Reporter {
    Errno(RawFd),
    Staged(RawFd),
}

impl Reporter {
    /// Async-signal-safe.
    unsafe fn fail(self, st: i32, code: libc::c_int) {
        match self {
            // SAFETY: writes from stack buffers.
            Reporter::Errno(fd) => unsafe { report(fd, code) },
            Reporter::Staged(fd) => {
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&st.to_ne_bytes());
                b[4..].copy_from_slice(&code.to_ne_bytes());
                // SAFETY: writes 8 bytes from a stack buffer.
                unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
            }
        }
    }

    fn fd(self) -> RawFd {
        match self {
            Reporter::Errno(fd) | Reporter::Staged(fd) => fd,
        }
    }
}

/// Closes the close-on-exec descriptors this program opened for itself (netlink sockets, event
/// fds...), except `keep`: the command would not get them anyway, and an init holding the
/// tracker's socket open would keep it alive. Async-signal-safe.
unsafe fn close_inherited(plan: &Plan, keep: &[RawFd]) {
    for fd in 3..=plan.max_fd {
        if keep.contains(&fd) {
            continue;
        }
        // SAFETY: fcntl/close on integers.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::close(fd);
            }
        }
    }
}

/// The daemon's start gate: everything a first process needs to register itself with the daemon
/// over its socket, prepared before `fork()`.
pub(crate) struct SocketGate {
    addr: libc::sockaddr_un,
    addr_len: libc::socklen_t,
    request: Vec<u8>,
    stdin: OwnedFd,
    stdout: OwnedFd,
}

impl SocketGate {
    /// `request` is the whole registration line (newline included); `stdin` and `stdout` become
    /// the first process's standard input and output (and error).
    pub(crate) fn new(socket: &Path, request: Vec<u8>, stdin: OwnedFd, stdout: OwnedFd) -> io::Result<SocketGate> {
        // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = socket.as_os_str().as_bytes();
        if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a usable Unix socket path (empty, too long or with a NUL byte)",
            ));
        }
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        let addr_len = (base + bytes.len() + 1) as libc::socklen_t;
        Ok(SocketGate { addr, addr_len, request, stdin, stdout })
    }
}

/// A first process that registers itself with the daemon: the child of `vpstag start` (or of
/// [`Client::start`](crate::client::Client::start)) right after `fork()`; never returns.
///
/// It takes its standard input and output from the gate, starts a new session, becomes the
/// subreaper of its descendants, connects to the daemon's socket itself (so that the daemon's
/// `SO_PEERCRED` names this process), names the daemon as its allowed ptracer
/// (`PR_SET_PTRACER`, for Yama `ptrace_scope=1`), sends the registration prepared before the fork,
/// and waits for the acknowledgement. It relays the daemon's reply line to `reply_fd`, and starts
/// the command only on a success; failures go to `err_fd` as a stage and an errno.
///
/// # Safety
/// Must be called only in a freshly forked child, with everything prepared before the fork.
/// Uses only async-signal-safe calls.
unsafe fn run_first_process_socket(plan: &Plan, gate: &SocketGate, reply_fd: RawFd, err_fd: RawFd) -> ! {
    let rep = Reporter::Staged(err_fd);
    // SAFETY (whole block): raw system calls on integers, stack buffers and data prepared before
    // the fork; nothing allocates or takes a lock.
    unsafe {
        if libc::dup2(gate.stdin.as_raw_fd(), 0) < 0
            || libc::dup2(gate.stdout.as_raw_fd(), 1) < 0
            || libc::dup2(gate.stdout.as_raw_fd(), 2) < 0
        {
            rep.fail(stage::STDIO, errno());
            libc::_exit(127);
        }
        close_inherited(plan, &[reply_fd, err_fd]);
        crate::sys::set_process_name(c"vpstag-init");
        libc::setsid();
        let rc = crate::sys::become_subreaper();
        if rc != 0 {
            rep.fail(stage::SUBREAPER, rc);
            libc::_exit(127);
        }
        let fd = crate::sys::unix_stream_socket();
        if fd < 0 {
            rep.fail(stage::SOCKET, errno());
            libc::_exit(127);
        }
        loop {
            let r = libc::connect(fd, (&gate.addr as *const libc::sockaddr_un).cast(), gate.addr_len);
            if r == 0 {
                break;
            }
            if errno() == libc::EINTR {
                continue;
            }
            rep.fail(stage::CONNECT, errno());
            libc::_exit(127);
        }
        if let Some(daemon) = crate::sys::peer_pid(fd) {
            crate::sys::allow_ptracer(daemon);
        }
        let mut off = 0;
        while off < gate.request.len() {
            let r = libc::write(fd, gate.request.as_ptr().add(off).cast(), gate.request.len() - off);
            if r < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                rep.fail(stage::SEND, errno());
                libc::_exit(127);
            }
            off += r as usize;
        }
        // The acknowledgement: one line. A success begins with `{"ok":true`.
        let mut buf = [0u8; 4096];
        let mut got = 0usize;
        loop {
            if got == buf.len() {
                break;
            }
            let r = libc::read(fd, buf.as_mut_ptr().add(got).cast(), buf.len() - got);
            if r < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                rep.fail(stage::RECV, errno());
                libc::_exit(127);
            }
            if r == 0 {
                break;
            }
            let start = got;
            got += r as usize;
            if buf[start..got].contains(&b'\n') {
                break;
            }
        }
        libc::close(fd);
        let mut off = 0;
        while off < got {
            let r = libc::write(reply_fd, buf.as_ptr().add(off).cast(), got - off);
            if r <= 0 {
                if r < 0 && errno() == libc::EINTR {
                    continue;
                }
                break;
            }
            off += r as usize;
        }
        libc::close(reply_fd);
        const OK: &[u8] = b"{\"ok\":true";
        if got < OK.len() || &buf[..OK.len()] != OK {
            rep.fail(stage::REFUSED, 0);
            libc::_exit(126);
        }
        init_loop(plan, rep)
    }
}

/// The init proper, once recorded: starts the command, forwards signals to it, reaps orphans,
/// and exits with the command's status.
///
/// # Safety
/// Only in the first process after its gate opened; async-signal-safe.
unsafe fn init_loop(plan: &Plan, rep: Reporter) -> ! {
    // SAFETY (whole block): as in the callers.
    unsafe {
        let (cmd, set) = spawn_command(plan, rep);
        if cmd < 0 {
            rep.fail(stage::FORK, errno());
            libc::_exit(127);
        }
        libc::close(rep.fd());
        supervise(cmd, &set)
    }
}

/// Blocks the signals an init handles (after making sure SIGCHLD is not ignored) and forks the
/// command; the child restores the signal mask and executes it, reporting a failure through
/// `rep` (then exits 127). Returns the command's pid (negative when `fork` failed) and the set of
/// blocked signals, for [`supervise`].
///
/// # Safety
/// Async-signal-safe; `plan` was prepared before any `fork()` of the caller.
unsafe fn spawn_command(plan: &Plan, rep: Reporter) -> (libc::pid_t, libc::sigset_t) {
    // SAFETY (whole block): raw system calls on integers, stack buffers and the Plan's
    // pre-built, NUL-terminated arrays.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);

        let cmd = libc::fork();
        if cmd == 0 {
            for s in FORWARDED {
                // Handlers the manager installed (e.g. for Ctrl-C) do not belong to the command;
                // exec resets handled signals anyway, this also covers the gap before it.
                let cur = libc::signal(s, libc::SIG_DFL);
                if cur == libc::SIG_IGN {
                    libc::signal(s, libc::SIG_IGN);
                }
            }
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if let Some(cwd) = &plan.cwd {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    rep.fail(stage::EXEC, errno());
                    libc::_exit(127);
                }
            }
            libc::execve(plan.path.as_ptr(), plan.argv_ptrs.as_ptr(), plan.envp_ptrs.as_ptr());
            rep.fail(stage::EXEC, errno());
            libc::_exit(127);
        }
        (cmd, set)
    }
}

/// Waits for the signals in `set`: forwards the termination signals to `cmd`, reaps every child
/// (orphans of the VPS included), and exits with `cmd`'s status (128 + signal number when a
/// signal ended it) once it is reaped.
///
/// # Safety
/// Async-signal-safe; `set` is blocked in the calling thread.
unsafe fn supervise(cmd: libc::pid_t, set: &libc::sigset_t) -> ! {
    // SAFETY (whole block): raw system calls on integers and stack buffers.
    unsafe {
        loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(set, &mut sig) != 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                loop {
                    let mut status = 0;
                    let w = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if w <= 0 {
                        break;
                    }
                    if w == cmd {
                        let code = if libc::WIFEXITED(status) {
                            libc::WEXITSTATUS(status)
                        } else if libc::WIFSIGNALED(status) {
                            128 + libc::WTERMSIG(status)
                        } else {
                            continue;
                        };
                        libc::_exit(code);
                    }
                }
            } else {
                libc::kill(cmd, sig);
            }
        }
    }
}

/// The loader's shim (`vpstag exec`), once it is a subreaper and registered as a member of its
/// VPS: runs the command as its child and stays, as the VPS's root for that command, until the
/// command exits (then exits with its status). Orphans and `clone(CLONE_PARENT)` children of the
/// command are re-parented to (or born below) the shim, so the command's whole tree stays below
/// a registered root: its lineage is exact for every backend and can be rebuilt from a scan.
///
/// Returns only when the command could not be started, with the reason. The calling process
/// must be single-threaded (it is the `vpstag exec` process).
pub(crate) fn run_loader_shim(plan: &Plan) -> io::Error {
    let (err_read, err_write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return e.into(),
    };
    // SAFETY: the plan was prepared before; this process is single-threaded, so the child may run
    // the async-signal-safe spawn path.
    let (cmd, set) = unsafe { spawn_command(plan, Reporter::Errno(err_write.as_raw_fd())) };
    drop(err_write);
    if cmd < 0 {
        return io::Error::last_os_error();
    }
    match read_exec_errno(err_read) {
        Err(e) => return e,
        Ok(Some(errno)) => {
            // Our own child, which exits at once after reporting.
            if let Some(cmd) = crate::Pid::new(cmd) {
                let _ = crate::sys::reap(cmd);
            }
            return io::Error::from_raw_os_error(errno);
        }
        Ok(None) => {}
    }
    // SAFETY: `set` is blocked in this (only) thread by spawn_command.
    unsafe { supervise(cmd, &set) }
}

/// Waits on the read end of an error pipe (close-on-exec, its write end given to a child as
/// [`Reporter::Errno`]): `None` at end of file, i.e. the command was executed; `Some(errno)` when
/// the child reported why it could not be.
pub(crate) fn read_exec_errno(pipe: std::os::fd::OwnedFd) -> io::Result<Option<i32>> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    let mut f = std::fs::File::from(pipe);
    while got < 4 {
        match std::io::Read::read(&mut f, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((got == 4).then(|| i32::from_ne_bytes(buf)))
}

/// Forks the first process of a VPS started through the daemon: the child runs
/// [`run_first_process_socket`] and never returns; the parent gets its pid.
pub(crate) fn fork_first_process_socket(
    plan: &Plan,
    gate: &SocketGate,
    reply_fd: RawFd,
    err_fd: RawFd,
) -> io::Result<crate::Pid> {
    // SAFETY: the child runs only `run_first_process_socket`, which is async-signal-safe and uses
    // data prepared before the fork; the parent continues normally.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child.
        unsafe { run_first_process_socket(plan, gate, reply_fd, err_fd) }
    }
    forked(pid)
}

fn forked(pid: libc::pid_t) -> io::Result<crate::Pid> {
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    crate::Pid::new(pid).ok_or_else(|| io::Error::other("fork returned a bad pid"))
}

thread_local! {
    /// The token of the [`FirstHook`] the calling thread is spawning with now (0: none). A hook
    /// left on a `Command` by an earlier start does nothing: only the armed one acts.
    static ARMED: Cell<u64> = const { Cell::new(0) };
}

/// The part of [`Manager::spawn`](crate::Manager::spawn) that runs in the child the standard
/// library's `Command::spawn` forked, after the standard library applied every option of the
/// `Command` (stdio, groups, gid, uid, working directory, process group, the caller's own
/// `pre_exec` closures) and before it executes the program. That child becomes the VPS's first
/// process, a small init:
///
/// 1. it makes itself the reaper of its descendants, blocks the signals it handles, and forks
///    the command's process;
/// 2. it sends both pids to the manager and becomes the init: it gives up every descriptor (the
///    caller's pipes and the standard library's error pipe included, so `spawn` returns as soon
///    as the command is executed), forwards termination signals to the command, reaps orphans,
///    and exits with the command's status;
/// 3. the command's process waits at the start gate until the manager has recorded both pids,
///    then returns to the standard library, which executes the program (or reports why it could
///    not, as it does for any `Command`).
///
/// So the command runs with everything the `Command` asked for, and nothing of it runs before
/// the table has it.
pub(crate) struct FirstHook {
    token: u64,
    gate_read: RawFd,
    gate_write: RawFd,
    pids_read: RawFd,
    pids_write: RawFd,
    max_fd: RawFd,
}

/// The manager's ends of a [`FirstHook`]'s pipes, and the ends it must close once the child is
/// forked.
pub(crate) struct HookPipes {
    /// Write a byte to open the gate; close it to make the command's process exit instead.
    pub gate_write: OwnedFd,
    /// Where the first process sends its pid and the command's (8 bytes), or end-of-file when
    /// it failed before.
    pub pids_read: OwnedFd,
    /// The child's ends: close them once `spawn` has returned.
    pub child_ends: (OwnedFd, OwnedFd),
}

impl FirstHook {
    /// New pipes and a hook over them.
    pub(crate) fn new() -> io::Result<(FirstHook, HookPipes)> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (pids_read, pids_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let max_fd = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => soft.min(65_536) as RawFd,
            Err(_) => 1024,
        };
        let hook = FirstHook {
            token: NEXT.fetch_add(1, Ordering::Relaxed),
            gate_read: gate_read.as_raw_fd(),
            gate_write: gate_write.as_raw_fd(),
            pids_read: pids_read.as_raw_fd(),
            pids_write: pids_write.as_raw_fd(),
            max_fd,
        };
        Ok((hook, HookPipes { gate_write, pids_read, child_ends: (gate_read, pids_write) }))
    }

    /// Adds the hook to `cmd` as its last `pre_exec` closure, and spawns `cmd` with it armed.
    /// Returns what `Command::spawn` returns: the child is the first process.
    pub(crate) fn spawn(self, cmd: &mut Command) -> io::Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        let token = self.token;
        // SAFETY: the closure runs in the child between fork and exec; `FirstHook::run` uses only
        // async-signal-safe calls on integers and stack buffers (see there).
        unsafe {
            cmd.pre_exec(move || self.run());
        }
        ARMED.with(|a| a.set(token));
        let r = cmd.spawn();
        ARMED.with(|a| a.set(0));
        r
    }

    /// In the forked child. Async-signal-safe: raw system calls on integers and stack buffers; the
    /// errors returned are `io::Error::from_raw_os_error`, which does not allocate.
    fn run(&self) -> io::Result<()> {
        if ARMED.with(|a| a.get()) != self.token {
            return Ok(());
        }
        // SAFETY (whole block): raw system calls on integers and stack buffers.
        unsafe {
            libc::close(self.gate_write);
            libc::close(self.pids_read);
            let rc = crate::sys::become_subreaper();
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            for s in FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            let cmd = libc::fork();
            if cmd < 0 {
                let e = errno();
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                return Err(io::Error::from_raw_os_error(e));
            }
            if cmd == 0 {
                // The command's process: as the standard library left it, once the gate opens.
                libc::close(self.pids_write);
                for s in FORWARDED {
                    let cur = libc::signal(s, libc::SIG_DFL);
                    if cur == libc::SIG_IGN {
                        libc::signal(s, libc::SIG_IGN);
                    }
                }
                libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                let mut b = 0u8;
                loop {
                    let r = libc::read(self.gate_read, (&mut b as *mut u8).cast(), 1);
                    if r == 1 {
                        break;
                    }
                    if r < 0 && errno() == libc::EINTR {
                        continue;
                    }
                    // The manager gave up: never run the command.
                    libc::_exit(126);
                }
                libc::close(self.gate_read);
                return Ok(());
            }
            // The first process.
            libc::close(self.gate_read);
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&libc::getpid().to_ne_bytes());
            b[4..].copy_from_slice(&cmd.to_ne_bytes());
            // 8 bytes: below PIPE_BUF, written at once or not at all.
            while libc::write(self.pids_write, b.as_ptr().cast(), b.len()) < 0 && errno() == libc::EINTR {}
            crate::sys::close_from(3, self.max_fd);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                if null > 2 {
                    libc::close(null);
                }
            }
            crate::sys::set_process_name(c"vpstag-init");
            supervise(cmd, &set)
        }
    }
}

/// Reads the two pids a [`FirstHook`] sends (the first process's, then the command's); `None` at
/// end of file (the child failed before it forked the command).
pub(crate) fn read_hook_pids(pipe: &OwnedFd) -> io::Result<Option<(crate::Pid, crate::Pid)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(pipe, &mut buf[got..]) {
            Ok(0) => return Ok(None),
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let first = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let cmd = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match (crate::Pid::new(first), crate::Pid::new(cmd)) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        _ => Err(io::Error::other("the first process sent a bad pid")),
    }
}
