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
//!   `thread` is that last thread, `status` the wait status `wait(2)` will report. It carries
//!   the process's CPU time in [`Event::exit_cpu_ns`](vpstag_tracker::Event::exit_cpu_ns)
//!   ([`Capabilities::exit_usage`]), read in the kernel at `sched_process_exit`, before anyone
//!   can reap the process: the run time of its threads (the scheduler's `sum_exec_runtime`, in
//!   ns, not rounded to clock ticks: what `/proc/PID/stat` shows as `utime + stime`) plus its
//!   waited-for children's (`cutime + cstime`). It misses what the threads do in the rest of
//!   `exit` (microseconds), the last thread's run since the scheduler's last update of it (at
//!   most a tick), and a thread of the same process still exiting at that instant (killed with
//!   the others by `exit_group` or a fatal signal, and not yet released): its time is lost. The
//!   record is sent before the kernel notifies the parent (and decides whether to reap the
//!   process at once): a consumer may find the process still in `exit`, and tells who reaps it
//!   by its parent (the manager: `Manager::usage` in the `vpstag` crate).
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
//! # Layout
//!
//! As in every vpstag backend: [`decode`] reads ring-buffer records, map values and `/proc` text
//! (pure, unit-tested on every OS); `source.rs` loads the program, talks to its maps and ring
//! buffer and reads `/proc` and `/sys` (the only file with `unsafe`: three blocks, each allowed
//! on its own); `tracker.rs` holds [`Ebpf`] and its [`ForkTracker`] impl; `unsupported.rs` the
//! stand-in for other systems.
//!
//! On other systems than Linux the crate builds to that stand-in, whose [`Ebpf::new`] returns
//! [`TrackerError::Unsupported`], and nothing of the above is needed.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::time::Duration;

pub use vpstag_tracker;
use vpstag_tracker::{Capabilities, Pid, StartTime, VpsId};
#[allow(unused_imports)] // for the docs' links
use vpstag_tracker::{ForkTracker, TrackerError};

pub mod decode;

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        // Denied here too: the three blocks in it say #[allow(unsafe_code)] one by one.
        mod source;
        mod tracker;
        pub use tracker::Ebpf;
    } else {
        mod unsupported;
        pub use unsupported::Ebpf;
    }
}

pub use decode::Counters;

/// What [`Ebpf`] promises: host-wide, tags held in the kernel, synchronous, processes only, does
/// not reap, can lose notifications (never tags), reports each process's CPU time with its exit.
pub const CAPABILITIES: Capabilities =
    Capabilities::new().host_wide(true).holds_tags(true).synchronous(true).can_lose(true).exit_usage(true);

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
    /// page. A record takes 72 bytes. Default 1 MiB (about 14 500 notifications).
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
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))] // used by tracker.rs
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_as_documented() {
        let c = CAPABILITIES;
        assert!(c.host_wide && c.holds_tags && c.synchronous && c.can_lose && c.exit_usage, "{c:?}");
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
