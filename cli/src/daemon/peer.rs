//! Who is asking, and what that user may do to a process.

use super::*;

/// The peer: who sent a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub(super) pid: i32,
    pub(super) uid: u32,
}

/// Whether a user with uid `uid` could signal `pid` itself (kill(2): the sender's uid is the
/// target's real or saved uid).
pub(super) fn may_signal(uid: u32, pid: Pid) -> bool {
    if uid == 0 {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
        let Some(line) = s.lines().find(|l| l.starts_with("Uid:")) else { return false };
        let ids: Vec<u32> = line[4..].split_whitespace().filter_map(|x| x.parse().ok()).collect();
        ids.first() == Some(&uid) || ids.get(2) == Some(&uid)
    }
    #[cfg(not(target_os = "linux"))]
    {
        matches!(vpstag::process::process(pid), Ok(Some(i)) if i.uid == uid)
    }
}

/// CPU time (ms) and resident memory (bytes) of a process, where the system says.
pub(super) fn usage(pid: Pid) -> (u64, u64) {
    #[cfg(target_os = "linux")]
    {
        let Ok(p) = procfs::process::Process::new(pid.as_raw()) else { return (0, 0) };
        let Ok(st) = p.stat() else { return (0, 0) };
        let tps = procfs::ticks_per_second().max(1);
        ((st.utime + st.stime) * 1000 / tps, st.rss * procfs::page_size())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        (0, 0)
    }
}
