//! The wire: request framing and parsing, success and error lines.

use super::*;

/// A refusal: an error kind and a message (see `docs/protocol.md`).
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) kind: &'static str,
    pub(super) message: String,
}

pub(super) fn refuse(kind: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { kind, message: message.into() }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        let kind = match &e {
            Error::UnknownVps(_) => "unknown_vps",
            Error::AlreadyRunning(_) => "already_running",
            Error::AlreadyMember { .. } => "nested",
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
pub(super) struct Success<T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: T,
}

pub(super) fn ok_line(body: impl Serialize) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Success { ok: true, body }).unwrap_or_else(|_| b"{\"ok\":true}".to_vec());
    v.push(b'\n');
    v
}

pub(super) fn error_line(r: &Refusal) -> Vec<u8> {
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

pub(super) trait PeekNonblocking {
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

pub(super) enum Line {
    Got(Vec<u8>),
    TooLong,
    Eof,
    Failed,
}

/// One line of at most [`MAX_REQUEST`] bytes; a longer one is read to its end and discarded.
pub(super) fn read_line(r: &mut BufReader<UnixStream>) -> Line {
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

pub(super) fn parse_request(line: &[u8]) -> Result<Request, Refusal> {
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
