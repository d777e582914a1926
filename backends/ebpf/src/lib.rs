//! vpstag backend: eBPF. The pid -> VPS table lives in the kernel.
//!
//! A small BPF program keeps a hash map *tgid -> (VPS id, start time)* up to date by itself:
//!
//! - `tp_btf/sched_process_fork` copies the parent's entry to a new process before the child
//!   runs its first instruction (a new thread shares its process's tgid, so nothing is done);
//! - `tp_btf/sched_process_exit` deletes the entry once the whole thread group is dead
//!   (`signal->live` reached 0), so a zombie leader whose other threads still run keeps its tag;
//! - `tp_btf/sched_process_exec` only reports.
//!
//! User space seeds a VPS's first process ([`ForkTracker::watch`], while the core holds it at its
//! start gate) and loader members, answers [`ForkTracker::lookup`] from the map, and receives
//! notifications of fork, exec and exit of tagged processes through a ring buffer for the event
//! stream. Untagged processes cost a hash lookup in the kernel and are never sent to user space.
//!
//! Tags cannot be lost: they are in the map, written synchronously by the fork program. Only
//! notifications can: when the ring buffer is full the kernel side counts the drop and
//! [`read_events`](ForkTracker::read_events) reports `Lost { reason: Overflow }`. When the map is
//! full a child cannot be tagged: that is counted too and reported as
//! `Lost { reason: TrackingError }` (its size is [`Config::map_entries`]). Both counters are in
//! [`Ebpf::counters`].
//!
//! # Events
//!
//! - `Fork { thread: false, child_start: Some(ticks) }`: `parent` is the tgid of the child's
//!   `real_parent` (for `CLONE_PARENT` the caller's parent), `child` and `child_thread` the new
//!   process. The start time comes from the child's `start_boottime`, converted to the clock
//!   ticks of `/proc/PID/stat` field 22 with `sysconf(_SC_CLK_TCK)`. The tag follows the
//!   creator: the child gets the tag of the process that called `fork`/`clone`.
//! - `Exec { pid, thread }`: `thread` is the thread that called `execve` (it became the leader).
//! - `Exit { group_dead: Some(true), status }`: once per process, when its last thread exits;
//!   `thread` is that last thread, `status` the wait status `wait(2)` will report.
//! - Every event carries `tag` (the process's VPS), `time_ns` (`bpf_ktime_get_boot_ns`, i.e.
//!   `CLOCK_BOOTTIME`) and `cpu`. Thread creation and thread exits are not reported
//!   (`thread_events: false`).
//!
//! # Requirements
//!
//! Linux 5.8 or later with BTF (`/sys/kernel/btf/vmlinux`, `CONFIG_DEBUG_INFO_BTF=y`), run as
//! root or with `CAP_BPF` and `CAP_PERFMON`. Each missing piece gives a clear error from
//! [`Ebpf::new`] — [`TrackerError::Unsupported`] (no BTF, a kernel that refuses the program) or
//! [`TrackerError::PermissionDenied`] (capabilities, kernel lockdown) with a hint — so that
//! `--backend auto` can fall back to the proc connector. [`Ebpf::check_system`] runs the cheap
//! checks alone. Kernel memory is read with direct CO-RE loads in `tp_btf` programs only, never
//! with `bpf_probe_read_kernel`, which lockdown may refuse.
//!
//! Process ids are those of the initial PID namespace (what the kernel's `tgid` holds); run
//! vpstag in the host's PID namespace. Inside a time namespace, boot-clock values are shifted by
//! its offset so that they match what this process sees.
//!
//! # Building
//!
//! The BPF program is C (`src/bpf/vpstag.bpf.c`), compiled by `build.rs` with `clang -target bpf
//! -g -O2` (Debian's clang 14 is fine) and embedded in the crate. Instead of a full `vmlinux.h`
//! (which would need bpftool), `src/bpf/vmlinux_min.h` declares only the fields used, marked
//! `preserve_access_index`: libbpf relocates them against the running kernel's BTF at load time
//! (CO-RE), so one binary runs on every kernel that has those fields. The object keeps its BTF
//! (`-g`); that is what makes CO-RE and `tp_btf` work.
//!
//! libbpf comes from [`libbpf-rs`](https://docs.rs/libbpf-rs), which builds it from the source
//! vendored in `libbpf-sys` and links it statically; libelf and zlib are linked dynamically
//! (`libelf1` and `zlib1g` are on practically every system). Build dependencies (Debian):
//! `clang libelf-dev zlib1g-dev pkg-config make` — `.ci/install-ebpf-deps` installs them. The
//! crate feature `static` links libelf and zlib statically as well (the binary then needs only
//! libc; on Debian set `LIBBPF_SYS_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu`); it is off by default
//! because it only saves two libraries that are present anyway and needs their `.a` files.
//!
//! ## Why libbpf-rs and C, not aya
//!
//! aya would keep everything in Rust, but its BPF side needs a nightly toolchain and
//! `bpf-linker`, which needs LLVM 22 — neither is available to this project's builds, while
//! clang 14 and libbpf are ordinary Debian packages. libbpf is the reference loader (CO-RE,
//! `tp_btf` attach, ring buffer) and libbpf-rs was proven end to end on the target machine.
//! `libbpf-cargo`'s skeleton generator is not used: the object is loaded with
//! `ObjectBuilder::open_memory` and its three maps and three programs found by name, which saves
//! building libbpf a second time for the build script.
//!
//! On other systems than Linux the crate builds to a stub whose [`Ebpf::new`] returns
//! [`TrackerError::Unsupported`], and nothing of the above is needed.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::os::fd::BorrowedFd;
use std::time::Duration;

