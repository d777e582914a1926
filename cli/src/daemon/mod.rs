//! The vpstag daemon: one long-running manager holding the mapping table for the whole host,
//! serving every other tool over a Unix socket (`vpstag daemon`; the protocol is in
//! `docs/protocol.md`, the client in [`vpstag::client`]).
//!
//! - Every request is authorised with the peer's `SO_PEERCRED`: root may do everything; another
//!   user sees and acts only on the VPSes it started, and may `join` only those.
//! - A VPS's processes never run with the daemon's privileges: the client forks the first
//!   process with its own credentials; that process connects and registers itself, and the daemon
//!   takes its pid and uid from `SO_PEERCRED`, never from the request.
//! - State survives a crash: see [`store`].
//! - One thread per connection: at most [`MAX_CONNECTIONS_PER_USER`](server::MAX_CONNECTIONS_PER_USER) per non-root user and
//!   [`MAX_CONNECTIONS`] in all, with [`ROOT_RESERVED_CONNECTIONS`](server::ROOT_RESERVED_CONNECTIONS) more for root, checked before a
//!   thread is started; more get a `busy` refusal. A request line is at most
//!   [`MAX_REQUEST`] bytes and must arrive within [`REQUEST_DEADLINE`](server::REQUEST_DEADLINE)
//!   of its first byte; an idle connection is closed after [`IDLE_TIMEOUT`](server::IDLE_TIMEOUT). A malformed request
//!   gets an error reply.
//! - Memory for events is bounded in bytes: command lines are cut to [`MAX_EVENT_CMD`](feed::MAX_EVENT_CMD) bytes.
//! - With `--metrics ADDR:PORT`, Prometheus metrics are served at `/metrics` from a thread of
//!   their own, with their own bounds: see [`metrics`].

mod paths;
mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

use store::{OwnedVps, Record, Store};
use vpstag::protocol::{
    ErrorKind, EventInfo, EventsReply, Hello, ListReply, NextReply, Op, PidsReply, ProcessInfo, PsReply, Request,
    SignalledReply, VpsInfo, VpsRef, VpsReply, WhichReply, MAX_REQUEST, PROTOCOL_VERSION,
};
use vpstag::{BackendChoice, Error, Manager, Pid, SavedVps, Signal, Vps};

/// At most this many connections of users other than root are served at once; more get a `busy`
/// error (root has [`ROOT_RESERVED_CONNECTIONS`] more).
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
    /// Serve Prometheus metrics over HTTP at `/metrics` on this address (see [`metrics`]).
    pub metrics: Option<std::net::SocketAddr>,
    /// Which VPSes get a cgroup v2 of their own, and where.
    pub cgroups: Cgroups,
    /// A connection with no request under way is closed after this long
    /// ([`IDLE_TIMEOUT`](server::IDLE_TIMEOUT) by default).
    pub idle_timeout: Duration,
}

/// Where the daemon makes each VPS's cgroup (`--cgroup-root`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cgroups {
    /// Only a VPS started with limits gets a cgroup, below `vpstag/` in the daemon's own cgroup
    /// ([`vpstag::cgroup::CgroupRoot::find`]). The default: the daemon changes nothing in the
    /// host's cgroup tree unless asked.
    #[default]
    WhenLimited,
    /// Every VPS gets a cgroup below `vpstag/` in the daemon's own cgroup (`--cgroup-root auto`).
    Auto,
    /// Every VPS gets a cgroup below this delegated directory (`--cgroup-root PATH`).
    Root(PathBuf),
    /// No cgroups; limits are refused (`--cgroup-root none`).
    Off,
}

/// Writes one log line with a UTC timestamp to standard error.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("{} vpstag[{}]: {}", timestamp(), std::process::id(), format_args!($($arg)*))
    };
}

mod feed;
mod handlers;
pub(crate) mod metrics;
mod peer;
mod server;
mod wire;

