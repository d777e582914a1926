//! The daemon's wire protocol, as data: requests, replies, error kinds and the event schema, shared
//! by [`crate::client`] and the `vpstag` daemon (package `vpstag-cli`), so that neither spells it
//! on its own.
//!
//! The protocol (documented in `docs/protocol.md`) is newline-delimited JSON over a Unix stream
//! socket: one [`Request`] object a line (`{"v":1,"op":"which","pid":1234}`), one reply object a
//! line (`{"ok":true,...}` or `{"ok":false,"error":{"kind":"...","message":"..."}}`, the kind one of
//! [`ErrorKind`]). A successful reply always begins with the exact bytes `{"ok":true`, so that a
//! first process can test the daemon's acknowledgement after `fork()` without parsing JSON.
//!
//! This module does no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{EventKind, ExitStatus, Pid, TaggedEvent, VpsId};

/// The protocol version this library speaks (`"v"` in a request).
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line the daemon accepts (bytes, newline included).
pub const MAX_REQUEST: usize = 64 * 1024;

/// One request: the protocol version and the operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// The protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations (`"op"` in a request).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Op {
    /// Who is there: the daemon's version, pid and backend, and the caller's uid as seen.
    Hello,
    /// Registers the connecting process (SO_PEERCRED) as the first process of a new VPS.
    RegisterFirst {
        /// The VPS name.
        name: String,
        /// Resource limits, applied through the VPS's own cgroup v2 before the process runs
        /// anything of the VPS; a limit the host cannot apply is refused
        /// ([`ErrorKind::LimitRefused`]), never ignored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<crate::cgroup::Limits>,
    },
    /// Registers the connecting process (SO_PEERCRED) as a member of a running VPS.
    Join {
        /// The VPS name.
        name: String,
    },
    /// The VPS of a process.
    Which {
        /// The process id (a plain integer on the wire).
        pid: Pid,
    },
    /// Live tagged processes, of one VPS or of all the caller may see.
    Ps {
        /// Only this VPS.
        #[serde(default)]
        name: Option<String>,
    },
    /// The pids of a VPS's members.
    Members {
        /// The VPS name.
        name: String,
    },
    /// Every VPS the caller may see, with accounting.
    List,
    /// Signals every member of a VPS.
    Kill {
        /// The VPS name.
        name: String,
        /// A signal name or number (default TERM).
        #[serde(default)]
        signal: Option<String>,
    },
    /// SIGTERM, then SIGKILL after the grace period, then forgets the VPS.
    Stop {
        /// The VPS name.
        name: String,
        /// Milliseconds between SIGTERM and SIGKILL (default 5000).
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Recent events, and with `follow` every event from then on.
    Events {
        /// Only this VPS.
        #[serde(default)]
        name: Option<String>,
        /// Keep the connection open and stream events.
        #[serde(default)]
        follow: bool,
        /// Only the events after this [`EventInfo::seq`] (to resume a stream without a gap):
        /// when some of them are no longer kept, a `lost` event with reason `expired` comes
        /// first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// Compares the table with a fresh scan of the system.
    Check,
}

/// The reply to `hello`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the daemon speaks.
    pub version: u32,
    /// The daemon's process id.
    pub daemon_pid: Pid,
    /// Its backend (`cnproc`, `ptrace`, ...).
    pub backend: String,
    /// The caller's uid, as the daemon sees it.
    pub uid: u32,
}

/// The reply to `register_first` and `join`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpsReply {
    /// The VPS started or joined.
    pub vps: VpsRef,
}

/// The reply to `which`: all `None` when the process is in no VPS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhichReply {
    /// Its VPS's name (`null` on the wire when none).
    pub vps: Option<String>,
    /// Its VPS's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vps_id: Option<VpsId>,
    /// Its VPS's first process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<Pid>,
}

/// The reply to `members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsReply {
    /// The live members.
    pub pids: Vec<Pid>,
}

/// The reply to `ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsReply {
    /// The live members, by pid.
    pub processes: Vec<ProcessInfo>,
}

/// The reply to `list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReply {
    /// Every VPS the caller may see.
    pub vpses: Vec<VpsInfo>,
}

