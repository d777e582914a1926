//! Pure decoding of proc connector datagrams: bytes in, [`Event`]s out.
//!
//! Nothing here makes a system call, so this module is compiled and unit-tested on every OS. Every
//! read is bounds-checked and uses native-endian byte reads (netlink messages are in the host's
//! byte order); malformed input yields a [`DecodeError`] or a counted skip, never a panic.
//!
//! Wire layout (all native-endian, from `<linux/netlink.h>`, `<linux/connector.h>` and
//! `<linux/cn_proc.h>`):
//!
//! ```text
//! nlmsghdr   (16 bytes)  len u32 | type u16 | flags u16 | seq u32 | port u32
//! cn_msg     (20 bytes)  idx u32 | val u32 | seq u32 | ack u32 | len u16 | flags u16
//! proc_event (16 bytes + event data)
//!                        what u32 | cpu u32 | timestamp_ns u64 | event data ...
//! ```
//!
//! One datagram may hold several netlink messages, each starting at a 4-byte aligned offset.
//! The kernel sends proc connector messages with type `NLMSG_DONE`.

use std::collections::HashMap;
use std::fmt;

use vpstag_tracker::{Event, EventKind, ExitStatus, LossReason, Pid};

/// Size of a netlink message header (`struct nlmsghdr`).
pub const NLMSG_HDRLEN: usize = 16;
/// Size of a connector message header (`struct cn_msg`) without its payload.
pub const CN_MSG_LEN: usize = 20;
/// Size of the fixed part of `struct proc_event` (`what`, `cpu`, `timestamp_ns`).
pub const PROC_EVENT_HDRLEN: usize = 16;

/// Netlink message type: nothing, skip it.
pub const NLMSG_NOOP: u16 = 1;
/// Netlink message type: an error report or acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// Netlink message type: end of a multipart message; the connector sends every message with it.
pub const NLMSG_DONE: u16 = 3;

/// Connector index of the proc connector, also its multicast group.
pub const CN_IDX_PROC: u32 = 1;
/// Connector value of the proc connector.
pub const CN_VAL_PROC: u32 = 1;

/// `enum proc_cn_mcast_op`: start receiving events.
pub const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `enum proc_cn_mcast_op`: stop receiving events.
pub const PROC_CN_MCAST_IGNORE: u32 = 2;

/// `proc_event.what`: an acknowledgement of a `PROC_CN_MCAST_*` request.
pub const PROC_EVENT_NONE: u32 = 0;
/// `proc_event.what`: a process or thread was created.
pub const PROC_EVENT_FORK: u32 = 0x0000_0001;
/// `proc_event.what`: a process called `execve`.
pub const PROC_EVENT_EXEC: u32 = 0x0000_0002;
/// `proc_event.what`: user ids changed (not used by vpstag).
pub const PROC_EVENT_UID: u32 = 0x0000_0004;
/// `proc_event.what`: group ids changed (not used).
pub const PROC_EVENT_GID: u32 = 0x0000_0040;
/// `proc_event.what`: `setsid` (not used).
pub const PROC_EVENT_SID: u32 = 0x0000_0080;
/// `proc_event.what`: ptrace attach/detach (not used).
pub const PROC_EVENT_PTRACE: u32 = 0x0000_0100;
/// `proc_event.what`: the command name changed (not used).
pub const PROC_EVENT_COMM: u32 = 0x0000_0200;
/// Filter bit (Linux 6.6+): report only exits with a non-zero status. Never a `what` value.
pub const PROC_EVENT_NONZERO_EXIT: u32 = 0x2000_0000;
/// `proc_event.what`: a core dump (not used).
pub const PROC_EVENT_COREDUMP: u32 = 0x4000_0000;
/// `proc_event.what`: a thread or process exited.
pub const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// The event types vpstag uses; the mask sent with the optional kernel filter (Linux 6.6+).
pub const TRACKED_EVENTS: u32 = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT;

/// The `cpu` value the kernel puts in acknowledgements that do not take a per-CPU sequence number
/// (kernels whose acks bypass the per-CPU counter report cpu `-1`).
pub const NO_CPU: u32 = u32::MAX;

/// Why a datagram could not be walked to its end. Events of the messages before the fault have
/// already been appended to the output.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// The datagram did not come from the kernel (netlink port 0). Anyone may send to a netlink
    /// port, so such datagrams are dropped unread.
    NotFromKernel {
        /// The sender's netlink port id.
        port: u32,
    },
    /// Fewer bytes remain than a netlink header, or a header claims more bytes than remain.
    Truncated {
        /// Offset of the message in the datagram.
        offset: usize,
        /// Bytes left in the datagram from that offset.
        remaining: usize,
    },
    /// A netlink header's length is smaller than the header itself (e.g. zero): the rest of the
    /// datagram cannot be framed.
    BadLength {
        /// Offset of the message in the datagram.
        offset: usize,
        /// The length the header claims.
        nlmsg_len: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::NotFromKernel { port } => {
                write!(f, "netlink datagram from port {port}, not from the kernel")
            }
            DecodeError::Truncated { offset, remaining } => {
                write!(f, "truncated netlink message at offset {offset} ({remaining} bytes left)")
            }
            DecodeError::BadLength { offset, nlmsg_len } => {
                write!(f, "netlink message at offset {offset} has impossible length {nlmsg_len}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A proc connector acknowledgement (`PROC_EVENT_NONE`): the kernel's answer to a
/// `PROC_CN_MCAST_*` request, sent to every listener.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ack {
    /// `cn_msg.ack`: the requester's `ack` plus one.
    pub cn_ack: u32,
    /// The error (a positive errno), 0 for success.
    pub err: u32,
}

/// What one datagram contained, beyond the events appended to the output.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Summary {
    /// Proc connector messages (any `what`, acks included).
    pub messages: u64,
    /// Proc connector messages that produce no event: acks and event types vpstag does not use.
    pub ignored: u64,
    /// Netlink messages skipped as not ours: `NLMSG_NOOP`, `NLMSG_ERROR`, other types, other
    /// connector ids.
    pub skipped: u64,
    /// Proc connector messages that were framed correctly but too short for what they claim to
    /// be, or carried an impossible pid. Their sequence numbers were still accounted.
    pub malformed: u64,
    /// Sequence gaps found (each also appended as an [`EventKind::Lost`]).
    pub gaps: u64,
    /// Messages missing in those gaps.
    pub lost_by_gap: u64,
    /// Acknowledgements seen.
    pub acks: Vec<Ack>,
}

/// One reading of the two clocks whose difference turns the kernel's `CLOCK_MONOTONIC` event
/// time stamps into `CLOCK_BOOTTIME` ones: `CLOCK_MONOTONIC`, then `CLOCK_BOOTTIME`, then
/// `CLOCK_MONOTONIC` again, in nanoseconds.
///
/// The clocks cannot be read at one instant, so a reading only bounds the offset
/// (`CLOCK_BOOTTIME - CLOCK_MONOTONIC`, the time spent suspended): it lies between
/// `boot - mono_after` and `boot - mono_before`, a window as wide as the time between the reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockReading {
    /// `CLOCK_MONOTONIC` before.
    pub mono_before: u64,
    /// `CLOCK_BOOTTIME` between.
    pub boot: u64,
    /// `CLOCK_MONOTONIC` after.
    pub mono_after: u64,
}

