//! Real-kernel tests of the kqueue backend and the reaper list. FreeBSD only: they compile (and
//! are type-checked) everywhere the crate is checked for FreeBSD, and run on a FreeBSD host
//! (`vagrant/freebsd`, or the `freebsd` job of `.github/workflows/platforms.yml`).
#![cfg(target_os = "freebsd")]

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vpstag_kqueue::{reaper_descendants, Kqueue};
use vpstag_tracker::{Event, EventKind, ForkTracker, Pid, TrackerError, VpsId};

/// A shell that waits for a line on stdin (the start gate) before running `script`.
fn gated(script: &str, reaper: bool) -> Child {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(format!("read gate; {script}")).stdin(Stdio::piped());
    if reaper {
        // SAFETY: only async-signal-safe calls (getpid, procctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let r = libc::procctl(
                    libc::P_PID,
                    libc::id_t::from(libc::getpid()),
                    libc::PROC_REAP_ACQUIRE,
                    std::ptr::null_mut(),
                );
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }
    cmd.spawn().expect("spawning /bin/sh")
}

fn open(child: &mut Child) {
    child.stdin.take().expect("stdin").write_all(b"go\n").expect("opening the gate");
}

fn pid_of(child: &Child) -> Pid {
    Pid::new(i32::try_from(child.id()).unwrap()).unwrap()
}

/// `lookup` answers from the tags the events carried, and forgets a process at its exit. (The
/// events themselves, their order, statuses and tags, are checked for every backend by
/// `platform-tests/tests/conformance.rs`.)
#[test]
fn lookup_answers_from_udata_until_each_process_exits() {
    let mut kq = Kqueue::new().expect("kqueue");
    let mut child = gated("/bin/sh -c 'exit 3'; exit 0", false);
    let root = pid_of(&child);
    kq.watch(root, VpsId(7)).expect("watch");
    assert_eq!(kq.lookup(root), Some(VpsId(7)));
    open(&mut child);

    let mut events: Vec<Event> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let root_exited = |evs: &[Event]| evs.iter().any(|e| matches!(e.kind, EventKind::Exit { pid, .. } if pid == root));
    while !root_exited(&events) && Instant::now() < deadline {
        kq.read_events(&mut events, Some(Duration::from_millis(200))).expect("read_events");
    }
    child.wait().expect("wait");
    assert!(root_exited(&events), "no exit of the root in {events:#?}");
    let grandchild = events
        .iter()
        .find_map(|e| match e.kind {
            EventKind::Fork { parent, child, .. } if parent == root => Some(child),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no fork of the root in {events:#?}"));
    assert_eq!(kq.lookup(root), None, "{events:#?}");
    assert_eq!(kq.lookup(grandchild), None, "{events:#?}");
}

#[test]
fn watching_a_process_that_does_not_exist_says_so() {
    let mut kq = Kqueue::new().expect("kqueue");
    let mut child = gated("exit 0", false);
    let gone = pid_of(&child);
    open(&mut child);
    child.wait().expect("wait");
    match kq.watch(gone, VpsId(1)) {
        Err(TrackerError::NoSuchProcess(p)) => assert_eq!(p, gone),
        other => panic!("expected NoSuchProcess, got {other:?}"),
    }
}

#[test]
fn the_reaper_lists_its_descendants_and_a_non_reaper_is_refused() {
    let mut child = gated("sleep 60 & a=$!; sleep 60 & b=$!; read more; kill $a $b; wait", true);
    let root = pid_of(&child);
    // Open the first gate; the second `read` holds the shell while its two sleeps run.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("gate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = Vec::new();
    while Instant::now() < deadline {
        found = reaper_descendants(root).expect("reaper_descendants");
        if found.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found.len() >= 2, "expected the two sleeps, got {found:?}");
    assert!(!found.contains(&root));
    stdin.write_all(b"done\n").expect("second gate");
    drop(stdin);
    child.wait().expect("wait");

    // This test process is no reaper: the kernel would answer with its reaper's list (init's).
    let me = Pid::new(i32::try_from(std::process::id()).unwrap()).unwrap();
    assert!(matches!(reaper_descendants(me), Err(TrackerError::Io { .. })));
}
