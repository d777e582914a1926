//! Small wrappers over the system calls the benchmark uses.

use std::ffi::CString;
use std::io;
use std::os::raw::c_char;

extern "C" {
    static environ: *const *const c_char;
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Seconds since an arbitrary start.
pub fn now_secs() -> f64 {
    mono_ns() as f64 / 1e9
}

/// Pins the calling thread (and so the children it forks from now on) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// User + system CPU seconds of this process (all threads, not its children).
pub fn cpu_self() -> f64 {
    rusage_secs(libc::RUSAGE_SELF)
}

/// Voluntary context switches of this process so far (each a sleep and a wake-up).
pub fn wakeups_self() -> u64 {
    // SAFETY: valid out pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_nvcsw as u64
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: valid out pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn tv(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// Waits for the child `pid` and returns its raw status and its own CPU seconds (wait4).
pub fn wait_child(pid: i32) -> io::Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: valid out pointers.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, tv(ru.ru_utime) + tv(ru.ru_stime)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// waitpid(pid), retrying on EINTR; ignores errors (the child may have been reaped elsewhere).
pub fn reap(pid: i32) {
    let mut st = 0;
    loop {
        // SAFETY: valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// posix_spawn of `argv[0]` (a path) with `argv`, the current environment; returns the pid.
pub struct Spawner {
    path: CString,
    _args: Vec<CString>,
    argv: Vec<*mut c_char>,
}

impl Spawner {
    /// Prepares a spawn of `argv` (`argv[0]` is the path).
    pub fn new(argv: &[&str]) -> Spawner {
        let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut p: Vec<*mut c_char> = args.iter().map(|c| c.as_ptr() as *mut c_char).collect();
        p.push(std::ptr::null_mut());
        Spawner { path: args[0].clone(), _args: args, argv: p }
    }

    /// Spawns one; returns the child's pid.
    pub fn spawn(&self) -> io::Result<i32> {
        let mut pid = 0;
        // SAFETY: path and argv are valid NUL-terminated strings kept alive by self; environ is
        // the process environment.
        let r = unsafe {
            libc::posix_spawn(
                &mut pid,
                self.path.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                self.argv.as_ptr(),
                environ as *const *mut c_char,
            )
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(pid)
    }
}

/// What /proc/PID/stat says of a process.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub state: u8,
    pub start: u64,
}

/// Reads /proc/PID/stat; `None` when the process is gone.
pub fn read_stat(pid: i32) -> Option<Stat> {
    let s = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

/// Parses a /proc/PID/stat line (the comm may hold spaces and parentheses).
pub fn parse_stat(s: &[u8]) -> Option<Stat> {
    let open = s.iter().position(|&b| b == b'(')?;
    let close = s.iter().rposition(|&b| b == b')')?;
    let pid: i32 = std::str::from_utf8(&s[..open]).ok()?.trim().parse().ok()?;
    let rest = std::str::from_utf8(&s[close + 1..]).ok()?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let state = f.first()?.as_bytes()[0];
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some(Stat { pid, ppid, state, start })
}

/// Every pid in /proc (thread-group leaders).
pub fn all_pids() -> Vec<i32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                v.push(n);
            }
        }
    }
    v
}

/// The value of `key` in /proc/PID/environ.
pub fn environ_var(pid: i32, key: &str) -> Option<String> {
    let data = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{key}=");
    data.split(|&b| b == 0)
        .find(|kv| kv.starts_with(prefix.as_bytes()))
        .map(|kv| String::from_utf8_lossy(&kv[prefix.len()..]).into_owned())
}

/// A pipe; both ends close-on-exec unless `inherit`.
pub fn pipe(cloexec: bool) -> io::Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), if cloexec { libc::O_CLOEXEC } else { 0 }) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

/// A stream socket pair; the first end close-on-exec, the second inherited by children.
pub fn socketpair() -> io::Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on our own descriptor.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((fds[0], fds[1]))
}

/// Writes all of `buf` to `fd`.
pub fn write_all(fd: i32, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: valid buffer.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; false at EOF.
pub fn read_exact(fd: i32, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: valid buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(false);
        }
        got += n as usize;
    }
    Ok(true)
}

/// close(2).
pub fn close(fd: i32) {
    // SAFETY: closing a descriptor we own.
    unsafe { libc::close(fd) };
}

