//! A client for the vpstag daemon (`vpstag daemon`), so that no tool re-implements its protocol.
//!
//! ```no_run
//! use vpstag::client::Client;
//! use vpstag::Pid;
//!
//! let mut c = Client::connect()?;
//! if let Some(vps) = c.vps_of(Pid::new(1234).unwrap())? {
//!     println!("1234 belongs to {} (id {}): {:?}", vps.name, vps.id, c.members(&vps.name)?);
//! }
//! let mut events = Client::connect()?.events(None, true)?;
//! let stopper = events.stopper(); // stopper.stop() from another thread ends the loop
//! for ev in &mut events {
//!     println!("{:?}", ev?);
//! }
//! // Later, on a new connection: what came after, without a gap.
//! if let Some(seq) = events.last_seq() {
//!     for ev in Client::connect()?.events_after(None, seq)? {
//!         println!("{:?}", ev?);
//!     }
//! }
//! # drop(stopper);
//! # Ok::<(), vpstag::Error>(())
//! ```
//!
//! Errors are the crate's [`Error`]: [`Error::NoDaemon`], [`Error::SocketPermission`],
//! [`Error::Refused`] (with the daemon's [`ErrorKind`], also from [`Error::kind`]),
//! [`Error::DaemonTimeout`], [`Error::Protocol`], [`Error::UnknownVps`], [`Error::Spawn`] and
//! [`Error::Io`]. Every question has a timeout ([`DEFAULT_TIMEOUT`], [`Client::set_timeout`]); a
//! connection the daemon closed while idle is reopened once, transparently, for the next
//! question.
//!
//! The protocol's requests, replies and error kinds are in [`crate::protocol`] (documented in
//! `docs/protocol.md`).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{
    CheckInfo, ErrorBody, ErrorKind, EventInfo, EventsReply, Hello, ListReply, NextReply, Op, PidsReply, ProcessInfo,
    PsReply, Request, SignalledReply, VpsInfo, VpsRef, VpsReply, WhichReply, PROTOCOL_VERSION,
};
use crate::{Error, Pid, Result, Signal};

/// How long a question waits for the daemon's answer unless [`Client::set_timeout`] says
/// otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the daemon listens unless `--socket` or `VPSTAG_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vpstag/vpstag.sock";

/// The socket to use: `VPSTAG_SOCKET` when set, else [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    match std::env::var_os("VPSTAG_SOCKET") {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    socket: PathBuf,
    timeout: Option<Duration>,
    /// A question timed out: an answer may still come, so the next question reconnects first.
    stale: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("socket", &self.socket).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

fn connect_error(socket: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR) => {
            Error::NoDaemon { socket: socket.to_path_buf() }
        }
        Some(libc::EACCES) | Some(libc::EPERM) => Error::SocketPermission { socket: socket.to_path_buf() },
        _ => Error::io(format!("connecting to {}", socket.display()), e),
    }
}

fn reply_error(v: &serde_json::Value) -> Error {
    match v.get("error").cloned().map(serde_json::from_value::<ErrorBody>) {
        Some(Ok(e)) => match ErrorKind::parse(&e.kind) {
            ErrorKind::Other => {
                Error::Refused { kind: ErrorKind::Other, message: format!("{}: {}", e.kind, e.message) }
            }
            kind => Error::Refused { kind, message: e.message },
        },
        _ => Error::Protocol(format!("a refusal without an error object: {v}")),
    }
}

/// Parses one reply line: the body of a success, or the refusal ([`Error::Refused`]).
pub fn parse_reply(line: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line.trim_end())
        .map_err(|e| Error::Protocol(format!("a reply that is not JSON ({e}): {line:?}")))?;
    match v.get("ok") {
        Some(serde_json::Value::Bool(true)) => Ok(v),
        Some(serde_json::Value::Bool(false)) => Err(reply_error(&v)),
        _ => Err(Error::Protocol(format!("a reply without \"ok\": {line:?}"))),
    }
}

