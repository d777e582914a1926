//! `vpstag-bench run`: runs every part as child processes, alternating tracked and untracked
//! rounds, and hands the figures to the report.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::accuracy::AccuracyResult;
use crate::latency::LatencyResult;
use crate::results::{DaemonResults, LossRow, OverheadRow, Results};
use crate::scale::{ResyncRow, ScaleRow};
use crate::stats::{bracketed_ratio, summarize};
use crate::sys;
use crate::track::{Backend, TrackResult};
use crate::work::{Mode, WorkResult};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The big sizes: 10^5 processes for accuracy, longer workloads, more rounds.
    #[arg(long)]
    pub full: bool,
    /// Rounds of each measurement (default 3, 5 with --full).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Processes for the accuracy test (default 10^4, 10^5 with --full).
    #[arg(long)]
    pub procs: Option<u64>,
    /// Creations per overhead run for seq and burst (spawn: a fifth); default 3000, 10^4 with --full.
    #[arg(long)]
    pub count: Option<u64>,
    /// Creations per loss run at full rate (default 2·10^4, 6·10^4 with --full).
    #[arg(long)]
    pub loss_count: Option<u64>,
    /// Forking processes in the loss runs.
    #[arg(long, default_value_t = 4)]
    pub loss_parallel: u32,
    /// Latency samples per run.
    #[arg(long)]
    pub latency_samples: Option<usize>,
    /// Parts to run (comma-separated): accuracy, overhead, latency, loss, scale, daemon.
    #[arg(long, default_value = "accuracy,overhead,latency,loss,scale,daemon", value_delimiter = ',')]
    pub parts: Vec<String>,
    /// Backends to measure (comma-separated); unavailable ones are reported as such.
    #[arg(long, default_value = "cnproc,ptrace,ebpf", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// CPU to pin the workloads to ("none": no pinning).
    #[arg(long, default_value = "1")]
    pub pin_cpu: String,
    /// CPU to pin the listeners to (vpstag's tracking process, strace, forkstat); "none": not pinned.
    #[arg(long, default_value = "none")]
    pub tracker_cpu: String,
    /// The proc connector's receive buffer for the forced-loss runs, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub small_rcvbuf: usize,
    /// Leave out the bare proc-connector reader (no manager) from the overhead comparison.
    #[arg(long)]
    pub no_bare: bool,
    /// Where to write the report ("-": do not write it).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: String,
    /// Where to write the chart ("-": do not write it).
    #[arg(long, default_value = "docs/bench-overhead.svg")]
    pub svg: String,
    /// Also write every figure as JSON here.
    #[arg(long)]
    pub json: Option<String>,
    /// Where criterion's results are (default: $CARGO_TARGET_DIR/criterion, else target/criterion).
    #[arg(long)]
    pub criterion_dir: Option<String>,
}

/// A child's time limit: a part that hangs is killed (with its process group) and reported.
const CHILD_TIMEOUT: Duration = Duration::from_secs(900);

fn child_json<T: DeserializeOwned>(args: &[String]) -> Result<T, String> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(sys::self_exe())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("running {args:?}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let pid = child.id() as i32;
                sys::kill(-pid, libc::SIGKILL);
                sys::kill(pid, libc::SIGKILL);
                let _ = child.wait();
                return Err(format!("{} did not finish within {} s: killed", args.join(" "), CHILD_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("waiting for {args:?}: {e}")),
        }
    };
    let text = reader.join().unwrap_or_default();
    let line = text.lines().rev().find(|l| l.starts_with('{') || l.starts_with('[')).unwrap_or("");
    if !status.success() || line.is_empty() {
        return Err(format!("{} failed ({status})", args.join(" ")));
    }
    serde_json::from_str(line).map_err(|e| format!("{}: bad output {line:?}: {e}", args.join(" ")))
}

/// Runs this executable with `args` in its own process group, its output on our standard error,
/// killed (with its group) after `limit`.
fn run_child(args: &[String], limit: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let stdout: Stdio = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => fd.into(),
        Err(_) => Stdio::null(),
    };
    let mut child = Command::new(sys::self_exe())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("running {args:?}: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{} failed ({st})", args.join(" "))),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => {
                let pid = child.id() as i32;
                // SIGTERM first (the daemon part stops its daemon and cleans up after the run under
                // way); SIGKILL after 5 s (its daemons then get SIGTERM from the kernel).
                sys::kill(-pid, libc::SIGTERM);
                let grace = std::time::Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < grace {
                    std::thread::sleep(Duration::from_millis(50));
                }
                sys::kill(-pid, libc::SIGKILL);
                let _ = child.wait();
                return Err(format!("{} did not finish within {} s: killed", args.join(" "), limit.as_secs()));
            }
            Err(e) => return Err(format!("waiting for {args:?}: {e}")),
        }
    }
}

