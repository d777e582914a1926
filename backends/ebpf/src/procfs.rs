//! What the backend reads from /proc and /sys: pure parsers (tested without a kernel) and, on
//! Linux, the reads themselves.

/// `CAP_SYS_ADMIN`.
pub const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_PERFMON` (Linux 5.8).
pub const CAP_PERFMON: u32 = 38;
/// `CAP_BPF` (Linux 5.8).
pub const CAP_BPF: u32 = 39;

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot).
pub fn parse_stat_start(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain anything, so count from the
    // last ')': field 3 is the first after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// What the backend needs of `/proc/PID/stat`: enough to tell a process from a later one with
/// the same pid, and a live process from one that has finished exiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 3, the state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Field 9, the task's `PF_*` flags.
    pub flags: u64,
    /// Field 20, the threads the process still counts (a zombie leader counts itself).
    pub threads: u64,
    /// Field 22, the start time in clock ticks since boot.
    pub start: u64,
}

impl Stat {
    /// Whether the whole process has exited: dead, or a zombie with no other thread left. (A
    /// zombie leader whose other threads still run is a live process.)
    pub fn exited(&self) -> bool {
        matches!(self.state, 'X' | 'x') || (self.state == 'Z' && self.threads <= 1)
    }

    /// Whether this task has begun to exit (`PF_EXITING`, set at the start of `do_exit`, before
    /// the exit tracepoint).
    pub fn exiting(&self) -> bool {
        self.flags & PF_EXITING != 0
    }
}

/// `PF_EXITING` (include/linux/sched.h), stable since Linux 2.6.
pub const PF_EXITING: u64 = 0x4;

/// Fields 3, 9, 20 and 22 of `/proc/PID/stat`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let flags = f.nth(9 - 4)?.parse().ok()?;
    let threads = f.nth(20 - 10)?.parse().ok()?;
    let start = f.nth(22 - 21)?.parse().ok()?;
    Some(Stat { state, flags, threads, start })
}

/// The `Tgid:` line of `/proc/PID/status`.
pub fn parse_status_tgid(status: &str) -> Option<i32> {
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// The effective capability set (`CapEff:` of `/proc/thread-self/status`).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Whether an effective capability set can load and attach the tracing programs: `CAP_BPF` and
/// `CAP_PERFMON`, or `CAP_SYS_ADMIN` (which covers both, and is all that kernels before 5.8
/// know).
pub fn caps_suffice(cap_eff: u64) -> bool {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    (has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN)
}

/// The `CLOCK_BOOTTIME` offset of a time namespace, from `/proc/self/timens_offsets`
/// (`boottime <secs> <nanosecs>`; the clock may also be given by its id, 7), in nanoseconds.
pub fn parse_timens_boottime(offsets: &str) -> Option<i64> {
    offsets.lines().find_map(|l| {
        let mut f = l.split_ascii_whitespace();
        let clock = f.next()?;
        if clock != "boottime" && clock != "7" {
            return None;
        }
        let secs: i64 = f.next()?.parse().ok()?;
        let nsecs: i64 = f.next()?.parse().ok()?;
        secs.checked_mul(1_000_000_000)?.checked_add(nsecs)
    })
}

/// The active kernel lockdown mode from `/sys/kernel/security/lockdown`
/// (`none [integrity] confidentiality`): the word in brackets.
pub fn parse_lockdown(text: &str) -> Option<&str> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(&text[start..start + len])
}

#[cfg(target_os = "linux")]
pub use self::linux::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;

    use vpstag_tracker::{Pid, StartTime};

    /// The start time of `pid` (its `/proc/PID/stat` field 22).
    pub fn start_time(pid: Pid) -> io::Result<StartTime> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw()))?;
        super::parse_stat_start(&stat)
            .map(StartTime)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable /proc/{pid}/stat")))
    }

    /// `/proc/PID/stat` of `pid`: state, flags, threads and start time.
    pub fn stat(pid: Pid) -> io::Result<super::Stat> {
        stat_at(&format!("/proc/{}/stat", pid.as_raw()))
    }

    /// Reads a `stat` file into a buffer on the stack (one open, reads, one close: no `statx`,
    /// no allocation but the path's), as `tag_of` does for every look-up.
    fn stat_at(path: &str) -> io::Result<super::Stat> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut buf = [0u8; 2048];
        let mut len = 0;
        while len < buf.len() {
            match f.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        std::str::from_utf8(&buf[..len])
            .ok()
            .and_then(super::parse_stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable {path}")))
    }

    /// Whether every thread of the process `pid` (whose `stat` is `leader`) has begun to exit,
    /// or none is left: its exit may then have passed the exit tracepoint already.
    pub fn all_threads_exiting(pid: Pid, leader: &super::Stat) -> bool {
        if leader.threads <= 1 {
            return leader.exiting() || leader.exited();
        }
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", pid.as_raw())) else {
            return true;
        };
        let live = dir.flatten().any(|t| {
            let path = t.path().join("stat");
            path.to_str().and_then(|p| stat_at(p).ok()).is_some_and(|s| !s.exiting())
        });
        !live
    }

    /// The process (thread-group id) that the task `pid` belongs to.
    pub fn tgid_of(pid: Pid) -> io::Result<Pid> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw()))?;
        super::parse_status_tgid(&status)
            .and_then(Pid::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no Tgid in /proc/{pid}/status")))
    }

    /// The calling thread's effective capabilities (what bpf(2) checks), if /proc tells.
    pub fn own_cap_eff() -> Option<u64> {
        super::parse_cap_eff(&std::fs::read_to_string("/proc/thread-self/status").ok()?)
    }

    /// Our time namespace's boot-time offset in nanoseconds (0 when there is none, or on kernels
    /// without time namespaces).
    pub fn own_boottime_offset() -> i64 {
        std::fs::read_to_string("/proc/self/timens_offsets")
            .ok()
            .and_then(|s| super::parse_timens_boottime(&s))
            .unwrap_or(0)
    }

    /// The kernel lockdown mode, when securityfs is mounted and tells.
    pub fn lockdown() -> Option<String> {
        let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
        super::parse_lockdown(&text).map(str::to_owned)
    }

    /// `sysconf(_SC_CLK_TCK)`, 100 if it fails.
    pub fn clk_tck() -> u64 {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if v > 0 {
            v as u64
        } else {
            100
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    123456 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_start(stat), Some(123456));
        assert_eq!(parse_stat_start("1 (x) S 0"), None);
        assert_eq!(parse_stat_start("garbage"), None);
        assert_eq!(parse_stat(stat), Some(Stat { state: 'S', flags: 4194560, threads: 1, start: 123456 }));
        assert!(!parse_stat(stat).unwrap().exited());
        assert!(!parse_stat(stat).unwrap().exiting());
        let exiting = stat.replace(" 4194560 ", " 4194564 ");
        assert!(parse_stat(&exiting).unwrap().exiting(), "PF_EXITING");
        assert_eq!(parse_stat("1 (x) S 0"), None);
        let zombie = stat.replace(") S ", ") Z ");
        assert!(parse_stat(&zombie).unwrap().exited(), "a zombie alone is gone");
        let leader = zombie.replace(" 20 0 1 0 ", " 20 0 3 0 ");
        assert_eq!(parse_stat(&leader), Some(Stat { state: 'Z', flags: 4194560, threads: 3, start: 123456 }));
        assert!(!parse_stat(&leader).unwrap().exited(), "a zombie leader with threads lives");
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t77\nPid:\t78\n\
                      CapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_status_tgid(status), Some(77));
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn capabilities() {
        assert!(caps_suffice(0x1ff_ffff_ffff)); // root
        assert!(caps_suffice((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(caps_suffice(1 << CAP_SYS_ADMIN));
        assert!(!caps_suffice(1 << CAP_BPF));
        assert!(!caps_suffice(1 << CAP_PERFMON));
        assert!(!caps_suffice(0));
    }

    #[test]
    fn timens_offsets() {
        assert_eq!(parse_timens_boottime("monotonic 0 0\nboottime 0 0\n"), Some(0));
        assert_eq!(parse_timens_boottime("monotonic  1 0\nboottime  -5 250\n"), Some(-4_999_999_750));
        assert_eq!(parse_timens_boottime("1 3 0\n7 2 5\n"), Some(2_000_000_005));
        assert_eq!(parse_timens_boottime("monotonic 1 0\n"), None);
    }

    #[test]
    fn lockdown_modes() {
        assert_eq!(parse_lockdown("[none] integrity confidentiality\n"), Some("none"));
        assert_eq!(parse_lockdown("none integrity [confidentiality]\n"), Some("confidentiality"));
        assert_eq!(parse_lockdown(""), None);
    }
}
