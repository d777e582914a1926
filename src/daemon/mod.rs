//! The vpstag daemon: one long-running manager holding the mapping table for the whole host,
//! serving every other tool over a Unix socket (`vpstag daemon`; the protocol is in
//! `docs/protocol.md`, the client in [`crate::client`]).
//!
//! - Every request is authorised with the peer's `SO_PEERCRED`: root may do everything; another
//!   user sees and acts only on the VPSes it started, and may `join` only those.
//! - A VPS's processes never run with the daemon's privileges: the client forks the first
//!   process with its own credentials; that process connects and registers itself, and the daemon
//!   takes its pid and uid from `SO_PEERCRED`, never from the request.
//! - State survives a crash: see [`store`].
//! - One thread per connection (at most [`MAX_CONNECTIONS`]), request lines of at most
//!   [`MAX_REQUEST`](crate::client::MAX_REQUEST) bytes; a malformed request gets an error reply.

mod paths;
mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{self, EventInfo, Op, ProcessInfo, Request, VpsInfo, MAX_REQUEST, PROTOCOL_VERSION};
use crate::{BackendChoice, Error, EventKind, ExitStatus, Manager, Pid, SavedVps, Signal, Vps};
use store::{OwnedVps, Record, Store};

/// At most this many connections are served at once; more get a `busy` error.
pub const MAX_CONNECTIONS: usize = 128;
/// Events kept for `vpstag events` without `--follow`.
const RECENT_EVENTS: usize = 2000;
/// A follower that falls this many events behind is cut off (with an error line).
const FOLLOWER_QUEUE: usize = 8192;
/// Journal lines after which the daemon writes a new snapshot.
const COMPACT_AFTER: usize = 20_000;

/// How to run the daemon.
#[derive(Clone, Debug)]
pub struct Config {
    /// The backend.
    pub backend: BackendChoice,
    /// The socket to listen on.
    pub socket: PathBuf,
    /// Where the journal and snapshot live.
    pub state_dir: PathBuf,
    /// Start even when the journal or snapshot has an unreadable line: keep a copy of the bad
    /// file, start from what can be read, and log it (otherwise the daemon stops and says where).
    pub discard_bad_journal: bool,
}

/// Writes one log line with a UTC timestamp to standard error.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} vpstag[{}]: {}", timestamp(), std::process::id(), format_args!($($arg)*))
    };
}

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#[doc(hidden)]
pub fn timestamp() -> String {
    format_time(SystemTime::now())
}

/// A time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
#[doc(hidden)]
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

struct VpsMeta {
    name: String,
    owner: u32,
}

struct Daemon {
    mgr: Manager,
    store: Arc<Store>,
    /// Store errors seen in the change callback (which cannot return them).
    store_failed: Arc<AtomicBool>,
    meta: Mutex<HashMap<u64, VpsMeta>>,
    recent: Mutex<VecDeque<(u64, EventInfo)>>,
    followers: Mutex<Vec<SyncSender<(u64, EventInfo)>>>,
    stop: Arc<AtomicBool>,
    connections: AtomicUsize,
    backend: String,
}

/// A refusal: an error kind and a message (see `docs/protocol.md`).
#[derive(Debug)]
struct Refusal {
    kind: &'static str,
    message: String,
}

fn refuse(kind: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { kind, message: message.into() }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        let kind = match &e {
            Error::UnknownVps(_) => "unknown_vps",
            Error::AlreadyRunning(_) => "already_running",
            Error::InvalidName { .. } => "invalid_name",
            Error::NoSuchProcess(_) => "no_such_process",
            Error::UnknownSignal(_) => "bad_request",
            Error::Tracker(crate::TrackerError::PermissionDenied { .. }) => "backend_refused",
            Error::Timeout(_) => "timeout",
            _ => "failed",
        };
        Refusal { kind, message: e.to_string() }
    }
}

#[derive(Serialize)]
struct Success<T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: T,
}