/// The reply to `kill` and `stop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalledReply {
    /// How many processes were signalled.
    pub signalled: usize,
}

/// The reply to `events` (without `follow`, or its first line with it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsReply {
    /// The recent events.
    pub events: Vec<EventInfo>,
}

/// One event of a follow: each line after the [`EventsReply`] (`{"ok":true,"next":{...}}`).
/// `E` is [`EventInfo`], or a reference to one where it is written.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NextReply<E = EventInfo> {
    /// The event.
    pub next: E,
}

/// A VPS as the daemon names it in replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpsRef {
    /// Its id (a plain integer on the wire).
    pub id: VpsId,
    /// Its name.
    pub name: String,
    /// Its first process (a plain integer on the wire).
    pub first: Pid,
}

/// One live tagged process (`ps`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: Pid,
    /// Parent process id, when known (0 on the wire when not).
    #[serde(with = "pid_or_zero")]
    pub ppid: Option<Pid>,
    /// Its VPS.
    pub vps: String,
    /// Its command line (`[comm]` for a kernel-style name without arguments).
    pub cmd: String,
    /// Its real uid.
    pub uid: u32,
    /// How the table learned it: first, event, scan or loader.
    pub source: String,
    /// Its start time (clock ticks since boot on Linux).
    pub start: u64,
}

/// One VPS (`list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpsInfo {
    /// Its id.
    pub id: VpsId,
    /// Its name.
    pub name: String,
    /// The uid that started it.
    pub owner: u32,
    /// Its first process.
    pub first: Pid,
    /// Whether the first process is alive.
    pub first_alive: bool,
    /// Live members.
    pub members: usize,
    /// When it started, in seconds since the epoch.
    pub started: u64,
    /// User + system CPU time of every process that has ever been in it, exited ones included,
    /// in milliseconds ([`Manager::usage`](crate::Manager::usage)); never decreases.
    pub cpu_ms: u64,
    /// Resident memory of its live members, in bytes.
    pub rss_bytes: u64,
    /// The highest memory figure known, in bytes: its cgroup's `memory.peak`, else the highest
    /// `rss_bytes` seen (0 from a daemon that predates it).
    #[serde(default)]
    pub memory_peak_bytes: u64,
    /// Processes created in it (forks, not threads) since the daemon knows it (0 from a daemon
    /// that predates it).
    #[serde(default)]
    pub forks: u64,
}

/// One fork, exec or exit of a tagged process, or a loss (`events`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    /// `fork`, `exec`, `exit`, or `lost` (the backend lost events: some events of the stream
    /// may be missing, though the table was repaired from a scan).
    pub event: String,
    /// The VPS; for `lost`, the VPS the stream is about, or `""` when it covers several.
    pub vps: String,
    /// Its place in the daemon's stream: increases by one with each event the daemon records
    /// (of any VPS, so a stream of one VPS skips numbers), and from one run of the daemon to the
    /// next (it starts at the daemon's start time in microseconds). Resume a stream after the
    /// last one seen with [`Client::events_after`](crate::client::Client::events_after). 0 (and
    /// absent on the wire) where there is no such stream (`vpstag run --json-events` numbers its
    /// own events from 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// The VPS's id: tells a VPS from a later one of the same name. Absent for `lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vps_id: Option<VpsId>,
    /// The process (for a fork: the child); `None` for `lost` (0 on the wire).
    #[serde(with = "pid_or_zero")]
    pub pid: Option<Pid>,
    /// For a fork: the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Pid>,
    /// For an exec: the new command line, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// For an exit: the exit code, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// For an exit: the signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// For `lost`: how many events were lost, when the backend could count them (for reason
    /// `expired`: how many numbers of [`seq`](EventInfo::seq) were skipped, of every VPS, so at
    /// most that many of this stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For `lost`: absent when the backend lost events (the table was repaired from a scan);
    /// `expired` when a stream resumed with `after` asked for events the daemon no longer keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When (nanoseconds of the boot clock), if the backend knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
}

/// One divergence `check` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergenceInfo {
    /// `missing`, `extra` or `wrong_tag`.
    pub kind: String,
    /// The process (a plain integer on the wire).
    pub pid: Pid,
    /// The VPS the table has (extra, wrong_tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vps: Option<String>,
    /// The VPS the system says (missing, wrong_tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

