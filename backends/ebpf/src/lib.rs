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
//! # Reporting modes
//!
//! What goes through the ring buffer is a [`Reporting`] mode, set in [`Config::reporting`] and
//! switched at run time with [`Ebpf::set_reporting`]:
//!
//! - [`Reporting::All`] (the default): a record for every fork, exec and exit of a tagged
//!   process. For a consumer that keeps its own table and applies events to it (vpstag's
//!   `Manager`), or that wants the event stream itself. It costs a ring-buffer record per event.
//! - [`Reporting::RootsOnly`]: no per-event records. The map *is* the table: ask it with
//!   [`Ebpf::tag_of`] (one map look-up and one read of `/proc/PID/stat`), [`Ebpf::members`] and
//!   [`Ebpf::entries`] (batched map reads, no `/proc`). Only two things are still sent: the exit
//!   of a *root* (a process tagged with [`Ebpf::tag_root`] or [`ForkTracker::watch`], e.g. a
//!   VPS's first process, so the consumer learns that a VPS ended), and losses: a fork whose
//!   child could not be tagged because the map was full (its `Fork` event, then
//!   `Lost { reason: TrackingError }`) and records dropped on a full ring buffer
//!   (`Lost { reason: Overflow }`). The fork path then costs what the tag map costs, no more.
//!
//! ```no_run
//! # fn main() -> Result<(), vpstag_tracker::TrackerError> {
//! use vpstag_ebpf::{Config, Ebpf, Reporting};
//! use vpstag_tracker::{EventKind, ForkTracker, Pid, VpsId};
//!
//! let mut t = Ebpf::with_config(Config { reporting: Reporting::RootsOnly, ..Config::default() })?;
//! let first = Pid::new(4242).unwrap(); // held at its start gate until tagged
//! t.watch(first, VpsId(1))?; // a root: its exit will be reported
//! // Queries go to the map.
//! let vps = t.tag_of(Pid::new(4243).unwrap())?.map(|(vps, _start)| vps);
//! let members = t.members(VpsId(1))?;
//! // The ring buffer carries only roots' exits and losses: poll t.as_fd(), then read.
//! let mut events = Vec::new();
//! t.read_events(&mut events, Some(std::time::Duration::from_secs(1)))?;
//! for e in &events {
//!     match e.kind {
//!         EventKind::Exit { pid, .. } => println!("VPS {:?} lost its first process {pid}", e.tag),
//!         EventKind::Lost { .. } => println!("some child is untagged: raise Config::map_entries"),
//!         _ => {}
//!     }
//! }
//! # let _ = (vps, members);
//! # Ok(())
//! # }
//! ```
//!
//! A consumer that switches from `RootsOnly` to `All` and keeps a table of its own rebuilds it:
//! switch first, then take [`Ebpf::entries`], then apply the events read from then on (a fork
//! of a process already in the snapshot, an exit of one not in it, are then no-ops). Switching
//! from `All` to `RootsOnly` needs nothing: stop applying events and ask the map.
//!
//! # Wake-ups
//!
//! Waking the reader for a record costs an inter-processor interrupt and a thread wake-up, which
//! on a fork-heavy workload costs more than everything else together. With
//! [`Config::wakeup_interval`] (default 5 ms; settable with [`Ebpf::set_wakeup_interval`]) the
//! kernel side forces at most one wake-up per interval and submits the other records without
//! one. An isolated event still wakes the reader at once (the last wake-up is older than the
//! interval), and so do urgent records (losses, a root's exit) and a ring buffer more than a
//! quarter full. Records submitted without a wake-up are there all the same: a reader that
//! consumes without sleeping (`read_events` with a zero timeout, as vpstag does before it
//! answers a query) sees every one, and [`read_events`](ForkTracker::read_events) with a timeout
//! looks again one interval after it last found records, so the tail of a burst arrives at most
//! one interval late. A consumer that polls [`as_fd`](ForkTracker::as_fd) itself should, after
//! it consumed records, poll with a timeout of about the interval before it sleeps for long.
//! `Duration::ZERO` restores a wake-up for every record that finds the reader idle.
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
pub const CAPABILITIES: Capabilities =
    Capabilities::new().host_wide(true).holds_tags(true).synchronous(true).can_lose(true);