/// A reply's body as its protocol type.
fn reply<T: serde::de::DeserializeOwned>(v: serde_json::Value, op: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("{op} reply: {e}")))
}

/// `op` as one request line, newline included.
fn request_line(op: Op) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(&Request { v: PROTOCOL_VERSION, op })
        .map_err(|e| Error::Protocol(format!("a request that does not serialise: {e}")))?;
    line.push(b'\n');
    Ok(line)
}

/// A refusal `unknown_vps` about `name` that says no more than that is [`Error::UnknownVps`];
/// one that says more (another user has a VPS of that name) stays a refusal, of the same kind.
fn named(name: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::Refused { kind: ErrorKind::UnknownVps, message }
            if message == Error::UnknownVps(name.to_string()).to_string() =>
        {
            Error::UnknownVps(name.to_string())
        }
        e => e,
    }
}

/// How one exchange went wrong.
enum Failed {
    /// The daemon had closed the connection before reading the request (its idle cut-off): the
    /// request was not served, and may be sent again on a new connection.
    Cut(Error),
    /// Anything else.
    Other(Error),
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn cut(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET))
}

impl Client {
    /// Connects to the daemon at `VPSTAG_SOCKET`, or [`DEFAULT_SOCKET`].
    pub fn connect() -> Result<Client> {
        Client::connect_to(default_socket())
    }

