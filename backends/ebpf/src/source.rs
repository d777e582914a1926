//! The OS side: checks that the system can run the BPF program, loads and attaches it, talks to
//! its maps and its ring buffer, and reads `/proc` and `/sys` (the parsers are in
//! [`crate::decode`]). Linux only; the one file of this crate with `unsafe`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libbpf_rs::{
    ErrorKind, Link, MapCore, MapFlags, MapHandle, Object, ObjectBuilder, PrintLevel, RingBuffer, RingBufferBuilder,
};
use vpstag_tracker::{Event, Pid, StartTime, TrackerError};

use crate::decode::{
    self, caps_suffice, parse_cap_eff, parse_lockdown, parse_stat, parse_stat_start, parse_status_tgid,
};
use crate::decode::{parse_timens_boottime, Clock, Control, Counters, Stat, Tag};

/// The BPF object that build.rs compiled, 8-byte aligned for libelf.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);
static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/vpstag.bpf.o")));

const PROGRAMS: [&str; 3] = ["vpstag_fork", "vpstag_exec", "vpstag_exit"];
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// One load at a time in this process: libbpf's log callback is global, and it is swapped for
/// the capture below while loading.
static LOAD_LOCK: Mutex<()> = Mutex::new(());
/// libbpf's messages while loading, for the error message when it fails.
static LOAD_LOG: Mutex<String> = Mutex::new(String::new());
const LOAD_LOG_MAX: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn capture_log(_level: PrintLevel, msg: String) {
    let mut log = lock(&LOAD_LOG);
    if log.len() + msg.len() > LOAD_LOG_MAX {
        log.clear();
    }
    log.push_str(&msg);
}

/// The last lines of what libbpf said, for an error message.
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!(" [libbpf: {}]", tail.join(" | "))
    }
}

fn permission_hint() -> String {
    let mut hint = String::from(
        "run vpstag as root, or give it CAP_BPF and CAP_PERFMON (e.g. `setcap cap_bpf,cap_perfmon+ep \
         /path/to/vpstag`; inside a container they must be held in the host's user namespace)",
    );
    match lockdown() {
        Some(mode) if mode != "none" => hint.push_str(&format!(
            "; kernel lockdown is active (mode `{mode}`), which can refuse BPF tracing programs outright"
        )),
        Some(_) => {}
        None => hint.push_str("; kernel lockdown (see /sys/kernel/security/lockdown) can also refuse BPF tracing"),
    }
    hint.push_str("; otherwise use --backend cnproc");
    hint
}

fn io_kind(kind: ErrorKind) -> io::ErrorKind {
    match kind {
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
        ErrorKind::AlreadyExists => io::ErrorKind::AlreadyExists,
        ErrorKind::WouldBlock => io::ErrorKind::WouldBlock,
        ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
        ErrorKind::InvalidData => io::ErrorKind::InvalidData,
        ErrorKind::TimedOut => io::ErrorKind::TimedOut,
        ErrorKind::Interrupted => io::ErrorKind::Interrupted,
        ErrorKind::Unsupported => io::ErrorKind::Unsupported,
        ErrorKind::OutOfMemory => io::ErrorKind::OutOfMemory,
        _ => io::ErrorKind::Other,
    }
}

fn to_io(e: &libbpf_rs::Error) -> io::Error {
    io::Error::new(io_kind(e.kind()), e.to_string())
}

/// A map operation that failed at run time.
fn map_error(context: impl Into<String>, e: libbpf_rs::Error) -> TrackerError {
    TrackerError::io(context, to_io(&e))
}

/// What a failure while loading or attaching means for the caller: `PermissionDenied` (with what
/// to do) for EPERM/EACCES, `Io` when memory ran out (a smaller `map_entries` may fit),
/// `Unsupported` (fall back to another backend) for everything else.
fn load_error(what: &str, e: libbpf_rs::Error, log: &str) -> TrackerError {
    match e.kind() {
        ErrorKind::PermissionDenied => {
            TrackerError::PermissionDenied { what: what.to_owned(), hint: permission_hint(), source: to_io(&e) }
        }
        ErrorKind::OutOfMemory | ErrorKind::TooBig => TrackerError::io(
            format!("{what} (is Config::map_entries or Config::ring_bytes too large?){}", log_tail(log)),
            to_io(&e),
        ),
        _ => TrackerError::Unsupported(format!(
            "eBPF backend: {what}: {e}{}; it needs Linux 5.8 or later with BTF, tp_btf programs, ring \
             buffers and CO-RE; use --backend cnproc",
            log_tail(log)
        )),
    }
}

