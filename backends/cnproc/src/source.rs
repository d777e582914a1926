//! The system calls: the netlink socket, the subscription, and batched reading.
//!
//! Linux only (`lib.rs` compiles it there only). The one file of this crate with `unsafe`: each
//! block says why it is sound.
//!
//! The socket is driven with `libc` directly rather than `netlink-sys`'s `Socket`. The proc
//! connector needs only a handful of calls (`socket`, `bind`, `setsockopt`, `sendto`,
//! `recvfrom`, `poll`), and two of them are outside what `netlink-sys` wraps anyway
//! (`SO_RCVBUFFORCE`, and `recvfrom` with `MSG_TRUNC` to detect a truncated datagram), so we would
//! still need `libc` next to it. Using `libc` alone keeps one dependency (already in the tree),
//! keeps every unsafe call visible in this one file with its safety argument, and owns the
//! descriptor through std's `OwnedFd`.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vpstag_tracker::{Event, EventKind, LossReason, TrackerError};

use crate::decode::{
    decode_datagram, encode_mcast_request, kernel_has_event_filter, BootOffset, ClockReading, DecodeError, SeqTracker,
    CN_IDX_PROC, PROC_CN_MCAST_IGNORE, PROC_CN_MCAST_LISTEN, TRACKED_EVENTS,
};
use crate::{Config, Stats};

/// Receive buffer for one datagram. The kernel sends one 76-byte message per datagram; anything
/// larger than this is reported as truncated.
const DATAGRAM_BUFFER: usize = 16 * 1024;

/// Datagrams read by one `recvmmsg` call: a burst of events costs one system call per this many
/// instead of one each.
const SLOTS: usize = 64;
/// Bytes per datagram slot. A proc connector datagram holds one event (about a hundred bytes); a
/// longer one is reported as truncated (and as a possible loss), never misread.
const SLOT_BYTES: usize = DATAGRAM_BUFFER / 4;

/// How long [`Connection::open`] waits for the kernel to acknowledge the subscription. The kernel
/// answers synchronously, inside our `sendto`, so the ack is normally already queued.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

const LISTEN_WHAT: &str = "listening to the proc connector";
const LISTEN_HINT: &str =
    "this kernel lets only CAP_NET_ADMIN listen to the proc connector; run as root or use --backend ptrace";

/// An open, subscribed proc connector socket and the decoding state.
pub(crate) struct Connection {
    fd: OwnedFd,
    port: u32,
    buf: Vec<u8>,
    seq: SeqTracker,
    /// Turns the kernel's time stamps into boot-clock ones, by one steady offset.
    boot_offset: BootOffset,
    /// Events decoded while waiting for the subscription's ack, returned by the next read.
    pending: Vec<Event>,
    stats: Stats,
    receive_buffer: usize,
    filter_active: bool,
    /// Whether the kernel counts us as a listener, so that Drop must send IGNORE.
    listening: bool,
    /// Upper bound of datagrams read in one batch (far more than the buffer can queue), so that a
    /// fork storm cannot keep one `read_events` call busy forever.
    max_batch: usize,
    next_seq: u32,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// The error for a refused `bind` (or a refused subscription).
pub(crate) fn listen_error(e: io::Error) -> TrackerError {
    if is_permission(&e) {
        TrackerError::PermissionDenied { what: LISTEN_WHAT.into(), hint: LISTEN_HINT.into(), source: e }
    } else {
        TrackerError::io("binding to the proc connector multicast group", e)
    }
}

fn sockaddr_nl(groups: u32) -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_pid = 0;
    sa.nl_groups = groups;
    sa
}

/// One reading of `CLOCK_MONOTONIC`, `CLOCK_BOOTTIME`, `CLOCK_MONOTONIC` (see [`BootOffset`]).
fn read_clocks() -> Option<ClockReading> {
    fn now(clock: libc::clockid_t) -> Option<u64> {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        if r != 0 {
            return None;
        }
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nsecs = u64::try_from(ts.tv_nsec).ok()?;
        secs.checked_mul(1_000_000_000)?.checked_add(nsecs)
    }
    let mono_before = now(libc::CLOCK_MONOTONIC)?;
    let boot = now(libc::CLOCK_BOOTTIME)?;
    let mono_after = now(libc::CLOCK_MONOTONIC)?;
    Some(ClockReading { mono_before, boot, mono_after })
}

/// The running kernel's release string (`uname -r`).
pub(crate) fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8(bytes).ok()
}

