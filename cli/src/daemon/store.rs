//! The daemon's state on disk: the roots of every VPS, in a snapshot and an append-only journal.
//!
//! Only what cannot be derived is saved. Every VPS grows from its *roots*: its first process (a
//! child subreaper, so orphans of the VPS are re-parented inside it) and each process that joined
//! it through the loader. Everything below a root is found again after a restart by a scan of the
//! process table (parent links), so the journal does not grow with the VPSes' forks and exits.
//!
//! Files in the state directory (opened relative to the verified directory, see [`super::paths`]):
//! - `snapshot.json`: every VPS (with its owner uid) and every live root at one moment, written
//!   to `snapshot.json.tmp`, fsync'd, renamed over the old one, the directory fsync'd. The roots
//!   are in the `members` field (version 2; version 1 held every member, and readers of version 1
//!   read version 2 just as well);
//! - `journal.jsonl`: one [`Record`] a line, appended and fdatasync'd before the change is
//!   acknowledged to anyone; concurrent appends share one fdatasync (a group commit);
//! - `journal.prev.jsonl`: the journal being folded into a new snapshot (present only while a
//!   compaction runs, or after a crash or failure during one);
//! - `lock`: held (`flock`) by the running daemon, so two daemons never share a state directory;
//! - `journal.bad-TIME.jsonl`, `snapshot.bad-TIME.json`: unreadable files set aside by
//!   `vpstag daemon --discard-bad-journal`.
//!
//! Recovery loads the snapshot and replays `journal.prev.jsonl` then `journal.jsonl` over it. A
//! record sets or deletes one key (a VPS id, a root's pid), so replaying a record the snapshot
//! already reflects changes nothing. That is what makes compaction safe without stopping the
//! world: rotate the journal, then export, then write the snapshot, then delete the rotated
//! journal. Journals and snapshots of earlier versions (a record per membership change, a
//! snapshot of every member) load too: their first and loader members are the roots, the rest is
//! derived and ignored.
//!
//! Nothing unreadable is skipped silently. Only a torn last line (a write cut short by a crash:
//! no newline at its end) is dropped, and logged. Any other bad line, a line longer than
//! [`MAX_LINE`] or a bad snapshot stops the daemon with the file, the line and the way out
//! (`--discard-bad-journal`, which keeps a copy of the bad file and starts from what could be
//! read).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use rustix::fs::{FlockOperation, OFlags};
use serde::{Deserialize, Serialize};

use super::paths::{TrustedDir, STATE_DIR};
use vpstag::{Change, Pid, SavedMember, SavedVps, Source, StartTime, VpsId};

/// A journal line longer than this is a bad line (read with a buffer of this size at most).
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// A snapshot larger than this is refused (it holds the VPSes and their roots only).
pub(crate) const MAX_SNAPSHOT: u64 = 64 << 20;

const JOURNAL: &str = "journal.jsonl";
const PREV: &str = "journal.prev.jsonl";
const SNAPSHOT: &str = "snapshot.json";
const SNAPSHOT_TMP: &str = "snapshot.json.tmp";
const LOCK: &str = "lock";
/// The flag that sets bad files aside; named in every message about one.
const DISCARD_FLAG: &str = "--discard-bad-journal";

/// One journal line, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Record {
    /// A VPS was defined.
    Vps {
        /// The VPS.
        vps: SavedVps,
        /// The uid that started it.
        owner: u32,
    },
    /// A root of a VPS: its first process, or a process that joined through the loader.
    Root {
        /// The VPS id.
        vps: VpsId,
        /// Process id.
        pid: Pid,
        /// Start time (system units).
        start: StartTime,
        /// [`Source::First`] or [`Source::Loader`].
        source: Source,
    },
    /// A VPS was forgotten (`vpstag stop`).
    Forget {
        /// The VPS id.
        id: VpsId,
    },
}

/// One journal line as read: today's records and the per-change records of earlier versions.
#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Line {
    Vps { vps: SavedVps, owner: u32 },
    Root { vps: VpsId, pid: Pid, start: StartTime, source: Source },
    Forget { id: VpsId },
    Change { c: Change },
}

/// The journal record of a manager's journal entry (`None` for a kind this daemon does not
/// know). The VPS's owner is the uid in its manager key, `uid:name`.
pub(crate) fn record_of(e: &vpstag::JournalEntry) -> Option<Record> {
    Some(match e {
        vpstag::JournalEntry::Vps(v) => Record::Vps {
            owner: v.name.split_once(':').and_then(|(uid, _)| uid.parse().ok()).unwrap_or(0),
            vps: v.clone(),
        },
        vpstag::JournalEntry::Root(m) => Record::Root { vps: m.vps, pid: m.pid, start: m.start, source: m.source },
        vpstag::JournalEntry::Forgotten(id) => Record::Forget { id: *id },
        _ => return None,
    })
}

