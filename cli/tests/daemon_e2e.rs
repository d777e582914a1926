//! `vpstag daemon` end to end: the real binary, real processes, the real kernel.
//!
//! Each test starts its own daemon on a temporary socket and state directory, with the cnproc
//! backend (the basic start/ps/which/kill test also with ptrace), and cleans up everything it
//! started, by pid: the VPSes' processes, the daemon, the temporary directory. Needs root (the
//! cnproc backend before Linux 6.6; `setpriv` to act as user 65534).
//!
//! Linux only: the daemon authorises by `SO_PEERCRED`/`SO_PEERPIDFD`, and these tests use
//! `clone3` and `/proc`.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;
const NOBODY: u32 = 65534;

/// A daemon on a temporary socket and state directory; everything it and its VPSes started is
/// killed (by pid) when dropped.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    state: PathBuf,
    backend: &'static str,
    child: Option<Child>,
    /// Every pid seen as a member, to kill at the end.
    seen: std::cell::RefCell<Vec<(i32, u64)>>,
    /// Other processes the test started (untracked trees, loaders).
    extra: std::cell::RefCell<Vec<Child>>,
}

impl Daemon {
    fn new(tag: &str, backend: &'static str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vpstag-daemon-{tag}-{backend}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // User 65534 must reach the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut d = Daemon {
            socket: dir.join("vpstag.sock"),
            state: dir.join("state"),
            dir,
            backend,
            child: None,
            seen: Default::default(),
            extra: Default::default(),
        };
        d.start();
        d
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        let child = Command::new(BIN)
            .args(["daemon", "--backend", self.backend, "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the daemon");
        self.child = Some(child);
        let sock = self.socket.clone();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if daemon_answers(&sock) {
                break;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}) at start:\n{}", self.log());
            }
            assert!(Instant::now() < end, "the daemon did not answer:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL the daemon (a crash).
    fn crash(&mut self) {
        let mut c = self.child.take().unwrap();
        kill(c.id() as i32, libc::SIGKILL);
        let _ = c.wait();
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

    fn run_as_nobody(&self, args: &[&str]) -> Output {
        vpstag_as(NOBODY, &self.socket, args)
    }

    /// `vpstag start NAME -- CMD...`: the first process's pid.
    fn start_vps(&self, name: &str, cmd: &[&str]) -> i32 {
        let mut args = vec!["start", name, "--"];
        args.extend_from_slice(cmd);
        let out = self.run(&args);
        assert!(out.status.success(), "start {name}: {}\n{}", text(&out.stderr), self.log());
        let pid: i32 = text(&out.stdout).trim().parse().expect("start prints a pid");
        self.seen.borrow_mut().push((pid, start_time(pid)));
        pid
    }

    fn ps(&self, name: Option<&str>) -> Vec<Value> {
        self.try_ps(name).unwrap_or_else(|e| panic!("{e}"))
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
            let pid = p["pid"].as_i64().unwrap() as i32;
            self.seen.borrow_mut().push((pid, p["start"].as_u64().unwrap_or(0)));
        }
        Ok(procs)
    }

    fn pids_of(&self, name: &str, cmd: &str) -> Vec<i32> {
        self.ps(Some(name)).iter().filter(|p| p["cmd"] == cmd).map(|p| p["pid"].as_i64().unwrap() as i32).collect()
    }

    fn which(&self, pid: i32) -> (Option<i32>, String) {
        let out = self.run(&["which", &pid.to_string()]);
        (out.status.code(), text(&out.stdout).trim().to_string())
    }

    fn members(&self, name: &str) -> Vec<i32> {
        self.ps(Some(name)).iter().map(|p| p["pid"].as_i64().unwrap() as i32).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Members the daemon still knows of, then every pid seen (if it is still the same process).
        if self.child.is_some() {
            let _ = self.try_ps(None);
        }
        for (pid, start) in self.seen.borrow().iter() {
            if *start == 0 || start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        for c in self.extra.borrow_mut().iter_mut() {
            // Each was started in a process group of its own: the whole group goes.
            kill(-(c.id() as i32), libc::SIGKILL);
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
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
            eprintln!("--- daemon log ({}) ---\n{}", self.backend, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn two_vpses_an_untracked_tree_ps_which_and_exec() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("basic", "cnproc");
    let a = d.start_vps("alpha", &["sh", "-c", "sleep 201 & sleep 202 & wait"]);
    let b = d.start_vps("beta", &["sh", "-c", "sleep 203 & wait"]);
    let untracked = Command::new("sh").args(["-c", "sleep 204 & sleep 205; wait"]).process_group(0).spawn().unwrap();
    let untracked_pid = untracked.id() as i32;
    d.extra.borrow_mut().push(untracked);
    wait_until("the sleeps", Duration::from_secs(10), || {
        d.pids_of("alpha", "sleep 202").len() == 1 && d.pids_of("beta", "sleep 203").len() == 1
    });

    let all = d.ps(None);
    for p in &all {
        for key in ["pid", "ppid", "vps", "cmd"] {
            assert!(!p[key].is_null(), "ps --json entry without {key}: {p}");
        }
    }
    let vps_of = |pid: i32| all.iter().find(|p| p["pid"] == pid).map(|p| p["vps"].as_str().unwrap().to_string());
    assert_eq!(vps_of(a).as_deref(), Some("alpha"));
    assert_eq!(vps_of(b).as_deref(), Some("beta"));
    assert_eq!(vps_of(untracked_pid), None, "the untracked tree is not listed: {all:?}");
    assert!(all.iter().all(|p| p["cmd"] != "sleep 204" && p["cmd"] != "sleep 205"));
    assert_eq!(d.ps(Some("alpha")).len(), 4, "init, sh and two sleeps");

    let s202 = d.pids_of("alpha", "sleep 202")[0];
    assert_eq!(d.which(s202), (Some(0), "alpha".to_string()));
    assert_eq!(d.which(b), (Some(0), "beta".to_string()));
    assert_eq!(d.which(untracked_pid).0, Some(1), "an untagged process: exit 1");
    assert_eq!(d.run(&["which", "not-a-pid"]).status.code(), Some(2));

    // Starting a name that is running is an error.
    let again = d.run(&["start", "alpha", "--", "sleep", "1"]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already running"), "{}", text(&again.stderr));

    // exec: the loader becomes a subreaper, registers itself, and runs the command as its child.
    let loader = d
        .cmd(&["exec", "beta", "--", "sh", "-c", "sleep 206 & wait"])
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let loader_pid = loader.id() as i32;
    d.extra.borrow_mut().push(loader);
    wait_until("the exec'd command's child", Duration::from_secs(10), || d.pids_of("beta", "sleep 206").len() == 1);
    assert_eq!(d.which(loader_pid), (Some(0), "beta".to_string()));
    let procs = d.ps(Some("beta"));
    let lp = procs.iter().find(|p| p["pid"] == loader_pid).expect("the loader is a member");
    assert_eq!(lp["source"], "loader", "{procs:?}");
    let sh = procs.iter().find(|p| p["cmd"] == "sh -c sleep 206 & wait").expect("the command is a member");
    assert_eq!(sh["ppid"], loader_pid, "the command runs below the loader: {procs:?}");
    assert_eq!(sh["source"], "event", "{procs:?}");
    // exec into an unknown VPS is refused.
    // Like `run` (and `env`): vpstag's own failure is 125, a CMD not found 127, one that cannot
    // be executed 126, so that none is taken for CMD's own status.
    let bad = d.run(&["exec", "nope", "--", "true"]);
    assert!(text(&bad.stderr).contains("unknown VPS"), "{}", text(&bad.stderr));
    assert_eq!(bad.status.code(), Some(125), "{}", text(&bad.stderr));
    let missing = d.run(&["exec", "beta", "--", "/nonexistent/vpstag-no-such-command"]);
    assert_eq!(missing.status.code(), Some(127), "{}", text(&missing.stderr));
    let plain = std::env::temp_dir().join(format!("vpstag-e2e-not-executable-{}", std::process::id()));
    std::fs::write(&plain, "not a program\n").unwrap();
    let not_exec = d.run(&["exec", "beta", "--", plain.to_str().unwrap()]);
    let _ = std::fs::remove_file(&plain);
    assert_eq!(not_exec.status.code(), Some(126), "{}", text(&not_exec.stderr));

    // list: first PID, member count, start time, CPU and memory.
    let out = d.run(&["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let alpha = list.as_array().unwrap().iter().find(|v| v["name"] == "alpha").unwrap().clone();
    assert_eq!(alpha["first"], a);
    assert_eq!(alpha["members"], 4);
    assert!(alpha["started"].as_u64().unwrap() > 1_600_000_000);
    assert!(alpha["rss_bytes"].as_u64().unwrap() > 0);
    assert!(!alpha["cpu_ms"].is_null());
    assert!(text(&d.run(&["list"]).stdout).contains("alpha"));

    // The tree view nests the sleeps under sh under the first process.
    let tree = text(&d.run(&["ps", "--tree", "alpha"]).stdout);
    assert!(tree.starts_with("VPS alpha (4 processes)"), "{tree}");
    assert!(tree.contains(&format!("└─{a} ")), "{tree}");
    assert!(tree.contains("\n  └─") && tree.contains("\n    ├─") && tree.contains("sleep 201"), "{tree}");

    // check: no divergence.
    let out = d.run(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["divergences"], serde_json::json!([]), "{report}");
    assert!(report["stats"]["resyncs"].is_u64());
    assert_eq!(out.status.code(), Some(0));

    // events: the forks and execs of beta, with tags.
    let out = d.run(&["events", "beta", "--json"]);
    let evs: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(evs.iter().all(|e| e["vps"] == "beta"));
    assert!(evs.iter().any(|e| e["event"] == "exec" && e["cmd"] == "sleep 206"), "{evs:?}");
    assert!(evs.iter().any(|e| e["event"] == "fork"), "{evs:?}");

    // stop: kills and forgets.
    assert!(d.run(&["stop", "--grace", "1", "alpha"]).status.success());
    assert!(!alive(s202));
    let out = d.run(&["ps", "alpha"]);
    assert!(!out.status.success() && text(&out.stderr).contains("unknown VPS"), "{}", text(&out.stderr));
    let _ = untracked_pid;
}

/// start, ps, which and kill, with a double-forked daemon that escaped the first process: run
/// with cnproc and with ptrace.
fn kill_reaches_escaped_daemons(backend: &'static str) {
    let d = Daemon::new("kill", backend);
    // The command double-forks a daemon (setsid) and exits: the first process exits with it, and
    // the daemon is re-parented outside the VPS's tree.
    let first = d.start_vps("esc", &["sh", "-c", "setsid sh -c 'sleep 301 & sleep 302 &'; sleep 0.2; exit 0"]);
    wait_until("the first process to exit", Duration::from_secs(10), || !alive(first));
    let sleeps: Vec<i32> = d.pids_of("esc", "sleep 301").into_iter().chain(d.pids_of("esc", "sleep 302")).collect();
    assert_eq!(sleeps.len(), 2, "both escaped sleeps are still members: {:?}", d.ps(Some("esc")));
    for &p in &sleeps {
        assert!(alive(p));
        assert_eq!(d.which(p), (Some(0), "esc".to_string()), "[{backend}]");
        let ppid = d.ps(Some("esc")).iter().find(|x| x["pid"] == p).unwrap()["ppid"].as_i64().unwrap() as i32;
        assert_ne!(ppid, first, "re-parented away from the dead first process");
    }
    let out = d.run(&["kill", "esc"]);
    assert!(out.status.success(), "[{backend}] kill: {}", text(&out.stderr));
    wait_until("the escaped sleeps to die", Duration::from_secs(10), || sleeps.iter().all(|p| !alive(*p)));
    wait_until("an empty VPS", Duration::from_secs(10), || d.members("esc").is_empty());

    // SIGKILL while the VPS forks all the time: repeated until none is left.
    d.start_vps("forky", &["sh", "-c", "while :; do sleep 303 & sleep 0.01; done"]);
    wait_until("some sleeps", Duration::from_secs(10), || d.pids_of("forky", "sleep 303").len() >= 5);
    let before = d.members("forky");
    let out = d.run(&["kill", "--signal", "KILL", "forky"]);
    assert!(out.status.success(), "[{backend}] kill -s KILL: {}", text(&out.stderr));
    assert!(d.members("forky").is_empty(), "[{backend}] members left: {:?}", d.ps(Some("forky")));
    wait_until("every killed member to be gone", Duration::from_secs(10), || before.iter().all(|p| !alive(*p)));
}

#[test]
fn kill_reaches_an_escaped_double_fork_daemon_cnproc() {
    if cnproc_available() {
        kill_reaches_escaped_daemons("cnproc");
    }
}

#[test]
fn kill_reaches_an_escaped_double_fork_daemon_ptrace() {
    kill_reaches_escaped_daemons("ptrace");
}

#[test]
fn restart_after_kill_9_recovers_live_members_only() {
    if !cnproc_available() {
        return;
    }
    let mut d = Daemon::new("restart", "cnproc");
    let first = d.start_vps("keep", &["sh", "-c", "sleep 401 & sleep 402 & wait"]);
    d.start_vps("gone", &["sleep", "403"]);
    wait_until("the sleeps", Duration::from_secs(10), || d.pids_of("keep", "sleep 402").len() == 1);
    let s401 = d.pids_of("keep", "sleep 401")[0];
    let s402 = d.pids_of("keep", "sleep 402")[0];
    let gone = d.pids_of("gone", "sleep 403")[0];
    let sh = d.pids_of("keep", "sh -c sleep 401 & sleep 402 & wait")[0];
    let old_pid = d.pid();

    d.crash();
    // While the daemon is down: one member dies, a whole VPS ends, and a member forks.
    kill(s401, libc::SIGKILL);
    kill(gone, libc::SIGKILL);
    wait_until("the killed sleeps to be gone", Duration::from_secs(5), || !alive(s401) && !alive(gone));
    d.start();
    assert_ne!(d.pid(), old_pid);

    let members = d.members("keep");
    for p in [first, sh, s402] {
        assert!(members.contains(&p), "member {p} recovered: {members:?}\n{}", d.log());
        assert_eq!(d.which(p), (Some(0), "keep".to_string()));
    }
    assert!(!members.contains(&s401), "a member that died meanwhile does not come back: {members:?}");
    assert_eq!(d.which(s401).0, Some(1));
    assert!(d.members("gone").is_empty(), "{:?}", d.ps(Some("gone")));
    // The recovered VPS is still tracked: a new child of a recovered member is tagged.
    let out = d.run(&["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let keep = list.as_array().unwrap().iter().find(|v| v["name"] == "keep").expect("keep is listed").clone();
    assert_eq!(keep["first"], first);
    assert_eq!(keep["members"], 3);
    assert!(d.log().contains("recovered"), "{}", d.log());
    // A name whose VPS ended while the daemon was down is free again.
    d.start_vps("gone", &["sleep", "404"]);
    // SIGTERM stops the daemon cleanly; the VPSes keep running.
    let _ = d.ps(None);
    let mut c = d.child.take().unwrap();
    kill(c.id() as i32, libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "the daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", d.log());
    assert!(d.log().contains("stopped"));
    assert!(!d.socket.exists(), "the socket is removed");
    assert!(alive(s402), "a VPS process outlives the daemon's stop");
    d.start();
    assert_eq!(d.which(s402), (Some(0), "keep".to_string()), "and is still tagged after a clean restart");
    // Events still flow for recovered members: kill the surviving sleep and see its exit.
    kill(s402, libc::SIGTERM);
    wait_until("the recovered member's exit to be seen", Duration::from_secs(10), || {
        !d.members("keep").contains(&s402)
    });
}

#[test]
fn a_non_root_user_is_refused_on_anothers_vps_and_allowed_on_its_own() {
    if !cnproc_available() || !is_root() {
        return;
    }
    let d = Daemon::new("users", "cnproc");
    d.start_vps("rootvps", &["sleep", "501"]);
    let out = d.run_as_nobody(&["start", "mine", "--", "sh", "-c", "sleep 502 & wait"]);
    assert!(out.status.success(), "start as nobody: {}\n{}", text(&out.stderr), d.log());
    let mine_first: i32 = text(&out.stdout).trim().parse().unwrap();
    d.seen.borrow_mut().push((mine_first, start_time(mine_first)));
    wait_until("nobody's sleep", Duration::from_secs(10), || d.pids_of("mine", "sleep 502").len() == 1);
    // Its processes run with its credentials, not the daemon's.
    for p in d.ps(Some("mine")) {
        assert_eq!(p["uid"], NOBODY, "{p}");
    }
    let root_sleep = d.pids_of("rootvps", "sleep 501")[0];

    // Refused on root's VPS.
    for args in [
        vec!["kill", "rootvps"],
        vec!["stop", "rootvps"],
        vec!["ps", "rootvps"],
        vec!["exec", "rootvps", "--", "true"],
        vec!["which", &*Box::leak(root_sleep.to_string().into_boxed_str())],
    ] {
        let out = d.run_as_nobody(&args);
        assert!(!out.status.success(), "{args:?} allowed");
        assert!(text(&out.stderr).contains("permission denied"), "{args:?}: {}", text(&out.stderr));
    }
    assert!(alive(root_sleep));
    // Sees only its own.
    let out = d.run_as_nobody(&["ps", "--json"]);
    let procs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(procs.as_array().unwrap().iter().all(|p| p["vps"] == "mine"), "{procs}");
    let out = d.run_as_nobody(&["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // Root sees both.
    let out = d.run(&["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // Allowed on its own: which, exec, kill.
    let s502 = d.pids_of("mine", "sleep 502")[0];
    let out = d.run_as_nobody(&["which", &s502.to_string()]);
    assert_eq!((out.status.code(), text(&out.stdout).trim().to_string()), (Some(0), "mine".to_string()));
    let out = d.run_as_nobody(&["exec", "mine", "--", "sh", "-c", "echo joined"]);
    assert!(out.status.success() && text(&out.stdout).contains("joined"), "{}", text(&out.stderr));
    let out = d.run_as_nobody(&["kill", "mine"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("nobody's VPS to end", Duration::from_secs(10), || !alive(s502));
    let out = d.run_as_nobody(&["stop", "mine"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn raw_exchange(socket: &Path, send: &[u8], replies: usize) -> Vec<Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(send).unwrap();
    let mut r = BufReader::new(s);
    (0..replies)
        .map(|_| {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("reply {l:?} is not JSON: {e}"))
        })
        .collect()
}

#[test]
fn garbage_and_oversized_lines_get_an_error_reply_and_the_daemon_keeps_serving() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("garbage", "cnproc");
    let mut req = Vec::new();
    req.extend_from_slice(b"this is not json\n");
    req.extend_from_slice(&vec![b'x'; 300_000]);
    req.push(b'\n');
    req.extend_from_slice(b"[1,2,3]\n");
    req.extend_from_slice(b"{\"v\":99,\"op\":\"list\"}\n");
    req.extend_from_slice(b"{\"v\":1,\"op\":\"format_disk\"}\n");
    req.extend_from_slice(b"{\"v\":1,\"op\":\"which\",\"pid\":\"x\"}\n");
    req.extend_from_slice(b"\xff\xfe\x00\n");
    req.extend_from_slice(b"{\"v\":1,\"op\":\"hello\"}\n");
    let replies = raw_exchange(&d.socket, &req, 8);
    let kinds: Vec<&str> = replies.iter().map(|r| r["error"]["kind"].as_str().unwrap_or("")).collect();
    assert_eq!(
        kinds,
        [
            "bad_request",
            "too_long",
            "bad_request",
            "unsupported_version",
            "bad_request",
            "bad_request",
            "bad_request",
            ""
        ]
    );
    for r in &replies[..7] {
        assert_eq!(r["ok"], false);
        assert!(r["error"]["message"].as_str().unwrap().len() > 5);
    }
    assert_eq!(replies[7]["ok"], true);
    assert_eq!(replies[7]["daemon_pid"], d.pid());
    // An endless line without a newline, then the connection is dropped.
    {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        let _ = s.write_all(&vec![b'{'; 1 << 20]);
    }
    // The daemon is still there for everyone.
    let pid = d.start_vps("after", &["sleep", "601"]);
    assert_eq!(d.which(pid), (Some(0), "after".to_string()));
    assert!(d.child.as_ref().is_some());
    let out = d.run(&["list"]);
    assert!(out.status.success());
}

#[test]
fn errors_name_the_fix() {
    let dir = std::env::temp_dir().join(format!("vpstag-daemon-none-{}", std::process::id()));
    let sock = dir.join("nobody-here.sock");
    for args in [vec!["list"], vec!["which", "1"], vec!["start", "x", "--", "true"], vec!["exec", "x", "--", "true"]] {
        let out = Command::new(BIN).arg("--socket").arg(&sock).args(&args).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("start it with `vpstag daemon`"), "{args:?}: {err}");
    }
    // VPSTAG_SOCKET is honoured.
    let out = Command::new(BIN).env("VPSTAG_SOCKET", &sock).args(["list"]).output().unwrap();
    assert!(text(&out.stderr).contains(&*sock.to_string_lossy()), "{}", text(&out.stderr));
    assert_eq!(
        Command::new(BIN).env("VPSTAG_SOCKET", &sock).args(["which", "1"]).output().unwrap().status.code(),
        Some(2)
    );
}

#[test]
fn the_library_client_answers_and_follows_events() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("client", "cnproc");
    let first = d.start_vps("lib", &["sh", "-c", "sleep 701 & wait"]);
    let mut c = vpstag::client::Client::connect_to(&d.socket).unwrap();
    let pid = vpstag::Pid::new(first).unwrap();
    assert_eq!(c.vps_of(pid).unwrap().map(|v| v.name).as_deref(), Some("lib"));
    wait_until("the sleep", Duration::from_secs(10), || d.pids_of("lib", "sleep 701").len() == 1);
    assert!(c.members("lib").unwrap().contains(&pid));
    assert_eq!(c.hello().unwrap().daemon_pid.as_raw(), d.pid());
    let err = c.members("nope").unwrap_err();
    assert_eq!(err.kind(), Some(vpstag::protocol::ErrorKind::UnknownVps), "{err}");

    let events = vpstag::client::Client::connect_to(&d.socket).unwrap().events(Some("lib"), true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for e in events {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    // Something new happens in the VPS: a loader joins and runs a command.
    let loader = d.cmd(&["exec", "lib", "--", "sh", "-c", "/bin/sleep 0.1; exit 7"]).status().unwrap();
    assert_eq!(loader.code(), Some(7));
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => {
                let e = e.unwrap();
                assert_eq!(e.vps, "lib");
                let done = e.event == "exit" && e.code == Some(7);
                seen.push(e);
                if done {
                    break;
                }
            }
            Err(_) => continue,
        }
    }
    assert!(seen.iter().any(|e| e.event == "exec" && e.cmd.as_deref() == Some("/bin/sleep 0.1")), "{seen:?}");
    assert!(seen.iter().any(|e| e.event == "exit" && e.code == Some(7)), "{seen:?}");
    // The CLI's follow mode prints the same, one JSON object a line.
    let mut f =
        d.cmd(&["events", "--json", "--follow", "lib"]).stdout(Stdio::piped()).process_group(0).spawn().unwrap();
    let mut lines = BufReader::new(f.stdout.take().unwrap()).lines();
    let first_line = lines.next().unwrap().unwrap();
    let v: Value = serde_json::from_str(&first_line).unwrap();
    assert_eq!(v["vps"], "lib");
    d.extra.borrow_mut().push(f);
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let s = text(&out.stdout);
        assert!(s.contains("vpstag") && s.contains("daemon") && s.contains("which"), "{shell}");
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(s.starts_with(".ie") || s.contains(".TH vpstag"), "{}", &s[..s.len().min(200)]);
    assert!(s.contains("daemon"));
}

#[test]
fn a_fork_storm_in_one_vps_does_not_stop_the_daemon_serving_others() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("storm", "cnproc");
    d.start_vps("calm", &["sh", "-c", "sleep 801 & wait"]);
    wait_until("calm's sleep", Duration::from_secs(10), || d.pids_of("calm", "sleep 801").len() == 1);
    let calm = d.pids_of("calm", "sleep 801")[0];
    // A bounded storm (a real fork bomb would hurt the machine more than the daemon): four loops
    // forking short-lived processes as fast as they can.
    d.start_vps(
        "storm",
        &[
            "sh",
            "-c",
            "for j in 1 2 3 4; do (i=0; while [ $i -lt 1500 ]; do /bin/true & i=$((i+1)); done; wait) & done; wait",
        ],
    );
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        let t = Instant::now();
        assert_eq!(d.which(calm), (Some(0), "calm".to_string()), "calm keeps its tag during the storm");
        slowest = slowest.max(t.elapsed());
        answers += 1;
    }
    assert!(slowest < Duration::from_secs(5), "slowest answer during the storm: {slowest:?}");
    assert!(answers >= 3, "only {answers} answers in 4 s");
    wait_until("the storm to end", Duration::from_secs(60), || d.members("storm").is_empty());
    assert_eq!(d.members("calm").len(), 3);
    let out = d.run(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<&Value> = report["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["vps"] == "calm" || x["expected"] == "calm" || x["vps"] == "storm" || x["expected"] == "storm")
        .collect();
    assert!(bad.is_empty(), "{report}");
}

/// The backends this build has, for tests that run under each.
fn daemon_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cnproc_available() {
        v.push("cnproc");
    }
    v.push("ptrace");
    // Built in when the library has its `ebpf` feature (`--features vpstag/ebpf`, which does not
    // turn on this package's own feature): the library says so when it was built without it.
    match vpstag::open_backend(vpstag::BackendChoice::Ebpf) {
        Ok(_) => v.push("ebpf"),
        Err(e) => eprintln!("skipping ebpf: {e}"),
    }
    v
}

/// A program brought in with `vpstag exec` from outside the VPS makes a `clone(CLONE_PARENT)`
/// child (the kernel names the caller's parent as its parent) and a setsid-orphaned grandchild.
/// Every one of them is tagged, `check` sees no divergence, all are still members after the
/// daemon is killed with -9 and restarted (nothing of the VPS died with it), and
/// `kill --signal KILL` ends them all.
fn joined_program_tree_is_tagged_and_survives_a_daemon_crash(backend: &'static str) {
    let mut d = Daemon::new("join", backend);
    let first = d.start_vps("jv", &["sleep", "310"]);
    // clone(CLONE_PARENT | SIGCHLD) by raw syscall (56 on x86_64): the child's parent is the
    // caller's parent. Then a double fork with setsid, then exec.
    let prog = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)
if pid == 0:
    os.execv("/bin/sleep", ["sleep", "311"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "312"])
    os._exit(0)
os.wait()
os.execv("/bin/sleep", ["sleep", "313"])
"#;
    let loader = d
        .cmd(&["exec", "jv", "--", "/usr/bin/python3", "-c", prog])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let shim = loader.id() as i32;
    d.extra.borrow_mut().push(loader);
    let cmds = ["sleep 311", "sleep 312", "sleep 313"];
    wait_until("the joined program's three sleeps", Duration::from_secs(20), || {
        cmds.iter().all(|c| d.pids_of("jv", c).len() == 1)
    });
    let pids: Vec<i32> = cmds.iter().map(|c| d.pids_of("jv", c)[0]).collect();
    let procs = d.ps(Some("jv"));
    let ppid = |p: i32| procs.iter().find(|x| x["pid"] == p).map(|x| x["ppid"].as_i64().unwrap() as i32);
    assert_eq!(ppid(pids[0]), Some(shim), "[{backend}] the CLONE_PARENT child is born below the shim: {procs:?}");
    assert_eq!(ppid(pids[1]), Some(shim), "[{backend}] the setsid orphan is re-parented to the shim: {procs:?}");
    for &p in &pids {
        assert_eq!(d.which(p), (Some(0), "jv".to_string()), "[{backend}] {p}: {procs:?}");
    }
    let check = d.run(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&check.stdout).unwrap_or(Value::Null);
    assert_eq!(report["divergences"], serde_json::json!([]), "[{backend}] check: {}", text(&check.stdout));

    d.crash();
    for &p in pids.iter().chain([first, shim].iter()) {
        assert!(alive(p), "[{backend}] process {p} of the VPS survives the daemon's crash");
    }
    d.start();
    wait_until("every member to be known again", Duration::from_secs(20), || {
        let m = d.members("jv");
        pids.iter().chain([first, shim].iter()).all(|p| m.contains(p))
    });
    for &p in &pids {
        assert_eq!(d.which(p), (Some(0), "jv".to_string()), "[{backend}] {p} after the restart\n{}", d.log());
    }
    let out = d.run(&["kill", "--signal", "KILL", "jv"]);
    assert!(out.status.success(), "[{backend}] kill: {}", text(&out.stderr));
    wait_until("every process of the VPS to die", Duration::from_secs(10), || {
        pids.iter().chain([first, shim].iter()).all(|p| !alive(*p))
    });
}

#[test]
fn a_joined_programs_clone_parent_child_and_setsid_orphan_are_tagged_under_every_backend() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    for backend in daemon_backends() {
        joined_program_tree_is_tagged_and_survives_a_daemon_crash(backend);
    }
}

/// Runs `python3 -c prog` as user 65534 with piped stdin/stdout (an attacker script).
fn spawn_attacker(prog: &str, socket: &Path) -> Child {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", prog])
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("running python3 as 65534")
}

/// Starts `/bin/sleep 600` as uid 65533 on exactly pid `pid` (clone3 with `set_tid`: root only),
/// as a pid-reusing victim would be born. `None` when the pid is taken.
fn spawn_on_pid(pid: i32) -> Option<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let path = c"/bin/sleep";
    let a0 = c"sleep";
    let a1 = c"600";
    let argv = [a0.as_ptr(), a1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let tid = pid;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: &tid as *const i32 as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 with a valid argument block; the child only calls async-signal-safe
    // functions on data prepared before (setresgid, setresuid, execve, _exit).
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        // SAFETY: in the child: raw system calls only.
        unsafe {
            libc::setresgid(65533, 65533, 65533);
            libc::setresuid(65533, 65533, 65533);
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    (r > 0).then_some(r as i32)
}

/// The stale-peer attack: user 65534 keeps a connection whose peer has exited; another user's
/// process is then born on that pid, and the attacker sends `join` / `register_first` on the old
/// connection. Neither may take the victim: the daemon checks that the peer is still the process
/// that connected (pidfd).
#[test]
fn a_connection_whose_peer_exited_cannot_register_or_join_a_process_born_on_its_pid() {
    if !cnproc_available() || !is_root() {
        return;
    }
    let d = Daemon::new("stalepeer", "cnproc");
    let out = d.run_as_nobody(&["start", "a", "--", "sleep", "620"]);
    assert!(out.status.success(), "start as nobody: {}", text(&out.stderr));
    let first: i32 = text(&out.stdout).trim().parse().unwrap();
    d.seen.borrow_mut().push((first, start_time(first)));
    // Two connections opened by short-lived children, handed to the parent, children reaped.
    let prog = r#"
import os, socket, sys
path = sys.argv[1]
held = []
for _ in range(2):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        socket.send_fds(b, [b"x"], [s.fileno()])
        os._exit(0)
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    os.waitpid(pid, 0)
    held.append((pid, socket.socket(fileno=fds[0])))
print(" ".join(str(p) for p, _ in held), flush=True)
sys.stdin.readline()
for (p, s), req in zip(held, [b'{"v":1,"op":"join","name":"a"}\n', b'{"v":1,"op":"register_first","name":"evil"}\n']):
    s.sendall(req)
    print(s.makefile().readline().strip(), flush=True)
"#;
    let mut att = spawn_attacker(prog, &d.socket);
    let mut out = BufReader::new(att.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let dead: Vec<i32> = line.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(dead.len(), 2, "{line:?}");
    let victims: Vec<i32> = dead.iter().map(|&p| spawn_on_pid(p).unwrap_or_else(|| panic!("pid {p} taken"))).collect();
    let victims_start: Vec<u64> = victims.iter().map(|&v| start_time(v)).collect();
    d.seen.borrow_mut().extend(victims.iter().copied().zip(victims_start.iter().copied()));
    att.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        replies.push(l);
    }
    d.extra.borrow_mut().push(att);
    for r in &replies {
        assert!(r.starts_with("{\"ok\":false") && r.contains("no_such_process"), "refused: {replies:?}");
    }
    for &v in &victims {
        assert_eq!(d.which(v).0, Some(1), "victim {v} stays untagged: {replies:?}\n{}", d.log());
    }
    let list = d.run(&["list", "--json"]);
    assert!(!text(&list.stdout).contains("evil"), "no VPS registered for the victim: {}", text(&list.stdout));
}

/// A process inside a VPS cannot leave it by starting or joining another VPS (it would escape the
/// provider's stop, kill and accounting).
#[test]
fn a_member_cannot_start_or_join_another_vps_from_inside() {
    if !cnproc_available() || !is_root() {
        return;
    }
    let d = Daemon::new("nested", "cnproc");
    let out = d.run_as_nobody(&["start", "mine", "--", "sleep", "630"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mine_first: i32 = text(&out.stdout).trim().parse().unwrap();
    d.seen.borrow_mut().push((mine_first, start_time(mine_first)));
    let report = d.dir.join("inside.txt");
    std::fs::write(&report, "").unwrap();
    std::fs::set_permissions(&report, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "exec >>{r} 2>&1; setpriv --reuid=65534 --regid=65534 --clear-groups {b} --socket {s} start inner -- sleep 631; \
         echo start=$?; setpriv --reuid=65534 --regid=65534 --clear-groups {b} --socket {s} exec mine -- true; \
         echo exec=$?; echo done; sleep 632",
        r = report.display(),
        b = BIN,
        s = d.socket.display()
    );
    d.start_vps("outer", &["sh", "-c", &script]);
    wait_until("the inside attempts", Duration::from_secs(20), || {
        std::fs::read_to_string(&report).unwrap_or_default().contains("done")
    });
    let said = std::fs::read_to_string(&report).unwrap();
    assert!(said.contains("start=1") || said.contains("start=2"), "start from inside refused: {said}");
    assert!(said.contains("exec=1") || said.contains("exec=2"), "exec from inside refused: {said}");
    assert!(said.contains("inside another"), "the refusal says why: {said}");
    let list = d.run(&["list", "--json"]);
    assert!(!text(&list.stdout).contains("inner"), "{}", text(&list.stdout));
    // Everything the outer VPS ran is still its member, reachable by its stop.
    wait_until("sleep 632 in outer", Duration::from_secs(10), || d.pids_of("outer", "sleep 632").len() == 1);
}

/// Names are per owner: a user's VPS named like root's tools never captures them; root reaches
/// another user's VPS as `uid:name`; one user cannot take unlimited names; one process cannot
/// register itself as the first process of many VPSes.
#[test]
fn names_are_per_owner_and_capped() {
    if !cnproc_available() || !is_root() {
        return;
    }
    let d = Daemon::new("names", "cnproc");
    let out = d.run_as_nobody(&["start", "backup", "--", "sleep", "640"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let squat: i32 = text(&out.stdout).trim().parse().unwrap();
    d.seen.borrow_mut().push((squat, start_time(squat)));
    // Root's `exec backup` does not run inside the squatter's VPS.
    let out = d.run(&["exec", "backup", "--", "true"]);
    assert!(!out.status.success(), "root joined another user's VPS");
    assert!(text(&out.stderr).contains("65534:backup"), "the refusal names the other VPS: {}", text(&out.stderr));
    // Root has a `backup` of its own beside it, and its exec lands there.
    let mine = d.start_vps("backup", &["sleep", "641"]);
    let out = d
        .cmd(&["exec", "backup", "--", "sh", "-c", "sleep 644 >/dev/null 2>&1 & exit 3"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(d.which(mine), (Some(0), "backup".to_string()));
    // What the exec started is in root's own `backup`, not in the other user's.
    wait_until("the exec'd sleep in root's backup", Duration::from_secs(10), || {
        d.pids_of("backup", "sleep 644").len() == 1
    });
    let theirs = d.run(&["ps", "--json", "65534:backup"]);
    assert!(!text(&theirs.stdout).contains("sleep 644"), "{}", text(&theirs.stdout));
    // Root reaches the user's VPS by uid:name; the user by its bare name.
    let ps = d.run(&["ps", "--json", "65534:backup"]);
    assert!(text(&ps.stdout).contains("sleep 640"), "{}", text(&ps.stdout));
    let ps = d.run_as_nobody(&["ps", "--json", "backup"]);
    assert!(text(&ps.stdout).contains("sleep 640") && !text(&ps.stdout).contains("sleep 641"), "{}", text(&ps.stdout));
    // One process registers itself once.
    let prog = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile()
for n in ["n1", "n2"]:
    s.sendall(('{"v":1,"op":"register_first","name":"%s"}\n' % n).encode())
    print(f.readline().strip(), flush=True)
"#;
    let att = spawn_attacker(prog, &d.socket).wait_with_output().unwrap();
    let said = text(&att.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 2, "{said}");
    assert!(lines[0].starts_with("{\"ok\":true"), "{said}");
    assert!(lines[1].starts_with("{\"ok\":false") && lines[1].contains("nested"), "{said}");
    let list = d.run_as_nobody(&["list", "--json"]);
    let v: Value = serde_json::from_slice(&list.stdout).unwrap();
    let n1 = v.as_array().unwrap().iter().find(|x| x["name"] == "n1").expect("n1 listed").clone();
    assert_eq!(n1["first_alive"], false, "its first process exited: {v}");
    assert!(!v.as_array().unwrap().iter().any(|x| x["name"] == "n2"), "{v}");
    // The cap: the user already has backup and n1; it may have 64 in all.
    let mut refused = None;
    for i in 0..70 {
        let out = d.run_as_nobody(&["start", &format!("q{i}"), "--", "sleep", "642"]);
        if !out.status.success() {
            refused = Some((i, text(&out.stderr)));
            break;
        }
        let p: i32 = text(&out.stdout).trim().parse().unwrap();
        d.seen.borrow_mut().push((p, start_time(p)));
    }
    let (i, why) = refused.expect("the 65th VPS of one user is refused");
    assert_eq!(i, 62, "backup + n1 + 62 more = 64: {why}");
    assert!(why.contains("most one user may have"), "{why}");
    // Root is not capped.
    d.start_vps("root-extra", &["sleep", "643"]);
}

/// Under ptrace the daemon is the tracer of every VPS process: a `kill -9` of the daemon while a
/// VPS forks all the time must leave every process alive (not killed, not left stopped), and the
/// restarted daemon must follow them all again (re-seized) with the table equal to the system.
#[test]
fn a_ptrace_daemon_killed_while_its_vps_forks_kills_nothing_and_retags_everything_after_restart() {
    if !is_root() {
        return;
    }
    let mut d = Daemon::new("ptcrash", "ptrace");
    let first = d.start_vps("busy", &["sh", "-c", "sleep 650 & while :; do /bin/true; sleep 0.01; done"]);
    wait_until("sleep 650", Duration::from_secs(10), || d.pids_of("busy", "sleep 650").len() == 1);
    let s650 = d.pids_of("busy", "sleep 650")[0];
    let sh = d.pids_of("busy", "sh -c sleep 650 & while :; do /bin/true; sleep 0.01; done")[0];
    d.crash();
    // Not killed, and not left in a ptrace stop: the loop keeps forking.
    for p in [first, sh, s650] {
        assert!(alive(p), "process {p} survives the tracer's death");
    }
    let state = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).map(String::from))
            .unwrap_or_default()
    };
    wait_until("the VPS to run on untraced (no t/T state)", Duration::from_secs(10), || {
        [first, sh, s650].iter().all(|p| !matches!(state(*p).as_str(), "t" | "T"))
    });
    d.start();
    wait_until("every member to be followed again", Duration::from_secs(20), || {
        let m = d.members("busy");
        [first, sh, s650].iter().all(|p| m.contains(p))
    });
    // New children after the restart are tagged: the re-seized shell's forks are followed.
    let before: Vec<i32> = d.members("busy");
    wait_until("a child born after the restart", Duration::from_secs(10), || {
        d.members("busy").iter().any(|p| !before.contains(p))
    });
    let check = d.run(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&check.stdout).unwrap_or(Value::Null);
    let divergences = report["divergences"].as_array().cloned().unwrap_or_default();
    // `check` reports only what lasts (a /bin/true forked just before its scan is not a
    // divergence): every member followed again means none at all.
    assert!(divergences.is_empty(), "check after the restart: {}", text(&check.stdout));
    let out = d.run(&["kill", "--signal", "KILL", "busy"]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    wait_until("the VPS to die", Duration::from_secs(10), || [first, sh, s650].iter().all(|p| !alive(*p)));
}

/// The journal keeps only roots, and members whose parent exited while they live on: a daemon
/// that escaped with a double fork after its VPS's first process exited is no longer below any
/// root, yet it is still a member after the daemon is killed with -9 and restarted.
#[test]
fn an_escaped_daemon_whose_root_exited_is_still_a_member_after_a_restart() {
    if !cnproc_available() {
        return;
    }
    let mut d = Daemon::new("orphanroot", "cnproc");
    let first = d.start_vps("esc2", &["sh", "-c", "setsid sh -c 'sleep 661 & sleep 662 &'; sleep 0.2; exit 0"]);
    wait_until("the first process to exit", Duration::from_secs(10), || !alive(first));
    wait_until("both escaped sleeps", Duration::from_secs(10), || {
        d.pids_of("esc2", "sleep 661").len() == 1 && d.pids_of("esc2", "sleep 662").len() == 1
    });
    let sleeps = [d.pids_of("esc2", "sleep 661")[0], d.pids_of("esc2", "sleep 662")[0]];
    let journal_has_them = || {
        let j = std::fs::read_to_string(d.state.join("journal.jsonl")).unwrap_or_default();
        sleeps.iter().all(|p| j.contains(&format!("\"pid\":{p},")))
    };
    wait_until("the orphans to be journaled", Duration::from_secs(10), journal_has_them);
    d.crash();
    d.start();
    for p in sleeps {
        assert_eq!(d.which(p), (Some(0), "esc2".to_string()), "orphan {p} after the restart\n{}", d.log());
    }
    // A compaction keeps them (a clean stop writes a snapshot); a second restart still finds them.
    let mut c = d.child.take().unwrap();
    kill(c.id() as i32, libc::SIGTERM);
    let _ = c.wait();
    d.start();
    for p in sleeps {
        assert_eq!(d.which(p), (Some(0), "esc2".to_string()), "orphan {p} after a snapshot\n{}", d.log());
    }
}

/// `vpstag ps | head -1` and the like: output into a pipe whose reader has gone ends the command
/// quietly, never with a panic (exit 101).
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("epipe", "cnproc");
    d.start_vps("pipe", &["sh", "-c", "sleep 670 & sleep 671 & wait"]);
    wait_until("the sleeps", Duration::from_secs(10), || d.pids_of("pipe", "sleep 671").len() == 1);
    for args in
        [vec!["ps"], vec!["ps", "--tree"], vec!["list"], vec!["list", "--json"], vec!["ps", "--json"], vec!["events"]]
    {
        let mut c = d.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // The reader goes before the command has written anything: its first write gets EPIPE.
        drop(c.stdout.take());
        let out = c.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A JSON document a command printed, or the test fails saying what was printed.
fn json_of(what: &str, out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{what} --json printed no JSON ({e}):\n{}\nstderr: {}", text(&out.stdout), text(&out.stderr))
    })
}

/// `--json` on `start`, `which`, `kill` and `stop`: one JSON object on standard output each,
/// with what the text output says, and the same exit statuses.
#[test]
fn start_which_kill_and_stop_print_json() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("json", "cnproc");
    let out = d.run(&["start", "--json", "js", "--", "sh", "-c", "sleep 801 & wait"]);
    assert!(out.status.success(), "start --json: {}\n{}", text(&out.stderr), d.log());
    let v = json_of("start", &out);
    let first = v["pid"].as_i64().unwrap_or_else(|| panic!("start --json without a pid: {v}")) as i32;
    d.seen.borrow_mut().push((first, start_time(first)));
    assert_eq!(v, serde_json::json!({ "vps": "js", "pid": first }));
    wait_until("the sleep", Duration::from_secs(10), || d.pids_of("js", "sleep 801").len() == 1);
    let sleep = d.pids_of("js", "sleep 801")[0];

    let out = d.run(&["which", "--json", &sleep.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(json_of("which", &out), serde_json::json!({ "pid": sleep, "vps": "js" }));
    // An untagged process (this test): "vps" is null, the status still 1, nothing on stderr.
    let me = std::process::id() as i32;
    let out = d.run(&["which", "--json", &me.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(json_of("which", &out), serde_json::json!({ "pid": me, "vps": null }));
    assert_eq!(text(&out.stderr), "");

    // A signal by number still works; the JSON names it.
    let out = d.run(&["kill", "--json", "js", "--signal", "18"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json_of("kill", &out);
    assert_eq!((&v["vps"], &v["signal"]), (&Value::from("js"), &Value::from("CONT")), "{v}");
    assert!(v["signalled"].as_u64().is_some_and(|n| n >= 3), "init, sh and sleep: {v}");
    assert_eq!(text(&out.stderr), "", "the JSON replaces the sentence");

    let out = d.run(&["stop", "--json", "js", "--grace", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json_of("stop", &out);
    assert_eq!(v["vps"], "js", "{v}");
    assert!(v["signalled"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(text(&out.stderr), "", "no progress report and no sentence with --json");
    wait_until("the stopped VPS's sleep to end", Duration::from_secs(10), || !alive(sleep));
    assert_eq!(d.run(&["which", "--json", "js"]).status.code(), Some(2), "not a pid: an error");
}

/// `stop` on a VPS whose processes ignore SIGTERM says on stderr, about once a second, which VPS
/// it is waiting for, how many processes and which are left, and how long until SIGKILL.
#[test]
fn stop_says_what_it_waits_for_during_the_grace_period() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("stopwait", "cnproc");
    // SIG_IGN is inherited: sh and its sleep both ignore SIGTERM.
    d.start_vps("stubborn", &["sh", "-c", "trap '' TERM; sleep 802 & wait"]);
    wait_until("the sleep", Duration::from_secs(10), || d.pids_of("stubborn", "sleep 802").len() == 1);
    let sleep = d.pids_of("stubborn", "sleep 802")[0];
    let sh = d.pids_of("stubborn", "sh -c trap '' TERM; sleep 802 & wait")[0];
    let began = Instant::now();
    let out = d.run(&["stop", "stubborn", "--grace", "3"]);
    let took = began.elapsed();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(took >= Duration::from_secs(3), "SIGTERM was ignored, so stop waits the grace period: {took:?}\n{err}");
    let reports: Vec<&str> = err.lines().filter(|l| l.starts_with("vpstag: stopping VPS \"stubborn\": ")).collect();
    assert!(reports.len() >= 2, "a report about every second of the 3 s grace period:\n{err}");
    assert!(reports.len() as u64 <= took.as_secs() + 1, "at most one a second ({took:?}):\n{err}");
    for r in &reports[..2] {
        assert!(r.contains(" processes left ("), "how many (at least sh and sleep): {r}");
        assert!(r.contains(&sleep.to_string()) && r.contains(&sh.to_string()), "which (sh {sh}, sleep {sleep}): {r}");
        assert!(r.contains("; SIGKILL in "), "when SIGKILL comes: {r}");
    }
    assert!(reports[0].ends_with("SIGKILL in 2s") || reports[0].ends_with("SIGKILL in 3s"), "{}", reports[0]);
    assert!(err.contains("VPS \"stubborn\" stopped ("), "{err}");
    wait_until("the stubborn processes to end", Duration::from_secs(10), || !alive(sleep) && !alive(sh));
}

/// The ids of the threads of `pid` (empty when it is gone).
fn tasks(pid: i32) -> Vec<i32> {
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => Vec::new(),
    }
}

/// `which` of a thread id names the VPS of the thread's process; a thread of an untagged process
/// is untagged.
#[test]
fn which_of_a_thread_id_names_its_process_vps() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("thread", "cnproc");
    let prog = "import threading, time\nthreading.Thread(target=time.sleep, args=(803,)).start()\ntime.sleep(803)";
    d.start_vps("threads", &["/usr/bin/python3", "-c", prog]);
    let python = || {
        d.ps(Some("threads"))
            .iter()
            .find(|p| p["cmd"].as_str().is_some_and(|c| c.starts_with("/usr/bin/python3")))
            .and_then(|p| p["pid"].as_i64())
            .map(|p| p as i32)
    };
    wait_until("python and its second thread", Duration::from_secs(10), || {
        python().is_some_and(|p| tasks(p).len() >= 2)
    });
    let pid = python().unwrap_or(0);
    let threads = tasks(pid);
    let tid = threads.iter().copied().find(|t| *t != pid).unwrap_or_else(|| panic!("no second thread in {threads:?}"));
    assert_eq!(d.which(pid), (Some(0), "threads".to_string()));
    assert_eq!(d.which(tid), (Some(0), "threads".to_string()), "thread {tid} of process {pid}");
    let out = d.run(&["which", "--json", &tid.to_string()]);
    assert_eq!(json_of("which", &out), serde_json::json!({ "pid": tid, "vps": "threads" }));

    let (tx, rx) = std::sync::mpsc::channel();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tx.send(unsafe { libc::gettid() });
        let _ = wait.recv();
    });
    let mine = rx.recv().expect("the test thread's id");
    assert_eq!(d.which(mine).0, Some(1), "a thread of this untagged test process");
    drop(done);
    let _ = t.join();
}

/// `events --follow NAME` streams that VPS's events only (a root's bare name is its own VPS).
#[test]
fn events_follow_of_one_vps_gets_only_that_vps() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("follow1", "cnproc");
    d.start_vps("fa", &["sleep", "804"]);
    d.start_vps("fb", &["sleep", "805"]);
    let mut f = d.cmd(&["events", "--json", "--follow", "fa"]).stdout(Stdio::piped()).process_group(0).spawn().unwrap();
    let stdout = f.stdout.take().unwrap();
    d.extra.borrow_mut().push(f);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<Value> = Vec::new();
    // Waits for the exit of a command of `vps` with `code`, keeping every line seen.
    let until_exit = |vps: &str, code: i64, seen: &mut Vec<Value>| -> bool {
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                let hit = v["vps"] == vps && v["event"] == "exit" && v["code"] == code;
                seen.push(v);
                if hit {
                    return true;
                }
            }
        }
        false
    };
    // The follower is registered once it shows something new of fa.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(d.cmd(&["exec", "fa", "--", "sh", "-c", "exit 4"]).status().unwrap().code() == Some(4));
        if until_exit("fa", 4, &mut seen) {
            break;
        }
        assert!(Instant::now() < end, "the follower never showed fa's events: {seen:?}");
    }
    assert_eq!(d.cmd(&["exec", "fb", "--", "sh", "-c", "exit 5"]).status().unwrap().code(), Some(5));
    assert_eq!(d.cmd(&["exec", "fa", "--", "sh", "-c", "exit 6"]).status().unwrap().code(), Some(6));
    assert!(until_exit("fa", 6, &mut seen), "fa's exit 6 never came: {seen:?}");
    assert!(seen.iter().all(|v| v["vps"] == "fa"), "events of another VPS reached a follower of fa: {seen:?}");
}

#[test]
fn events_after_resumes_a_follow_with_nothing_twice_and_nothing_left_out() {
    if !cnproc_available() {
        return;
    }
    let d = Daemon::new("after", "cnproc");
    d.start_vps("ra", &["sleep", "807"]);
    let listed = |want_code: i64| -> Vec<Value> {
        let mut evs = Vec::new();
        wait_until("the daemon to keep the exit", Duration::from_secs(30), || {
            let out = d.run(&["events", "ra", "--json"]);
            evs = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            evs.iter().any(|e: &Value| e["event"] == "exit" && e["code"] == want_code)
        });
        evs
    };
    assert_eq!(d.cmd(&["exec", "ra", "--", "sh", "-c", "exit 3"]).status().unwrap().code(), Some(3));
    let before = listed(3);
    // Where a follow that ended would resume: the last exit 3 it saw (`vpstag exec` waits for
    // its command and exits with its code: two exits 3).
    let cut = before
        .iter()
        .rfind(|e| e["event"] == "exit" && e["code"] == 3)
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or_else(|| panic!("no seq on the exit 3: {before:?}"));
    assert_eq!(d.cmd(&["exec", "ra", "--", "sh", "-c", "exit 8"]).status().unwrap().code(), Some(8));
    let missed: Vec<u64> = listed(8).iter().filter_map(|e| e["seq"].as_u64()).filter(|s| *s > cut).collect();
    assert!(!missed.is_empty());

    // A member keeps forking while the follow connects, so that events are recorded during its
    // replay and its subscription: each must come once, in the one or the other.
    let mut forker = d
        .cmd(&["exec", "ra", "--", "sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done; exit 10"])
        .spawn()
        .unwrap();
    let mut f = d
        .cmd(&["events", "ra", "--json", "--after", &cut.to_string()])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let stdout = f.stdout.take().unwrap();
    d.extra.borrow_mut().push(f);
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<Value> = Vec::new();
    let until = |what: &str, done: &dyn Fn(&Value) -> bool, seen: &mut Vec<Value>| {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(100)) {
                let hit = done(&v);
                seen.push(v);
                if hit {
                    return;
                }
            }
        }
        panic!("{what} never came after --after {cut}: {seen:?}");
    };
    // What it missed, exactly, in order: nothing of before the cut, nothing twice.
    let last = *missed.last().unwrap();
    until("the last event listed", &|v| v["seq"].as_u64() >= Some(last), &mut seen);
    let got: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(got[..missed.len()], missed[..], "the events after seq {cut}: {seen:?}");
    // Then it follows: the forker's events and a new one come as they happen.
    assert_eq!(forker.wait().unwrap().code(), Some(10));
    until("the forker's exit", &|v| v["event"] == "exit" && v["code"] == 10, &mut seen);
    assert_eq!(d.cmd(&["exec", "ra", "--", "sh", "-c", "exit 9"]).status().unwrap().code(), Some(9));
    until("the exit 9", &|v| v["event"] == "exit" && v["code"] == 9, &mut seen);
    // Only VPS ra records events here, so its seqs are consecutive: a gap is an event left out
    // between the replay and the subscription, a repeat one given twice.
    let got: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert!(got.len() > 600, "the forker's events: {}", got.len());
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "seq must go up by one from {cut}: {got:?}");
    assert_eq!(got[0], cut + 1);
    assert!(seen.iter().all(|e| e["vps"] == "ra"), "{seen:?}");
}