/// What the kernel side sends to user space (see [Reporting modes](crate#reporting-modes)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reporting {
    /// A record for every fork, exec and exit of a tagged process, for a consumer that applies
    /// events to a table of its own. The default.
    #[default]
    All,
    /// Only the exits of roots ([`Ebpf::tag_root`], [`ForkTracker::watch`]) and losses; the
    /// consumer asks the tag map ([`Ebpf::tag_of`], [`Ebpf::members`]) for everything else.
    RootsOnly,
}

/// Sizes of the kernel-side structures, and how it reports.
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
    /// At most one forced wake-up of the reader per this interval for ordinary records (see
    /// [Wake-ups](crate#wake-ups)); `Duration::ZERO` wakes it for every record that finds it
    /// idle. Default 5 ms. Values above an hour count as an hour.
    pub wakeup_interval: Duration,
    /// What to report from the start. Default [`Reporting::All`].
    pub reporting: Reporting,
}

impl Config {
    /// The default tag map capacity.
    pub const DEFAULT_MAP_ENTRIES: u32 = 65_536;
    /// The default ring-buffer size.
    pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
    /// The default interval between forced wake-ups.
    pub const DEFAULT_WAKEUP_INTERVAL: Duration = Duration::from_millis(5);
    /// The longest interval between forced wake-ups.
    pub const MAX_WAKEUP_INTERVAL: Duration = Duration::from_secs(3600);

    /// The kernel side's `control` value for this configuration.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn control(&self) -> decode::Control {
        let interval = self.wakeup_interval.min(Config::MAX_WAKEUP_INTERVAL);
        decode::Control {
            reporting: match self.reporting {
                Reporting::All => decode::REPORT_ALL,
                Reporting::RootsOnly => decode::REPORT_ROOTS,
            },
            wakeup_ns: interval.as_nanos() as u64,
            // A quarter of the ring unread: wake the reader whatever the interval says.
            wake_bytes: u64::from(self.ring_bytes / 4).max(decode::RING_RECORD_BYTES as u64),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            map_entries: Config::DEFAULT_MAP_ENTRIES,
            ring_bytes: Config::DEFAULT_RING_BYTES,
            wakeup_interval: Config::DEFAULT_WAKEUP_INTERVAL,
            reporting: Reporting::All,
        }
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
    /// Whether it is a root ([`Ebpf::tag_root`]): its exit is reported in every mode.
    pub root: bool,
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
    /// use vpstag_ebpf::{Config, Ebpf, Reporting};
    /// use vpstag_tracker::{ForkTracker, Pid, VpsId};
    ///
    /// let mut t = Ebpf::with_config(Config { map_entries: 4096, ..Config::default() })?;
    /// let mut events = Vec::new();
    /// t.read_events(&mut events, Some(std::time::Duration::ZERO))?;
    ///
    /// // No per-event records from now on: ask the map instead.
    /// t.set_reporting(Reporting::RootsOnly)?;
    /// let first = Pid::new(4242).unwrap();
    /// t.tag_root(first, VpsId(1))?;
    /// assert_eq!(t.tag_of(first)?.map(|(vps, _)| vps), Some(VpsId(1)));
    /// # Ok::<(), vpstag_tracker::TrackerError>(())
    /// ```
    pub struct Ebpf {
        inner: Loaded,
        clock: Clock,
        /// The configuration in force: sizes as rounded, and the current mode and interval.
        config: Config,
        /// The counters as last reported.
        seen: Counters,
        /// Until when a blocking read should look again although no wake-up came: records may
        /// have been submitted without one after the last records it found.
        tail_until: Option<Instant>,
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

        /// Loads and attaches the programs with the given configuration.
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
            let config = Config {
                ring_bytes,
                wakeup_interval: config.wakeup_interval.min(Config::MAX_WAKEUP_INTERVAL),
                ..config
            };
            let clock = Clock::new(procfs::clk_tck(), procfs::own_boottime_offset());
            let inner = Loaded::load(config.map_entries, config.ring_bytes, config.control(), clock)?;
            let seen = inner.counters()?;
            Ok(Ebpf { inner, clock, config, seen, tail_until: None })
        }