fn read_work(path: &str) -> Result<WorkResult, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&s).map_err(|e| format!("{path}: {e}"))
}

struct Ctx {
    exe: String,
    tmp: String,
    pin: Option<usize>,
    tracker_pin: Option<usize>,
    seq: u64,
}

impl Ctx {
    fn out_path(&mut self) -> String {
        self.seq += 1;
        format!("{}/work-{}.json", self.tmp, self.seq)
    }

    fn work_args(&self, mode: Mode, count: u64, parallel: u32, rate: f64, out: &str, pin: bool) -> Vec<String> {
        let mut v = vec![
            self.exe.clone(),
            "work".into(),
            "--mode".into(),
            mode.name().into(),
            "--count".into(),
            count.to_string(),
            "--parallel".into(),
            parallel.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--out".into(),
            out.into(),
        ];
        if let (true, Some(c)) = (pin, self.pin) {
            v.push("--cpu".into());
            v.push(c.to_string());
        }
        v
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Untracked,
    Tracker(Backend),
    /// A bare proc-connector reader draining every 5 ms (no manager).
    RawBatched,
    Strace,
    Forkstat,
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::Untracked => "untracked".into(),
            Variant::Tracker(b) => format!("vpstag {}", b.name()),
            Variant::RawBatched => "bare cnproc reader, 5 ms batches".into(),
            Variant::Strace => "strace -f".into(),
            Variant::Forkstat => "forkstat".into(),
        }
    }
}

/// One run of the workload under `v`: its rate, the listener's CPU seconds, the manager's events.
/// (rate, listener CPU seconds, events the manager applied, the tracking process's wake-ups)
type VariantRun = (f64, Option<f64>, Option<u64>, Option<u64>);

fn run_variant(ctx: &mut Ctx, v: Variant, mode: Mode, count: u64) -> Result<VariantRun, String> {
    let out = ctx.out_path();
    let w = ctx.work_args(mode, count, 1, 0.0, &out, true);
    match v {
        Variant::Untracked => {
            let st = Command::new(&w[0]).args(&w[1..]).status().map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("workload failed: {st}"));
            }
            Ok((read_work(&out)?.rate, None, None, None))
        }
        Variant::Tracker(b) => {
            let mut args = vec!["track".to_string(), "--backend".into(), b.name().into()];
            if let Some(c) = ctx.tracker_pin {
                args.push("--cpu".into());
                args.push(c.to_string());
            }
            args.push("--".into());
            args.extend(w);
            let t: TrackResult = child_json(&args)?;
            if t.exit_code != 0 {
                return Err(format!("workload under {} exited with {}", b.name(), t.exit_code));
            }
            Ok((read_work(&out)?.rate, Some(t.tracker_cpu), Some(t.events), Some(t.wakeups)))
        }
        Variant::RawBatched => {
            let mut args = vec!["raw".to_string(), "--batch-ms".into(), "5".into()];
            if let Some(c) = ctx.tracker_pin {
                args.push("--cpu".into());
                args.push(c.to_string());
            }
            args.push("--".into());
            args.extend(w);
            let t: TrackResult = child_json(&args)?;
            if t.exit_code != 0 {
                return Err(format!("workload under the bare reader exited with {}", t.exit_code));
            }
            Ok((read_work(&out)?.rate, Some(t.tracker_cpu), Some(t.events), Some(t.wakeups)))
        }
        Variant::Strace => {
            let st = taskset(ctx.tracker_pin, "strace")
                .args(["-f", "-e", "trace=none", "-o", "/dev/null"])
                .args(&w)
                .status()
                .map_err(|e| format!("strace: {e}"))?;
            if !st.success() {
                return Err(format!("strace run failed: {st}"));
            }
            Ok((read_work(&out)?.rate, None, None, None))
        }
        Variant::Forkstat => {
            let fs = taskset(ctx.tracker_pin, "forkstat")
                .args(["-q", "-e", "fork,exec,exit"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("forkstat: {e}"))?;
            let fpid = fs.id() as i32;
            std::thread::sleep(Duration::from_millis(300));
            let st = Command::new(&w[0]).args(&w[1..]).status();
            sys::kill(fpid, libc::SIGINT);
            let (_, cpu) = sys::wait_child(fpid).map_err(|e| e.to_string())?;
            std::mem::forget(fs);
            let st = st.map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("workload failed: {st}"));
            }
            Ok((read_work(&out)?.rate, Some(cpu), None, None))
        }
    }
}

