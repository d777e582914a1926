//! What tracking costs a fork-heavy workload: a process forks N children that exit at once,
//! reaping each (`loop`) or 50 at a time (`burst`), tagged vs untracked, in ABAB rounds, under
//! several kernel-side settings and readers. Prints the median time per fork untracked and
//! tagged, the tagged/untracked rate ratio of those medians (`ratio`) and the median of each
//! round's ratio (`pairs`: a round's two runs are neighbours in time, so they share the machine's
//! noise), the events read, the reader thread's CPU time per event, and how often it drained.
//!
//! ```text
//! cargo run --release -p vpstag-ebpf --example ebpf_overhead -- [--forks N] [--rounds R] [--only NAME]
//! ```
//!
//! As root. The workload runs pinned to CPU 1 (a re-exec of this program, so that it is
//! single-threaded), the reader thread to CPU 0. Settings:
//!
//! - `per-record`: `wakeup_interval = 0`, `Reporting::All`, reader like vpstag's pump (poll the
//!   ring's descriptor, drain, repeat): the behaviour before batched wake-ups.
//! - `batched`: the default 5 ms interval, `Reporting::All`, a reader that drains at most every
//!   5 ms (poll, drain, then sleep out the rest of 5 ms).
//! - `batched-pump`: the default interval with the pump-like reader of `per-record`.
//! - `roots-only`: `Reporting::RootsOnly`, the rate-limited reader; afterwards the speed of
//!   `tag_of` and `members` on a tagged tree.

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("overhead: the eBPF backend is Linux only");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, RawFd};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use vpstag_ebpf::{Config, Ebpf, Reporting};
    use vpstag_tracker::{ForkTracker, Pid, VpsId};

    const WORKER_CPU: usize = 1;
    const READER_CPU: usize = 0;
    const BURST: usize = 50;
    const DRAIN_EVERY: Duration = Duration::from_millis(5);

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Reader {
        /// poll, drain, repeat: vpstag's pump loop.
        Pump,
        /// poll, drain, then sleep out the rest of DRAIN_EVERY.
        RateLimited,
    }

    struct Setting {
        name: &'static str,
        wakeup: Duration,
        reporting: Reporting,
        reader: Reader,
    }

    const SETTINGS: [Setting; 4] = [
        Setting { name: "per-record", wakeup: Duration::ZERO, reporting: Reporting::All, reader: Reader::Pump },
        Setting {
            name: "batched",
            wakeup: Config::DEFAULT_WAKEUP_INTERVAL,
            reporting: Reporting::All,
            reader: Reader::RateLimited,
        },
        Setting {
            name: "batched-pump",
            wakeup: Config::DEFAULT_WAKEUP_INTERVAL,
            reporting: Reporting::All,
            reader: Reader::Pump,
        },
        Setting {
            name: "roots-only",
            wakeup: Config::DEFAULT_WAKEUP_INTERVAL,
            reporting: Reporting::RootsOnly,
            reader: Reader::RateLimited,
        },
    ];

    fn pin(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it, and
        // sched_setaffinity(0) applies to the calling thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                eprintln!("overhead: cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// The CPU time the calling thread has used.
    fn thread_cpu() -> Duration {
        // SAFETY: a zeroed rusage is valid; getrusage fills it in.
        unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
        }
    }

    /// The workload, in a process of its own: waits for a byte on stdin, then forks `n` children
    /// that exit at once, reaping each (`burst` = 1) or `burst` at a time; prints the nanoseconds.
    fn worker(kind: &str, n: usize) -> ! {
        pin(WORKER_CPU);
        let burst = if kind == "burst" { BURST } else { 1 };
        let mut gate = [0u8; 1];
        if std::io::stdin().read_exact(&mut gate).is_err() {
            std::process::exit(2);
        }
        let start = Instant::now();
        let mut done = 0;
        while done < n {
            let k = burst.min(n - done);
            for _ in 0..k {
                // SAFETY: this process is single-threaded; the child only calls _exit.
                let child = unsafe { libc::fork() };
                if child == 0 {
                    // SAFETY: _exit is async-signal-safe.
                    unsafe { libc::_exit(0) };
                }
                if child < 0 {
                    eprintln!("worker: fork: {}", std::io::Error::last_os_error());
                    std::process::exit(1);
                }
            }
            for _ in 0..k {
                // SAFETY: reaps any child of ours.
                unsafe { libc::wait(std::ptr::null_mut()) };
            }
            done += k;
        }
        println!("{}", start.elapsed().as_nanos());
        std::process::exit(0)
    }

    struct Shared {
        t: Mutex<Ebpf>,
        stop: AtomicBool,
        events: Mutex<u64>,
        drains: Mutex<u64>,
    }

    fn reader(shared: &Shared, fd: RawFd, kind: Reader) -> Duration {
        pin(READER_CPU);
        let cpu0 = thread_cpu();
        let mut buf = Vec::with_capacity(4096);
        let drain = |buf: &mut Vec<_>| {
            buf.clear();
            let n = {
                let mut t = shared.t.lock().unwrap_or_else(|e| e.into_inner());
                t.read_events(buf, Some(Duration::ZERO)).unwrap_or(0)
            };
            *shared.events.lock().unwrap_or_else(|e| e.into_inner()) += n as u64;
            *shared.drains.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        };
        while !shared.stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; the descriptor lives as long as the tracker in `shared`.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let began = Instant::now();
            drain(&mut buf);
            if kind == Reader::RateLimited {
                if let Some(rest) = DRAIN_EVERY.checked_sub(began.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        // What the last run left.
        drain(&mut buf);
        thread_cpu() - cpu0
    }

    /// One run of the workload; tagged (as a VPS's first process) when `t` is given.
    fn run(kind: &str, n: usize, t: Option<&Shared>, vps: VpsId) -> Duration {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args(["__worker", kind, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the worker");
        if let Some(s) = t {
            let pid = Pid::new(child.id() as i32).expect("pid");
            s.t.lock().unwrap_or_else(|e| e.into_inner()).tag_root(pid, vps).expect("tag the worker");
        }
        child.stdin.take().expect("stdin").write_all(b"g").expect("open the gate");
        let mut out = String::new();
        child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read the worker");
        let status = child.wait().expect("wait for the worker");
        assert!(status.success(), "worker failed: {status}");
        Duration::from_nanos(out.trim().parse().expect("the worker's nanoseconds"))
    }

    fn median(v: &mut [Duration]) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    struct Args {
        forks: usize,
        rounds: usize,
        only: Option<String>,
    }

    fn args() -> Args {
        let mut a = Args { forks: 2000, rounds: 9, only: None };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
            match arg.as_str() {
                "--forks" => a.forks = value().parse().unwrap_or_else(|_| usage("--forks: a number")),
                "--rounds" => a.rounds = value().parse().unwrap_or_else(|_| usage("--rounds: a number")),
                "--only" => a.only = Some(value()),
                other => usage(&format!("unknown argument {other}")),
            }
        }
        a
    }

    fn usage(msg: &str) -> ! {
        eprintln!("overhead: {msg}\nusage: overhead [--forks N] [--rounds R] [--only per-record|batched|batched-pump|roots-only]");
        std::process::exit(2)
    }

    pub fn main() {
        let argv: Vec<String> = std::env::args().collect();
        if argv.get(1).map(String::as_str) == Some("__worker") {
            let n = argv.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
            worker(argv.get(2).map(String::as_str).unwrap_or("loop"), n);
        }
        let a = args();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("overhead: needs root (BPF programs)");
            std::process::exit(1);
        }
        println!(
            "{} forks a run, {} ABAB rounds, worker on CPU {WORKER_CPU}, reader on CPU {READER_CPU}",
            a.forks, a.rounds
        );
        println!("load average: {}", loadavg());
        println!(
            "{:<13} {:<5} {:>12} {:>12} {:>7} {:>7} {:>9} {:>11} {:>7}",
            "setting", "load", "untracked", "tagged", "ratio", "pairs", "events", "reader/ev", "drains"
        );
        for s in SETTINGS.iter().filter(|s| a.only.as_deref().is_none_or(|o| o == s.name)) {
            let config = Config { wakeup_interval: s.wakeup, reporting: s.reporting, ..Config::default() };
            let t = Ebpf::with_config(config).unwrap_or_else(|e| {
                eprintln!("overhead: {e}");
                std::process::exit(1)
            });
            let fd = t.as_fd().as_raw_fd();
            let shared = Arc::new(Shared {
                t: Mutex::new(t),
                stop: AtomicBool::new(false),
                events: Mutex::new(0),
                drains: Mutex::new(0),
            });
            for kind in ["loop", "burst"] {
                shared.stop.store(false, Ordering::Relaxed);
                *shared.events.lock().unwrap_or_else(|e| e.into_inner()) = 0;
                *shared.drains.lock().unwrap_or_else(|e| e.into_inner()) = 0;
                let before = shared.t.lock().unwrap_or_else(|e| e.into_inner()).counters().expect("counters");
                let s2 = Arc::clone(&shared);
                let reader_kind = s.reader;
                let reader = std::thread::spawn(move || reader(&s2, fd, reader_kind));
                let (mut plain, mut tagged) = (Vec::new(), Vec::new());
                for round in 0..a.rounds {
                    plain.push(run(kind, a.forks, None, VpsId(1)));
                    tagged.push(run(kind, a.forks, Some(&shared), VpsId(round as u64 + 1)));
                }
                shared.stop.store(true, Ordering::Relaxed);
                let reader_cpu = reader.join().expect("reader thread");
                let events = *shared.events.lock().unwrap_or_else(|e| e.into_inner());
                let drains = *shared.drains.lock().unwrap_or_else(|e| e.into_inner());
                let after = shared.t.lock().unwrap_or_else(|e| e.into_inner()).counters().expect("counters");
                let lost = (after.insert_failed - before.insert_failed) + (after.ringbuf_full - before.ringbuf_full);
                // Each round's untracked/tagged ratio: neighbours in time share the machine's noise.
                let mut pairs: Vec<f64> =
                    plain.iter().zip(&tagged).map(|(p, q)| p.as_nanos() as f64 / q.as_nanos() as f64).collect();
                pairs.sort_by(f64::total_cmp);
                let pair_median = pairs[pairs.len() / 2];
                let (p, q) = (median(&mut plain), median(&mut tagged));
                let per = |d: Duration| format!("{:.2} us", d.as_nanos() as f64 / a.forks as f64 / 1000.0);
                let per_event = if events > 0 {
                    format!("{:.2} us", reader_cpu.as_nanos() as f64 / events as f64 / 1000.0)
                } else {
                    format!("{} us all", reader_cpu.as_micros())
                };
                println!(
                    "{:<13} {:<5} {:>12} {:>12} {:>7.3} {:>7.3} {:>9} {:>11} {:>7}{}",
                    s.name,
                    kind,
                    per(p),
                    per(q),
                    p.as_nanos() as f64 / q.as_nanos() as f64,
                    pair_median,
                    events,
                    per_event,
                    drains,
                    if lost > 0 { format!("  LOST {lost}") } else { String::new() }
                );
            }
            if s.reporting == Reporting::RootsOnly {
                lookups(&shared.t.lock().unwrap_or_else(|e| e.into_inner()));
            }
        }
        println!("load average: {}", loadavg());
    }

    fn loadavg() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// How fast the map answers in RootsOnly mode: a tagged tree of sleeping processes.
    fn lookups(t: &Ebpf) {
        const KIDS: usize = 200;
        let mut root = Command::new("/bin/sh")
            .args(["-c", &format!("read x; for i in $(seq {KIDS}); do sleep 1000 & done; echo ready; wait")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = Pid::new(root.id() as i32).expect("pid");
        let vps = VpsId(999);
        t.tag_root(pid, vps).expect("tag");
        root.stdin.take().expect("stdin").write_all(b"\n").expect("gate");
        let mut line = [0u8; 6];
        let mut out = root.stdout.take().expect("stdout");
        let _ = out.read_exact(&mut line);
        let members = t.members(vps).expect("members");
        let start = Instant::now();
        let rounds = 50;
        for _ in 0..rounds {
            assert_eq!(t.members(vps).expect("members").len(), members.len());
        }
        let per_members = start.elapsed() / rounds;
        let start = Instant::now();
        for m in &members {
            assert_eq!(t.tag_of(m.pid).expect("tag_of").map(|(v, _)| v), Some(vps));
        }
        let per_tag_of = start.elapsed() / members.len().max(1) as u32;
        println!(
            "roots-only look-ups: members() of {} processes in {:?}, tag_of() {:?} each",
            members.len(),
            per_members,
            per_tag_of
        );
        for m in &members {
            // SAFETY: kill by pid the processes this function started (the tree is ours).
            unsafe { libc::kill(m.pid.as_raw(), libc::SIGKILL) };
        }
        let _ = root.kill();
        let _ = root.wait();
    }
}
