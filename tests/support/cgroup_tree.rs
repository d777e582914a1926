//! A test's own cgroup v2 subtree, shared by the library's cgroup tests (`tests/cgroup.rs`) and
//! the daemon's (`cli/tests/daemon_cgroup.rs`, which includes this file by path): where this
//! process's cgroup is, a subtree below it that is emptied (`cgroup.kill`, then SIGKILL by pid)
//! and removed on drop, failed test or not.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// This process's own cgroup directory on the cgroup2 mount, or why there is none.
pub fn own_cgroup_dir() -> Result<PathBuf, String> {
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("no /proc/self/mountinfo: {e}"))?;
    let point = mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            (post.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| PathBuf::from(f[4]))
        })
        .ok_or("no cgroup2 filesystem is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("no /proc/self/cgroup: {e}"))?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("this process is in no cgroup v2")?;
    Ok(point.join(own.trim_start_matches('/')))
}

/// A test's own subtree, `PREFIX-PID-NAME` below this process's cgroup; emptied and removed on
/// drop.
pub struct Tree {
    /// Its directory.
    pub dir: PathBuf,
}

impl Tree {
    /// Creates the subtree, or says why there is none to test on (no cgroup2 mount, or no right
    /// to create one: not root). Any other failure to create it fails the test.
    pub fn create(prefix: &str, name: &str) -> Result<Tree, String> {
        let base = own_cgroup_dir()?;
        let dir = base.join(format!("{prefix}-{}-{name}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(Tree { dir }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Err(format!("cannot create a test cgroup in {} ({e}): run as root", base.display()))
            }
            Err(e) => panic!("cannot create the test cgroup {}: {e}", dir.display()),
        }
    }

    /// A new child cgroup `name` of the subtree.
    pub fn sub(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        d
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // cgroup.kill where the kernel has it, else SIGKILL to every listed process, until empty.
        let deadline = Instant::now() + Duration::from_secs(20);
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        loop {
            let pids = pids_below(&self.dir);
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for p in pids {
                if p > 1 {
                    // SAFETY: kill with integer arguments; every pid is in this test's own subtree.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_below(&self.dir, deadline);
    }
}

/// The processes in the cgroup `dir` itself.
pub fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// The child cgroups of `dir`, sorted.
pub fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Every process in `dir` and the cgroups below it.
pub fn pids_below(dir: &Path) -> Vec<i32> {
    let mut out = pids_in(dir);
    for d in subdirs(dir) {
        out.extend(pids_below(&d));
    }
    out
}

/// Removes `dir` and the cgroups below it, deepest first, retrying until `deadline` (a cgroup
/// is removable only once its last process is reaped).
pub fn remove_below(dir: &Path, deadline: Instant) {
    for d in subdirs(dir) {
        remove_below(&d, deadline);
    }
    while let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("test cleanup: cannot remove {}: {e}", dir.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