    /// Connects to the daemon at `socket`.
    pub fn connect_to(socket: impl AsRef<Path>) -> Result<Client> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket).map_err(|e| connect_error(&socket, e))?;
        Ok(Client { reader: BufReader::new(stream), socket, timeout: Some(DEFAULT_TIMEOUT), stale: false })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long each question waits for the daemon (sending the request and reading the whole
    /// answer, each read and write at most this long); `None` waits for ever. A daemon that
    /// does not answer in time gives [`Error::DaemonTimeout`]. [`DEFAULT_TIMEOUT`] unless set.
    /// The events of a follow ([`Client::events`]) come when they come: only the first answer
    /// is timed.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout.filter(|t| !t.is_zero());
    }

    /// The timeout of each question ([`Client::set_timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The daemon's pid, from the socket's peer credentials.
    pub fn daemon_pid(&self) -> Option<Pid> {
        crate::sys::peer_pid(self.reader.get_ref().as_raw_fd()).and_then(Pid::new)
    }

    /// Opens a new connection to the same socket in place of this one.
    fn reconnect(&mut self) -> Result<()> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| connect_error(&self.socket, e))?;
        self.reader = BufReader::new(stream);
        self.stale = false;
        Ok(())
    }

    /// Sends one request and reads one reply (its body, or the refusal). When the daemon had
    /// closed this connection while it was idle, reconnects once and asks again.
    pub fn call(&mut self, op: Op) -> Result<serde_json::Value> {
        if self.stale {
            self.reconnect()?;
        }
        match self.exchange(&op) {
            Ok(v) => Ok(v),
            Err(Failed::Other(e)) => Err(e),
            Err(Failed::Cut(e)) => {
                log::debug!("the daemon on {} had closed the connection ({e}); reconnecting", self.socket.display());
                self.reconnect()?;
                match self.exchange(&op) {
                    Ok(v) => Ok(v),
                    Err(Failed::Cut(e) | Failed::Other(e)) => Err(e),
                }
            }
        }
    }

    fn exchange(&mut self, op: &Op) -> std::result::Result<serde_json::Value, Failed> {
        let stream = self.reader.get_ref();
        let set = stream.set_read_timeout(self.timeout).and_then(|()| stream.set_write_timeout(self.timeout));
        set.map_err(|e| Failed::Other(Error::io("setting the connection's timeout", e)))?;
        let line = request_line(op.clone()).map_err(Failed::Other)?;
        if let Err(e) = self.reader.get_mut().write_all(&line) {
            if cut(&e) {
                // The daemon wrote why before closing (`busy`, when it turned the connection
                // away), or closed it idle: then the request was never read.
                return Err(match self.refusal_before_request() {
                    Some(r) => Failed::Other(r),
                    None => Failed::Cut(Error::io("sending a request to the daemon", e)),
                });
            }
            return Err(Failed::Other(self.io_failure("sending a request to the daemon", e)));
        }
        match self.read_line() {
            Ok(Some(line)) => parse_reply(&line).map_err(Failed::Other),
            Ok(None) => Err(Failed::Other(Error::Protocol("the daemon closed the connection without a reply".into()))),
            // Closed with the request unread: cut off while idle, just as it arrived.
            Err(e) if cut(&e) => Err(Failed::Cut(Error::io("reading the daemon's reply", e))),
            Err(e) => Err(Failed::Other(self.io_failure("reading the daemon's reply", e))),
        }
    }

    /// An I/O error of a question: [`Error::DaemonTimeout`] when it timed out (the connection is
    /// then not used again), else [`Error::Io`].
    fn io_failure(&mut self, context: &str, e: io::Error) -> Error {
        match self.timeout {
            Some(after) if timed_out(&e) => {
                self.stale = true;
                log::warn!("the daemon on {} did not answer within {after:?}", self.socket.display());
                Error::DaemonTimeout { socket: self.socket.clone(), after }
            }
            _ => Error::io(context, e),
        }
    }

    /// After a request could not be sent because the daemon had closed the connection: the
    /// refusal it wrote before closing (`busy`, when it turned the connection away), if any.
    fn refusal_before_request(&mut self) -> Option<Error> {
        let _ = self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
        let line = self.read_line().ok().flatten();
        let _ = self.reader.get_ref().set_read_timeout(self.timeout);
        parse_reply(&line?).err()
    }

    fn read_line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line)? {
            0 => Ok(None),
            _ => Ok(Some(line)),
        }
    }

    /// Who is there.
    pub fn hello(&mut self) -> Result<Hello> {
        reply(self.call(Op::Hello)?, "hello")
    }

    /// The VPS `pid` belongs to (its id and name, and its first process); `None` when it has no
    /// tag. A thread id stands for its process.
    pub fn vps_of(&mut self, pid: Pid) -> Result<Option<VpsRef>> {
        let r: WhichReply = reply(self.call(Op::Which { pid })?, "which")?;
        match (r.vps, r.vps_id, r.first) {
            (None, ..) => Ok(None),
            (Some(name), Some(id), Some(first)) => Ok(Some(VpsRef { id, name, first })),
            (Some(_), ..) => Err(Error::Protocol("which reply: a VPS name without its id and first process".into())),
        }
    }

    /// The live members of VPS `name`.
    pub fn members(&mut self, name: &str) -> Result<Vec<Pid>> {
        let r: PidsReply = reply(self.call(Op::Members { name: name.into() }).map_err(named(name))?, "members")?;
        Ok(r.pids)
    }

    /// Live tagged processes (of `name`, or of every VPS this user may see).
    pub fn ps(&mut self, name: Option<&str>) -> Result<Vec<ProcessInfo>> {
        let v = self.call(Op::Ps { name: name.map(Into::into) }).map_err(named(name.unwrap_or_default()))?;
        Ok(reply::<PsReply>(v, "ps")?.processes)
    }

    /// Every VPS this user may see.
    pub fn list(&mut self) -> Result<Vec<VpsInfo>> {
        Ok(reply::<ListReply>(self.call(Op::List)?, "list")?.vpses)
    }

    /// Sends `sig` to every member of `name` (for SIGKILL: until none is left); how many
    /// processes were signalled.
    pub fn kill(&mut self, name: &str, sig: Signal) -> Result<usize> {
        let v = self.call(Op::Kill { name: name.into(), signal: Some(sig.name().to_string()) }).map_err(named(name))?;
        Ok(reply::<SignalledReply>(v, "kill")?.signalled)
    }

    /// Ends every member of `name` (SIGTERM, SIGKILL after `grace`) and forgets the VPS; how many
    /// processes were signalled. The daemon answers once it is done, so this waits `grace` longer
    /// than the timeout ([`Client::set_timeout`]).
    pub fn stop(&mut self, name: &str, grace: Duration) -> Result<usize> {
        let grace_ms = Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let timeout = self.timeout;
        self.timeout = timeout.map(|t| t.saturating_add(grace));
        let r = self.call(Op::Stop { name: name.into(), grace_ms }).map_err(named(name));
        self.timeout = timeout;
        Ok(reply::<SignalledReply>(r?, "stop")?.signalled)
    }

    /// Compares the daemon's table with the system now.
    pub fn check(&mut self) -> Result<CheckInfo> {
        reply(self.call(Op::Check)?, "check")
    }

    /// The recent events (of `name`, or of every VPS this user may see); with `follow`, the
    /// iterator then goes on with every new event until the daemon goes away or
    /// [`Events::stopper`] stops it.
    pub fn events(self, name: Option<&str>, follow: bool) -> Result<Events> {
        self.events_op(name, follow, None)
    }

    /// Resumes a follow: the events (of `name`, or of every VPS this user may see) after
    /// [`EventInfo::seq`] `seq` (e.g. [`Events::last_seq`] of a follow that ended), then every
    /// new one, none twice and none left out. When some of those after `seq` are no longer kept
    /// by the daemon, a `lost` event with reason `expired` comes first, saying how many.
    pub fn events_after(self, name: Option<&str>, seq: u64) -> Result<Events> {
        self.events_op(name, true, Some(seq))
    }

    fn events_op(mut self, name: Option<&str>, follow: bool, after: Option<u64>) -> Result<Events> {
        let v = self
            .call(Op::Events { name: name.map(Into::into), follow, after })
            .map_err(named(name.unwrap_or_default()))?;
        let recent = reply::<EventsReply>(v, "events")?.events;
        let handle = if follow {
            let stream = self.reader.get_ref();
            // Events come when they come.
            stream.set_read_timeout(None).map_err(|e| Error::io("setting the connection's timeout", e))?;
            Some(stream.try_clone().map_err(|e| Error::io("duplicating the connection's descriptor", e))?)
        } else {
            None
        };
        Ok(Events {
            recent: recent.into_iter(),
            client: follow.then_some(self),
            last_seq: after,
            stop: Stopper { inner: Arc::new(StopInner { stopped: AtomicBool::new(false), stream: handle }) },
        })
    }

    /// Registers the calling process as a member of the running VPS `name` and returns once the
    /// daemon follows it (the loader's way in: exec the command next, in this same process).
    /// The process should have no children and no other threads that fork.
    pub fn join(&mut self, name: &str) -> Result<VpsRef> {
        if let Some(pid) = self.daemon_pid() {
            crate::sys::allow_ptracer(pid.as_raw());
        }
        let v = self.call(Op::Join { name: name.into() }).map_err(named(name))?;
        Ok(reply::<VpsReply>(v, "join")?.vps)
    }

    /// Starts VPS `name` running `cmd`: forks the first process with this process's credentials;
    /// the first process connects to the daemon itself, registers, and starts `cmd` only once the
    /// daemon has acknowledged. Returns the first process's pid once `cmd` has been executed.
    ///
    /// The first process starts a new session; its standard input is `/dev/null` and its output
    /// goes to `output` (appended) or `/dev/null`. It is a child of this process: reap it if this
    /// process lives on (or exit, and let it be re-parented).
    pub fn start(&mut self, name: &str, cmd: &Command, output: Option<&Path>) -> Result<Pid> {
        start_first_process(&self.socket, name, cmd, output, None)
    }

    /// [`start`](Client::start) with resource limits: the daemon makes the VPS a cgroup with
    /// `limits` and moves the first process into it before `cmd` runs. A limit the daemon's host
    /// cannot apply is refused ([`ErrorKind::LimitRefused`]) and nothing is started.
    pub fn start_limited(
        &mut self,
        name: &str,
        cmd: &Command,
        output: Option<&Path>,
        limits: &crate::cgroup::Limits,
    ) -> Result<Pid> {
        start_first_process(&self.socket, name, cmd, output, Some(limits))
    }
}

