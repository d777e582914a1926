//! Tests against the running kernel. They need a kernel with the proc connector, in the initial
//! namespaces; as root they run everywhere, unprivileged only on Linux 6.6+.
//!
//! What every backend must do (fork/exec/exit order, exit statuses, threads, reported loss) is
//! checked by `platform-tests/tests/conformance.rs`; these are this backend's own: buffer sizes,
//! counters, forged datagrams, the 6.6+ filter and privileges, the kinds of loss.
//!
//! The proc connector sees the whole host, so each test picks out the events of the pids it made.
//! The tests run one at a time (a mutex) so that one test's burst does not overflow another's
//! buffer. Every process a test starts is reaped (or killed by pid) before the test returns.
#![cfg(target_os = "linux")]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vpstag_cnproc::decode::kernel_has_event_filter;
use vpstag_cnproc::{CnProc, Config};
use vpstag_tracker::{Event, EventKind, ExitStatus, ForkTracker, LossReason, Pid};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pid(raw: i32) -> Pid {
    Pid::new(raw).unwrap()
}

fn me() -> Pid {
    pid(std::process::id() as i32)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_string()
}

/// Reads events into `events` until `done` says so or `secs` pass.
fn collect(cn: &mut CnProc, events: &mut Vec<Event>, secs: u64, mut done: impl FnMut(&[Event]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done(events) && Instant::now() < deadline {
        cn.read_events(events, Some(Duration::from_millis(100))).unwrap();
    }
}

fn is_exit_of(e: &Event, p: Pid) -> bool {
    matches!(e.kind, EventKind::Exit { pid, thread, .. } if pid == p && thread == p)
}

fn position(events: &[Event], f: impl Fn(&EventKind) -> bool) -> Option<usize> {
    events.iter().position(|e| f(&e.kind))
}

fn no_loss(events: &[Event]) -> bool {
    !events.iter().any(|e| matches!(e.kind, EventKind::Lost { .. }))
}

#[test]
fn capabilities_and_buffer() {
    let _g = serial();
    let cn = CnProc::new().unwrap();
    let c = cn.capabilities();
    assert!(c.host_wide && c.thread_events && c.can_lose);
    assert!(!c.holds_tags && !c.synchronous && !c.reaps);
    assert_eq!(cn.kind(), vpstag_tracker::BackendKind::Cnproc);
    assert!(!cn.kernel_filter_active());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // SO_RCVBUFFORCE: 8 MiB asked, reported doubled.
        assert!(cn.receive_buffer_bytes() >= 16 << 20, "{}", cn.receive_buffer_bytes());
    }
    assert!(cn.stats().messages >= 1, "our own ack counts as a message");
}

/// What only this backend adds to every event (the order, parents and statuses of fork, exec and
/// exit are checked for every backend by `platform-tests/tests/conformance.rs`): the CPU that
/// reported it, a boot-clock time, ordered for one process, and no tag.
#[test]
fn events_carry_the_cpu_and_a_boot_clock_time() {
    let _g = serial();
    let mut cn = CnProc::new().unwrap();
    let mut child = Command::new("sh").args(["-c", "true & wait"]).spawn().unwrap();
    let sh = pid(child.id() as i32);
    let status = child.wait().unwrap();
    assert!(status.success());

    let mut events = Vec::new();
    collect(&mut cn, &mut events, 10, |ev| ev.iter().any(|e| is_exit_of(e, sh)));
    let fork = position(&events, |k| matches!(k, EventKind::Fork { child, .. } if *child == sh))
        .unwrap_or_else(|| panic!("no fork of sh {sh}: {events:?}"));
    let exec = position(&events, |k| matches!(k, EventKind::Exec { pid, .. } if *pid == sh))
        .unwrap_or_else(|| panic!("no exec of sh {sh}: {events:?}"));
    let exit = position(&events, |k| matches!(k, EventKind::Exit { pid, thread, .. } if *pid == sh && *thread == sh))
        .unwrap_or_else(|| panic!("no exit of sh {sh}: {events:?}"));
    for &i in &[fork, exec, exit] {
        let e = &events[i];
        assert!(e.cpu.is_some() && e.time_ns.is_some() && e.tag.is_none(), "{e:?}");
    }
    // Boot-clock timestamps: ordered for one process, and not after "now" on the boot clock.
    let t = |i: usize| events[i].time_ns.unwrap();
    assert!(t(fork) <= t(exec) && t(exec) <= t(exit));
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) }, 0);
    let boot_now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    assert!(t(exit) <= boot_now && boot_now - t(fork) < 60_000_000_000);
}

