//! `vpstag-scenario SHAPE [--report FILE] [--count N]`: build a real process tree of one shape.
//!
//! Every process meant to stay alive appends one line `PID ROLE` to the report (one `write(2)` on
//! an `O_APPEND` descriptor, so lines never interleave) and then waits until it is killed. When
//! the whole tree is in place the top process appends `READY N`, N being the number of live-process
//! lines written (its own included), and waits to be killed too. A shape the system does not offer
//! is reported as `SKIP SHAPE REASON`; a shape that went wrong as `FAIL SHAPE REASON`.
//!
//! Without `--report` the lines go to standard output.
//!
//! # Process layout
//!
//! * Standalone (`vpstag-scenario fork-chain`): the top process is the shape's *coordinator*. It
//!   builds the shape, waits until every live process of the shape has reported (each one writes
//!   one byte to a "ready pipe" right after its report line), writes its own line `PID SHAPE/top`
//!   and `READY N`, then reaps whatever child dies and waits. Exception: a skipped shape writes
//!   `SKIP`, `READY 0` and exits 0.
//! * `all`: the top process (`PID all/top`) forks one *runner* per shape, one after the other;
//!   each runner is the coordinator of its shape (`PID SHAPE/runner`), so one shape going wrong
//!   does not take the others down. A runner of a skipped shape exits after its `SKIP` line.
//!
//! Processes that are meant to exit (relay generations, the middle of a double fork...) are
//! reaped by their coordinator before `READY` whenever they are its children; orphans' zombies
//! are the business of whoever adopts them (init or a subreaper).
//!
//! # Async-signal safety
//!
//! A forked child runs only raw libc calls (`write`, `fork`, `setsid`, `prctl`, `nanosleep`,
//! `pause`, `_exit`, `open`/`read` of `/proc/self/status`) on stack buffers: no allocation, no
//! locks, no std I/O. That is required after a fork from a multi-threaded process (the thread
//! shapes) and kept everywhere so the rule never depends on the caller. Processes that exec build
//! their argument vectors *before* forking or while still single-threaded.
//!
//! # vfork
//!
//! `vfork-exec` on Linux calls `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` through glibc's
//! `clone()` wrapper with a child function on its own stack; that is exactly what `vfork(2)` does
//! in the kernel (and what ptrace reports as `PTRACE_EVENT_VFORK`), without calling `libc::vfork`
//! from Rust, which returns twice on a shared stack and cannot be used soundly from Rust code.
//! `posix-spawn` uses plain `posix_spawn(3)` (glibc implements it with `CLONE_VM | CLONE_VFORK`
//! too, on its own stack). On other systems `vfork-exec` uses `posix_spawn`, which on FreeBSD is
//! built on `vfork`.

use std::ffi::CString;
use std::time::{Duration, Instant};

use libc::{c_char, c_int, c_void, pid_t};

/// Every shape `all` runs, in order.
const ALL_SHAPES: &[&str] = &[
    "fork-chain",
    "vfork-exec",
    "posix-spawn",
    "fork-from-thread",
    "double-fork-setsid",
    "clone-parent",
    "clone3",
    "pthread-exit-main",
    "exec-from-thread",
    "pid-namespace",
    "relay",
    "orphan-reparent",
    "nested-subreaper",
];

const CHAIN_LENGTH: u32 = 5;
const RELAY_GENERATIONS: u32 = 50;
const DEFAULT_CHURN: u64 = 20_000;
/// How long a coordinator waits for its shape's processes to report.
const SHAPE_TIMEOUT: Duration = Duration::from_secs(30);

extern "C" {
    static environ: *const *mut c_char;
}

// ---------------------------------------------------------------------------------------------
// Async-signal-safe reporting

/// What a process of a shape needs to report itself; `Copy`, holds no heap data of its own, so a
/// forked child can use it without allocating.
#[derive(Clone, Copy)]
struct ShapeCtx {
    shape: &'static str,
    report_fd: c_int,
    /// Write end of the ready pipe: one byte per report line.
    ready_w: c_int,
}

