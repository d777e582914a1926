//! `vpstag-bench`: the whole-process benchmarks of vpstag (issue 6).
//!
//! `vpstag-bench run` measures, per tracker, accuracy under load, the overhead on a forking
//! workload (next to `strace -f` and `forkstat`), the listener's CPU cost, the tag latency, event
//! loss and the table's scale; prints a table and writes `BENCHMARKS.md` and an SVG chart.
//! `vpstag-bench daemon` (also a part of `run`) measures the daemon as users deploy it: `vpstag
//! daemon` per backend on a real disk, workloads started with `vpstag start`. The other subcommands are its parts, run as separate processes (a tracking process must be alone
//! in its process: ptrace reaps every child of its process, and its CPU time is measured).
//! Table look-ups are also measured with criterion: `cargo bench --bench table` at the root.

#[cfg(target_os = "linux")]
mod accuracy;
#[cfg(target_os = "linux")]
mod daemon;
#[cfg(target_os = "linux")]
mod latency;
#[cfg(target_os = "linux")]
mod orchestrate;
#[cfg(target_os = "linux")]
mod report;
#[cfg(target_os = "linux")]
mod results;
#[cfg(target_os = "linux")]
mod scale;
#[cfg(target_os = "linux")]
mod stats;
#[cfg(target_os = "linux")]
mod sys;
#[cfg(target_os = "linux")]
mod track;
#[cfg(target_os = "linux")]
mod work;

#[cfg(target_os = "linux")]
use clap::{Parser, Subcommand};

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: scale::Counting = scale::Counting;

