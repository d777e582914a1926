//! The wire: request framing and parsing, success and error lines.

use super::*;

/// A refusal: an error kind and a message (see `docs/protocol.md`).
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) kind: ErrorKind,
    pub(super) message: String,
}

pub(super) fn refuse(kind: ErrorKind, message: impl Into<String>) -> Refusal {
    Refusal { kind, message: message.into() }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        let kind = e.kind().unwrap_or(ErrorKind::Failed);
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
    let mut v =
        serde_json::to_vec(&Failure { ok: false, error: ErrorBody { kind: r.kind.as_str(), message: &r.message } })
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
        use rustix::net::{recv, RecvFlags};
        recv(self, buf, RecvFlags::PEEK | RecvFlags::DONTWAIT).ok().map(|(n, _)| n)
    }
}

pub(super) enum Line {
    Got(Vec<u8>),
    TooLong,
    /// The line did not arrive whole within its deadline.
    TooSlow,
    /// No line began within the idle timeout.
    Idle,
    Eof,
    Failed,
}

/// One line of at most [`MAX_REQUEST`] bytes; a longer one is read to its end and discarded.
///
/// Waits at most `idle` for the line's first byte, then at most `whole` from that first byte for
/// the line to end (newline included; a line being discarded as too long too).
pub(super) fn read_line(r: &mut BufReader<&UnixStream>, idle: Duration, whole: Duration) -> Line {
    let mut line = Vec::new();
    let mut too_long = false;
    let mut deadline: Option<Instant> = None;
    loop {
        if r.buffer().is_empty() {
            let wait = match deadline {
                None => idle,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(w) if !w.is_zero() => w,
                    _ => return Line::TooSlow,
                },
            };
            if r.get_ref().set_read_timeout(Some(wait)).is_err() {
                return Line::Failed;
            }
        }
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return if deadline.is_some() { Line::TooSlow } else { Line::Idle };
            }
            Err(_) => return Line::Failed,
        };
        if buf.is_empty() {
            return if too_long { Line::TooLong } else { Line::Eof };
        }
        deadline.get_or_insert_with(|| Instant::now() + whole);
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
        serde_json::from_slice(line).map_err(|e| refuse(ErrorKind::BadRequest, format!("not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(refuse(ErrorKind::BadRequest, "a request is one JSON object a line"));
    }
    match v.get("v").and_then(Value::as_u64) {
        Some(n) if n == u64::from(PROTOCOL_VERSION) => {}
        Some(n) => {
            return Err(refuse(
                ErrorKind::UnsupportedVersion,
                format!("protocol version {n} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
            ))
        }
        None => {
            return Err(refuse(
                ErrorKind::BadRequest,
                format!("missing \"v\" (the protocol version, {PROTOCOL_VERSION})"),
            ))
        }
    }
    serde_json::from_value(v).map_err(|e| refuse(ErrorKind::BadRequest, format!("bad request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(s: &UnixStream) -> BufReader<&UnixStream> {
        BufReader::new(s)
    }

    #[test]
    fn lines_are_read_one_at_a_time() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"one\ntwo\n").unwrap();
        let mut r = reader(&a);
        let s = Duration::from_secs(5);
        assert!(matches!(read_line(&mut r, s, s), Line::Got(l) if l == b"one\n"));
        assert!(matches!(read_line(&mut r, s, s), Line::Got(l) if l == b"two\n"));
        drop(b);
        assert!(matches!(read_line(&mut r, s, s), Line::Eof));
    }

    #[test]
    fn a_line_that_trickles_in_is_too_slow_and_an_idle_connection_is_idle() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = reader(&a);
        let t = Instant::now();
        assert!(matches!(read_line(&mut r, Duration::from_millis(200), Duration::from_secs(60)), Line::Idle));
        assert!(t.elapsed() >= Duration::from_millis(190), "{:?}", t.elapsed());
        let dripper = std::thread::spawn(move || {
            for _ in 0..20 {
                if b.write_all(b"{").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let got = read_line(&mut r, Duration::from_secs(60), Duration::from_millis(300));
        assert!(matches!(got, Line::TooSlow), "bytes kept coming, yet the line had to end within 300 ms");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        dripper.join().unwrap();
    }

    #[test]
    fn an_oversized_line_is_discarded_and_the_next_one_read() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            b.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
            b.write_all(b"\nok\n").unwrap();
        });
        let mut r = reader(&a);
        let s = Duration::from_secs(5);
        assert!(matches!(read_line(&mut r, s, s), Line::TooLong));
        assert!(matches!(read_line(&mut r, s, s), Line::Got(l) if l == b"ok\n"));
        w.join().unwrap();
    }
}