/// A line built on the stack.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line { buf: [0; 512], len: 0 }
    }
    fn push(&mut self, bytes: &[u8]) -> &mut Line {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }
    fn num(&mut self, v: i64) -> &mut Line {
        let mut digits = [0u8; 24];
        let mut i = digits.len();
        let neg = v < 0;
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if neg {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..])
    }
    /// One `write(2)`; with `O_APPEND` the line lands whole.
    fn write_to(&mut self, fd: c_int) {
        if self.len == 0 || self.buf[self.len - 1] != b'\n' {
            if self.len == self.buf.len() {
                self.len -= 1;
            }
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        unsafe {
            let mut r;
            loop {
                r = libc::write(fd, self.buf.as_ptr() as *const c_void, self.len);
                if !(r < 0 && errno() == libc::EINTR) {
                    break;
                }
            }
        }
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_text(e: c_int) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// `getpid` straight from the kernel: after a raw `clone` glibc's cached thread data is stale.
fn raw_getpid() -> pid_t {
    #[cfg(target_os = "linux")]
    unsafe {
        libc::syscall(libc::SYS_getpid) as pid_t
    }
    #[cfg(not(target_os = "linux"))]
    unsafe {
        libc::getpid()
    }
}

fn raw_getppid() -> pid_t {
    #[cfg(target_os = "linux")]
    unsafe {
        libc::syscall(libc::SYS_getppid) as pid_t
    }
    #[cfg(not(target_os = "linux"))]
    unsafe {
        libc::getppid()
    }
}

impl ShapeCtx {
    /// `PID SHAPE/ROLE[N]` to the report, then one byte to the ready pipe. Async-signal-safe.
    fn say_alive_as(&self, pid: pid_t, role: &[u8], n: Option<u32>) {
        let mut line = Line::new();
        line.num(pid as i64).push(b" ").push(self.shape.as_bytes()).push(b"/").push(role);
        if let Some(n) = n {
            line.num(n as i64);
        }
        line.write_to(self.report_fd);
        unsafe { while libc::write(self.ready_w, b"+".as_ptr() as *const c_void, 1) < 0 && errno() == libc::EINTR {} }
    }

    fn say_alive(&self, role: &[u8]) {
        self.say_alive_as(raw_getpid(), role, None)
    }

    /// `FAIL SHAPE what: errno N` from a child. Async-signal-safe.
    fn say_fail(&self, what: &[u8], err: c_int) {
        let mut line = Line::new();
        line.push(b"FAIL ").push(self.shape.as_bytes()).push(b" pid ").num(raw_getpid() as i64);
        line.push(b": ").push(what).push(b": errno ").num(err as i64);
        line.write_to(self.report_fd);
    }
}

/// Sleep without allocating (nanosleep is async-signal-safe).
fn nap_ms(ms: u64) {
    let ts = libc::timespec { tv_sec: (ms / 1000) as _, tv_nsec: ((ms % 1000) * 1_000_000) as _ };
    unsafe {
        libc::nanosleep(&ts, std::ptr::null_mut());
    }
}

/// Wait until killed.
fn hold_forever() -> ! {
    loop {
        unsafe {
            libc::pause();
        }
    }
}

/// A coordinator's rest: reap every child that dies, then wait until killed. Async-signal-safe.
fn reap_and_hold() -> ! {
    loop {
        let mut st = 0;
        let r = unsafe { libc::waitpid(-1, &mut st, 0) };
        if r < 0 && errno() != libc::EINTR {
            hold_forever();
        }
    }
}

/// `fork()`, retried a little on EAGAIN. Async-signal-safe.
fn fork_retry() -> pid_t {
    let mut tries = 0;
    loop {
        let p = unsafe { libc::fork() };
        if p >= 0 || errno() != libc::EAGAIN || tries > 200 {
            return p;
        }
        tries += 1;
        nap_ms(5);
    }
}

/// In a child: wait (up to ~10 s) until our parent is no longer `old_parent`, i.e. we were
/// re-parented. Async-signal-safe.
fn await_reparent(old_parent: pid_t) {
    for _ in 0..10_000 {
        if raw_getppid() != old_parent {
            return;
        }
        nap_ms(1);
    }
}

fn waitpid_blocking(pid: pid_t) -> Option<c_int> {
    let mut st = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            return Some(st);
        }
        if r < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

/// True when `pid`, our child, has not exited yet.
fn child_still_running(pid: pid_t) -> bool {
    let mut st = 0;
    unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) == 0 }
}

// ---------------------------------------------------------------------------------------------
// Shapes. Each starts its processes and returns how many report lines (ready bytes) to expect.

enum Outcome {
    /// Started; this many lines (and ready bytes) are coming.
    Expect(usize),
    /// Not offered by this system.
    Skip(String),
}

type ShapeResult = Result<Outcome, String>;

fn fork_or_err(what: &str) -> Result<pid_t, String> {
    let p = fork_retry();
    if p < 0 {
        Err(format!("{what}: fork: {}", errno_text(errno())))
    } else {
        Ok(p)
    }
}