        /// The checks [`new`](Ebpf::new) makes before it asks the kernel anything: BTF is there
        /// and this process has `CAP_BPF` and `CAP_PERFMON` (or `CAP_SYS_ADMIN`). Cheap; passing
        /// it does not promise that loading succeeds.
        pub fn check_system() -> Result<(), TrackerError> {
            source::preflight()
        }

        /// The configuration in force: `ring_bytes` rounded up, the current reporting mode and
        /// wake-up interval.
        pub fn config(&self) -> Config {
            self.config
        }

        /// The kernel side's failure counters since loading.
        pub fn counters(&self) -> Result<Counters, TrackerError> {
            self.inner.counters()
        }

        /// Switches what the kernel side reports (see [Reporting modes](crate#reporting-modes)).
        /// Events that happen after this returns follow the new mode; records already in the ring
        /// buffer are still delivered.
        ///
        /// ```no_run
        /// # use vpstag_ebpf::{Ebpf, Reporting};
        /// # let mut t = Ebpf::new()?;
        /// t.set_reporting(Reporting::RootsOnly)?; // the map is the table
        /// t.set_reporting(Reporting::All)?; // then rebuild a table from t.entries()
        /// let table = t.entries()?;
        /// # Ok::<(), vpstag_tracker::TrackerError>(())
        /// ```
        pub fn set_reporting(&mut self, reporting: Reporting) -> Result<(), TrackerError> {
            let next = Config { reporting, ..self.config };
            self.inner.set_control(next.control())?;
            self.config = next;
            Ok(())
        }

        /// The reporting mode in force.
        pub fn reporting(&self) -> Reporting {
            self.config.reporting
        }

        /// Sets the interval between forced wake-ups of the reader (see
        /// [Wake-ups](crate#wake-ups)); `Duration::ZERO` wakes it for every record that finds it
        /// idle, the behaviour before wake-ups were batched. At most an hour.
        pub fn set_wakeup_interval(&mut self, interval: Duration) -> Result<(), TrackerError> {
            let next = Config { wakeup_interval: interval.min(Config::MAX_WAKEUP_INTERVAL), ..self.config };
            self.inner.set_control(next.control())?;
            self.config = next;
            Ok(())
        }

        /// The VPS and start time of `pid` from the tag map, if `pid` is still the process that
        /// was tagged: its start time in `/proc/PID/stat` is the one stored, and it has not
        /// exited (a zombie leader whose other threads run has not). One map look-up and one
        /// read of `/proc/PID/stat`. `None` for untagged, exited or reused pids and for thread
        /// ids (the map is keyed by process).
        ///
        /// A new child shows in `/proc` an instant before the fork tracepoint tags it; it has not
        /// run yet then. A look-up in that window returns `None`.
        pub fn tag_of(&self, pid: Pid) -> Result<Option<(VpsId, StartTime)>, TrackerError> {
            Ok(self.inner.get(pid)?.and_then(|t| self.current(pid, t)).map(|m| (m.vps, m.start)))
        }

        /// The map's raw entry for `pid`, without checking that `pid` is still that process
        /// (see [`tag_of`](Ebpf::tag_of), which does). For diagnostics.
        pub fn raw_entry(&self, pid: Pid) -> Result<Option<Member>, TrackerError> {
            Ok(self.inner.get(pid)?.map(|t| self.member(pid, t)))
        }

        /// Every tagged process (a snapshot): the tag map read in batches
        /// (`BPF_MAP_LOOKUP_BATCH`, 1,024 entries a system call), without reading `/proc`.
        ///
        /// Exact: the fork program adds a child before it runs, the exit program deletes a
        /// process when its last thread exits (before its pid can be reused), and
        /// [`tag`](Ebpf::tag) refuses a process whose exit already passed that point, so no
        /// entry outlives its process. A zombie is not listed; a zombie leader whose other
        /// threads run is. An entry added or deleted while the map is read may or may not be.
        pub fn entries(&self) -> Result<Vec<Member>, TrackerError> {
            Ok(self.inner.entries()?.into_iter().map(|(pid, t)| self.member(pid, t)).collect())
        }

