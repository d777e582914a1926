//! The library's client (`vpstag::client`) against a real daemon: its errors, its timeout, its
//! reconnect after the daemon's idle cut-off, ending a follow from another thread, resuming a
//! follow without a gap, and VPS ids on events.
//!
//! Each test starts its own daemon (cnproc backend) on a temporary socket and state directory
//! and kills, by pid, everything it started. Needs root (the cnproc backend); skips otherwise.
#![cfg(target_os = "linux")]

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vpstag::client::{Client, Events};
use vpstag::protocol::{ErrorKind, EventInfo, Op};
use vpstag::{Error, Pid, VpsId};

mod common;

use common::*;

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vpstag-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon (cnproc) on a temporary socket; it and every VPS process the test started are
/// killed by pid when dropped.
struct Daemon {
    dir: TempDir,
    socket: PathBuf,
    child: Child,
    /// First processes started (pid, start time), to kill at the end.
    started: std::cell::RefCell<Vec<(i32, u64)>>,
}

impl Daemon {
    fn new(tag: &str, extra: &[&str]) -> Daemon {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("vpstag.sock");
        let log = std::fs::File::create(dir.0.join("daemon.log")).unwrap();
        let child = Command::new(BIN)
            .args(["daemon", "--backend", "cnproc", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon");
        let mut d = Daemon { dir, socket, child, started: Default::default() };
        let end = Instant::now() + Duration::from_secs(60);
        while !daemon_answers(&d.socket) {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited ({st}) at start:\n{}", d.log());
            }
            assert!(Instant::now() < end, "the daemon did not answer:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("daemon.log")).unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::connect_to(&self.socket).unwrap_or_else(|e| panic!("connecting: {e}\n{}", self.log()))
    }

    /// `vpstag start NAME -- CMD...`: the first process.
    fn start_vps(&self, name: &str, cmd: &[&str]) -> Pid {
        let mut args = vec!["start", name, "--"];
        args.extend_from_slice(cmd);
        let out = vpstag(&self.socket, &args).output().unwrap();
        assert!(out.status.success(), "start {name}: {}\n{}", text(&out.stderr), self.log());
        let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
        self.started.borrow_mut().push((pid, start_time(pid)));
        Pid::new(pid).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Every member the daemon knows of, then the first processes (if still the same).
        if let Ok(mut c) = Client::connect_to(&self.socket) {
            c.set_timeout(Some(Duration::from_secs(10)));
            for p in c.ps(None).unwrap_or_default() {
                if start_time(p.pid.as_raw()) == p.start {
                    kill(p.pid.as_raw(), libc::SIGKILL);
                }
            }
        }
        for (pid, start) in self.started.borrow().iter() {
            if start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        kill(self.child.id() as i32, libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        kill(self.child.id() as i32, libc::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// Follows `events` on a thread: every event goes to the returned channel; the thread ends when
/// the iterator does and hands back the iterator's last seq.
fn follow_on_a_thread(
    events: Events,
) -> (mpsc::Receiver<EventInfo>, vpstag::client::Stopper, std::thread::JoinHandle<Option<u64>>) {
    let (tx, rx) = mpsc::channel();
    let stopper = events.stopper();
    let t = std::thread::spawn(move || {
        let mut events = events;
        for e in &mut events {
            match e {
                Ok(e) => {
                    if tx.send(e).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("a followed event: {e}"),
            }
        }
        events.last_seq()
    });
    (rx, stopper, t)
}

/// Takes events from `rx` into `seen` until `done` holds; fails after `timeout`, saying what it
/// saw.
fn collect_until(
    what: &str,
    rx: &mpsc::Receiver<EventInfo>,
    seen: &mut Vec<EventInfo>,
    timeout: Duration,
    mut done: impl FnMut(&[EventInfo]) -> bool,
) {
    let end = Instant::now() + timeout;
    while !done(seen) {
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}; saw {} events, the last: {:?}",
            seen.len(),
            &seen[seen.len().saturating_sub(20)..]
        );
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(50)) {
            seen.push(e);
        }
    }
}

#[test]
fn no_daemon_is_no_daemon_naming_the_socket_and_the_fix() {
    let dir = TempDir::new("none");
    let socket = dir.0.join("nobody-here.sock");
    let e = Client::connect_to(&socket).unwrap_err();
    assert!(matches!(&e, Error::NoDaemon { socket: s } if s == &socket), "{e:?}");
    assert!(e.to_string().contains("start it with `vpstag daemon`"), "{e}");
    assert_eq!(e.kind(), None);
}

#[test]
fn a_refusal_is_refused_with_the_daemons_kind() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("refused", &[]);
    let mut c = d.client();
    let e = c.members("nope").unwrap_err();
    assert!(matches!(&e, Error::UnknownVps(n) if n == "nope"), "{e:?}");
    assert_eq!(e.kind(), Some(ErrorKind::UnknownVps));
    let e = c.call(Op::RegisterFirst { name: "-bad name".into(), limits: None }).unwrap_err();
    assert!(matches!(&e, Error::Refused { kind: ErrorKind::InvalidName, .. }), "{e:?}");
    assert_eq!(e.kind(), Some(ErrorKind::InvalidName));
    // The connection still serves after a refusal.
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn a_daemon_that_never_answers_is_a_timeout_within_the_set_time() {
    let dir = TempDir::new("silent");
    let socket = dir.0.join("silent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Accepts, holds the connection open, and says nothing.
    let (tx, rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let _ = rx.recv();
        drop(conn);
    });
    let mut c = Client::connect_to(&socket).unwrap();
    let limit = Duration::from_millis(400);
    c.set_timeout(Some(limit));
    let t = Instant::now();
    let e = c.hello().unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(&e, Error::DaemonTimeout { socket: s, after } if s == &socket && *after == limit),
        "{e:?} after {took:?}"
    );
    assert!(took >= limit && took < limit + Duration::from_secs(5), "gave up after {took:?}");
    assert!(e.to_string().contains(&*socket.to_string_lossy()), "{e}");
    tx.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn a_question_after_the_daemons_idle_cut_off_reconnects_once() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("idle", &["--idle-timeout", "0.3"]);
    let mut c = d.client();
    let daemon = c.hello().unwrap().daemon_pid;
    // Wait until the daemon has closed this connection (readable, and at its end), without
    // reading from it.
    let fd = c.as_fd().as_raw_fd();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n == 1 {
            let mut b = [0u8; 1];
            // SAFETY: peeks one byte into a buffer of one byte.
            let got = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            assert_eq!(got, 0, "the daemon sent something unasked instead of closing");
            break;
        }
        assert!(Instant::now() < end, "the daemon never closed the idle connection:\n{}", d.log());
    }
    // The next questions are answered, over a new connection.
    assert!(c.list().unwrap().is_empty());
    assert_eq!(c.hello().unwrap().daemon_pid, daemon);
}

#[test]
fn a_stopper_ends_a_follow_from_another_thread() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("stopper", &[]);
    let events = d.client().events(None, true).unwrap();
    let (rx, stopper, t) = follow_on_a_thread(events);
    // Nothing happens: the follower waits for an event...
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(!t.is_finished());
    // ...until stopped from here.
    assert!(!stopper.stopped());
    let other = stopper.clone();
    other.stop();
    assert!(stopper.stopped(), "a clone stops the same follow");
    wait_until("the follow to end after stop()", Duration::from_secs(10), || t.is_finished());
    t.join().unwrap();
}

/// The seqs of `events` that are of VPS `id` or losses.
fn seqs_of(events: &[EventInfo], id: VpsId) -> Vec<u64> {
    events.iter().filter(|e| e.vps_id == Some(id) || e.event == "lost").map(|e| e.seq).collect()
}

#[test]
fn events_after_resumes_a_follow_without_a_gap_or_a_double() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("resume", &[]);
    // The reference: a follower of everything from before the VPS exists.
    let (all_rx, all_stop, all_t) = follow_on_a_thread(d.client().events(None, true).unwrap());
    let first = d.start_vps("r", &["sh", "-c", "while :; do /bin/true; sleep 0.02; done"]);
    let id = d.client().vps_of(first).unwrap().expect("the first process is tagged").id;
    let mut all = Vec::new();
    collect_until("20 events of r", &all_rx, &mut all, Duration::from_secs(30), |s| seqs_of(s, id).len() >= 20);

    // A follows r (its replay, then live), and is stopped after a while.
    let (a_rx, a_stop, a_t) = follow_on_a_thread(d.client().events(Some("r"), true).unwrap());
    let mut a = Vec::new();
    collect_until("40 events in A", &a_rx, &mut a, Duration::from_secs(30), |s| s.len() >= 40);
    a_stop.stop();
    let a_last = a_t.join().unwrap().expect("A saw numbered events");
    a.extend(a_rx.try_iter());
    assert_eq!(a.last().map(|e| e.seq), Some(a_last), "last_seq is the last event's seq");

    // Events happen while nobody follows r.
    collect_until("r's events after A stopped", &all_rx, &mut all, Duration::from_secs(30), |s| {
        seqs_of(s, id).iter().filter(|q| **q > a_last).count() >= 10
    });
    // B resumes after A's last: the missed ones from the daemon's ring, then live ones.
    let (b_rx, b_stop, b_t) = follow_on_a_thread(d.client().events_after(Some("r"), a_last).unwrap());
    let mut b = Vec::new();
    let target = *seqs_of(&all, id).last().unwrap() + 200;
    collect_until("B past the reference's end", &b_rx, &mut b, Duration::from_secs(60), |s| {
        s.last().is_some_and(|e| e.seq > target)
    });
    b_stop.stop();
    b_t.join().unwrap();
    let b_last = b.last().unwrap().seq;
    collect_until("the reference up to B's last", &all_rx, &mut all, Duration::from_secs(30), |s| {
        s.last().is_some_and(|e| e.seq >= b_last)
    });
    all_stop.stop();
    all_t.join().unwrap();

    assert!(b.iter().all(|e| e.reason.is_none()), "nothing expired, yet B was told so: {:?}", b.first());
    let a_seqs: Vec<u64> = a.iter().map(|e| e.seq).collect();
    let b_seqs: Vec<u64> = b.iter().map(|e| e.seq).collect();
    let joined: Vec<u64> = a_seqs.iter().chain(&b_seqs).copied().collect();
    assert!(joined.windows(2).all(|w| w[0] < w[1]), "A then B not strictly increasing: {a_seqs:?} then {b_seqs:?}");
    let reference: Vec<u64> = seqs_of(&all, id).into_iter().filter(|s| *s >= joined[0] && *s <= b_last).collect();
    assert_eq!(joined, reference, "A then B against a follower that never stopped");
    assert!(a.iter().chain(&b).all(|e| e.vps == "r" && (e.vps_id == Some(id) || e.event == "lost")));
}

#[test]
fn vps_of_names_id_and_name_and_a_vps_restarted_under_its_name_has_a_new_id_on_its_events() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("ids", &[]);
    let (rx, stop, t) = follow_on_a_thread(d.client().events(None, true).unwrap());
    let mut c = d.client();
    let one = d.start_vps("s", &["sleep", "901"]);
    let v1 = c.vps_of(one).unwrap().expect("tagged");
    assert_eq!((v1.name.as_str(), v1.first), ("s", one));
    assert!(c.stop("s", Duration::ZERO).unwrap() >= 1, "stop signals the running sleep");
    assert_eq!(c.vps_of(one).unwrap(), None, "stopped: no tag");
    let two = d.start_vps("s", &["sleep", "902"]);
    let v2 = c.vps_of(two).unwrap().expect("tagged");
    assert_eq!((v2.name.as_str(), v2.first), ("s", two));
    assert_ne!(v1.id, v2.id, "a new VPS of the same name has a new id");
    let mut seen = Vec::new();
    // The first process runs the command as its child.
    let execs = |s: &[EventInfo], id: VpsId, cmd: &str| {
        s.iter().any(|e| e.event == "exec" && e.vps == "s" && e.vps_id == Some(id) && e.cmd.as_deref() == Some(cmd))
    };
    collect_until("the exec of each VPS named s, with its id", &rx, &mut seen, Duration::from_secs(30), |s| {
        execs(s, v1.id, "sleep 901") && execs(s, v2.id, "sleep 902")
    });
    assert!(
        seen.iter().filter(|e| e.vps == "s").all(|e| e.vps_id == Some(v1.id) || e.vps_id == Some(v2.id)),
        "{seen:?}"
    );
    stop.stop();
    t.join().unwrap();
}
