//! The daemon's state directory, socket directory and journal, end to end: the real binary, run
//! as root in a temporary directory, with an attacker acting as uid 65534 (`setpriv`).
//!
//! Each test makes its own directory under the system's temporary directory (root's, mode 0755)
//! and removes it at the end; every process a test starts (daemons, VPS processes, the
//! attacker's loop) is killed by pid, on failure paths too. Needs root; the tests that run VPSes
//! use the cnproc backend where it opens, ptrace otherwise.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;
const NOBODY: u32 = 65534;
/// How long a daemon may take to answer or to give up, on a busy machine.
const START: Duration = Duration::from_secs(60);

fn backend() -> &'static str {
    match vpstag::open_backend(vpstag::BackendChoice::Cnproc) {
        Ok(_) => "cnproc",
        Err(_) => "ptrace",
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

/// Runs a command as uid 65534.
fn as_nobody(args: &[&str]) -> Output {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args)
        .stdin(Stdio::null())
        .current_dir("/")
        .output()
        .expect("running setpriv");
    assert!(out.status.success(), "as uid 65534: {args:?}: {}", text(&out.stderr));
    out
}

/// A directory of the test's own (root, 0755), removed with everything in it at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vpstag-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        chmod(&d, 0o755);
        Scratch(d)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One run of `vpstag daemon`, its standard error in a log file; killed (by pid) when dropped.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    /// VPS processes seen (pid, start time), killed at the end.
    seen: std::cell::RefCell<Vec<(i32, u64)>>,
}

