//! Connections: the accept loop, admission (a cap per user and a global cap, with slots kept for
//! root beyond it), and serving one connection within deadlines.
//!
//! Every limit is checked in the accept loop, before a thread is started: a flood of connections
//! costs one `accept`, one `getsockopt` and one short write each, never a thread, and the
//! descriptor is closed at once.

use super::*;

/// At most this many connections of one non-root user are served at once (followers of
/// `events --follow` included); more get a `busy` refusal.
pub const MAX_CONNECTIONS_PER_USER: usize = 16;
/// Connections kept for root beyond [`MAX_CONNECTIONS`]: root is served even when other users
/// hold every other slot.
pub const ROOT_RESERVED_CONNECTIONS: usize = 16;
/// A request line must arrive whole (newline included) within this time of its first byte;
/// otherwise it gets a `too_slow` error and the connection is closed.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A connection with no request under way is closed after this long, unless `--idle-timeout`
/// says otherwise ([`Config::idle_timeout`](super::Config::idle_timeout)).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The client must take a whole reply (or one followed event) within this time; otherwise the
/// connection is closed.
pub(super) const REPLY_DEADLINE: Duration = Duration::from_secs(30);
/// Busy refusals are logged as a summary at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The connection caps, as numbers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Connections of all users but root.
    pub(super) global: usize,
    /// Connections of one non-root user.
    pub(super) per_user: usize,
    /// Connections root may open beyond `global`.
    pub(super) root_reserved: usize,
}

impl Limits {
    /// The daemon's.
    pub(super) const DAEMON: Limits = Limits {
        global: MAX_CONNECTIONS,
        per_user: MAX_CONNECTIONS_PER_USER,
        root_reserved: ROOT_RESERVED_CONNECTIONS,
    };
}

/// Who holds how many connections.
#[derive(Debug, Default)]
pub(super) struct Slots {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

impl Slots {
    /// Takes a slot for `uid`, or says why not (a `busy` refusal).
    pub(super) fn take(&mut self, uid: u32, limits: Limits) -> Result<(), Refusal> {
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if uid == 0 {
            if self.total >= limits.global + limits.root_reserved {
                return Err(refuse(
                    ErrorKind::Busy,
                    format!("{} connections are open, root's reserved ones included", self.total),
                ));
            }
        } else if mine >= limits.per_user {
            return Err(refuse(
                ErrorKind::Busy,
                format!(
                    "uid {uid} has {mine} connections open, the most one user may have (an `events --follow` holds one \
                     for as long as it runs)"
                ),
            ));
        } else if self.total >= limits.global {
            return Err(refuse(
                ErrorKind::Busy,
                format!("{} connections are open, the most the daemon serves for users other than root", self.total),
            ));
        }
        self.total += 1;
        *self.per_uid.entry(uid).or_default() += 1;
        Ok(())
    }

    /// Gives back a slot of `uid`.
    pub(super) fn give_back(&mut self, uid: u32) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }

    /// Connections open.
    pub(super) fn total(&self) -> usize {
        self.total
    }
}

/// A slot held by one connection's thread; given back when dropped (also when the thread panics,
/// or when it could not be started and its closure is dropped).
struct Slot {
    daemon: Arc<Daemon>,
    slots: Arc<Mutex<Slots>>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.give_back(self.uid);
        self.daemon.connections.store(s.total(), Ordering::SeqCst);
    }
}

/// Refusals and accept errors, logged as one summary line at most every [`REFUSAL_LOG_EVERY`], so
/// that a flood cannot flood the log too.
#[derive(Default)]
struct RefusalLog {
    refused: usize,
    by_uid: HashMap<u32, usize>,
    failures: usize,
    last_failure: Option<String>,
    since: Option<Instant>,
}