/// Reaps (and if need be kills) the children of a burst, whatever happens to the test.
struct Children(Vec<libc::pid_t>);

impl Drop for Children {
    fn drop(&mut self) {
        for &p in &self.0 {
            let mut st = 0;
            // SAFETY: waitpid on our own child; `st` is writable.
            let r = unsafe { libc::waitpid(p, &mut st, libc::WNOHANG) };
            if r == 0 {
                // SAFETY: `p` is our own, not yet reaped child, so the pid cannot have been reused.
                unsafe { libc::kill(p, libc::SIGKILL) };
                // SAFETY: as above.
                unsafe { libc::waitpid(p, &mut st, 0) };
            }
        }
    }
}

#[test]
fn burst_of_2000_forks_loses_nothing() {
    let _g = serial();
    let mut cn = CnProc::new().unwrap();
    let mut children = Children(Vec::with_capacity(2000));
    // Fork all 2000 before reading a single event, so that they all queue at once.
    for _ in 0..2000 {
        // SAFETY: the child only calls _exit, which is async-signal-safe.
        let p = unsafe { libc::fork() };
        if p == 0 {
            // SAFETY: _exit ends the child without running anything of the parent's.
            unsafe { libc::_exit(0) };
        }
        assert!(p > 0, "fork failed: {}", std::io::Error::last_os_error());
        children.0.push(p);
    }
    for &p in &children.0 {
        let mut st = 0;
        // SAFETY: waitpid on our own child; `st` is writable.
        assert_eq!(unsafe { libc::waitpid(p, &mut st, 0) }, p);
    }
    let forked: std::collections::HashSet<Pid> = children.0.drain(..).map(pid).collect();

    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let forks_of_me = |events: &[Event], seen: &mut std::collections::HashSet<Pid>| {
        for e in events {
            if let EventKind::Fork { parent, child, thread: false, .. } = e.kind {
                if parent == me() {
                    seen.insert(child);
                }
            }
        }
    };
    while seen.len() < 2000 && Instant::now() < deadline {
        let from = events.len();
        cn.read_events(&mut events, Some(Duration::from_millis(200))).unwrap();
        forks_of_me(&events[from..], &mut seen);
    }
    let s = cn.stats();
    eprintln!("burst: {} events read, stats {s:?}, receive buffer {}", events.len(), cn.receive_buffer_bytes());
    assert!(no_loss(&events), "lost events in a 2,000-fork burst: {s:?}");
    assert_eq!(seen.len(), 2000, "{s:?}");
    assert_eq!(seen, forked);
    assert_eq!((s.overflows, s.sequence_gaps), (0, 0));
}

/// The netlink port id of a socket, found through its inode in /proc/net/netlink.
fn netlink_port(fd: libc::c_int) -> u32 {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let link = link.to_string_lossy();
    let inode = link.trim_start_matches("socket:[").trim_end_matches(']').to_string();
    let table = std::fs::read_to_string("/proc/net/netlink").unwrap();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 10 && cols[9] == inode {
            return cols[2].parse().unwrap();
        }
    }
    panic!("socket inode {inode} not in /proc/net/netlink");
}

