//! `vpstag-bench daemon`: the daemon as users deploy it, beside the `Manager` figures.
//!
//! Per backend and run: a fresh `vpstag daemon --backend B --socket S --state-dir D` (D on the
//! disk, beside the release directory), waited for until it answers `hello`; the workload started
//! as a VPS with `vpstag start NAME -- vpstag-bench work ...`; its result read once the VPS's first
//! process has ended (this process is the child subreaper, so the first process is re-parented
//! here and reaped here) and the daemon lists the VPS empty. Then, the daemon still running, the
//! same workload untracked (what a process outside every VPS pays for a host-wide listener), and
//! the daemon is stopped (SIGTERM) and its directory removed.
//!
//! The untracked runs the ratios compare with run with no daemon at all: a proc-connector or eBPF
//! daemon is a host-wide listener, and every fork on the host pays for it, tagged or not. Hence
//! one daemon per tracked run rather than one per backend.
//!
//! `strace -f -o /dev/null` and a minimal C PTRACE_SEIZE tracer (`bench/c/seize_tracer.c`, built
//! with `cc` at run time) over the same workload give the scale. Every tracked run is bracketed by
//! untracked runs (ABAB...): ratio = tracked rate / mean of the untracked rates on either side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vpstag::client::Client;

use crate::results::{DaemonResults, DaemonRow, DaemonRun, RunRecord};
use crate::stats::{bracketed_ratio, summarize, Summary};
use crate::sys;
use crate::work::{Mode, WorkResult};

#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Daemon backends to measure (comma-separated); unavailable ones are reported as such.
    #[arg(long, default_value = "cnproc,ebpf,ptrace", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Rounds (default 3, 5 with --full).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Creations per run for fork and burst (spawn: a fifth); default 3000, 10^4 with --full.
    #[arg(long)]
    pub count: Option<u64>,
    /// The big sizes: 10^4 creations per run, 5 rounds.
    #[arg(long)]
    pub full: bool,
    /// Also write every figure (and every run) as JSON here.
    #[arg(long)]
    pub json: Option<String>,
    /// CPU to pin the workloads to ("none": no pinning).
    #[arg(long, default_value = "1")]
    pub pin_cpu: String,
    /// CPU to pin the daemon, strace and the C tracer to ("none": not pinned, as deployed).
    #[arg(long, default_value = "none")]
    pub daemon_cpu: String,
    /// The vpstag binary (default: `vpstag` next to this executable, e.g. target/release/vpstag).
    #[arg(long)]
    pub vpstag: Option<String>,
    /// Where the daemons' state directories go (default: `vpstag-bench-daemon-PID` in the target
    /// directory, beside `release/`). Must be on a disk: tmpfs is refused.
    #[arg(long)]
    pub state_root: Option<String>,
    /// Leave out `strace -f` and the C PTRACE_SEIZE tracer.
    #[arg(long)]
    pub no_reference: bool,
    /// Seconds one run may take before it is killed and reported (default: 120 + count / 50).
    #[arg(long)]
    pub deadline: Option<u64>,
    /// (internal) Do not print the text report (`run` prints it with the rest).
    #[arg(long, hide = true)]
    pub no_text: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Variant {
    Daemon(String),
    Strace,
    Seize(String),
}

impl Variant {
    fn name(&self) -> String {
        match self {
            Variant::Daemon(b) => format!("daemon {b}"),
            Variant::Strace => "strace -f -o /dev/null".into(),
            Variant::Seize(_) => "C PTRACE_SEIZE tracer".into(),
        }
    }
}

struct Ctx {
    exe: String,
    vpstag: String,
    root: PathBuf,
    pin: Option<usize>,
    daemon_pin: Option<usize>,
    limit: Duration,
    seq: u64,
}

impl Ctx {
    /// A fresh path in the state root: `{prefix}-{n}{suffix}`.
    fn fresh(&mut self, prefix: &str, suffix: &str) -> PathBuf {
        self.seq += 1;
        self.root.join(format!("{prefix}-{}{suffix}", self.seq))
    }

    fn work_args(&self, mode: Mode, count: u64, out: &Path) -> Vec<String> {
        let mut v = vec![
            self.exe.clone(),
            "work".into(),
            "--mode".into(),
            mode.name().into(),
            "--count".into(),
            count.to_string(),
            "--out".into(),
            out.to_string_lossy().into_owned(),
        ];
        if let Some(c) = self.pin {
            v.push("--cpu".into());
            v.push(c.to_string());
        }
        v
    }