/// kill(2), ignoring errors.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain system call.
    unsafe { libc::kill(pid, sig) };
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`): a
/// process whose parent exits is re-parented here instead of to init, so its exit status can be
/// collected here.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU seconds (user + system, all its threads, the ended ones included) that process `pid` has
/// used so far, to the nanosecond (`clock_getcpuclockid`).
pub fn process_cpu_secs(pid: i32) -> io::Result<f64> {
    let mut clk: libc::clockid_t = 0;
    // SAFETY: valid out pointer.
    let r = unsafe { libc::clock_getcpuclockid(pid, &mut clk) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(clk, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// User + system CPU seconds of process `pid` by /proc/PID/stat (utime + stime, in clock ticks:
/// 10 ms here), a cross-check of [`process_cpu_secs`].
pub fn stat_cpu_secs(pid: i32) -> io::Result<f64> {
    let s = std::fs::read(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::other(format!("/proc/{pid}/stat: unexpected format"));
    let close = s.iter().rposition(|&b| b == b')').ok_or_else(bad)?;
    let rest = std::str::from_utf8(&s[close + 1..]).map_err(|_| bad())?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest starts at field 3: utime is field 14, stime 15.
    let ticks = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok()).ok_or_else(bad);
    let (u, st) = (ticks(14)?, ticks(15)?);
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((u + st) as f64 / hz)
}

/// Asks the kernel to send `sig` to the calling process when its parent thread ends (for use
/// between fork and exec: async-signal-safe).
pub fn die_with_parent(sig: i32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Context switches of every live thread of `pid`: tid -> (voluntary, involuntary), from
/// /proc/PID/task/*/status. A thread that has ended is not in it.
pub fn thread_switches(pid: i32) -> io::Result<std::collections::HashMap<i32, (u64, u64)>> {
    let mut out = std::collections::HashMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(e.path().join("status")) else { continue };
        if let Some(v) = parse_switches(&text) {
            out.insert(tid, v);
        }
    }
    Ok(out)
}

/// (voluntary_ctxt_switches, nonvoluntary_ctxt_switches) of a /proc/PID/status text.
pub fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim_start_matches(':').trim().parse().ok()))
    };
    Some((field("voluntary_ctxt_switches")?, field("nonvoluntary_ctxt_switches")?))
}

/// The switches between two [`thread_switches`] readings: per thread, the growth of the ones in
/// both, and all of the ones born in between (the ones that ended in between are lost).
pub fn switches_between(
    before: &std::collections::HashMap<i32, (u64, u64)>,
    after: &std::collections::HashMap<i32, (u64, u64)>,
) -> (u64, u64) {
    let (mut v, mut n) = (0, 0);
    for (tid, &(va, na)) in after {
        let (vb, nb) = before.get(tid).copied().unwrap_or((0, 0));
        v += va.saturating_sub(vb);
        n += na.saturating_sub(nb);
    }
    (v, n)
}

/// The type of the file system holding `path`, by name when it is a common one (`statfs`).
pub fn fs_type(path: &std::path::Path) -> io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::other(e.to_string()))?;
    // SAFETY: a zeroed statfs is a valid out buffer; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match st.f_type as u64 {
        0xEF53 => "ext2/ext3/ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x8584_58f6 => "ramfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("0x{other:x}"),
    })
}

/// The load averages over 1, 5 and 15 minutes, as /proc/loadavg gives them ("" if unreadable).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The date and time now, UTC, to the minute (`date -u`; "" if it cannot be run).
pub fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The path of this executable.
pub fn self_exe() -> String {
    std::env::current_exe().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| "/proc/self/exe".into())
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn stat_lines() {
        let line =
            b"1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.pid, s.ppid, s.state, s.start), (1234, 1, b'S', 98765));
        assert!(parse_stat(b"garbage").is_none());
    }

    #[test]
    fn context_switches() {
        let status = "Name:\tvpstag\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(super::parse_switches(status), Some((120, 7)));
        assert_eq!(super::parse_switches("Name:\tx\n"), None);
        let before = [(10, (5, 1)), (11, (3, 0)), (12, (9, 9))].into_iter().collect();
        // 10 grew, 11 unchanged, 12 ended (lost), 13 born.
        let after = [(10, (8, 2)), (11, (3, 0)), (13, (4, 1))].into_iter().collect();
        assert_eq!(super::switches_between(&before, &after), (7, 2));
    }
}