#[test]
fn forged_datagrams_from_other_sockets_are_refused() {
    let _g = serial();
    let mut cn = CnProc::new().unwrap();
    let port = netlink_port(cn.as_fd().as_raw_fd());
    assert_ne!(port, 0);

    // A forged "fork 4242 -> 4243" from an ordinary netlink socket, sent to our port.
    let mut forged = Vec::new();
    forged.extend_from_slice(&76u32.to_ne_bytes()); // nlmsghdr: len, type NLMSG_DONE, flags, seq, port
    forged.extend_from_slice(&3u16.to_ne_bytes());
    forged.extend_from_slice(&0u16.to_ne_bytes());
    forged.extend_from_slice(&0u32.to_ne_bytes());
    forged.extend_from_slice(&0u32.to_ne_bytes());
    for v in [1u32, 1, 0, 0] {
        forged.extend_from_slice(&v.to_ne_bytes()); // cn_msg: idx, val, seq, ack, len, flags
    }
    forged.extend_from_slice(&40u16.to_ne_bytes());
    forged.extend_from_slice(&0u16.to_ne_bytes());
    for v in [1u32, 0, 0, 0, 4242, 4242, 4243, 4243, 0, 0] {
        forged.extend_from_slice(&v.to_ne_bytes()); // proc_event: FORK, cpu, time, fork data
    }
    assert_eq!(forged.len(), 76);
    // SAFETY: plain syscalls on a descriptor this test owns; buffers outlive the calls.
    let err = unsafe {
        let raw = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_CONNECTOR);
        assert!(raw >= 0);
        let other = OwnedFd::from_raw_fd(raw);
        let mut to: libc::sockaddr_nl = std::mem::zeroed();
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        to.nl_pid = port;
        let r = libc::sendto(
            other.as_raw_fd(),
            forged.as_ptr().cast(),
            forged.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        assert_eq!(r, -1, "a forged datagram was accepted");
        std::io::Error::last_os_error()
    };
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");

    let mut events = Vec::new();
    cn.read_events(&mut events, Some(Duration::from_millis(50))).unwrap();
    assert!(!events.iter().any(|e| matches!(e.kind, EventKind::Fork { child, .. } if child == pid(4243))));
    assert_eq!(cn.stats().rejected, 0);
}

