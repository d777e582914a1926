//! `vpstag daemon` under attack by the users it serves: the real binary as root on a temporary
//! socket and state directory, attackers as unprivileged users through `setpriv`.
//!
//! The attackers are this test binary itself, started again under `setpriv` with
//! `VPSTAG_ABUSE_ROLE` set (see [`abuse_helper`]): they print one `@@ready ...@@` line and then hold
//! their connections until killed (by pid), until their standard input closes, or for at most
//! two minutes. Every process a test starts is killed by pid when it ends, on failure too.
//! Needs root and the cnproc backend; skipped (with the reason) otherwise.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;
const ATTACKER: u32 = 65534;
const BYSTANDER: u32 = 65533;
/// Attackers give up on their own after this long, in case nobody kills them.
const HELPER_LIFETIME: Duration = Duration::from_secs(120);

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root (a daemon serving several users)");
        return false;
    }
    match vpstag::open_backend(vpstag::BackendChoice::Cnproc) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: the cnproc backend cannot be opened here: {e}");
            false
        }
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// A daemon on a temporary socket and state directory; it, its VPSes' processes and every
/// helper are killed (by pid) when dropped.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    seen: std::cell::RefCell<Vec<(i32, u64)>>,
    helpers: std::cell::RefCell<Vec<Child>>,
}

impl Daemon {
    fn new(tag: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vpstag-abuse-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The attackers must reach the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let socket = dir.join("vpstag.sock");
        let child = Command::new(BIN)
            .args(["daemon", "--backend", "cnproc", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon");
        let mut d = Daemon { dir, socket, child: Some(child), seen: Default::default(), helpers: Default::default() };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if daemon_answers(&d.socket) {
                break;
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}) at start:\n{}", d.log());
            }
            assert!(Instant::now() < end, "the daemon did not answer:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        vpstag(&self.socket, args)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running vpstag")
    }

    fn run_as(&self, uid: u32, args: &[&str]) -> Output {
        vpstag_as(uid, &self.socket, args)
    }

    /// `vpstag start NAME -- CMD...`.
    fn start_vps(&self, name: &str, cmd: &[&str]) -> i32 {
        let out = self.cmd(&["start", name, "--"]).args(cmd).output().unwrap();
        assert!(out.status.success(), "start {name}: {}\n{}", text(&out.stderr), self.log());
        let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
        self.seen.borrow_mut().push((pid, start_time(pid)));
        pid
    }

    /// `ps --json`, recording every pid seen (for the clean-up); never panics.
    fn try_ps(&self, name: Option<&str>) -> Result<Vec<Value>, String> {
        let mut args = vec!["ps", "--json"];
        args.extend(name);
        let out = self.run(&args);
        if !out.status.success() {
            return Err(format!("ps: {}", text(&out.stderr)));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("ps --json prints JSON: {e}"))?;
        let procs = v.as_array().ok_or("ps --json: not an array")?.clone();
        for p in &procs {
            let pid = p["pid"].as_i64().unwrap_or(0) as i32;
            self.seen.borrow_mut().push((pid, p["start"].as_u64().unwrap_or(0)));
        }
        Ok(procs)
    }

    /// This test binary as user `uid` in the role `role` (see [`abuse_helper`]), once it has
    /// said it is ready: what it said.
    fn helper(&self, uid: u32, role: &str, connections: usize) -> (String, mpsc::Receiver<String>) {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
            .arg(exe)
            .args(["--exact", "abuse_helper", "--nocapture", "--test-threads=1"])
            .env("VPSTAG_ABUSE_ROLE", role)
            .env("VPSTAG_ABUSE_SOCKET", &self.socket)
            .env("VPSTAG_ABUSE_CONNECTIONS", connections.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .current_dir("/")
            .spawn()
            .expect("starting a helper under setpriv");
        let lines = reports(child.stdout.take().unwrap());
        self.helpers.borrow_mut().push(child);
        let ready = lines
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("the {role} helper (uid {uid}) did not get ready: {e}"));
        (ready, lines)
    }

