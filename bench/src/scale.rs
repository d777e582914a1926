//! Table scale: look-ups per second and bytes per entry, and the resync with many live processes.
//!
//! Real tables come from real processes: a holder process forks N sleeping children, the manager
//! adopts the holder, and `Manager::table()` gives a copy whose allocation the counting allocator
//! measures. PIDs stop at pid_max (32768 here), so sizes above that use a *proxy*: the same std
//! `HashMap<Pid, _>` / `HashMap<VpsId, HashSet<Pid>>` layout as `MappingTable`, with a value of
//! exactly `size_of::<Entry>()` bytes, filled with synthetic pids. The two are compared where
//! both exist.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vpstag::{Entry, Pid, VpsId};

use crate::stats::median;
use crate::sys;
use crate::track::{self, Backend};

/// Counts the bytes currently allocated (the bench binary's global allocator).
pub struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        ALLOCATED.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

/// Bytes allocated now.
pub fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Shadow([u8; std::mem::size_of::<Entry>()]);

const _: () = assert!(std::mem::align_of::<Entry>() <= 8);

/// The proxy: MappingTable's layout with synthetic entries.
struct Proxy {
    by_pid: HashMap<Pid, Shadow>,
    members: HashMap<VpsId, HashSet<Pid>>,
}

impl Proxy {
    fn build(n: usize, vpses: u64) -> Proxy {
        let mut p = Proxy { by_pid: HashMap::new(), members: HashMap::new() };
        for i in 0..n {
            let pid = Pid::new(i as i32 + 1).unwrap();
            let vps = VpsId(i as u64 % vpses + 1);
            p.by_pid.insert(pid, Shadow([i as u8; std::mem::size_of::<Entry>()]));
            p.members.entry(vps).or_default().insert(pid);
        }
        p
    }
}

/// One size's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleRow {
    pub entries: usize,
    /// "real" (a Manager's table of live processes) or "proxy".
    pub kind: String,
    pub bytes_per_entry: f64,
    /// `MappingTable::vps_of` look-ups per second (hits), median of rounds.
    pub lookups_per_sec: f64,
    pub lookups_min: f64,
    pub lookups_max: f64,
    /// `Manager::vps_of` (lock + drain the backend + look-up) per second.
    pub manager_lookups_per_sec: Option<f64>,
}

/// The resync figures with many live processes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResyncRow {
    pub live: usize,
    /// Seconds `Manager::new` took (subscribe + start-up scan of every process).
    pub manager_new: f64,
    /// Seconds `adopt` of the holder took (a resync that tags all of them).
    pub adopt: f64,
    /// `resync()` with all of them tagged: median, min, max.
    pub resync: f64,
    pub resync_min: f64,
    pub resync_max: f64,
    /// Seconds `kill_all` took to end them.
    pub kill_all: f64,
    pub tagged: usize,
}

fn lookup_rate(pids: &[Pid], f: impl Fn(Pid) -> Option<VpsId>, total: usize, rounds: usize) -> (f64, f64, f64) {
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let t0 = sys::now_secs();
        let mut hits = 0usize;
        let mut i = 0usize;
        while i < total {
            // A stride through the keys so consecutive look-ups do not share a cache line.
            let p = pids[(i.wrapping_mul(7919)) % pids.len()];
            if black_box(f(black_box(p))).is_some() {
                hits += 1;
            }
            i += 1;
        }
        black_box(hits);
        rates.push(total as f64 / (sys::now_secs() - t0));
    }
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    (median(&rates), min, max)
}

/// Proxy rows for `sizes`.
pub fn proxy_rows(sizes: &[usize], rounds: usize) -> Vec<ScaleRow> {
    let mut rows = Vec::new();
    for &n in sizes {
        let a0 = allocated();
        let p = Proxy::build(n, 8);
        let bytes = (allocated() - a0) as f64 / n as f64;
        let pids: Vec<Pid> = p.by_pid.keys().copied().collect();
        let (r, lo, hi) = lookup_rate(&pids, |x| p.by_pid.get(&x).map(|_| VpsId(1)), 10_000_000, rounds);
        eprintln!("  proxy table {n}: {bytes:.1} B/entry, {r:.3e} look-ups/s");
        rows.push(ScaleRow {
            entries: n,
            kind: "proxy".into(),
            bytes_per_entry: bytes,
            lookups_per_sec: r,
            lookups_min: lo,
            lookups_max: hi,
            manager_lookups_per_sec: None,
        });
    }
    rows
}

