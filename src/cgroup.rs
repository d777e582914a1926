//! cgroup v2, where the host delegates one: a cgroup per VPS, its limits, its figures, and a
//! race-free kill.
//!
//! Tags and accounting work without cgroups; a cgroup adds what only the kernel can keep exactly:
//! CPU time of every process that was ever in it (`cpu.stat`), memory and process counts, limits
//! (`memory.max`, `pids.max`, `cpu.max`) and `cgroup.kill`.
//!
//! The layout follows the kernel's rule that a cgroup with processes of its own cannot enable
//! domain controllers (memory, io) for its children (the "no internal processes" rule; pids and
//! cpu are threaded controllers, exempt) and systemd's delegation model: VPS cgroups are created
//! below a *root* that holds no process itself.
//!
//! ```text
//! D/                           the cgroup vpstag runs in (from /proc/self/cgroup), or --cgroup-root's parent
//! └── vpstag/                  CgroupRoot::find(): the root, no processes of its own
//!     ├── vps-1-1b2c3d4e5f6-web        one VpsCgroup per VPS, never reused
//!     └── vps-2-1b2c3d4f011-build_2f42
//! ```
//!
//! - [`CgroupRoot::find`]: the root `vpstag` below the calling process's own cgroup, created when
//!   missing; a controller a limit needs is enabled in that cgroup's and the root's
//!   `cgroup.subtree_control` when it is offered and allowed. [`CgroupRoot::at`]: a given
//!   directory (`--cgroup-root PATH`), checked to be a writable cgroup v2 directory; controllers
//!   are enabled in its own `cgroup.subtree_control` only, never in its parent's.
//! - [`CgroupRoot::create`]: a fresh directory per VPS (`vps-ID-GENERATION-NAME`, the name
//!   escaped), with the [`Limits`] written before any process enters. A limit whose controller is
//!   not available is refused with [`CgroupError::ControllerUnavailable`], which says what to
//!   delegate; it is never ignored.
//! - [`VpsCgroup`]: [`attach`](VpsCgroup::attach), [`procs`](VpsCgroup::procs),
//!   [`usage`](VpsCgroup::usage), [`limits`](VpsCgroup::limits), [`kill`](VpsCgroup::kill)
//!   (`cgroup.kill`, or SIGKILL to each member until none is left), [`remove`](VpsCgroup::remove),
//!   the directory's descriptor for `clone3(CLONE_INTO_CGROUP)` ([`AsFd`]), and
//!   [`open`](VpsCgroup::open) to take one up again after a restart.
//!
//! A cgroup that was killed is never used again: on Linux 6.18 a process cloned into a cgroup
//! killed through `cgroup.kill` is killed too, so [`VpsCgroup::attach`] refuses after
//! [`VpsCgroup::kill`], and every VPS gets a directory name no earlier VPS had.
//!
//! ```no_run
//! use std::time::Duration;
//! use vpstag::cgroup::{CgroupRoot, Limits};
//! use vpstag::{Pid, VpsId};
//!
//! let root = CgroupRoot::find()?;
//! let limits = Limits { memory_max: Some(512 << 20), pids_max: Some(64), cpu_max_percent: Some(150) };
//! let cg = root.create("web", VpsId(1), &limits)?;
//! cg.attach(Pid::new(4242).unwrap())?;
//! println!("{:?}", cg.usage()?);
//! cg.kill(Duration::from_secs(5))?;
//! cg.remove(Duration::from_secs(5))?;
//! # Ok::<(), vpstag::cgroup::CgroupError>(())
//! ```
//!
//! # References
//! - [Control Group v2](https://docs.kernel.org/admin-guide/cgroup-v2.html) (the kernel's
//!   documentation: interface files, delegation, the "no internal processes" rule)
//! - [Control Group APIs and Delegation](https://systemd.io/CGROUP_DELEGATION/) (systemd's)
//! - [`cgroups(7)`](https://man7.org/linux/man-pages/man7/cgroups.7.html)

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{Access, AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::{process, sys, Pid, Signal, VpsId};

/// `f_type` of a cgroup v2 filesystem (`CGROUP2_SUPER_MAGIC`; checked against `libc` in `sys`).
pub(crate) const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `f_type` of a cgroup v1 hierarchy (`CGROUP_SUPER_MAGIC`).
pub(crate) const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;

/// The name of the root [`CgroupRoot::find`] creates below the calling process's cgroup.
pub const ROOT_NAME: &str = "vpstag";

/// The CPU period written to `cpu.max`, in microseconds (the kernel's default).
const CPU_PERIOD_USEC: u64 = 100_000;

/// Longest escaped VPS name kept in a directory name (the id and generation keep it unique).
const MAX_ESCAPED_NAME: usize = 96;

/// Sub-cgroups deeper than this below a VPS's cgroup are not walked (a VPS with root may create
/// its own).
const MAX_DEPTH: usize = 32;

/// What went wrong with a cgroup. Every message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// No cgroup v2 hierarchy to use.
    #[error(
        "no cgroup v2 hierarchy is usable here: {why}; mount one (`mount -t cgroup2 none /sys/fs/cgroup`, or boot \
         with systemd.unified_cgroup_hierarchy=1) or pass --cgroup-root PATH (tags and accounting work without it)"
    )]
    NoCgroup2 {
        /// What was found instead.
        why: String,
    },
    /// The path is not a cgroup v2 directory (a cgroup v1 hierarchy, another filesystem, a file).
    #[error("{path} is not a cgroup v2 directory: it is {what}; pass a directory on the cgroup2 mount{hint}")]
    NotCgroup2 {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        what: String,
        /// Where cgroup v2 is mounted here, when known (` (here: /sys/fs/cgroup/unified)`).
        hint: String,
    },
    /// The cgroup is not ours to write: not root, and not delegated to this user.
    #[error(
        "cannot create cgroups in {path} ({source}): run as root, or have it delegated to this user (systemd: \
         Delegate=yes on the unit, or `systemd-run --user --scope -p Delegate=yes vpstag ...`; by hand: chown the \
         directory and its cgroup.procs, cgroup.subtree_control and cgroup.threads), or pass --cgroup-root PATH"
    )]
    NotDelegated {
        /// The cgroup.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A limit needs a controller this cgroup does not have. Never ignored.
    #[error("cgroup v2: the {controller} controller is not enabled for {cgroup}, and {file} needs it: {why}")]
    ControllerUnavailable {
        /// The controller.
        controller: Controller,
        /// The cgroup that lacks it.
        cgroup: PathBuf,
        /// The interface file the limit is written to.
        file: &'static str,
        /// Why, and what to delegate.
        why: String,
    },
    /// A limit that cannot be set.
    #[error("invalid limit {what}: {why}")]
    InvalidLimit {
        /// Which limit.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A process could not be moved into the cgroup.
    #[error("cannot move process {pid} into the cgroup {path}: {source}{hint}")]
    Attach {
        /// The process.
        pid: Pid,
        /// The cgroup.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The cgroup was killed; it must not be used again.
    #[error(
        "the cgroup {path} was killed and must not be used again (a process cloned into a cgroup killed through \
         cgroup.kill is killed too): create a new one"
    )]
    Killed {
        /// The cgroup.
        path: PathBuf,
    },
    /// Processes were still there when the deadline passed.
    #[error("{left} process(es) still in the cgroup {path} after {waited:?} ({doing}); kill them and try again")]
    NotEmpty {
        /// The cgroup.
        path: PathBuf,
        /// How many were left.
        left: usize,
        /// How long it waited.
        waited: Duration,
        /// What it was doing.
        doing: &'static str,
    },
    /// Reading or writing a cgroup file failed.
    #[error("{doing} {path}: {source}")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl CgroupError {
    fn io(doing: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> CgroupError {
        CgroupError::Io { doing, path: path.into(), source: source.into() }
    }
}

/// `Result` with [`CgroupError`].
pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// A cgroup v2 controller a [`Limits`] field needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Controller {
    /// `cpu`: `cpu.max`.
    Cpu,
    /// `memory`: `memory.max`, `memory.current`, `memory.peak`.
    Memory,
    /// `pids`: `pids.max`, `pids.current`.
    Pids,
}

