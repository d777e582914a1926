//! Pure decoding: ring-buffer records and map values (bytes laid out by `src/bpf/vpstag.h`) to
//! and from Rust values. No OS calls, so it is tested without a kernel and builds everywhere.
//!
//! Every integer is in the target's byte order (`build.rs` compiles the BPF program for it).

use vpstag_tracker::{Event, EventKind, ExitStatus, LossReason, Pid, StartTime, VpsId};

/// Size of one ring-buffer record, `struct vpstag_event`.
pub const RECORD_SIZE: usize = 64;
/// Size of a value of the `tags` map, `struct vpstag_tag`; its key is the tgid, a `u32`.
pub const TAG_SIZE: usize = 24;
/// Size of the value of the `counters` map, `struct vpstag_counters`.
pub const COUNTERS_SIZE: usize = 16;
/// Size of the value of the `control` map, `struct vpstag_control`.
pub const CONTROL_SIZE: usize = 24;
/// Size a record takes in the ring buffer: the record and the ring's 8-byte header.
pub const RING_RECORD_BYTES: usize = RECORD_SIZE + 8;

/// `enum vpstag_kind`.
pub const KIND_FORK: u32 = 1;
/// `enum vpstag_kind`.
pub const KIND_EXEC: u32 = 2;
/// `enum vpstag_kind`.
pub const KIND_EXIT: u32 = 3;
/// `VPSTAG_F_UNTRACKED`: a forked child could not be added to the map.
pub const FLAG_UNTRACKED: u32 = 0x1;
/// `VPSTAG_F_ROOT`: an exit of a root (a process tagged with [`TAG_ROOT`]).
pub const FLAG_ROOT: u32 = 0x2;
/// `VPSTAG_F_CPU`: an exit whose record holds the process's CPU time (`cpu_ns`).
pub const FLAG_CPU: u32 = 0x4;
/// `VPSTAG_TAG_ROOT`: the tag map's flag for a root, whose exit is always reported.
pub const TAG_ROOT: u32 = 0x1;
/// `VPSTAG_REPORT_ALL`: a record for every fork, exec and exit of a tagged process.
pub const REPORT_ALL: u32 = 0;
/// `VPSTAG_REPORT_ROOTS`: records only for roots' exits and for losses.
pub const REPORT_ROOTS: u32 = 1;

// Offsets inside `struct vpstag_event`.
const OFF_TIME: usize = 0;
const OFF_VPS: usize = 8;
const OFF_START: usize = 16;
const OFF_KIND: usize = 24;
const OFF_CPU: usize = 28;
const OFF_PID: usize = 32;
const OFF_TID: usize = 36;
const OFF_CHILD: usize = 40;
const OFF_STATUS: usize = 44;
const OFF_FLAGS: usize = 48;
const OFF_CPU_NS: usize = 56;

/// Converts the kernel's boot-clock nanoseconds (`bpf_ktime_get_boot_ns`, `start_boottime`) to
/// what this process sees: `CLOCK_BOOTTIME` nanoseconds and `/proc/PID/stat` clock ticks, both
/// shifted by the boot-time offset of our time namespace (0 outside one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Nanoseconds per clock tick: 10^9 / `sysconf(_SC_CLK_TCK)`.
    pub ns_per_tick: u64,
    /// Our time namespace's `CLOCK_BOOTTIME` offset, in nanoseconds.
    pub boottime_offset_ns: i64,
}

impl Clock {
    /// A clock for `clk_tck` ticks a second (`sysconf(_SC_CLK_TCK)`, usually 100).
    pub fn new(clk_tck: u64, boottime_offset_ns: i64) -> Clock {
        let ns_per_tick = 1_000_000_000u64.checked_div(clk_tck).map_or(10_000_000, |n| n.max(1));
        Clock { ns_per_tick, boottime_offset_ns }
    }

    /// Kernel boot-clock nanoseconds as this process's `CLOCK_BOOTTIME` nanoseconds.
    pub fn boot_ns(self, kernel_ns: u64) -> u64 {
        kernel_ns.saturating_add_signed(self.boottime_offset_ns)
    }

    /// A kernel `start_boottime` as the start time `/proc/PID/stat` (field 22) shows, the way the
    /// kernel's `nsec_to_clock_t` computes it.
    pub fn to_ticks(self, kernel_ns: u64) -> StartTime {
        StartTime(self.boot_ns(kernel_ns) / self.ns_per_tick)
    }