/// The connection's descriptor (to poll it, say); a reconnect replaces it.
impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reader.get_ref().as_fd()
    }
}

/// The events of [`Client::events`] and [`Client::events_after`].
pub struct Events {
    recent: std::vec::IntoIter<EventInfo>,
    client: Option<Client>,
    last_seq: Option<u64>,
    stop: Stopper,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("following", &self.client.is_some())
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// A handle that ends this iterator from another thread: after [`Stopper::stop`], `next`
    /// returns `None` (a `next` blocked waiting for an event returns at once).
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// The [`EventInfo::seq`] of the last event returned (or the `seq` given to
    /// [`Client::events_after`] while none has been): resume from there with
    /// [`Client::events_after`]. `None` while nothing numbered has been seen.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    fn seen(&mut self, e: &EventInfo) {
        if e.seq > 0 {
            self.last_seq = Some(e.seq);
        }
    }
}

impl Iterator for Events {
    type Item = Result<EventInfo>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.stop.stopped() {
            self.client = None;
            return None;
        }
        if let Some(e) = self.recent.next() {
            self.seen(&e);
            return Some(Ok(e));
        }
        let c = self.client.as_mut()?;
        let got = c.read_line();
        if self.stop.stopped() {
            self.client = None;
            return None;
        }
        match got {
            Ok(None) => {
                self.client = None;
                None
            }
            Ok(Some(line)) => {
                // An event line is read straight into its type; anything else (a refusal) through
                // the general reader, which says what it was.
                let e = match serde_json::from_str::<NextReply>(&line) {
                    Ok(r) => Ok(r.next),
                    Err(_) => parse_reply(&line).and_then(|v| reply::<NextReply>(v, "events").map(|r| r.next)),
                };
                if let Ok(e) = &e {
                    self.seen(e);
                }
                Some(e)
            }
            Err(e) => {
                self.client = None;
                Some(Err(Error::io("reading the daemon's events", e)))
            }
        }
    }
}