impl Controller {
    /// Its name in `cgroup.controllers`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    /// The interface file a limit of this controller is written to.
    pub fn limit_file(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu.max",
            Controller::Memory => "memory.max",
            Controller::Pids => "pids.max",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Limits for one VPS; `None` leaves a resource unlimited (`max`). Each set field needs its
/// controller ([`Limits::controllers`]).
///
/// ```
/// use vpstag::cgroup::{Controller, Limits};
/// let l = Limits { memory_max: Some(1 << 30), cpu_max_percent: Some(150), ..Limits::default() };
/// assert_eq!(l.controllers(), vec![Controller::Cpu, Controller::Memory]);
/// assert_eq!(Limits::cpu_max_line(150), "150000 100000"); // 1.5 CPUs
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// `memory.max`: bytes of memory (the kernel rounds down to whole pages); above it the VPS
    /// reclaims, then the OOM killer picks a process inside the VPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// `pids.max`: processes and threads at once; a fork beyond it fails with `EAGAIN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `cpu.max`: percent of one CPU (150 = one and a half CPUs), enforced per 100 ms period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_max_percent: Option<u32>,
}

impl Limits {
    /// No limit set.
    pub fn is_empty(&self) -> bool {
        self.memory_max.is_none() && self.pids_max.is_none() && self.cpu_max_percent.is_none()
    }

    /// The controllers the set limits need, sorted.
    pub fn controllers(&self) -> Vec<Controller> {
        let mut v = Vec::new();
        if self.cpu_max_percent.is_some() {
            v.push(Controller::Cpu);
        }
        if self.memory_max.is_some() {
            v.push(Controller::Memory);
        }
        if self.pids_max.is_some() {
            v.push(Controller::Pids);
        }
        v
    }

    /// Checks the values: each set limit is at least 1 (0 would stop the first process itself);
    /// `cpu_max_percent` of at least 1 (the kernel's smallest quota is 1 ms per 100 ms).
    pub fn validate(&self) -> Result<()> {
        if self.memory_max == Some(0) {
            return Err(CgroupError::InvalidLimit {
                what: "memory.max",
                why: "0 bytes would leave the first process no memory at all; give at least a few MiB".into(),
            });
        }
        if self.pids_max == Some(0) {
            return Err(CgroupError::InvalidLimit {
                what: "pids.max",
                why: "0 would refuse the first process itself; give at least 1".into(),
            });
        }
        if self.cpu_max_percent == Some(0) {
            return Err(CgroupError::InvalidLimit {
                what: "cpu.max",
                why: "0 percent would never let the VPS run; give at least 1 (percent of one CPU)".into(),
            });
        }
        Ok(())
    }

    /// The `cpu.max` line for `percent` of one CPU: quota and period in microseconds.
    pub fn cpu_max_line(percent: u32) -> String {
        format!("{} {CPU_PERIOD_USEC}", u64::from(percent) * CPU_PERIOD_USEC / 100)
    }
}

/// What a VPS's cgroup has used, as the kernel keeps it: every process that was ever in the
/// cgroup counts, exited ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CgroupUsage {
    /// CPU time, user + system, in microseconds (`cpu.stat` `usage_usec`; kept without the cpu
    /// controller).
    pub cpu_usec: u64,
    /// User CPU time in microseconds (`user_usec`).
    pub user_usec: u64,
    /// System CPU time in microseconds (`system_usec`).
    pub system_usec: u64,
    /// Memory in use now, in bytes (`memory.current`), when the memory controller is enabled.
    pub memory_current: Option<u64>,
    /// The most memory ever in use, in bytes (`memory.peak`, Linux 5.19+).
    pub memory_peak: Option<u64>,
    /// Processes killed by the OOM killer inside this cgroup (`memory.events` `oom_kill`).
    pub oom_kills: Option<u64>,
    /// Processes and threads now (`pids.current`), when the pids controller is enabled.
    pub pids_current: Option<u64>,
    /// Forks refused because of `pids.max` (`pids.events` `max`).
    pub pids_refused: Option<u64>,
}

/// How [`VpsCgroup::kill_with`] ends a cgroup's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KillMethod {
    /// `cgroup.kill` (Linux 5.14+): the kernel kills every process of the cgroup and of its
    /// descendants, and a process forked meanwhile too. Race-free.
    CgroupKill,
    /// SIGKILL to each listed process (each checked to be still in the cgroup, and signalled by
    /// pidfd, never a reused pid), repeated until none is left; the cgroup is frozen meanwhile
    /// where `cgroup.freeze` exists (Linux 5.2+), so that nothing forks in between.
    Signals,
}