use peer::*;
use server::write_within;
pub(crate) use server::IDLE_TIMEOUT;
use wire::*;

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
    /// Members kept as roots because their parent exited (see [`vpstag::JournalEntry::Root`]).
    orphans: Arc<Mutex<HashSet<vpstag::ProcessId>>>,
    /// Store errors seen in the change callback (which cannot return them).
    store_failed: Arc<AtomicBool>,
    meta: Mutex<HashMap<u64, VpsMeta>>,
    recent: Mutex<feed::Recent>,
    followers: Mutex<Vec<feed::Follower>>,
    stop: Arc<AtomicBool>,
    /// Connections open (kept by the accept loop).
    connections: AtomicUsize,
    backend: String,
    /// This process's id (`hello`).
    pid: Pid,
    /// [`Config::idle_timeout`].
    idle_timeout: Duration,
    /// The counters of `--metrics` (none without it: nothing is counted).
    metrics: Option<Arc<metrics::Metrics>>,
    /// `--cgroup-root none`: limits are refused.
    no_cgroups: bool,
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
    // First, so that a port in use stops the daemon before it does anything.
    let endpoint = cfg.metrics.map(metrics::Endpoint::bind).transpose()?;
    let (store, loaded) = Store::open(&cfg.state_dir, cfg.discard_bad_journal)
        .map_err(|e| Error::io(format!("opening the state directory {}", cfg.state_dir.display()), e))?;
    for note in &loaded.notes {
        log!("{note}");
    }
    let (tracker, notes) = vpstag::open_backend_with_notes(cfg.backend)?;
    for n in &notes {
        log!("{n}");
    }
    let backend = tracker.kind().name().to_string();
    let mgr = Manager::new(tracker)?;
    let root = match &cfg.cgroups {
        Cgroups::WhenLimited | Cgroups::Off => None,
        Cgroups::Auto => Some(vpstag::cgroup::CgroupRoot::find()?),
        Cgroups::Root(dir) => Some(vpstag::cgroup::CgroupRoot::at(dir)?),
    };
    if let Some(root) = root {
        log!("each VPS gets a cgroup below {}", root.path().display());
        mgr.use_cgroups(root);
    }
    let store = Arc::new(store);
    let store_failed = Arc::new(AtomicBool::new(false));
    // The manager is the one writer of what a restart needs: it hands each change (a VPS, a root,
    // a VPS forgotten) to the journal hook under its lock, which queues it in that order; a
    // thread makes the queue durable, and a request that changed something waits for that
    // (`Daemon::durable`) before it answers. Members whose parent exited while they live on
    // are roots too (a scan from the other roots may no longer reach them).
    let orphans: Arc<Mutex<HashSet<vpstag::ProcessId>>> = Arc::new(Mutex::new(
        loaded
            .roots()
            .iter()
            .filter(|m| !matches!(m.source, vpstag::Source::First | vpstag::Source::Loader))
            .map(|m| vpstag::ProcessId { pid: m.pid, start: m.start })
            .collect(),
    ));
    {
        let (tx, rx) = mpsc::channel::<u64>();
        let queue = Arc::clone(&store);
        let failed = Arc::clone(&store_failed);
        let orphans = Arc::clone(&orphans);
        mgr.on_journal(move |entries| {
            let records: Vec<Record> = entries.iter().filter_map(store::record_of).collect();
            let mut o = orphans.lock().unwrap_or_else(|e| e.into_inner());
            for e in entries {
                if let vpstag::JournalEntry::Root(m) = e {
                    if m.source == vpstag::Source::Event {
                        o.insert(vpstag::ProcessId { pid: m.pid, start: m.start });
                    }
                }
            }
            drop(o);
            match queue.enqueue(&records) {
                Ok(ticket) => {
                    let _ = tx.send(ticket);
                }
                Err(e) => {
                    if !failed.swap(true, Ordering::SeqCst) {
                        log!("cannot write the journal in {}: {e}", queue.dir().display());
                    }
                }
            }
        });
        let store = Arc::clone(&store);
        let failed = Arc::clone(&store_failed);
        std::thread::Builder::new()
            .name("vpstag-journal".into())
            .spawn(move || {
                while let Ok(ticket) = rx.recv() {
                    if let Err(e) = store.wait_durable(ticket) {
                        if !failed.swap(true, Ordering::SeqCst) {
                            log!("cannot write the journal in {}: {e}", store.dir().display());
                        }
                    }
                }
            })
            .map_err(|e| Error::io("starting the journal thread", e))?;
    }
    // The manager knows each VPS by its key, `uid:name` (names are per owner); a journal from
    // before that has bare names.
    let vpses: Vec<SavedVps> = loaded
        .vpses
        .values()
        .map(|o| {
            let mut v = o.vps.clone();
            if !v.name.contains(':') {
                v.name = handlers::key(o.owner, &v.name);
            }
            v
        })
        .collect();
    let members: Vec<vpstag::SavedMember> = loaded.roots();
    let restored = mgr.restore(&vpses, &members)?;
    mgr.recheck_first_processes()?;
    let mut meta = HashMap::new();
    for o in loaded.vpses.values() {
        let name = o.vps.name.split_once(':').map_or(o.vps.name.as_str(), |(_, n)| n);
        meta.insert(o.vps.id.0, VpsMeta { name: name.to_string(), owner: o.owner });
    }
    let daemon = Arc::new(Daemon {
        mgr,
        store,
        store_failed,
        orphans,
        meta: Mutex::new(meta),
        recent: Mutex::new(feed::Recent::new(feed::Recent::first_seq_now())),
        followers: Mutex::new(Vec::new()),
        stop: Arc::clone(&stop),
        connections: AtomicUsize::new(0),
        backend: backend.clone(),
        pid: Pid::new(std::process::id() as i32)
            .ok_or_else(|| Error::io("reading the daemon's process id", io::Error::other("not a process id")))?,
        idle_timeout: cfg.idle_timeout,
        metrics: endpoint.as_ref().map(|_| Arc::default()),
        no_cgroups: cfg.cgroups == Cgroups::Off,
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
    let rx = daemon.mgr.subscribe_batches();
    {
        let d = Arc::clone(&daemon);
        std::thread::Builder::new()
            .name("vpstag-events".into())
            .spawn(move || d.record_events(rx))
            .map_err(|e| Error::io("starting the event thread", e))?;
    }
    let (listener, socket) = prepare_socket(&cfg.socket)?;
    listener.set_nonblocking(true).map_err(|e| Error::io("setting the socket non-blocking", e))?;
    let metrics_thread = match endpoint {
        Some(ep) => {
            let addr = ep.addr();
            let t = ep.serve(Arc::clone(&daemon))?;
            log!(
                "serving metrics on http://{addr}/metrics{}",
                if addr.ip().is_loopback() {
                    ""
                } else {
                    " (not loopback: every VPS's name, owner and figures are visible to whoever can connect)"
                }
            );
            Some(t)
        }
        None => None,
    };
    log!(
        "listening on {} (backend {backend}, state in {}, pid {})",
        cfg.socket.display(),
        cfg.state_dir.display(),
        std::process::id()
    );
    server::accept_until_stopped(&daemon, &listener, &stop);
    if let Some(t) = metrics_thread {
        // It looks at the stop flag every few hundred milliseconds.
        let _ = t.join();
    }
    log!(
        "stopping (the VPSes keep running{})",
        if backend == "ptrace" { "; under ptrace they run on untraced until the daemon is back" } else { "" }
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
    use serde_json::json;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        assert!(matches!(
            parse_request(br#"{"v":1,"op":"which","pid":3}"#),
            Ok(Request { op: Op::Which { pid }, .. }) if pid.as_raw() == 3
        ));
        assert_eq!(parse_request(b"garbage").unwrap_err().kind, ErrorKind::BadRequest);
        assert_eq!(parse_request(br#"{"v":1,"op":"which","pid":0}"#).unwrap_err().kind, ErrorKind::BadRequest);
        assert_eq!(parse_request(br#"{"op":"list"}"#).unwrap_err().kind, ErrorKind::BadRequest);
        assert_eq!(parse_request(br#"{"v":9,"op":"list"}"#).unwrap_err().kind, ErrorKind::UnsupportedVersion);
        assert_eq!(parse_request(br#"{"v":1,"op":"nope"}"#).unwrap_err().kind, ErrorKind::BadRequest);
        assert_eq!(parse_request(br#"[1]"#).unwrap_err().kind, ErrorKind::BadRequest);
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
