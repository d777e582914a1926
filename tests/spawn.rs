//! `Manager::spawn` honours every option of a `std::process::Command` (the standard library applies
//! them), under every backend, with real processes.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use vpstag::{BackendChoice, Error, ExitStatus, Manager};

fn backends() -> Vec<BackendChoice> {
    let mut v = vec![BackendChoice::Cnproc, BackendChoice::Ptrace];
    if cfg!(feature = "ebpf") {
        v.push(BackendChoice::Ebpf);
    }
    v
}

fn manager(b: BackendChoice) -> Manager {
    Manager::with_backend(b).unwrap_or_else(|e| panic!("{b:?}: {e}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const PY: &str = "/usr/bin/python3";

/// Prints what the command's process is: ids, groups, environment names, argv[0], process group,
/// working directory, its open-files limit, and the line it read; writes a line to stderr.
const REPORT: &str = "import os,sys,json,resource\n\
line=sys.stdin.readline().strip()\n\
sys.stderr.write('to-stderr\\n')\n\
print(json.dumps({'uid':os.getuid(),'gid':os.getgid(),'groups':sorted(os.getgroups()),\
'env':sorted(os.environ.keys()),'A':os.environ.get('A'),'arg0':sys.orig_argv[0],\
'pgid':os.getpgrp(),'ppid':os.getppid(),'cwd':os.getcwd(),\
'nofile':resource.getrlimit(resource.RLIMIT_NOFILE)[0],'line':line}))\n";

#[test]
fn every_option_of_the_command_reaches_the_command() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (uid, gid and groups of another user)");
        return;
    }
    for b in backends() {
        let mgr = manager(b);
        let dir = std::env::temp_dir().join(format!("vpstag-spawn-{}-{b:?}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err_path = dir.join("stderr");
        let err_file = std::fs::File::create(&err_path).unwrap();
        let mut cmd = Command::new(PY);
        cmd.arg0("renamed-python")
            .args(["-c", REPORT])
            .env_clear()
            .env("A", "b")
            .current_dir(&dir)
            .uid(65534)
            .gid(65534)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_file));
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 77, rlim_max: 77 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = mgr.spawn("opts", &mut cmd).unwrap_or_else(|e| panic!("{b:?}: spawn: {e}"));
        let first = child.vps.first.as_raw();
        // The first process holds none of the command's descriptors: only /dev/null on 0, 1, 2.
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{first}/fd"))
            .unwrap_or_else(|e| panic!("{b:?}: /proc/{first}/fd: {e}"))
            .flatten()
            .map(|e| {
                let target = std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
                format!("{}->{target}", e.file_name().to_string_lossy())
            })
            .collect();
        assert!(
            fds.len() == 3 && fds.iter().all(|f| f.ends_with("->/dev/null")),
            "{b:?}: the first process holds {fds:?}"
        );
        child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let status = mgr.wait(&child.vps, Some(Duration::from_secs(30))).unwrap();
        assert_eq!(status, Some(ExitStatus::Exited(0)), "{b:?}: output {out:?}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{b:?}: {e}: {out:?}"));
        assert_eq!(v["uid"], 65534, "{b:?}: {v}");
        assert_eq!(v["gid"], 65534, "{b:?}: {v}");
        // The standard library drops root's supplementary groups when it sets a uid.
        assert_eq!(v["groups"], serde_json::json!([]), "{b:?}: {v}");
        assert_eq!(v["A"], "b", "{b:?}: {v}");
        // Python may add LC_CTYPE itself (PEP 538); nothing of this test's environment may be there.
        let env: Vec<&str> = v["env"].as_array().unwrap().iter().filter_map(|e| e.as_str()).collect();
        assert!(env.iter().all(|k| *k == "A" || *k == "LC_CTYPE"), "{b:?}: environment {env:?}");
        assert_eq!(v["arg0"], "renamed-python", "{b:?}: {v}");
        assert_eq!(v["pgid"], first, "{b:?}: the process group is the first process's: {v}");
        assert_eq!(v["ppid"], first, "{b:?}: the command runs below the first process: {v}");
        assert_eq!(v["cwd"], dir.display().to_string(), "{b:?}: {v}");
        assert_eq!(v["nofile"], 77, "{b:?}: the pre_exec closure ran: {v}");
        assert_eq!(v["line"], "hello", "{b:?}: {v}");
        assert_eq!(std::fs::read_to_string(&err_path).unwrap(), "to-stderr\n", "{b:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_command_that_cannot_be_executed_is_an_error_and_its_name_is_free_again() {
    for b in backends() {
        let mgr = manager(b);
        for i in 0..10 {
            match mgr.start("bad", &mut Command::new("/nonexistent/program")) {
                Err(Error::Spawn { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{b:?} #{i}: {source}")
                }
                other => panic!("{b:?} #{i}: expected a spawn error, got {other:?}"),
            }
        }
        let mut failing = Command::new("/bin/true");
        // SAFETY: returns at once.
        unsafe { failing.pre_exec(|| Err(std::io::Error::from_raw_os_error(libc::EPERM))) };
        match mgr.start("bad", &mut failing) {
            Err(Error::Spawn { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EPERM), "{b:?}"),
            other => panic!("{b:?}: expected the closure's error, got {other:?}"),
        }
        let ok = mgr.start("bad", Command::new("/bin/sh").args(["-c", "exit 7"])).expect("the name is free again");
        assert_eq!(mgr.wait(&ok, Some(Duration::from_secs(30))).unwrap(), Some(ExitStatus::Exited(7)), "{b:?}");
        assert!(!mgr.is_running(&ok).unwrap(), "{b:?}");
    }
}

#[test]
fn the_command_is_tagged_before_it_runs_and_its_children_too() {
    for b in backends() {
        let mgr = manager(b);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & echo $$ $!; wait"]).stdout(Stdio::piped());
        let mut child = mgr.spawn("tagged", &mut cmd).unwrap();
        let mut line = String::new();
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 64];
        while !line.contains('\n') {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "{b:?}: no output");
            line.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let pids: Vec<i32> = line.split_whitespace().map(|p| p.parse().unwrap()).collect();
        for p in &pids {
            let pid = vpstag::Pid::new(*p).unwrap();
            assert_eq!(mgr.vps_of(pid).unwrap().map(|v| v.name), Some("tagged".into()), "{b:?}: pid {p}");
        }
        assert_eq!(mgr.command_pid(&child.vps).unwrap().map(|p| p.as_raw()), Some(pids[0]), "{b:?}");
        mgr.kill_all(&child.vps, Duration::from_secs(30)).unwrap();
        assert!(mgr.wait(&child.vps, Some(Duration::from_secs(30))).unwrap().is_some(), "{b:?}");
    }
}