/// Ends an [`Events`] iterator, from any thread ([`Events::stopper`]); clones stop the same one.
#[derive(Clone)]
pub struct Stopper {
    inner: Arc<StopInner>,
}

struct StopInner {
    stopped: AtomicBool,
    /// The follow's connection (a duplicate of its descriptor), to shut down.
    stream: Option<UnixStream>,
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopper").field("stopped", &self.stopped()).finish()
    }
}

impl Stopper {
    /// Ends the iterator: its next `next` (or the one waiting now) returns `None`, and the
    /// connection is shut down (the daemon forgets the follower). Stopping twice does nothing
    /// more.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        if let Some(s) = &self.inner.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`stop`](Stopper::stop) was called.
    pub fn stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }
}

fn stage_name(stage: i32) -> &'static str {
    use crate::init::stage;
    match stage {
        stage::SUBREAPER => "becoming the reaper of its descendants",
        stage::SOCKET => "creating a socket",
        stage::CONNECT => "connecting to the daemon",
        stage::SEND => "sending its registration",
        stage::RECV => "waiting for the daemon's acknowledgement",
        stage::REFUSED => "registering (refused)",
        stage::FORK => "forking the command",
        stage::EXEC => "executing the command",
        stage::STDIO => "redirecting standard input and output",
        _ => "starting",
    }
}