impl ClockReading {
    /// The lowest offset this reading allows.
    fn low(self) -> u64 {
        self.boot.saturating_sub(self.mono_after)
    }

    /// The highest offset this reading allows.
    fn high(self) -> u64 {
        self.boot.saturating_sub(self.mono_before)
    }

    fn width(self) -> u64 {
        self.mono_after.saturating_sub(self.mono_before)
    }
}

/// `CLOCK_BOOTTIME - CLOCK_MONOTONIC`, kept steady from one read of the socket to the next.
///
/// Every event of one stream must be shifted by the same amount: the table compares a process's
/// exit time with the start time its fork event gave it, and a fork stamped later than its
/// child's exit makes the exit look like news of an earlier holder of the pid, so it is dropped
/// and the process stays a member after it is gone. An offset measured anew at every read
/// wobbles by the time between the two clock reads (microseconds, or milliseconds when the thread
/// is preempted between them or a VM's vCPU stalls), which once did exactly that to a child that
/// exited within a millisecond of its fork, read in the next batch.
///
/// So the offset is measured once, as the narrowest of a few readings, and then kept as long as
/// each new reading's window still allows it; only a reading that rules it out (the machine was
/// suspended since: the offset grew by the time asleep) has it measured again.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootOffset {
    /// The offset kept, and how far it may be from the true one.
    kept: Option<(u64, u64)>,
}

impl BootOffset {
    /// Readings taken when the offset is measured (anew); the narrowest one counts.
    pub const READINGS: usize = 5;

    /// An offset not measured yet.
    pub fn new() -> BootOffset {
        BootOffset::default()
    }

    /// The offset to use now. `read` reads the clocks (see [`ClockReading`]); it is called once
    /// while the kept offset still fits, [`READINGS`](BootOffset::READINGS) more times when it
    /// must be measured. A failed reading (`None`) keeps what is kept, or gives 0.
    pub fn get(&mut self, mut read: impl FnMut() -> Option<ClockReading>) -> u64 {
        if let Some((kept, err)) = self.kept {
            match read() {
                // The windows [kept - err, kept + err] and [low, high] meet: nothing says the
                // offset changed.
                Some(r) if r.low() <= kept.saturating_add(err) && kept.saturating_sub(err) <= r.high() => return kept,
                Some(_) => {}
                None => return kept,
            }
        }
        let best = (0..Self::READINGS).filter_map(|_| read()).min_by_key(|r| r.width());
        match best {
            Some(r) => {
                let half = r.width() / 2;
                let mid = r.low().saturating_add(half);
                self.kept = Some((mid, half));
                mid
            }
            None => self.kept.map_or(0, |(k, _)| k),
        }
    }
}

/// Follows the kernel's per-CPU sequence numbers (`cn_msg.seq`) to notice dropped messages.
///
/// The kernel numbers every proc connector message per CPU, consecutively, while at least one
/// listener exists, and delivers one CPU's messages in order. A jump on a CPU therefore means
/// messages were dropped before they reached this socket. The first message seen on a CPU only
/// sets the baseline. A number that goes *backwards* (impossible from a sound kernel) is taken as
/// a new baseline and not reported.
///
/// When the kernel filter (Linux 6.6+) is on, filtered-out events still consume numbers, so gaps
/// no longer mean loss: then the tracker must be [disabled](SeqTracker::disabled).
#[derive(Clone, Debug)]
pub struct SeqTracker {
    enabled: bool,
    last: HashMap<u32, u32>,
}

impl Default for SeqTracker {
    fn default() -> SeqTracker {
        SeqTracker::new()
    }
}

impl SeqTracker {
    /// An enabled tracker with no baseline.
    pub fn new() -> SeqTracker {
        SeqTracker { enabled: true, last: HashMap::new() }
    }

    /// A tracker that never reports a gap.
    pub fn disabled() -> SeqTracker {
        SeqTracker { enabled: false, last: HashMap::new() }
    }

    /// Whether gaps are reported.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Turns gap detection on or off; forgets every baseline.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.last.clear();
    }

    /// Records message `seq` from `cpu`; returns how many messages are missing before it on that
    /// CPU, if any.
    pub fn observe(&mut self, cpu: u32, seq: u32) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        let prev = self.last.insert(cpu, seq)?;
        let gap = seq.wrapping_sub(prev.wrapping_add(1));
        if gap == 0 || gap >= 1 << 31 {
            None
        } else {
            Some(u64::from(gap))
        }
    }
}

fn bytes<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    bytes(b, off).map(u16::from_ne_bytes)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    bytes(b, off).map(u32::from_ne_bytes)
}

fn i32_at(b: &[u8], off: usize) -> Option<i32> {
    bytes(b, off).map(i32::from_ne_bytes)
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    bytes(b, off).map(u64::from_ne_bytes)
}

fn pid_at(b: &[u8], off: usize) -> Option<Pid> {
    Pid::new(i32_at(b, off)?)
}