/// The reply to `check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckInfo {
    /// Every divergence (expected: none).
    pub divergences: Vec<DivergenceInfo>,
    /// Table entries compared.
    pub entries: usize,
    /// Processes on the system.
    pub processes: usize,
    /// The loss and resync counters (`events`, `loss_reports`, `lost_events`, `resyncs`, ...).
    pub stats: BTreeMap<String, u64>,
}

/// The reply to a refusal: `{"ok":false,"error":{"kind":...,"message":...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of refusal, as a string (a newer daemon may send kinds this library does not
    /// know: see [`ErrorKind::parse`]).
    pub kind: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Why the daemon refused a request (`"kind"` of a refusal; the table in `docs/protocol.md`).
///
/// The daemon's refusals and [`Error::kind`](crate::Error::kind) both use it.
/// New kinds are compatible additions to the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Not JSON, not an object, no `v`, unknown `op`, wrong argument types, unknown signal.
    BadRequest,
    /// The request line was longer than [`MAX_REQUEST`].
    TooLong,
    /// `v` is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// The VPS or process belongs to another user, or the operation needs root.
    PermissionDenied,
    /// No VPS of that name (or none of the caller's).
    UnknownVps,
    /// `register_first` with a name that is running.
    AlreadyRunning,
    /// A VPS name must be 1-64 of `A-Za-z0-9._-`, not starting with `-` or `.`.
    InvalidName,
    /// The process is gone.
    NoSuchProcess,
    /// The process cannot be told from a later holder of its pid on this system.
    Unverifiable,
    /// The process already belongs to a VPS.
    Nested,
    /// The user has too many VPSes.
    Quota,
    /// The tracking backend may not follow the process (e.g. ptrace permissions).
    BackendRefused,
    /// Members still alive after repeated SIGKILL.
    Timeout,
    /// The request line did not arrive whole in time (the connection is then closed).
    TooSlow,
    /// An event follower fell behind and was cut off.
    Lagging,
    /// Too many connections; sent on connecting, then the connection is closed.
    Busy,
    /// A resource limit cannot be applied here (no usable cgroup v2, its controller not
    /// delegated, a value out of range, or the daemon runs with `--cgroup-root none`).
    LimitRefused,
    /// Anything else (the message says what).
    Failed,
    /// A kind this version of the library does not know (from a newer daemon).
    Other,
}