    /// A `/proc` start time back to kernel boot-clock nanoseconds (the start of that tick), so
    /// that [`to_ticks`](Clock::to_ticks) gives `ticks` again.
    pub fn from_ticks(self, ticks: StartTime) -> u64 {
        ticks.0.saturating_mul(self.ns_per_tick).saturating_add_signed(self.boottime_offset_ns.saturating_neg())
    }
}

/// A record that is not what the BPF program writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than [`RECORD_SIZE`].
    #[error("ring-buffer record of {0} bytes, expected {RECORD_SIZE}")]
    Short(usize),
    /// An unknown `kind`.
    #[error("ring-buffer record of unknown kind {0}")]
    UnknownKind(u32),
    /// A process or thread id that is not positive.
    #[error("ring-buffer record with an invalid {0} id {1}")]
    BadPid(&'static str, i32),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

fn i32_at(b: &[u8], off: usize) -> i32 {
    u32_at(b, off) as i32
}

fn pid_at(b: &[u8], off: usize, what: &'static str) -> Result<Pid, DecodeError> {
    let raw = i32_at(b, off);
    Pid::new(raw).ok_or(DecodeError::BadPid(what, raw))
}

/// A decoded record: the event and the record's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The event, with `time_ns`, `tag` and `cpu` filled in.
    pub event: Event,
    /// `VPSTAG_F_*` bits ([`FLAG_UNTRACKED`]).
    pub flags: u32,
}

/// Decodes one ring-buffer record.
pub fn decode_record(rec: &[u8], clock: Clock) -> Result<Record, DecodeError> {
    if rec.len() < RECORD_SIZE {
        return Err(DecodeError::Short(rec.len()));
    }
    let kind = match u32_at(rec, OFF_KIND) {
        KIND_FORK => EventKind::Fork {
            parent: pid_at(rec, OFF_PID, "parent")?,
            child: pid_at(rec, OFF_CHILD, "child")?,
            child_thread: pid_at(rec, OFF_TID, "child thread")?,
            thread: false,
            child_start: Some(clock.to_ticks(u64_at(rec, OFF_START))),
        },
        KIND_EXEC => EventKind::Exec { pid: pid_at(rec, OFF_PID, "process")?, thread: pid_at(rec, OFF_TID, "thread")? },
        KIND_EXIT => EventKind::Exit {
            pid: pid_at(rec, OFF_PID, "process")?,
            thread: pid_at(rec, OFF_TID, "thread")?,
            status: ExitStatus::from_wait_status(i32_at(rec, OFF_STATUS)),
            group_dead: Some(true),
        },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let flags = u32_at(rec, OFF_FLAGS);
    let exit_cpu_ns =
        (matches!(kind, EventKind::Exit { .. }) && flags & FLAG_CPU != 0).then(|| u64_at(rec, OFF_CPU_NS));
    let event = Event {
        kind,
        time_ns: Some(clock.boot_ns(u64_at(rec, OFF_TIME))),
        tag: Some(VpsId(u64_at(rec, OFF_VPS))),
        cpu: Some(u32_at(rec, OFF_CPU)),
        exit_cpu_ns,
    };
    Ok(Record { event, flags })
}

/// Decodes one ring-buffer record into an event; a malformed record becomes
/// `Lost { count: Some(1), reason: Other }`, so that nothing is dropped silently.
pub fn decode_event(rec: &[u8], clock: Clock) -> Event {
    match decode_record(rec, clock) {
        Ok(r) => r.event,
        Err(_) => Event::new(EventKind::Lost { count: Some(1), reason: LossReason::Other }),
    }
}

/// Encodes a record as the BPF program writes it (for tests and tools).
#[allow(clippy::too_many_arguments)]
pub fn encode_record(
    kind: u32,
    time_ns: u64,
    vps: u64,
    start_ns: u64,
    cpu: u32,
    pid: i32,
    tid: i32,
    child: i32,
    status: i32,
    flags: u32,
) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    b[OFF_TIME..OFF_TIME + 8].copy_from_slice(&time_ns.to_ne_bytes());
    b[OFF_VPS..OFF_VPS + 8].copy_from_slice(&vps.to_ne_bytes());
    b[OFF_START..OFF_START + 8].copy_from_slice(&start_ns.to_ne_bytes());
    b[OFF_KIND..OFF_KIND + 4].copy_from_slice(&kind.to_ne_bytes());
    b[OFF_CPU..OFF_CPU + 4].copy_from_slice(&cpu.to_ne_bytes());
    b[OFF_PID..OFF_PID + 4].copy_from_slice(&pid.to_ne_bytes());
    b[OFF_TID..OFF_TID + 4].copy_from_slice(&tid.to_ne_bytes());
    b[OFF_CHILD..OFF_CHILD + 4].copy_from_slice(&child.to_ne_bytes());
    b[OFF_STATUS..OFF_STATUS + 4].copy_from_slice(&status.to_ne_bytes());
    b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
    b
}