    /// `program` under `taskset -c CPU` when the listeners are pinned.
    fn listener(&self, program: &str) -> Command {
        match self.daemon_pin {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &c.to_string(), program]);
                cmd
            }
            None => Command::new(program),
        }
    }
}

/// A raw wait status in words.
fn describe(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exit status {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("killed by signal {}", libc::WTERMSIG(st))
    } else {
        format!("wait status {st:#x}")
    }
}

fn succeeded(st: i32) -> bool {
    libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0
}

/// Waits for our child `pid` (blocking, in a thread: no polling while a workload runs) for at
/// most `limit`; past it, kills the child and its process group and says so.
fn wait_or_kill(pid: i32, what: &str, limit: Duration) -> Result<i32, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sys::wait_child(pid));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok((st, _))) => Ok(st),
        Ok(Err(e)) => Err(format!("waiting for {what} (pid {pid}): {e}")),
        Err(_) => {
            sys::kill(-pid, libc::SIGKILL);
            sys::kill(pid, libc::SIGKILL);
            let reaped = rx.recv_timeout(Duration::from_secs(10)).is_ok();
            reap_group(pid);
            Err(format!(
                "{what} (pid {pid}) still running after {} s: killed{}",
                limit.as_secs(),
                if reaped { "" } else { " (and not reaped within 10 s)" }
            ))
        }
    }
}