/// Whether the kernel's BTF is there to relocate the program against.
fn check_btf(path: &Path) -> Result<(), TrackerError> {
    let shown = path.display();
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(TrackerError::Unsupported(format!(
            "eBPF backend: the kernel exposes no BTF ({shown} is missing; it needs \
             CONFIG_DEBUG_INFO_BTF=y and Linux 5.8 or later), so the BPF program cannot be \
             relocated to it; use --backend cnproc"
        ))),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(TrackerError::PermissionDenied {
            what: format!("reading the kernel's BTF ({shown})"),
            hint: permission_hint(),
            source: e,
        }),
        Err(e) => Err(TrackerError::io(format!("reading {shown}"), e)),
    }
}

/// Checks what can be checked before touching bpf(2), for clear errors.
pub(crate) fn preflight() -> Result<(), TrackerError> {
    check_btf(Path::new(BTF_PATH))?;
    if let Some(caps) = own_cap_eff() {
        if !caps_suffice(caps) {
            return Err(TrackerError::PermissionDenied {
                what: "loading the eBPF backend's programs (this process lacks CAP_BPF and CAP_PERFMON)".to_owned(),
                hint: permission_hint(),
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
    }
    Ok(())
}

/// The loaded and attached programs, their maps and the ring-buffer reader.
///
/// Fields drop in order: the reader first, then the links (which detaches the programs), then the
/// maps and the object. Nothing is pinned: dropping this frees everything in the kernel.
pub(crate) struct Loaded {
    ring: RingBuffer<'static>,
    staged: Arc<Mutex<Vec<Event>>>,
    _links: Vec<Link>,
    tags: MapHandle,
    counters: MapHandle,
    control: MapHandle,
    events: MapHandle,
    _object: Object,
}

impl Loaded {
    /// Loads the object with the given map sizes, sets `control`, attaches every program and sets
    /// up the reader.
    pub(crate) fn load(
        map_entries: u32,
        ring_bytes: u32,
        control: Control,
        clock: Clock,
    ) -> Result<Loaded, TrackerError> {
        preflight()?;
        let _one_at_a_time = lock(&LOAD_LOCK);
        lock(&LOAD_LOG).clear();
        let previous = libbpf_rs::set_print(Some((PrintLevel::Warn, capture_log)));
        let result = Self::load_quietly(map_entries, ring_bytes, control, clock);
        libbpf_rs::set_print(previous);
        let log = std::mem::take(&mut *lock(&LOAD_LOG));
        result.map_err(|(what, e)| load_error(what, e, &log))
    }

    fn load_quietly(
        map_entries: u32,
        ring_bytes: u32,
        control: Control,
        clock: Clock,
    ) -> Result<Loaded, (&'static str, libbpf_rs::Error)> {
        let mut builder = ObjectBuilder::default();
        builder.name("vpstag").map_err(|e| ("naming the BPF object", e))?;
        let mut open = builder.open_memory(&OBJECT.0).map_err(|e| ("opening the BPF object", e))?;
        for mut map in open.maps_mut() {
            let name = map.name().to_owned();
            if name == "tags" {
                map.set_max_entries(map_entries).map_err(|e| ("sizing the tag map", e))?;
            } else if name == "events" {
                map.set_max_entries(ring_bytes).map_err(|e| ("sizing the ring buffer", e))?;
            }
        }
        let object = open.load().map_err(|e| ("loading the BPF programs", e))?;

        let handle = |name: &str| -> Result<MapHandle, (&'static str, libbpf_rs::Error)> {
            let map = object
                .maps()
                .find(|m| m.name() == OsStr::new(name))
                .ok_or_else(|| ("finding a map", libbpf_rs::Error::from(io::Error::from(io::ErrorKind::NotFound))))?;
            MapHandle::try_from(&map).map_err(|e| ("duplicating a map descriptor", e))
        };
        let tags = handle("tags")?;
        let counters = handle("counters")?;
        let control_map = handle("control")?;
        let events = handle("events")?;
        // entries() reads the tag map's raw bytes: the layout must be vpstag.h's.
        if tags.key_size() != 4 || tags.value_size() as usize != decode::TAG_SIZE {
            return Err((
                "checking the tag map's layout",
                libbpf_rs::Error::from(io::Error::from(io::ErrorKind::InvalidData)),
            ));
        }
        // Before the programs run, so that their first record follows it.
        control_map
            .update(&0u32.to_ne_bytes(), &control.to_bytes(), MapFlags::ANY)
            .map_err(|e| ("setting the control map", e))?;

        // Attach each program once and keep its link for as long as the tracker lives.
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let prog = object.progs_mut().find(|p| p.name() == OsStr::new(name)).ok_or_else(|| {
                ("finding a program", libbpf_rs::Error::from(io::Error::from(io::ErrorKind::NotFound)))
            })?;
            links.push(prog.attach().map_err(|e| ("attaching a tp_btf program", e))?);
        }

        let staged = Arc::new(Mutex::new(Vec::with_capacity(1024)));
        let sink = Arc::clone(&staged);
        let mut rb = RingBufferBuilder::new();
        rb.add(&events, move |rec: &[u8]| {
            lock(&sink).push(decode::decode_event(rec, clock));
            0
        })
        .map_err(|e| ("setting up the ring-buffer reader", e))?;
        let ring = rb.build().map_err(|e| ("setting up the ring-buffer reader", e))?;

        Ok(Loaded { ring, staged, _links: links, tags, counters, control: control_map, events, _object: object })
    }

    /// The ring buffer's descriptor: it polls readable when records wait.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Decodes every record already in the ring buffer into the staging area.
    pub(crate) fn consume(&self) -> Result<(), TrackerError> {
        let n = self.ring.consume_raw();
        if n < 0 && n != -libc::EINTR {
            return Err(TrackerError::io("reading the eBPF ring buffer", io::Error::from_raw_os_error(-n)));
        }
        Ok(())
    }

    /// Waits up to `timeout` (`None`: for ever) for records, then decodes what is there. An
    /// interrupted wait returns early.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Result<(), TrackerError> {
        let timeout = match timeout {
            None => Duration::MAX,
            // Whole milliseconds for epoll, rounded up so that a short wait does wait.
            Some(t) => Duration::from_millis(t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as u64),
        };
        let n = self.ring.poll_raw(timeout);
        if n < 0 && n != -libc::EINTR {
            return Err(TrackerError::io("waiting on the eBPF ring buffer", io::Error::from_raw_os_error(-n)));
        }
        Ok(())
    }

    /// Moves the decoded events to `out`; returns how many.
    pub(crate) fn drain_into(&self, out: &mut Vec<Event>) -> usize {
        let mut staged = lock(&self.staged);
        let n = staged.len();
        out.append(&mut staged);
        n
    }

    /// The kernel side's failure counters.
    pub(crate) fn counters(&self) -> Result<Counters, TrackerError> {
        let value = self
            .counters
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| map_error("reading the eBPF counters", e))?;
        Ok(value.as_deref().and_then(Counters::from_bytes).unwrap_or_default())
    }

    /// Replaces the `control` map's value; the programs follow it from their next run on.
    pub(crate) fn set_control(&self, control: Control) -> Result<(), TrackerError> {
        self.control
            .update(&0u32.to_ne_bytes(), &control.to_bytes(), MapFlags::ANY)
            .map_err(|e| map_error("setting the eBPF control map", e))
    }

    /// The map's entry for `pid`.
    pub(crate) fn get(&self, pid: Pid) -> Result<Option<Tag>, TrackerError> {
        let value = self
            .tags
            .lookup(&decode::tag_key(pid), MapFlags::ANY)
            .map_err(|e| map_error(format!("looking up {pid} in the eBPF tag map"), e))?;
        Ok(value.as_deref().and_then(Tag::from_bytes))
    }

    /// Sets the map's entry for `pid`.
    pub(crate) fn set(&self, pid: Pid, tag: Tag) -> Result<(), TrackerError> {
        self.tags.update(&decode::tag_key(pid), &tag.to_bytes(), MapFlags::ANY).map_err(|e| {
            if e.kind() == ErrorKind::TooBig {
                TrackerError::io(
                    format!("tagging {pid} in the eBPF tag map: the map is full (raise Config::map_entries)"),
                    to_io(&e),
                )
            } else {
                map_error(format!("tagging {pid} in the eBPF tag map"), e)
            }
        })
    }

    /// Deletes the map's entry for `pid`; whether there was one.
    pub(crate) fn remove(&self, pid: Pid) -> Result<bool, TrackerError> {
        match self.tags.delete(&decode::tag_key(pid)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(map_error(format!("deleting {pid} from the eBPF tag map"), e)),
        }
    }

    /// Every entry of the tag map (a snapshot, bucket by bucket), read with `BPF_MAP_LOOKUP_BATCH`:
    /// one system call per `BATCH` entries. An entry present during the whole call is returned
    /// once; one added or deleted meanwhile may or may not be.
    pub(crate) fn entries(&self) -> Result<Vec<(Pid, Tag)>, TrackerError> {
        const KEY: usize = 4;
        let mut batch: usize = 1024;
        let mut keys = vec![0u8; KEY * batch];
        let mut values = vec![0u8; decode::TAG_SIZE * batch];
        let mut out = Vec::new();
        // The kernel's cursor: where the previous batch stopped (none before the first).
        let mut cursor: Option<[u8; KEY]> = None;
        let mut next = [0u8; KEY];
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as libbpf_sys::size_t,
            elem_flags: 0,
            flags: 0,
        };
        loop {
            let mut count = batch as u32;
            let in_batch = cursor.as_mut().map_or(std::ptr::null_mut(), |c| c.as_mut_ptr().cast());
            #[allow(unsafe_code)]
            // SAFETY: the map's keys are KEY bytes and its values TAG_SIZE bytes (checked below);
            // `keys` and `values` hold `count` of each, `in_batch` and `next` one key, and `opts`
            // is a bpf_map_batch_opts with its size set. The kernel writes at most `count`
            // entries and sets `count` to how many it wrote.
            let ret = unsafe {
                libbpf_sys::bpf_map_lookup_batch(
                    self.tags.as_fd().as_raw_fd(),
                    in_batch,
                    next.as_mut_ptr().cast(),
                    keys.as_mut_ptr().cast(),
                    values.as_mut_ptr().cast(),
                    &mut count,
                    &opts,
                )
            };
            // libbpf returns -errno.
            let last = match -ret {
                0 => false,
                libc::ENOENT => true,
                libc::ENOSPC if count == 0 && batch < 1 << 20 => {
                    // One hash bucket holds more than a batch: retry from the same cursor.
                    batch *= 4;
                    keys.resize(KEY * batch, 0);
                    values.resize(decode::TAG_SIZE * batch, 0);
                    continue;
                }
                libc::EINTR => continue,
                errno => return Err(TrackerError::io("listing the eBPF tag map", io::Error::from_raw_os_error(errno))),
            };
            let n = (count as usize).min(batch);
            out.extend(
                keys[..KEY * n]
                    .chunks_exact(KEY)
                    .zip(values[..decode::TAG_SIZE * n].chunks_exact(decode::TAG_SIZE))
                    .filter_map(|(k, v)| Some((decode::pid_from_key(k)?, Tag::from_bytes(v)?))),
            );
            if last {
                return Ok(out);
            }
            cursor = Some(next);
        }
    }

    /// The tag map's capacity.
    pub(crate) fn capacity(&self) -> u32 {
        self.tags.max_entries()
    }
}