impl Daemon {
    /// Starts `vpstag daemon` with `extra` arguments; `umask000` runs it under `umask 000`.
    fn spawn(s: &Scratch, state: &Path, socket: &Path, extra: &[&str], umask000: bool) -> Daemon {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = s.join(&format!("daemon-{n}.log"));
        let err = std::fs::File::create(&log).unwrap();
        let mut args: Vec<std::ffi::OsString> = vec!["daemon".into(), "--backend".into(), backend().into()];
        args.extend(["--socket".into(), socket.as_os_str().to_owned()]);
        args.extend(["--state-dir".into(), state.as_os_str().to_owned()]);
        args.extend(extra.iter().map(|a| std::ffi::OsString::from(*a)));
        let mut c = if umask000 {
            let mut c = Command::new("sh");
            c.args(["-c", "umask 000 && exec \"$0\" \"$@\"", BIN]).args(&args);
            c
        } else {
            let mut c = Command::new(BIN);
            c.args(&args);
            c
        };
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().expect("starting the daemon");
        Daemon { child: Some(child), socket: socket.to_path_buf(), log, seen: Default::default() }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn answers(&self) -> bool {
        daemon_answers(&self.socket)
    }

    /// Waits until the daemon answers, or has exited (`Err` with its status and log).
    fn ready(&mut self) -> Result<(), String> {
        let end = Instant::now() + START;
        loop {
            if self.answers() {
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("the daemon exited ({st}):\n{}", self.log()));
            }
            if Instant::now() > end {
                return Err(format!("the daemon neither answered nor exited in {START:?}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn must_start(&mut self) {
        if let Err(e) = self.ready() {
            panic!("{e}");
        }
    }

    /// Expects the daemon to refuse to start: its exit status and log.
    fn must_refuse(&mut self) -> (ExitStatus, String) {
        let end = Instant::now() + START;
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                assert!(!st.success(), "the daemon exited with success:\n{}", self.log());
                return (st, self.log());
            }
            assert!(!self.answers(), "the daemon started where it should have refused:\n{}", self.log());
            assert!(Instant::now() < end, "the daemon neither refused nor started in {START:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for the exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGKILL (a crash).
    fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        vpstag(&self.socket, args).output().expect("running vpstag")
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

    /// `ps --json NAME`, recording every pid seen (for the clean-up).
    fn ps(&self, name: &str) -> Vec<Value> {
        let out = self.run(&["ps", "--json", name]);
        assert!(out.status.success(), "ps {name}: {}\n{}", text(&out.stderr), self.log());
        let v: Value = serde_json::from_slice(&out.stdout).expect("ps --json prints JSON");
        let procs = v.as_array().cloned().unwrap_or_default();
        for p in &procs {
            self.seen.borrow_mut().push((p["pid"].as_i64().unwrap_or(0) as i32, p["start"].as_u64().unwrap_or(0)));
        }
        procs
    }

    fn pids_of(&self, name: &str, cmd: &str) -> Vec<i32> {
        self.ps(name).iter().filter(|p| p["cmd"] == cmd).map(|p| p["pid"].as_i64().unwrap_or(0) as i32).collect()
    }

    fn vps_names(&self) -> Vec<String> {
        let out = self.run(&["list", "--json"]);
        assert!(out.status.success(), "list: {}\n{}", text(&out.stderr), self.log());
        let v: Value = serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
        let mut names: Vec<String> =
            v.as_array().into_iter().flatten().filter_map(|x| x["name"].as_str().map(String::from)).collect();
        names.sort();
        names
    }

    /// The daemon's peak resident memory (VmHWM), in kB.
    fn peak_rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{}/status:\n{s}", self.pid()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for (pid, start) in self.seen.borrow().iter() {
            if *start != 0 && start_time(*pid) == *start {
                kill(*pid, libc::SIGKILL);
            }
        }
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// A process group the test started (the attacker's loop), killed when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        kill(-(self.0.id() as i32), libc::SIGKILL);
        kill(self.0.id() as i32, libc::SIGKILL);
        let _ = self.0.wait();
    }
}

fn vps_line(id: u64, name: &str) -> String {
    // A first process that cannot exist (above the largest pid_max).
    format!(
        r#"{{"t":"vps","vps":{{"id":{id},"name":"{name}","first_pid":4194304,"first_start":1,"started":1700000000}},"owner":0}}"#
    )
}

fn files_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn symlinks_in_a_state_dir_owned_by_another_user_are_refused_and_their_target_is_untouched() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("symlinks");
    let victim = s.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    chmod(&victim, 0o644);
    let state = s.join("state");
    std::fs::create_dir(&state).unwrap();
    chown(&state, NOBODY);
    for name in ["lock", "journal.jsonl", "snapshot.json.tmp"] {
        as_nobody(&["ln", "-s", victim.to_str().unwrap(), state.join(name).to_str().unwrap()]);
    }
    let mut d = Daemon::spawn(&s, &state, &s.join("run/vpstag.sock"), &[], false);
    let (_, log) = d.must_refuse();
    assert!(
        log.contains(&format!("{} (the state directory) is a directory owned by uid 65534", state.display())),
        "{log}"
    );
    assert!(log.contains("--state-dir"), "the message says the way out: {log}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the root-owned file is unchanged");
    assert_eq!(mode(&victim), 0o644);
    assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
    for name in ["lock", "journal.jsonl", "snapshot.json.tmp"] {
        assert!(std::fs::symlink_metadata(state.join(name)).unwrap().file_type().is_symlink(), "{name} untouched");
    }
}

#[test]
fn a_state_dir_below_a_directory_another_user_can_write_is_refused() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("parent");
    // Owned by 65534 (who could rename the state directory away and put their own in its place).
    let theirs = s.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown(&theirs, NOBODY);
    let mut d = Daemon::spawn(&s, &theirs.join("state"), &s.join("run/a.sock"), &[], false);
    let (_, log) = d.must_refuse();
    assert!(
        log.contains(&format!(
            "{} (a parent of the state directory) is a directory owned by uid 65534",
            theirs.display()
        )),
        "{log}"
    );
    assert!(!theirs.join("state").exists(), "nothing was created below it");
    // Root's, but writable by everyone (no sticky bit).
    let open = s.join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let mut d = Daemon::spawn(&s, &open.join("state"), &s.join("run/b.sock"), &[], false);
    let (_, log) = d.must_refuse();
    assert!(
        log.contains(&format!("{} (a parent of the state directory) is writable by every user", open.display())),
        "{log}"
    );
    assert!(log.contains("chmod"), "{log}");
    // With the sticky bit (like /tmp) others cannot replace our entries: accepted.
    chmod(&open, 0o1777);
    let mut d = Daemon::spawn(&s, &open.join("state"), &s.join("run/c.sock"), &[], false);
    d.must_start();
    assert_eq!(mode(&open.join("state")), 0o700);
}

#[test]
fn a_socket_dir_another_user_owns_or_can_write_is_refused_and_nothing_is_chmodded() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("socketdir");
    let victim = s.join("victim");
    std::fs::write(&victim, "secret\n").unwrap();
    chmod(&victim, 0o600);
    let sockdir = s.join("sock");
    std::fs::create_dir(&sockdir).unwrap();
    chmod(&sockdir, 0o755);
    chown(&sockdir, NOBODY);
    let sock = sockdir.join("vpstag.sock");
    // The attacker keeps swapping a symbolic link to the victim in at the socket's name.
    let script = format!(
        "while :; do ln -sfn {v} {d}/x.tmp && mv -Tf {d}/x.tmp {d}/vpstag.sock; done",
        v = victim.display(),
        d = sockdir.display()
    );
    let attacker = Group(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting the attacker"),
    );
    wait_until("the attacker's first link", Duration::from_secs(20), || {
        std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_symlink())
    });
    let mut d = Daemon::spawn(&s, &s.join("state"), &sock, &[], false);
    let (_, log) = d.must_refuse();
    drop(attacker);
    assert!(
        log.contains(&format!("{} (the socket directory) is a directory owned by uid 65534", sockdir.display())),
        "{log}"
    );
    assert!(log.contains("--socket"), "{log}");
    assert_eq!(mode(&victim), 0o600, "no chmod landed on the attacker's choice");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret\n");
    // Root's but writable by everyone, even with the sticky bit: refused too.
    let open = s.join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o1777);
    let mut d = Daemon::spawn(&s, &s.join("state2"), &open.join("vpstag.sock"), &[], false);
    let (_, log) = d.must_refuse();
    assert!(log.contains(&format!("{} (the socket directory) is writable by every user", open.display())), "{log}");
}