/// `program`, under `taskset -c CPU` when pinned.
fn taskset(cpu: Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

fn machine() -> Vec<(String, String)> {
    let mut m = Vec::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    m.push(("CPU".into(), format!("{ncpu} × {cpu}")));
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    m.push(("memory".into(), format!("{:.1} GiB", mem as f64 / 1048576.0)));
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    m.push(("kernel".into(), uname));
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| l[12..].trim_matches('"').to_string()))
        .unwrap_or_default();
    m.push(("system".into(), os));
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap_or_default();
    m.push(("pid_max".into(), pid_max.trim().into()));
    let rmem = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default();
    m.push(("net.core.rmem_max".into(), rmem.trim().into()));
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    m.push(("rustc".into(), rustc));
    for tool in ["strace", "forkstat"] {
        let v = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", tool])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        m.push((tool.into(), if v.is_empty() { "not installed".into() } else { v }));
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    m.push(("vpstag commit".into(), format!("{commit}{}", if dirty { " (with uncommitted changes)" } else { "" })));
    m
}

fn progress(t0: f64, msg: &str) {
    eprintln!("[{:>6.1}s] {msg}", sys::now_secs() - t0);
}

pub fn run(a: RunArgs) {
    let t0 = sys::now_secs();
    let rounds = a.rounds.unwrap_or(if a.full { 5 } else { 3 });
    let count = a.count.unwrap_or(if a.full { 10_000 } else { 3_000 });
    let loss_count = a.loss_count.unwrap_or(if a.full { 60_000 } else { 20_000 });
    let procs = a.procs.unwrap_or(if a.full { 100_000 } else { 10_000 });
    let lat_samples = a.latency_samples.unwrap_or(if a.full { 5_000 } else { 1_000 });
    let pin = if a.pin_cpu == "none" { None } else { a.pin_cpu.parse().ok() };
    let tmp = std::env::temp_dir().join(format!("vpstag-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let tracker_pin = if a.tracker_cpu == "none" { None } else { a.tracker_cpu.parse().ok() };
    let mut ctx = Ctx { exe: sys::self_exe(), tmp: tmp.to_string_lossy().into_owned(), pin, tracker_pin, seq: 0 };
    let has = |p: &str| a.parts.iter().any(|x| x == p);

    let mut r = Results {
        date: sys::date(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        build: if cfg!(feature = "ebpf") {
            "cargo build --release -p vpstag-bench --features ebpf".into()
        } else {
            "cargo build --release -p vpstag-bench".into()
        },
        machine: machine(),
        rounds,
        pin_cpu: a.pin_cpu.clone(),
        tracker_cpu: a.tracker_cpu.clone(),
        loss_parallel: a.loss_parallel,
        entry_size: std::mem::size_of::<vpstag::Entry>(),
        accuracy_procs: procs,
        load_before: sys::loadavg(),
        ..Default::default()
    };
    // Which backends work here.
    let mut backends = Vec::new();
    for name in &a.backends {
        let b = match name.as_str() {
            "cnproc" => Backend::Cnproc,
            "ptrace" => Backend::Ptrace,
            "ebpf" => Backend::Ebpf,
            other => {
                r.unavailable.push((other.into(), "unknown backend".into()));
                continue;
            }
        };
        let probe: Result<TrackResult, String> =
            child_json(&["track".into(), "--backend".into(), b.name().into(), "--".into(), "/bin/true".into()]);
        match probe {
            Ok(_) => backends.push(b),
            Err(e) => {
                let why = if b == Backend::Ebpf && !cfg!(feature = "ebpf") {
                    "not built in (vpstag-bench's cargo feature `ebpf`)".to_string()
                } else {
                    e
                };
                progress(t0, &format!("{}: unavailable: {why}", b.name()));
                r.unavailable.push((b.name().into(), why));
            }
        }
    }
    let tools_ok = |t: &str| Command::new(t).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();

    // 1. Accuracy.
    if has("accuracy") {
        for &b in &backends {
            let mut runs = Vec::new();
            // Two runs per backend: the goal is zero, and 10^5-process runs must fit a final run's time.
            let n = rounds.min(2);
            for i in 0..n {
                progress(t0, &format!("accuracy {} run {}/{n}: {procs} processes", b.name(), i + 1));
                match child_json::<AccuracyResult>(&[
                    "accuracy".into(),
                    "--backend".into(),
                    b.name().into(),
                    "--procs".into(),
                    procs.to_string(),
                ]) {
                    Ok(x) => runs.push(x),
                    Err(e) => progress(t0, &format!("accuracy {}: {e}", b.name())),
                }
            }
            r.accuracy.push((b.name().into(), runs));
        }
    }

    // 2 and 3. Overhead and listener cost.
    if has("overhead") {
        let mut variants = vec![];
        for &b in &backends {
            variants.push(Variant::Tracker(b));
        }
        if backends.contains(&Backend::Cnproc) && !a.no_bare {
            variants.push(Variant::RawBatched);
        }
        if tools_ok("strace") {
            variants.push(Variant::Strace);
        } else {
            r.unavailable.push(("strace".into(), "not installed (bench/install-deps)".into()));
        }
        if Command::new("forkstat").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
            variants.push(Variant::Forkstat);
        } else {
            r.unavailable.push(("forkstat".into(), "not installed (bench/install-deps)".into()));
        }
        for mode in [Mode::Seq, Mode::Burst, Mode::Spawn] {
            let c = if mode == Mode::Spawn { (count / 5).max(100) } else { count };
            r.counts.push((mode.name().into(), c));
            let mut unt = Vec::new();
            // Per variant: ratios, rates, listener CPU per 10^5 events, events applied per workload event.
            type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
            let mut per: Vec<Samples> = vec![Default::default(); variants.len()];
            for round in 0..rounds {
                progress(t0, &format!("overhead {} round {}/{rounds}", mode.name(), round + 1));
                let mut before = match run_variant(&mut ctx, Variant::Untracked, mode, c) {
                    Ok(x) => x.0,
                    Err(e) => {
                        progress(t0, &e);
                        continue;
                    }
                };
                unt.push(before);
                for (i, &v) in variants.iter().enumerate() {
                    let got = run_variant(&mut ctx, v, mode, c);
                    let after = match run_variant(&mut ctx, Variant::Untracked, mode, c) {
                        Ok(x) => x.0,
                        Err(e) => {
                            progress(t0, &e);
                            before
                        }
                    };
                    unt.push(after);
                    match got {
                        Ok((rate, cpu, events, wakeups)) => {
                            let ratio = bracketed_ratio(before, rate, after);
                            per[i].0.push(ratio);
                            per[i].1.push(rate);
                            let nominal = c as f64 * mode.events_per_op();
                            if let Some(cpu) = cpu {
                                per[i].2.push(cpu / nominal * 1e5);
                            }
                            if let Some(ev) = events {
                                per[i].3.push(ev as f64 / nominal);
                            }
                            if let Some(w) = wakeups {
                                per[i].4.push(w as f64 / nominal);
                            }
                            eprintln!(
                                "    {:<16} {:>9.0}/s  ratio {:.3}{}",
                                v.name(),
                                rate,
                                ratio,
                                cpu.map(|c| format!("  listener {:.3} s CPU", c)).unwrap_or_default()
                            );
                        }
                        Err(e) => progress(t0, &format!("{}: {e}", v.name())),
                    }
                    before = after;
                }
            }
            r.untracked.push((mode.name().into(), summarize(&unt)));
            for (i, v) in variants.iter().enumerate() {
                let (ratios, rates, cpus, evs, wks) = &per[i];
                r.overhead.push(OverheadRow {
                    mode: mode.name().into(),
                    variant: v.name(),
                    ratio: summarize(ratios),
                    rate: summarize(rates),
                    cpu_per_1e5: if cpus.is_empty() { None } else { Some(summarize(cpus)) },
                    events_seen_per_event: if evs.is_empty() { None } else { Some(crate::stats::median(evs)) },
                    wakeups_per_event: if wks.is_empty() { None } else { Some(crate::stats::median(wks)) },
                    ratios: ratios.clone(),
                });
            }
        }
    }

    // 4. Latency.
    if has("latency") {
        for &b in &backends {
            let mut runs = Vec::new();
            for i in 0..rounds {
                progress(t0, &format!("latency {} run {}/{rounds}: {lat_samples} forks", b.name(), i + 1));
                match child_json::<LatencyResult>(&[
                    "latency".into(),
                    "--backend".into(),
                    b.name().into(),
                    "--samples".into(),
                    lat_samples.to_string(),
                ]) {
                    Ok(x) => runs.push(x),
                    Err(e) => progress(t0, &format!("latency {}: {e}", b.name())),
                }
            }
            if runs.is_empty() {
                continue;
            }
            let p50 = summarize(&runs.iter().map(|x| x.p50).collect::<Vec<_>>());
            let p99 = summarize(&runs.iter().map(|x| x.p99).collect::<Vec<_>>());
            let mut agg = runs[0].clone();
            agg.samples = runs.iter().map(|x| x.samples).sum();
            agg.untagged = runs.iter().map(|x| x.untagged).sum();
            agg.retried = runs.iter().map(|x| x.retried).sum();
            agg.max = runs.iter().map(|x| x.max).fold(0.0, f64::max);
            agg.hop_p50 = crate::stats::median(&runs.iter().map(|x| x.hop_p50).collect::<Vec<_>>());
            agg.hop_p99 = crate::stats::median(&runs.iter().map(|x| x.hop_p99).collect::<Vec<_>>());
            r.latency.push((b.name().into(), p50, p99, agg));
        }
    }

    // 5. Loss.
    if has("loss") && backends.contains(&Backend::Cnproc) {
        let lc = loss_count;
        let par = a.loss_parallel.max(1);
        let mut unt = Vec::new();
        let mut row = |ctx: &mut Ctx,
                       label: &str,
                       rcvbuf: Option<usize>,
                       mode: Mode,
                       rate: f64,
                       n: u64,
                       runs: usize|
         -> LossRow {
            let mut rates = Vec::new();
            let (mut lr, mut le, mut rs, mut rt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut exact = 0;
            let mut done = 0;
            let mut wait_missed = 0;
            for i in 0..runs {
                progress(t0, &format!("loss: {label} run {}/{runs}", i + 1));
                // An untracked run next to each tracked one: the machine's full rate.
                if rate == 0.0 && rcvbuf.is_none() {
                    let out = ctx.out_path();
                    let w = ctx.work_args(mode, n, par, 0.0, &out, false);
                    if Command::new(&w[0]).args(&w[1..]).status().map(|s| s.success()).unwrap_or(false) {
                        if let Ok(x) = read_work(&out) {
                            unt.push(x.rate);
                        }
                    }
                }
                let out = ctx.out_path();
                let mut args = vec!["track".to_string(), "--backend".into(), "cnproc".into()];
                if let Some(b) = rcvbuf {
                    args.push("--rcvbuf".into());
                    args.push(b.to_string());
                }
                args.push("--".into());
                args.extend(ctx.work_args(mode, n, par, rate, &out, false));
                match child_json::<TrackResult>(&args) {
                    Ok(t) => {
                        if let Ok(w) = read_work(&out) {
                            rates.push(w.rate);
                        }
                        lr.push(t.loss_reports as f64);
                        le.push(t.lost_events as f64);
                        rs.push(t.resyncs as f64);
                        rt.push(t.resync_secs);
                        if t.divergences == 0 && t.table_left == 0 {
                            exact += 1;
                        }
                        if t.wait_missed {
                            wait_missed += 1;
                        }
                        done += 1;
                        eprintln!(
                            "    {:>9.0}/s  loss reports {}  lost {}  resyncs {}  exact {}",
                            rates.last().copied().unwrap_or(0.0),
                            t.loss_reports,
                            t.lost_events,
                            t.resyncs,
                            t.divergences == 0 && t.table_left == 0
                        );
                    }
                    Err(e) => progress(t0, &e),
                }
            }
            LossRow {
                label: label.into(),
                rcvbuf: rcvbuf
                    .map(|b| if b >= 1024 { format!("{} KiB", b / 1024) } else { format!("{b} B") })
                    .unwrap_or_else(|| "8 MiB (default)".into()),
                mode: mode.name().into(),
                parallel: par,
                target_rate: rate,
                rate: summarize(&rates),
                loss_reports: summarize(&lr),
                lost_events: summarize(&le),
                resyncs: summarize(&rs),
                exact_runs: exact,
                runs: done,
                resync_secs: summarize(&rt),
                wait_missed,
            }
        };
        let lr = rounds.min(3);
        r.loss.push(row(&mut ctx, "full rate, fork", None, Mode::Seq, 0.0, lc, lr));
        r.loss.push(row(&mut ctx, "full rate, bursts", None, Mode::Burst, 0.0, lc, lr));
        let small = Some(a.small_rcvbuf);
        r.loss.push(row(&mut ctx, "full rate, small buffer", small, Mode::Seq, 0.0, lc, lr));
        // The highest paced rate with no loss with the small buffer.
        let mut best = None;
        for target in [250.0, 500.0, 1_000.0, 2_000.0, 4_000.0, 8_000.0] {
            let n = ((target * 2.0) as u64).max(1_000);
            let lr = row(
                &mut ctx,
                &format!("paced {target:.0}/s, small buffer"),
                small,
                Mode::Seq,
                target,
                n,
                rounds.min(3),
            );
            let lossless = lr.loss_reports.max == 0.0 && lr.runs > 0;
            let achieved = lr.rate.median;
            r.loss.push(lr);
            if lossless {
                best = Some(achieved);
            } else {
                break;
            }
            if achieved < target * 0.8 {
                break;
            }
        }
        r.highest_zero_loss_small = best;
        r.untracked_parallel_rate = Some(summarize(&unt));
    }

    // 6. Scale.
    if has("scale") {
        progress(t0, "scale: proxy tables 10^3..10^6");
        r.scale = crate::scale::proxy_rows(&[1_000, 10_000, 100_000, 1_000_000], rounds);
        let sb = if backends.contains(&Backend::Cnproc) {
            Backend::Cnproc
        } else {
            backends.first().copied().unwrap_or(Backend::Cnproc)
        };
        for n in [1_000usize, 10_000] {
            progress(t0, &format!("scale: real table with {n} live processes"));
            match child_json::<(ScaleRow, ResyncRow)>(&[
                "scale-real".into(),
                "--entries".into(),
                n.to_string(),
                "--backend".into(),
                sb.name().into(),
                "--rounds".into(),
                rounds.to_string(),
            ]) {
                Ok((s, rr)) => {
                    r.scale.push(s);
                    r.resync.push(rr);
                }
                Err(e) => progress(t0, &format!("scale {n}: {e}")),
            }
        }
        r.scale.sort_by(|x, y| x.entries.cmp(&y.entries).then(x.kind.cmp(&y.kind)));
        r.criterion = crate::report::criterion_results(a.criterion_dir.as_deref());
    }

    // 7. The daemon as deployed: its own process (it becomes the child subreaper).
    if has("daemon") {
        progress(t0, "daemon as deployed");
        let out = format!("{}/daemon.json", ctx.tmp);
        let mut args = vec![
            "daemon".to_string(),
            "--rounds".into(),
            rounds.to_string(),
            "--count".into(),
            count.to_string(),
            "--pin-cpu".into(),
            a.pin_cpu.clone(),
            "--daemon-cpu".into(),
            a.tracker_cpu.clone(),
            "--backends".into(),
            a.backends.join(","),
            "--json".into(),
            out.clone(),
            "--no-text".into(),
        ];
        if a.full {
            args.push("--full".into());
        }
        match run_child(&args, Duration::from_secs(3 * 3600)) {
            Ok(()) => match std::fs::read_to_string(&out)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<DaemonResults>(&t).map_err(|e| e.to_string()))
            {
                Ok(d) => r.daemon = Some(d),
                Err(e) => progress(t0, &format!("daemon: reading {out}: {e}")),
            },
            Err(e) => progress(t0, &format!("daemon: {e}")),
        }
    }

    r.load_after = sys::loadavg();
    r.elapsed = sys::now_secs() - t0;
    let _ = std::fs::remove_dir_all(&tmp);
    let text = crate::report::text(&r);
    println!("{text}");
    if let Some(j) = &a.json {
        let _ = std::fs::write(j, serde_json::to_string_pretty(&r).unwrap_or_default());
    }
    if a.out != "-" {
        let md = crate::report::markdown(&r, &a.svg);
        match std::fs::write(&a.out, md) {
            Ok(()) => eprintln!("wrote {}", a.out),
            Err(e) => eprintln!("writing {}: {e}", a.out),
        }
    }
    if a.svg != "-" {
        if let Some(parent) = std::path::Path::new(&a.svg).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match std::fs::write(&a.svg, crate::report::svg(&r)) {
            Ok(()) => eprintln!("wrote {}", a.svg),
            Err(e) => eprintln!("writing {}: {e}", a.svg),
        }
    }
}