#[test]
fn tiny_buffer_overflow_is_reported() {
    let _g = serial();
    // The smallest buffer the kernel allows holds a handful of events: a burst must overflow it,
    // and the loss must be reported, both as an overflow and, with its size, as a sequence gap.
    let mut cn = CnProc::with_config(Config { receive_buffer: 1, ..Config::default() }).unwrap();
    assert!(cn.receive_buffer_bytes() < 64 * 1024, "{}", cn.receive_buffer_bytes());
    let mut children = Children(Vec::new());
    for _ in 0..300 {
        // SAFETY: the child only calls _exit.
        let p = unsafe { libc::fork() };
        if p == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        assert!(p > 0);
        children.0.push(p);
    }
    for &p in &children.0 {
        let mut st = 0;
        // SAFETY: waitpid on our own child.
        assert_eq!(unsafe { libc::waitpid(p, &mut st, 0) }, p);
    }
    children.0.clear();
    let mut events = Vec::new();
    cn.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    // Events after an overflow still arrive and decode (the host may keep overflowing this tiny
    // buffer, so look for any decoded event after the first reported loss).
    // The first message seen on each CPU after the overflow only sets a baseline there, so keep
    // making events until the next ones on the same CPU reveal the gap.
    let decoded_after_loss = |ev: &[Event]| {
        ev.iter()
            .position(|e| matches!(e.kind, EventKind::Lost { .. }))
            .is_some_and(|i| ev[i..].iter().any(|e| !matches!(e.kind, EventKind::Lost { .. })))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(decoded_after_loss(&events) && cn.stats().sequence_gaps > 0) && Instant::now() < deadline {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        cn.read_events(&mut events, Some(Duration::from_millis(50))).unwrap();
    }
    let s = cn.stats();
    eprintln!("tiny buffer: {} events, {s:?}", events.len());
    assert!(decoded_after_loss(&events));
    assert!(s.overflows >= 1, "{s:?}");
    assert!(events.iter().any(|e| e.kind == EventKind::Lost { count: None, reason: LossReason::Overflow }));
    assert!(s.sequence_gaps >= 1 && s.lost_by_gap >= 1, "{s:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Lost { count: Some(n), reason: LossReason::SequenceGap } if n > 0)));
}

#[test]
fn kernel_filter_drops_unused_events() {
    let _g = serial();
    let release = kernel_release();
    if !kernel_has_event_filter(&release) {
        eprintln!("skipped: kernel {release} is older than 6.6, which has no event filter");
        return;
    }
    let mut filtered = CnProc::with_config(Config { kernel_filter: true, ..Config::default() }).unwrap();
    let mut control = CnProc::new().unwrap();
    assert!(filtered.kernel_filter_active());
    // Flush anything queued before the filter took effect.
    let mut events = Vec::new();
    filtered.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    control.read_events(&mut events, Some(Duration::ZERO)).unwrap();
    let (f0, c0) = (filtered.stats(), control.stats());

    // 20 COMM events (renaming a helper thread), then a process that exits with status 4.
    std::thread::spawn(|| {
        for _ in 0..20 {
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"cnproc-rename".as_ptr()) };
        }
    })
    .join()
    .unwrap();
    // SAFETY: the child only calls _exit.
    let p = unsafe { libc::fork() };
    if p == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(4) };
    }
    assert!(p > 0);
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    assert_eq!(unsafe { libc::waitpid(p, &mut st, 0) }, p);
    let child = pid(p);

    let mut fe = Vec::new();
    let mut ce = Vec::new();
    collect(&mut filtered, &mut fe, 10, |ev| ev.iter().any(|e| is_exit_of(e, child)));
    collect(&mut control, &mut ce, 10, |ev| ev.iter().any(|e| is_exit_of(e, child)));
    let exit4 = |ev: &[Event]| {
        ev.iter()
            .any(|e| matches!(e.kind, EventKind::Exit { pid, status: Some(ExitStatus::Exited(4)), .. } if pid == child))
    };
    assert!(exit4(&fe) && exit4(&ce));
    let (f1, c1) = (filtered.stats(), control.stats());
    eprintln!("filtered {f0:?} -> {f1:?}\ncontrol {c0:?} -> {c1:?}");
    assert!(c1.ignored - c0.ignored >= 20, "control saw the renames: {c0:?} -> {c1:?}");
    assert_eq!(f1.ignored, f0.ignored, "the kernel filtered comm events and acks: {f0:?} -> {f1:?}");
    assert_eq!(f1.sequence_gaps, 0, "gap detection is off with the filter");
    assert!(no_loss(&fe));
}

#[test]
fn kernel_filter_is_not_sent_before_6_6() {
    let _g = serial();
    let release = kernel_release();
    if kernel_has_event_filter(&release) {
        eprintln!("skipped: kernel {release} has the event filter (6.6+); kernel_filter_drops_unused_events covers it");
        return;
    }
    // Asked for, but this kernel would silently drop an 8-byte request and send nothing: vpstag
    // must keep to the old form, so events flow and sequence-gap detection stays on.
    let mut cn = CnProc::with_config(Config { kernel_filter: true, ..Config::default() }).unwrap();
    assert!(!cn.kernel_filter_active(), "the filter must not be used before 6.6");
    // SAFETY: the child only calls _exit.
    let p = unsafe { libc::fork() };
    if p == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(6) };
    }
    assert!(p > 0);
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    assert_eq!(unsafe { libc::waitpid(p, &mut st, 0) }, p);
    let child = pid(p);
    let mut ev = Vec::new();
    collect(&mut cn, &mut ev, 10, |ev| ev.iter().any(|e| is_exit_of(e, child)));
    assert!(ev.iter().any(|e| matches!(e.kind, EventKind::Fork { child: c, .. } if c == child)), "no fork event");
    assert!(ev
        .iter()
        .any(|e| matches!(e.kind, EventKind::Exit { pid, status: Some(ExitStatus::Exited(6)), .. } if pid == child)));
    assert_eq!(cn.stats().sequence_gaps, 0);
    assert!(no_loss(&ev));
}