/// A delegated cgroup v2 directory under which VPS cgroups are created; it holds no process
/// itself.
#[derive(Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
    fd: OwnedFd,
    /// Its path in the hierarchy, as `/proc/PID/cgroup` shows it, when known.
    hier: Option<String>,
    /// The calling process's own cgroup, which [`CgroupRoot::find`] may enable controllers in.
    parent: Option<Managed>,
}

#[derive(Debug)]
struct Managed {
    dir: PathBuf,
    fd: OwnedFd,
}

impl CgroupRoot {
    /// The default root: `vpstag` below the calling process's own cgroup (the `0::` line of
    /// `/proc/self/cgroup`, on the cgroup2 mount found in `/proc/self/mountinfo`), created when
    /// missing. That cgroup must be writable (root, or delegated: systemd's `Delegate=yes`).
    /// Nothing is moved and no controller enabled until a limit needs one ([`CgroupRoot::create`]).
    ///
    /// vpstag itself lives in that cgroup, and unless it is the hierarchy's root the kernel lets
    /// it enable no domain controller (memory) for its children: accounting, `cgroup.kill`,
    /// membership, `pids.max` and `cpu.max` work, a memory limit is refused with that
    /// explanation. Then run vpstag in a leaf of its delegated cgroup (systemd 254+:
    /// `DelegateSubgroup=`) and pass the delegated cgroup to [`CgroupRoot::at`].
    ///
    /// # Errors
    /// [`CgroupError::NoCgroup2`] without a cgroup v2 hierarchy (non-Linux systems included),
    /// [`CgroupError::NotDelegated`] when the cgroup is not writable.
    pub fn find() -> Result<CgroupRoot> {
        let mounts = read_mounts()?;
        let own = match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => parse_own_cgroup(&text).ok_or_else(|| CgroupError::NoCgroup2 {
                why: "this process is in no cgroup v2 hierarchy (/proc/self/cgroup has no `0::` line)".into(),
            })?,
            Err(e) => return Err(CgroupError::NoCgroup2 { why: format!("cannot read /proc/self/cgroup ({e})") }),
        };
        CgroupRoot::find_in(&mounts, &own)
    }

    /// [`CgroupRoot::find`] with the mount table and the own cgroup's path given.
    fn find_in(mounts: &[Mount], own: &str) -> Result<CgroupRoot> {
        let mount = mount_of_hier(mounts, own).ok_or_else(|| CgroupError::NoCgroup2 { why: no_v2_why(mounts, own) })?;
        let rel = hier_strip(own, &mount.root).unwrap_or_default();
        let own_dir = if rel.is_empty() { mount.point.clone() } else { mount.point.join(&rel) };
        let own_fd = open_cgroup_dir(&own_dir, mounts)?;
        match rustix::fs::mkdirat(&own_fd, ROOT_NAME, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) if denied(e) => return Err(CgroupError::NotDelegated { path: own_dir, source: e.into() }),
            Err(e) => return Err(CgroupError::io("cannot create", own_dir.join(ROOT_NAME), e)),
        }
        let dir = own_dir.join(ROOT_NAME);
        let fd = open_cgroup_dir(&dir, mounts)?;
        let hier = Some(hier_join(own, ROOT_NAME));
        Ok(CgroupRoot { dir, fd, hier, parent: Some(Managed { dir: own_dir, fd: own_fd }) })
    }

    /// The root given by `--cgroup-root PATH`: checked to be a directory on a cgroup v2 mount that
    /// the caller may write. It should hold no process itself, or no controller can be enabled for
    /// the VPS cgroups below it; its parent's `cgroup.subtree_control` is never written.
    ///
    /// # Errors
    /// [`CgroupError::NotCgroup2`] for a cgroup v1 hierarchy or any other filesystem,
    /// [`CgroupError::NotDelegated`] when not writable, [`CgroupError::Io`] when it cannot be
    /// opened.
    pub fn at(path: impl AsRef<Path>) -> Result<CgroupRoot> {
        let dir = path.as_ref().to_path_buf();
        let mounts = read_mounts().unwrap_or_default();
        let fd = open_cgroup_dir(&dir, &mounts)?;
        if let Err(e) = rustix::fs::accessat(&fd, ".", Access::WRITE_OK, AtFlags::EACCESS) {
            return Err(CgroupError::NotDelegated { path: dir, source: e.into() });
        }
        let hier = hier_of_dir(&mounts, &dir);
        Ok(CgroupRoot { dir, fd, hier, parent: None })
    }

    /// The root's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The controllers the root's parent lets it use (`cgroup.controllers`).
    pub fn available(&self) -> Result<Vec<String>> {
        read_words(&self.fd, &self.dir, "cgroup.controllers")
    }

    /// The controllers enabled for the VPS cgroups (`cgroup.subtree_control`).
    pub fn enabled(&self) -> Result<Vec<String>> {
        read_words(&self.fd, &self.dir, "cgroup.subtree_control")
    }

    /// Enables `controllers` for the VPS cgroups, where they are not yet: in the root's
    /// `cgroup.subtree_control`, and for [`CgroupRoot::find`]'s root first in the calling
    /// process's cgroup's when the root is not offered one.
    ///
    /// # Errors
    /// [`CgroupError::ControllerUnavailable`], saying why and what to delegate.
    pub fn ensure(&self, controllers: &[Controller]) -> Result<()> {
        let enabled = self.enabled()?;
        for &c in controllers {
            if enabled.iter().any(|e| e == c.name()) {
                continue;
            }
            if !self.available()?.iter().any(|a| a == c.name()) {
                self.offer_from_parent(c)?;
            }
            write_file(&self.fd, "cgroup.subtree_control", &format!("+{c}")).map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(code) if code == Errno::BUSY.raw_os_error() => format!(
                        "{} holds processes of its own, and cgroup v2 lets a cgroup with processes enable no \
                         domain controller (memory, io) for its children (the \"no internal processes\" rule); \
                         pass a cgroup without processes as --cgroup-root (e.g. a new child of it)",
                        self.dir.display()
                    ),
                    _ => format!(
                        "writing +{c} to {} failed ({e}); enable it there by hand or run under systemd with \
                         Delegate=yes",
                        self.dir.join("cgroup.subtree_control").display()
                    ),
                };
                CgroupError::ControllerUnavailable {
                    controller: c,
                    cgroup: self.dir.clone(),
                    file: c.limit_file(),
                    why,
                }
            })?;
        }
        Ok(())
    }

    /// Makes `c` available to the root by enabling it in the managed parent, or says why not.
    fn offer_from_parent(&self, c: Controller) -> Result<()> {
        let unavailable = |cgroup: &Path, why: String| CgroupError::ControllerUnavailable {
            controller: c,
            cgroup: cgroup.to_path_buf(),
            file: c.limit_file(),
            why,
        };
        let Some(parent) = &self.parent else {
            let parent = self.dir.parent().unwrap_or(&self.dir);
            let why = v1_binding(c).unwrap_or_else(|| {
                format!(
                    "enable it in cgroup.subtree_control of its parent (`echo +{c} > {}`), or run under systemd with \
                     Delegate=yes",
                    parent.join("cgroup.subtree_control").display()
                )
            });
            return Err(unavailable(&self.dir, why));
        };
        let offered = read_words(&parent.fd, &parent.dir, "cgroup.controllers")?;
        if !offered.iter().any(|o| o == c.name()) {
            let why = v1_binding(c).unwrap_or_else(|| {
                format!(
                    "{} is not offered it (its cgroup.controllers: {:?}): enable it in cgroup.subtree_control of each \
                     ancestor down to there, or run under systemd with Delegate=yes",
                    parent.dir.display(),
                    offered.join(" ")
                )
            });
            return Err(unavailable(&self.dir, why));
        }
        write_file(&parent.fd, "cgroup.subtree_control", &format!("+{c}")).map_err(|e| {
            let why = match e.raw_os_error() {
                Some(code) if code == Errno::BUSY.raw_os_error() => format!(
                    "{} holds processes (vpstag itself among them), and cgroup v2 lets a cgroup with processes \
                     enable no domain controller (memory, io) for its children (the \"no internal processes\" \
                     rule): run vpstag in a leaf of its delegated cgroup (systemd: Delegate=yes with \
                     DelegateSubgroup=) and pass the delegated cgroup as --cgroup-root",
                    parent.dir.display()
                ),
                _ => format!(
                    "writing +{c} to {} failed ({e}): run under systemd with Delegate=yes or enable it there by hand",
                    parent.dir.join("cgroup.subtree_control").display()
                ),
            };
            unavailable(&self.dir, why)
        })
    }

    /// A new cgroup for the VPS `name` (id `id`), with `limits` written before any process is in
    /// it. Its directory, `vps-ID-GENERATION-NAME`, is new: the generation is the boot-time clock
    /// in nanoseconds, so no name is ever handed out twice in a boot, and the VPS name is escaped
    /// (letters, digits, `-` and `.` stay; every other byte becomes `_xx`; at most 96 bytes kept).
    ///
    /// # Errors
    /// [`CgroupError::InvalidLimit`], [`CgroupError::ControllerUnavailable`] (nothing is created
    /// then), [`CgroupError::NotDelegated`], [`CgroupError::Io`].
    pub fn create(&self, name: &str, id: VpsId, limits: &Limits) -> Result<VpsCgroup> {
        limits.validate()?;
        self.ensure(&limits.controllers())?;
        let mut generation = sys::now_ns();
        let mut tries = 0;
        let dir_name = loop {
            let dir_name = cgroup_dir_name(name, id, generation);
            match rustix::fs::mkdirat(&self.fd, dir_name.as_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) => break dir_name,
                Err(Errno::EXIST) if tries < 1000 => {
                    tries += 1;
                    generation += 1;
                }
                Err(e) if denied(e) => {
                    return Err(CgroupError::NotDelegated { path: self.dir.clone(), source: e.into() })
                }
                Err(e) => return Err(CgroupError::io("cannot create", self.dir.join(dir_name), e)),
            }
        };
        let dir = self.dir.join(&dir_name);
        let made = (|| {
            let fd = open_dir(&dir)?;
            let cg = VpsCgroup {
                hier: self.hier.as_deref().map(|h| hier_join(h, &dir_name)),
                dir: dir.clone(),
                fd,
                killed: AtomicBool::new(false),
            };
            cg.set_limits(limits)?;
            Ok(cg)
        })();
        if made.is_err() {
            // Nothing is in it yet: a half-configured cgroup is not left behind.
            let _ = rustix::fs::unlinkat(&self.fd, dir_name.as_str(), AtFlags::REMOVEDIR);
        }
        made
    }
}