/// fork-chain: a chain of 5 forks, every generation stays alive (`fork-chain/1` .. `/5`).
fn fork_chain(ctx: &ShapeCtx) -> ShapeResult {
    fn link(ctx: &ShapeCtx, generation: u32) -> ! {
        ctx.say_alive_as(raw_getpid(), b"", Some(generation));
        if generation < CHAIN_LENGTH {
            let p = fork_retry();
            if p == 0 {
                link(ctx, generation + 1);
            }
            if p < 0 {
                ctx.say_fail(b"fork", errno());
            }
        }
        hold_forever()
    }
    if fork_or_err("fork-chain")? == 0 {
        link(ctx, 1);
    }
    Ok(Outcome::Expect(CHAIN_LENGTH as usize))
}

/// Prepared `execv` arguments for `/bin/sleep infinity` (built before any fork).
struct SleepArgv {
    path: CString,
    _args: Vec<CString>,
    argv: Vec<*const c_char>,
}

impl SleepArgv {
    fn new() -> SleepArgv {
        let path = CString::new("/bin/sleep").unwrap();
        let args = vec![CString::new("sleep").unwrap(), CString::new("infinity").unwrap()];
        let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        SleepArgv { path, _args: args, argv }
    }
}

/// vfork-exec: `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` (= vfork) + `execv("/bin/sleep", ..)`.
#[cfg(target_os = "linux")]
fn vfork_exec(ctx: &ShapeCtx) -> ShapeResult {
    use std::sync::atomic::{AtomicI32, Ordering};
    struct Arg {
        path: *const c_char,
        argv: *const *const c_char,
        exec_errno: AtomicI32,
    }
    extern "C" fn child(arg: *mut c_void) -> c_int {
        // Runs on its own stack, in the parent's memory, until execv: touch nothing else.
        let arg = unsafe { &*(arg as *const Arg) };
        unsafe {
            libc::execv(arg.path, arg.argv);
        }
        arg.exec_errno.store(errno(), Ordering::SeqCst);
        unsafe { libc::_exit(127) }
    }
    let sleep = SleepArgv::new();
    let arg = Arg { path: sleep.path.as_ptr(), argv: sleep.argv.as_ptr(), exec_errno: AtomicI32::new(0) };
    let mut stack = vec![0u8; 256 * 1024];
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) };
    let top = ((top as usize) & !15usize) as *mut c_void;
    // CLONE_VFORK: we resume once the child has exec'd or exited.
    let pid = unsafe {
        libc::clone(child, top, libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD, &arg as *const Arg as *mut c_void)
    };
    if pid < 0 {
        return Err(format!("clone(CLONE_VM|CLONE_VFORK): {}", errno_text(errno())));
    }
    let e = arg.exec_errno.load(Ordering::SeqCst);
    if e != 0 {
        waitpid_blocking(pid);
        return Err(format!("execv /bin/sleep: {}", errno_text(e)));
    }
    if !child_still_running(pid) {
        return Err("the vfork child died".into());
    }
    ctx.say_alive_as(pid, b"sleep", None);
    Ok(Outcome::Expect(1))
}

#[cfg(not(target_os = "linux"))]
fn vfork_exec(ctx: &ShapeCtx) -> ShapeResult {
    // FreeBSD's posix_spawn is built on vfork(2).
    spawn_sleep(ctx)
}

/// posix-spawn: `posix_spawn("/bin/sleep", ["sleep", "infinity"])`.
fn posix_spawn(ctx: &ShapeCtx) -> ShapeResult {
    spawn_sleep(ctx)
}

fn spawn_sleep(ctx: &ShapeCtx) -> ShapeResult {
    let sleep = SleepArgv::new();
    let mut pid: pid_t = 0;
    let r = unsafe {
        libc::posix_spawn(
            &mut pid,
            sleep.path.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            sleep.argv.as_ptr() as *const *mut c_char,
            environ,
        )
    };
    if r != 0 {
        return Err(format!("posix_spawn /bin/sleep: {}", errno_text(r)));
    }
    if !child_still_running(pid) {
        return Err("the spawned sleep died".into());
    }
    ctx.say_alive_as(pid, b"sleep", None);
    Ok(Outcome::Expect(1))
}