        /// The processes of one VPS (a snapshot), read like [`entries`](Ebpf::entries).
        pub fn members(&self, vps: VpsId) -> Result<Vec<Member>, TrackerError> {
            Ok(self
                .inner
                .entries()?
                .into_iter()
                .filter(|(_, t)| t.vps == vps)
                .map(|(pid, t)| self.member(pid, t))
                .collect())
        }

        fn member(&self, pid: Pid, t: Tag) -> Member {
            Member { pid, vps: t.vps, start: self.clock.to_ticks(t.start_ns), root: t.root }
        }

        /// The entry as a member if `pid` is still the process it was written for and has not
        /// exited: a check that costs a read of `/proc/PID/stat`, against an entry that outlived
        /// its process (which [`tag`](Ebpf::tag) prevents) and a pid reused in between.
        fn current(&self, pid: Pid, t: Tag) -> Option<Member> {
            let m = self.member(pid, t);
            let now = procfs::stat(pid).ok()?;
            (now.start == m.start.0 && !now.exited()).then_some(m)
        }

        /// Tags `pid` (a process, or any of its threads) as a member of `vps`, replacing any tag
        /// it had. Its descendants from now on inherit the tag in the kernel.
        ///
        /// [`TrackerError::NoSuchProcess`] if the process is gone, a zombie, or exiting (every
        /// thread has begun to exit): its exit may have passed the exit program already, so it
        /// is not tagged.
        pub fn tag(&self, pid: Pid, vps: VpsId) -> Result<(), TrackerError> {
            self.tag_as(pid, vps, false)
        }

        /// Tags `pid` like [`tag`](Ebpf::tag) and marks it a *root*: its exit is reported in every
        /// [`Reporting`] mode, at once (it wakes the reader). Its descendants inherit the tag, not
        /// the mark. [`ForkTracker::watch`] tags this way.
        pub fn tag_root(&self, pid: Pid, vps: VpsId) -> Result<(), TrackerError> {
            self.tag_as(pid, vps, true)
        }