/// Reaps what is left of process group `pgid` after a SIGKILL to it: the children of a killed
/// workload are re-parented to us (the subreaper). Gives up after 5 s.
fn reap_group(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid out pointer.
        let r = unsafe { libc::waitpid(-pgid, &mut st, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        // r < 0: ECHILD, none of ours is left in the group.
        if r < 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let t = lines[lines.len().saturating_sub(5)..].join(" | ");
    if t.is_empty() {
        "(nothing)".into()
    } else {
        t
    }
}

fn read_work(path: &Path) -> Result<WorkResult, String> {
    let s =
        std::fs::read_to_string(path).map_err(|e| format!("reading the workload's result {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `prefix` + the workload as our child (in its own process group), with a deadline; its rate.
fn run_plain(ctx: &mut Ctx, prefix: Option<Command>, mode: Mode, count: u64, what: &str) -> Result<f64, String> {
    use std::os::unix::process::CommandExt;
    let out = ctx.fresh("work", ".json");
    let w = ctx.work_args(mode, count, &out);
    let mut cmd = match prefix {
        Some(mut p) => {
            p.args(&w);
            p
        }
        None => {
            let mut c = Command::new(&w[0]);
            c.args(&w[1..]);
            c
        }
    };
    // SAFETY: the hook only calls prctl (async-signal-safe): the run dies with the bench.
    unsafe { cmd.pre_exec(|| sys::die_with_parent(libc::SIGKILL)) };
    let child = cmd.stdin(Stdio::null()).process_group(0).spawn().map_err(|e| format!("{what}: {e}"))?;
    let st = wait_or_kill(child.id() as i32, what, ctx.limit)?;
    if !succeeded(st) {
        let _ = std::fs::remove_file(&out);
        return Err(format!("{what} ended with {}", describe(st)));
    }
    Ok(read_work(&out)?.rate)
}

/// Sizes of the regular files in a state directory, journal lines, and the snapshot's identity.
#[derive(Clone, Copy, Debug, Default)]
struct DirUsage {
    bytes: u64,
    journal_lines: u64,
    snapshot: Option<(u64, std::time::SystemTime)>,
}

fn dir_usage(dir: &Path) -> Result<DirUsage, String> {
    let mut u = DirUsage::default();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        u.bytes += md.len();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("journal") && name.ends_with(".jsonl") {
            let data = std::fs::read(e.path()).unwrap_or_default();
            u.journal_lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
        }
        if name == "snapshot.json" {
            u.snapshot = Some((md.len(), md.modified().unwrap_or(std::time::UNIX_EPOCH)));
        }
    }
    Ok(u)
}

/// A running daemon; stopped (SIGTERM, then SIGKILL) and its directory removed when dropped.
struct DaemonProc {
    pid: i32,
    dir: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    reaped: bool,
}

impl DaemonProc {
    /// Starts `vpstag daemon --backend B --socket S --state-dir D` in a fresh directory and waits
    /// for it to answer `hello`; also returns how long that took.
    fn start(ctx: &mut Ctx, backend: &str) -> Result<(DaemonProc, f64), String> {
        use std::os::unix::process::CommandExt;
        let dir = ctx.fresh(backend, "");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let socket = dir.join("vpstag.sock");
        if socket.as_os_str().len() >= 100 {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "socket path {} is too long for a Unix socket: pick a shorter --state-root",
                socket.display()
            ));
        }
        let state = dir.join("state");
        let log = dir.join("daemon.log");
        let logf = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let t0 = sys::now_secs();
        let mut cmd = ctx.listener(&ctx.vpstag);
        // SAFETY: the hook only calls prctl (async-signal-safe). If the bench dies without
        // stopping the daemon, the kernel does it.
        unsafe { cmd.pre_exec(|| sys::die_with_parent(libc::SIGTERM)) };
        // Its own process group: a Ctrl-C at the terminal reaches the bench, which stops it.
        cmd.process_group(0);
        let child = cmd
            .arg("daemon")
            .args(["--backend", backend])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                format!("starting {} daemon: {e}", ctx.vpstag)
            })?;
        let mut d = DaemonProc { pid: child.id() as i32, dir, state, socket, log, reaped: false };
        // A generous deadline: loading eBPF programs on a busy machine can take seconds.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last;
        loop {
            let mut st = 0;
            // SAFETY: waitpid on our own child with a valid out pointer.
            if unsafe { libc::waitpid(d.pid, &mut st, libc::WNOHANG) } == d.pid {
                d.reaped = true;
                return Err(format!("the daemon ended ({}) before answering; its log: {}", describe(st), tail(&d.log)));
            }
            match Client::connect_to(&d.socket).and_then(|mut c| c.hello()) {
                Ok(h) if h.backend == backend && h.daemon_pid.as_raw() == d.pid => break,
                Ok(h) => {
                    return Err(format!(
                        "the socket {} answered as daemon pid {} with backend {}, not ours (pid {}, {backend})",
                        d.socket.display(),
                        h.daemon_pid,
                        h.backend,
                        d.pid
                    ))
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(format!("the daemon did not answer within 30 s (last: {last}); its log: {}", tail(&d.log)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((d, sys::now_secs() - t0))
    }

    /// If the daemon has ended (it is then reaped): how, with the end of its log.
    fn ended(&mut self) -> Option<String> {
        if self.reaped {
            return None;
        }
        let mut st = 0;
        // SAFETY: waitpid on our own child with a valid out pointer.
        if unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) } != self.pid {
            return None;
        }
        self.reaped = true;
        Some(format!("the daemon (pid {}) had ended ({}); its log: {}", self.pid, describe(st), tail(&self.log)))
    }

    /// SIGTERM, and waits for it to end (SIGKILL after 10 s); how it ended.
    fn stop(&mut self) -> Result<String, String> {
        sys::kill(self.pid, libc::SIGTERM);
        let r = wait_or_kill(self.pid, "the daemon after SIGTERM", Duration::from_secs(10));
        self.reaped = true;
        let st = r?;
        if succeeded(st) {
            Ok(describe(st))
        } else {
            Err(format!("the daemon ended with {} after SIGTERM; its log: {}", describe(st), tail(&self.log)))
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if !self.reaped {
            sys::kill(self.pid, libc::SIGTERM);
            if wait_or_kill(self.pid, "the daemon", Duration::from_secs(5)).is_err() {
                eprintln!("vpstag-bench: daemon {} did not end on SIGTERM within 5 s: killed", self.pid);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The VPS's first process, re-parented to us (the subreaper): killed and reaped if dropped
/// before it was reaped.
struct FirstProc {
    pid: i32,
    reaped: bool,
}

impl Drop for FirstProc {
    fn drop(&mut self) {
        if !self.reaped {
            // Its own session and process group (vpstag start makes it so).
            sys::kill(-self.pid, libc::SIGKILL);
            sys::kill(self.pid, libc::SIGKILL);
            let _ = wait_or_kill(self.pid, "the VPS's first process", Duration::from_secs(5));
            reap_group(self.pid);
        }
    }
}

/// Waits for the first process to end: it is our child once `vpstag start` has exited. If it
/// is not (ECHILD: no subreaper), waits for /proc to show it gone.
fn wait_first(pid: i32, limit: Duration) -> Result<Option<i32>, String> {
    match wait_or_kill(pid, "the workload (the VPS's first process)", limit) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.contains("No child processes") => {
            let deadline = Instant::now() + limit;
            while sys::read_stat(pid).is_some_and(|s| s.state != b'Z' && s.state != b'X') {
                if Instant::now() > deadline {
                    sys::kill(-pid, libc::SIGKILL);
                    return Err(format!("the workload (pid {pid}, not our child) still running after {limit:?}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn stat(stats: &BTreeMap<String, u64>, key: &str) -> u64 {
    stats.get(key).copied().unwrap_or(0)
}

/// What the daemon spent while one VPS ran.
struct Span {
    cpu_secs: f64,
    stat_cpu_secs: f64,
    voluntary: u64,
    involuntary: u64,
    /// Seconds from the first process's end to the daemon listing the VPS empty.
    catch_up_secs: f64,
}

/// Starts VPS `name` running `cmd` with `vpstag start`, waits for its first process to end (it
/// is re-parented to us) and for the daemon to list it empty; what the daemon spent meanwhile,
/// from just before `vpstag start`. `vps_out` receives the VPS's output.
fn run_in_vps(
    ctx: &Ctx,
    d: &DaemonProc,
    client: &mut Client,
    name: &str,
    cmd: &[String],
    vps_out: &Path,
) -> Result<Span, String> {
    let cerr = |e: vpstag::Error| format!("asking the daemon: {e}");
    let start_out = d.dir.join(format!("{name}.start.out"));
    let so = std::fs::File::create(&start_out).map_err(|e| format!("creating {}: {e}", start_out.display()))?;
    let se = so.try_clone().map_err(|e| e.to_string())?;
    let sw0 = sys::thread_switches(d.pid).map_err(|e| format!("reading the daemon's threads: {e}"))?;
    let cpu0 = sys::process_cpu_secs(d.pid).map_err(|e| format!("the daemon's CPU clock: {e}"))?;
    let stat0 = sys::stat_cpu_secs(d.pid).map_err(|e| format!("the daemon's CPU time: {e}"))?;
    let child = Command::new(&ctx.vpstag)
        .arg("--socket")
        .arg(&d.socket)
        .arg("start")
        .arg("--output")
        .arg(vps_out)
        .arg(name)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(so)
        .stderr(se)
        .spawn()
        .map_err(|e| format!("running {} start: {e}", ctx.vpstag))?;
    let st = wait_or_kill(child.id() as i32, "vpstag start", Duration::from_secs(30))?;
    let said = std::fs::read_to_string(&start_out).unwrap_or_default();
    if !succeeded(st) {
        return Err(format!("vpstag start ended with {}: {}", describe(st), said.trim()));
    }
    let first: i32 = said
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("vpstag start printed no pid: {:?}", said.trim()))?;
    let mut fp = FirstProc { pid: first, reaped: false };
    let st = wait_first(first, ctx.limit)?;
    fp.reaped = true;
    if let Some(st) = st.filter(|&s| !succeeded(s)) {
        return Err(format!(
            "VPS {name}'s first process {first} ended with {}; its output: {}",
            describe(st),
            tail(vps_out)
        ));
    }
    let t_end = sys::now_secs();
    // The daemon has seen everything once it lists the VPS empty with its first process gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = client.list().map_err(cerr)?;
        let seen = match l.iter().find(|v| v.name == name) {
            Some(v) if !v.first_alive && v.members == 0 => break,
            Some(v) => format!("first process alive: {}, {} members", v.first_alive, v.members),
            None => "no such VPS".into(),
        };
        if Instant::now() > deadline {
            return Err(format!("30 s after its first process ended the daemon still lists VPS {name} with {seen}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let catch_up_secs = sys::now_secs() - t_end;
    let cpu1 = sys::process_cpu_secs(d.pid).map_err(|e| format!("the daemon's CPU clock: {e}"))?;
    let stat1 = sys::stat_cpu_secs(d.pid).map_err(|e| format!("the daemon's CPU time: {e}"))?;
    let sw1 = sys::thread_switches(d.pid).map_err(|e| format!("reading the daemon's threads: {e}"))?;
    let (voluntary, involuntary) = sys::switches_between(&sw0, &sw1);
    Ok(Span { cpu_secs: cpu1 - cpu0, stat_cpu_secs: stat1 - stat0, voluntary, involuntary, catch_up_secs })
}

/// One tracked run under a fresh daemon (after a VPS running /bin/true: the fixed cost of a VPS),
/// then the bystander run; the tracked rate and the costs.
fn run_daemon(ctx: &mut Ctx, backend: &str, mode: Mode, count: u64) -> Result<(f64, DaemonRun), String> {
    let (mut d, startup) = DaemonProc::start(ctx, backend)?;
    measure_in(ctx, &mut d, mode, count, startup).map_err(|e| match d.ended() {
        Some(how) => format!("{e}; {how}"),
        None => e,
    })
}

fn measure_in(
    ctx: &mut Ctx,
    d: &mut DaemonProc,
    mode: Mode,
    count: u64,
    startup: f64,
) -> Result<(f64, DaemonRun), String> {
    let cerr = |e: vpstag::Error| format!("asking the daemon: {e}");
    // One connection for every question: no thread started in the daemon per question.
    let mut client = Client::connect_to(&d.socket).map_err(cerr)?;
    let idle = run_in_vps(ctx, d, &mut client, "bench-idle", &["/bin/true".to_string()], &d.dir.join("idle.out"))?;
    let stats0 = client.check().map_err(cerr)?.stats;
    let j0 = dir_usage(&d.state)?;
    let name = format!("bench-{}", mode.name());
    let out = ctx.fresh("work", ".json");
    let vps_out = d.dir.join("vps.out");
    let span = run_in_vps(ctx, d, &mut client, &name, &ctx.work_args(mode, count, &out), &vps_out)?;
    let w = read_work(&out).map_err(|e| format!("{e}; the VPS's output: {}", tail(&vps_out)))?;
    let j1 = dir_usage(&d.state)?;
    let check = client.check().map_err(cerr)?;
    drop(client);
    let s1 = &check.stats;
    let mut r = DaemonRun {
        cpu_secs: span.cpu_secs,
        stat_cpu_secs: span.stat_cpu_secs,
        voluntary: span.voluntary,
        involuntary: span.involuntary,
        vps_cpu_secs: idle.cpu_secs,
        vps_switches: idle.voluntary + idle.involuntary,
        events_applied: stat(s1, "events").saturating_sub(stat(&stats0, "events")),
        loss_reports: stat(s1, "loss_reports").saturating_sub(stat(&stats0, "loss_reports")),
        lost_events: stat(s1, "lost_events").saturating_sub(stat(&stats0, "lost_events")),
        resyncs: stat(s1, "resyncs").saturating_sub(stat(&stats0, "resyncs")),
        journal_bytes: j1.bytes as i64 - j0.bytes as i64,
        journal_records: j1.journal_lines as i64 - j0.journal_lines as i64,
        compacted: j1.snapshot != j0.snapshot,
        startup_secs: startup,
        catch_up_secs: span.catch_up_secs,
        divergences: check.divergences.len(),
        bystander_rate: None,
        exit: String::new(),
    };
    // The same workload outside every VPS, the daemon still listening.
    r.bystander_rate = match run_plain(ctx, None, mode, count, "the untracked workload beside the daemon") {
        Ok(x) => Some(x),
        Err(e) => {
            eprintln!("    bystander run: {e}");
            None
        }
    };
    r.exit = d.stop()?;
    Ok((w.rate, r))
}

fn run_variant(ctx: &mut Ctx, v: &Variant, mode: Mode, count: u64) -> Result<(f64, Option<DaemonRun>), String> {
    match v {
        Variant::Daemon(b) => run_daemon(ctx, b, mode, count).map(|(rate, d)| (rate, Some(d))),
        Variant::Strace => {
            let mut p = ctx.listener("strace");
            p.args(["-f", "-o", "/dev/null"]);
            run_plain(ctx, Some(p), mode, count, "strace -f").map(|r| (r, None))
        }
        Variant::Seize(path) => {
            let p = ctx.listener(path);
            run_plain(ctx, Some(p), mode, count, "the C tracer").map(|r| (r, None))
        }
    }
}

/// Builds the C tracer into `dir`; its path.
fn build_seize_tracer(dir: &Path) -> Result<String, String> {
    let src = dir.join("seize_tracer.c");
    let bin = dir.join("seize-tracer");
    std::fs::write(&src, include_str!("../c/seize_tracer.c")).map_err(|e| format!("writing {}: {e}", src.display()))?;
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("no C compiler (cc: {e})"))?;
    if !out.status.success() {
        return Err(format!("cc failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(bin.to_string_lossy().into_owned())
}

fn progress(t0: f64, msg: &str) {
    eprintln!("[{:>6.1}s] {msg}", sys::now_secs() - t0);
}

/// Removes the state root when the measurement ends, however it ends.
struct RootGuard(PathBuf);

impl Drop for RootGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    // A second one ends the bench at once (the daemons then get SIGTERM from the kernel).
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// SIGINT and SIGTERM end the measurement after the run under way (its daemon stopped and its
/// directory removed as usual), and the figures so far are reported.
fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic and calls signal(2).
        unsafe { libc::signal(sig, on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

/// Whether a stop was asked for; notes it once in the results.
fn stopping(r: &mut DaemonResults) -> bool {
    let stop = STOP.load(Ordering::SeqCst);
    let note = "interrupted (SIGINT or SIGTERM): the figures stop there";
    if stop && !r.failures.iter().any(|f| f == note) {
        r.failures.push(note.into());
    }
    stop
}

/// Measures; `Err` only when nothing can be measured (no vpstag binary, no disk directory...).
pub fn measure(a: &DaemonArgs) -> Result<DaemonResults, String> {
    let t0 = sys::now_secs();
    let rounds = a.rounds.unwrap_or(if a.full { 5 } else { 3 }).max(1);
    let count = a.count.unwrap_or(if a.full { 10_000 } else { 3_000 }).max(1);
    let exe = sys::self_exe();
    let exe_dir = Path::new(&exe).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let vpstag = a.vpstag.clone().unwrap_or_else(|| exe_dir.join("vpstag").to_string_lossy().into_owned());
    let version = Command::new(&vpstag)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("cannot run {vpstag} ({e}): build it with `cargo build --release -p vpstag-cli --features ebpf` or pass --vpstag")
        })?;
    let vpstag_version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let root = match &a.state_root {
        Some(r) => PathBuf::from(r),
        None => exe_dir.parent().unwrap_or(&exe_dir).join(format!("vpstag-bench-daemon-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let root = root.canonicalize().map_err(|e| format!("{}: {e}", root.display()))?;
    let _root_guard = RootGuard(root.clone());
    let state_fs = sys::fs_type(&root).map_err(|e| format!("statfs {}: {e}", root.display()))?;
    if state_fs == "tmpfs" || state_fs == "ramfs" {
        return Err(format!(
            "{} is on {state_fs}: the journal's fsyncs would cost nothing there; pass --state-root on a disk",
            root.display()
        ));
    }
    // The VPS's first process outlives `vpstag start`: re-parented here, reaped here.
    sys::set_child_subreaper().map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let pin = if a.pin_cpu == "none" { None } else { a.pin_cpu.parse().ok() };
    let daemon_pin = if a.daemon_cpu == "none" { None } else { a.daemon_cpu.parse().ok() };
    let limit = Duration::from_secs(a.deadline.unwrap_or(120 + count / 50));
    let mut ctx = Ctx { exe, vpstag: vpstag.clone(), root: root.clone(), pin, daemon_pin, limit, seq: 0 };
    let mut r = DaemonResults {
        date: sys::date(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        build: if cfg!(feature = "ebpf") {
            "cargo build --release -p vpstag-bench --features ebpf".into()
        } else {
            "cargo build --release -p vpstag-bench".into()
        },
        vpstag: vpstag.clone(),
        vpstag_version,
        daemon_command: format!(
            "{}vpstag daemon --backend B --socket {}/B-N/vpstag.sock --state-dir {}/B-N/state",
            daemon_pin.map(|c| format!("taskset -c {c} ")).unwrap_or_default(),
            root.display(),
            root.display()
        ),
        state_root: root.to_string_lossy().into_owned(),
        state_fs,
        rounds,
        pin_cpu: a.pin_cpu.clone(),
        daemon_cpu: a.daemon_cpu.clone(),
        load_before: sys::loadavg(),
        ..Default::default()
    };

    // Which daemons start here.
    let mut variants = Vec::new();
    for b in &a.backends {
        if !["cnproc", "ebpf", "ptrace"].contains(&b.as_str()) {
            r.unavailable.push((format!("daemon {b}"), "unknown backend".into()));
            continue;
        }
        let probe = DaemonProc::start(&mut ctx, b).and_then(|(mut d, _)| d.stop());
        match probe {
            Ok(_) => variants.push(Variant::Daemon(b.clone())),
            Err(e) => {
                let why = if e.contains("built without") {
                    format!("this vpstag was built without it (cargo feature `{b}` of vpstag): {vpstag}")
                } else {
                    e
                };
                progress(t0, &format!("daemon {b}: unavailable: {why}"));
                r.unavailable.push((format!("daemon {b}"), why));
            }
        }
    }
    if !a.no_reference {
        if Command::new("strace").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
            variants.push(Variant::Strace);
        } else {
            r.unavailable.push(("strace -f".into(), "not installed (bench/install-deps)".into()));
        }
        match build_seize_tracer(&root) {
            Ok(p) => variants.push(Variant::Seize(p)),
            Err(e) => r.unavailable.push(("C PTRACE_SEIZE tracer".into(), e)),
        }
    }

    catch_stop_signals();
    for mode in [Mode::Seq, Mode::Burst, Mode::Spawn] {
        if stopping(&mut r) {
            break;
        }
        let c = if mode == Mode::Spawn { (count / 5).max(100) } else { count };
        r.counts.push((mode.name().into(), c));
        let nominal = c as f64 * mode.events_per_op();
        let mut unt = Vec::new();
        let mut per: Vec<Vec<RunRecord>> = vec![Vec::new(); variants.len()];
        let mut failed = vec![0usize; variants.len()];
        for round in 0..rounds {
            if stopping(&mut r) {
                break;
            }
            progress(t0, &format!("daemon: {} round {}/{rounds}", mode.name(), round + 1));
            let mut before = match run_plain(&mut ctx, None, mode, c, "the untracked workload") {
                Ok(x) => x,
                Err(e) => {
                    progress(t0, &e);
                    r.failures.push(format!("{} round {}: untracked: {e}", mode.name(), round + 1));
                    continue;
                }
            };
            unt.push(before);
            for (i, v) in variants.iter().enumerate() {
                if stopping(&mut r) {
                    break;
                }
                let got = run_variant(&mut ctx, v, mode, c);
                let after = match run_plain(&mut ctx, None, mode, c, "the untracked workload") {
                    Ok(x) => {
                        unt.push(x);
                        x
                    }
                    Err(e) => {
                        progress(t0, &e);
                        r.failures.push(format!("{} round {}: untracked: {e}", mode.name(), round + 1));
                        before
                    }
                };
                match got {
                    Ok((rate, d)) => {
                        let ratio = bracketed_ratio(before, rate, after);
                        let cost = d.as_ref().map_or(String::new(), |d| {
                            format!(
                                "  daemon {:.2} µs/event ({:.2} net of a VPS's {:.2} ms), {:.2} wake-ups/event, \
                                 journal {} B / {} records{}",
                                d.cpu_secs / nominal * 1e6,
                                (d.cpu_secs - d.vps_cpu_secs) / nominal * 1e6,
                                d.vps_cpu_secs * 1e3,
                                (d.voluntary + d.involuntary) as f64 / nominal,
                                d.journal_bytes,
                                d.journal_records,
                                d.bystander_rate
                                    .map(|b| format!(", bystander ratio {:.3}", bracketed_ratio(before, b, after)))
                                    .unwrap_or_default()
                            )
                        });
                        eprintln!("    {:<24} {:>9.0}/s  ratio {ratio:.3}{cost}", v.name(), rate);
                        per[i].push(RunRecord {
                            mode: mode.name().into(),
                            variant: v.name(),
                            round: round + 1,
                            before,
                            after,
                            rate,
                            ratio,
                            daemon: d,
                        });
                    }
                    Err(e) => {
                        progress(t0, &format!("{}: {e}", v.name()));
                        r.failures.push(format!("{} round {}: {}: {e}", mode.name(), round + 1, v.name()));
                        failed[i] += 1;
                    }
                }
                before = after;
            }
        }
        r.untracked.push((mode.name().into(), summarize(&unt)));
        for (i, v) in variants.iter().enumerate() {
            let runs = &per[i];
            let col = |f: &dyn Fn(&RunRecord, &DaemonRun) -> f64| -> Option<Summary> {
                let xs: Vec<f64> = runs.iter().filter_map(|x| x.daemon.as_ref().map(|d| f(x, d))).collect();
                if xs.is_empty() {
                    None
                } else {
                    Some(summarize(&xs))
                }
            };
            let daemons: Vec<&DaemonRun> = runs.iter().filter_map(|x| x.daemon.as_ref()).collect();
            r.rows.push(DaemonRow {
                variant: v.name(),
                backend: match v {
                    Variant::Daemon(b) => Some(b.clone()),
                    _ => None,
                },
                mode: mode.name().into(),
                ratio: summarize(&runs.iter().map(|x| x.ratio).collect::<Vec<_>>()),
                ratios: runs.iter().map(|x| x.ratio).collect(),
                rate: summarize(&runs.iter().map(|x| x.rate).collect::<Vec<_>>()),
                bystander_ratio: col(&|x, d| {
                    d.bystander_rate.map_or(f64::NAN, |b| bracketed_ratio(x.before, b, x.after))
                }),
                cpu_us_per_event: col(&|_, d| d.cpu_secs / nominal * 1e6),
                net_cpu_us_per_event: col(&|_, d| (d.cpu_secs - d.vps_cpu_secs) / nominal * 1e6),
                vps_cpu_ms: col(&|_, d| d.vps_cpu_secs * 1e3),
                vps_wakeups: col(&|_, d| d.vps_switches as f64),
                wakeups_per_event: col(&|_, d| (d.voluntary + d.involuntary) as f64 / nominal),
                events_applied_per_event: col(&|_, d| d.events_applied as f64 / nominal),
                journal_bytes: col(&|_, d| d.journal_bytes as f64),
                journal_records: col(&|_, d| d.journal_records as f64),
                compacted_runs: daemons.iter().filter(|d| d.compacted).count(),
                loss_reports: daemons.iter().map(|d| d.loss_reports).sum(),
                divergences: daemons.iter().map(|d| d.divergences).sum(),
                catch_up_secs: col(&|_, d| d.catch_up_secs),
                startup_secs: col(&|_, d| d.startup_secs),
                failed_runs: failed[i],
            });
            r.runs.extend(runs.iter().cloned());
        }
    }
    r.load_after = sys::loadavg();
    r.elapsed = sys::now_secs() - t0;
    Ok(r)
}

/// `vpstag-bench daemon`: measures, writes the JSON if asked, prints the report. An error is
/// what stopped the measurement (nothing is written or printed then).
pub fn main(a: DaemonArgs) -> Result<(), String> {
    let r = measure(&a)?;
    if let Some(j) = &a.json {
        match serde_json::to_string_pretty(&r) {
            Ok(s) => {
                if let Err(e) = std::fs::write(j, s) {
                    eprintln!("vpstag-bench: writing {j}: {e}");
                }
            }
            Err(e) => eprintln!("vpstag-bench: {e}"),
        }
    }
    if !a.no_text {
        println!("{}", crate::report::daemon_text(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_in_words() {
        assert!(succeeded(0));
        assert!(!succeeded(1 << 8));
        assert_eq!(describe(3 << 8), "exit status 3");
        assert_eq!(describe(9), "killed by signal 9");
    }

    #[test]
    fn state_dir_usage_counts_journal_lines_and_sees_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("vpstag-bench-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("journal.jsonl"), "{}\n{}\n").unwrap();
        std::fs::write(dir.join("journal.prev.jsonl"), "{}\n").unwrap();
        std::fs::write(dir.join("snapshot.json"), "{\"v\":1}").unwrap();
        std::fs::write(dir.join("lock"), "").unwrap();
        let u = dir_usage(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(u.journal_lines, 3);
        assert_eq!(u.bytes, 6 + 3 + 7);
        assert_eq!(u.snapshot.map(|s| s.0), Some(7));
    }
}