/// One VPS's cgroup.
///
/// Dropping it leaves the cgroup as it is (a daemon that restarts takes it up again with
/// [`VpsCgroup::open`]); [`VpsCgroup::remove`] removes it.
#[derive(Debug)]
pub struct VpsCgroup {
    dir: PathBuf,
    fd: OwnedFd,
    hier: Option<String>,
    killed: AtomicBool,
}

impl VpsCgroup {
    /// Takes up an existing VPS cgroup (one whose path was saved before a restart). Whether it
    /// was killed before is not known here: one that was must not be given new members (create a
    /// new one).
    ///
    /// # Errors
    /// [`CgroupError::NotCgroup2`] when `path` is not a cgroup v2 directory, [`CgroupError::Io`]
    /// when it cannot be opened (e.g. it is gone).
    pub fn open(path: impl AsRef<Path>) -> Result<VpsCgroup> {
        let dir = path.as_ref().to_path_buf();
        let mounts = read_mounts().unwrap_or_default();
        let fd = open_cgroup_dir(&dir, &mounts)?;
        let hier = hier_of_dir(&mounts, &dir);
        Ok(VpsCgroup { dir, fd, hier, killed: AtomicBool::new(false) })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the process `pid` (all its threads) into the cgroup (`cgroup.procs`). A process forked
    /// from then on is born in it. To start a process inside from its birth, pass this cgroup's
    /// descriptor ([`AsFd`]) to `clone3` with `CLONE_INTO_CGROUP`.
    ///
    /// # Errors
    /// [`CgroupError::Killed`] after [`VpsCgroup::kill`], [`CgroupError::Attach`] otherwise.
    pub fn attach(&self, pid: Pid) -> Result<()> {
        if self.killed.load(Ordering::SeqCst) {
            return Err(CgroupError::Killed { path: self.dir.clone() });
        }
        write_file(&self.fd, "cgroup.procs", &pid.to_string()).map_err(|source| {
            let hint = match source.raw_os_error().map(Errno::from_raw_os_error) {
                Some(Errno::SRCH) => " (no such process)",
                Some(Errno::ACCESS | Errno::PERM) => {
                    " (a process may be moved only by a writer of cgroup.procs in the closest cgroup both its old \
                     and its new cgroup are below; as another user, both must be delegated to it)"
                }
                Some(Errno::BUSY) => {
                    " (the cgroup has controllers enabled for children of its own, so it may hold no process: \
                     cgroup v2's \"no internal processes\" rule)"
                }
                _ => "",
            };
            CgroupError::Attach { pid, path: self.dir.clone(), source, hint }
        })
    }

    /// The processes in the cgroup and in every cgroup below it, sorted.
    pub fn procs(&self) -> Result<Vec<Pid>> {
        let mut out = Vec::new();
        collect_procs(&self.dir, 0, &mut out)?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Whether any live process is in the cgroup or below it (`cgroup.events` `populated`).
    pub fn is_populated(&self) -> Result<bool> {
        let text = read_file(&self.fd, &self.dir, "cgroup.events")?;
        Ok(keyed(&text, "populated") != Some(0))
    }

    /// What the cgroup has used: CPU from `cpu.stat` (every process that was ever in it, exited
    /// ones included), memory and process counts where their controller is enabled.
    pub fn usage(&self) -> Result<CgroupUsage> {
        let cpu = read_file(&self.fd, &self.dir, "cpu.stat")?;
        let memory_events = read_optional(&self.fd, &self.dir, "memory.events")?;
        let pids_events = read_optional(&self.fd, &self.dir, "pids.events")?;
        Ok(CgroupUsage {
            cpu_usec: keyed(&cpu, "usage_usec").unwrap_or(0),
            user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
            system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
            memory_current: read_number(&self.fd, &self.dir, "memory.current")?,
            memory_peak: read_number(&self.fd, &self.dir, "memory.peak")?,
            oom_kills: memory_events.as_deref().and_then(|t| keyed(t, "oom_kill")),
            pids_current: read_number(&self.fd, &self.dir, "pids.current")?,
            pids_refused: pids_events.as_deref().and_then(|t| keyed(t, "max")),
        })
    }

    /// The limits in force, read back from `memory.max`, `pids.max` and `cpu.max` (`max` and a
    /// missing file read as `None`; `memory.max` as the kernel rounded it).
    pub fn limits(&self) -> Result<Limits> {
        let memory_max = read_number(&self.fd, &self.dir, "memory.max")?;
        let pids_max = read_number(&self.fd, &self.dir, "pids.max")?;
        let cpu_max_percent = match read_optional(&self.fd, &self.dir, "cpu.max")? {
            Some(line) => parse_cpu_max(&line),
            None => None,
        };
        Ok(Limits { memory_max, pids_max, cpu_max_percent })
    }

    /// Writes the set fields of `limits` (unset ones are left as they are).
    ///
    /// # Errors
    /// [`CgroupError::ControllerUnavailable`] when the file is missing (its controller is not
    /// enabled for this cgroup), [`CgroupError::InvalidLimit`] when the kernel refuses the value.
    pub fn set_limits(&self, limits: &Limits) -> Result<()> {
        limits.validate()?;
        let writes = [
            (Controller::Memory, limits.memory_max.map(|b| b.to_string())),
            (Controller::Pids, limits.pids_max.map(|n| n.to_string())),
            (Controller::Cpu, limits.cpu_max_percent.map(Limits::cpu_max_line)),
        ];
        for (c, value) in writes {
            let Some(value) = value else { continue };
            write_file(&self.fd, c.limit_file(), &value).map_err(|e| match e.raw_os_error() {
                Some(code) if code == Errno::NOENT.raw_os_error() => CgroupError::ControllerUnavailable {
                    controller: c,
                    cgroup: self.dir.clone(),
                    file: c.limit_file(),
                    why: format!(
                        "the cgroup has no {}: enable {c} in its parent's cgroup.subtree_control",
                        c.limit_file()
                    ),
                },
                Some(code) if code == Errno::INVAL.raw_os_error() || code == Errno::RANGE.raw_os_error() => {
                    CgroupError::InvalidLimit {
                        what: c.limit_file(),
                        why: format!("the kernel refused {value:?} ({e})"),
                    }
                }
                _ => CgroupError::io("cannot write", self.dir.join(c.limit_file()), e),
            })?;
        }
        Ok(())
    }

    /// Kills every process in the cgroup and below it, and waits until none is left (at most
    /// `timeout`): through `cgroup.kill` where the kernel has it (Linux 5.14+), else by signals
    /// ([`KillMethod::Signals`]). Returns the method used. The cgroup may not be used again
    /// afterwards ([`CgroupError::Killed`]); [`VpsCgroup::remove`] it.
    pub fn kill(&self, timeout: Duration) -> Result<KillMethod> {
        let method = match rustix::fs::accessat(&self.fd, "cgroup.kill", Access::EXISTS, AtFlags::empty()) {
            Ok(()) => KillMethod::CgroupKill,
            Err(_) => KillMethod::Signals,
        };
        self.kill_with(method, timeout)?;
        Ok(method)
    }

    /// [`VpsCgroup::kill`] with the method chosen by the caller.
    pub fn kill_with(&self, method: KillMethod, timeout: Duration) -> Result<()> {
        self.killed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        match method {
            KillMethod::CgroupKill => {
                write_file(&self.fd, "cgroup.kill", "1")
                    .map_err(|e| CgroupError::io("cannot write", self.dir.join("cgroup.kill"), e))?;
                self.wait_empty(deadline, timeout, "after writing cgroup.kill")
            }
            KillMethod::Signals => {
                let frozen = write_file(&self.fd, "cgroup.freeze", "1").is_ok();
                let r = self.kill_by_signals(deadline, timeout);
                if frozen {
                    // Gone with its processes or not, nothing may stay frozen.
                    let _ = write_file(&self.fd, "cgroup.freeze", "0");
                }
                r
            }
        }
    }

    fn kill_by_signals(&self, deadline: Instant, timeout: Duration) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        loop {
            let pids = self.procs()?;
            if pids.is_empty() && !self.is_populated()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::NotEmpty {
                    path: self.dir.clone(),
                    left: pids.len(),
                    waited: timeout,
                    doing: "sending SIGKILL to each",
                });
            }
            for pid in pids {
                self.kill_member(pid)?;
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// SIGKILL to `pid` if it is (still) in this cgroup: its start time is read, its cgroup
    /// checked, and the signal goes by pidfd to the process with that start time only.
    fn kill_member(&self, pid: Pid) -> Result<()> {
        let io = |e| CgroupError::io("cannot signal a member of", self.dir.clone(), e);
        let Some(info) = process::process(pid).map_err(io)? else { return Ok(()) };
        if let Some(hier) = &self.hier {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return Ok(()) };
            let Some(now) = parse_own_cgroup(&text) else { return Ok(()) };
            if hier_strip(&now, hier).is_none() {
                return Ok(());
            }
        }
        process::signal_exact(info.id, Signal::KILL).map_err(io)?;
        Ok(())
    }

    fn wait_empty(&self, deadline: Instant, timeout: Duration, doing: &'static str) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        while self.is_populated()? {
            if Instant::now() >= deadline {
                let left = self.procs()?.len();
                return Err(CgroupError::NotEmpty { path: self.dir.clone(), left, waited: timeout, doing });
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Removes the cgroup (and any cgroup a VPS made below it), waiting at most `timeout` for
    /// exiting processes to leave. Kill first ([`VpsCgroup::kill`]): the kernel removes only
    /// empty cgroups. A cgroup already gone counts as removed.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        remove_tree(&self.dir, 0, deadline, timeout)
    }
}

impl AsFd for VpsCgroup {
    /// The cgroup's directory (opened `O_RDONLY | O_DIRECTORY`), e.g. for `clone3`'s `cgroup`
    /// field with `CLONE_INTO_CGROUP`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for CgroupRoot {
    /// The root's directory.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

// ------------------------------------------------------------------------------------------------
// Files.

fn denied(e: Errno) -> bool {
    matches!(e, Errno::ACCESS | Errno::PERM | Errno::ROFS)
}

fn open_dir(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| match e {
        Errno::NOTDIR => {
            CgroupError::NotCgroup2 { path: dir.to_path_buf(), what: "not a directory".into(), hint: String::new() }
        }
        e => CgroupError::io("cannot open", dir, e),
    })
}

/// Opens `dir` and checks that it is on a cgroup v2 filesystem.
fn open_cgroup_dir(dir: &Path, mounts: &[Mount]) -> Result<OwnedFd> {
    let fd = open_dir(dir)?;
    let what = match sys::fs_magic(fd.as_fd()) {
        Ok(CGROUP2_SUPER_MAGIC) => return Ok(fd),
        Ok(CGROUP_SUPER_MAGIC) => "a cgroup v1 hierarchy (vpstag needs cgroup v2)".to_string(),
        Ok(magic) => format!("not a cgroup filesystem (filesystem type {magic:#x})"),
        Err(e) => format!("on a system without cgroups ({e})"),
    };
    let hint = match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => format!(" (here cgroup v2 is mounted at {})", m.point.display()),
        None => " (none is mounted here)".to_string(),
    };
    Err(CgroupError::NotCgroup2 { path: dir.to_path_buf(), what, hint })
}

fn open_file(dirfd: &OwnedFd, name: &str, flags: OFlags) -> io::Result<File> {
    Ok(File::from(rustix::fs::openat(dirfd, name, flags | OFlags::CLOEXEC, Mode::empty())?))
}

/// Writes `value` to a cgroup interface file in one `write` (the kernel takes each write whole).
fn write_file(dirfd: &OwnedFd, name: &str, value: &str) -> io::Result<()> {
    let mut f = open_file(dirfd, name, OFlags::WRONLY)?;
    let n = f.write(value.as_bytes())?;
    if n != value.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write to {name}: {n} of {}", value.len())));
    }
    Ok(())
}