fn read_all(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::from(fd);
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// See [`Client::start`].
pub fn start_first_process(
    socket: &Path,
    name: &str,
    cmd: &Command,
    output: Option<&Path>,
    limits: Option<&crate::cgroup::Limits>,
) -> Result<Pid> {
    let spawn_err =
        |source: io::Error| Error::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source };
    let plan = crate::init::Plan::new(cmd).map_err(spawn_err)?;
    let line =
        request_line(Op::RegisterFirst { name: name.into(), limits: limits.filter(|l| !l.is_empty()).copied() })?;
    let null =
        std::fs::OpenOptions::new().read(true).open("/dev/null").map_err(|e| Error::io("opening /dev/null", e))?;
    let out = match output {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::io(format!("opening {}", p.display()), e))?,
        None => {
            std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(|e| Error::io("opening /dev/null", e))?
        }
    };
    let gate = crate::init::SocketGate::new(socket, line, OwnedFd::from(null), OwnedFd::from(out))
        .map_err(|e| Error::io(format!("socket path {}", socket.display()), e))?;
    let (reply_read, reply_write) = pipe().map_err(|e| Error::io("creating a pipe", e))?;
    let (err_read, err_write) = pipe().map_err(|e| Error::io("creating a pipe", e))?;
    let pid = crate::init::fork_first_process_socket(&plan, &gate, reply_write.as_raw_fd(), err_write.as_raw_fd())
        .map_err(|e| Error::io("fork", e))?;
    drop(reply_write);
    drop(err_write);
    drop(gate);
    let reap = || {
        let _ = crate::sys::reap(pid);
    };
    let reply = read_all(reply_read).map_err(|e| Error::io("reading the first process's reply", e))?;
    let failure = read_all(err_read).map_err(|e| Error::io("waiting for the command to start", e))?;
    let staged = |failure: &[u8]| -> Option<(i32, i32)> {
        (failure.len() >= 8).then(|| {
            (
                i32::from_ne_bytes(failure[0..4].try_into().unwrap()),
                i32::from_ne_bytes(failure[4..8].try_into().unwrap()),
            )
        })
    };
    if !reply.is_empty() {
        let text = String::from_utf8_lossy(&reply);
        if let Err(e) = parse_reply(&text) {
            reap();
            return Err(e);
        }
    }
    match staged(&failure) {
        None if !reply.is_empty() => {}
        None => {
            reap();
            return Err(spawn_err(io::Error::other("the first process ended before registering")));
        }
        Some((stage, errno)) => {
            reap();
            if stage == crate::init::stage::CONNECT {
                return Err(connect_error(socket, io::Error::from_raw_os_error(errno)));
            }
            if stage == crate::init::stage::SEND && (errno == libc::EPIPE || errno == libc::ECONNRESET) {
                // The daemon closed the connection before reading anything: it turns away
                // connections beyond its limits that way (its refusal went to the first process).
                return Err(Error::Refused {
                    kind: ErrorKind::Busy,
                    message: "it closed the first process's connection before reading the registration (too many \
                              connections open?)"
                        .into(),
                });
            }
            let what = if errno == 0 { "failed".to_string() } else { io::Error::from_raw_os_error(errno).to_string() };
            let e = spawn_err(io::Error::other(format!("{}: {what}", stage_name(stage))));
            if stage == crate::init::stage::FORK || stage == crate::init::stage::EXEC {
                // Registered, but the command never ran: free the name again.
                if let Ok(mut c) = Client::connect_to(socket) {
                    let _ = c.stop(name, Duration::ZERO);
                }
            }
            return Err(e);
        }
    }
    Ok(pid)
}