#[test]
fn under_umask_000_the_created_directories_and_files_get_explicit_modes() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("umask");
    let state = s.join("lib/vpstag");
    let sock = s.join("run/vpstag/vpstag.sock");
    let mut d = Daemon::spawn(&s, &state, &sock, &[], true);
    d.must_start();
    let want = [
        (s.join("lib"), 0o755),
        (state.clone(), 0o700),
        (state.join("lock"), 0o600),
        (state.join("journal.jsonl"), 0o600),
        (state.join("snapshot.json"), 0o600),
        (s.join("run"), 0o755),
        (s.join("run/vpstag"), 0o755),
        (sock.clone(), 0o666),
    ];
    let show = |v: &[(PathBuf, u32)]| v.iter().map(|(p, m)| format!("{} {m:04o}", p.display())).collect::<Vec<_>>();
    let got: Vec<(PathBuf, u32)> = want.iter().map(|(p, _)| (p.clone(), mode(p))).collect();
    assert_eq!(show(&got), show(&want), "modes under umask 000 (got, want)");
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
    // A clean stop removes the socket.
    d.stop();
    assert!(!sock.exists(), "{}", d.log());
}

#[test]
fn a_bad_journal_line_stops_the_daemon_until_discarded_and_a_torn_last_line_is_dropped() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("badline");
    let state = s.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let original = format!("{}\nthis is not JSON\n{}\n", vps_line(1, "alpha"), vps_line(2, "beta"));
    std::fs::write(state.join("journal.jsonl"), &original).unwrap();
    let sock = s.join("run/vpstag.sock");
    let mut d = Daemon::spawn(&s, &state, &sock, &[], false);
    let (_, log) = d.must_refuse();
    assert!(log.contains(&format!("{} line 2", state.join("journal.jsonl").display())), "{log}");
    assert!(log.contains("--discard-bad-journal"), "the message names the way out: {log}");
    assert_eq!(std::fs::read_to_string(state.join("journal.jsonl")).unwrap(), original, "left as it was");

    let mut d = Daemon::spawn(&s, &state, &sock, &["--discard-bad-journal"], false);
    d.must_start();
    assert_eq!(d.vps_names(), vec!["alpha", "beta"], "started from what could be read");
    let copies = files_starting(&state, "journal.bad-");
    assert_eq!(copies.len(), 1, "one copy of the bad journal: {copies:?}");
    assert_eq!(std::fs::read_to_string(&copies[0]).unwrap(), original);
    let log = d.log();
    assert!(log.contains("unreadable lines") && log.contains(&copies[0].display().to_string()), "{log}");
    d.stop();

    // A torn last line (no newline: a write cut short) is dropped, with a log line.
    let state = s.join("torn");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    std::fs::write(state.join("journal.jsonl"), format!("{}\n{{\"t\":\"vps\",\"vp", vps_line(3, "gamma"))).unwrap();
    let mut d = Daemon::spawn(&s, &state, &sock, &[], false);
    d.must_start();
    assert_eq!(d.vps_names(), vec!["gamma"]);
    let log = d.log();
    assert!(log.contains("dropped the torn last line") && log.contains("line 2"), "{log}");
}

#[test]
fn a_100_mb_journal_line_does_not_raise_the_daemons_peak_memory() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("bigline");
    let sock = s.join("run/vpstag.sock");
    let mut d = Daemon::spawn(&s, &s.join("empty"), &sock, &[], false);
    d.must_start();
    let normal = d.peak_rss_kb();
    d.stop();

    let state = s.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(state.join("journal.jsonl")).unwrap());
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\n").unwrap();
        f.flush().unwrap();
    }
    let mut d = Daemon::spawn(&s, &state, &sock, &["--discard-bad-journal"], false);
    d.must_start();
    let big = d.peak_rss_kb();
    assert!(
        big <= normal + 8 * 1024,
        "peak RSS {big} kB with a 100 MB journal line, {normal} kB on a normal start\n{}",
        d.log()
    );
    assert!(d.log().contains("longer than 64 KiB"), "{}", d.log());
}