fn ok_line(body: impl Serialize) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Success { ok: true, body }).unwrap_or_else(|_| b"{\"ok\":true}".to_vec());
    v.push(b'\n');
    v
}

fn error_line(r: &Refusal) -> Vec<u8> {
    #[derive(Serialize)]
    struct Failure<'a> {
        ok: bool,
        error: ErrorBody<'a>,
    }
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        kind: &'a str,
        message: &'a str,
    }
    let mut v = serde_json::to_vec(&Failure { ok: false, error: ErrorBody { kind: r.kind, message: &r.message } })
        .unwrap_or_default();
    v.push(b'\n');
    v
}

/// The peer: who sent a request.
#[derive(Clone, Copy, Debug)]
struct Peer {
    pid: i32,
    uid: u32,
}

/// Whether a user with uid `uid` could signal `pid` itself (kill(2): the sender's uid is the
/// target's real or saved uid).
fn may_signal(uid: u32, pid: Pid) -> bool {
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
        matches!(crate::sys::process(pid), Ok(Some(i)) if i.uid == uid)
    }
}

/// CPU time (ms) and resident memory (bytes) of a process, where the system says.
fn usage(pid: Pid) -> (u64, u64) {
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

fn event_info(ev: &crate::TaggedEvent, name: &str) -> Option<EventInfo> {
    let base = |event: &str, pid: Pid| EventInfo {
        event: event.into(),
        vps: name.into(),
        pid: pid.as_raw(),
        parent: None,
        cmd: None,
        code: None,
        signal: None,
        time_ns: ev.event.time_ns,
    };
    match ev.event.kind {
        EventKind::Fork { thread: true, .. } => None,
        EventKind::Fork { parent, child, .. } => {
            Some(EventInfo { parent: Some(parent.as_raw()), ..base("fork", child) })
        }
        EventKind::Exec { pid, .. } => Some(EventInfo { cmd: crate::sys::cmdline(pid), ..base("exec", pid) }),
        EventKind::Exit { pid, thread, .. } if pid != thread => None,
        EventKind::Exit { pid, status, .. } => Some(EventInfo {
            code: status.and_then(|s| match s {
                ExitStatus::Exited(c) => Some(c),
                _ => None,
            }),
            signal: status.and_then(|s| match s {
                ExitStatus::Signaled { signal, .. } => Some(signal),
                _ => None,
            }),
            ..base("exit", pid)
        }),
        EventKind::Lost { .. } => None,
    }
}

impl Daemon {
    fn meta(&self) -> MutexGuard<'_, HashMap<u64, VpsMeta>> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owner(&self, id: u64) -> Option<u32> {
        self.meta().get(&id).map(|m| m.owner)
    }

    fn visible(&self, peer: Peer, id: u64) -> bool {
        peer.uid == 0 || self.owner(id) == Some(peer.uid)
    }

    /// The VPS `name`, if `peer` may act on it.
    fn lookup(&self, peer: Peer, name: &str, what: &str) -> Result<Vps, Refusal> {
        let vps = self.mgr.vps(name)?;
        if !self.visible(peer, vps.id.0) {
            let owner = self.owner(vps.id.0).map_or("another user".to_string(), |u| format!("uid {u}"));
            return Err(refuse(
                "permission_denied",
                format!(
                    "VPS {name:?} belongs to {owner}; only its owner or root may {what} it (you are uid {})",
                    peer.uid
                ),
            ));
        }
        Ok(vps)
    }

    fn journal(&self, records: &[Record]) -> Result<(), Refusal> {
        self.store.append(records).map_err(|e| {
            log!("cannot write the journal in {}: {e}", self.store.dir().display());
            refuse("failed", format!("cannot write the journal: {e}"))
        })
    }

    fn compact(&self) -> io::Result<()> {
        self.store.rotate()?;
        let (vpses, members) = self.mgr.export().map_err(|e| io::Error::other(e.to_string()))?;
        let owned: Vec<OwnedVps> = {
            let meta = self.meta();
            vpses
                .into_iter()
                .filter_map(|v| meta.get(&v.id).map(|m| m.owner).map(|owner| OwnedVps { vps: v, owner }))
                .collect()
        };
        self.store.write_snapshot(owned, members)
    }

    fn handle(&self, peer: Peer, op: Op) -> Result<Vec<u8>, Refusal> {
        match op {
            Op::Hello => Ok(ok_line(json!({
                "version": PROTOCOL_VERSION,
                "daemon_pid": std::process::id(),
                "backend": self.backend,
                "uid": peer.uid,
            }))),
            Op::RegisterFirst { name } => {
                let pid = Pid::new(peer.pid).ok_or_else(|| refuse("bad_request", "the peer has no pid"))?;
                let info = crate::sys::process(pid)
                    .map_err(|e| refuse("failed", format!("reading process {pid}: {e}")))?
                    .ok_or_else(|| refuse("no_such_process", format!("process {pid} is gone")))?;
                let vps = self.mgr.register_first(&name, pid)?;
                let saved = SavedVps {
                    id: vps.id.0,
                    name: vps.name.clone(),
                    first_pid: pid.as_raw(),
                    first_start: info.id.start.0,
                    started: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                };
                self.meta().insert(vps.id.0, VpsMeta { name: vps.name.clone(), owner: peer.uid });
                if let Err(e) = self.journal(&[Record::Vps { vps: saved, owner: peer.uid }]) {
                    let _ = self.mgr.forget(&vps);
                    self.meta().remove(&vps.id.0);
                    return Err(e);
                }
                log!("VPS {:?} (id {}) started by uid {}: first process {pid}", vps.name, vps.id, peer.uid);
                Ok(ok_line(json!({ "vps": vps })))
            }
            Op::Join { name } => {
                let vps = self.lookup(peer, &name, "join")?;
                let pid = Pid::new(peer.pid).ok_or_else(|| refuse("bad_request", "the peer has no pid"))?;
                let vps = self.mgr.join(&vps.name, pid)?;
                log!("process {pid} (uid {}) joined VPS {:?}", peer.uid, vps.name);
                Ok(ok_line(json!({ "vps": vps })))
            }
            Op::Which { pid } => {
                let pid = Pid::new(pid).ok_or_else(|| refuse("bad_request", format!("not a process id: {pid}")))?;
                match self.mgr.vps_of(pid)? {
                    None => Ok(ok_line(json!({ "vps": null }))),
                    Some(v) if self.visible(peer, v.id.0) => Ok(ok_line(json!({ "vps": v.name }))),
                    Some(_) => {
                        Err(refuse("permission_denied", format!("process {pid} belongs to a VPS of another user")))
                    }
                }
            }
            Op::Members { name } => {
                let vps = self.lookup(peer, &name, "see")?;
                let pids: Vec<i32> = self.mgr.members(&vps)?.into_iter().map(Pid::as_raw).collect();
                Ok(ok_line(json!({ "pids": pids })))
            }
            Op::Ps { name } => {
                let vpses: Vec<Vps> = match name {
                    Some(n) => vec![self.lookup(peer, &n, "see")?],
                    None => {
                        self.mgr.list()?.into_iter().map(|s| s.vps).filter(|v| self.visible(peer, v.id.0)).collect()
                    }
                };
                let mut out = Vec::new();
                for vps in vpses {
                    let members = match self.mgr.member_details(&vps) {
                        Ok(m) => m,
                        Err(Error::UnknownVps(_)) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    for m in members {
                        let Ok(Some(info)) = crate::sys::process(m.id.pid) else { continue };
                        if info.id.start != m.id.start {
                            continue;
                        }
                        out.push(ProcessInfo {
                            pid: m.id.pid.as_raw(),
                            ppid: info.ppid.map_or(0, Pid::as_raw),
                            vps: vps.name.clone(),
                            cmd: crate::sys::cmdline(m.id.pid).unwrap_or_else(|| format!("[{}]", info.name)),
                            uid: info.uid,
                            source: serde_json::to_value(m.source)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            start: m.id.start.0,
                        });
                    }
                }
                out.sort_by_key(|p| p.pid);
                Ok(ok_line(json!({ "processes": out })))
            }
            Op::List => {
                let mut out = Vec::new();
                for s in self.mgr.list()? {
                    let id = s.vps.id.0;
                    if !self.visible(peer, id) {
                        continue;
                    }
                    let (mut cpu, mut rss) = (0, 0);
                    for pid in self.mgr.members(&s.vps).unwrap_or_default() {
                        let (c, r) = usage(pid);
                        cpu += c;
                        rss += r;
                    }
                    out.push(VpsInfo {
                        id,
                        name: s.vps.name.clone(),
                        owner: self.owner(id).unwrap_or(0),
                        first: s.vps.first.as_raw(),
                        first_alive: s.first_alive,
                        members: s.members,
                        started: s.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                        cpu_ms: cpu,
                        rss_bytes: rss,
                    });
                }
                Ok(ok_line(json!({ "vpses": out })))
            }
            Op::Kill { name, signal } => {
                let vps = self.lookup(peer, &name, "signal")?;
                let sig: Signal = signal.as_deref().unwrap_or("TERM").parse()?;
                let n = self.signal_all(peer, &vps, sig, Duration::from_secs(10))?;
                log!("uid {} sent {sig} to {n} processes of VPS {:?}", peer.uid, vps.name);
                Ok(ok_line(json!({ "signalled": n })))
            }
            Op::Stop { name, grace_ms } => {
                let vps = self.lookup(peer, &name, "stop")?;
                let grace = Duration::from_millis(grace_ms.unwrap_or(5000).min(600_000));
                let mut n = 0;
                if !self.mgr.members(&vps)?.is_empty() {
                    n = self.signal_all(peer, &vps, Signal::TERM, grace)?;
                    if !self.mgr.wait_empty(&vps, Some(grace))? {
                        n += self.signal_all(peer, &vps, Signal::KILL, Duration::from_secs(10))?;
                    }
                }
                self.mgr.forget(&vps)?;
                self.meta().remove(&vps.id.0);
                self.journal(&[Record::Forget { id: vps.id.0 }])?;
                log!("VPS {:?} stopped by uid {} ({n} processes signalled) and forgotten", vps.name, peer.uid);
                Ok(ok_line(json!({ "signalled": n })))
            }
            Op::Events { name, .. } => {
                let only = match name {
                    Some(n) => Some(self.lookup(peer, &n, "see")?.id.0),
                    None => None,
                };
                let recent: Vec<EventInfo> = self
                    .recent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(id, _)| only.map_or(true, |o| o == *id) && self.visible(peer, *id))
                    .map(|(_, e)| e.clone())
                    .collect();
                Ok(ok_line(json!({ "events": recent })))
            }
            Op::Check => {
                let mut report = self.mgr.check()?;
                if peer.uid != 0 {
                    let mine: HashSet<String> =
                        self.meta().values().filter(|m| m.owner == peer.uid).map(|m| m.name.clone()).collect();
                    report.divergences.retain(|d| match d {
                        crate::Divergence::Missing { expected, .. } => mine.contains(expected),
                        crate::Divergence::Extra { vps, .. } => mine.contains(vps),
                        crate::Divergence::WrongTag { vps, expected, .. } => {
                            mine.contains(vps) || mine.contains(expected)
                        }
                    });
                }
                Ok(ok_line(report))
            }
        }
    }

    /// Sends `sig` to every member of `vps` that `peer` may signal, without racing new forks:
    /// SIGKILL again and again until no member is left; any other signal to each member once,
    /// then to every member born meanwhile, until a pass finds none new.
    fn signal_all(&self, peer: Peer, vps: &Vps, sig: Signal, timeout: Duration) -> Result<usize, Refusal> {
        let deadline = Instant::now() + timeout;
        let send = |pid: Pid| {
            // SAFETY: kill with integer arguments.
            unsafe { libc::kill(pid.as_raw(), sig.as_raw()) == 0 }
        };
        let mut done: HashSet<Pid> = HashSet::new();
        loop {
            let members = self.mgr.members(vps)?;
            let (allowed, denied): (Vec<Pid>, Vec<Pid>) = members.iter().partition(|p| may_signal(peer.uid, **p));
            let targets: Vec<Pid> =
                if sig == Signal::KILL { allowed } else { allowed.into_iter().filter(|p| !done.contains(p)).collect() };
            if targets.is_empty() {
                if sig == Signal::KILL && !denied.is_empty() {
                    return Err(refuse(
                        "permission_denied",
                        format!(
                            "{} processes of VPS {:?} run as another user and were not killed: {denied:?}",
                            denied.len(),
                            vps.name
                        ),
                    ));
                }
                return Ok(done.len());
            }
            for p in targets {
                if send(p) {
                    done.insert(p);
                }
            }
            if Instant::now() >= deadline {
                let left = self.mgr.members(vps)?;
                if sig != Signal::KILL || left.is_empty() {
                    return Ok(done.len());
                }
                return Err(refuse(
                    "timeout",
                    format!("{} processes of VPS {:?} still alive after SIGKILL: {left:?}", left.len(), vps.name),
                ));
            }
            if sig == Signal::KILL {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Records every tagged event: the recent ring and the followers.
    fn record_events(self: &Arc<Daemon>, rx: mpsc::Receiver<crate::TaggedEvent>) {
        while !self.stop.load(Ordering::SeqCst) {
            let t = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => t,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let Some(id) = t.vps else { continue };
            let name = match self.meta().get(&id.0) {
                Some(m) => m.name.clone(),
                None => match self.mgr.name_of(id) {
                    Some(n) => n,
                    None => continue,
                },
            };
            let Some(info) = event_info(&t, &name) else { continue };
            {
                let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                if r.len() >= RECENT_EVENTS {
                    r.pop_front();
                }
                r.push_back((id.0, info.clone()));
            }
            let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|tx| match tx.try_send((id.0, info.clone())) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            });
        }
    }

    fn follow(&self, peer: Peer, only: Option<u64>, stream: &mut UnixStream) {
        let (tx, rx) = mpsc::sync_channel(FOLLOWER_QUEUE);
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        while !self.stop.load(Ordering::SeqCst) {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok((id, info)) => {
                    if only.is_some_and(|o| o != id) || !self.visible(peer, id) {
                        continue;
                    }
                    if stream.write_all(&ok_line(json!({ "next": info }))).is_err() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Notice a client that went away.
                    let mut b = [0u8; 1];
                    match stream.peek_nonblocking(&mut b) {
                        Some(0) => return,
                        _ => continue,
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = stream.write_all(&error_line(&refuse(
                        "lagging",
                        format!("this follower fell {FOLLOWER_QUEUE} events behind and was cut off; reconnect"),
                    )));
                    return;
                }
            }
        }
    }

    fn serve(self: &Arc<Daemon>, stream: UnixStream) {
        let peer = match client::peer_credentials(stream.as_raw_fd()) {
            Ok((pid, uid)) => Peer { pid, uid },
            Err(e) => {
                let mut s = &stream;
                let _ = s.write_all(&error_line(&refuse("failed", format!("cannot read the peer's credentials: {e}"))));
                return;
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        let Ok(mut writer) = stream.try_clone() else { return };
        let mut reader = BufReader::with_capacity(8192, stream);
        loop {
            let line = match read_line(&mut reader) {
                Line::Eof | Line::Failed => return,
                Line::TooLong => {
                    let r = refuse("too_long", format!("a request line is at most {MAX_REQUEST} bytes"));
                    if writer.write_all(&error_line(&r)).is_err() {
                        return;
                    }
                    continue;
                }
                Line::Got(l) => l,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (reply, follow) = match parse_request(&line) {
                Err(r) => (error_line(&r), None),
                Ok(req) => {
                    let follow = match &req.op {
                        Op::Events { follow: true, name } => Some(name.clone()),
                        _ => None,
                    };
                    match self.handle(peer, req.op) {
                        Ok(l) => (l, follow),
                        Err(r) => (error_line(&r), None),
                    }
                }
            };
            if writer.write_all(&reply).is_err() {
                return;
            }
            if let Some(name) = follow {
                let only = name.and_then(|n| self.mgr.vps(&n).ok()).map(|v| v.id.0);
                self.follow(peer, only, &mut writer);
                return;
            }
        }
    }
}

trait PeekNonblocking {
    fn peek_nonblocking(&self, buf: &mut [u8]) -> Option<usize>;
}

impl PeekNonblocking for UnixStream {
    /// `Some(0)` when the other end closed; `None` when nothing is there (or on error).
    fn peek_nonblocking(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: recv into a valid buffer, non-blocking peek.
        let r = unsafe {
            libc::recv(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        (r >= 0).then_some(r as usize)
    }
}

enum Line {
    Got(Vec<u8>),
    TooLong,
    Eof,
    Failed,
}

/// One line of at most [`MAX_REQUEST`] bytes; a longer one is read to its end and discarded.
fn read_line(r: &mut BufReader<UnixStream>) -> Line {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Line::Failed,
        };
        if buf.is_empty() {
            return if too_long { Line::TooLong } else { Line::Eof };
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > MAX_REQUEST {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            return if too_long { Line::TooLong } else { Line::Got(line) };
        }
    }
}

fn parse_request(line: &[u8]) -> Result<Request, Refusal> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| refuse("bad_request", format!("not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(refuse("bad_request", "a request is one JSON object a line"));
    }
    match v.get("v").and_then(Value::as_u64) {
        Some(n) if n == u64::from(PROTOCOL_VERSION) => {}
        Some(n) => {
            return Err(refuse(
                "unsupported_version",
                format!("protocol version {n} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
            ))
        }
        None => return Err(refuse("bad_request", format!("missing \"v\" (the protocol version, {PROTOCOL_VERSION})"))),
    }
    serde_json::from_value(v).map_err(|e| refuse("bad_request", format!("bad request: {e}")))
}

fn prepare_socket(path: &std::path::Path) -> Result<(UnixListener, paths::BoundSocket), Error> {
    paths::bind_socket(path).map_err(|e| Error::io(format!("preparing the socket {}", path.display()), e))
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| Error::io("installing signal handlers", e))?;
    }
    let (store, loaded) = Store::open(&cfg.state_dir, cfg.discard_bad_journal)
        .map_err(|e| Error::io(format!("opening the state directory {}", cfg.state_dir.display()), e))?;
    for note in &loaded.notes {
        log!("{note}");
    }
    let (tracker, notes) = crate::open_backend_with_notes(cfg.backend)?;
    for n in &notes {
        log!("{n}");
    }
    let backend = tracker.kind().name().to_string();
    let mgr = Manager::new(tracker)?;
    let store = Arc::new(store);
    let store_failed = Arc::new(AtomicBool::new(false));
    {
        let store = Arc::clone(&store);
        let failed = Arc::clone(&store_failed);
        mgr.on_change(move |changes| {
            // Only roots are journaled: the rest is rebuilt from them by a scan.
            let records = store::roots_of(changes);
            if let Err(e) = store.append(&records) {
                if !failed.swap(true, Ordering::SeqCst) {
                    log!("cannot write the journal in {}: {e}; new roots are not saved", store.dir().display());
                }
            }
        });
    }
    let vpses: Vec<SavedVps> = loaded.vpses.values().map(|o| o.vps.clone()).collect();
    let members: Vec<crate::SavedMember> = loaded.roots();
    let restored = mgr.restore(&vpses, &members)?;
    mgr.recheck_first_processes()?;
    let mut meta = HashMap::new();
    for o in loaded.vpses.values() {
        meta.insert(o.vps.id, VpsMeta { name: o.vps.name.clone(), owner: o.owner });
    }
    let daemon = Arc::new(Daemon {
        mgr,
        store,
        store_failed,
        meta: Mutex::new(meta),
        recent: Mutex::new(VecDeque::new()),
        followers: Mutex::new(Vec::new()),
        stop: Arc::clone(&stop),
        connections: AtomicUsize::new(0),
        backend: backend.clone(),
    });
    if !loaded.vpses.is_empty() {
        log!(
            "recovered {} VPSes and {restored} of {} saved roots from {}",
            loaded.vpses.len(),
            members.len(),
            cfg.state_dir.display()
        );
    }
    daemon.compact().map_err(|e| Error::io(format!("writing a snapshot in {}", cfg.state_dir.display()), e))?;
    let rx = daemon.mgr.subscribe();
    {
        let d = Arc::clone(&daemon);
        std::thread::Builder::new()
            .name("vpstag-events".into())
            .spawn(move || d.record_events(rx))
            .map_err(|e| Error::io("starting the event thread", e))?;
    }
    let (listener, socket) = prepare_socket(&cfg.socket)?;
    listener.set_nonblocking(true).map_err(|e| Error::io("setting the socket non-blocking", e))?;
    log!(
        "listening on {} (backend {backend}, state in {}, pid {})",
        cfg.socket.display(),
        cfg.state_dir.display(),
        std::process::id()
    );
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [nix::poll::PollFd::new(
            // SAFETY: the listener outlives this poll.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) },
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    if daemon.connections.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                        let mut s = &stream;
                        let _ = s.write_all(&error_line(&refuse(
                            "busy",
                            format!("{MAX_CONNECTIONS} connections are open; try again"),
                        )));
                        continue;
                    }
                    daemon.connections.fetch_add(1, Ordering::SeqCst);
                    let d = Arc::clone(&daemon);
                    let spawned = std::thread::Builder::new().name("vpstag-conn".into()).spawn(move || {
                        d.serve(stream);
                        d.connections.fetch_sub(1, Ordering::SeqCst);
                    });
                    if let Err(e) = spawned {
                        daemon.connections.fetch_sub(1, Ordering::SeqCst);
                        log!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        let due = daemon.store.lines() >= COMPACT_AFTER;
        if due {
            if let Err(e) = daemon.compact() {
                log!("cannot write a snapshot: {e}");
            }
        }
    }
    log!(
        "stopping (the VPSes keep running{})",
        if backend == "ptrace" { "; under ptrace they are killed when the tracer exits" } else { "" }
    );
    if let Err(e) = socket.remove() {
        log!("cannot remove the socket {}: {e}", cfg.socket.display());
    }
    if let Err(e) = daemon.compact() {
        log!("cannot write the final snapshot: {e}");
    }
    if daemon.store_failed.load(Ordering::SeqCst) {
        log!("the journal could not be written at some point; the final snapshot is what counts");
    }
    log!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert!(matches!(
            parse_request(br#"{"v":1,"op":"which","pid":3}"#),
            Ok(Request { op: Op::Which { pid: 3 }, .. })
        ));
        assert_eq!(parse_request(b"garbage").unwrap_err().kind, "bad_request");
        assert_eq!(parse_request(br#"{"op":"list"}"#).unwrap_err().kind, "bad_request");
        assert_eq!(parse_request(br#"{"v":9,"op":"list"}"#).unwrap_err().kind, "unsupported_version");
        assert_eq!(parse_request(br#"{"v":1,"op":"nope"}"#).unwrap_err().kind, "bad_request");
        assert_eq!(parse_request(br#"[1]"#).unwrap_err().kind, "bad_request");
    }

    #[test]
    fn a_success_begins_with_ok_true() {
        assert!(ok_line(json!({"vps": "a"})).starts_with(b"{\"ok\":true"));
        assert!(ok_line(json!({"events": []})).starts_with(b"{\"ok\":true"));
    }

    #[test]
    fn timestamps_look_right() {
        let t = timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