/// The loader (`vpstag exec`): makes the calling process a child subreaper, joins VPS `name`
/// through the daemon at `socket`, then runs `program` as its child and waits for it, exiting
/// with its status. The calling process stays as the registered root below which the whole
/// command tree lives: orphans and `clone(CLONE_PARENT)` children of the command are re-parented
/// to (or born below) it, so they are tagged under every backend and are found again by a scan
/// after a daemon restart. Signals it receives (HUP, INT, QUIT, TERM, USR1, USR2, WINCH) are
/// passed on to the command.
///
/// Returns only on failure. The calling process must be single-threaded and should have no
/// other children.
pub fn exec_in(socket: &Path, name: &str, program: &OsString, args: &[OsString]) -> Error {
    let spawn_err = |source: io::Error| Error::Spawn { program: program.to_string_lossy().into_owned(), source };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // Resolve the command first, so "not found" is said before joining anything.
    let plan = match crate::init::Plan::new(&cmd) {
        Ok(p) => p,
        Err(e) => return spawn_err(e),
    };
    if let Err(e) = crate::process::become_subreaper() {
        return Error::io("becoming the reaper of the command's orphans", e);
    }
    let mut c = match Client::connect_to(socket) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if let Err(e) = c.join(name) {
        return e;
    }
    drop(c);
    spawn_err(crate::init::run_loader_shim(&plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_refusal_says_so_and_to_retry() {
        let e = parse_reply(r#"{"ok":false,"error":{"kind":"busy","message":"uid 7 has 16 connections open"}}"#)
            .unwrap_err();
        assert!(matches!(e, Error::Refused { kind: ErrorKind::Busy, .. }), "{e:?}");
        assert_eq!(e.kind(), Some(ErrorKind::Busy));
        let text = e.to_string();
        assert!(text.contains("busy") && text.contains("uid 7") && text.contains("try again"), "{text}");
    }

    fn over(stream: UnixStream) -> Client {
        Client {
            reader: BufReader::new(stream),
            socket: PathBuf::from("/x.sock"),
            timeout: Some(DEFAULT_TIMEOUT),
            stale: false,
        }
    }

    #[test]
    fn a_daemon_that_says_nothing_times_out_naming_the_socket_and_the_wait() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = over(a);
        c.set_timeout(Some(Duration::from_millis(200)));
        let t = std::time::Instant::now();
        let e = c.list().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(matches!(e, Error::DaemonTimeout { after, .. } if after == Duration::from_millis(200)), "{e:?}");
        assert!(e.to_string().contains("/x.sock") && e.to_string().contains("200ms"), "{e}");
    }

    #[test]
    fn refusals_keep_their_kind_and_a_plain_unknown_vps_is_the_librarys() {
        let refusal = |kind: &str, msg: &str| {
            parse_reply(&format!(r#"{{"ok":false,"error":{{"kind":"{kind}","message":{msg:?}}}}}"#)).unwrap_err()
        };
        let plain = Error::UnknownVps("web".into()).to_string();
        let e = named("web")(refusal("unknown_vps", &plain));
        assert!(matches!(&e, Error::UnknownVps(n) if n == "web"), "{e:?}");
        assert_eq!(e.kind(), Some(ErrorKind::UnknownVps));
        let hint = "you have no VPS named \"web\"; other users do: say 1000:web";
        let e = named("web")(refusal("unknown_vps", hint));
        assert!(matches!(&e, Error::Refused { kind: ErrorKind::UnknownVps, .. }), "{e:?}");
        assert_eq!(e.to_string(), hint, "the daemon's words, whole");
        let e = refusal("permission_denied", "VPS \"a\" belongs to uid 5");
        assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied));
        assert_eq!(e.to_string(), "permission denied: VPS \"a\" belongs to uid 5");
        let e = refusal("something_new", "what happened");
        assert_eq!(e.kind(), Some(ErrorKind::Other));
        assert_eq!(e.to_string(), "the daemon refused (other): something_new: what happened");
    }

    #[test]
    fn a_refusal_written_before_the_daemon_closed_is_read_after_a_failed_send() {
        let (a, b) = UnixStream::pair().unwrap();
        (&b).write_all(b"{\"ok\":false,\"error\":{\"kind\":\"busy\",\"message\":\"full\"}}\n").unwrap();
        drop(b);
        let mut c = Client {
            reader: BufReader::new(a),
            socket: PathBuf::from("/nonexistent"),
            timeout: Some(DEFAULT_TIMEOUT),
            stale: false,
        };
        let e = c.list().unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Busy), "{e}");
    }
}