        fn tag_as(&self, pid: Pid, vps: VpsId, root: bool) -> Result<(), TrackerError> {
            let gone = |e: io::Error| {
                if e.kind() == io::ErrorKind::NotFound {
                    TrackerError::NoSuchProcess(pid)
                } else {
                    TrackerError::io(format!("reading /proc/{pid}"), e)
                }
            };
            let tgid = procfs::tgid_of(pid).map_err(gone)?;
            let start = procfs::start_time(tgid).map_err(gone)?;
            let tag = Tag { vps, start_ns: self.clock.from_ticks(start), root };
            self.inner.set(tgid, tag)?;
            // The exit program deletes an entry when the process's last thread exits. If that
            // already ran (every thread has begun to exit, or the process is gone or its pid
            // reused), nothing would delete this one: undo, so that no entry outlives its
            // process. A thread not yet exiting now runs the exit program after the write.
            let keep = match procfs::stat(tgid) {
                Ok(now) => now.start == start.0 && !now.exited() && !procfs::all_threads_exiting(tgid, &now),
                Err(_) => false,
            };
            if !keep {
                // Only our own entry: a reused pid may have been tagged by its parent's fork.
                if self.inner.get(tgid)? == Some(tag) {
                    self.inner.remove(tgid)?;
                }
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
            if self.inner.drain_into(out) > 0 && !self.config.wakeup_interval.is_zero() {
                // Records may follow without a wake-up for one interval.
                self.tail_until = Instant::now().checked_add(self.config.wakeup_interval);
            }
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

        /// The ring buffer's descriptor: readable when notifications wait. With batched
        /// wake-ups, a sleeping poll is woken at most once per interval (see
        /// [Wake-ups](crate#wake-ups)).
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.inner.fd()
        }

        /// Reads what is queued; with a timeout, waits up to it for something. Records submitted
        /// without a wake-up after the last ones it found are looked for one wake-up interval
        /// later, so a waiting reader misses none of them.
        fn read_events(&mut self, out: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize, TrackerError> {
            let start = out.len();
            let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
            loop {
                let before = Instant::now();
                self.inner.consume()?;
                if self.collect(out, start)? {
                    break;
                }
                // Looked after the tail window closed and found nothing: no record is waiting
                // without its wake-up.
                if self.tail_until.is_some_and(|t| before >= t) {
                    self.tail_until = None;
                }
                let mut remaining = match (timeout, deadline) {
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
                if let Some(tail) = self.tail_until {
                    let until_tail = tail.saturating_duration_since(Instant::now());
                    remaining = Some(remaining.map_or(until_tail, |r| r.min(until_tail)));
                }
                self.inner.wait(remaining)?;
                if self.collect(out, start)? {
                    break;
                }
            }
            Ok(out.len() - start)
        }

        /// Seeds the map with `root`, marked a root (see [`Ebpf::tag_root`]).
        fn watch(&mut self, root: Pid, vps: VpsId) -> Result<(), TrackerError> {
            self.tag_root(root, vps)
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

        /// The map's tag for `pid`, checked like [`Ebpf::tag_of`].
        ///
        /// A new child shows in `/proc` an instant before the fork tracepoint tags it; it has not
        /// run yet then, and its `Fork` event follows. A look-up in that window returns `None`.
        fn lookup(&self, pid: Pid) -> Option<VpsId> {
            self.tag_of(pid).ok()?.map(|(vps, _)| vps)
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
        pub fn config(&self) -> Config {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn counters(&self) -> Result<Counters, TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn set_reporting(&mut self, _reporting: Reporting) -> Result<(), TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn reporting(&self) -> Reporting {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn set_wakeup_interval(&mut self, _interval: Duration) -> Result<(), TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn tag_of(&self, _pid: Pid) -> Result<Option<(VpsId, StartTime)>, TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn raw_entry(&self, _pid: Pid) -> Result<Option<Member>, TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn tag(&self, _pid: Pid, _vps: VpsId) -> Result<(), TrackerError> {
            match self.never {}
        }

        /// Never called: no value exists.
        pub fn tag_root(&self, _pid: Pid, _vps: VpsId) -> Result<(), TrackerError> {
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
        let c = CAPABILITIES;
        assert!(c.host_wide && c.holds_tags && c.synchronous && c.can_lose, "{c:?}");
        assert!(!c.thread_events && !c.reaps && c.resync_every.is_none(), "{c:?}");
    }

    #[test]
    fn default_config() {
        let c = Config::default();
        assert_eq!(c.map_entries, 65_536);
        assert_eq!(c.ring_bytes, 1 << 20);
        assert_eq!(c.wakeup_interval, Duration::from_millis(5));
        assert_eq!(c.reporting, Reporting::All);
        let small = Config { map_entries: 8, ..Config::default() };
        assert_eq!(small.ring_bytes, Config::DEFAULT_RING_BYTES);
    }

    #[test]
    fn config_becomes_the_control_value() {
        let c = Config::default().control();
        assert_eq!(c.reporting, decode::REPORT_ALL);
        assert_eq!(c.wakeup_ns, 5_000_000);
        assert_eq!(c.wake_bytes, (1 << 20) / 4);
        let old = Config { wakeup_interval: Duration::ZERO, ..Config::default() }.control();
        assert_eq!(old, decode::Control { wakeup_ns: 0, ..c }, "zero: a wake-up per record");
        let roots = Config { reporting: Reporting::RootsOnly, ..Config::default() }.control();
        assert_eq!(roots.reporting, decode::REPORT_ROOTS);
        let huge = Config { wakeup_interval: Duration::MAX, ring_bytes: 4, ..Config::default() }.control();
        assert_eq!(huge.wakeup_ns, 3_600_000_000_000, "capped at an hour");
        assert_eq!(huge.wake_bytes, decode::RING_RECORD_BYTES as u64, "at least one record");
    }
}