/// fork-from-thread: a second thread forks a child that stays alive (`fork-from-thread/child`).
fn fork_from_thread(ctx: &ShapeCtx) -> ShapeResult {
    let c = *ctx;
    let worker = std::thread::spawn(move || {
        let p = fork_retry();
        if p == 0 {
            // Child of a multi-threaded process: raw libc only from here on.
            c.say_alive(b"child");
            hold_forever();
        }
        if p < 0 {
            Err(errno())
        } else {
            Ok(p)
        }
    });
    match worker.join() {
        Ok(Ok(_)) => Ok(Outcome::Expect(1)),
        Ok(Err(e)) => Err(format!("fork from a thread: {}", errno_text(e))),
        Err(_) => Err("the forking thread panicked".into()),
    }
}

/// double-fork-setsid: fork; the child setsid()s and forks the daemon, then exits
/// (`double-fork-setsid/daemon`, re-parented, in the middle's session).
fn double_fork_setsid(ctx: &ShapeCtx) -> ShapeResult {
    let middle = fork_or_err("double-fork-setsid")?;
    if middle == 0 {
        if unsafe { libc::setsid() } < 0 {
            ctx.say_fail(b"setsid", errno());
            unsafe { libc::_exit(1) }
        }
        let me = raw_getpid();
        let d = fork_retry();
        if d == 0 {
            await_reparent(me);
            ctx.say_alive(b"daemon");
            hold_forever();
        }
        if d < 0 {
            ctx.say_fail(b"fork", errno());
        }
        unsafe { libc::_exit(0) }
    }
    waitpid_blocking(middle);
    Ok(Outcome::Expect(1))
}

/// clone-parent: raw `clone(CLONE_PARENT | SIGCHLD)`; the new process (`clone-parent/sibling`) is a
/// child of our parent.
#[cfg(target_os = "linux")]
fn clone_parent(ctx: &ShapeCtx) -> ShapeResult {
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    let r = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if r == 0 {
        // glibc's thread data is the parent's here: raw syscalls only.
        ctx.say_alive(b"sibling");
        hold_forever();
    }
    if r < 0 {
        return Err(format!("clone(CLONE_PARENT): {}", errno_text(errno())));
    }
    Ok(Outcome::Expect(1))
}

#[cfg(not(target_os = "linux"))]
fn clone_parent(_ctx: &ShapeCtx) -> ShapeResult {
    Ok(Outcome::Skip("clone(CLONE_PARENT) is Linux-only".into()))
}

/// clone3: a fork through `clone3` with `struct clone_args { flags: 0, exit_signal: SIGCHLD }`
/// (`clone3/child`).
#[cfg(target_os = "linux")]
fn clone3(ctx: &ShapeCtx) -> ShapeResult {
    /// `struct clone_args`, CLONE_ARGS_SIZE_VER0 (64 bytes).
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
    }
    let args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        ctx.say_alive(b"child");
        hold_forever();
    }
    if r < 0 {
        let e = errno();
        if e == libc::ENOSYS {
            return Ok(Outcome::Skip("clone3: ENOSYS (kernel older than 5.3)".into()));
        }
        return Err(format!("clone3: {}", errno_text(e)));
    }
    Ok(Outcome::Expect(1))
}

#[cfg(not(target_os = "linux"))]
fn clone3(_ctx: &ShapeCtx) -> ShapeResult {
    Ok(Outcome::Skip("clone3 is Linux-only".into()))
}

/// Read `/proc/self/stat`'s state letter without allocating ('?' when unreadable).
fn own_state_letter() -> u8 {
    let mut buf = [0u8; 1024];
    let n = read_small_file(b"/proc/self/stat\0", &mut buf);
    let text = &buf[..n];
    match text.iter().rposition(|&b| b == b')') {
        Some(i) if i + 2 < n => text[i + 2],
        _ => b'?',
    }
}