#[test]
fn the_journal_stays_small_while_a_vps_forks_5000_times() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("churn");
    let state = s.join("state");
    let marker = s.join("forked");
    let mut d = Daemon::spawn(&s, &state, &s.join("run/vpstag.sock"), &[], false);
    d.must_start();
    let script = format!(
        "i=0; while [ $i -lt 5000 ]; do /bin/true; i=$((i+1)); done; : > {}; exec sleep 1000",
        marker.display()
    );
    d.start_vps("churn", &["sh", "-c", &script]);
    wait_until("5000 forks", Duration::from_secs(600), || marker.exists());
    wait_until("the VPS to settle (init and sleep)", Duration::from_secs(60), || {
        d.ps("churn").len() == 2 && d.pids_of("churn", "sleep 1000").len() == 1
    });
    let mut records = 0;
    for f in ["journal.jsonl", "journal.prev.jsonl"] {
        records += std::fs::read_to_string(state.join(f)).map(|t| t.lines().count()).unwrap_or(0);
    }
    let journal = std::fs::read_to_string(state.join("journal.jsonl")).unwrap_or_default();
    assert!(records <= 10, "{records} journal records after 5000 forks:\n{journal}");
}

#[test]
fn after_kill_9_a_restart_rebuilds_members_from_the_roots() {
    if !is_root() {
        return;
    }
    let s = Scratch::new("restart");
    let state = s.join("state");
    let sock = s.join("run/vpstag.sock");
    let mut d = Daemon::spawn(&s, &state, &sock, &[], false);
    d.must_start();
    // Double forks and a new session: all re-parented to the first process (the subreaper).
    let keep =
        d.start_vps("keep", &["sh", "-c", "setsid sh -c 'sleep 801 & sleep 802 &'; (sleep 803 &); exec sleep 804"]);
    let doomed = d.start_vps("doomed", &["sh", "-c", "exec sleep 805"]);
    let cmds = ["sleep 801", "sleep 802", "sleep 803", "sleep 804"];
    wait_until("every process of keep", Duration::from_secs(30), || {
        cmds.iter().all(|c| d.pids_of("keep", c).len() == 1) && d.pids_of("doomed", "sleep 805").len() == 1
    });
    let pids: Vec<i32> = cmds.iter().map(|c| d.pids_of("keep", c)[0]).collect();
    let before = d.ps("keep");
    for (p, c) in pids.iter().zip(cmds) {
        let ppid = before.iter().find(|x| x["pid"] == *p).map(|x| x["ppid"].clone());
        assert_eq!(ppid, Some(Value::from(keep)), "{c} is a child of the first process: {before:?}");
    }

    d.crash();
    kill(doomed, libc::SIGKILL);
    wait_until("the killed root to be gone", Duration::from_secs(20), || !alive(doomed));
    let mut d2 = Daemon::spawn(&s, &state, &sock, &[], false);
    d2.seen.borrow_mut().extend(d.seen.borrow().iter().copied());
    d2.must_start();
    let after = d2.ps("keep");
    let find = |pid: i32| after.iter().find(|x| x["pid"] == pid).cloned();
    let first = find(keep).unwrap_or_else(|| panic!("the first process {keep} is a member again: {after:?}"));
    assert_eq!(first["source"], "first");
    // sleep 801-803 lost their parents (the setsid shell, the subshell): orphans are roots of
    // their own in the journal (learned from events before the crash). sleep 804 never left its
    // parent: it is rebuilt from the first process by a scan.
    let expected = ["event", "event", "event", "scan"];
    for ((p, c), source) in pids.iter().zip(cmds).zip(expected) {
        let m = find(*p).unwrap_or_else(|| panic!("{c} ({p}) is a member again: {after:?}\n{}", d2.log()));
        assert_eq!(m["source"], source, "{c}: {m}");
    }
    let out = d2.run(&["which", &doomed.to_string()]);
    assert_eq!(out.status.code(), Some(1), "the killed root is no member: {}", text(&out.stdout));
    let left: Vec<i32> = d2.ps("doomed").iter().map(|x| x["pid"].as_i64().unwrap_or(0) as i32).collect();
    assert!(!left.contains(&doomed), "{left:?}");
}
