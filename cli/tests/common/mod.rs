//! Helpers shared by the daemon's end-to-end tests (`daemon_e2e`, `daemon_state`, `daemon_abuse`):
//! processes by pid, waiting for a condition with a deadline, and reading `/proc`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// The `vpstag` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vpstag");

/// Whether the test runs as root (says why it skips otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("skipping: needs root");
    false
}

/// Whether the proc connector can be opened here (says why it skips otherwise).
pub fn cnproc_available() -> bool {
    match vpstag::open_backend(vpstag::BackendChoice::Cnproc) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: the cnproc backend cannot be opened here: {e}");
            false
        }
    }
}

/// Signals a process, or a process group when `pid` is negative (never 0, 1 or -1: everything).
pub fn kill(pid: i32, sig: i32) {
    if !(-1..=1).contains(&pid) {
        // SAFETY: kill with a pid (or group) the test recorded itself.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(s.rsplit(')').next().map(str::trim_start).and_then(|r| r.chars().next()), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// The start time of `pid` (clock ticks since boot), 0 when it is gone.
pub fn start_time(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(19)).and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// Waits until `f` holds; fails the test naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes as text, for messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a daemon answers `hello` on `socket` (one short exchange, 10 s at most).
pub fn daemon_answers(socket: &std::path::Path) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"{\"v\":1,\"op\":\"hello\"}\n").is_err() {
        return false;
    }
    let mut l = String::new();
    BufReader::new(&s).read_line(&mut l).is_ok() && l.starts_with("{\"ok\":true")
}

/// `vpstag --socket SOCKET ARGS...`, with no standard input, run from `/`.
pub fn vpstag(socket: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.arg("--socket").arg(socket).args(args).stdin(std::process::Stdio::null()).current_dir("/");
    c
}

/// `vpstag --socket SOCKET ARGS...` as user `uid` (through `setpriv`).
pub fn vpstag_as(uid: u32, socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
        .arg(BIN)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .current_dir("/")
        .output()
        .expect("running setpriv")
}