/// Puts a CPU figure into an exit record made by [`encode_record`], as the BPF program does: the
/// `cpu_ns` field and [`FLAG_CPU`] (for tests and tools).
pub fn set_exit_cpu_ns(rec: &mut [u8; RECORD_SIZE], cpu_ns: u64) {
    rec[OFF_CPU_NS..OFF_CPU_NS + 8].copy_from_slice(&cpu_ns.to_ne_bytes());
    let flags = u32_at(rec, OFF_FLAGS) | FLAG_CPU;
    rec[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
}

/// A value of the `tags` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The VPS.
    pub vps: VpsId,
    /// The process's start, kernel boot-clock nanoseconds (see [`Clock`]).
    pub start_ns: u64,
    /// Whether it is a root ([`TAG_ROOT`]): its exit is always reported.
    pub root: bool,
}

impl Tag {
    /// The map value's bytes.
    pub fn to_bytes(self) -> [u8; TAG_SIZE] {
        let mut b = [0u8; TAG_SIZE];
        b[..8].copy_from_slice(&self.vps.0.to_ne_bytes());
        b[8..16].copy_from_slice(&self.start_ns.to_ne_bytes());
        let flags = if self.root { TAG_ROOT } else { 0 };
        b[16..20].copy_from_slice(&flags.to_ne_bytes());
        b
    }

    /// Reads a map value; `None` if it has the wrong size.
    pub fn from_bytes(b: &[u8]) -> Option<Tag> {
        (b.len() == TAG_SIZE).then(|| Tag {
            vps: VpsId(u64_at(b, 0)),
            start_ns: u64_at(b, 8),
            root: u32_at(b, 16) & TAG_ROOT != 0,
        })
    }
}

/// The value of the `control` map, `struct vpstag_control`: what the programs report and how they
/// wake the reader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// [`REPORT_ALL`] or [`REPORT_ROOTS`].
    pub reporting: u32,
    /// 0: the kernel's default wake-up for every record that finds the reader idle; otherwise at
    /// most one forced wake-up per this many nanoseconds for ordinary records.
    pub wakeup_ns: u64,
    /// With `wakeup_ns`: force a wake-up when this many bytes wait unread in the ring.
    pub wake_bytes: u64,
}

impl Control {
    /// The map value's bytes.
    pub fn to_bytes(self) -> [u8; CONTROL_SIZE] {
        let mut b = [0u8; CONTROL_SIZE];
        b[..4].copy_from_slice(&self.reporting.to_ne_bytes());
        b[8..16].copy_from_slice(&self.wakeup_ns.to_ne_bytes());
        b[16..].copy_from_slice(&self.wake_bytes.to_ne_bytes());
        b
    }

    /// Reads the map value; `None` if it has the wrong size.
    pub fn from_bytes(b: &[u8]) -> Option<Control> {
        (b.len() == CONTROL_SIZE).then(|| Control {
            reporting: u32_at(b, 0),
            wakeup_ns: u64_at(b, 8),
            wake_bytes: u64_at(b, 16),
        })
    }
}

/// The key of the `tags` map for a process.
pub fn tag_key(pid: Pid) -> [u8; 4] {
    (pid.as_raw() as u32).to_ne_bytes()
}

/// Reads a key of the `tags` map.
pub fn pid_from_key(b: &[u8]) -> Option<Pid> {
    if b.len() != 4 {
        return None;
    }
    Pid::new(i32_at(b, 0))
}

/// What the kernel side could not do, counted since the programs were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Children of tagged processes that could not be added to the tag map (it was full): those
    /// children and their descendants are not tagged by the kernel.
    pub insert_failed: u64,
    /// Notifications dropped because the ring buffer was full (tags are not affected).
    pub ringbuf_full: u64,
}

impl Counters {
    /// Reads the `counters` map value; `None` if it has the wrong size.
    pub fn from_bytes(b: &[u8]) -> Option<Counters> {
        (b.len() == COUNTERS_SIZE).then(|| Counters { insert_failed: u64_at(b, 0), ringbuf_full: u64_at(b, 8) })
    }