#[test]
fn unprivileged_listener_on_6_6_or_later() {
    let _g = serial();
    let release = kernel_release();
    if !kernel_has_event_filter(&release) {
        eprintln!("skipped: kernel {release} is older than 6.6; only CAP_NET_ADMIN may listen there");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root, so cannot drop to uid 65534 (running unprivileged already)");
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the child runs `unprivileged_child`, which never returns or unwinds into the test
    // harness (it ends with _exit), uses no lock another thread could hold but malloc's, which
    // glibc makes safe across fork, and prints nothing.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        drop(read_end);
        unprivileged_child(write_end.as_raw_fd());
    }
    drop(write_end);
    let mut report = Vec::new();
    let mut file = std::fs::File::from(read_end);
    let reader = std::thread::spawn(move || {
        let _ = file.read_to_end(&mut report);
        report
    });
    // The child gives itself 10 s; kill it (by pid) if it hangs much longer.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut st = 0;
    loop {
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
        if r == child {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: `child` is our unreaped child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(child, &mut st, 0) };
            panic!("unprivileged child hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = reader.join().unwrap();
    let text = String::from_utf8_lossy(&report);
    eprintln!("unprivileged child reported: {text}");
    assert!(text.starts_with("ok "), "unprivileged listener failed: {text:?}");
    // "ok <uid> <receive buffer>": no SO_RCVBUFFORCE without CAP_NET_ADMIN, so the buffer is at
    // most twice net.core.rmem_max.
    let mut parts = text.split_whitespace().skip(1);
    assert_eq!(parts.next(), Some("65534"));
    let rcvbuf: usize = parts.next().unwrap().parse().unwrap();
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    assert!(rcvbuf > 0 && rcvbuf <= 2 * rmem_max.max(Config::DEFAULT_RECEIVE_BUFFER), "{rcvbuf}");
}

/// Runs in a forked child: drops to uid/gid 65534, listens, forks a grandchild that exits with
/// status 5, and reports through the pipe whether its exit was seen.
fn unprivileged_child(report: libc::c_int) -> ! {
    let result = std::panic::catch_unwind(|| -> Result<String, String> {
        // SAFETY: plain credential syscalls in this single-threaded child.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                return Err(format!("dropping privileges: {}", std::io::Error::last_os_error()));
            }
        }
        let mut cn = CnProc::new().map_err(|e| format!("CnProc::new as uid 65534: {e}"))?;
        // SAFETY: the grandchild only calls _exit.
        let gc = unsafe { libc::fork() };
        if gc == 0 {
            // SAFETY: ends the grandchild at once.
            unsafe { libc::_exit(5) };
        }
        if gc < 0 {
            return Err("fork".into());
        }
        let mut st = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(gc, &mut st, 0) };
        let gc = Pid::new(gc).ok_or("pid")?;
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fork_seen = false;
        while Instant::now() < deadline {
            events.clear();
            cn.read_events(&mut events, Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
            for e in &events {
                match e.kind {
                    EventKind::Fork { child, .. } if child == gc => fork_seen = true,
                    EventKind::Exit { pid, status: Some(ExitStatus::Exited(5)), .. } if pid == gc && fork_seen => {
                        // SAFETY: getuid has no preconditions.
                        let uid = unsafe { libc::getuid() };
                        return Ok(format!("ok {uid} {}", cn.receive_buffer_bytes()));
                    }
                    _ => {}
                }
            }
        }
        Err("the grandchild's fork and exit were not seen".into())
    });
    let msg = match result {
        Ok(Ok(s)) => s,
        Ok(Err(s)) => format!("error: {s}"),
        Err(_) => "error: panic".into(),
    };
    // SAFETY: writes our own buffer to the pipe's write end, then ends the child without
    // running the parent's exit handlers.
    unsafe {
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(0)
    }
}