fn read_file(dirfd: &OwnedFd, dir: &Path, name: &str) -> Result<String> {
    read_optional(dirfd, dir, name)?
        .ok_or_else(|| CgroupError::io("cannot read", dir.join(name), io::Error::from(io::ErrorKind::NotFound)))
}

/// The file's text, `None` when the cgroup has no such file (its controller is not enabled).
fn read_optional(dirfd: &OwnedFd, dir: &Path, name: &str) -> Result<Option<String>> {
    let mut f = match open_file(dirfd, name, OFlags::RDONLY) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CgroupError::io("cannot read", dir.join(name), e)),
    };
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(|e| CgroupError::io("cannot read", dir.join(name), e))?;
    Ok(Some(s))
}

fn read_words(dirfd: &OwnedFd, dir: &Path, name: &str) -> Result<Vec<String>> {
    Ok(read_file(dirfd, dir, name)?.split_whitespace().map(str::to_string).collect())
}

/// A number file (`memory.current`), or a `NUMBER`-or-`max` one (`memory.max`): `None` for `max`
/// or a missing file.
fn read_number(dirfd: &OwnedFd, dir: &Path, name: &str) -> Result<Option<u64>> {
    Ok(read_optional(dirfd, dir, name)?.and_then(|t| t.trim().parse().ok()))
}