/// Decodes one datagram received on a proc connector socket, appending its events to `out`.
///
/// - `sender_port`: the netlink port id of the sender (`sockaddr_nl.nl_pid` from `recvfrom`);
///   anything but 0 (the kernel) is rejected with [`DecodeError::NotFromKernel`].
/// - `monotonic_to_boot_offset_ns`: `CLOCK_BOOTTIME - CLOCK_MONOTONIC`, added to the kernel's
///   `CLOCK_MONOTONIC` timestamps to give [`Event::time_ns`] on the boot clock; the same value
///   for every datagram of a stream while the machine is not suspended ([`BootOffset`]).
/// - `seq`: the per-CPU sequence tracker; a gap appends
///   `Lost { count: Some(gap), reason: SequenceGap }` before the event that revealed it.
///
/// Every netlink message is walked: `NLMSG_NOOP`, `NLMSG_ERROR` and other types are skipped, as
/// are connector messages for another id than (`CN_IDX_PROC`, `CN_VAL_PROC`). Acks and event
/// types vpstag does not use (UID, GID, SID, PTRACE, COMM, COREDUMP) give no event, but their
/// sequence numbers are accounted. On `Err`, the events of the messages before the fault are
/// already in `out`.
pub fn decode_datagram(
    datagram: &[u8],
    sender_port: u32,
    monotonic_to_boot_offset_ns: u64,
    seq: &mut SeqTracker,
    out: &mut Vec<Event>,
) -> Result<Summary, DecodeError> {
    if sender_port != 0 {
        return Err(DecodeError::NotFromKernel { port: sender_port });
    }
    let mut summary = Summary::default();
    let mut offset = 0usize;
    while offset < datagram.len() {
        let rest = datagram.get(offset..).unwrap_or_default();
        let truncated = DecodeError::Truncated { offset, remaining: rest.len() };
        if rest.len() < NLMSG_HDRLEN {
            return Err(truncated);
        }
        let (Some(nlmsg_len), Some(nlmsg_type)) = (u32_at(rest, 0), u16_at(rest, 4)) else {
            return Err(truncated);
        };
        let len = usize::try_from(nlmsg_len).map_err(|_| truncated)?;
        if len < NLMSG_HDRLEN {
            return Err(DecodeError::BadLength { offset, nlmsg_len });
        }
        let Some(payload) = rest.get(NLMSG_HDRLEN..len) else {
            return Err(truncated);
        };
        if nlmsg_type == NLMSG_DONE {
            decode_cn_msg(payload, monotonic_to_boot_offset_ns, seq, out, &mut summary);
        } else {
            // NLMSG_NOOP, NLMSG_ERROR, NLMSG_OVERRUN or anything else: not a connector message.
            summary.skipped += 1;
        }
        // Messages are padded to 4 bytes; the last one may lack its padding. `len >= 16`, so
        // this always moves forward.
        let aligned = len.saturating_add(3) & !3;
        offset = offset.saturating_add(aligned.min(rest.len()));
    }
    Ok(summary)
}

fn decode_cn_msg(msg: &[u8], offset_ns: u64, seq: &mut SeqTracker, out: &mut Vec<Event>, summary: &mut Summary) {
    let (Some(idx), Some(val), Some(cn_seq), Some(cn_ack), Some(data_len)) =
        (u32_at(msg, 0), u32_at(msg, 4), u32_at(msg, 8), u32_at(msg, 12), u16_at(msg, 16))
    else {
        summary.malformed += 1;
        return;
    };
    if idx != CN_IDX_PROC || val != CN_VAL_PROC {
        summary.skipped += 1;
        return;
    }
    let Some(data) = msg.get(CN_MSG_LEN..CN_MSG_LEN + usize::from(data_len)) else {
        summary.malformed += 1;
        return;
    };
    let (Some(what), Some(cpu), Some(timestamp_ns)) = (u32_at(data, 0), u32_at(data, 4), u64_at(data, 8)) else {
        summary.malformed += 1;
        return;
    };
    summary.messages += 1;

    // Account the sequence number of every message that took one, used or not. Acks from kernels
    // that do not number them say cpu -1.
    if cpu != NO_CPU {
        if let Some(gap) = seq.observe(cpu, cn_seq) {
            summary.gaps += 1;
            summary.lost_by_gap += gap;
            out.push(Event::new(EventKind::Lost { count: Some(gap), reason: LossReason::SequenceGap }));
        }
    }

    let ev = data.get(PROC_EVENT_HDRLEN..).unwrap_or_default();
    let kind = match what {
        PROC_EVENT_NONE => {
            summary.ignored += 1;
            match u32_at(ev, 0) {
                Some(err) => summary.acks.push(Ack { cn_ack, err }),
                None => summary.malformed += 1,
            }
            return;
        }
        PROC_EVENT_FORK => fork_kind(ev),
        PROC_EVENT_EXEC => (|| Some(EventKind::Exec { pid: pid_at(ev, 4)?, thread: pid_at(ev, 0)? }))(),
        PROC_EVENT_EXIT => (|| {
            Some(EventKind::Exit {
                pid: pid_at(ev, 4)?,
                thread: pid_at(ev, 0)?,
                status: ExitStatus::from_wait_status(i32_at(ev, 8)?),
                group_dead: None,
            })
        })(),
        _ => {
            // UID, GID, SID, PTRACE, COMM, COREDUMP, or a type newer than this code.
            summary.ignored += 1;
            return;
        }
    };
    match kind {
        Some(kind) => out.push(Event {
            time_ns: Some(timestamp_ns.saturating_add(offset_ns)),
            cpu: Some(cpu),
            ..Event::new(kind)
        }),
        None => summary.malformed += 1,
    }
}

/// Maps `fork_proc_event {parent_pid, parent_tgid, child_pid, child_tgid}`.
///
/// The kernel reports the child's *real parent*. For a new thread (`child_pid != child_tgid`)
/// that is the parent of the creating process, so the thread is attributed to its own process
/// (`child_tgid`) instead.
fn fork_kind(ev: &[u8]) -> Option<EventKind> {
    let parent_tgid = pid_at(ev, 4)?;
    let child_pid = pid_at(ev, 8)?;
    let child_tgid = pid_at(ev, 12)?;
    let thread = child_pid != child_tgid;
    Some(EventKind::Fork {
        parent: if thread { child_tgid } else { parent_tgid },
        child: child_tgid,
        child_thread: child_pid,
        thread,
        child_start: None,
    })
}