    /// The map value's bytes.
    pub fn to_bytes(self) -> [u8; COUNTERS_SIZE] {
        let mut b = [0u8; COUNTERS_SIZE];
        b[..8].copy_from_slice(&self.insert_failed.to_ne_bytes());
        b[8..].copy_from_slice(&self.ringbuf_full.to_ne_bytes());
        b
    }

    /// The `Lost` events that report the growth from `seen` to `self`: `TrackingError` for
    /// failed insertions, `Overflow` for dropped notifications.
    pub fn losses_since(self, seen: Counters) -> impl Iterator<Item = Event> {
        let map = self.insert_failed.saturating_sub(seen.insert_failed);
        let ring = self.ringbuf_full.saturating_sub(seen.ringbuf_full);
        let lost = |n: u64, reason| (n > 0).then(|| Event::new(EventKind::Lost { count: Some(n), reason }));
        lost(map, LossReason::TrackingError).into_iter().chain(lost(ring, LossReason::Overflow))
    }
}

// ---- /proc and /sys, as text

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

#[cfg(test)]
mod tests {
    use super::*;

    const CLOCK: Clock = Clock { ns_per_tick: 10_000_000, boottime_offset_ns: 0 };

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    #[test]
    fn layout_matches_the_c_header() {
        // Pinned against src/bpf/vpstag.h; the header's comments say 64 bytes.
        let header = include_str!("bpf/vpstag.h");
        assert!(header.contains("One ring-buffer record, 64 bytes."));
        assert_eq!(RECORD_SIZE, 64);
        assert_eq!(OFF_FLAGS + 4 + 4, OFF_CPU_NS);
        assert_eq!(OFF_CPU_NS + 8, RECORD_SIZE);
        assert_eq!(TAG_SIZE, 16 + 4 + 4);
        assert_eq!(COUNTERS_SIZE, 16);
        assert_eq!(CONTROL_SIZE, 4 + 4 + 8 + 8);
        for (text, value) in [
            ("#define VPSTAG_TAG_ROOT 0x1", TAG_ROOT),
            ("#define VPSTAG_F_UNTRACKED 0x1", FLAG_UNTRACKED),
            ("#define VPSTAG_F_ROOT 0x2", FLAG_ROOT),
            ("#define VPSTAG_F_CPU 0x4", FLAG_CPU),
        ] {
            assert!(header.contains(text) && text.ends_with(&format!("{value:#x}")), "{text} in vpstag.h");
        }
        assert!(header.contains(&format!("VPSTAG_REPORT_ALL = {REPORT_ALL},")));
        assert!(header.contains(&format!("VPSTAG_REPORT_ROOTS = {REPORT_ROOTS},")));
        let tag = &header[header.find("struct vpstag_tag {").unwrap()..];
        let tag = &tag[..tag.find("};").unwrap()];
        assert!(tag.find("start_ns;") < tag.find("flags;") && tag.find("flags;") < tag.find("pad;"));
        let control = &header[header.find("struct vpstag_control {").unwrap()..];
        let control = &control[..control.find("};").unwrap()];
        let order = ["reporting;", "pad;", "wakeup_ns;", "wake_bytes;"];
        assert!(order.windows(2).all(|w| control.find(w[0]) < control.find(w[1])), "{control}");
        let order =
            ["time_ns", "vps", "start_ns", "kind", "cpu", "pid", "tid", "child", "status", "flags", "pad", "cpu_ns"];
        let body = &header[header.find("struct vpstag_event {").unwrap()..];
        let mut last = 0;
        for field in order {
            let at = body.find(&format!("{field};")).unwrap_or_else(|| panic!("{field} not in vpstag.h"));
            assert!(at > last, "{field} out of order in vpstag.h");
            last = at;
        }
    }

    #[test]
    fn decodes_a_fork() {
        // Child started 12.345678901 s after boot: tick 1234.
        let rec = encode_record(KIND_FORK, 99_000_000_000, 7, 12_345_678_901, 1, 100, 101, 101, 0, 0);
        let r = decode_record(&rec, CLOCK).unwrap();
        assert_eq!(r.flags, 0);
        assert_eq!(
            r.event,
            Event {
                kind: EventKind::Fork {
                    parent: pid(100),
                    child: pid(101),
                    child_thread: pid(101),
                    thread: false,
                    child_start: Some(StartTime(1234)),
                },
                time_ns: Some(99_000_000_000),
                tag: Some(VpsId(7)),
                cpu: Some(1),
                exit_cpu_ns: None,
            }
        );
    }