/// Whether a member learned this way is a root (the rest is rebuilt by a scan).
fn is_root(source: Source) -> bool {
    matches!(source, Source::First | Source::Loader)
}

/// A VPS with the uid that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct OwnedVps {
    /// The VPS.
    pub vps: SavedVps,
    /// The uid that started it.
    pub owner: u32,
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    version: u32,
    vpses: &'a [OwnedVps],
    /// The roots (named so that readers of version 1 read them as members).
    members: &'a [SavedMember],
}

#[derive(Deserialize)]
struct SnapshotIn {
    version: u32,
    vpses: Vec<OwnedVps>,
    #[serde(default)]
    members: Vec<SavedMember>,
}

/// What recovery found.
#[derive(Default, Debug)]
pub(crate) struct Loaded {
    /// Every VPS, by id.
    pub vpses: BTreeMap<VpsId, OwnedVps>,
    /// The roots, by pid.
    roots: HashMap<Pid, SavedMember>,
    /// Journal records replayed.
    pub replayed: usize,
    /// What the daemon should log: torn lines dropped, bad files set aside.
    pub notes: Vec<String>,
}

impl Loaded {
    fn apply(&mut self, l: Line) {
        match l {
            Line::Vps { vps, owner } => {
                self.vpses.insert(vps.id, OwnedVps { vps, owner });
            }
            Line::Forget { id } => {
                self.vpses.remove(&id);
                self.roots.retain(|_, m| m.vps != id);
            }
            // Any source: first processes and loader joins, and members whose parent exited
            // (orphans, which a scan from the other roots might no longer reach).
            Line::Root { vps, pid, start, source } => {
                self.roots.insert(pid, SavedMember { pid, start, vps, source });
            }
            // Earlier versions: a record per membership change. Roots are kept, the rest is derived.
            Line::Change { c: Change::Added { pid, start, vps, source, .. } } => {
                if is_root(source) {
                    self.add_root(SavedMember { pid, start, vps, source });
                }
            }
            Line::Change { c: Change::Removed { pid, start, .. } } => {
                if self.roots.get(&pid).is_some_and(|m| m.start == start) {
                    self.roots.remove(&pid);
                }
            }
            // Other changes say nothing about roots.
            Line::Change { .. } => {}
        }
    }

    fn add_root(&mut self, m: SavedMember) {
        if is_root(m.source) {
            self.roots.insert(m.pid, m);
        }
    }

    /// The roots, for [`Manager::restore`](vpstag::Manager::restore), by pid.
    pub(crate) fn roots(&self) -> Vec<SavedMember> {
        let mut v: Vec<SavedMember> = self.roots.values().copied().collect();
        v.sort_by_key(|m| m.pid);
        v
    }
}

/// The journal's writer side, behind [`Store`]'s mutex.
struct Journal {
    file: Arc<File>,
    /// Serialized records waiting for the next leader.
    pending: Vec<u8>,
    pending_records: usize,
    /// Appends queued so far; each append's sequence number is the count after it.
    queued: u64,
    /// Every append up to this sequence number is durable.
    durable: u64,
    /// An append is writing and syncing (the leader); the others wait.
    leader: bool,
    /// A write or sync failed: after a failed fsync nothing written since the last good one can be
    /// trusted, so every append fails until the next rotation (whose snapshot captures the state).
    broken: Option<(io::ErrorKind, String)>,
    /// Records in the journal files (current and rotated) not yet in a snapshot.
    lines: usize,
    /// fdatasync calls made, for tests and statistics.
    syncs: u64,
}

/// The state directory, opened and locked. Shared by every thread of the daemon.
pub(crate) struct Store {
    dir: TrustedDir,
    journal: Mutex<Journal>,
    /// Signalled when a leader finishes a batch.
    batch_done: Condvar,
    /// One snapshot writer at a time.
    snapshot: Mutex<()>,
    _lock: File,
    #[cfg(test)]
    slow_sync: std::sync::atomic::AtomicU64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One line read with a bounded buffer.
struct RawLine {
    /// Ended by a newline (otherwise it is the end of the file).
    terminated: bool,
    /// Longer than [`MAX_LINE`]: `buf` holds nothing useful.
    too_long: bool,
    /// Bytes in the file, newline included.
    len: u64,
}

/// Reads the next line into `buf` (cleared first), keeping at most [`MAX_LINE`] bytes of it;
/// `None` at the end of the file.
fn next_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<RawLine>> {
    buf.clear();
    let mut line = RawLine { terminated: false, too_long: false, len: 0 };
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok((line.len > 0).then_some(line));
        }
        let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], true),
            None => (avail, false),
        };
        if !line.too_long {
            if buf.len() + chunk.len() > MAX_LINE {
                line.too_long = true;
                *buf = Vec::new();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let n = chunk.len() + usize::from(done);
        line.len += n as u64;
        r.consume(n);
        if done {
            line.terminated = true;
            return Ok(Some(line));
        }
    }
}

