//! A client for the vpstag daemon (`vpstag daemon`), so that no tool re-implements its protocol.
//!
//! ```no_run
//! use vpstag::client::Client;
//! use vpstag::Pid;
//!
//! let mut c = Client::connect()?;
//! if let Some(name) = c.vps_of(Pid::new(1234).unwrap())? {
//!     println!("1234 belongs to {name}: {:?}", c.members(&name)?);
//! }
//! for ev in Client::connect()?.events(None, true)? {
//!     println!("{:?}", ev?);
//! }
//! # Ok::<(), vpstag::client::ClientError>(())
//! ```
//!
//! The protocol's requests, replies and error kinds are in [`crate::protocol`] (documented in
//! `docs/protocol.md`).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::protocol::{
    CheckInfo, ErrorBody, ErrorKind, EventInfo, Hello, Op, ProcessInfo, Request, VpsInfo, VpsRef, PROTOCOL_VERSION,
};
use crate::{Pid, Signal};

/// Where the daemon listens unless `--socket` or `VPSTAG_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vpstag/vpstag.sock";

/// The socket to use: `VPSTAG_SOCKET` when set, else [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    match std::env::var_os("VPSTAG_SOCKET") {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// What went wrong talking to the daemon. Each message names the fix where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("no vpstag daemon is listening on {}: start it with `vpstag daemon` (or point --socket / VPSTAG_SOCKET at the right socket)", socket.display())]
    NoDaemon {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The socket exists but this user may not connect to it.
    #[error("permission denied connecting to {}: ask root to run the daemon with a socket you can reach (its mode must allow you to write)", socket.display())]
    SocketPermission {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon refused: the VPS belongs to another user, or the operation needs root.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No VPS has that name (or none of yours does).
    #[error("{0}")]
    UnknownVps(String),
    /// A VPS of that name is running.
    #[error("{0}")]
    AlreadyRunning(String),
    /// The daemon turned the connection away: too many are open (this user's share, or all it
    /// serves). Nothing was done; try again once some have closed.
    #[error("the daemon is busy: {0}; try again in a moment")]
    Busy(String),
    /// Any other refusal by the daemon.
    #[error("the daemon refused ({kind}): {message}")]
    Daemon {
        /// The error kind ([`ErrorKind::Other`] for one this library does not know; the message
        /// still says what went wrong).
        kind: ErrorKind,
        /// What it said.
        message: String,
    },
    /// The daemon said something this library does not understand.
    #[error("protocol error: {0} (is the daemon the same version as this client?)")]
    Protocol(String),
    /// The first process or the command could not be started.
    #[error("cannot start {program:?}: {message}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        message: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    fn io(context: impl Into<String>, source: io::Error) -> ClientError {
        ClientError::Io { context: context.into(), source }
    }

    /// The error kind the daemon named, if it was a refusal by the daemon.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::PermissionDenied(_) => Some(ErrorKind::PermissionDenied),
            ClientError::UnknownVps(_) => Some(ErrorKind::UnknownVps),
            ClientError::AlreadyRunning(_) => Some(ErrorKind::AlreadyRunning),
            ClientError::Busy(_) => Some(ErrorKind::Busy),
            ClientError::Daemon { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// `Result` with [`ClientError`].
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    socket: PathBuf,
}

fn connect_error(socket: &Path, e: io::Error) -> ClientError {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR) => {
            ClientError::NoDaemon { socket: socket.to_path_buf() }
        }
        Some(libc::EACCES) | Some(libc::EPERM) => ClientError::SocketPermission { socket: socket.to_path_buf() },
        _ => ClientError::io(format!("connecting to {}", socket.display()), e),
    }
}

fn reply_error(v: &serde_json::Value) -> ClientError {
    match v.get("error").cloned().map(serde_json::from_value::<ErrorBody>) {
        Some(Ok(e)) => match ErrorKind::parse(&e.kind) {
            ErrorKind::PermissionDenied => ClientError::PermissionDenied(e.message),
            ErrorKind::UnknownVps => ClientError::UnknownVps(e.message),
            ErrorKind::AlreadyRunning => ClientError::AlreadyRunning(e.message),
            ErrorKind::Busy => ClientError::Busy(e.message),
            ErrorKind::Other => {
                ClientError::Daemon { kind: ErrorKind::Other, message: format!("{}: {}", e.kind, e.message) }
            }
            kind => ClientError::Daemon { kind, message: e.message },
        },
        _ => ClientError::Protocol(format!("a refusal without an error object: {v}")),
    }
}

/// Parses one reply line: the body of a success, or the refusal.
pub fn parse_reply(line: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line.trim_end())
        .map_err(|e| ClientError::Protocol(format!("a reply that is not JSON ({e}): {line:?}")))?;
    match v.get("ok") {
        Some(serde_json::Value::Bool(true)) => Ok(v),
        Some(serde_json::Value::Bool(false)) => Err(reply_error(&v)),
        _ => Err(ClientError::Protocol(format!("a reply without \"ok\": {line:?}"))),
    }
}