/// The value of `key` in a flat-keyed file (`cpu.stat`, `cgroup.events`, `memory.events`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Percent of one CPU from a `cpu.max` line (`max 100000`: `None`).
fn parse_cpu_max(line: &str) -> Option<u32> {
    let mut it = line.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok()?;
    if period == 0 {
        return None;
    }
    u32::try_from((quota * 100 + period / 2) / period).ok()
}

fn collect_procs(dir: &Path, depth: usize, out: &mut Vec<Pid>) -> Result<()> {
    let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(s) => s,
        // Removed meanwhile (a sub-cgroup the VPS made): nothing in it.
        Err(e) if e.kind() == io::ErrorKind::NotFound && depth > 0 => return Ok(()),
        Err(e) => return Err(CgroupError::io("cannot read", dir.join("cgroup.procs"), e)),
    };
    out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()).filter_map(Pid::new));
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for child in sub_cgroups(dir)? {
        collect_procs(&child, depth + 1, out)?;
    }
    Ok(())
}

fn sub_cgroups(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CgroupError::io("cannot list", dir, e)),
    };
    Ok(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
}

fn remove_tree(dir: &Path, depth: usize, deadline: Instant, timeout: Duration) -> Result<()> {
    if depth < MAX_DEPTH {
        for child in sub_cgroups(dir)? {
            remove_tree(&child, depth + 1, deadline, timeout)?;
        }
    }
    let mut pause = Duration::from_millis(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => {
                if Instant::now() >= deadline {
                    let mut left = Vec::new();
                    collect_procs(dir, 0, &mut left)?;
                    return Err(CgroupError::NotEmpty {
                        path: dir.to_path_buf(),
                        left: left.len(),
                        waited: timeout,
                        doing: "removing it (EBUSY)",
                    });
                }
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(CgroupError::io("cannot remove", dir, e)),
        }
    }
}

