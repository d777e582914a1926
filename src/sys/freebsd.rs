//! FreeBSD: the process table through `sysctl(kern.proc.*)`, `CLOCK_REALTIME`,
//! `procctl(PROC_REAP_ACQUIRE)`, and the kqueue backend.
//!
//! `kinfo_proc` is read with `libc::sysctl` into a byte buffer and copied record by record, with
//! the stride the kernel states in `ki_structsize`: the `sysctl` crate's `value_oid_as`
//! reinterprets bytes without checking size or alignment (its issue 33), and `kinfo_proc` is not
//! the same struct in every release and architecture. The fields read here (pid, ppid, uid, start,
//! state, command name, thread count) lie in the part of the struct that has kept its layout since
//! FreeBSD 7; a record shorter than that part is refused rather than misread.
//!
//! Start times are `ki_start` in microseconds since the epoch. The kernel computes it as boot time
//! plus the process's start on the uptime clock, so when the clock is stepped (`settimeofday`,
//! ntpd's steps, a leap second) every `ki_start` moves by the step: see [`start_tolerance`].

use std::ffi::CStr;
use std::io;
use std::mem::{offset_of, size_of};

use vpstag_tracker::{ForkTracker, Pid, ProcessId, StartTime};

use super::ProcInfo;
use crate::{BackendChoice, Error};