    #[test]
    fn decodes_an_untracked_fork() {
        let rec = encode_record(KIND_FORK, 1, 7, 0, 0, 100, 101, 101, 0, FLAG_UNTRACKED);
        assert_eq!(decode_record(&rec, CLOCK).unwrap().flags, FLAG_UNTRACKED);
    }

    #[test]
    fn decodes_exec_from_a_thread() {
        let rec = encode_record(KIND_EXEC, 5, 9, 0, 0, 200, 203, 0, 0, 0);
        let ev = decode_event(&rec, CLOCK);
        assert_eq!(ev.kind, EventKind::Exec { pid: pid(200), thread: pid(203) });
        assert_eq!(ev.tag, Some(VpsId(9)));
        assert_eq!(ev.time_ns, Some(5));
    }

    #[test]
    fn decodes_exits_with_status() {
        let exited = encode_record(KIND_EXIT, 5, 9, 0, 0, 200, 201, 0, 3 << 8, 0);
        assert_eq!(
            decode_event(&exited, CLOCK).kind,
            EventKind::Exit {
                pid: pid(200),
                thread: pid(201),
                status: Some(ExitStatus::Exited(3)),
                group_dead: Some(true)
            }
        );
        let killed = encode_record(KIND_EXIT, 5, 9, 0, 0, 200, 200, 0, 9, 0);
        assert_eq!(
            decode_event(&killed, CLOCK).kind,
            EventKind::Exit {
                pid: pid(200),
                thread: pid(200),
                status: Some(ExitStatus::Signaled { signal: 9, core_dumped: false }),
                group_dead: Some(true)
            }
        );
    }

    #[test]
    fn decodes_the_cpu_figure_of_an_exit() {
        let mut rec = encode_record(KIND_EXIT, 5, 9, 0, 1, 200, 201, 0, 0, FLAG_ROOT);
        // 1.5 s of CPU, a value that fills more than the low 32 bits.
        set_exit_cpu_ns(&mut rec, 1_500_000_123);
        assert_eq!(&rec[56..64], &1_500_000_123u64.to_ne_bytes());
        assert_eq!(u32_at(&rec, 48), FLAG_ROOT | FLAG_CPU);
        let r = decode_record(&rec, CLOCK).unwrap();
        assert_eq!(r.event.exit_cpu_ns, Some(1_500_000_123));
        assert_eq!(r.flags, FLAG_ROOT | FLAG_CPU);
        assert_eq!(
            r.event.kind,
            EventKind::Exit {
                pid: pid(200),
                thread: pid(201),
                status: Some(ExitStatus::Exited(0)),
                group_dead: Some(true)
            }
        );
        // A zero figure is a figure (a process that never ran a tick's worth).
        let mut zero = encode_record(KIND_EXIT, 5, 9, 0, 1, 200, 200, 0, 0, 0);
        set_exit_cpu_ns(&mut zero, 0);
        assert_eq!(decode_event(&zero, CLOCK).exit_cpu_ns, Some(0));
        // Without the flag the field is not read: no figure.
        let mut bytes = encode_record(KIND_EXIT, 5, 9, 0, 1, 200, 200, 0, 0, 0);
        bytes[56..64].copy_from_slice(&77u64.to_ne_bytes());
        assert_eq!(decode_event(&bytes, CLOCK).exit_cpu_ns, None);
        // Only an exit carries one, whatever the bytes say.
        let mut fork = encode_record(KIND_FORK, 1, 7, 0, 0, 100, 101, 101, 0, 0);
        set_exit_cpu_ns(&mut fork, 5);
        assert_eq!(decode_event(&fork, CLOCK).exit_cpu_ns, None);
    }

    #[test]
    fn longer_records_are_accepted() {
        // The ring buffer may round sizes up; only the prefix matters.
        let mut v = encode_record(KIND_EXEC, 1, 1, 0, 0, 2, 2, 0, 0, 0).to_vec();
        v.extend_from_slice(&[0xff; 8]);
        assert!(decode_record(&v, CLOCK).is_ok());
    }