#[cfg(target_os = "linux")]
#[derive(Parser)]
#[command(name = "vpstag-bench", about = "vpstag's benchmarks: accuracy, overhead, latency, loss and scale")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[cfg(target_os = "linux")]
#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmarks, print the tables, write BENCHMARKS.md and the chart.
    Run(Box<orchestrate::RunArgs>),
    /// The daemon as deployed: `vpstag daemon` per backend, workloads started with `vpstag start`,
    /// next to untracked runs, strace -f and a minimal C PTRACE_SEIZE tracer.
    Daemon(Box<daemon::DaemonArgs>),
    /// Write the report again from the JSON that `run --json` saved.
    Report {
        json: String,
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: String,
        #[arg(long, default_value = "docs/bench-overhead.svg")]
        svg: String,
    },
    /// The workload: create processes and print the rate (JSON).
    Work {
        #[arg(long, value_enum)]
        mode: work::Mode,
        #[arg(long)]
        count: u64,
        /// Forking processes sharing the count.
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// Pace to this many creations per second in all (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Pin the workload (and its children) to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        /// Write the JSON result here instead of standard output.
        #[arg(long)]
        out: Option<String>,
    },
    /// A tracking process: run CMD as a VPS under BACKEND and print what it cost (JSON).
    Track {
        #[arg(long, value_enum)]
        backend: track::Backend,
        /// The proc connector's receive buffer in bytes (default 8 MiB).
        #[arg(long)]
        rcvbuf: Option<usize>,
        /// Pin the tracking process to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// A bare proc-connector reader (no manager) that drains in batches while CMD runs (JSON).
    Raw {
        /// Sleep this long after each drain.
        #[arg(long, default_value_t = 5)]
        batch_ms: u64,
        /// Pin the reader to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Tag latency under BACKEND (JSON).
    Latency {
        #[arg(long, value_enum)]
        backend: track::Backend,
        #[arg(long, default_value_t = 2000)]
        samples: usize,
    },
    /// (internal) the VPS side of `latency`.
    #[command(hide = true)]
    LatChild {
        #[arg(long)]
        samples: usize,
        #[arg(long)]
        fd: i32,
    },
    /// Accuracy under load with BACKEND (JSON).
    Accuracy {
        #[arg(long, value_enum)]
        backend: track::Backend,
        #[arg(long, default_value_t = 10_000)]
        procs: u64,
        #[arg(long, default_value_t = 8)]
        vpses: usize,
        #[arg(long, default_value_t = 10)]
        checkpoints: u64,
        #[arg(long, default_value_t = 10)]
        sleeper_every: u64,
        #[arg(long, default_value_t = 60)]
        cap: usize,
    },
    /// (internal) the VPS side of `accuracy`.
    #[command(hide = true)]
    AccWorker {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        every: u64,
        #[arg(long)]
        sleeper_every: u64,
        #[arg(long)]
        cap: usize,
        #[arg(long)]
        fd: i32,
    },
    /// A real table of ENTRIES live processes: bytes per entry, look-ups, resync times (JSON).
    ScaleReal {
        #[arg(long)]
        entries: usize,
        #[arg(long, value_enum, default_value = "cnproc")]
        backend: track::Backend,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

#[cfg(target_os = "linux")]
fn print_json<T: serde::Serialize>(v: &T, out: Option<&str>) {
    let s = serde_json::to_string(v).expect("serializable");
    match out {
        // Written whole or not at all: a reader polling for the file never sees half of it.
        Some(path) => {
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, s)
                .and_then(|()| std::fs::rename(&tmp, path))
                .unwrap_or_else(|e| die(&format!("writing {path}: {e}")))
        }
        None => println!("{s}"),
    }
}

#[cfg(target_os = "linux")]
fn die(msg: &str) -> ! {
    eprintln!("vpstag-bench: {msg}");
    std::process::exit(1)
}

#[cfg(target_os = "linux")]
fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => orchestrate::run(*a),
        Cmd::Daemon(a) => {
            if let Err(e) = daemon::main(*a) {
                die(&format!("daemon: {e}"));
            }
        }
        Cmd::Report { json, out, svg } => {
            let text = std::fs::read_to_string(&json).unwrap_or_else(|e| die(&format!("reading {json}: {e}")));
            let r: results::Results = serde_json::from_str(&text).unwrap_or_else(|e| die(&format!("{json}: {e}")));
            println!("{}", report::text(&r));
            if out != "-" {
                std::fs::write(&out, report::markdown(&r, &svg))
                    .unwrap_or_else(|e| die(&format!("writing {out}: {e}")));
            }
            if svg != "-" {
                std::fs::write(&svg, report::svg(&r)).unwrap_or_else(|e| die(&format!("writing {svg}: {e}")));
            }
        }
        Cmd::Work { mode, count, parallel, rate, cpu, out } => match work::run(mode, count, parallel, rate, cpu) {
            Ok(r) => print_json(&r, out.as_deref()),
            Err(e) => die(&format!("workload: {e}")),
        },
        Cmd::Track { backend, rcvbuf, cpu, cmd } => match cpu
            .map_or(Ok(()), sys::pin_to_cpu)
            .map_err(|e| e.to_string())
            .and_then(|()| track::run(backend, rcvbuf, &cmd))
        {
            Ok(r) => print_json(&r, None),
            Err(e) => die(&format!("tracking with {}: {e}", backend.name())),
        },
        Cmd::Raw { batch_ms, cpu, cmd } => match cpu
            .map_or(Ok(()), sys::pin_to_cpu)
            .map_err(|e| e.to_string())
            .and_then(|()| track::raw(batch_ms, &cmd))
        {
            Ok(r) => print_json(&r, None),
            Err(e) => die(&format!("raw proc connector reader: {e}")),
        },
        Cmd::Latency { backend, samples } => match latency::run(backend, samples) {
            Ok(r) => print_json(&r, None),
            Err(e) => die(&format!("latency with {}: {e}", backend.name())),
        },
        Cmd::LatChild { samples, fd } => {
            if let Err(e) = latency::child(samples, fd) {
                die(&format!("latency child: {e}"));
            }
        }
        Cmd::Accuracy { backend, procs, vpses, checkpoints, sleeper_every, cap } => {
            match accuracy::run(backend, accuracy::Params { procs, vpses, checkpoints, sleeper_every, cap }) {
                Ok(r) => print_json(&r, None),
                Err(e) => die(&format!("accuracy with {}: {e}", backend.name())),
            }
        }
        Cmd::AccWorker { count, every, sleeper_every, cap, fd } => {
            if let Err(e) = accuracy::worker(count, every, sleeper_every, cap, fd) {
                die(&format!("accuracy worker: {e}"));
            }
        }
        Cmd::ScaleReal { entries, backend, rounds } => match scale::real(entries, backend, rounds) {
            Ok(r) => print_json(&r, None),
            Err(e) => die(&format!("scale: {e}")),
        },
    }
}

/// Elsewhere the benchmarks have nothing to measure with (proc connector, eBPF, ptrace as Linux has
/// it, /proc, sched_setaffinity): the binary builds, and says so.
#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!(
        "vpstag-bench: the benchmarks are Linux-only (proc connector, eBPF, /proc, sched_setaffinity); \
         nothing to run on {}",
        std::env::consts::OS
    );
    std::process::exit(1);
}