/// A holder process with `n` sleeping children, in its own process group. Returns its pid once
/// all children exist.
fn holder(n: usize) -> std::io::Result<i32> {
    let (r, w) = sys::pipe(true)?;
    // SAFETY: the child only forks, pauses, writes and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::setpgid(0, 0);
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
            let _ = sys::write_all(w, b"r");
            loop {
                libc::pause();
            }
        }
    }
    sys::close(w);
    let mut b = [0u8; 1];
    let ok = sys::read_exact(r, &mut b)?;
    sys::close(r);
    if !ok {
        sys::reap(pid);
        return Err(std::io::Error::other("the holder could not fork its children"));
    }
    Ok(pid)
}

/// Reaps every child and orphan this process has (it is a subreaper for this).
fn reap_all() {
    loop {
        let mut st = 0;
        // SAFETY: valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::__WALL) };
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Real tables of `n` live processes: bytes per entry, look-ups, and the resync times.
pub fn real(n: usize, backend: Backend, rounds: usize) -> Result<(ScaleRow, ResyncRow), String> {
    // Orphans of the holder come back to us and are reaped here, not left to PID 1.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let h = holder(n).map_err(|e| format!("making {n} live processes: {e}"))?;
    let result = (|| {
        let t0 = sys::now_secs();
        let mgr = track::open(backend, None)?;
        let manager_new = sys::now_secs() - t0;
        let t0 = sys::now_secs();
        let vps = mgr.adopt("scale", Pid::new(h).unwrap()).map_err(|e| e.to_string())?;
        let adopt = sys::now_secs() - t0;
        let mut rs = Vec::new();
        for _ in 0..rounds {
            let t0 = sys::now_secs();
            mgr.resync().map_err(|e| e.to_string())?;
            rs.push(sys::now_secs() - t0);
        }
        mgr.sync().map_err(|e| e.to_string())?;
        let a0 = allocated();
        let table = mgr.table().map_err(|e| e.to_string())?;
        let bytes = (allocated() - a0) as f64 / table.len().max(1) as f64;
        let tagged = table.len();
        let pids: Vec<Pid> = table.members(vps.id).collect();
        let (r, lo, hi) = lookup_rate(&pids, |p| table.vps_of(p), 10_000_000, rounds);
        let (mr, _, _) = lookup_rate(&pids, |p| mgr.vps_of(p).ok().flatten().map(|v| v.id), 200_000, rounds);
        eprintln!("  real table {tagged}: {bytes:.1} B/entry, {r:.3e} look-ups/s, Manager::vps_of {mr:.3e}/s");
        let t0 = sys::now_secs();
        let _ = mgr.kill_all(&vps, Duration::from_secs(30));
        let kill_all = sys::now_secs() - t0;
        let row = ScaleRow {
            entries: tagged,
            kind: "real".into(),
            bytes_per_entry: bytes,
            lookups_per_sec: r,
            lookups_min: lo,
            lookups_max: hi,
            manager_lookups_per_sec: Some(mr),
        };
        let rmin = rs.iter().copied().fold(f64::INFINITY, f64::min);
        let rmax = rs.iter().copied().fold(0.0, f64::max);
        Ok((
            row,
            ResyncRow {
                live: n,
                manager_new,
                adopt,
                resync: median(&rs),
                resync_min: rmin,
                resync_max: rmax,
                kill_all,
                tagged,
            },
        ))
    })();
    sys::kill(-h, libc::SIGKILL);
    sys::kill(h, libc::SIGKILL);
    reap_all();
    result
}
