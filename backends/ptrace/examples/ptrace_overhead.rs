//! What following a process with [`Ptrace`] costs it: N fork+exit+wait (or bursts of 50 forks, or
//! `posix_spawn` of `/bin/true`) in a child process, untracked, under a minimal `PTRACE_SEIZE`
//! tracer that only restarts event stops (the floor for any ptrace tracker; with and without
//! `PTRACE_O_TRACEEXIT`, to compare with `Ptrace` with and without exit stops), and under `Ptrace`
//! with a consumer thread that drains events in batches as the daemon does.
//!
//! The modes run in alternating order (ABBA) for several rounds; each round's rates are divided by
//! the untracked rate of the same round (`ratio`), and `Ptrace`'s also by the rate of the minimal
//! tracer with the same stops in the same round (`vs min`); the medians are printed. Also printed: wait statuses
//! (stops and reaps) per operation, the workload's CPU time per operation (its children's
//! included), the tracer thread's and the consumer's CPU time per status (ns), and all of that
//! CPU time per operation: on a busy machine the CPU times are steadier than the rates.
//!
//! ```text
//! cargo run --release -p vpstag-ptrace --example ptrace_overhead -- [fork|burst|spawn|all] [ITERS] [ROUNDS] [CPU]
//! ```
//!
//! `CPU` pins the workload (and its children) to that CPU, as `taskset -c CPU` would.
//! `OVERHEAD_MODES=1,4` runs only those modes (indexes in the table order) besides the untracked
//! one. Linux only.

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("overhead: Linux only");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ffi::CString;
    use std::sync::mpsc;
    use std::time::Duration;

    use vpstag_ptrace::{Config, Ptrace};
    use vpstag_tracker::{EventKind, ForkTracker, Pid, VpsId};

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Work {
        Fork,
        Burst,
        Spawn,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Mode {
        None,
        Minimal,
        MinimalExit,
        Ptrace,
        PtraceNoExit,
    }

    const MODES: [Mode; 5] = [Mode::None, Mode::Minimal, Mode::PtraceNoExit, Mode::MinimalExit, Mode::Ptrace];

    impl Mode {
        /// The minimal tracer with the same stops, for the `vs minimal` column.
        fn floor(self) -> Option<Mode> {
            match self {
                Mode::PtraceNoExit => Some(Mode::Minimal),
                Mode::Ptrace => Some(Mode::MinimalExit),
                _ => None,
            }
        }

        fn name(self) -> &'static str {
            match self {
                Mode::None => "untracked",
                Mode::Minimal => "minimal tracer",
                Mode::MinimalExit => "minimal + exit stops",
                Mode::Ptrace => "Ptrace::new()",
                Mode::PtraceNoExit => "Ptrace exit_stops(false)",
            }
        }
    }

    /// One run: workload operations per second, wait statuses the tracer handled, CPU ns of the
    /// tracer thread and of the consumer.
    #[derive(Clone, Copy, Default, Debug)]
    struct Run {
        rate: f64,
        work_ns: u64,
        statuses: u64,
        tracer_ns: u64,
        consumer_ns: u64,
        ops: u64,
    }

    fn now_ns(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid out pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// CPU time of thread `tid` of this process, from schedstat (ns).
    fn thread_cpu(tid: i32) -> u64 {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    }

    /// The workload, in the forked child: only async-signal-safe calls (the parent has threads).
    fn workload(work: Work, iters: u64, argv: &[*const libc::c_char], result_fd: i32) -> ! {
        let t0 = now_ns(libc::CLOCK_MONOTONIC);
        // SAFETY: fork/_exit/waitpid/posix_spawn with valid arguments; the children only _exit.
        unsafe {
            match work {
                Work::Fork => {
                    for _ in 0..iters {
                        let p = libc::fork();
                        if p == 0 {
                            libc::_exit(0);
                        }
                        libc::waitpid(p, std::ptr::null_mut(), 0);
                    }
                }
                Work::Burst => {
                    let mut pids = [0; 50];
                    for _ in 0..iters / 50 {
                        for p in pids.iter_mut() {
                            *p = libc::fork();
                            if *p == 0 {
                                libc::_exit(0);
                            }
                        }
                        for p in pids {
                            libc::waitpid(p, std::ptr::null_mut(), 0);
                        }
                    }
                }
                Work::Spawn => {
                    for _ in 0..iters {
                        let mut p = 0;
                        libc::posix_spawn(
                            &mut p,
                            argv[0],
                            std::ptr::null(),
                            std::ptr::null(),
                            argv.as_ptr() as *const *mut libc::c_char,
                            std::ptr::null(),
                        );
                        libc::waitpid(p, std::ptr::null_mut(), 0);
                    }
                }
            }
            let dt = now_ns(libc::CLOCK_MONOTONIC) - t0;
            // The CPU time of the workload and of its (reaped) children.
            let mut cpu = 0u64;
            for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
                let mut ru: libc::rusage = std::mem::zeroed();
                libc::getrusage(who, &mut ru);
                for tv in [ru.ru_utime, ru.ru_stime] {
                    cpu += tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
                }
            }
            let out = [dt, cpu];
            libc::write(result_fd, out.as_ptr().cast(), 16);
            libc::_exit(0);
        }
    }

    /// Forks the workload, blocked on a gate; returns (pid, gate write end, result read end).
    fn spawn_workload(work: Work, iters: u64, cpu: Option<usize>) -> (i32, i32, i32) {
        let sh = CString::new("/bin/true").unwrap_or_default();
        let argv = [sh.as_ptr(), std::ptr::null()];
        let (mut gate, mut res) = ([0; 2], [0; 2]);
        // SAFETY: valid arrays of two ints; the child makes async-signal-safe calls only.
        unsafe {
            assert_eq!(libc::pipe2(gate.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if let Some(cpu) = cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                let mut b = 0u8;
                if libc::read(gate[0], (&mut b as *mut u8).cast(), 1) != 1 {
                    libc::_exit(1);
                }
                workload(work, iters, &argv, res[1]);
            }
            libc::close(gate[0]);
            libc::close(res[1]);
            (pid, gate[1], res[0])
        }
    }

    fn open_gate(gate: i32) {
        // SAFETY: our descriptor, a valid byte.
        unsafe {
            libc::write(gate, b"g".as_ptr().cast(), 1);
            libc::close(gate);
        }
    }

    /// The workload's elapsed time and CPU time (its children's included), in ns.
    fn read_result(fd: i32) -> (u64, u64) {
        let mut out = [0u64; 2];
        // SAFETY: our descriptor, a valid [u64; 2].
        unsafe {
            libc::read(fd, out.as_mut_ptr().cast(), 16);
            libc::close(fd);
        }
        (out[0], out[1].max(1))
    }

    fn ops_of(work: Work, iters: u64) -> u64 {
        match work {
            Work::Burst => iters / 50 * 50,
            _ => iters,
        }
    }

    fn run_none(work: Work, iters: u64, cpu: Option<usize>) -> Run {
        let (pid, gate, res) = spawn_workload(work, iters, cpu);
        open_gate(gate);
        let (dt, work_ns) = read_result(res);
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let ops = ops_of(work, iters);
        Run { rate: ops as f64 * 1e9 / dt as f64, work_ns, ops, ..Run::default() }
    }

    /// A minimal tracer thread: seize with the fork/exec options, restart every stop at once
    /// (signals re-injected, group stops listened), nothing else.
    fn run_minimal(work: Work, iters: u64, cpu: Option<usize>, exit_stops: bool) -> Run {
        let (pid, gate, res) = spawn_workload(work, iters, cpu);
        let (tx, rx) = mpsc::channel();
        let tracer = std::thread::Builder::new().name("minimal-tracer".into()).spawn(move || {
            let opts = libc::PTRACE_O_TRACEFORK
                | libc::PTRACE_O_TRACEVFORK
                | libc::PTRACE_O_TRACECLONE
                | libc::PTRACE_O_TRACEEXEC
                | libc::PTRACE_O_EXITKILL
                | if exit_stops { libc::PTRACE_O_TRACEEXIT } else { 0 };
            // SAFETY: PTRACE_SEIZE of our child with options in data.
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, opts as usize) };
            let _ = tx.send(r);
            let cpu0 = now_ns(libc::CLOCK_THREAD_CPUTIME_ID);
            let mut statuses = 0u64;
            loop {
                let mut st = 0;
                // SAFETY: valid out pointer.
                let t = unsafe { libc::waitpid(-1, &mut st, libc::__WALL | libc::__WNOTHREAD) };
                if t < 0 {
                    break;
                }
                statuses += 1;
                if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                    if t == pid {
                        break;
                    }
                    continue;
                }
                let sig = (st >> 8) & 0xff;
                let event = (st >> 16) & 0xff;
                let (req, data) = match event {
                    0 => (libc::PTRACE_CONT, sig),
                    libc::PTRACE_EVENT_STOP if matches!(sig, 19..=22) => (libc::PTRACE_LISTEN, 0),
                    _ => (libc::PTRACE_CONT, 0),
                };
                // SAFETY: restart of a tracee in a ptrace stop.
                unsafe { libc::ptrace(req, t, 0usize, data as usize) };
            }
            (statuses, now_ns(libc::CLOCK_THREAD_CPUTIME_ID) - cpu0)
        });
        let tracer = tracer.expect("spawning the minimal tracer");
        assert_eq!(rx.recv().unwrap_or(-1), 0, "PTRACE_SEIZE failed");
        open_gate(gate);
        let (dt, work_ns) = read_result(res);
        let (statuses, tracer_ns) = tracer.join().unwrap_or_default();
        let ops = ops_of(work, iters);
        Run { rate: ops as f64 * 1e9 / dt as f64, work_ns, statuses, tracer_ns, consumer_ns: 0, ops }
    }

    fn run_ptrace(work: Work, iters: u64, cpu: Option<usize>, config: Config) -> Run {
        let mut pt = Ptrace::with_config(config).expect("Ptrace");
        let (pid, gate, res) = spawn_workload(work, iters, cpu);
        let root = Pid::new(pid).expect("pid");
        pt.watch(root, VpsId(1)).expect("watch");
        let tracer_tid = pt.tracer_tid();
        let (t0, s0) = (thread_cpu(tracer_tid), pt.counters().statuses);
        let c0 = now_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        open_gate(gate);
        // The consumer: blocking reads, whatever batch is there.
        let mut events = Vec::new();
        let mut done = false;
        while !done {
            events.clear();
            pt.read_events(&mut events, Some(Duration::from_secs(60))).expect("read_events");
            done = events.iter().any(|e| {
                matches!(e.kind, EventKind::Exit { pid: p, thread, group_dead: Some(true), .. } if p == root && thread == root)
            });
        }
        let consumer_ns = now_ns(libc::CLOCK_THREAD_CPUTIME_ID) - c0;
        let (tracer_ns, statuses) = (thread_cpu(tracer_tid) - t0, pt.counters().statuses - s0);
        let (dt, work_ns) = read_result(res);
        let ops = ops_of(work, iters);
        Run { rate: ops as f64 * 1e9 / dt as f64, work_ns, statuses, tracer_ns, consumer_ns, ops }
    }

    fn run(mode: Mode, work: Work, iters: u64, cpu: Option<usize>) -> Run {
        match mode {
            Mode::None => run_none(work, iters, cpu),
            Mode::Minimal => run_minimal(work, iters, cpu, false),
            Mode::MinimalExit => run_minimal(work, iters, cpu, true),
            Mode::Ptrace => run_ptrace(work, iters, cpu, Config::default()),
            Mode::PtraceNoExit => run_ptrace(work, iters, cpu, Config::default().exit_stops(false)),
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let works = match args.first().map(String::as_str) {
            Some("fork") => vec![Work::Fork],
            Some("burst") => vec![Work::Burst],
            Some("spawn") => vec![Work::Spawn],
            _ => vec![Work::Fork, Work::Burst, Work::Spawn],
        };
        let iters: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
        let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(7);
        let cpu: Option<usize> = args.get(3).and_then(|a| a.parse().ok());
        println!("iterations {iters} (spawn: {}), rounds {rounds}, workload CPU {cpu:?}", iters / 4);
        for work in works {
            let n = if work == Work::Spawn { iters / 4 } else { iters };
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); MODES.len()];
            let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
            let mut vs_floor: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
            for r in 0..rounds {
                // OVERHEAD_MODES=2,4 (indexes into MODES): only those, after the untracked run.
                let only: Option<Vec<usize>> = std::env::var("OVERHEAD_MODES")
                    .ok()
                    .map(|v| v.split(',').filter_map(|i| i.parse().ok()).filter(|i| *i < MODES.len()).collect());
                let mut order: Vec<usize> =
                    (0..MODES.len()).filter(|i| *i == 0 || only.as_ref().map_or(true, |o| o.contains(i))).collect();
                if r % 2 == 1 {
                    order.reverse();
                }
                let mut this = vec![Run::default(); MODES.len()];
                for i in order {
                    this[i] = run(MODES[i], work, n, cpu);
                }
                for i in 0..MODES.len() {
                    if this[i].ops > 0 {
                        ratios[i].push(this[i].rate / this[0].rate);
                        runs[i].push(this[i]);
                    }
                    let floor = MODES[i].floor().and_then(|f| MODES.iter().position(|m| *m == f));
                    if let Some(f) = floor.filter(|f| this[*f].ops > 0 && this[i].ops > 0) {
                        vs_floor[i].push(this[i].rate / this[f].rate);
                    }
                }
            }
            println!("\n{work:?}: median of {rounds} rounds");
            println!(
                "{:<26} {:>8} {:>6} {:>7} {:>8} {:>10} {:>10} {:>11} {:>10}",
                "mode", "ops/s", "ratio", "vs min", "stat/op", "work us/op", "tracer/st", "consumer/st", "all us/op"
            );
            for (i, mode) in MODES.iter().enumerate() {
                let rs = &runs[i];
                if rs.is_empty() {
                    continue;
                }
                let per =
                    |f: fn(&Run) -> u64| median(rs.iter().map(|r| f(r) as f64 / r.statuses.max(1) as f64).collect());
                let us_per_op =
                    |f: fn(&Run) -> u64| median(rs.iter().map(|r| f(r) as f64 / 1e3 / r.ops as f64).collect());
                println!(
                    "{:<26} {:>8.0} {:>6.3} {:>7} {:>8.2} {:>10.1} {:>10.0} {:>11.0} {:>10.1}",
                    mode.name(),
                    median(rs.iter().map(|r| r.rate).collect()),
                    median(ratios[i].clone()),
                    if vs_floor[i].is_empty() { "-".to_owned() } else { format!("{:.3}", median(vs_floor[i].clone())) },
                    median(rs.iter().map(|r| r.statuses as f64 / r.ops as f64).collect()),
                    us_per_op(|r| r.work_ns),
                    per(|r| r.tracer_ns),
                    per(|r| r.consumer_ns),
                    us_per_op(|r| r.work_ns + r.tracer_ns + r.consumer_ns),
                );
            }
        }
    }
}