// ---- /proc and /sys

/// The start time of `pid` (its `/proc/PID/stat` field 22).
pub(crate) fn start_time(pid: Pid) -> io::Result<StartTime> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw()))?;
    parse_stat_start(&stat)
        .map(StartTime)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable /proc/{pid}/stat")))
}

/// `/proc/PID/stat` of `pid`: state, flags, threads and start time.
pub(crate) fn stat(pid: Pid) -> io::Result<Stat> {
    stat_at(&format!("/proc/{}/stat", pid.as_raw()))
}

/// Reads a `stat` file into a buffer on the stack (one open, reads, one close: no `statx`,
/// no allocation but the path's), as `tag_of` does for every look-up.
fn stat_at(path: &str) -> io::Result<Stat> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    std::str::from_utf8(&buf[..len])
        .ok()
        .and_then(parse_stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable {path}")))
}

/// Whether every thread of the process `pid` (whose `stat` is `leader`) has begun to exit,
/// or none is left: its exit may then have passed the exit tracepoint already.
pub(crate) fn all_threads_exiting(pid: Pid, leader: &Stat) -> bool {
    if leader.threads <= 1 {
        return leader.exiting() || leader.exited();
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", pid.as_raw())) else {
        return true;
    };
    let live = dir.flatten().any(|t| {
        let path = t.path().join("stat");
        path.to_str().and_then(|p| stat_at(p).ok()).is_some_and(|s| !s.exiting())
    });
    !live
}

