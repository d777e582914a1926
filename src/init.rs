//! The VPS's first process: a small init, forked from the manager, that
//!
//! 1. makes itself the reaper of its descendants (Linux `PR_SET_CHILD_SUBREAPER`, FreeBSD
//!    `PROC_REAP_ACQUIRE`), so orphans of the VPS are re-parented inside it,
//!    `clone(CLONE_PARENT)` from the command cannot land outside, and membership can be rebuilt
//!    from parent links;
//! 2. waits at the start gate (a pipe) until the manager has recorded it, so nothing of the VPS
//!    can run untracked;
//! 3. starts the command, forwards termination signals to it and reaps every orphan, as tini
//!    does; it exits with the command's status when the command exits.
//!
//! It is this very program after `fork()`, not a separate executable: there is nothing extra to
//! install, and library users need no helper binary. Everything after `fork()` is
//! async-signal-safe (raw system calls on data prepared before the fork; no allocation, no
//! locks), as a fork from a multithreaded process requires.

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
    program: String,
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
        Ok(Plan {
            program: program.to_string_lossy().into_owned(),
            path,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            cwd,
            max_fd,
        })
    }

    /// The program as the user named it.
    pub(crate) fn program(&self) -> &str {
        &self.program
    }
}

/// The pipes between the manager and a starting first process.
pub(crate) struct Pipes {
    pub gate_read: OwnedFd,
    pub gate_write: OwnedFd,
    pub err_read: OwnedFd,
    pub err_write: OwnedFd,
}

impl Pipes {
    pub(crate) fn new() -> io::Result<Pipes> {
        let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        Ok(Pipes { gate_read, gate_write, err_read, err_write })
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

/// The first process. Runs in the child right after `fork()`; never returns.
///
/// # Safety
/// Must be called only in a freshly forked child, with `plan` and `pipes` prepared before the
/// fork. Uses only async-signal-safe calls.
pub(crate) unsafe fn run_first_process(plan: &Plan, pipes: &Pipes) -> ! {
    let gate = pipes.gate_read.as_raw_fd();
    let err = pipes.err_write.as_raw_fd();
    // SAFETY (whole block): raw system calls on integers, stack buffers and the Plan's
    // pre-built, NUL-terminated arrays; nothing allocates or takes a lock.
    unsafe {
        libc::close(pipes.gate_write.as_raw_fd());
        libc::close(pipes.err_read.as_raw_fd());
        // Close the descriptors this program opened for itself (netlink sockets, event fds...):
        // they are close-on-exec, so the command would not get them anyway, and an init holding
        // the tracker's socket open would keep it alive.
        for fd in 3..=plan.max_fd {
            if fd == gate || fd == err {
                continue;
            }
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::close(fd);
            }
        }
        crate::sys::set_process_name(c"vpstag-init");
        let rc = crate::sys::become_subreaper();
        if rc != 0 {
            report(err, rc);
            libc::_exit(127);
        }
        // The start gate: wait until the manager has recorded us. EOF means it gave up.
        let mut b = 0u8;
        loop {
            let r = libc::read(gate, (&mut b as *mut u8).cast(), 1);
            if r == 1 {
                break;
            }
            if r < 0 && errno() == libc::EINTR {
                continue;
            }
            libc::_exit(126);
        }
        libc::close(gate);

        // Block what we handle with sigwaitinfo, after making sure SIGCHLD is not ignored.
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
            report(err, errno());
            libc::_exit(127);
        }
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
                    report(err, errno());
                    libc::_exit(127);
                }
            }
            libc::execve(plan.path.as_ptr(), plan.argv_ptrs.as_ptr(), plan.envp_ptrs.as_ptr());
            report(err, errno());
            libc::_exit(127);
        }
        libc::close(err);

        loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
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