/// open + read + close into a stack buffer: async-signal-safe.
fn read_small_file(path_nul: &[u8], buf: &mut [u8]) -> usize {
    unsafe {
        let fd = libc::open(path_nul.as_ptr() as *const c_char, libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let mut total = 0;
        while total < buf.len() {
            let r = libc::read(fd, buf[total..].as_mut_ptr() as *mut c_void, buf.len() - total);
            if r <= 0 {
                break;
            }
            total += r as usize;
        }
        libc::close(fd);
        total
    }
}

/// pthread-exit-main: a child process whose main thread starts a worker and exits the way
/// pthread_exit does; the worker forks `pthread-exit-main/child` and stays (the process,
/// `pthread-exit-main/process`, lives on with a zombie leader).
fn pthread_exit_main(ctx: &ShapeCtx) -> ShapeResult {
    if fork_or_err("pthread-exit-main")? == 0 {
        // Child of a single-threaded coordinator: it may still allocate (std::thread) here.
        let c = *ctx;
        let spawned = std::thread::Builder::new().spawn(move || {
            // Wait until the leader is a zombie: the main thread is gone.
            for _ in 0..10_000 {
                match own_state_letter() {
                    b'Z' => break,
                    b'?' => {
                        // No /proc to look at (a BSD without procfs): give the exit a moment.
                        nap_ms(100);
                        break;
                    }
                    _ => nap_ms(1),
                }
            }
            let p = fork_retry();
            if p == 0 {
                c.say_alive(b"child");
                hold_forever();
            }
            if p < 0 {
                c.say_fail(b"fork from the worker", errno());
            }
            c.say_alive(b"process");
            hold_forever();
        });
        if spawned.is_err() {
            ctx.say_fail(b"spawn worker thread", 0);
            unsafe { libc::_exit(1) }
        }
        std::mem::forget(spawned);
        exit_main_thread();
    }
    Ok(Outcome::Expect(2))
}

/// End the calling (main) thread only, leaving the process to its other threads.
///
/// On Linux this is the `exit` system call (not `exit_group`), which is what `pthread_exit` ends
/// with; calling glibc's `pthread_exit` itself would force-unwind through Rust frames that own
/// heap data (std's `main` machinery), which Rust does not allow.
fn exit_main_thread() -> ! {
    #[cfg(target_os = "linux")]
    {
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        hold_forever()
    }
    #[cfg(not(target_os = "linux"))]
    unsafe {
        libc::pthread_exit(std::ptr::null_mut())
    }
}

/// exec-from-thread: a child process's second thread calls `execv("/bin/sleep", ..)`; the process
/// keeps its pid (`exec-from-thread/sleep`).
fn exec_from_thread(ctx: &ShapeCtx) -> ShapeResult {
    let mut fds = [0 as c_int; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe2: {}", errno_text(errno())));
    }
    let (exec_r, exec_w) = (fds[0], fds[1]);
    let sleep = SleepArgv::new();
    let pid = fork_or_err("exec-from-thread")?;
    if pid == 0 {
        unsafe { libc::close(exec_r) };
        let path = sleep.path.as_ptr() as usize;
        let argv = sleep.argv.as_ptr() as usize;
        let spawned = std::thread::Builder::new().spawn(move || {
            unsafe {
                libc::execv(path as *const c_char, argv as *const *const c_char);
            }
            let e: i32 = errno();
            unsafe {
                libc::write(exec_w, &e as *const i32 as *const c_void, 4);
                libc::_exit(127)
            }
        });
        if spawned.is_err() {
            unsafe { libc::_exit(126) }
        }
        std::mem::forget(spawned);
        // The exec in the other thread kills this thread.
        hold_forever();
    }
    unsafe { libc::close(exec_w) };
    // EOF on the close-on-exec pipe: the exec happened (or the child died).
    let mut e: i32 = 0;
    let n = read_with_timeout(
        exec_r,
        unsafe { std::slice::from_raw_parts_mut(&mut e as *mut i32 as *mut u8, 4) },
        SHAPE_TIMEOUT,
    );
    unsafe { libc::close(exec_r) };
    match n {
        Err(msg) => return Err(format!("waiting for the exec: {msg}")),
        Ok(4) => {
            waitpid_blocking(pid);
            return Err(format!("execv from a thread: {}", errno_text(e)));
        }
        Ok(_) => {}
    }
    if !child_still_running(pid) {
        return Err("the exec-from-thread child died".into());
    }
    ctx.say_alive_as(pid, b"sleep", None);
    Ok(Outcome::Expect(1))
}

/// Read up to buf.len() bytes until EOF or full, within `timeout`.
fn read_with_timeout(fd: c_int, buf: &mut [u8], timeout: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out after {timeout:?} with {got} of {} bytes", buf.len()));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as c_int) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(format!("poll: {}", errno_text(errno())));
        }
        if r == 0 {
            continue;
        }
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr() as *mut c_void, buf.len() - got) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(format!("read: {}", errno_text(errno())));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    Ok(got)
}