/// The process (thread-group id) that the task `pid` belongs to.
pub(crate) fn tgid_of(pid: Pid) -> io::Result<Pid> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw()))?;
    parse_status_tgid(&status)
        .and_then(Pid::new)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no Tgid in /proc/{pid}/status")))
}

/// The calling thread's effective capabilities (what bpf(2) checks), if /proc tells.
pub(crate) fn own_cap_eff() -> Option<u64> {
    parse_cap_eff(&std::fs::read_to_string("/proc/thread-self/status").ok()?)
}

/// Our time namespace's boot-time offset in nanoseconds (0 when there is none, or on kernels
/// without time namespaces).
pub(crate) fn own_boottime_offset() -> i64 {
    std::fs::read_to_string("/proc/self/timens_offsets").ok().and_then(|s| parse_timens_boottime(&s)).unwrap_or(0)
}

/// The kernel lockdown mode, when securityfs is mounted and tells.
pub(crate) fn lockdown() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    parse_lockdown(&text).map(str::to_owned)
}

/// `sysconf(_SC_CLK_TCK)`, 100 if it fails.
pub(crate) fn clk_tck() -> u64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// The size of a memory page, 4096 if `sysconf` fails.
pub(crate) fn page_size() -> u32 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u32
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        assert_eq!(log_tail(""), "");
        let log: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let tail = log_tail(&log);
        assert!(tail.contains("line 19") && tail.contains("line 12") && !tail.contains("line 11"), "{tail}");
    }

    #[test]
    fn load_errors_are_classified() {
        let eperm = libbpf_rs::Error::from(io::Error::from_raw_os_error(libc::EPERM));
        match load_error("loading", eperm, "") {
            TrackerError::PermissionDenied { hint, .. } => {
                assert!(hint.contains("CAP_BPF") && hint.contains("CAP_PERFMON") && hint.contains("cnproc"))
            }
            other => panic!("{other:?}"),
        }
        let einval = libbpf_rs::Error::from(io::Error::from_raw_os_error(libc::EINVAL));
        match load_error("loading", einval, "libbpf: prog 'vpstag_fork': failed to load\n") {
            TrackerError::Unsupported(msg) => {
                assert!(msg.contains("failed to load") && msg.contains("cnproc"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        let enomem = libbpf_rs::Error::from(io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(matches!(load_error("loading", enomem, ""), TrackerError::Io { .. }));
    }

    #[test]
    fn missing_btf_is_unsupported_with_a_hint() {
        match check_btf(Path::new("/nonexistent/vmlinux")) {
            Err(TrackerError::Unsupported(msg)) => {
                assert!(msg.contains("BTF") && msg.contains("CONFIG_DEBUG_INFO_BTF") && msg.contains("cnproc"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_object_is_embedded() {
        assert_eq!(&OBJECT.0[..4], b"\x7fELF");
        assert_eq!(OBJECT.0.as_ptr() as usize % 8, 0);
    }
}