impl Connection {
    /// Opens the socket, sizes its buffer, subscribes and confirms the subscription.
    pub(crate) fn open(config: &Config) -> Result<Connection, TrackerError> {
        // SAFETY: plain syscall with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            let e = last_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => TrackerError::Unsupported(
                    "this kernel has no netlink connector (CONFIG_CONNECTOR, CONFIG_PROC_EVENTS); use --backend ptrace"
                        .into(),
                ),
                _ if is_permission(&e) => TrackerError::PermissionDenied {
                    what: "creating a netlink connector socket".into(),
                    hint: "a security policy (seccomp, LSM) forbids netlink sockets; use --backend ptrace".into(),
                    source: e,
                },
                _ => TrackerError::io("creating a netlink connector socket", e),
            });
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let sa = sockaddr_nl(CN_IDX_PROC);
        // SAFETY: `sa` is a valid sockaddr_nl and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(listen_error(last_error()));
        }

        // Connect to the kernel's port: the kernel then refuses (ECONNREFUSED) unicasts from any
        // other socket to ours, so nobody can flood our buffer with forged datagrams. Multicasts
        // from the kernel still arrive. The decoder checks the sender anyway.
        let kernel = sockaddr_nl(0);
        // SAFETY: `kernel` is a valid sockaddr_nl and the length passed is its size.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&kernel as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(TrackerError::io("connecting to the kernel's netlink port", last_error()));
        }

        let receive_buffer = set_receive_buffer(fd.as_fd(), config.receive_buffer)
            .map_err(|e| TrackerError::io("sizing the proc connector receive buffer", e))?;
        let port = local_port(fd.as_fd()).map_err(|e| TrackerError::io("reading the netlink port id", e))?;

        let mut conn = Connection {
            fd,
            port,
            buf: vec![0; SLOTS * SLOT_BYTES],
            seq: SeqTracker::new(),
            boot_offset: BootOffset::new(),
            pending: Vec::new(),
            stats: Stats::default(),
            receive_buffer,
            filter_active: false,
            listening: false,
            max_batch: (receive_buffer / 256).max(4096),
            next_seq: 0,
        };
        conn.subscribe()?;
        if config.kernel_filter && kernel_release().is_some_and(|r| kernel_has_event_filter(&r)) {
            // Linux 6.6+ reads the 8-byte form as "only these event types"; older kernels would
            // silently ignore it, hence the version check. Filtered-out events still take
            // sequence numbers, so gaps stop meaning loss.
            conn.send_request(PROC_CN_MCAST_LISTEN, Some(TRACKED_EVENTS), 0)
                .map_err(|e| TrackerError::io("setting the proc connector event filter", e))?;
            conn.seq.set_enabled(false);
            conn.filter_active = true;
        }
        Ok(conn)
    }

    /// Sends LISTEN (the 4-byte form every kernel accepts) and waits for the kernel's ack, which
    /// it sends to every listener with our `ack` cookie plus one. No ack means the kernel ignored
    /// us: it does so for requests from outside the initial user and PID namespaces.
    fn subscribe(&mut self) -> Result<(), TrackerError> {
        let cookie = self.port ^ (self.boot_offset.get(read_clocks) as u32).rotate_left(16) ^ 0x5650_5354;
        if let Err(e) = self.send_request(PROC_CN_MCAST_LISTEN, None, cookie) {
            return Err(match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => TrackerError::Unsupported(
                    "the proc connector is reachable only from the initial network namespace; use --backend ptrace"
                        .into(),
                ),
                _ if is_permission(&e) => listen_error(e),
                _ => TrackerError::io("subscribing to the proc connector", e),
            });
        }
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut pending = mem::take(&mut self.pending);
        let overflows_before = self.stats.overflows;
        let result = loop {
            let acks = match self.drain(&mut pending) {
                Ok(acks) => acks,
                Err(e) => break Err(e),
            };
            if let Some(err) = acks.iter().find(|a| a.cn_ack == cookie.wrapping_add(1)).map(|a| a.err) {
                break match err {
                    0 => {
                        self.listening = true;
                        Ok(())
                    }
                    err => {
                        let e = io::Error::from_raw_os_error(err as i32);
                        Err(if is_permission(&e) { listen_error(e) } else { TrackerError::io(LISTEN_WHAT, e) })
                    }
                };
            }
            if self.stats.overflows != overflows_before {
                // The ack may have been dropped with the overflow: assume the subscription took.
                self.listening = true;
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(TrackerError::Unsupported(
                    "the kernel did not acknowledge the proc connector subscription: it ignores listeners \
                     outside the initial user and PID namespaces (containers), or lacks CONFIG_PROC_EVENTS; \
                     use --backend ptrace"
                        .into(),
                ));
            }
            if let Err(e) = poll_readable(self.fd.as_fd(), Some(left)) {
                break Err(TrackerError::io("waiting for the proc connector", e));
            }
        };
        self.pending = pending;
        result
    }

    fn send_request(&mut self, op: u32, filter: Option<u32>, ack: u32) -> io::Result<()> {
        let msg = encode_mcast_request(op, filter, self.next_seq, ack, self.port);
        self.next_seq = self.next_seq.wrapping_add(1);
        let to = sockaddr_nl(0);
        loop {
            // SAFETY: `msg` and `to` are valid for the given lengths during the call.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast::<libc::c_void>(),
                    msg.len(),
                    0,
                    (&to as *const libc::sockaddr_nl).cast::<libc::sockaddr>(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = last_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    pub(crate) fn receive_buffer(&self) -> usize {
        self.receive_buffer
    }

    pub(crate) fn filter_active(&self) -> bool {
        self.filter_active
    }

    /// See [`ForkTracker::read_events`](vpstag_tracker::ForkTracker::read_events).
    pub(crate) fn read_events(
        &mut self,
        out: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<usize, TrackerError> {
        let start = out.len();
        if !self.pending.is_empty() {
            out.append(&mut self.pending);
            self.drain(out)?;
            return Ok(out.len() - start);
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if timeout != Some(Duration::ZERO) {
                let wait = match (timeout, deadline) {
                    (None, _) | (Some(_), None) => None,
                    (Some(_), Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                };
                let ready = poll_readable(self.fd.as_fd(), wait)
                    .map_err(|e| TrackerError::io("waiting for the proc connector", e))?;
                if !ready {
                    return Ok(out.len() - start);
                }
            }
            self.drain(out)?;
            let expired = match (timeout, deadline) {
                (None, _) | (Some(_), None) => false,
                (Some(t), Some(d)) => t.is_zero() || Instant::now() >= d,
            };
            // Readable but nothing for us (acks, events we don't use): wait again unless time is up.
            if out.len() > start || expired {
                return Ok(out.len() - start);
            }
        }
    }

    /// Reads every queued datagram (until `EAGAIN`, or `max_batch`), appending events to `out`,
    /// up to [`SLOTS`] datagrams a system call (`recvmmsg`). Returns the acks seen.
    fn drain(&mut self, out: &mut Vec<Event>) -> Result<Vec<crate::decode::Ack>, TrackerError> {
        let offset = self.boot_offset.get(read_clocks);
        let mut acks = Vec::new();
        let mut read = 0;
        while read < self.max_batch {
            let mut names = [sockaddr_nl(0); SLOTS];
            // SAFETY: iovec and mmsghdr are plain C structs; all zeroes is a valid value of each.
            let mut iov: [libc::iovec; SLOTS] = unsafe { mem::zeroed() };
            // SAFETY: as above.
            let mut hdrs: [libc::mmsghdr; SLOTS] = unsafe { mem::zeroed() };
            let base = self.buf.as_mut_ptr();
            for (i, (v, h)) in iov.iter_mut().zip(hdrs.iter_mut()).enumerate() {
                // SAFETY: slot i lies inside `buf` (SLOTS * SLOT_BYTES long).
                v.iov_base = unsafe { base.add(i * SLOT_BYTES) }.cast::<libc::c_void>();
                v.iov_len = SLOT_BYTES;
                h.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_nl).cast::<libc::c_void>();
                h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
            }
            // MSG_TRUNC: netlink then reports each datagram's real length, so truncation shows.
            // SAFETY: every header points at a writable name and one iovec into `buf`, all alive
            // for the call; the count matches the array.
            let n = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    SLOTS as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = last_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        // The socket overflowed: the kernel dropped messages for us.
                        self.stats.overflows += 1;
                        out.push(Event::new(EventKind::Lost { count: None, reason: LossReason::Overflow }));
                        continue;
                    }
                    _ => return Err(TrackerError::io("receiving from the proc connector", e)),
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            for (i, h) in hdrs.iter().take(n).enumerate() {
                let len = h.msg_len as usize;
                let truncated = len > SLOT_BYTES || h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                let slot = &self.buf[i * SLOT_BYTES..(i + 1) * SLOT_BYTES];
                let datagram = &slot[..len.min(SLOT_BYTES)];
                let from = names[i].nl_pid;
                // Kernel data we could not read may have held events: say so (once per datagram).
                let mut unreadable = truncated && from == 0;
                match decode_datagram(datagram, from, offset, &mut self.seq, out) {
                    Ok(s) => {
                        self.stats.messages += s.messages;
                        self.stats.ignored += s.ignored;
                        self.stats.sequence_gaps += s.gaps;
                        self.stats.lost_by_gap += s.lost_by_gap;
                        self.stats.malformed += s.malformed;
                        unreadable |= s.malformed > 0;
                        acks.extend(s.acks);
                    }
                    Err(DecodeError::NotFromKernel { .. }) => self.stats.rejected += 1,
                    Err(_) => {
                        self.stats.malformed += 1;
                        unreadable = true;
                    }
                }
                if unreadable {
                    out.push(Event::new(EventKind::Lost { count: None, reason: LossReason::Other }));
                }
            }
            read += n;
            if n < SLOTS {
                // Fewer than asked for: the queue is empty now.
                break;
            }
        }
        Ok(acks)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The kernel keeps a global listener count that a plain close() does not decrement while
        // any other listener exists; every fork on the host then pays for building events nobody
        // reads. Only send IGNORE after a LISTEN the kernel accepted: kernels before 6.6 decrement
        // on every IGNORE, even from a socket that never listened.
        if self.listening {
            let _ = self.send_request(PROC_CN_MCAST_IGNORE, None, 0);
        }
    }
}

/// Asks for `wanted` bytes of receive buffer: `SO_RCVBUFFORCE` (needs CAP_NET_ADMIN, ignores
/// `net.core.rmem_max`), else `SO_RCVBUF` (capped by `rmem_max`). `wanted == 0` keeps the
/// system default. Returns the size the kernel reports (`SO_RCVBUF`, which is twice the request:
/// the kernel doubles it to cover its bookkeeping).
fn set_receive_buffer(fd: BorrowedFd<'_>, wanted: usize) -> io::Result<usize> {
    if wanted > 0 {
        let value = libc::c_int::try_from(wanted).unwrap_or(libc::c_int::MAX);
        if let Err(e) = set_int_option(fd, libc::SO_RCVBUFFORCE, value) {
            if !is_permission(&e) {
                return Err(e);
            }
            set_int_option(fd, libc::SO_RCVBUF, value)?;
        }
    }
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value`/`len` are a valid, writable int and its size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(last_error());
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

fn set_int_option(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid int for the duration of the call and the length is its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// The netlink port id the kernel gave the socket at bind.
fn local_port(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut sa = sockaddr_nl(0);
    let mut len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `sa`/`len` are a valid, writable sockaddr_nl and its size.
    let r = unsafe {
        libc::getsockname(fd.as_raw_fd(), (&mut sa as *mut libc::sockaddr_nl).cast::<libc::sockaddr>(), &mut len)
    };
    if r != 0 {
        return Err(last_error());
    }
    Ok(sa.nl_pid)
}

/// Waits until `fd` is readable (or has an error pending, such as an overflow) for at most
/// `timeout` (`None`: forever). `EINTR` is retried with the time left. Returns whether it is.
fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let ms: libc::c_int = match (timeout, deadline) {
            (None, _) | (Some(_), None) => -1,
            (Some(_), Some(d)) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so that a short wait does not become a busy loop.
                let ms = left.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one valid, writable pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = last_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_at_bind_names_the_fix() {
        let e = listen_error(io::Error::from_raw_os_error(libc::EPERM));
        match &e {
            TrackerError::PermissionDenied { what, hint, .. } => {
                assert_eq!(what, "listening to the proc connector");
                assert_eq!(hint, LISTEN_HINT);
                assert!(hint.starts_with("this kernel lets only CAP_NET_ADMIN listen to the proc connector;"));
                assert!(hint.ends_with("run as root or use --backend ptrace"));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("permission denied"));
        assert!(matches!(listen_error(io::Error::from_raw_os_error(libc::EINVAL)), TrackerError::Io { .. }));
    }

    #[test]
    fn clocks_and_release() {
        // Boot time runs ahead of monotonic time by the time spent suspended: never negative.
        let r = read_clocks().unwrap();
        assert!(r.mono_before <= r.mono_after && r.boot >= r.mono_before, "{r:?}");
        let r = kernel_release().unwrap();
        assert!(crate::decode::parse_kernel_release(&r).is_some(), "{r}");
    }

    #[test]
    fn poll_times_out() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let t = Instant::now();
        assert!(!poll_readable(a.as_fd(), Some(Duration::from_millis(30))).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(!poll_readable(a.as_fd(), Some(Duration::ZERO)).unwrap());
    }
}
