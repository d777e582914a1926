//! `vpstag run` end to end: the real binary, real processes, the real kernel.
//!
//! Each test runs once per backend that can be opened here (cnproc, ptrace); one that cannot is
//! skipped with its reason printed.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vpstag");

fn backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    // Opened here only to see whether this kernel lets us listen; ptrace needs no privilege on
    // one's own children and is not opened in this process (it waits for children).
    match vpstag::open_backend(vpstag::BackendChoice::Cnproc) {
        Ok(_) => v.push("cnproc"),
        Err(e) => eprintln!("skipping backend cnproc: {e}"),
    }
    v.push("ptrace");
    // Built in with `--features ebpf`; needs root or CAP_BPF + CAP_PERFMON.
    match vpstag::open_backend(vpstag::BackendChoice::Ebpf) {
        Ok(_) => v.push("ebpf"),
        Err(e) => eprintln!("skipping backend ebpf: {e}"),
    }
    v
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vpstag-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("running vpstag")
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            !matches!(s.rsplit(')').next().map(str::trim_start).and_then(|r| r.chars().next()), Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

fn kill(pid: i32) {
    if pid > 0 {
        // SAFETY: kill by a pid this test recorded itself.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[test]
fn run_prints_each_fork_exec_and_exit_and_returns_the_command_status() {
    for b in backends() {
        let out = run(&["run", "--backend", b, "demo", "--", "sh", "-c", "sleep 0.1 & /bin/true; wait; exit 3"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "[{b}] exit status of the command; stderr:\n{err}");
        assert!(err.contains("[demo] fork"), "[{b}] no fork line:\n{err}");
        assert!(err.contains("[demo] exec") && err.contains("sleep 0.1"), "[{b}] no exec line for sleep:\n{err}");
        assert!(err.contains("(exit code 3)"), "[{b}] no exit line with the command's status:\n{err}");
    }
}

#[test]
fn run_writes_json_events_with_the_vps_name() {
    for b in backends() {
        let d = tmpdir(&format!("json-{b}"));
        let f = d.join("events.jsonl");
        let out =
            run(&["run", "--backend", b, "--json-events", f.to_str().unwrap(), "j", "--", "sh", "-c", "/bin/true"]);
        assert_eq!(out.status.code(), Some(0), "[{b}] {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.iter().all(|v| v["vps"] == "j"), "[{b}] {text}");
        for kind in ["fork", "exec", "exit"] {
            assert!(lines.iter().any(|v| v["event"] == kind), "[{b}] no {kind} event in {text}");
        }
        // `-`: the same lines on standard output.
        let out = run(&["run", "--backend", b, "--json-events", "-", "j", "--", "sh", "-c", "/bin/true"]);
        assert_eq!(out.status.code(), Some(0), "[{b}] {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("[{b}] {e}: {l:?}"))).collect();
        for kind in ["fork", "exec", "exit"] {
            assert!(lines.iter().any(|v| v["event"] == kind && v["vps"] == "j"), "[{b}] no {kind} event in {text}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn escaped_daemon_is_ended_after_the_command_exits() {
    for b in backends() {
        let d = tmpdir(&format!("escape-{b}"));
        let pidfile = d.join("daemon.pid");
        let script = format!("setsid sh -c 'sleep 300 & echo $! > {}' ; sleep 0.2", pidfile.display());
        let t = Instant::now();
        let out = run(&["run", "--backend", b, "--grace", "1", "esc", "--", "sh", "-c", &script]);
        let err = String::from_utf8_lossy(&out.stderr);
        let daemon: i32 = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().parse().unwrap_or(0);
        let still = daemon > 0 && alive(daemon);
        kill(daemon);
        assert!(daemon > 0, "[{b}] the script did not start its daemon:\n{err}");
        assert_eq!(out.status.code(), Some(0), "[{b}] {err}");
        assert!(!still, "[{b}] the escaped daemon {daemon} survived the run:\n{err}");
        assert!(err.contains("still running"), "[{b}] the escaped daemon was not reported:\n{err}");
        assert!(t.elapsed() < Duration::from_secs(30), "[{b}] took {:?}", t.elapsed());
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn wait_all_waits_for_background_processes() {
    for b in backends() {
        let d = tmpdir(&format!("waitall-{b}"));
        let mark = d.join("done");
        let script = format!("(sleep 0.5; echo x > {}) & exit 0", mark.display());
        let out = run(&["run", "--backend", b, "--wait-all", "wa", "--", "sh", "-c", &script]);
        assert_eq!(out.status.code(), Some(0), "[{b}] {}", String::from_utf8_lossy(&out.stderr));
        assert!(mark.exists(), "[{b}] vpstag run returned before the background job finished");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn ctrl_c_reaches_every_process_of_the_vps() {
    for b in backends() {
        let d = tmpdir(&format!("int-{b}"));
        let pids = d.join("pids");
        // A background member that ignores nothing: SIGINT ends it. The foreground command
        // waits for it.
        let script = format!("sleep 300 & echo $! >> {p}; setsid sleep 300 & echo $! >> {p}; wait", p = pids.display());
        let mut child = Command::new(BIN)
            .args(["run", "--backend", b, "--grace", "1", "cc", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut members = Vec::new();
        while Instant::now() < deadline {
            members = std::fs::read_to_string(&pids)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>();
            if members.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(members.len(), 2, "[{b}] the script did not start");
        // SAFETY: signal the vpstag process this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let mut ok = false;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(_st) = child.try_wait().unwrap() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ok {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let left: Vec<i32> = members.iter().copied().filter(|p| alive(*p)).collect();
        for p in &members {
            kill(*p);
        }
        assert!(ok, "[{b}] vpstag run did not end after Ctrl-C");
        assert!(left.is_empty(), "[{b}] members survived Ctrl-C: {left:?}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("got SIGINT"), "[{b}]");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    // vpstag's own failures exit 125, a CMD that cannot be executed 126, one not found 127 (as
    // env, timeout and docker run do): never a status CMD itself could have exited with.
    let out = run(&["run", "--backend", "nope", "x", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend \"nope\""));
    let out = run(&["run", "bad name", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid VPS name"));
    let out = run(&["run", "--backend", backends()[0], "x", "--", "/nonexistent/program"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    assert!(err.contains("cannot start \"/nonexistent/program\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A file without execute permission (made here: some systems mark odd files executable).
    let plain = std::env::temp_dir().join(format!("vpstag-not-executable-{}", std::process::id()));
    std::fs::write(&plain, "echo hi\n").unwrap();
    std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = run(&["run", "--backend", backends()[0], "x", "--", plain.to_str().unwrap()]);
    let _ = std::fs::remove_file(&plain);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "a file that is not executable: {err}");
    let out = run(&["run", "--backend", backends()[0], "x", "--", "sh", "-c", "exit 2"]);
    assert_eq!(out.status.code(), Some(2), "CMD's own status");
    // A grace period a Duration cannot hold is refused when parsed (it used to panic after
    // SIGTERM was sent, so SIGKILL never followed): a usage error, 125 for run (whose 1-124 are
    // CMD's), 2 for stop.
    for bad in ["inf", "NaN", "-1"] {
        let grace = format!("--grace={bad}");
        for (args, code) in [(vec!["run", &grace, "x", "--", "true"], 125), (vec!["stop", &grace, "x"], 2)] {
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
            assert!(err.contains("number of seconds") && !err.contains("panicked"), "{args:?}: {err}");
        }
    }
}