pub use vpstag_tracker;
use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, StartTime, TrackerError, VpsId};

pub mod decode;
#[cfg(target_os = "linux")]
mod procfs;
#[cfg(target_os = "linux")]
mod source;

pub use decode::Counters;

/// What [`Ebpf`] promises: host-wide, tags held in the kernel, synchronous, processes only, does
/// not reap, can lose notifications (never tags).
pub const CAPABILITIES: Capabilities = Capabilities {
    host_wide: true,
    holds_tags: true,
    synchronous: true,
    thread_events: false,
    reaps: false,
    can_lose: true,
    resync_every: None,
};

/// Sizes of the kernel-side structures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Capacity of the tag map: how many processes can be tagged at once, host-wide (all VPSs
    /// together). A fork that finds the map full leaves the child untagged and is reported as
    /// `Lost { reason: TrackingError }`. The map is preallocated: about 100 bytes an entry.
    /// Default 65 536.
    pub map_entries: u32,
    /// Size of the notification ring buffer in bytes, rounded up to a power of two of at least a
    /// page. A record takes 64 bytes. Default 1 MiB (about 16 000 notifications).
    pub ring_bytes: u32,
}

impl Config {
    /// The default tag map capacity.
    pub const DEFAULT_MAP_ENTRIES: u32 = 65_536;
    /// The default ring-buffer size.
    pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
}

impl Default for Config {
    fn default() -> Config {
        Config { map_entries: Config::DEFAULT_MAP_ENTRIES, ring_bytes: Config::DEFAULT_RING_BYTES }
    }
}

/// One entry of the kernel's tag map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The process (tgid).
    pub pid: Pid,
    /// Its VPS.
    pub vps: VpsId,
    /// Its start time as `/proc/PID/stat` shows it.
    pub start: StartTime,
}