fn field<T: serde::de::DeserializeOwned>(v: &serde_json::Value, name: &str) -> Result<T> {
    let f = v.get(name).cloned().unwrap_or(serde_json::Value::Null);
    serde_json::from_value(f).map_err(|e| ClientError::Protocol(format!("field {name:?} of the reply: {e}")))
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
        Ok(Client { reader: BufReader::new(stream), socket })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid, from the socket's peer credentials.
    pub fn daemon_pid(&self) -> Option<i32> {
        crate::sys::peer_pid(self.reader.get_ref().as_raw_fd())
    }

    /// Sends one request and reads one reply (its body, or the refusal).
    pub fn call(&mut self, op: Op) -> Result<serde_json::Value> {
        match self.send(op) {
            Ok(()) => self.read_reply(),
            Err(ClientError::Io { context, source })
                if matches!(source.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) =>
            {
                Err(self.refusal_before_request().unwrap_or(ClientError::Io { context, source }))
            }
            Err(e) => Err(e),
        }
    }

    /// After a request could not be sent because the daemon had closed the connection: the
    /// refusal it wrote before closing (`busy`, when it turned the connection away), if any.
    fn refusal_before_request(&mut self) -> Option<ClientError> {
        let _ = self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(1)));
        let line = self.read_line().ok().flatten();
        let _ = self.reader.get_ref().set_read_timeout(None);
        parse_reply(&line?).err()
    }

    fn send(&mut self, op: Op) -> Result<()> {
        let mut line = serde_json::to_vec(&Request { v: PROTOCOL_VERSION, op }).expect("a request serialises");
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).map_err(|e| ClientError::io("sending a request to the daemon", e))
    }

    fn read_line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) => Err(ClientError::io("reading the daemon's reply", e)),
        }
    }

    fn read_reply(&mut self) -> Result<serde_json::Value> {
        match self.read_line()? {
            Some(line) => parse_reply(&line),
            None => Err(ClientError::Protocol("the daemon closed the connection without a reply".into())),
        }
    }

    /// Who is there.
    pub fn hello(&mut self) -> Result<Hello> {
        let v = self.call(Op::Hello)?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("hello reply: {e}")))
    }

    /// The name of the VPS `pid` belongs to; `None` when it has no tag.
    pub fn vps_of(&mut self, pid: Pid) -> Result<Option<String>> {
        let v = self.call(Op::Which { pid: pid.as_raw() })?;
        field(&v, "vps")
    }

    /// The live members of VPS `name`.
    pub fn members(&mut self, name: &str) -> Result<Vec<Pid>> {
        let v = self.call(Op::Members { name: name.into() })?;
        let raw: Vec<i32> = field(&v, "pids")?;
        Ok(raw.into_iter().filter_map(Pid::new).collect())
    }

    /// Live tagged processes (of `name`, or of every VPS this user may see).
    pub fn ps(&mut self, name: Option<&str>) -> Result<Vec<ProcessInfo>> {
        let v = self.call(Op::Ps { name: name.map(Into::into) })?;
        field(&v, "processes")
    }

    /// Every VPS this user may see.
    pub fn list(&mut self) -> Result<Vec<VpsInfo>> {
        let v = self.call(Op::List)?;
        field(&v, "vpses")
    }

    /// Sends `sig` to every member of `name` (for SIGKILL: until none is left); how many
    /// processes were signalled.
    pub fn kill(&mut self, name: &str, sig: Signal) -> Result<usize> {
        let v = self.call(Op::Kill { name: name.into(), signal: Some(sig.name().to_string()) })?;
        field(&v, "signalled")
    }

    /// Ends every member of `name` (SIGTERM, SIGKILL after `grace`) and forgets the VPS.
    pub fn stop(&mut self, name: &str, grace: Duration) -> Result<()> {
        self.call(Op::Stop { name: name.into(), grace_ms: Some(grace.as_millis() as u64) }).map(drop)
    }

    /// Compares the daemon's table with the system now.
    pub fn check(&mut self) -> Result<CheckInfo> {
        let v = self.call(Op::Check)?;
        serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("check reply: {e}")))
    }

    /// The recent events (of `name`, or of every VPS this user may see); with `follow`, the
    /// iterator then goes on with every new event until the daemon goes away.
    pub fn events(mut self, name: Option<&str>, follow: bool) -> Result<Events> {
        let v = self.call(Op::Events { name: name.map(Into::into), follow })?;
        let recent: Vec<EventInfo> = field(&v, "events")?;
        Ok(Events { recent: recent.into_iter(), client: follow.then_some(self) })
    }

    /// Registers the calling process as a member of the running VPS `name` and returns once the
    /// daemon follows it (the loader's way in: exec the command next, in this same process).
    /// The process should have no children and no other threads that fork.
    pub fn join(&mut self, name: &str) -> Result<VpsRef> {
        if let Some(pid) = self.daemon_pid() {
            crate::sys::allow_ptracer(pid);
        }
        let v = self.call(Op::Join { name: name.into() })?;
        field(&v, "vps")
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

/// The events of [`Client::events`].
pub struct Events {
    recent: std::vec::IntoIter<EventInfo>,
    client: Option<Client>,
}

impl Iterator for Events {
    type Item = Result<EventInfo>;
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.recent.next() {
            return Some(Ok(e));
        }
        let c = self.client.as_mut()?;
        match c.read_line() {
            Ok(None) => {
                self.client = None;
                None
            }
            Ok(Some(line)) => Some(parse_reply(&line).and_then(|v| field::<EventInfo>(&v, "next"))),
            Err(e) => {
                self.client = None;
                Some(Err(e))
            }
        }
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
        |message: String| ClientError::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), message };
    let plan = crate::init::Plan::new(cmd).map_err(|e| spawn_err(e.to_string()))?;
    let mut line = serde_json::to_vec(&Request {
        v: PROTOCOL_VERSION,
        op: Op::RegisterFirst { name: name.into(), limits: limits.filter(|l| !l.is_empty()).copied() },
    })
    .expect("a request serialises");
    line.push(b'\n');
    let null = std::fs::OpenOptions::new()
        .read(true)
        .open("/dev/null")
        .map_err(|e| ClientError::io("opening /dev/null", e))?;
    let out = match output {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| ClientError::io(format!("opening {}", p.display()), e))?,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| ClientError::io("opening /dev/null", e))?,
    };
    let gate = crate::init::SocketGate::new(socket, line, OwnedFd::from(null), OwnedFd::from(out))
        .map_err(|e| ClientError::io(format!("socket path {}", socket.display()), e))?;
    let (reply_read, reply_write) = pipe().map_err(|e| ClientError::io("creating a pipe", e))?;
    let (err_read, err_write) = pipe().map_err(|e| ClientError::io("creating a pipe", e))?;
    let pid = crate::init::fork_first_process_socket(&plan, &gate, reply_write.as_raw_fd(), err_write.as_raw_fd())
        .map_err(|e| ClientError::io("fork", e))?;
    drop(reply_write);
    drop(err_write);
    drop(gate);
    let reap = || {
        let _ = crate::sys::reap(pid);
    };
    let reply = read_all(reply_read).map_err(|e| ClientError::io("reading the first process's reply", e))?;
    let failure = read_all(err_read).map_err(|e| ClientError::io("waiting for the command to start", e))?;
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
            return Err(spawn_err("the first process ended before registering".into()));
        }
        Some((stage, errno)) => {
            reap();
            if stage == crate::init::stage::CONNECT {
                return Err(connect_error(socket, io::Error::from_raw_os_error(errno)));
            }
            if stage == crate::init::stage::SEND && (errno == libc::EPIPE || errno == libc::ECONNRESET) {
                // The daemon closed the connection before reading anything: it turns away
                // connections beyond its limits that way (its refusal went to the first process).
                return Err(ClientError::Busy(
                    "it closed the first process's connection before reading the registration (too many \
                     connections open?)"
                        .into(),
                ));
            }
            let what = if errno == 0 { "failed".to_string() } else { io::Error::from_raw_os_error(errno).to_string() };
            let e = spawn_err(format!("{}: {what}", stage_name(stage)));
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
pub fn exec_in(socket: &Path, name: &str, program: &OsString, args: &[OsString]) -> ClientError {
    let spawn_err = |message: String| ClientError::Spawn { program: program.to_string_lossy().into_owned(), message };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // Resolve the command first, so "not found" is said before joining anything.
    let plan = match crate::init::Plan::new(&cmd) {
        Ok(p) => p,
        Err(e) => return spawn_err(e.to_string()),
    };
    if let Err(e) = crate::process::become_subreaper() {
        return ClientError::io("becoming the reaper of the command's orphans", e);
    }
    let mut c = match Client::connect_to(socket) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if let Err(e) = c.join(name) {
        return e;
    }
    drop(c);
    let e = crate::init::run_loader_shim(&plan);
    spawn_err(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_refusal_says_so_and_to_retry() {
        let e = parse_reply(r#"{"ok":false,"error":{"kind":"busy","message":"uid 7 has 16 connections open"}}"#)
            .unwrap_err();
        assert!(matches!(e, ClientError::Busy(_)), "{e:?}");
        assert_eq!(e.kind(), Some(ErrorKind::Busy));
        let text = e.to_string();
        assert!(text.contains("busy") && text.contains("uid 7") && text.contains("try again"), "{text}");
    }

    #[test]
    fn a_refusal_written_before_the_daemon_closed_is_read_after_a_failed_send() {
        let (a, b) = UnixStream::pair().unwrap();
        (&b).write_all(b"{\"ok\":false,\"error\":{\"kind\":\"busy\",\"message\":\"full\"}}\n").unwrap();
        drop(b);
        let mut c = Client { reader: BufReader::new(a), socket: PathBuf::from("/nonexistent") };
        let e = c.list().unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Busy), "{e}");
    }
}