/// `vps-ID-GENERATION-NAME` with NAME escaped: letters, digits, `-` and `.` stay, every other
/// byte becomes `_xx` (so `_` itself is `_5f`); at most [`MAX_ESCAPED_NAME`] bytes of it.
fn cgroup_dir_name(name: &str, id: VpsId, generation: u64) -> String {
    let mut esc = String::new();
    for b in name.bytes() {
        let piece = if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
            char::from(b).to_string()
        } else {
            format!("_{b:02x}")
        };
        if esc.len() + piece.len() > MAX_ESCAPED_NAME {
            break;
        }
        esc.push_str(&piece);
    }
    format!("vps-{id}-{generation:x}-{esc}")
}

// ------------------------------------------------------------------------------------------------
// The mount table and hierarchy paths.

/// One line of `/proc/self/mountinfo`, the parts used here.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// The directory of the filesystem mounted (for cgroups: a path in the hierarchy).
    root: String,
    /// Where it is mounted.
    point: PathBuf,
    fstype: String,
    /// Per-superblock options (for cgroup v1: the controllers bound to it).
    super_opts: Vec<String>,
}

fn read_mounts() -> Result<Vec<Mount>> {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => Ok(parse_mountinfo(&text)),
        Err(e) => Err(CgroupError::NoCgroup2 { why: format!("cannot read /proc/self/mountinfo ({e})") }),
    }
}

/// Parses `/proc/PID/mountinfo` (`proc_pid_mountinfo(5)`); lines it cannot read are skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            if f.len() < 6 {
                return None;
            }
            let mut p = post.split(' ');
            let fstype = p.next()?.to_string();
            let _source = p.next()?;
            let super_opts = p.next().unwrap_or("").split(',').map(str::to_string).collect();
            Some(Mount {
                root: String::from_utf8_lossy(&unescape(f[3])).into_owned(),
                point: PathBuf::from(OsString::from_vec(unescape(f[4]))),
                fstype,
                super_opts,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (u32::from(b[i + 1] - b'0') << 6) | (u32::from(b[i + 2] - b'0') << 3) | u32::from(b[i + 3] - b'0');
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The cgroup v2 path of the `0::` line of `/proc/PID/cgroup`.
fn parse_own_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_end_matches(" (deleted)").to_string())
}

/// `path` below `prefix` (hierarchy paths, `/`-separated): the rest without a leading `/`
/// (empty when equal), `None` when `path` is not at or below `prefix`.
fn hier_strip(path: &str, prefix: &str) -> Option<String> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some(String::new());
    }
    rest.strip_prefix('/').map(str::to_string)
}

fn hier_join(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

/// The cgroup2 mount through which hierarchy path `hier` is reachable (the one with the longest
/// root at or above it).
fn mount_of_hier<'a>(mounts: &'a [Mount], hier: &str) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2" && hier_strip(hier, &m.root).is_some())
        .max_by_key(|m| m.root.trim_end_matches('/').len())
}

/// The hierarchy path of a directory on a cgroup2 mount, from the mount table.
fn hier_of_dir(mounts: &[Mount], dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let m = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2" && dir.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())?;
    let rel = dir.strip_prefix(&m.point).ok()?.to_str()?.to_string();
    Some(if rel.is_empty() { m.root.clone() } else { hier_join(&m.root, &rel) })
}

fn no_v2_why(mounts: &[Mount], own: &str) -> String {
    if mounts.iter().any(|m| m.fstype == "cgroup2") {
        format!("no cgroup2 mount reaches this process's cgroup {own:?}")
    } else if mounts.iter().any(|m| m.fstype == "cgroup") {
        "only cgroup v1 hierarchies are mounted".to_string()
    } else {
        "no cgroup filesystem is mounted".to_string()
    }
}

/// When `c` is bound to a cgroup v1 hierarchy (a hybrid host), why no cgroup v2 cgroup can have
/// it.
fn v1_binding(c: Controller) -> Option<String> {
    let mounts = read_mounts().ok()?;
    v1_binding_in(&mounts, c)
}