impl RefusalLog {
    fn refused(&mut self, uid: u32) {
        self.refused += 1;
        *self.by_uid.entry(uid).or_default() += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn failed(&mut self, what: String) {
        self.failures += 1;
        self.last_failure = Some(what);
        self.since.get_or_insert_with(Instant::now);
    }

    fn flush_if_due(&mut self) {
        let Some(since) = self.since else { return };
        if since.elapsed() < REFUSAL_LOG_EVERY {
            return;
        }
        if self.refused > 0 {
            let mut who: Vec<(u32, usize)> = self.by_uid.iter().map(|(u, n)| (*u, *n)).collect();
            who.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let who: Vec<String> = who.iter().take(5).map(|(u, n)| format!("uid {u}: {n}")).collect();
            log!(
                "refused {} connections as busy in the last {}s ({})",
                self.refused,
                since.elapsed().as_secs(),
                who.join(", ")
            );
        }
        if self.failures > 0 {
            log!(
                "{} connections could not be served in the last {}s; the last: {}",
                self.failures,
                since.elapsed().as_secs(),
                self.last_failure.as_deref().unwrap_or("?")
            );
        }
        *self = RefusalLog::default();
    }
}

/// Writes a refusal to a connection that will not be served, without ever blocking, and closes it.
fn turn_away(stream: UnixStream, r: &Refusal) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write(&error_line(r));
}