    /// Kills every helper (by pid) and waits for them.
    fn kill_helpers(&self) {
        for c in self.helpers.borrow_mut().iter_mut() {
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
        self.helpers.borrow_mut().clear();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_helpers();
        if self.child.is_some() {
            let _ = self.try_ps(None);
        }
        for (pid, start) in self.seen.borrow().iter() {
            if *start == 0 || start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `@@...@@` reports of a helper, one a message (the test harness writes around them).
fn reports(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Some(r) = line.split("@@").nth(1) {
                if tx.send(r.to_string()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// `key=N` out of a report.
fn count(report: &str, key: &str) -> usize {
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {report:?}"))
}

/// Not a test: the attacker, when this binary is started again with `VPSTAG_ABUSE_ROLE` (by
/// `Daemon::helper`). Without it, it does nothing.
///
/// - `drip`: opens the connections, writes `{` on each, says `@@ready opened=N refused=N@@`,
///   then writes one space a second on each (a request line that never ends).
/// - `hold`: opens the connections, sends `hello` on each and reads the answer, says
///   `@@ready served=N busy=N other=N@@`, then holds them, idle.
#[test]
fn abuse_helper() {
    let Ok(role) = std::env::var("VPSTAG_ABUSE_ROLE") else { return };
    let socket = PathBuf::from(std::env::var_os("VPSTAG_ABUSE_SOCKET").expect("VPSTAG_ABUSE_SOCKET"));
    let n: usize = std::env::var("VPSTAG_ABUSE_CONNECTIONS").expect("VPSTAG_ABUSE_CONNECTIONS").parse().unwrap();
    // End when the test closes our standard input (or kills us), or after a while anyway.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let end = Instant::now() + HELPER_LIFETIME;
    let say = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "\n@@{s}@@");
        let _ = o.flush();
    };
    match role.as_str() {
        "drip" => {
            let mut conns = Vec::new();
            let mut refused = 0;
            for _ in 0..n {
                match UnixStream::connect(&socket) {
                    Ok(mut s) => {
                        let _ = s.write_all(b"{");
                        conns.push(s);
                    }
                    Err(_) => refused += 1,
                }
            }
            say(format!("ready opened={} refused={refused}", conns.len()));
            while Instant::now() < end {
                std::thread::sleep(Duration::from_secs(1));
                let alive = conns.iter().filter(|s| (&**s).write_all(b" ").is_ok()).count();
                say(format!("dripping alive={alive}"));
            }
        }
        "hold" => {
            let (mut served, mut busy, mut other) = (0, 0, 0);
            let mut conns = Vec::new();
            for _ in 0..n {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    other += 1;
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.write_all(b"{\"v\":1,\"op\":\"hello\"}\n");
                let mut l = String::new();
                let _ = BufReader::new(&s).read_line(&mut l);
                let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
                if v["ok"] == true {
                    served += 1;
                } else if v["error"]["kind"] == "busy" {
                    busy += 1;
                } else {
                    other += 1;
                }
                conns.push(s);
            }
            say(format!("ready served={served} busy={busy} other={other}"));
            while Instant::now() < end {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn dripping_connections_of_one_user_lock_out_neither_root_nor_other_users() {
    if !can_run() {
        return;
    }
    let d = Daemon::new("drip");
    let (ready, lines) = d.helper(ATTACKER, "drip", 200);
    eprintln!("uid {ATTACKER} dripping: {ready}");
    assert_eq!(count(&ready, "opened") + count(&ready, "refused"), 200);

    // Root is served, promptly, while the attacker drips.
    for args in [vec!["list"], vec!["ps"], vec!["list", "--json"]] {
        let t = Instant::now();
        let out = d.run(&args);
        let took = t.elapsed();
        eprintln!("root: vpstag {args:?} took {took:?}: {:?}", out.status);
        assert!(out.status.success(), "root's {args:?} failed during the drip: {}", text(&out.stderr));
        assert!(took < Duration::from_secs(5), "root's {args:?} took {took:?}");
    }
    // So is another user.
    let t = Instant::now();
    let out = d.run_as(BYSTANDER, &["list", "--json"]);
    eprintln!("uid {BYSTANDER}: vpstag list took {:?}: {:?}", t.elapsed(), out.status);
    assert!(out.status.success(), "uid {BYSTANDER} was locked out: {}", text(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), serde_json::json!([]));
    assert!(t.elapsed() < Duration::from_secs(5), "uid {BYSTANDER}'s list took {:?}", t.elapsed());
    // The dripping connections the daemon took are cut off (the line never ends).
    let mut last = String::new();
    wait_until("every dripping connection to be closed by the daemon", Duration::from_secs(60), || {
        while let Ok(l) = lines.try_recv() {
            last = l;
        }
        !last.is_empty() && count(&last, "alive") == 0
    });
    eprintln!("attacker, at the end: {last}");
    wait_until("a summary of the refusals in the log", Duration::from_secs(30), || d.log().contains("refused"));
}

#[test]
fn a_user_over_its_connection_cap_is_told_the_daemon_is_busy() {
    if !can_run() {
        return;
    }
    let d = Daemon::new("cap");
    let (ready, _lines) = d.helper(ATTACKER, "hold", 40);
    eprintln!("uid {ATTACKER} holding 40 connections: {ready}");
    let (served, busy) = (count(&ready, "served"), count(&ready, "busy"));
    assert_eq!(count(&ready, "other"), 0, "{ready}");
    assert!(busy > 0, "one user was served 40 connections at once: {ready}");
    assert!(served > 0 && served < 40, "{ready}");

    // The CLI, as that user, says so clearly and fails.
    let out = d.run_as(ATTACKER, &["list"]);
    let err = text(&out.stderr);
    eprintln!("uid {ATTACKER}: vpstag list: {:?}: {err}", out.status);
    assert!(!out.status.success(), "served beyond the cap: {}", text(&out.stdout));
    assert!(err.contains("busy") && err.contains("try again"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    // Root and other users are served.
    assert!(d.run(&["list"]).status.success());
    let out = d.run_as(BYSTANDER, &["list"]);
    assert!(out.status.success(), "uid {BYSTANDER}: {}", text(&out.stderr));
    // Once the connections are closed, the user is served again.
    d.kill_helpers();
    wait_until("the attacker's slots to be given back", Duration::from_secs(20), || {
        d.run_as(ATTACKER, &["list"]).status.success()
    });
}

#[test]
fn a_request_line_that_trickles_in_is_cut_off_at_the_deadline() {
    if !can_run() {
        return;
    }
    let d = Daemon::new("slow");
    // An idle connection, opened first: idle is not slow.
    let idle = UnixStream::connect(&d.socket).unwrap();
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"{\"v\":1,").unwrap();
    let t = Instant::now();
    let dripper = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(40);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(1));
            if w.write_all(b" ").is_err() {
                return;
            }
        }
    });
    let mut r = BufReader::new(&s);
    let mut l = String::new();
    let got = r.read_line(&mut l);
    let took = t.elapsed();
    eprintln!("after {took:?}: {got:?} {l:?}");
    assert!(got.is_ok() && !l.is_empty(), "no answer to a line dripping for {took:?}: {got:?}");
    let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
    assert_eq!(v["error"]["kind"], "too_slow", "{v}");
    assert!(took < Duration::from_secs(15), "cut off only after {took:?}");
    // Then the connection is closed.
    let mut rest = String::new();
    assert!(matches!(r.read_line(&mut rest), Ok(0) | Err(_)), "still open: {rest:?}");
    dripper.join().unwrap();
    // The idle connection, quiet for longer than the request deadline, is still served.
    let mut i = &idle;
    i.write_all(b"{\"v\":1,\"op\":\"hello\"}\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut l = String::new();
    BufReader::new(&idle).read_line(&mut l).unwrap();
    assert!(l.starts_with("{\"ok\":true"), "the idle connection after {:?}: {l:?}", t.elapsed());
}

#[test]
fn execs_with_huge_command_lines_do_not_grow_the_daemon() {
    if !can_run() {
        return;
    }
    let d = Daemon::new("memory");
    // Warm up (threads, arenas) with a few ordinary events, and a follower that reads.
    d.start_vps("warm", &["sh", "-c", "for i in 1 2 3; do /bin/true; done; sleep 0.3; :"]);
    let follower = vpstag::client::Client::connect_to(&d.socket).unwrap().events(None, true).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for e in follower {
            let Ok(e) = e else { return };
            if e.vps == "big" && e.event == "exec" && tx.send(e.cmd.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    // And a follower that never reads.
    let mut stuck = UnixStream::connect(&d.socket).unwrap();
    stuck.write_all(b"{\"v\":1,\"op\":\"events\",\"follow\":true}\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, hwm0) = memory_kib(d.pid());
    // 300 processes with a 1 MiB command line (10 arguments of 100 KiB), 50 at a time, each
    // alive for a second; then a marker.
    let script = "A=$(head -c 102400 /dev/zero | tr '\\0' a); i=0; \
                  while [ $i -lt 300 ]; do \
                  sh -c 'sleep 1; :' big \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" \"$A\" & \
                  i=$((i+1)); [ $((i % 50)) -eq 0 ] && wait; done; wait; exec sleep 1.25";
    d.start_vps("big", &["sh", "-c", script]);
    let end = Instant::now() + Duration::from_secs(300);
    let (mut huge, mut longest, mut cut) = (0, 0, 0);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let cmd = rx.recv_timeout(left).unwrap_or_else(|e| {
            panic!("no exec of the marker within 300 s ({e}); {huge} huge execs seen, the longest {longest} bytes")
        });
        if cmd == "sleep 1.25" {
            break;
        }
        if cmd.starts_with("sh -c sleep 1; : big aaaa") {
            huge += 1;
            longest = longest.max(cmd.len());
            cut += usize::from(cmd.ends_with('\u{2026}'));
        }
    }
    let (rss1, hwm1) = memory_kib(d.pid());
    eprintln!(
        "daemon memory: VmRSS {rss0} -> {rss1} KiB (+{} KiB), VmHWM {hwm0} -> {hwm1} KiB (+{} KiB); {huge} huge execs \
         seen by a follower, the longest command line {longest} bytes, {cut} marked as cut",
        rss1.saturating_sub(rss0),
        hwm1.saturating_sub(hwm0)
    );
    assert!(rss1.saturating_sub(rss0) < 30 * 1024, "VmRSS grew by {} KiB", rss1.saturating_sub(rss0));
    assert!(hwm1.saturating_sub(hwm0) < 30 * 1024, "VmHWM grew by {} KiB", hwm1.saturating_sub(hwm0));
    assert!(huge >= 250, "only {huge} of the 300 huge execs were seen");
    assert!(longest <= 4096 && cut == huge, "{cut} of {huge} cut; the longest {longest} bytes");
    // The recent events (without --follow) are bounded too, and still answer.
    let out = d.run(&["events", "--json", "big"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.len() < 2 << 20, "events printed {} bytes", out.stdout.len());
    drop(stuck);
}

#[test]
fn control_characters_in_command_lines_are_escaped_for_terminals_and_kept_in_json() {
    if !can_run() {
        return;
    }
    let d = Daemon::new("escape");
    let evil = "x\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{7f}\u{202e}y";
    let first = d.start_vps("esc", &["sh", "-c", "sleep 300; :", "esc", evil]);
    let want = format!("sh -c sleep 300; : esc {evil}");
    wait_until("the command to run", Duration::from_secs(20), || {
        d.try_ps(Some("esc")).map(|p| p.iter().any(|x| x["cmd"] == want.as_str())).unwrap_or(false)
    });
    let spelled = "x\\x1b[2J\\x1b]0;pwned\\x07\\u{9b}31m\\x7f\\u{202e}y";
    let raw_bytes: [&[u8]; 5] = [b"\x1b", b"\x07", b"\x7f", "\u{9b}".as_bytes(), "\u{202e}".as_bytes()];
    for args in [vec!["ps"], vec!["ps", "esc"], vec!["ps", "--tree"], vec!["events"], vec!["events", "esc"]] {
        let out = d.run(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let shown = text(&out.stdout);
        eprintln!("vpstag {args:?}:\n{}", shown.escape_debug());
        for b in raw_bytes {
            assert!(!out.stdout.windows(b.len()).any(|w| w == b), "{args:?} prints {b:?} raw: {shown:?}");
        }
        assert!(shown.contains(spelled), "{args:?} does not show {spelled:?}: {shown:?}");
    }
    // JSON keeps the command line intact (JSON escapes control characters itself).
    let procs = d.try_ps(Some("esc")).unwrap();
    assert!(procs.iter().any(|p| p["cmd"] == want.as_str()), "{procs:?}");
    let out = d.run(&["events", "--json", "esc"]);
    assert!(!out.stdout.contains(&0x1b), "JSON output is escaped");
    let evs: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(evs.iter().any(|e| e["event"] == "exec" && e["cmd"] == want.as_str()), "{evs:?}");
    let _ = first;
}