#[cfg(target_os = "linux")]
/// This process's pid in the initial namespace: the first field of `NSpid:` in
/// `/proc/self/status` (our /proc is the host's), else getpid(). Async-signal-safe.
fn global_pid() -> pid_t {
    let mut buf = [0u8; 4096];
    let n = read_small_file(b"/proc/self/status\0", &mut buf);
    let text = &buf[..n];
    let key = b"\nNSpid:";
    let mut i = 0;
    while i + key.len() <= text.len() {
        if &text[i..i + key.len()] == key {
            let mut j = i + key.len();
            while j < text.len() && (text[j] == b' ' || text[j] == b'\t') {
                j += 1;
            }
            let mut v: i64 = 0;
            let start = j;
            while j < text.len() && text[j].is_ascii_digit() {
                v = v * 10 + (text[j] - b'0') as i64;
                j += 1;
            }
            if j > start && v > 0 {
                return v as pid_t;
            }
            break;
        }
        i += 1;
    }
    raw_getpid()
}

/// pid-namespace: unshare(CLONE_NEWPID), fork the namespace's init (`pid-namespace/init`, pid 1
/// inside), which forks `pid-namespace/child`. Lines carry global pids.
#[cfg(target_os = "linux")]
fn pid_namespace(ctx: &ShapeCtx) -> ShapeResult {
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        let e1 = errno();
        if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) } < 0 {
            let e2 = errno();
            return Ok(Outcome::Skip(format!(
                "unshare(CLONE_NEWPID): {}; unshare(CLONE_NEWUSER|CLONE_NEWPID): {}",
                errno_text(e1),
                errno_text(e2)
            )));
        }
    }
    let init = fork_or_err("pid-namespace init")?;
    if init == 0 {
        ctx.say_alive_as(global_pid(), b"init", None);
        let p = fork_retry();
        if p == 0 {
            ctx.say_alive_as(global_pid(), b"child", None);
            hold_forever();
        }
        if p < 0 {
            ctx.say_fail(b"fork inside the namespace", errno());
        }
        reap_and_hold();
    }
    Ok(Outcome::Expect(2))
}

#[cfg(not(target_os = "linux"))]
fn pid_namespace(_ctx: &ShapeCtx) -> ShapeResult {
    Ok(Outcome::Skip("PID namespaces are Linux-only".into()))
}

/// relay: each generation forks the next and exits; generation 50 (`relay/50`) stays.
fn relay(ctx: &ShapeCtx) -> ShapeResult {
    let first = fork_or_err("relay")?;
    if first == 0 {
        let mut generation = 1;
        loop {
            if generation == RELAY_GENERATIONS {
                ctx.say_alive_as(raw_getpid(), b"", Some(generation));
                hold_forever();
            }
            let parent = raw_getpid();
            let p = fork_retry();
            if p == 0 {
                generation += 1;
                // Hand over only once the previous generation is gone.
                await_reparent(parent);
                continue;
            }
            if p < 0 {
                ctx.say_fail(b"relay fork", errno());
            }
            unsafe { libc::_exit(0) }
        }
    }
    waitpid_blocking(first);
    Ok(Outcome::Expect(1))
}

/// orphan-reparent: a middle process forks two children and exits; they are re-parented
/// (`orphan-reparent/orphan1`, `/orphan2`).
fn orphan_reparent(ctx: &ShapeCtx) -> ShapeResult {
    let middle = fork_or_err("orphan-reparent")?;
    if middle == 0 {
        let me = raw_getpid();
        for i in 1..=2u32 {
            let p = fork_retry();
            if p == 0 {
                await_reparent(me);
                ctx.say_alive_as(raw_getpid(), b"orphan", Some(i));
                hold_forever();
            }
            if p < 0 {
                ctx.say_fail(b"fork", errno());
            }
        }
        unsafe { libc::_exit(0) }
    }
    waitpid_blocking(middle);
    Ok(Outcome::Expect(2))
}

/// Make the calling process a subreaper for its descendants.
fn become_subreaper() -> Result<(), c_int> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    #[cfg(target_os = "freebsd")]
    let r = unsafe { libc::procctl(libc::P_PID, 0, libc::PROC_REAP_ACQUIRE, std::ptr::null_mut()) };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    return Err(libc::ENOSYS);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// nested-subreaper: a child becomes a subreaper (`nested-subreaper/subreaper`) and double-forks;