/// What reading one journal file found.
#[derive(Default, Debug)]
struct Scan {
    /// Bad lines: line number and why (only the first few are kept).
    bad: Vec<(usize, String)>,
    bad_count: usize,
    /// A torn last line: its line number, its offset and its length.
    torn: Option<(usize, u64, u64)>,
    /// The last line is readable but has no newline.
    unterminated: bool,
    records: usize,
}

/// Reads every line of a journal, giving each readable one to `each` (with its bytes).
fn scan(f: &File, mut each: impl FnMut(Line, &[u8]) -> io::Result<()>) -> io::Result<Scan> {
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let mut buf = Vec::new();
    let mut out = Scan::default();
    let (mut lineno, mut offset) = (0usize, 0u64);
    while let Some(line) = next_line(&mut r, &mut buf)? {
        lineno += 1;
        let at = offset;
        offset += line.len;
        if !line.too_long && buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = if line.too_long {
            Err(format!("longer than {} KiB", MAX_LINE / 1024))
        } else {
            serde_json::from_slice::<Line>(&buf).map_err(|e| e.to_string())
        };
        match parsed {
            Ok(l) => {
                each(l, &buf)?;
                out.records += 1;
                out.unterminated = !line.terminated;
            }
            // A write cut short by a crash: the last line, without its newline.
            Err(_) if !line.terminated && !line.too_long => out.torn = Some((lineno, at, line.len)),
            Err(why) => {
                out.bad_count += 1;
                if out.bad.len() < 3 {
                    out.bad.push((lineno, why));
                }
            }
        }
    }
    Ok(out)
}