#[cfg(target_os = "linux")]
pub use linux::Ebpf;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::time::Instant;

    use super::*;
    use crate::decode::{Clock, Tag};
    use crate::source::Loaded;

    /// The eBPF fork tracker. Dropping it detaches the programs and frees the maps.
    ///
    /// ```no_run
    /// use vpstag_ebpf::{Config, Ebpf};
    /// use vpstag_tracker::ForkTracker;
    ///
    /// let mut t = Ebpf::with_config(Config { map_entries: 4096, ..Config::default() })?;
    /// let mut events = Vec::new();
    /// t.read_events(&mut events, Some(std::time::Duration::ZERO))?;
    /// # Ok::<(), vpstag_tracker::TrackerError>(())
    /// ```
    pub struct Ebpf {
        inner: Loaded,
        clock: Clock,
        config: Config,
        /// The counters as last reported.
        seen: Counters,
    }

    const _: () = {
        const fn assert_send<T: Send>() {}
        assert_send::<Ebpf>();
    };

    impl Ebpf {
        /// Loads and attaches the programs with the default [`Config`].
        pub fn new() -> Result<Ebpf, TrackerError> {
            Ebpf::with_config(Config::default())
        }

        /// Loads and attaches the programs with the given sizes.
        pub fn with_config(config: Config) -> Result<Ebpf, TrackerError> {
            if config.map_entries == 0 {
                return Err(TrackerError::io(
                    "eBPF backend",
                    io::Error::new(io::ErrorKind::InvalidInput, "Config::map_entries must be at least 1"),
                ));
            }
            let page = page_size();
            let ring_bytes = config.ring_bytes.max(page).checked_next_power_of_two().ok_or_else(|| {
                TrackerError::io(
                    "eBPF backend",
                    io::Error::new(io::ErrorKind::InvalidInput, "Config::ring_bytes is too large"),
                )
            })?;
            let config = Config { ring_bytes, ..config };
            let clock = Clock::new(procfs::clk_tck(), procfs::own_boottime_offset());
            let inner = Loaded::load(config.map_entries, config.ring_bytes, clock)?;
            let seen = inner.counters()?;
            Ok(Ebpf { inner, clock, config, seen })
        }

        /// The checks [`new`](Ebpf::new) makes before it asks the kernel anything: BTF is there
        /// and this process has `CAP_BPF` and `CAP_PERFMON` (or `CAP_SYS_ADMIN`). Cheap; passing
        /// it does not promise that loading succeeds.
        pub fn check_system() -> Result<(), TrackerError> {
            source::preflight()
        }

        /// The sizes in force (`ring_bytes` rounded up).
        pub fn config(&self) -> Config {
            self.config
        }

        /// The kernel side's failure counters since loading.
        pub fn counters(&self) -> Result<Counters, TrackerError> {
            self.inner.counters()
        }

        /// The map's raw entry for `pid`: its VPS and start time, without checking that `pid` is
        /// still that process (see [`lookup`](ForkTracker::lookup), which does).
        pub fn tag_of(&self, pid: Pid) -> Result<Option<(VpsId, StartTime)>, TrackerError> {
            Ok(self.inner.get(pid)?.map(|t| (t.vps, self.clock.to_ticks(t.start_ns))))
        }

        /// Every entry of the tag map (a snapshot).
        pub fn entries(&self) -> Result<Vec<Member>, TrackerError> {
            Ok(self
                .inner
                .entries()?
                .into_iter()
                .map(|(pid, t)| Member { pid, vps: t.vps, start: self.clock.to_ticks(t.start_ns) })
                .collect())
        }

        /// The entries of one VPS.
        pub fn members(&self, vps: VpsId) -> Result<Vec<Member>, TrackerError> {
            let mut all = self.entries()?;
            all.retain(|m| m.vps == vps);
            Ok(all)
        }

        /// Tags `pid` (a process, or any of its threads) as a member of `vps`, replacing any tag
        /// it had. Its descendants from now on inherit the tag in the kernel.
        pub fn tag(&self, pid: Pid, vps: VpsId) -> Result<(), TrackerError> {
            let gone = |e: io::Error| {
                if e.kind() == io::ErrorKind::NotFound {
                    TrackerError::NoSuchProcess(pid)
                } else {
                    TrackerError::io(format!("reading /proc/{pid}"), e)
                }
            };
            let tgid = procfs::tgid_of(pid).map_err(gone)?;
            let start = procfs::start_time(tgid).map_err(gone)?;
            self.inner.set(tgid, Tag { vps, start_ns: self.clock.from_ticks(start) })?;
            // If the process died and its pid was reused meanwhile, undo.
            if procfs::start_time(tgid).ok() != Some(start) {
                self.inner.remove(tgid)?;
                return Err(TrackerError::NoSuchProcess(pid));
            }
            Ok(())
        }

        /// Appends `Lost` events for counters that grew since last time.
        fn report_losses(&mut self, out: &mut Vec<Event>) -> Result<(), TrackerError> {
            let now = self.inner.counters()?;
            if now != self.seen {
                out.extend(now.losses_since(self.seen));
                self.seen = now;
            }
            Ok(())
        }

        /// Takes what is decoded and the losses; whether anything was appended.
        fn collect(&mut self, out: &mut Vec<Event>, start: usize) -> Result<bool, TrackerError> {
            self.inner.drain_into(out);
            self.report_losses(out)?;
            Ok(out.len() > start)
        }
    }

    fn page_size() -> u32 {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 {
            v as u32
        } else {
            4096
        }
    }

    impl ForkTracker for Ebpf {
        fn kind(&self) -> BackendKind {
            BackendKind::Ebpf
        }

        fn capabilities(&self) -> Capabilities {
            CAPABILITIES
        }

        /// The ring buffer's descriptor: readable when notifications wait.
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.inner.fd()
        }

        fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
            let start = out.len();
            let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
            loop {
                self.inner.consume()?;
                if self.collect(out, start)? {
                    break;
                }
                let remaining = match (timeout, deadline) {
                    (None, _) => None,
                    (Some(_), Some(d)) => {
                        let now = Instant::now();
                        if now >= d {
                            break;
                        }
                        Some(d - now)
                    }
                    // A timeout too far in the future to represent: as good as none.
                    (Some(_), None) => None,
                };
                self.inner.wait(remaining)?;
                if self.collect(out, start)? {
                    break;
                }
            }
            Ok(out.len() - start)
        }

        /// Seeds the map with `root` (see [`Ebpf::tag`]).
        fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
            self.tag(root, vps)
        }

        /// Deletes every entry of `vps`. Processes of `vps` that fork while this runs may leave
        /// entries behind; the scan repeats (a few times) until it finds none.
        fn forget(&mut self, vps: VpsId) -> Result<(), TrackerError> {
            for _ in 0..4 {
                let mine = self.members(vps)?;
                if mine.is_empty() {
                    break;
                }
                for m in mine {
                    self.inner.remove(m.pid)?;
                }
            }
            Ok(())
        }

        /// The map's tag for `pid`, if `pid` is still the process that was tagged (its start time
        /// in `/proc` matches the one stored). `None` for untagged or vanished processes and for
        /// thread ids (the map is keyed by process).
        ///
        /// A new child shows in `/proc` an instant before the fork tracepoint tags it; it has not
        /// run yet then, and its `Fork` event follows. A look-up in that window returns `None`.
        fn lookup(&self, pid: Pid) -> Option<VpsId> {
            let tag = self.inner.get(pid).ok()??;
            let start = procfs::start_time(pid).ok()?;
            (self.clock.to_ticks(tag.start_ns) == start).then_some(tag.vps)
        }
    }

    impl std::fmt::Debug for Ebpf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Ebpf")
                .field("config", &self.config)
                .field("capacity", &self.inner.capacity())
                .field("clock", &self.clock)
                .field("seen", &self.seen)
                .finish_non_exhaustive()
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub use other::Ebpf;