    #[test]
    fn malformed_records_are_errors_and_lost_events() {
        let rec = encode_record(KIND_FORK, 1, 1, 0, 0, 2, 3, 3, 0, 0);
        assert_eq!(decode_record(&rec[..40], CLOCK), Err(DecodeError::Short(40)));
        // A record of the former layout (56 bytes, no cpu_ns) is short too.
        assert_eq!(decode_record(&rec[..56], CLOCK), Err(DecodeError::Short(56)));
        let unknown = encode_record(42, 1, 1, 0, 0, 2, 3, 3, 0, 0);
        assert_eq!(decode_record(&unknown, CLOCK), Err(DecodeError::UnknownKind(42)));
        let bad_child = encode_record(KIND_FORK, 1, 1, 0, 0, 2, 3, 0, 0, 0);
        assert_eq!(decode_record(&bad_child, CLOCK), Err(DecodeError::BadPid("child", 0)));
        let bad_pid = encode_record(KIND_EXIT, 1, 1, 0, 0, -4, 3, 0, 0, 0);
        assert_eq!(decode_record(&bad_pid, CLOCK), Err(DecodeError::BadPid("process", -4)));
        assert_eq!(decode_event(&unknown, CLOCK).kind, EventKind::Lost { count: Some(1), reason: LossReason::Other });
    }

    #[test]
    fn clock_converts_like_the_kernel() {
        let c = Clock::new(100, 0);
        assert_eq!(c.ns_per_tick, 10_000_000);
        assert_eq!(c.to_ticks(0), StartTime(0));
        assert_eq!(c.to_ticks(9_999_999), StartTime(0));
        assert_eq!(c.to_ticks(10_000_000), StartTime(1));
        // A start time read from /proc round-trips exactly.
        for t in [0, 1, 99, 123_456_789] {
            assert_eq!(c.to_ticks(c.from_ticks(StartTime(t))), StartTime(t));
        }
        // Inside a time namespace whose boot clock is 5 s ahead.
        let ns = Clock::new(100, 5_000_000_000);
        assert_eq!(ns.boot_ns(1), 5_000_000_001);
        assert_eq!(ns.to_ticks(0), StartTime(500));
        assert_eq!(ns.from_ticks(StartTime(600)), 1_000_000_000);
        assert_eq!(ns.to_ticks(ns.from_ticks(StartTime(777))), StartTime(777));
        // Odd tick rates and a zero from sysconf do not divide by zero.
        assert_eq!(Clock::new(0, 0).ns_per_tick, 10_000_000);
        assert_eq!(Clock::new(1024, 0).ns_per_tick, 976_562);
    }

    #[test]
    fn tag_values_round_trip() {
        let t = Tag { vps: VpsId(0xdead_beef_0042), start_ns: 123_456_789_012, root: false };
        assert_eq!(Tag::from_bytes(&t.to_bytes()), Some(t));
        let root = Tag { root: true, ..t };
        assert_eq!(Tag::from_bytes(&root.to_bytes()), Some(root));
        assert_eq!(u32::from_ne_bytes(root.to_bytes()[16..20].try_into().unwrap()), TAG_ROOT);
        assert_eq!(Tag::from_bytes(&[0; 8]), None);
        assert_eq!(Tag::from_bytes(&[0; 16]), None);
        let c = Control { reporting: REPORT_ROOTS, wakeup_ns: 4_000_000, wake_bytes: 1 << 18 };
        assert_eq!(Control::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(Control::default().to_bytes(), [0; CONTROL_SIZE], "all zero: the old behaviour");
        assert_eq!(Control::from_bytes(&[0; 16]), None);
        assert_eq!(pid_from_key(&tag_key(pid(4242))), Some(pid(4242)));
        assert_eq!(pid_from_key(&[0; 4]), None);
        assert_eq!(pid_from_key(&[1; 8]), None);
    }

    #[test]
    fn counter_growth_becomes_lost_events() {
        let c = Counters { insert_failed: 5, ringbuf_full: 2 };
        assert_eq!(Counters::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(Counters::from_bytes(&[0; 3]), None);
        let lost: Vec<_> = c.losses_since(Counters { insert_failed: 1, ringbuf_full: 2 }).collect();
        assert_eq!(lost, vec![Event::new(EventKind::Lost { count: Some(4), reason: LossReason::TrackingError })]);
        let lost: Vec<_> = c.losses_since(Counters::default()).collect();
        assert_eq!(
            lost,
            vec![
                Event::new(EventKind::Lost { count: Some(5), reason: LossReason::TrackingError }),
                Event::new(EventKind::Lost { count: Some(2), reason: LossReason::Overflow }),
            ]
        );
        assert_eq!(c.losses_since(c).count(), 0);
    }

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