impl Store {
    /// Opens (creating) the state directory after checking it (see [`super::paths`]), takes its
    /// lock and loads what it holds. With `discard_bad`, an unreadable journal or snapshot is set
    /// aside (a copy is kept) and the daemon starts from what could be read; without it, the error
    /// names the file and line and says how to go on.
    pub(crate) fn open(path: &Path, discard_bad: bool) -> io::Result<(Store, Loaded)> {
        let dir = TrustedDir::open(path, STATE_DIR)?;
        let lock = dir
            .open_file(LOCK, OFlags::RDWR, true)?
            .ok_or_else(|| io::Error::other("internal: the lock file was not created"))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("another vpstag daemon uses the state directory {} (its lock is held)", path.display()),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let mut loaded = Loaded::default();
        load_snapshot(&dir, discard_bad, &mut loaded)?;
        for name in [PREV, JOURNAL] {
            load_journal(&dir, name, discard_bad, &mut loaded)?;
        }
        let file = dir
            .open_file(JOURNAL, OFlags::WRONLY | OFlags::APPEND, true)?
            .ok_or_else(|| io::Error::other("internal: the journal was not created"))?;
        dir.sync()?;
        let journal = Journal {
            file: Arc::new(file),
            pending: Vec::new(),
            pending_records: 0,
            queued: 0,
            durable: 0,
            leader: false,
            broken: None,
            lines: loaded.replayed,
            syncs: 0,
        };
        let store = Store {
            dir,
            journal: Mutex::new(journal),
            batch_done: Condvar::new(),
            snapshot: Mutex::new(()),
            _lock: lock,
            #[cfg(test)]
            slow_sync: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((store, loaded))
    }

    fn lock_journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `records` and returns once they are durable (written and fdatasync'd).
    #[cfg(test)] // the daemon enqueues from the manager's hook (`enqueue`, `wait_durable`)
    pub(crate) fn append(&self, records: &[Record]) -> io::Result<()> {
        let ticket = self.enqueue(records)?;
        self.wait_durable(ticket)
    }

    /// Queues `records` after everything queued before, without waiting: the order of the
    /// journal is the order of these calls (the manager's, when it calls from its journal hook
    /// under its lock). Returns the ticket to give [`wait_durable`](Store::wait_durable).
    pub(crate) fn enqueue(&self, records: &[Record]) -> io::Result<u64> {
        let mut buf = Vec::with_capacity(records.len() * 128);
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        let mut j = self.lock_journal();
        if let Some((kind, msg)) = &j.broken {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        if records.is_empty() {
            return Ok(j.queued);
        }
        j.pending.extend_from_slice(&buf);
        j.pending_records += records.len();
        j.queued += 1;
        Ok(j.queued)
    }

    /// Returns once everything queued so far is durable (or says why it cannot be).
    pub(crate) fn sync(&self) -> io::Result<()> {
        let ticket = self.lock_journal().queued;
        self.wait_durable(ticket)
    }

    /// Returns once the records of `ticket` (and all queued before them) are durable (written and
    /// fdatasync'd). Callers on several threads share syncs: the first to find no sync under
    /// way writes and syncs everything queued so far (the leader); the others wait for it, and
    /// the first of them to find their records not yet durable leads the next batch.
    pub(crate) fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        let mut j = self.lock_journal();
        let me = ticket;
        loop {
            if j.durable >= me {
                return Ok(());
            }
            if let Some((kind, msg)) = &j.broken {
                return Err(io::Error::new(*kind, msg.clone()));
            }
            if j.leader {
                j = self.batch_done.wait(j).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            j.leader = true;
            let data = std::mem::take(&mut j.pending);
            let n = std::mem::take(&mut j.pending_records);
            let upto = j.queued;
            let file = Arc::clone(&j.file);
            drop(j);
            let r = self.write_and_sync(&file, &data);
            j = self.lock_journal();
            j.leader = false;
            match r {
                Ok(()) => {
                    j.durable = upto;
                    j.lines += n;
                    j.syncs += 1;
                }
                Err(e) => {
                    j.pending.clear();
                    j.pending_records = 0;
                    j.broken = Some((e.kind(), format!("writing {}: {e}", self.dir.shown(JOURNAL).display())));
                }
            }
            self.batch_done.notify_all();
        }
    }

    fn write_and_sync(&self, mut file: &File, data: &[u8]) -> io::Result<()> {
        file.write_all(data)?;
        #[cfg(test)]
        {
            let ms = self.slow_sync.load(std::sync::atomic::Ordering::SeqCst);
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        file.sync_data()
    }

    /// Records in the journal not yet folded into a snapshot.
    pub(crate) fn lines(&self) -> usize {
        self.lock_journal().lines
    }

    /// fdatasync calls made by [`wait_durable`](Store::wait_durable) so far.
    #[cfg(test)]
    pub(crate) fn syncs(&self) -> u64 {
        self.lock_journal().syncs
    }

    /// First half of a compaction: new records go to a fresh journal from now on. When an
    /// earlier compaction did not finish (`journal.prev.jsonl` is still there), the journal is
    /// left as it is: the next snapshot covers both, and replaying the journal over it again is
    /// harmless.
    pub(crate) fn rotate(&self) -> io::Result<()> {
        let mut j = self.lock_journal();
        while j.leader {
            j = self.batch_done.wait(j).unwrap_or_else(|e| e.into_inner());
        }
        if self.dir.stat(PREV)?.is_some() {
            return Ok(());
        }
        self.dir.rename(JOURNAL, PREV)?;
        let file = self
            .dir
            .open_file(JOURNAL, OFlags::WRONLY | OFlags::APPEND, true)?
            .ok_or_else(|| io::Error::other("internal: the journal was not created"))?;
        self.dir.sync()?;
        j.file = Arc::new(file);
        j.lines = j.pending_records;
        // The snapshot that follows captures everything a failed write lost.
        j.broken = None;
        Ok(())
    }

    /// Second half: writes the snapshot (taken after [`rotate`](Store::rotate)): the VPSes and
    /// the roots `members` (the caller chooses them: first processes, loader joins and orphans);
    /// then drops the rotated journal.
    pub(crate) fn write_snapshot(&self, vpses: Vec<OwnedVps>, members: Vec<SavedMember>) -> io::Result<()> {
        let _one = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let roots = members;
        let f = self
            .dir
            .open_file(SNAPSHOT_TMP, OFlags::WRONLY | OFlags::TRUNC, true)?
            .ok_or_else(|| io::Error::other("internal: the snapshot was not created"))?;
        let mut w = BufWriter::new(f);
        serde_json::to_writer(&mut w, &SnapshotOut { version: 2, vpses: &vpses, members: &roots })
            .map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        self.dir.rename(SNAPSHOT_TMP, SNAPSHOT)?;
        self.dir.sync()?;
        if self.dir.remove(PREV)? {
            self.dir.sync()?;
        }
        Ok(())
    }

    /// The state directory's path.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A free name for a bad copy of `name`: `journal.bad-TIME.jsonl` for `journal.jsonl`.
fn bad_name(dir: &TrustedDir, name: &str) -> io::Result<String> {
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    let t = unix_now();
    for i in 0..1000 {
        let n = if i == 0 { format!("{stem}.bad-{t}.{ext}") } else { format!("{stem}.bad-{t}-{i}.{ext}") };
        if dir.stat(&n)?.is_none() {
            return Ok(n);
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("no free name for a copy of {name}")))
}

fn load_snapshot(dir: &TrustedDir, discard_bad: bool, loaded: &mut Loaded) -> io::Result<()> {
    let Some(f) = dir.open_file(SNAPSHOT, OFlags::RDONLY, false)? else { return Ok(()) };
    let shown = dir.shown(SNAPSHOT);
    let size = f.metadata()?.len();
    let parsed: Result<SnapshotIn, String> = if size > MAX_SNAPSHOT {
        Err(format!("it is {size} bytes, more than the {} MiB a snapshot may be", MAX_SNAPSHOT >> 20))
    } else {
        let mut bytes = Vec::with_capacity(size as usize);
        f.take(MAX_SNAPSHOT + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_SNAPSHOT {
            Err(format!("it is more than the {} MiB a snapshot may be", MAX_SNAPSHOT >> 20))
        } else {
            match serde_json::from_slice::<SnapshotIn>(&bytes) {
                Ok(s) if s.version > 2 => {
                    Err(format!("it is of version {}, written by a newer vpstag (this one reads 1 and 2)", s.version))
                }
                Ok(s) => Ok(s),
                Err(e) => Err(format!("it is not a vpstag snapshot ({e})")),
            }
        }
    };
    match parsed {
        Ok(snap) => {
            for v in snap.vpses {
                loaded.vpses.insert(v.vps.id, v);
            }
            // Version 1 held every member: keep the roots. Version 2 holds only roots (first
            // processes, loader joins and orphans the daemon chose to keep).
            for m in snap.members {
                if snap.version >= 2 {
                    loaded.roots.insert(m.pid, m);
                } else {
                    loaded.add_root(m);
                }
            }
            Ok(())
        }
        Err(why) if discard_bad => {
            let aside = bad_name(dir, SNAPSHOT)?;
            dir.rename(SNAPSHOT, &aside)?;
            dir.sync()?;
            loaded.notes.push(format!(
                "{} is unreadable ({why}): moved to {} ({DISCARD_FLAG}); starting from the journal alone",
                shown.display(),
                dir.shown(&aside).display()
            ));
            Ok(())
        }
        Err(why) => Err(invalid(format!(
            "{}: {why}. The daemon stops rather than guess. To start without it (the VPSes it lists are \
             forgotten; a copy is kept as snapshot.bad-TIME.json), run `vpstag daemon {DISCARD_FLAG}`",
            shown.display()
        ))),
    }
}

fn load_journal(dir: &TrustedDir, name: &str, discard_bad: bool, loaded: &mut Loaded) -> io::Result<()> {
    let Some(f) = dir.open_file(name, OFlags::RDONLY, false)? else { return Ok(()) };
    let shown = dir.shown(name);
    // Replay into a copy: on a refusal nothing of this file counts.
    let mut next = Loaded { vpses: loaded.vpses.clone(), roots: loaded.roots.clone(), ..Loaded::default() };
    let found = scan(&f, |l, _| {
        next.apply(l);
        Ok(())
    })?;
    if found.bad_count > 0 && !discard_bad {
        let (line, why) = found.bad.first().cloned().unwrap_or_default();
        let more = match found.bad_count {
            1 => String::new(),
            n => format!(" ({} more bad lines after it)", n - 1),
        };
        return Err(invalid(format!(
            "{} line {line} is not a vpstag journal record ({why}){more}; only a torn last line may be dropped, \
             so the daemon stops rather than guess. To start from the records that can be read (a copy of the \
             file is kept as {}.bad-TIME.{}), run `vpstag daemon {DISCARD_FLAG}`",
            shown.display(),
            name.rsplit_once('.').map_or(name, |(s, _)| s),
            name.rsplit_once('.').map_or("", |(_, e)| e),
        )));
    }
    loaded.vpses = next.vpses;
    loaded.roots = next.roots;
    loaded.replayed += found.records;
    if let Some((line, _, len)) = found.torn {
        loaded.notes.push(format!(
            "dropped the torn last line of {} (line {line}, {len} bytes: a write cut short by a crash)",
            shown.display()
        ));
    }
    if found.bad_count > 0 {
        // Write the readable records to a new file, keep the old one under another name, and put
        // the new one in its place (a crash at any point leaves a complete journal).
        let tmp = format!("{name}.tmp");
        let out = dir
            .open_file(&tmp, OFlags::WRONLY | OFlags::TRUNC, true)?
            .ok_or_else(|| io::Error::other("internal: the new journal was not created"))?;
        let mut w = BufWriter::new(out);
        let again = dir.open_file(name, OFlags::RDONLY, false)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{} vanished while being read", shown.display()))
        })?;
        scan(&again, |_, bytes| {
            w.write_all(bytes)?;
            w.write_all(b"\n")
        })?;
        let out = w.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        let aside = bad_name(dir, name)?;
        dir.link(name, &aside)?;
        dir.rename(&tmp, name)?;
        dir.sync()?;
        let (first, why) = found.bad.first().cloned().unwrap_or_default();
        loaded.notes.push(format!(
            "{} had {} unreadable lines (the first: line {first}, {why}); kept a copy as {} and went on with the \
             {} readable records ({DISCARD_FLAG})",
            shown.display(),
            found.bad_count,
            dir.shown(&aside).display(),
            found.records
        ));
    } else if name == JOURNAL && (found.torn.is_some() || found.unterminated) {
        // New records are appended here: end the file at a line boundary first.
        let f = dir
            .open_file(name, OFlags::WRONLY, false)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} vanished", shown.display())))?;
        if let Some((_, at, _)) = found.torn {
            f.set_len(at)?;
        } else {
            let mut f = &f;
            use std::io::Seek;
            f.seek(io::SeekFrom::End(0))?;
            f.write_all(b"\n")?;
        }
        f.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vpstag-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn vps(id: u64) -> SavedVps {
        SavedVps {
            id: VpsId(id),
            name: format!("v{id}"),
            first_pid: pid(10 * id as i32),
            first_start: StartTime(5),
            started: 0,
            cgroup: None,
        }
    }

    fn pid(n: i32) -> Pid {
        Pid::new(n).expect("a positive pid")
    }

    fn root(vps: u64, pid: i32, start: u64) -> Record {
        Record::Root { vps: VpsId(vps), pid: self::pid(pid), start: StartTime(start), source: Source::First }
    }

    fn line(r: &Record) -> String {
        serde_json::to_string(r).unwrap()
    }

    fn roots(l: &Loaded) -> Vec<(i32, u64)> {
        l.roots().iter().map(|m| (m.pid.as_raw(), m.vps.0)).collect()
    }

    #[test]
    fn replay_keeps_roots_and_forget_drops_them() {
        let mut l = Loaded::default();
        for r in [
            Record::Vps { vps: vps(1), owner: 1000 },
            root(1, 10, 5),
            Record::Root { vps: VpsId(1), pid: pid(11), start: StartTime(6), source: Source::Loader },
            Record::Vps { vps: vps(2), owner: 0 },
            root(2, 20, 7),
            Record::Forget { id: VpsId(1) },
        ] {
            l.apply(serde_json::from_str(&line(&r)).unwrap());
        }
        assert_eq!(roots(&l), vec![(20, 2)]);
        assert_eq!(l.vpses.keys().map(|k| k.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn old_change_records_keep_first_and_loader_members_only() {
        let mut l = Loaded::default();
        let old = [
            r#"{"t":"vps","vps":{"id":1,"name":"a","first_pid":10,"first_start":5,"started":0},"owner":1000}"#,
            r#"{"t":"change","c":{"change":"added","pid":10,"start":5,"vps":1,"source":"first","parent":null}}"#,
            r#"{"t":"change","c":{"change":"added","pid":11,"start":6,"vps":1,"source":"event","parent":10}}"#,
            r#"{"t":"change","c":{"change":"added","pid":12,"start":7,"vps":1,"source":"loader","parent":null}}"#,
            r#"{"t":"change","c":{"change":"added","pid":13,"start":8,"vps":1,"source":"scan","parent":10}}"#,
            r#"{"t":"change","c":{"change":"removed","pid":11,"start":6,"vps":1}}"#,
            // A removal of an older holder of the pid does not drop the root.
            r#"{"t":"change","c":{"change":"removed","pid":12,"start":3,"vps":1}}"#,
        ];
        for o in old {
            l.apply(serde_json::from_str(o).unwrap());
        }
        assert_eq!(roots(&l), vec![(10, 1), (12, 1)]);
        l.apply(serde_json::from_str(r#"{"t":"change","c":{"change":"removed","pid":12,"start":7,"vps":1}}"#).unwrap());
        assert_eq!(roots(&l), vec![(10, 1)]);
    }

    #[test]
    fn a_store_round_trips_through_journal_and_snapshot() {
        let d = scratch("roundtrip");
        {
            let (s, l) = Store::open(&d, false).unwrap();
            assert!(l.vpses.is_empty() && l.notes.is_empty());
            s.append(&[Record::Vps { vps: vps(1), owner: 7 }, root(1, 10, 5)]).unwrap();
            s.append(&[Record::Vps { vps: vps(2), owner: 8 }, root(2, 20, 5)]).unwrap();
            assert_eq!(s.lines(), 4);
        }
        let (s, l) = Store::open(&d, false).unwrap();
        assert_eq!(roots(&l), vec![(10, 1), (20, 2)]);
        assert_eq!(l.replayed, 4);
        // A second daemon cannot take the directory.
        let e = Store::open(&d, false).err().unwrap();
        assert!(e.to_string().contains("lock is held"), "{e}");
        s.rotate().unwrap();
        s.append(&[Record::Forget { id: VpsId(2) }]).unwrap();
        let members = vec![
            SavedMember { pid: pid(10), start: StartTime(5), vps: VpsId(1), source: Source::First },
            SavedMember { pid: pid(11), start: StartTime(6), vps: VpsId(1), source: Source::Event },
            SavedMember { pid: pid(20), start: StartTime(5), vps: VpsId(2), source: Source::First },
        ];
        let members = members.into_iter().filter(|m| is_root(m.source)).collect();
        s.write_snapshot(vec![OwnedVps { vps: vps(1), owner: 7 }, OwnedVps { vps: vps(2), owner: 8 }], members)
            .unwrap();
        assert!(!d.join(PREV).exists());
        let snap = std::fs::read_to_string(d.join(SNAPSHOT)).unwrap();
        assert!(!snap.contains("\"pid\":11"), "only roots are in the snapshot: {snap}");
        drop(s);
        let (_s, l) = Store::open(&d, false).unwrap();
        assert_eq!(roots(&l), vec![(10, 1)]);
        assert_eq!(l.vpses.keys().map(|k| k.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(l.vpses[&VpsId(1)].owner, 7);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_version_1_snapshot_loads_its_roots() {
        let d = scratch("v1");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(SNAPSHOT),
            r#"{"version":1,"vpses":[{"vps":{"id":3,"name":"c","first_pid":30,"first_start":1,"started":9},"owner":0}],
            "members":[{"pid":30,"start":1,"vps":3,"source":"first"},{"pid":31,"start":2,"vps":3,"source":"event"}]}"#,
        )
        .unwrap();
        let (_s, l) = Store::open(&d, false).unwrap();
        assert_eq!(roots(&l), vec![(30, 3)]);
        assert_eq!(l.vpses[&VpsId(3)].vps.name, "c");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_bad_snapshot_stops_the_store_unless_discarded() {
        let d = scratch("badsnap");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(SNAPSHOT), "{not json").unwrap();
        std::fs::write(d.join(JOURNAL), format!("{}\n", line(&Record::Vps { vps: vps(4), owner: 0 }))).unwrap();
        let e = Store::open(&d, false).err().unwrap().to_string();
        assert!(e.contains("snapshot.json") && e.contains(DISCARD_FLAG), "{e}");
        let (_s, l) = Store::open(&d, true).unwrap();
        assert!(l.vpses.contains_key(&VpsId(4)));
        assert!(l.notes.iter().any(|n| n.contains("snapshot.bad-")), "{:?}", l.notes);
        assert!(!d.join(SNAPSHOT).exists());
        let kept: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot.bad-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read_to_string(kept[0].path()).unwrap(), "{not json");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_oversized_snapshot_is_refused_without_reading_it() {
        let d = scratch("bigsnap");
        std::fs::create_dir_all(&d).unwrap();
        let f = File::create(d.join(SNAPSHOT)).unwrap();
        f.set_len(MAX_SNAPSHOT + 1).unwrap();
        let e = Store::open(&d, false).err().unwrap().to_string();
        assert!(e.contains("MiB a snapshot may be"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_off() {
        let d = scratch("torn");
        std::fs::create_dir_all(&d).unwrap();
        let good = line(&Record::Vps { vps: vps(1), owner: 0 });
        std::fs::write(d.join(JOURNAL), format!("{good}\n{{\"t\":\"ro")).unwrap();
        {
            let (s, l) = Store::open(&d, false).unwrap();
            assert!(l.vpses.contains_key(&VpsId(1)));
            assert!(l.notes.iter().any(|n| n.contains("torn last line") && n.contains("line 2")), "{:?}", l.notes);
            s.append(&[root(1, 10, 5)]).unwrap();
        }
        // The next record did not glue onto the torn one.
        let (_s, l) = Store::open(&d, false).unwrap();
        assert!(l.notes.is_empty(), "{:?}", l.notes);
        assert_eq!(roots(&l), vec![(10, 1)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_readable_last_line_without_newline_is_kept_and_ended() {
        let d = scratch("unterminated");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(JOURNAL), line(&Record::Vps { vps: vps(1), owner: 0 })).unwrap();
        {
            let (s, l) = Store::open(&d, false).unwrap();
            assert!(l.vpses.contains_key(&VpsId(1)));
            s.append(&[root(1, 10, 5)]).unwrap();
        }
        let (_s, l) = Store::open(&d, false).unwrap();
        assert!(l.vpses.contains_key(&VpsId(1)) && l.notes.is_empty(), "{:?}", l.notes);
        assert_eq!(roots(&l), vec![(10, 1)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_bad_middle_line_stops_the_store_and_discarding_keeps_a_copy() {
        let d = scratch("bad");
        std::fs::create_dir_all(&d).unwrap();
        let a = line(&Record::Vps { vps: vps(1), owner: 0 });
        let b = line(&Record::Vps { vps: vps(2), owner: 0 });
        let original = format!("{a}\nnot a record\n{b}\n");
        std::fs::write(d.join(JOURNAL), &original).unwrap();
        let e = Store::open(&d, false).err().unwrap().to_string();
        assert!(e.contains("journal.jsonl line 2") && e.contains(DISCARD_FLAG), "{e}");
        assert_eq!(std::fs::read_to_string(d.join(JOURNAL)).unwrap(), original, "a refusal changes nothing");
        {
            let (_s, l) = Store::open(&d, true).unwrap();
            assert_eq!(l.vpses.keys().map(|k| k.0).collect::<Vec<_>>(), vec![1, 2]);
            assert!(l.notes.iter().any(|n| n.contains("journal.bad-")), "{:?}", l.notes);
        }
        assert_eq!(std::fs::read_to_string(d.join(JOURNAL)).unwrap(), format!("{a}\n{b}\n"));
        let copy = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("journal.bad-"))
            .expect("a copy of the bad journal");
        assert_eq!(std::fs::read_to_string(copy.path()).unwrap(), original);
        // Now it starts without the flag.
        let (_s, l) = Store::open(&d, false).unwrap();
        assert_eq!(l.vpses.len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_overlong_line_is_a_bad_line_read_in_bounded_memory() {
        let mut data = vec![b'x'; 3 * MAX_LINE];
        data.push(b'\n');
        data.extend_from_slice(line(&Record::Forget { id: VpsId(1) }).as_bytes());
        data.push(b'\n');
        let mut r = io::Cursor::new(data);
        let mut buf = Vec::new();
        let l = next_line(&mut r, &mut buf).unwrap().unwrap();
        assert!(l.too_long && l.terminated && buf.capacity() <= 2 * MAX_LINE);
        assert_eq!(l.len, 3 * MAX_LINE as u64 + 1);
        let l = next_line(&mut r, &mut buf).unwrap().unwrap();
        assert!(!l.too_long && buf.starts_with(b"{\"t\":\"forget\""));
        assert!(next_line(&mut r, &mut buf).unwrap().is_none());
        // An over-long last line without a newline is not a torn write.
        let d = scratch("long");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(JOURNAL), vec![b'{'; MAX_LINE + 1]).unwrap();
        let e = Store::open(&d, false).err().unwrap().to_string();
        assert!(e.contains("line 1") && e.contains("longer than 64 KiB"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_appends_all_land_and_share_syncs() {
        let d = scratch("group");
        let (s, _) = Store::open(&d, false).unwrap();
        // Slow syncs: while the leader syncs, the other threads queue up behind it.
        s.slow_sync.store(20, Ordering::SeqCst);
        let s = Arc::new(s);
        let threads = 8;
        let each = 10;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..each {
                        let id = (t * 1000 + i) as u64;
                        s.append(&[Record::Forget { id: VpsId(id) }]).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let records = (threads * each) as u64;
        let syncs = s.syncs();
        assert!(syncs < records, "{syncs} syncs for {records} records");
        assert!(syncs > 0);
        let text = std::fs::read_to_string(d.join(JOURNAL)).unwrap();
        let mut ids: Vec<u64> = text
            .lines()
            .map(|l| match serde_json::from_str::<Record>(l).unwrap() {
                Record::Forget { id } => id.0,
                r => panic!("unexpected {r:?}"),
            })
            .collect();
        ids.sort();
        let mut want: Vec<u64> = (0..threads).flat_map(|t| (0..each).map(move |i| (t * 1000 + i) as u64)).collect();
        want.sort();
        assert_eq!(ids, want, "every record landed exactly once");
        assert_eq!(s.lines(), records as usize);
        drop(s);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unfinished_compaction_is_folded_by_the_next_one() {
        let d = scratch("prev");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(PREV), format!("{}\n", line(&Record::Vps { vps: vps(1), owner: 0 }))).unwrap();
        std::fs::write(d.join(JOURNAL), format!("{}\n", line(&Record::Vps { vps: vps(2), owner: 0 }))).unwrap();
        let (s, l) = Store::open(&d, false).unwrap();
        assert_eq!(l.vpses.len(), 2);
        // The rotated journal is still there: no second rotation over it.
        s.rotate().unwrap();
        assert!(d.join(PREV).exists() && std::fs::metadata(d.join(JOURNAL)).unwrap().len() > 0);
        s.write_snapshot(l.vpses.values().cloned().collect(), l.roots()).unwrap();
        assert!(!d.join(PREV).exists());
        drop(s);
        let (_s, l) = Store::open(&d, false).unwrap();
        assert_eq!(l.vpses.len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