/// Builds the datagram that sends a `PROC_CN_MCAST_*` request to the kernel.
///
/// With `event_filter: None` this is the 4-byte form every kernel understands (and that selects
/// all event types on 6.6+). With `Some(mask)` it is the 8-byte `struct proc_input` form that
/// Linux 6.6+ reads as "only these event types"; older kernels silently ignore it.
/// `port` is the sender's own netlink port id; `seq` and `ack` are echoed (ack + 1) in the
/// kernel's acknowledgement.
pub fn encode_mcast_request(op: u32, event_filter: Option<u32>, seq: u32, ack: u32, port: u32) -> Vec<u8> {
    let data_len: u16 = if event_filter.is_some() { 8 } else { 4 };
    let total = NLMSG_HDRLEN + CN_MSG_LEN + usize::from(data_len);
    let mut m = Vec::with_capacity(total);
    // nlmsghdr
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&port.to_ne_bytes());
    // cn_msg
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&ack.to_ne_bytes());
    m.extend_from_slice(&data_len.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    // enum proc_cn_mcast_op, then optionally enum proc_cn_event
    m.extend_from_slice(&op.to_ne_bytes());
    if let Some(mask) = event_filter {
        m.extend_from_slice(&mask.to_ne_bytes());
    }
    m
}

/// Reads `(major, minor)` from a kernel release string such as `"6.18.44-fc-v669"` or
/// `"6.6.0-rc1"` (`uname -r`).
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    fn leading_number(s: &str) -> Option<u32> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s.get(..end)?.parse().ok()
    }
    let mut parts = release.trim().splitn(3, '.');
    let major = leading_number(parts.next()?)?;
    let minor = leading_number(parts.next()?)?;
    Some((major, minor))
}

