//! The daemon's state on disk: a snapshot and an append-only journal, both fsync'd.
//!
//! Files in the state directory:
//! - `snapshot.json`: every VPS (with its owner uid) and member at one moment, written to a
//!   temporary file, fsync'd, renamed over the old one (and the directory fsync'd);
//! - `journal.jsonl`: one record a line, appended and fdatasync'd before the change is
//!   acknowledged to anyone: a VPS was defined, a VPS was forgotten, a member was added or removed;
//! - `journal.prev.jsonl`: the journal being folded into a new snapshot (present only while a
//!   compaction runs, or after a crash during one);
//! - `lock`: held (`flock`) by the running daemon, so two daemons never share a state directory.
//!
//! Recovery loads the snapshot and replays `journal.prev.jsonl` then `journal.jsonl` over it. A
//! record is a "set" or "delete" of one key (a VPS id, a pid with its start time), so replaying
//! records the snapshot already reflects changes nothing: the last record about a key wins. That
//! is what makes compaction safe without stopping the world: rotate the journal first, then
//! export, then write the snapshot, then delete the rotated journal.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Change, SavedMember, SavedVps};

/// One journal line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Record {
    /// A VPS was defined.
    Vps { vps: SavedVps, owner: u32 },
    /// A VPS was forgotten (`vpstag stop`).
    Forget { id: u64 },
    /// A membership change.
    Change { c: Change },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct OwnedVps {
    pub vps: SavedVps,
    pub owner: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    vpses: Vec<OwnedVps>,
    members: Vec<SavedMember>,
}

/// What recovery found.
#[derive(Default, Debug)]
pub(crate) struct Loaded {
    pub vpses: BTreeMap<u64, OwnedVps>,
    pub members: HashMap<i32, SavedMember>,
    /// Journal lines that could not be read (a torn last line after a crash).
    pub skipped: usize,
    pub replayed: usize,
}

impl Loaded {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Vps { vps, owner } => {
                self.vpses.insert(vps.id, OwnedVps { vps, owner });
            }
            Record::Forget { id } => {
                self.vpses.remove(&id);
                self.members.retain(|_, m| m.vps != id);
            }
            Record::Change { c: Change::Added { pid, start, vps, source, .. } } => {
                self.members.insert(pid, SavedMember { pid, start, vps, source });
            }
            Record::Change { c: Change::Removed { pid, start, .. } } => {
                if self.members.get(&pid).is_some_and(|m| m.start == start) {
                    self.members.remove(&pid);
                }
            }
        }
    }
}

pub(crate) struct Store {
    dir: PathBuf,
    journal: File,
    /// Lines appended since the last snapshot.
    pub lines: usize,
    _lock: File,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (creating) the state directory, takes its lock and loads what it holds.
    pub(crate) fn open(dir: &Path) -> io::Result<(Store, Loaded)> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join("lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("another vpstag daemon uses the state directory {} (its lock is held)", dir.display()),
                ));
            }
            return Err(e);
        }
        let mut loaded = Loaded::default();
        match std::fs::read(dir.join("snapshot.json")) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is not a vpstag snapshot ({e}); move it away to start without it",
                            dir.join("snapshot.json").display()
                        ),
                    )
                })?;
                for v in snap.vpses {
                    loaded.vpses.insert(v.vps.id, v);
                }
                for m in snap.members {
                    loaded.members.insert(m.pid, m);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for name in ["journal.prev.jsonl", "journal.jsonl"] {
            let f = match File::open(dir.join(name)) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Record>(&line) {
                    Ok(r) => {
                        loaded.apply(r);
                        loaded.replayed += 1;
                    }
                    Err(_) => loaded.skipped += 1,
                }
            }
        }
        let journal = OpenOptions::new().create(true).append(true).mode(0o600).open(dir.join("journal.jsonl"))?;
        let store = Store { dir: dir.to_path_buf(), journal, lines: loaded.replayed, _lock: lock };
        Ok((store, loaded))
    }

    /// Appends records and makes them durable.
    pub(crate) fn append(&mut self, records: &[Record]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 96);
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        self.journal.write_all(&buf)?;
        self.journal.sync_data()?;
        self.lines += records.len();
        Ok(())
    }

    /// First half of a compaction: new records go to a fresh journal from now on.
    pub(crate) fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(self.dir.join("journal.jsonl"), self.dir.join("journal.prev.jsonl"))?;
        self.journal = OpenOptions::new().create(true).append(true).mode(0o600).open(self.dir.join("journal.jsonl"))?;
        sync_dir(&self.dir)?;
        self.lines = 0;
        Ok(())
    }

    /// Second half: writes the snapshot (taken after [`rotate`](Store::rotate)) and drops the
    /// rotated journal. Needs no lock on the store.
    pub(crate) fn write_snapshot(dir: &Path, vpses: Vec<OwnedVps>, members: Vec<SavedMember>) -> io::Result<()> {
        let snap = Snapshot { version: 1, vpses, members };
        let tmp = dir.join("snapshot.json.tmp");
        {
            let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
            serde_json::to_writer(&mut f, &snap).map_err(io::Error::other)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join("snapshot.json"))?;
        sync_dir(dir)?;
        match std::fs::remove_file(dir.join("journal.prev.jsonl")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(dir)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    #[test]
    fn replay_last_record_wins_and_forget_drops_members() {
        let mut l = Loaded::default();
        let v = SavedVps { id: 1, name: "a".into(), first_pid: 10, first_start: 5, started: 0 };
        l.apply(Record::Vps { vps: v, owner: 1000 });
        l.apply(Record::Change { c: Change::Added { pid: 10, start: 5, vps: 1, source: Source::First, parent: None } });
        l.apply(Record::Change {
            c: Change::Added { pid: 11, start: 6, vps: 1, source: Source::Event, parent: Some(10) },
        });
        l.apply(Record::Change { c: Change::Removed { pid: 11, start: 6, vps: 1 } });
        // A removal of an older holder of the pid does not drop the new one.
        l.apply(Record::Change {
            c: Change::Added { pid: 12, start: 9, vps: 1, source: Source::Event, parent: Some(10) },
        });
        l.apply(Record::Change { c: Change::Removed { pid: 12, start: 3, vps: 1 } });
        assert_eq!(l.members.len(), 2);
        assert!(l.members.contains_key(&10) && l.members.contains_key(&12));
        l.apply(Record::Forget { id: 1 });
        assert!(l.members.is_empty() && l.vpses.is_empty());
    }
}
