//! What a supervisor does with vpstag, on tokio: start a job as an unprivileged user (when run as
//! root) with its input and output piped, follow that job's events asynchronously, kill it once
//! it said it is ready, and wait for it, without blocking a thread.
//!
//! ```text
//! sudo cargo run --example supervisor --features tokio
//! ```
//!
//! The tests run it too (`tests/supervisor_example.rs`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use vpstag::{BackendChoice, EventKind, ExitStatus, Manager, Signal};

/// What the supervisor saw.
#[derive(Debug, Default)]
pub struct Report {
    /// The job's output, line by line.
    pub output: Vec<String>,
    /// Processes the job forked, as events told.
    pub forks: usize,
    /// Programs the job executed, as events told.
    pub execs: usize,
    /// Processes of the job that exited, as events told.
    pub exits: usize,
    /// Losses reported to this subscriber (expected: none).
    pub losses: usize,
    /// Members when it was killed.
    pub members_when_killed: usize,
    /// How the job ended.
    pub status: Option<ExitStatus>,
    /// Members left afterwards (expected: none).
    pub members_after: usize,
}

/// Runs the job under `mgr` and reports.
pub async fn supervise(mgr: &Manager) -> Result<Report, Box<dyn std::error::Error>> {
    let mut cmd = Command::new("/bin/sh");
    // It waits for a line on its input, so that the supervisor subscribes first; then it runs a
    // few programs, leaves two in the background, and says it is ready.
    cmd.args(["-c", "read go; id -u; /bin/true; /bin/true; sleep 600 & sleep 600 & echo ready; wait"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    let mut job = mgr.spawn("job", &mut cmd)?;
    let mut events = mgr.subscribe_vps(&job.vps)?.into_async()?;
    job.stdin.take().ok_or("no stdin")?.write_all(b"go\n")?;

    // The output, read on a thread of its own (std's pipe ends block) and handed over a channel.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = job.stdout.take().ok_or("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut report = Report::default();
    let count = |report: &mut Report, kind: EventKind| match kind {
        EventKind::Fork { thread: false, .. } => report.forks += 1,
        EventKind::Exec { .. } => report.execs += 1,
        EventKind::Exit { pid, thread, .. } if pid == thread => report.exits += 1,
        EventKind::Lost { .. } => report.losses += 1,
        _ => {}
    };
    let mut ready = false;
    while !ready {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => count(&mut report, ev.event.kind),
                None => return Err("the manager stopped".into()),
            },
            line = lines.recv() => match line {
                Some(line) => {
                    ready = line == "ready";
                    report.output.push(line);
                }
                None => return Err("the job closed its output before it was ready".into()),
            },
        }
    }
    // Everything the job did before it said so is in the table now; take its events too.
    mgr.sync()?;
    while let Ok(ev) = events.try_recv() {
        count(&mut report, ev.event.kind);
    }
    report.members_when_killed = mgr.members(&job.vps)?.len();
    mgr.signal(&job.vps, Signal::KILL)?;
    report.status = mgr.wait_async(&job.vps).await?;
    // The first process has gone; its last descendants may take a moment to be reaped.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mgr.members(&job.vps)?.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    report.members_after = mgr.members(&job.vps)?.len();
    Ok(report)
}

#[tokio::main(flavor = "current_thread")]
#[allow(dead_code)] // the tests include this file for `supervise` only
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mgr = Manager::with_backend(BackendChoice::Auto)?;
    let report = supervise(&mgr).await?;
    println!("{report:#?}");
    Ok(())
}