/// The end of the last `kinfo_proc` field read here: a record must be at least this long.
fn needed_len() -> usize {
    use libc::kinfo_proc as K;
    [
        offset_of!(K, ki_structsize) + size_of::<libc::c_int>(),
        offset_of!(K, ki_pid) + size_of::<libc::pid_t>(),
        offset_of!(K, ki_ppid) + size_of::<libc::pid_t>(),
        offset_of!(K, ki_uid) + size_of::<libc::uid_t>(),
        offset_of!(K, ki_start) + size_of::<libc::timeval>(),
        offset_of!(K, ki_stat) + size_of::<libc::c_char>(),
        offset_of!(K, ki_comm) + size_of::<[libc::c_char; libc::COMMLEN + 1]>(),
        offset_of!(K, ki_numthreads) + size_of::<libc::c_int>(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// `sysctl(mib)` into a buffer sized by a first probe; retried when the answer grew in between
/// (`ENOMEM`), which happens when processes are created between the two calls.
fn sysctl_bytes(mib: &[libc::c_int]) -> io::Result<Vec<u8>> {
    let namelen = libc::c_uint::try_from(mib.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    for _ in 0..16 {
        let mut len: libc::size_t = 0;
        // SAFETY: a size probe: no old buffer, no new value; `len` is a valid out-pointer.
        let r = unsafe { libc::sysctl(mib.as_ptr(), namelen, std::ptr::null_mut(), &mut len, std::ptr::null(), 0) };
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        // Room for the processes created before the second call.
        len += len / 8;
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` has `len` writable bytes; the kernel writes at most `len` and stores the
        // count it wrote in `len`.
        let r = unsafe { libc::sysctl(mib.as_ptr(), namelen, buf.as_mut_ptr().cast(), &mut len, std::ptr::null(), 0) };
        if r == 0 {
            buf.truncate(len);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOMEM) {
            return Err(e);
        }
    }
    Err(io::Error::other("sysctl kern.proc: the answer kept growing between size probe and read"))
}

/// Splits a `kern.proc` answer into records of the kernel's `ki_structsize`.
fn records(buf: &[u8]) -> io::Result<Vec<libc::kinfo_proc>> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let head: [u8; 4] = buf.get(..4).and_then(|b| b.try_into().ok()).unwrap_or_default();
    let stride = usize::try_from(i32::from_ne_bytes(head)).unwrap_or(0);
    let needed = needed_len();
    if stride < needed || buf.len() % stride != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "kern.proc returned {} bytes in records of ki_structsize {stride}; this vpstag reads the first \
                 {needed} bytes of each (built for kinfo_proc of {} bytes)",
                buf.len(),
                size_of::<libc::kinfo_proc>()
            ),
        ));
    }
    let take = stride.min(size_of::<libc::kinfo_proc>());
    let mut out = Vec::with_capacity(buf.len() / stride);
    for rec in buf.chunks_exact(stride) {
        // SAFETY: kinfo_proc is plain data (integers, arrays, raw pointers): all-zero is valid.
        let mut kp: libc::kinfo_proc = unsafe { std::mem::zeroed() };
        // SAFETY: `take` bytes are readable in `rec` and writable in `kp`; they do not overlap,
        // and any byte pattern is a valid kinfo_proc.
        unsafe { std::ptr::copy_nonoverlapping(rec.as_ptr(), (&mut kp as *mut libc::kinfo_proc).cast::<u8>(), take) };
        if usize::try_from(kp.ki_structsize).ok() != Some(stride) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "kern.proc records of different sizes"));
        }
        out.push(kp);
    }
    Ok(out)
}

fn info_of(kp: &libc::kinfo_proc) -> Option<ProcInfo> {
    // Pid 0 is the kernel's own process: not one that vpstag can tag.
    let pid = Pid::new(kp.ki_pid)?;
    let secs = u64::try_from(kp.ki_start.tv_sec).unwrap_or(0);
    let usecs = u64::try_from(kp.ki_start.tv_usec).unwrap_or(0);
    let comm: Vec<u8> = kp.ki_comm.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Some(ProcInfo {
        id: ProcessId { pid, start: StartTime(secs.saturating_mul(1_000_000).saturating_add(usecs)) },
        ppid: Pid::new(kp.ki_ppid),
        // The effective uid, like the owner of /proc/PID on Linux.
        uid: kp.ki_uid,
        threads: u32::try_from(kp.ki_numthreads).unwrap_or(1),
        zombie: kp.ki_stat == libc::SZOMB,
        name: String::from_utf8_lossy(&comm).into_owned(),
    })
}

/// Every process (`KERN_PROC_PROC`: one record per process, not per thread).
pub(crate) fn scan() -> io::Result<Vec<ProcInfo>> {
    let buf = sysctl_bytes(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PROC])?;
    Ok(records(&buf)?.iter().filter_map(info_of).collect())
}

/// One process, or `None` if it does not exist.
pub(crate) fn process(pid: Pid) -> io::Result<Option<ProcInfo>> {
    match sysctl_bytes(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid.as_raw()]) {
        Ok(buf) => Ok(records(&buf)?.first().and_then(info_of).filter(|i| i.id.pid == pid)),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The command line of a process, for display (`kern.proc.args`).
pub fn cmdline(pid: Pid) -> Option<String> {
    let args = sysctl_bytes(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_ARGS, pid.as_raw()]).ok()?;
    let parts: Vec<String> =
        args.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    if parts.is_empty() {
        process(pid).ok().flatten().map(|i| format!("[{}]", i.name))
    } else {
        Some(parts.join(" "))
    }
}

/// Two `ki_start` values within 2 s are the same process.
///
/// Why 2 s: a clock step moves every `ki_start` by the step. A leap second moves it by exactly
/// 1 s, and ntpd steps (instead of slewing) only past 128 ms, typically by well under a second once
/// the boot-time correction is done. A larger step (an operator's `date`) is beyond any tolerance
/// that still tells processes apart, and the core will see those processes as new. On the other
/// side, for a PID to come back within 2 s the whole PID space (`kern.pid_max`, 99 999 by default,
/// allocated in order) must be cycled through, some 50 000 forks a second. Estimated start times
/// (the kqueue backend reports no child start; the core takes "now" when the event is read) also
/// land within this margin unless the reader falls seconds behind.
pub(crate) fn start_tolerance() -> u64 {
    2_000_000
}

/// Start times are microseconds.
pub(crate) fn ns_per_start_unit() -> u64 {
    1_000
}

/// Now on `CLOCK_REALTIME`, the clock `ki_start` is on, in nanoseconds since the epoch.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Makes the calling process the reaper of its descendants (`procctl(PROC_REAP_ACQUIRE)`), so that
/// they stay below it when their parents exit and `PROC_REAP_GETPIDS` lists them all. Returns 0 or
/// an errno. Async-signal-safe: one system call, no allocation.
pub fn become_subreaper() -> i32 {
    // SAFETY: getpid has no preconditions; PROC_REAP_ACQUIRE takes no data (null).
    let r = unsafe {
        libc::procctl(libc::P_PID, libc::id_t::from(libc::getpid()), libc::PROC_REAP_ACQUIRE, std::ptr::null_mut())
    };
    if r == 0 {
        return 0;
    }
    match io::Error::last_os_error().raw_os_error() {
        // Already a reaper: what was asked for.
        Some(libc::EBUSY) => 0,
        Some(e) => e,
        None => libc::EINVAL,
    }
}

/// Sets the name `ps` shows (the process's arguments, as `setproctitle` does, but with one system
/// call and no allocation, so it is async-signal-safe). The command name (`ki_comm`) stays.
pub(crate) fn set_process_name(name: &CStr) {
    let bytes = name.to_bytes_with_nul();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_ARGS, pid];
    // SAFETY: a write-only sysctl: no old buffer; the new value is `bytes`, valid for its length.
    unsafe {
        libc::sysctl(mib.as_ptr(), 4, std::ptr::null_mut(), std::ptr::null_mut(), bytes.as_ptr().cast(), bytes.len());
    }
}

/// The `kinfo_proc` record of `pid` (`kern.proc.pid`); `None` when it is gone.
fn kinfo(pid: Pid) -> io::Result<Option<libc::kinfo_proc>> {
    let buf = match sysctl_bytes(&[libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, pid.as_raw()]) {
        Ok(buf) => buf,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(records(&buf)?.into_iter().find(|kp| kp.ki_pid == pid.as_raw()))
}

/// Whether `pid` ignores `SIGCHLD` (`kinfo_proc`'s `ki_sigignore`), so that the kernel reaps its
/// exited children itself and adds their time to nobody; `None` when it is gone. `SA_NOCLDWAIT`
/// with a handler, which has the same effect, is not shown there: it reads as `false`.
///
/// # References
/// - `kern.proc.pid` ([`sysctl(3)`](https://man.freebsd.org/cgi/man.cgi?query=sysctl&sektion=3)),
///   `struct kinfo_proc` in `<sys/user.h>`
pub(crate) fn sigchld_ignored(pid: Pid) -> io::Result<Option<bool>> {
    let Some(kp) = kinfo(pid)? else { return Ok(None) };
    // SAFETY: sigismember reads the sigset_t it is given, a field of our own copy.
    Ok(Some(unsafe { libc::sigismember(&kp.ki_sigignore, libc::SIGCHLD) } == 1))
}

/// What `pid` has used so far (`kinfo_proc`: `ki_rusage`, its own CPU time; `ki_rusage_ch`, that
/// of the children it waited for; `ki_rssize` pages resident); `None` when it is gone. A record
/// too short to hold these fields (a kernel whose `kinfo_proc` is older than this vpstag's) reads
/// them as zero rather than misreading.
///
/// # References
/// - `kern.proc.pid` ([`sysctl(3)`](https://man.freebsd.org/cgi/man.cgi?query=sysctl&sektion=3)),
///   `struct kinfo_proc` in `<sys/user.h>`
pub(crate) fn proc_usage(pid: Pid) -> io::Result<Option<super::ProcUsage>> {
    let Some(kp) = kinfo(pid)? else { return Ok(None) };
    let Some(info) = info_of(&kp) else { return Ok(None) };
    // Fields past the record the kernel gave were left zero by `records`.
    // SAFETY: getpagesize has no preconditions.
    let page = u64::try_from(unsafe { libc::getpagesize() }).unwrap_or(4096);
    Ok(Some(super::ProcUsage {
        id: info.id,
        ppid: info.ppid,
        cpu_self_ns: super::rusage_ns(&kp.ki_rusage),
        cpu_children_ns: super::rusage_ns(&kp.ki_rusage_ch),
        rss_bytes: u64::try_from(kp.ki_rssize).unwrap_or(0).saturating_mul(page),
        zombie: info.zombie,
    }))
}

/// Opens a backend: kqueue is the one FreeBSD has.
pub(crate) fn open_backend(choice: BackendChoice, notes: &mut Vec<String>) -> Result<Box<dyn ForkTracker>, Error> {
    let _ = notes;
    match choice {
        BackendChoice::Auto | BackendChoice::Kqueue => Ok(Box::new(vpstag_kqueue::Kqueue::new()?)),
        BackendChoice::Cnproc | BackendChoice::Ptrace | BackendChoice::Ebpf => Err(Error::BackendUnavailable {
            backend: match choice {
                BackendChoice::Cnproc => "cnproc",
                BackendChoice::Ptrace => "ptrace",
                _ => "ebpf",
            },
            why: "this backend is Linux-only; on FreeBSD use kqueue (the default)".into(),
        }),
    }
}

/// No cgroups here: an `Unsupported` error (`crate::cgroup` finds no cgroup v2 mount before it
/// would ask).
pub(crate) fn fs_magic(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    let _ = fd;
    Err(io::Error::new(io::ErrorKind::Unsupported, "cgroups are a Linux facility"))
}

/// Closes every descriptor from `first` on (`closefrom`). Async-signal-safe.
pub(crate) fn close_from(first: i32, _max_fd: i32) {
    // SAFETY: closefrom takes an integer only.
    unsafe { libc::closefrom(first) };
}

/// These run on FreeBSD only (the vagrant box, the CI VM); here they are only compiled.
#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Pid {
        Pid::new(i32::try_from(std::process::id()).unwrap()).unwrap()
    }

    #[test]
    fn records_are_at_least_as_long_as_the_fields_read() {
        assert!(needed_len() <= size_of::<libc::kinfo_proc>());
        assert!(records(&[]).unwrap().is_empty());
        // A stride shorter than the fields read is refused, not misread.
        let mut short = vec![0u8; 64];
        short[..4].copy_from_slice(&64i32.to_ne_bytes());
        assert_eq!(records(&short).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn scan_and_process_agree_on_this_process() {
        let all = scan().expect("scan");
        let listed = all.iter().find(|p| p.id.pid == me()).expect("this process in the scan");
        let one = process(me()).expect("process").expect("this process");
        assert_eq!(one.id, listed.id);
        // SAFETY: getppid has no preconditions.
        assert_eq!(one.ppid, Pid::new(unsafe { libc::getppid() }));
        assert!(one.threads >= 1);
        assert!(!one.zombie);
        assert!(!one.name.is_empty());
        let now_us = now_ns() / ns_per_start_unit();
        assert!(one.id.start.0 <= now_us + start_tolerance(), "started in the future");
        assert!(cmdline(me()).is_some());
    }

    #[test]
    fn a_process_that_does_not_exist_is_none() {
        assert!(process(Pid::new(i32::MAX).unwrap()).expect("process").is_none());
    }
}