fn v1_binding_in(mounts: &[Mount], c: Controller) -> Option<String> {
    let m = mounts.iter().find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == c.name()))?;
    Some(format!(
        "on this host it is bound to the cgroup v1 hierarchy mounted at {}, and a controller serves one hierarchy \
         only; boot with systemd.unified_cgroup_hierarchy=1 (pure cgroup v2) or cgroup_no_v1={c}",
        m.point.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_is_parsed_with_escapes_and_optional_fields() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].fstype, "cgroup2");
        assert_eq!(m[3].point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].super_opts, vec!["rw", "memory"]);
        let odd = parse_mountinfo("50 1 0:40 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw\ngarbage line\n");
        assert_eq!(odd.len(), 1);
        assert_eq!(odd[0].root, "/a b");
        assert_eq!(odd[0].point, Path::new("/mnt/my cg"));
        assert_eq!(unescape("x\\134y\\0"), b"x\\y\\0");
    }

    #[test]
    fn own_cgroup_is_the_0_line() {
        let text = "9:name=systemd:/\n4:memory:/process_api/x\n0::/user.slice/a.scope\n";
        assert_eq!(parse_own_cgroup(text).as_deref(), Some("/user.slice/a.scope"));
        assert_eq!(parse_own_cgroup("4:memory:/\n"), None);
    }

    #[test]
    fn hierarchy_paths_compare_by_component() {
        assert_eq!(hier_strip("/a/b", "/").as_deref(), Some("a/b"));
        assert_eq!(hier_strip("/a/b", "/a").as_deref(), Some("b"));
        assert_eq!(hier_strip("/a", "/a").as_deref(), Some(""));
        assert_eq!(hier_strip("/ab", "/a"), None);
        assert_eq!(hier_join("/", "vpstag"), "/vpstag");
        assert_eq!(hier_join("/x/", "y"), "/x/y");
        let mounts = parse_mountinfo(&format!("{HYBRID}60 1 0:38 /sub /mnt/sub rw - cgroup2 cgroup2 rw\n"));
        assert_eq!(mount_of_hier(&mounts, "/sub/x").map(|m| m.point.clone()), Some(PathBuf::from("/mnt/sub")));
        assert_eq!(
            mount_of_hier(&mounts, "/other").map(|m| m.point.clone()),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn find_without_cgroup2_says_so() {
        let v1_only: Vec<Mount> = parse_mountinfo(HYBRID).into_iter().filter(|m| m.fstype != "cgroup2").collect();
        let e = CgroupRoot::find_in(&v1_only, "/").unwrap_err();
        assert!(matches!(e, CgroupError::NoCgroup2 { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("cgroup v2") && msg.contains("only cgroup v1") && msg.contains("--cgroup-root"), "{msg}");
        let e = CgroupRoot::find_in(&[], "/").unwrap_err().to_string();
        assert!(e.contains("no cgroup filesystem is mounted"), "{e}");
    }

    #[test]
    fn find_refuses_a_cgroup2_mount_entry_that_is_not_cgroup2() {
        // A mount table that claims cgroup2 at a plain directory: the directory itself is checked.
        let dir = std::env::temp_dir();
        let fake = vec![Mount { root: "/".into(), point: dir.clone(), fstype: "cgroup2".into(), super_opts: vec![] }];
        let e = CgroupRoot::find_in(&fake, "/").unwrap_err();
        assert!(matches!(e, CgroupError::NotCgroup2 { .. }), "{e:?}");
        assert!(e.to_string().contains("not a cgroup filesystem"), "{e}");
    }

    /// Removes a test's directories on the way out, failed or not.
    struct Dirs(Vec<PathBuf>);

    impl Drop for Dirs {
        fn drop(&mut self) {
            for d in self.0.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    #[test]
    fn find_makes_its_root_below_the_own_cgroup_and_enables_only_what_is_offered() {
        let (Ok(mounts), Some(own)) =
            (read_mounts(), std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| parse_own_cgroup(&t)))
        else {
            println!("SKIP: no /proc here");
            return;
        };
        let Some(m) = mount_of_hier(&mounts, &own) else {
            println!("SKIP: no cgroup2 mount");
            return;
        };
        // Plays a process whose own cgroup is a fresh child of ours (nothing is moved).
        let name = format!("vpstag-unit-{}", std::process::id());
        let own_dir = m.point.join(hier_strip(&own, &m.root).unwrap_or_default()).join(&name);
        match std::fs::create_dir(&own_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                println!("SKIP: cannot create {} ({e}): run as root", own_dir.display());
                return;
            }
            Err(e) => panic!("{}: {e}", own_dir.display()),
        }
        let mut dirs = Dirs(vec![own_dir.clone(), own_dir.join(ROOT_NAME)]);
        let fake_own = hier_join(&own, &name);
        let root = CgroupRoot::find_in(&mounts, &fake_own).expect("find below a writable cgroup");
        assert_eq!(root.path(), own_dir.join(ROOT_NAME));
        assert_eq!(root.hier.as_deref(), Some(hier_join(&fake_own, ROOT_NAME).as_str()));
        let again = CgroupRoot::find_in(&mounts, &fake_own).expect("find again: the root is kept");
        assert_eq!(again.path(), root.path());
        let offered =
            read_words(&root.parent.as_ref().expect("find's root has a parent").fd, &own_dir, "cgroup.controllers")
                .expect("cgroup.controllers");
        let limits = Limits { pids_max: Some(8), ..Limits::default() };
        match root.create("p", VpsId(1), &limits) {
            Ok(cg) => {
                dirs.0.push(cg.path().to_path_buf());
                assert!(offered.iter().any(|o| o == "pids"), "created although pids is not offered: {offered:?}");
                assert_eq!(cg.limits().expect("limits").pids_max, Some(8));
            }
            Err(e) => {
                assert!(!offered.iter().any(|o| o == "pids"), "pids is offered ({offered:?}), yet: {e}");
                let msg = e.to_string();
                assert!(matches!(e, CgroupError::ControllerUnavailable { controller: Controller::Pids, .. }), "{e:?}");
                assert!(msg.contains("cgroup v1 hierarchy") || msg.contains("is not offered it"), "{msg}");
            }
        }
    }

    #[test]
    fn v1_bound_controllers_are_named_with_their_mount() {
        let m = parse_mountinfo(HYBRID);
        let why = v1_binding_in(&m, Controller::Memory).expect("memory is bound to v1 here");
        assert!(why.contains("/sys/fs/cgroup/memory") && why.contains("cgroup_no_v1=memory"), "{why}");
        assert_eq!(v1_binding_in(&m, Controller::Cpu), None);
    }

    #[test]
    fn directory_names_are_escaped_bounded_and_unique() {
        assert_eq!(cgroup_dir_name("web-1.a", VpsId(7), 0xabc), "vps-7-abc-web-1.a");
        assert_eq!(cgroup_dir_name("1000:build_2", VpsId(3), 1), "vps-3-1-1000_3abuild_5f2");
        for odd in ["../..", "a/b", "cgroup.procs", "", "x\ny", "\0", "é", " "] {
            let n = cgroup_dir_name(odd, VpsId(1), 5);
            assert!(n.starts_with("vps-1-5-"), "{n}");
            assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)), "{odd:?} -> {n}");
        }
        let long = cgroup_dir_name(&"\u{7f}".repeat(300), VpsId(u64::MAX), u64::MAX);
        assert!(long.len() <= 255, "{}", long.len());
        assert_ne!(cgroup_dir_name("a_", VpsId(1), 1), cgroup_dir_name("a_5f", VpsId(1), 1));
    }

    #[test]
    fn limits_are_checked_and_converted() {
        assert!(Limits::default().is_empty());
        assert!(Limits::default().validate().is_ok());
        for bad in [
            Limits { memory_max: Some(0), ..Limits::default() },
            Limits { pids_max: Some(0), ..Limits::default() },
            Limits { cpu_max_percent: Some(0), ..Limits::default() },
        ] {
            let e = bad.validate().unwrap_err();
            assert!(matches!(e, CgroupError::InvalidLimit { .. }) && e.to_string().contains("at least"), "{e}");
        }
        assert_eq!(Limits::cpu_max_line(100), "100000 100000");
        assert_eq!(Limits::cpu_max_line(1), "1000 100000");
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(150));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("5000 10000"), Some(50));
    }

    #[test]
    fn flat_keyed_files_are_read() {
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nnr_periods 0\n";
        assert_eq!(keyed(stat, "usage_usec"), Some(1234));
        assert_eq!(keyed(stat, "system_usec"), Some(234));
        assert_eq!(keyed(stat, "usage"), None);
        assert_eq!(keyed("populated 0\nfrozen 0\n", "populated"), Some(0));
    }
}