#[cfg(not(target_os = "linux"))]
mod other {
    use std::convert::Infallible;

    use super::*;

    /// The eBPF fork tracker: Linux only; here [`Ebpf::new`] always fails.
    #[derive(Debug)]
    pub struct Ebpf {
        never: Infallible,
    }

    fn unsupported() -> TrackerError {
        TrackerError::Unsupported("the eBPF backend is Linux only; use --backend kqueue or ptrace".to_owned())
    }

    impl Ebpf {
        /// Always [`TrackerError::Unsupported`] on this system.
        pub fn new() -> Result<Ebpf, TrackerError> {
            Err(unsupported())
        }

        /// Always [`TrackerError::Unsupported`] on this system.
        pub fn with_config(_config: Config) -> Result<Ebpf, TrackerError> {
            Err(unsupported())
        }

        /// Always [`TrackerError::Unsupported`] on this system.
        pub fn check_system() -> Result<(), TrackerError> {
            Err(unsupported())
        }

        /// Never called: no value exists.
        pub fn counters(&self) -> Result<Counters, TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn entries(&self) -> Result<Vec<Member>, TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn members(&self, _vps: VpsId) -> Result<Vec<Member>, TrackerError> {
            match self.never {}
        }
    }

    impl ForkTracker for Ebpf {
        fn kind(&self) -> BackendKind {
            BackendKind::Ebpf
        }
        fn capabilities(&self) -> Capabilities {
            CAPABILITIES
        }
        fn as_fd(&self) -> BorrowedFd<'_> {
            match self.never {}
        }
        fn read_events(&mut self, _out: &mut Vec<Event>, _timeout: Option<Duration>) -> Result<usize, TrackerError> {
            match self.never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_as_documented() {
        let want = Capabilities {
            host_wide: true,
            holds_tags: true,
            synchronous: true,
            thread_events: false,
            reaps: false,
            can_lose: true,
            resync_every: None,
        };
        assert_eq!(CAPABILITIES, want);
    }

    #[test]
    fn default_config() {
        let c = Config::default();
        assert_eq!(c.map_entries, 65_536);
        assert_eq!(c.ring_bytes, 1 << 20);
        let small = Config { map_entries: 8, ..Config::default() };
        assert_eq!(small.ring_bytes, Config::DEFAULT_RING_BYTES);
    }
}