/// the grandchild exits and the great-grandchild (`nested-subreaper/adopted`) is re-parented to
/// the subreaper.
fn nested_subreaper(ctx: &ShapeCtx) -> ShapeResult {
    let reaper = fork_or_err("nested-subreaper")?;
    if reaper == 0 {
        if let Err(e) = become_subreaper() {
            ctx.say_fail(b"become a subreaper", e);
            unsafe { libc::_exit(1) }
        }
        let middle = fork_retry();
        if middle == 0 {
            let me = raw_getpid();
            let p = fork_retry();
            if p == 0 {
                await_reparent(me);
                ctx.say_alive(b"adopted");
                hold_forever();
            }
            if p < 0 {
                ctx.say_fail(b"fork", errno());
            }
            unsafe { libc::_exit(0) }
        }
        if middle < 0 {
            ctx.say_fail(b"fork", errno());
        } else {
            waitpid_blocking(middle);
        }
        ctx.say_alive(b"subreaper");
        reap_and_hold();
    }
    Ok(Outcome::Expect(2))
}

fn run_shape(shape: &str, ctx: &ShapeCtx) -> ShapeResult {
    match shape {
        "fork-chain" => fork_chain(ctx),
        "vfork-exec" => vfork_exec(ctx),
        "posix-spawn" => posix_spawn(ctx),
        "fork-from-thread" => fork_from_thread(ctx),
        "double-fork-setsid" => double_fork_setsid(ctx),
        "clone-parent" => clone_parent(ctx),
        "clone3" => clone3(ctx),
        "pthread-exit-main" => pthread_exit_main(ctx),
        "exec-from-thread" => exec_from_thread(ctx),
        "pid-namespace" => pid_namespace(ctx),
        "relay" => relay(ctx),
        "orphan-reparent" => orphan_reparent(ctx),
        "nested-subreaper" => nested_subreaper(ctx),
        other => Err(format!("unknown shape {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinators

/// Outcome of coordinating one shape in the current process.
enum Coordinated {
    /// The shape is in place (or failed); this many live lines were written.
    Lines(usize),
    Skipped,
}

/// Build `shape` from the current process and wait until all its processes have reported.
/// Writes `SKIP` / `FAIL` lines itself. The live-line count excludes the coordinator's own line.
fn coordinate(shape: &'static str, report_fd: c_int) -> Coordinated {
    let mut fds = [0 as c_int; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        plain_line(report_fd, &format!("FAIL {shape} pipe2: {}", errno_text(errno())));
        return Coordinated::Lines(0);
    }
    let (ready_r, ready_w) = (fds[0], fds[1]);
    let ctx = ShapeCtx { shape, report_fd, ready_w };
    let result = run_shape(shape, &ctx);
    let expected = match result {
        Ok(Outcome::Expect(n)) => n,
        Ok(Outcome::Skip(reason)) => {
            plain_line(report_fd, &format!("SKIP {shape} {reason}"));
            unsafe {
                libc::close(ready_r);
                libc::close(ready_w);
            }
            return Coordinated::Skipped;
        }
        Err(msg) => {
            plain_line(report_fd, &format!("FAIL {shape} {msg}"));
            0
        }
    };
    let mut buf = vec![0u8; expected];
    let got = match read_with_timeout(ready_r, &mut buf, SHAPE_TIMEOUT) {
        Ok(n) => {
            if n < expected {
                plain_line(report_fd, &format!("FAIL {shape} only {n} of {expected} processes reported"));
            }
            n
        }
        Err(msg) => {
            plain_line(report_fd, &format!("FAIL {shape} {msg}"));
            drain_count(ready_r)
        }
    };
    // Lines that came in on a failure path beyond `expected` still count.
    let extra = drain_count(ready_r);
    unsafe {
        libc::close(ready_r);
        libc::close(ready_w);
    }
    Coordinated::Lines(got + extra)
}

/// Bytes readable right now without blocking.
fn drain_count(fd: c_int) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 256];
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 || pfd.revents & libc::POLLIN == 0 {
            return total;
        }
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        if n <= 0 {
            return total;
        }
        total += n as usize;
    }
}

fn plain_line(fd: c_int, text: &str) {
    let mut line = Line::new();
    line.push(text.replace('\n', " ").as_bytes());
    line.write_to(fd);
}

fn own_line(fd: c_int, role: &str) {
    let mut line = Line::new();
    line.num(raw_getpid() as i64).push(b" ").push(role.as_bytes());
    line.write_to(fd);
}

fn ready_line(fd: c_int, n: usize) {
    let mut line = Line::new();
    line.push(b"READY ").num(n as i64);
    line.write_to(fd);
}

fn standalone(shape: &'static str, report_fd: c_int) -> ! {
    match coordinate(shape, report_fd) {
        Coordinated::Skipped => {
            ready_line(report_fd, 0);
            unsafe { libc::_exit(0) }
        }
        Coordinated::Lines(n) => {
            own_line(report_fd, &format!("{shape}/top"));
            ready_line(report_fd, n + 1);
            reap_and_hold();
        }
    }
}

/// `all`: one runner child per shape, one after the other; each runner coordinates its shape and
/// sends its count of live lines (its own included) as a decimal line on a status pipe.
fn all(report_fd: c_int) -> ! {
    let mut total = 0usize;
    for &shape in ALL_SHAPES {
        let mut fds = [0 as c_int; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            plain_line(report_fd, &format!("FAIL {shape} pipe2: {}", errno_text(errno())));
            continue;
        }
        let (st_r, st_w) = (fds[0], fds[1]);
        let runner = fork_retry();
        if runner == 0 {
            unsafe { libc::close(st_r) };
            // The top is single-threaded, so the runner may use all of std.
            let msg = match coordinate(shape, report_fd) {
                Coordinated::Skipped => "skip\n".to_string(),
                Coordinated::Lines(n) => {
                    own_line(report_fd, &format!("{shape}/runner"));
                    format!("{}\n", n + 1)
                }
            };
            unsafe {
                libc::write(st_w, msg.as_ptr() as *const c_void, msg.len());
                libc::close(st_w);
            }
            if msg.starts_with("skip") {
                unsafe { libc::_exit(0) }
            }
            reap_and_hold();
        }
        unsafe { libc::close(st_w) };
        if runner < 0 {
            plain_line(report_fd, &format!("FAIL {shape} fork runner: {}", errno_text(errno())));
            unsafe { libc::close(st_r) };
            continue;
        }
        // Read up to the newline, not to EOF: the shape's processes inherited the write end.
        let mut buf = Vec::new();
        let deadline = Instant::now() + SHAPE_TIMEOUT + Duration::from_secs(5);
        let status = loop {
            let mut byte = [0u8; 1];
            match read_with_timeout(st_r, &mut byte, deadline.saturating_duration_since(Instant::now())) {
                Ok(1) if byte[0] != b'\n' => buf.push(byte[0]),
                Ok(_) => break Ok(buf.len()),
                Err(msg) => break Err(msg),
            }
        };
        match status {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let text = text.trim();
                if text == "skip" {
                    waitpid_blocking(runner);
                } else if let Ok(k) = text.parse::<usize>() {
                    total += k;
                } else {
                    plain_line(report_fd, &format!("FAIL {shape} runner {runner} ended without a count"));
                }
            }
            Err(msg) => plain_line(report_fd, &format!("FAIL {shape} runner {runner}: {msg}")),
        }
        unsafe { libc::close(st_r) };
    }
    own_line(report_fd, "all/top");
    ready_line(report_fd, total + 1);
    reap_and_hold();
}