/// Accepts connections until `stop` is set; each admitted one is served on a thread of its own.
/// Between accepts, writes a new snapshot when the journal has grown long.
pub(super) fn accept_until_stopped(daemon: &Arc<Daemon>, listener: &UnixListener, stop: &AtomicBool) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut refusals = RefusalLog::default();
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(listener), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
        loop {
            match listener.accept() {
                Ok((stream, _)) => admit(daemon, &slots, stream, &mut refusals),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the connection waits in the backlog.
                    refusals.failed(format!("accept: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
        refusals.flush_if_due();
        let due = daemon.store.lines() >= COMPACT_AFTER;
        if due {
            if let Err(e) = daemon.compact() {
                log!("cannot write a snapshot: {e}");
            }
        }
    }
}

/// Serves `stream` on a new thread if its user has a slot left, or turns it away.
fn admit(daemon: &Arc<Daemon>, slots: &Arc<Mutex<Slots>>, stream: UnixStream, refusals: &mut RefusalLog) {
    // Who connected, pinned now (a pidfd, or the start time): a later holder of its pid is never
    // taken for it.
    let who = match vpstag::process::Peer::of(&stream) {
        Ok(w) => w,
        Err(e) => {
            refusals.failed(format!("cannot read a peer's credentials: {e}"));
            turn_away(stream, &refuse(ErrorKind::Failed, format!("cannot read the peer's credentials: {e}")));
            return;
        }
    };
    let peer = Peer { pid: who.pid().as_raw(), uid: who.uid() };
    {
        let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(r) = s.take(peer.uid, Limits::DAEMON) {
            drop(s);
            refusals.refused(peer.uid);
            turn_away(stream, &r);
            return;
        }
        daemon.connections.store(s.total(), Ordering::SeqCst);
    }
    let slot = Slot { daemon: Arc::clone(daemon), slots: Arc::clone(slots), uid: peer.uid };
    let d = Arc::clone(daemon);
    let spawned = std::thread::Builder::new().name("vpstag-conn".into()).spawn(move || {
        let _slot = slot;
        let _ = stream.set_nonblocking(false);
        d.serve(&stream, peer, &who);
    });
    // On failure the closure is dropped: the stream is closed and the slot given back.
    if let Err(e) = spawned {
        refusals.failed(format!("cannot start a connection thread: {e}"));
    }
}

/// Writes all of `buf` within `limit`, however slowly the other end reads.
pub(super) fn write_within(stream: &UnixStream, mut buf: &[u8], limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    let mut w = stream;
    while !buf.is_empty() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the client did not take the reply in time"))?;
        w.set_write_timeout(Some(left))?;
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Daemon {
    /// Serves one connection: requests in order, one reply each, until the client closes it,
    /// stays idle for [`IDLE_TIMEOUT`], takes longer than [`REQUEST_DEADLINE`] over a request
    /// line, or starts following events.
    pub(super) fn serve(self: &Arc<Daemon>, stream: &UnixStream, peer: Peer, who: &vpstag::process::Peer) {
        let mut reader = BufReader::with_capacity(8192, stream);
        let reply = |line: &[u8]| write_within(stream, line, REPLY_DEADLINE).is_ok();
        loop {
            let line = match read_line(&mut reader, self.idle_timeout, REQUEST_DEADLINE) {
                Line::Eof | Line::Failed | Line::Idle => return,
                Line::TooSlow => {
                    let r = refuse(
                        ErrorKind::TooSlow,
                        format!(
                            "a request line must arrive whole within {} s of its first byte; closing",
                            REQUEST_DEADLINE.as_secs()
                        ),
                    );
                    reply(&error_line(&r));
                    return;
                }
                Line::TooLong => {
                    let r = refuse(ErrorKind::TooLong, format!("a request line is at most {MAX_REQUEST} bytes"));
                    if !reply(&error_line(&r)) {
                        return;
                    }
                    continue;
                }
                Line::Got(l) => l,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let req = match parse_request(&line) {
                Ok(req) => req,
                Err(r) => {
                    if !reply(&error_line(&r)) {
                        return;
                    }
                    continue;
                }
            };
            if let Op::Events { name, follow: true, after } = req.op {
                // The replay and the subscription are taken together (no event between them is
                // lost or sent twice); the VPS as the request named it (a bare name is the
                // caller's own, UID:NAME another user's).
                let only = match self.events_of(peer, name) {
                    Ok(o) => o,
                    Err(r) => {
                        reply(&error_line(&r));
                        return;
                    }
                };
                let (events, sub) = self.replay(peer, only.as_ref(), after, true);
                if !reply(&ok_line(EventsReply { events })) {
                    return;
                }
                if let Some(sub) = sub {
                    self.follow(peer, only, sub, stream);
                }
                return;
            }
            let answer = match self.handle(peer, who, req.op) {
                Ok(l) => l,
                Err(r) => error_line(&r),
            };
            if !reply(&answer) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits { global: 4, per_user: 2, root_reserved: 1 };

    #[test]
    fn a_user_at_its_cap_is_busy_and_others_are_still_served() {
        let mut s = Slots::default();
        assert!(s.take(1000, SMALL).is_ok());
        assert!(s.take(1000, SMALL).is_ok());
        let r = s.take(1000, SMALL).unwrap_err();
        assert_eq!(r.kind, ErrorKind::Busy);
        assert!(r.message.contains("uid 1000 has 2 connections"), "{}", r.message);
        assert!(s.take(1001, SMALL).is_ok());
        assert_eq!(s.total(), 3);
        s.give_back(1000);
        assert!(s.take(1000, SMALL).is_ok(), "a slot given back can be taken again");
    }

    #[test]
    fn root_has_slots_beyond_the_global_cap_and_no_one_else_does() {
        let mut s = Slots::default();
        for uid in [1, 1, 2, 2] {
            assert!(s.take(uid, SMALL).is_ok());
        }
        let r = s.take(3, SMALL).unwrap_err();
        assert_eq!(r.kind, ErrorKind::Busy);
        assert!(r.message.contains("users other than root"), "{}", r.message);
        assert!(s.take(0, SMALL).is_ok(), "root is served beyond the global cap");
        assert_eq!(s.take(0, SMALL).unwrap_err().kind, ErrorKind::Busy, "but not beyond its reserve");
        s.give_back(0);
        s.give_back(1);
        assert!(s.take(3, SMALL).is_ok());
    }

    #[test]
    fn giving_back_more_than_was_taken_does_not_underflow() {
        let mut s = Slots::default();
        s.give_back(7);
        assert_eq!(s.total(), 0);
        assert!(s.per_uid.is_empty());
    }

    #[test]
    fn a_reply_to_a_client_that_never_reads_gives_up_at_the_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![b'x'; 8 << 20];
        let t = Instant::now();
        let e = write_within(&a, &big, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