impl ErrorKind {
    const ALL: [(ErrorKind, &'static str); 18] = [
        (ErrorKind::BadRequest, "bad_request"),
        (ErrorKind::TooLong, "too_long"),
        (ErrorKind::UnsupportedVersion, "unsupported_version"),
        (ErrorKind::PermissionDenied, "permission_denied"),
        (ErrorKind::UnknownVps, "unknown_vps"),
        (ErrorKind::AlreadyRunning, "already_running"),
        (ErrorKind::InvalidName, "invalid_name"),
        (ErrorKind::NoSuchProcess, "no_such_process"),
        (ErrorKind::Unverifiable, "unverifiable"),
        (ErrorKind::Nested, "nested"),
        (ErrorKind::Quota, "quota"),
        (ErrorKind::BackendRefused, "backend_refused"),
        (ErrorKind::Timeout, "timeout"),
        (ErrorKind::TooSlow, "too_slow"),
        (ErrorKind::Lagging, "lagging"),
        (ErrorKind::Busy, "busy"),
        (ErrorKind::LimitRefused, "limit_refused"),
        (ErrorKind::Failed, "failed"),
    ];

    /// Its name on the wire (`"unknown_vps"`); `"other"` for [`ErrorKind::Other`].
    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(k, _)| *k == self).map_or("other", |(_, s)| s)
    }

    /// The kind named `s` on the wire; [`ErrorKind::Other`] for a name this library does not know.
    ///
    /// ```
    /// use vpstag::protocol::ErrorKind;
    /// assert_eq!(ErrorKind::parse("unknown_vps"), ErrorKind::UnknownVps);
    /// assert_eq!(ErrorKind::parse("something_new"), ErrorKind::Other);
    /// ```
    pub fn parse(s: &str) -> ErrorKind {
        Self::ALL.iter().find(|(_, n)| *n == s).map_or(ErrorKind::Other, |(k, _)| *k)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EventInfo {
    /// The one mapping of a tagged event to the protocol's event schema (what `vpstag events
    /// --json` and `vpstag run --json-events` print): `None` for what the schema leaves out
    /// (thread births and exits). `cmd` reads an exec's command line (it is called for exec
    /// events only). An exit carries `code` when the process exited and `signal` when a signal
    /// ended it, never both. A loss report (which belongs to no VPS) becomes a `lost` event with
    /// no pid, `count` when known, and `vps` as given (the VPS of the stream it is written into,
    /// or `""` for a stream of several VPSes). `vps_id` is the event's VPS; `seq` is 0, for the
    /// caller to number.
    ///
    /// ```
    /// use vpstag::protocol::EventInfo;
    /// use vpstag::{Event, EventKind, ExitStatus, Pid, TaggedEvent, VpsId};
    ///
    /// let pid = Pid::new(42).unwrap();
    /// let ev = TaggedEvent {
    ///     event: Event::new(EventKind::Exit { pid, thread: pid, status: Some(ExitStatus::Exited(3)), group_dead: None }),
    ///     vps: Some(VpsId(1)),
    /// };
    /// let info = EventInfo::from_event(&ev, "web", |_| None).unwrap();
    /// assert_eq!((info.event.as_str(), info.code, info.signal), ("exit", Some(3), None));
    /// ```
    pub fn from_event(ev: &TaggedEvent, vps: &str, cmd: impl FnOnce(Pid) -> Option<String>) -> Option<EventInfo> {
        let base = |event: &str, pid: Option<Pid>| EventInfo {
            event: event.into(),
            vps: vps.into(),
            vps_id: ev.vps,
            pid,
            time_ns: ev.event.time_ns,
            ..EventInfo::default()
        };
        match ev.event.kind {
            EventKind::Fork { thread: true, .. } => None,
            EventKind::Fork { parent, child, .. } => {
                Some(EventInfo { parent: Some(parent), ..base("fork", Some(child)) })
            }
            EventKind::Exec { pid, .. } => Some(EventInfo { cmd: cmd(pid), ..base("exec", Some(pid)) }),
            EventKind::Exit { pid, thread, .. } if pid != thread => None,
            EventKind::Exit { pid, status, .. } => Some(EventInfo {
                code: match status {
                    Some(ExitStatus::Exited(c)) => Some(c),
                    _ => None,
                },
                signal: match status {
                    Some(ExitStatus::Signaled { signal, .. }) => Some(signal),
                    _ => None,
                },
                ..base("exit", Some(pid))
            }),
            EventKind::Lost { count, .. } => Some(EventInfo { count, vps_id: None, ..base("lost", None) }),
            _ => None,
        }
    }

    /// The `lost` event (reason `expired`) that begins a stream resumed after `seq` `after` when
    /// `count` events after it are no longer kept (`None`: an unknown number, when `after` is
    /// from a stream this daemon did not write). It carries the last `seq` it stands for.
    pub fn expired(vps: &str, count: Option<u64>, seq: u64) -> EventInfo {
        EventInfo {
            event: "lost".into(),
            vps: vps.into(),
            seq,
            count,
            reason: Some("expired".into()),
            ..EventInfo::default()
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An optional pid as a plain integer, 0 for none (as the protocol has always sent it).
mod pid_or_zero {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Pid;

    pub(super) fn serialize<S: Serializer>(pid: &Option<Pid>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(pid.map_or(0, Pid::as_raw))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pid>, D::Error> {
        let raw = i32::deserialize(d)?;
        match raw {
            0 => Ok(None),
            raw => Pid::new(raw).map(Some).ok_or_else(|| {
                serde::de::Error::invalid_value(serde::de::Unexpected::Signed(raw.into()), &"a process id or 0")
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_reads_back_from_its_name() {
        for (k, s) in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(s), k);
            assert_eq!(k.as_str(), s);
        }
        assert_eq!(ErrorKind::Other.as_str(), "other");
    }

    #[test]
    fn a_signalled_exit_has_a_signal_and_no_code() {
        let pid = Pid::new(7).unwrap();
        let ev = TaggedEvent {
            event: crate::Event::new(EventKind::Exit {
                pid,
                thread: pid,
                status: Some(ExitStatus::Signaled { signal: 9, core_dumped: false }),
                group_dead: None,
            }),
            vps: Some(crate::VpsId(1)),
        };
        let info = EventInfo::from_event(&ev, "a", |_| None).unwrap();
        assert_eq!((info.code, info.signal), (None, Some(9)));
        let json = serde_json::to_string(&info).unwrap();
        assert!(!json.contains("code"), "{json}");
    }

    #[test]
    fn a_loss_report_becomes_a_lost_event_with_its_count() {
        let lost = |count| TaggedEvent {
            event: crate::Event::new(EventKind::Lost { count, reason: crate::LossReason::Overflow }),
            vps: None,
        };
        let info = EventInfo::from_event(&lost(Some(12)), "web", |_| panic!("no command line for a loss")).unwrap();
        assert_eq!((info.event.as_str(), info.vps.as_str(), info.pid, info.count), ("lost", "web", None, Some(12)));
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(json, r#"{"event":"lost","vps":"web","pid":0,"count":12}"#);
        let uncounted = EventInfo::from_event(&lost(None), "", |_| None).unwrap();
        assert_eq!(serde_json::to_string(&uncounted).unwrap(), r#"{"event":"lost","vps":"","pid":0}"#);
        // An event from a daemon that knows no `count` still reads.
        let old: EventInfo = serde_json::from_str(r#"{"event":"exit","vps":"a","pid":3,"code":0}"#).unwrap();
        assert_eq!(old.count, None);
    }

    #[test]
    fn pids_and_vps_ids_are_plain_integers_on_the_wire() {
        let line = r#"{"id":3,"name":"web","first":1234}"#;
        let vps: VpsRef = serde_json::from_str(line).unwrap();
        assert_eq!((vps.id, vps.first.as_raw()), (VpsId(3), 1234));
        assert_eq!(serde_json::to_string(&vps).unwrap(), line);
        let line = r#"{"kind":"extra","pid":77,"vps":"web"}"#;
        let d: DivergenceInfo = serde_json::from_str(line).unwrap();
        assert_eq!(d.pid.as_raw(), 77);
        assert_eq!(serde_json::to_string(&d).unwrap(), line);
        assert!(serde_json::from_str::<VpsRef>(r#"{"id":3,"name":"web","first":0}"#).is_err());
        // A process whose parent is unknown: ppid 0, as ever.
        let line = r#"{"pid":5,"ppid":0,"vps":"web","cmd":"sh","uid":0,"source":"event","start":9}"#;
        let p: ProcessInfo = serde_json::from_str(line).unwrap();
        assert_eq!((p.pid.as_raw(), p.ppid), (5, None));
        assert_eq!(serde_json::to_string(&p).unwrap(), line);
        assert!(serde_json::from_str::<ProcessInfo>(&line.replace("\"ppid\":0", "\"ppid\":-4")).is_err());
    }

    #[test]
    fn events_carry_seq_and_vps_id_as_plain_integers_and_old_events_still_read() {
        let line = r#"{"event":"fork","vps":"web","seq":1700000000000001,"vps_id":3,"pid":11,"parent":10}"#;
        let e: EventInfo = serde_json::from_str(line).unwrap();
        assert_eq!(
            (e.seq, e.vps_id, e.pid.map(Pid::as_raw), e.parent.map(Pid::as_raw)),
            (1700000000000001, Some(VpsId(3)), Some(11), Some(10))
        );
        assert_eq!(serde_json::to_string(&e).unwrap(), line);
        let old: EventInfo = serde_json::from_str(r#"{"event":"exec","vps":"a","pid":3}"#).unwrap();
        assert_eq!((old.seq, old.vps_id), (0, None));
        let x = EventInfo::expired("web", Some(5), 41);
        assert_eq!(
            serde_json::to_string(&x).unwrap(),
            r#"{"event":"lost","vps":"web","seq":41,"pid":0,"count":5,"reason":"expired"}"#
        );
    }
}