/// churn: N sequential fork + _exit + wait; the top stays alive (`churn/top`, `READY 1`).
fn churn(count: u64, report_fd: c_int) -> ! {
    for i in 0..count {
        let p = fork_retry();
        if p == 0 {
            unsafe { libc::_exit(0) }
        }
        if p < 0 {
            plain_line(report_fd, &format!("FAIL churn fork #{i}: {}", errno_text(errno())));
            break;
        }
        waitpid_blocking(p);
    }
    own_line(report_fd, "churn/top");
    ready_line(report_fd, 1);
    reap_and_hold();
}

fn usage() -> ! {
    eprintln!("usage: vpstag-scenario SHAPE [--report FILE] [--count N]\nshapes: {} churn all", ALL_SHAPES.join(" "));
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut shape: Option<String> = None;
    let mut report: Option<String> = None;
    let mut count = DEFAULT_CHURN;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--report" => report = Some(args.next().unwrap_or_else(|| usage())),
            "--count" => {
                count = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
            }
            "-h" | "--help" => usage(),
            s if shape.is_none() && !s.starts_with('-') => shape = Some(s.to_string()),
            _ => usage(),
        }
    }
    let shape = shape.unwrap_or_else(|| usage());
    let report_fd = match &report {
        None => 1,
        Some(path) => {
            let c = CString::new(path.as_str()).unwrap_or_else(|_| usage());
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                )
            };
            if fd < 0 {
                eprintln!("vpstag-scenario: cannot open {path}: {}", errno_text(errno()));
                std::process::exit(1);
            }
            fd
        }
    };
    match shape.as_str() {
        "all" => all(report_fd),
        "churn" => churn(count, report_fd),
        s => match ALL_SHAPES.iter().find(|&&k| k == s) {
            Some(&k) => standalone(k, report_fd),
            None => usage(),
        },
    }
}
