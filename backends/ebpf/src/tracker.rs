//! [`Ebpf`]: the [`ForkTracker`] impl and the tag map's queries, gluing the loaded program
//! (`source.rs`) to the decoder ([`crate::decode`]). Linux only.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use vpstag_tracker::{BackendKind, Capabilities, Event, ForkTracker, Pid, StartTime, TrackerError, VpsId};

use crate::decode::{Clock, Tag};
use crate::source::{self, page_size, Loaded};
use crate::{Config, Counters, Member, Reporting, CAPABILITIES};

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
        let config =
            Config { ring_bytes, wakeup_interval: config.wakeup_interval.min(Config::MAX_WAKEUP_INTERVAL), ..config };
        let clock = Clock::new(source::clk_tck(), source::own_boottime_offset());
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
        let now = source::stat(pid).ok()?;
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
        let tgid = source::tgid_of(pid).map_err(gone)?;
        let start = source::start_time(tgid).map_err(gone)?;
        let tag = Tag { vps, start_ns: self.clock.from_ticks(start), root };
        self.inner.set(tgid, tag)?;
        // The exit program deletes an entry when the process's last thread exits. If that
        // already ran (every thread has begun to exit, or the process is gone or its pid
        // reused), nothing would delete this one: undo, so that no entry outlives its
        // process. A thread not yet exiting now runs the exit program after the write.
        let keep = match source::stat(tgid) {
            Ok(now) => now.start == start.0 && !now.exited() && !source::all_threads_exiting(tgid, &now),
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
