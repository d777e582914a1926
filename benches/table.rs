//! Criterion: mapping-table look-ups (issue 6, part 6).
//!
//! `real/N`: `MappingTable::vps_of` on the table of a manager (proc connector) that adopted a
//! process with N sleeping children (Linux, root or a kernel ≥ 6.6; skipped otherwise).
//! `manager/N`: `Manager::vps_of` on the same (lock, drain the backend, look up).
//! `proxy/N`: the same `HashMap<Pid, _>` layout with values of `size_of::<Entry>()` bytes and
//! synthetic pids, for sizes PIDs cannot reach (pid_max).
//!
//! Run: `cargo bench --bench table`. The whole-process benchmarks are `vpstag-bench run`.

//! Linux only (criterion is a Linux dev-dependency); elsewhere this is an empty program.
#![cfg_attr(not(target_os = "linux"), allow(unused))]

#[cfg(target_os = "linux")]
use std::collections::HashMap;
#[cfg(target_os = "linux")]
use std::hint::black_box;
#[cfg(target_os = "linux")]
use std::time::Duration;

#[cfg(target_os = "linux")]
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
#[cfg(target_os = "linux")]
use vpstag::{Entry, Pid, VpsId};

#[cfg(target_os = "linux")]
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Shadow([u8; std::mem::size_of::<Entry>()]);

/// A holder process with `n` sleeping children; its pid.
#[cfg(target_os = "linux")]
fn holder(n: usize) -> Option<i32> {
    let mut fds = [0; 2];
    // SAFETY: plain system calls; the children only fork, pause, write and exit.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return None;
        }
        let pid = libc::fork();
        if pid == 0 {
            libc::close(fds[0]);
            for _ in 0..n {
                let c = libc::fork();
                if c == 0 {
                    loop {
                        libc::pause();
                    }
                }
                if c < 0 {
                    libc::_exit(1);
                }
            }
            libc::write(fds[1], b"r".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
        libc::close(fds[1]);
        let mut b = 0u8;
        let ok = libc::read(fds[0], (&mut b as *mut u8).cast(), 1) == 1;
        libc::close(fds[0]);
        if pid < 0 || !ok {
            return None;
        }
        Some(pid)
    }
}

#[cfg(target_os = "linux")]
fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("vps_of");
    g.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);

    // Only when measuring (`cargo bench`), not when `cargo test --all-targets` runs each benchmark once.
    if std::env::args().any(|a| a == "--bench") {
        // Orphans come back to us to be reaped, not to PID 1.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        for n in [1_000usize, 10_000] {
            let Some(h) = holder(n) else {
                eprintln!("real/{n}: could not make {n} processes; skipped");
                continue;
            };
            match vpstag::Manager::with_backend(vpstag::BackendChoice::Cnproc) {
                Ok(mgr) => {
                    if let Ok(vps) = mgr.adopt("bench", Pid::new(h).unwrap()) {
                        let table = mgr.table().expect("table");
                        let pids: Vec<Pid> = table.members(vps.id).collect();
                        let mut i = 0usize;
                        g.bench_with_input(BenchmarkId::new("real", table.len()), &pids, |b, pids| {
                            b.iter(|| {
                                i = i.wrapping_add(7919);
                                black_box(table.vps_of(black_box(pids[i % pids.len()])))
                            })
                        });
                        g.bench_with_input(BenchmarkId::new("manager", table.len()), &pids, |b, pids| {
                            b.iter(|| {
                                i = i.wrapping_add(7919);
                                black_box(mgr.vps_of(black_box(pids[i % pids.len()])).ok())
                            })
                        });
                        let _ = mgr.kill_all(&vps, Duration::from_secs(30));
                    }
                }
                Err(e) => eprintln!("real/{n}: no proc connector ({e}); skipped"),
            }
            // SAFETY: killing and reaping our own holder and its children.
            unsafe {
                libc::kill(-h, libc::SIGKILL);
                libc::kill(h, libc::SIGKILL);
                while libc::waitpid(-1, std::ptr::null_mut(), libc::__WALL) > 0 {}
            }
        }
    }

    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let mut map: HashMap<Pid, Shadow> = HashMap::new();
        for k in 0..n {
            map.insert(Pid::new(k as i32 + 1).unwrap(), Shadow([k as u8; std::mem::size_of::<Entry>()]));
        }
        let pids: Vec<Pid> = map.keys().copied().collect();
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("proxy", n), &pids, |b, pids| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                black_box(map.get(&black_box(pids[i % pids.len()])).map(|_| VpsId(1)))
            })
        });
    }
    g.finish();
}

#[cfg(target_os = "linux")]
criterion_group!(benches, lookups);
#[cfg(target_os = "linux")]
criterion_main!(benches);

#[cfg(not(target_os = "linux"))]
fn main() {}