/// Whether a kernel of this release accepts the 8-byte event-type filter (Linux 6.6 and later).
pub fn kernel_has_event_filter(release: &str) -> bool {
    parse_kernel_release(release).is_some_and(|v| v >= (6, 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(mono_before: u64, boot: u64, mono_after: u64) -> Option<ClockReading> {
        Some(ClockReading { mono_before, boot, mono_after })
    }

    #[test]
    fn the_boot_offset_is_the_middle_of_the_narrowest_reading() {
        let mut o = BootOffset::new();
        // Offset 1000 (ns asleep); windows 40, 4 and 400 wide.
        let mut readings =
            vec![reading(100, 1_120, 140), reading(200, 1_202, 204), reading(300, 1_500, 700)].into_iter();
        assert_eq!(o.get(|| readings.next().flatten()), 1_000);
    }

    #[test]
    fn a_wide_reading_does_not_move_a_kept_boot_offset() {
        let mut o = BootOffset::new();
        assert_eq!(o.get(|| reading(10, 1_012, 14)), 1_000);
        // A thread preempted for 15 ms between its first two reads: the window [990, 15_001_000]
        // still allows 1_000. Taken as it came (boot - mono_before), the offset was 15_001_000:
        // every later event moved 15 ms ahead of those before (the bug this prevents).
        let mut n = 0;
        let got = o.get(|| {
            n += 1;
            reading(50_000, 15_051_000, 15_050_010)
        });
        assert_eq!((got, n), (1_000, 1), "kept, after one reading");
        assert_eq!(o.get(|| reading(90_000, 91_001, 90_002)), 1_000, "a narrow one that allows it too");
    }

    #[test]
    fn a_suspend_has_the_boot_offset_measured_again() {
        let mut o = BootOffset::new();
        assert_eq!(o.get(|| reading(10, 1_012, 14)), 1_000);
        // 2 s asleep: the offset is now 2_000_001_000, outside the kept window.
        let mut n = 0;
        let got = o.get(|| {
            n += 1;
            reading(100_000, 2_000_101_002, 100_004)
        });
        assert_eq!((got, n), (2_000_001_000, 1 + BootOffset::READINGS));
        assert_eq!(o.get(|| reading(200_000, 2_000_201_001, 200_002)), 2_000_001_000);
    }

    #[test]
    fn clocks_that_cannot_be_read_give_the_kept_boot_offset_or_zero() {
        let mut o = BootOffset::new();
        assert_eq!(o.get(|| None), 0);
        assert_eq!(o.get(|| reading(10, 1_012, 14)), 1_000);
        assert_eq!(o.get(|| None), 1_000);
    }

    fn pid(n: i32) -> Pid {
        Pid::new(n).unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len() % 2 == 0);
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// A proc connector message as the kernel builds it: nlmsghdr + cn_msg + proc_event (40 bytes).
    fn message(seq: u32, what: u32, cpu: u32, ts: u64, fields: &[u32]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&what.to_ne_bytes());
        data.extend_from_slice(&cpu.to_ne_bytes());
        data.extend_from_slice(&ts.to_ne_bytes());
        for f in fields {
            data.extend_from_slice(&f.to_ne_bytes());
        }
        data.resize(40, 0);
        raw_message(NLMSG_DONE, CN_IDX_PROC, CN_VAL_PROC, seq, 0, &data)
    }

    fn raw_message(ty: u16, idx: u32, val: u32, seq: u32, ack: u32, data: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + CN_MSG_LEN + data.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&idx.to_ne_bytes());
        m.extend_from_slice(&val.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&ack.to_ne_bytes());
        m.extend_from_slice(&(data.len() as u16).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(data);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn netlink_only(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn decode(d: &[u8]) -> (Result<Summary, DecodeError>, Vec<Event>) {
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        let r = decode_datagram(d, 0, 0, &mut seq, &mut out);
        (r, out)
    }

    fn kinds(events: &[Event]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    // ---- Fixtures recorded on this machine (Linux 6.18.44, x86_64, 2 CPUs) ----
    //
    // Made with the recorder now in `tests/record_fixtures.rs` (first run as an example from the
    // main thread, then as an ignored test), run as root: it subscribes with raw libc calls
    // (LISTEN with cn_msg.ack = 0x1234), spawns a std::thread, forks a child that execs /bin/true
    // and forks a child that calls _exit(3), then prints each datagram about those tasks as hex.
    // First run: recorder pid 4941 (its parent, cargo, was 4936), thread 5288, exec child 5289,
    // exit(3) child 5290.

    /// The kernel's ack of the recorder's LISTEN: what=NONE, cpu 1, per-CPU seq 0, ack 0x1235.
    const REC_ACK: &str = "4c00000003000000000000000000000001000000010000000000000035120000280000000000000001000000f1c7338caf000000000000000000000000000000000000000000000000000000";
    /// Thread fork: parent_pid/tgid 4936 (the creator's parent!), child_pid 5288, child_tgid 4941.
    const REC_THREAD_FORK: &str = "4c00000003000000010000000000000001000000010000000100000000000000280000000100000001000000df6e348caf0000004813000048130000a81400004d1300000000000000000000";
    /// Thread exit: pid 5288, tgid 4941, exit_code 0, exit_signal -1.
    const REC_THREAD_EXIT: &str = "4c00000003000000000000000000000001000000010000000000000000000000280000000000008000000000d1d9358caf000000a81400004d13000000000000ffffffff0000000000000000";
    /// Process fork: 4941 -> 5289.
    const REC_FORK_5289: &str = "4c00000003000000010000000000000001000000010000000100000000000000280000000100000000000000b028378caf0000004d1300004d130000a9140000a91400000000000000000000";
    /// Process fork: 4941 -> 5290.
    const REC_FORK_5290: &str = "4c00000003000000020000000000000001000000010000000200000000000000280000000100000000000000516b388caf0000004d1300004d130000aa140000aa1400000000000000000000";
    /// Exit of 5290 with exit_code 0x300 (exit(3)), exit_signal 17 (SIGCHLD), parent 4941.
    const REC_EXIT_5290: &str = "4c000000030000000200000000000000010000000100000002000000000000002800000000000080010000004c183a8caf000000aa140000aa14000000030000110000004d1300004d130000";
    /// Exec by 5289.
    const REC_EXEC_5289: &str = "4c00000003000000030000000000000001000000010000000300000000000000280000000200000001000000a533478caf000000a9140000a914000000000000000000000000000000000000";
    /// Exit of 5289 (/bin/true) with status 0.
    const REC_EXIT_5289: &str = "4c000000030000000400000000000000010000000100000004000000000000002800000000000080010000003e364f8caf000000a9140000a914000000000000110000004d1300004d130000";

    // Second run, as a test: the forks came from the test's own thread 29850 (not the leader
    // 29849), so the kernel reports parent_pid 29850, parent_tgid 29849. This one is the fork of
    // child 29852; its seq (0x403e) shows other listeners had kept the counter going.
    const REC_FORK_BY_NON_LEADER: &str = "4c000000030000003e4000000000000001000000010000003e40000000000000280000000100000001000000313c470f1e0100009a740000997400009c7400009c7400000000000000000000";
    /// Second run: a thread 29851 created by test thread 29850 of process 29849 (whose parent,
    /// the shell, was 29662).
    const REC_THREAD_FORK_BY_NON_LEADER: &str = "4c000000030000003d4000000000000001000000010000003d40000000000000280000000100000001000000b770440f1e010000de730000de7300009b740000997400000000000000000000";

    #[cfg(target_endian = "little")]
    #[test]
    fn recorded_forks_from_a_non_leader_thread() {
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        decode_datagram(&hex(REC_THREAD_FORK_BY_NON_LEADER), 0, 0, &mut seq, &mut out).unwrap();
        decode_datagram(&hex(REC_FORK_BY_NON_LEADER), 0, 0, &mut seq, &mut out).unwrap();
        assert_eq!(
            kinds(&out),
            vec![
                EventKind::Fork {
                    parent: pid(29849),
                    child: pid(29849),
                    child_thread: pid(29851),
                    thread: true,
                    child_start: None
                },
                EventKind::Fork {
                    parent: pid(29849),
                    child: pid(29852),
                    child_thread: pid(29852),
                    thread: false,
                    child_start: None
                },
            ]
        );
        // Both on cpu 1, seq 0x403d then 0x403e: consecutive.
        assert_eq!(seq.observe(1, 0x403f), None);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn recorded_session_decodes() {
        // In the order received. Per CPU: cpu1 = ack 0, thread fork 1, exit 2, exec 3, exit 4;
        // cpu0 = thread exit 0, fork 1, fork 2. No gaps.
        let order = [
            REC_ACK,
            REC_THREAD_FORK,
            REC_THREAD_EXIT,
            REC_FORK_5289,
            REC_FORK_5290,
            REC_EXIT_5290,
            REC_EXEC_5289,
            REC_EXIT_5289,
        ];
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        let mut acks = Vec::new();
        for h in order {
            let s = decode_datagram(&hex(h), 0, 1_000, &mut seq, &mut out).unwrap();
            assert_eq!(s.messages, 1);
            assert_eq!(s.gaps, 0, "{h}");
            acks.extend(s.acks);
        }
        assert_eq!(acks, vec![Ack { cn_ack: 0x1235, err: 0 }]);
        assert_eq!(
            kinds(&out),
            vec![
                EventKind::Fork {
                    parent: pid(4941),
                    child: pid(4941),
                    child_thread: pid(5288),
                    thread: true,
                    child_start: None
                },
                EventKind::Exit {
                    pid: pid(4941),
                    thread: pid(5288),
                    status: Some(ExitStatus::Exited(0)),
                    group_dead: None
                },
                EventKind::Fork {
                    parent: pid(4941),
                    child: pid(5289),
                    child_thread: pid(5289),
                    thread: false,
                    child_start: None
                },
                EventKind::Fork {
                    parent: pid(4941),
                    child: pid(5290),
                    child_thread: pid(5290),
                    thread: false,
                    child_start: None
                },
                EventKind::Exit {
                    pid: pid(5290),
                    thread: pid(5290),
                    status: Some(ExitStatus::Exited(3)),
                    group_dead: None
                },
                EventKind::Exec { pid: pid(5289), thread: pid(5289) },
                EventKind::Exit {
                    pid: pid(5289),
                    thread: pid(5289),
                    status: Some(ExitStatus::Exited(0)),
                    group_dead: None
                },
            ]
        );
        // cpu and timestamp (0xaf8c346edf for the thread fork, plus the 1000 ns offset).
        assert_eq!(out[0].cpu, Some(1));
        assert_eq!(out[0].time_ns, Some(0xaf_8c34_6edf + 1_000));
        assert_eq!(out[1].cpu, Some(0));
        assert!(out.iter().all(|e| e.tag.is_none()));
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn recorded_fixture_missing_one_message_shows_a_gap() {
        // Drop the cpu 1 exit (seq 2) of the recording: exec (seq 3) reveals a gap of 1.
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        for h in [REC_ACK, REC_THREAD_FORK, REC_EXEC_5289] {
            decode_datagram(&hex(h), 0, 0, &mut seq, &mut out).unwrap();
        }
        assert_eq!(
            kinds(&out)[1..],
            [
                EventKind::Lost { count: Some(1), reason: LossReason::SequenceGap },
                EventKind::Exec { pid: pid(5289), thread: pid(5289) },
            ]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn recorded_fixtures_truncated_anywhere_never_panic() {
        for h in [REC_ACK, REC_THREAD_FORK, REC_EXIT_5290, REC_EXEC_5289] {
            let full = hex(h);
            for cut in 0..full.len() {
                let (r, out) = decode(&full[..cut]);
                assert!(out.is_empty(), "cut {cut}");
                if cut > 0 {
                    assert!(r.is_err(), "cut {cut}: {r:?}");
                }
            }
        }
    }

    // ---- Synthetic cases ----

    #[test]
    fn process_fork_vs_thread_fork() {
        let mut d = message(0, PROC_EVENT_FORK, 0, 5, &[10, 10, 20, 20]);
        // A thread 31 created by process 30, whose own parent is 10.
        d.extend(message(1, PROC_EVENT_FORK, 0, 6, &[10, 10, 31, 30]));
        let (r, out) = decode(&d);
        assert_eq!(r.unwrap().messages, 2);
        assert_eq!(
            kinds(&out),
            vec![
                EventKind::Fork {
                    parent: pid(10),
                    child: pid(20),
                    child_thread: pid(20),
                    thread: false,
                    child_start: None
                },
                EventKind::Fork {
                    parent: pid(30),
                    child: pid(30),
                    child_thread: pid(31),
                    thread: true,
                    child_start: None
                },
            ]
        );
    }

    #[test]
    fn clone_parent_fork_keeps_the_kernels_parent() {
        // Process 50 (child of 40) calls clone(CLONE_PARENT): the child 51's real parent is 40.
        let (r, out) = decode(&message(0, PROC_EVENT_FORK, 1, 1, &[40, 40, 51, 51]));
        r.unwrap();
        assert_eq!(
            kinds(&out),
            vec![EventKind::Fork {
                parent: pid(40),
                child: pid(51),
                child_thread: pid(51),
                thread: false,
                child_start: None
            }]
        );
        // A thread (pid 52) created in process 51 by a non-leader thread with a CLONE_PARENT'd
        // parent: still attributed to its own process.
        let (_, out) = decode(&message(0, PROC_EVENT_FORK, 1, 1, &[40, 40, 52, 51]));
        assert!(matches!(
            out[0].kind,
            EventKind::Fork { parent, child, thread: true, .. } if parent == pid(51) && child == pid(51)
        ));
    }

    #[test]
    fn exec_and_exit_mapping() {
        let mut d = message(0, PROC_EVENT_EXEC, 0, 100, &[77, 77]);
        d.extend(message(1, PROC_EVENT_EXIT, 0, 200, &[78, 77, 9, 17]));
        d.extend(message(2, PROC_EVENT_EXIT, 0, 300, &[77, 77, 11 | 0x80, 17]));
        d.extend(message(3, PROC_EVENT_EXIT, 0, 300, &[79, 79, 0x2a00, 17]));
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        decode_datagram(&d, 0, 1_000_000, &mut seq, &mut out).unwrap();
        assert_eq!(
            kinds(&out),
            vec![
                EventKind::Exec { pid: pid(77), thread: pid(77) },
                EventKind::Exit {
                    pid: pid(77),
                    thread: pid(78),
                    status: Some(ExitStatus::Signaled { signal: 9, core_dumped: false }),
                    group_dead: None
                },
                EventKind::Exit {
                    pid: pid(77),
                    thread: pid(77),
                    status: Some(ExitStatus::Signaled { signal: 11, core_dumped: true }),
                    group_dead: None
                },
                EventKind::Exit {
                    pid: pid(79),
                    thread: pid(79),
                    status: Some(ExitStatus::Exited(42)),
                    group_dead: None
                },
            ]
        );
        assert_eq!(out[0].time_ns, Some(1_000_100));
        assert_eq!(out[1].time_ns, Some(1_000_200));
    }

    #[test]
    fn several_messages_with_noop_and_error_between() {
        let mut d = message(0, PROC_EVENT_FORK, 0, 1, &[1, 1, 2, 2]);
        d.extend(netlink_only(NLMSG_NOOP, &[]));
        // An NLMSG_ERROR carrying an errno and the offending header.
        let mut err = (-22i32).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]);
        d.extend(netlink_only(NLMSG_ERROR, &err));
        d.extend(message(1, PROC_EVENT_EXEC, 0, 2, &[2, 2]));
        let (r, out) = decode(&d);
        let s = r.unwrap();
        assert_eq!((s.messages, s.skipped, s.gaps), (2, 2, 0));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn zero_and_too_small_lengths_stop_without_looping() {
        let good = message(0, PROC_EVENT_EXEC, 0, 2, &[2, 2]);
        for bad_len in [0u32, 1, 15] {
            let mut d = good.clone();
            let mut hdr = netlink_only(NLMSG_NOOP, &[]);
            hdr[..4].copy_from_slice(&bad_len.to_ne_bytes());
            d.extend(hdr);
            d.extend(good.clone());
            let (r, out) = decode(&d);
            assert_eq!(r, Err(DecodeError::BadLength { offset: good.len(), nlmsg_len: bad_len }));
            assert_eq!(out.len(), 1, "the message before the fault is kept");
        }
        // A header claiming more than the datagram holds.
        let mut d = good.clone();
        d[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(decode(&d).0, Err(DecodeError::Truncated { offset: 0, remaining: good.len() }));
        // Fewer bytes than a header.
        assert_eq!(decode(&[0u8; 7]).0, Err(DecodeError::Truncated { offset: 0, remaining: 7 }));
        // Empty: nothing, no error.
        assert_eq!(decode(&[]).0.unwrap().messages, 0);
        // An enormous length on a 64-bit or 32-bit host.
        let mut d = good.clone();
        d[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(decode(&d).0.is_err());
    }

    #[test]
    fn truncated_cn_msg_and_proc_event_are_skipped() {
        // cn_msg cut short: only 8 bytes after the netlink header.
        let mut d = netlink_only(NLMSG_DONE, &[1, 0, 0, 0, 1, 0, 0, 0]);
        // cn_msg.len claims 40 bytes but only 16 follow.
        let mut short = raw_message(NLMSG_DONE, CN_IDX_PROC, CN_VAL_PROC, 0, 0, &[0u8; 16]);
        short[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&40u16.to_ne_bytes());
        d.extend(short);
        // proc_event shorter than its fixed header.
        d.extend(raw_message(NLMSG_DONE, CN_IDX_PROC, CN_VAL_PROC, 0, 0, &[0u8; 12]));
        // A fork whose data stops after the parent fields.
        let mut f = Vec::new();
        f.extend_from_slice(&PROC_EVENT_FORK.to_ne_bytes());
        f.extend_from_slice(&0u32.to_ne_bytes());
        f.extend_from_slice(&0u64.to_ne_bytes());
        f.extend_from_slice(&[5, 0, 0, 0, 5, 0, 0, 0]);
        d.extend(raw_message(NLMSG_DONE, CN_IDX_PROC, CN_VAL_PROC, 0, 0, &f));
        // Then a good one.
        d.extend(message(1, PROC_EVENT_EXEC, 0, 2, &[2, 2]));
        let (r, out) = decode(&d);
        let s = r.unwrap();
        assert_eq!(s.malformed, 4);
        assert_eq!(s.messages, 2, "the short fork still counts (and its seq is accounted)");
        assert_eq!(kinds(&out), vec![EventKind::Exec { pid: pid(2), thread: pid(2) }]);
    }

    #[test]
    fn impossible_pids_are_malformed() {
        let (r, out) = decode(&message(0, PROC_EVENT_FORK, 0, 1, &[1, 1, 0, 0]));
        assert_eq!(r.unwrap().malformed, 1);
        assert!(out.is_empty());
        let (r, out) = decode(&message(0, PROC_EVENT_EXIT, 0, 1, &[u32::MAX, u32::MAX, 0, 0]));
        assert_eq!(r.unwrap().malformed, 1);
        assert!(out.is_empty());
    }

    #[test]
    fn wrong_idx_or_val_is_skipped() {
        let data = [0u8; 40];
        let mut d = raw_message(NLMSG_DONE, 2, 1, 0, 0, &data);
        d.extend(raw_message(NLMSG_DONE, 1, 2, 0, 0, &data));
        d.extend(raw_message(NLMSG_DONE, 0x10, 0x1, 0, 0, &data));
        let (r, out) = decode(&d);
        let s = r.unwrap();
        assert_eq!((s.skipped, s.messages), (3, 0));
        assert!(out.is_empty());
    }

    #[test]
    fn wrong_sender_is_rejected_unread() {
        let d = message(0, PROC_EVENT_FORK, 0, 1, &[1, 1, 2, 2]);
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        assert_eq!(decode_datagram(&d, 4242, 0, &mut seq, &mut out), Err(DecodeError::NotFromKernel { port: 4242 }));
        assert!(out.is_empty());
        // Nor did it set a baseline.
        decode_datagram(&message(7, PROC_EVENT_EXEC, 0, 1, &[2, 2]), 0, 0, &mut seq, &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn sequence_gap_per_cpu_comes_before_the_event() {
        let mut seq = SeqTracker::new();
        let mut out = Vec::new();
        let mut run = |d: Vec<u8>, out: &mut Vec<Event>| decode_datagram(&d, 0, 0, &mut seq, out).unwrap();
        run(message(10, PROC_EVENT_EXEC, 0, 1, &[2, 2]), &mut out);
        run(message(500, PROC_EVENT_EXEC, 1, 1, &[3, 3]), &mut out); // other CPU: its own baseline
        run(message(11, PROC_EVENT_UID, 0, 1, &[2, 2, 0, 0]), &mut out); // unused, but accounted
        let s = run(message(15, PROC_EVENT_EXEC, 0, 1, &[4, 4]), &mut out); // 12, 13, 14 missing
        assert_eq!((s.gaps, s.lost_by_gap), (1, 3));
        run(message(501, PROC_EVENT_EXEC, 1, 1, &[5, 5]), &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                EventKind::Exec { pid: pid(2), thread: pid(2) },
                EventKind::Exec { pid: pid(3), thread: pid(3) },
                EventKind::Lost { count: Some(3), reason: LossReason::SequenceGap },
                EventKind::Exec { pid: pid(4), thread: pid(4) },
                EventKind::Exec { pid: pid(5), thread: pid(5) },
            ]
        );
        assert_eq!(out[2], Event::new(EventKind::Lost { count: Some(3), reason: LossReason::SequenceGap }));
    }

    #[test]
    fn acks_and_unused_events_are_ignored_but_numbered() {
        let mut d = message(0, PROC_EVENT_NONE, 0, 1, &[0]); // ack, numbered (6.6+ style)
        for (i, what) in [
            PROC_EVENT_UID,
            PROC_EVENT_GID,
            PROC_EVENT_SID,
            PROC_EVENT_PTRACE,
            PROC_EVENT_COMM,
            PROC_EVENT_COREDUMP,
            0x400,
        ]
        .into_iter()
        .enumerate()
        {
            d.extend(message(i as u32 + 1, what, 0, 1, &[9, 9, 0, 0]));
        }
        d.extend(message(8, PROC_EVENT_EXEC, 0, 1, &[9, 9]));
        let (r, out) = decode(&d);
        let s = r.unwrap();
        assert_eq!((s.messages, s.ignored, s.gaps), (9, 8, 0));
        assert_eq!(s.acks, vec![Ack { cn_ack: 0, err: 0 }]);
        assert_eq!(kinds(&out), vec![EventKind::Exec { pid: pid(9), thread: pid(9) }]);
    }

    #[test]
    fn unnumbered_acks_do_not_disturb_the_sequence() {
        // Older kernels send acks with cpu -1 and the requester's own seq.
        let mut d = message(5, PROC_EVENT_EXEC, 0, 1, &[2, 2]);
        let mut ack = message(999, PROC_EVENT_NONE, NO_CPU, 1, &[1]);
        ack[NLMSG_HDRLEN + 12..NLMSG_HDRLEN + 16].copy_from_slice(&8u32.to_ne_bytes());
        d.extend(ack);
        d.extend(message(6, PROC_EVENT_EXEC, 0, 1, &[3, 3]));
        let (r, out) = decode(&d);
        let s = r.unwrap();
        assert_eq!(s.gaps, 0);
        assert_eq!(s.acks, vec![Ack { cn_ack: 8, err: 1 }]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn seq_tracker_wraps_goes_backwards_and_disables() {
        let mut t = SeqTracker::new();
        assert_eq!(t.observe(3, u32::MAX - 1), None);
        assert_eq!(t.observe(3, u32::MAX), None);
        assert_eq!(t.observe(3, 0), None, "wrap-around is consecutive");
        assert_eq!(t.observe(3, 3), Some(2));
        assert_eq!(t.observe(3, 1), None, "backwards: new baseline, no report");
        assert_eq!(t.observe(3, 2), None);
        t.set_enabled(false);
        assert!(!t.is_enabled());
        assert_eq!(t.observe(3, 100), None);
        let mut d = SeqTracker::disabled();
        let mut out = Vec::new();
        decode_datagram(&message(1, PROC_EVENT_EXEC, 0, 1, &[2, 2]), 0, 0, &mut d, &mut out).unwrap();
        decode_datagram(&message(9, PROC_EVENT_EXEC, 0, 1, &[2, 2]), 0, 0, &mut d, &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn unpadded_last_message_and_trailing_garbage() {
        // A message whose nlmsg_len is not a multiple of 4 and that ends the datagram.
        let mut m = message(0, PROC_EVENT_EXEC, 0, 1, &[2, 2]);
        let len = m.len() as u32 - 2;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m.truncate(len as usize);
        // cn_msg.len now claims 2 bytes more than the message holds: malformed, but no panic.
        let (r, out) = decode(&m);
        assert_eq!(r.unwrap().malformed, 1);
        assert!(out.is_empty());
        // Good message followed by 3 stray bytes.
        let mut d = message(0, PROC_EVENT_EXEC, 0, 1, &[2, 2]);
        d.extend([1, 2, 3]);
        let (r, out) = decode(&d);
        assert!(matches!(r, Err(DecodeError::Truncated { remaining: 3, .. })));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic fuzz: random bytes, and mutations of a valid datagram.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut valid = message(0, PROC_EVENT_FORK, 0, 1, &[1, 1, 2, 3]);
        valid.extend(message(1, PROC_EVENT_EXIT, 1, 1, &[2, 3, 0, 0]));
        for _ in 0..20_000 {
            let mut d = valid.clone();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % d.len();
                d[i] = next() as u8;
            }
            let cut = (next() as usize) % (d.len() + 1);
            let _ = decode(&d[..cut]);
            let len = (next() % 200) as usize;
            let rnd: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&rnd);
        }
    }

    #[test]
    fn mcast_request_layout() {
        let m = encode_mcast_request(PROC_CN_MCAST_LISTEN, None, 7, 0xabc, 99);
        assert_eq!(m.len(), 40);
        assert_eq!(u32_at(&m, 0), Some(40));
        assert_eq!(u16_at(&m, 4), Some(NLMSG_DONE));
        assert_eq!(u32_at(&m, 8), Some(7));
        assert_eq!(u32_at(&m, 12), Some(99));
        assert_eq!((u32_at(&m, 16), u32_at(&m, 20)), (Some(CN_IDX_PROC), Some(CN_VAL_PROC)));
        assert_eq!((u32_at(&m, 24), u32_at(&m, 28)), (Some(7), Some(0xabc)));
        assert_eq!(u16_at(&m, 32), Some(4));
        assert_eq!(u32_at(&m, 36), Some(PROC_CN_MCAST_LISTEN));
        let f = encode_mcast_request(PROC_CN_MCAST_LISTEN, Some(TRACKED_EVENTS), 0, 0, 0);
        assert_eq!(f.len(), 44);
        assert_eq!(u32_at(&f, 0), Some(44));
        assert_eq!(u16_at(&f, 32), Some(8));
        assert_eq!(u32_at(&f, 40), Some(PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT));
        // What we send is itself a well-formed netlink datagram (an unknown-length cn payload).
        let (r, out) = decode(&m);
        assert_eq!(r.unwrap().malformed, 1, "4-byte payload is too short for a proc_event");
        assert!(out.is_empty());
    }

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_release("6.6-rc1"), Some((6, 6)));
        assert_eq!(parse_kernel_release("5.15.0\n"), Some((5, 15)));
        assert_eq!(parse_kernel_release("6"), None);
        assert_eq!(parse_kernel_release("x.y"), None);
        assert_eq!(parse_kernel_release(""), None);
        assert!(kernel_has_event_filter("6.6.0"));
        assert!(kernel_has_event_filter("7.0"));
        assert!(kernel_has_event_filter("6.18.44-fc-v669"));
        assert!(!kernel_has_event_filter("6.5.13"));
        assert!(!kernel_has_event_filter("6.1.0-28-amd64"));
        assert!(!kernel_has_event_filter("garbage"));
    }
}
