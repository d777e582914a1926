//! The daemon's directories, trusted only after checking (as sshd's `StrictModes`).
//!
//! The daemon runs as root and writes its state (journal, snapshot, lock) and its socket into
//! directories named on its command line. If anyone but root (or the daemon's own user) can
//! change such a directory, or any directory above it, they can swap a file for a symbolic link
//! to `/etc/shadow` between our check and our use, and make the daemon truncate, write or chmod a
//! file of their choice. So:
//!
//! - [`TrustedDir::open`] walks the path from `/` one component at a time, opening each directory
//!   relative to the one before (`openat` with `O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC`), and checks
//!   each opened directory with `fstat` (the object itself, not a path that could change): owned
//!   by root or by the daemon's effective uid, and not writable by group or others. A directory
//!   above the target with the sticky bit (like `/tmp`) may be writable by others: in a sticky
//!   directory only an entry's owner (or root) can rename or remove it, so others can add entries
//!   next to ours but cannot replace ours; the entries we pass through there are checked like any
//!   other (a directory or symbolic link owned by someone else is refused).
//! - A symbolic link on the way is followed only when root or the daemon's user owns it (it then
//!   sits in a directory already checked, so nobody else can replace it).
//! - Missing directories are created with `mkdirat` and then given their mode with `fchmod`, so
//!   the umask does not matter.
//! - Files are opened relative to the verified directory's descriptor, with `O_NOFOLLOW`, and
//!   created with an explicit mode (see [`TrustedDir::open_file`]).
//!
//! Every refusal says what is wrong and how to fix it.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};

/// Symbolic links followed in one path at most (as the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// What a directory is for, to say so in messages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Purpose {
    /// "state directory", "socket directory".
    pub what: &'static str,
    /// The option that names another one: "--state-dir", "--socket".
    pub option: &'static str,
    /// The mode the directory is created with when missing.
    pub mode: u32,
}

/// The state directory: created 0700.
pub(crate) const STATE_DIR: Purpose = Purpose { what: "state directory", option: "--state-dir", mode: 0o700 };
/// The socket's directory: created 0755 (everyone must reach the socket).
pub(crate) const SOCKET_DIR: Purpose = Purpose { what: "socket directory", option: "--socket", mode: 0o755 };
/// Directories created above a missing target.
const PARENT_MODE: u32 = 0o755;

/// An opened directory that passed the checks of [`TrustedDir::open`]; files in it are reached
/// only through its descriptor.
#[derive(Debug)]
pub(crate) struct TrustedDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn refusal(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The uids trusted with the daemon's directories: root and the daemon's effective uid.
fn trusted_uids() -> (u32, String) {
    let euid = rustix::process::geteuid().as_raw();
    let who = if euid == 0 { "root".to_string() } else { format!("root or uid {euid} (the daemon's user)") };
    (euid, who)
}

/// The permission bits of `st` (`st_mode` is u16 on some systems).
#[allow(clippy::unnecessary_cast)]
fn perms(st: &Stat) -> u32 {
    st.st_mode as u32 & 0o7777
}

/// `m` as a [`Mode`] (whose raw type is u16 on some systems).
#[allow(clippy::unnecessary_cast)]
fn mode_bits(m: u32) -> Mode {
    Mode::from_raw_mode((m & 0o7777) as rustix::fs::RawMode)
}

/// Checks one opened directory (or a symbolic link, `is_link`) met on the way to a target.
/// `last` says whether it is the target itself, which may never be writable by others.
fn check(st: &Stat, shown: &Path, purpose: Purpose, last: bool, is_link: bool) -> io::Result<()> {
    let (euid, who) = trusted_uids();
    let mode = perms(st);
    let role = if last { format!("the {}", purpose.what) } else { format!("a parent of the {}", purpose.what) };
    if st.st_uid != 0 && st.st_uid != euid {
        let kind = if is_link { "a symbolic link" } else { "a directory" };
        return Err(refusal(format!(
            "{} ({role}) is {kind} owned by uid {} (mode {mode:04o}): the {} and its parents must be owned and \
             writable only by {who}; fix with chown/chmod or use another {}",
            shown.display(),
            st.st_uid,
            purpose.what,
            purpose.option
        )));
    }
    if is_link {
        return Ok(());
    }
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    // A sticky directory above the target is fine: nobody but an entry's owner (or root) can
    // rename or remove that entry, and every entry we pass through there is checked in turn.
    if others_write && (last || !sticky) {
        let by = if mode & 0o002 != 0 { "every user".to_string() } else { format!("group {}", st.st_gid) };
        let sticky_note = if last && sticky { " (the sticky bit is not enough for the directory itself)" } else { "" };
        return Err(refusal(format!(
            "{} ({role}) is writable by {by} (mode {mode:04o}){sticky_note}: the {} and its parents must be writable \
             only by {who}; fix with chmod/chown or use another {}",
            shown.display(),
            purpose.what,
            purpose.option
        )));
    }
    Ok(())
}

fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

impl TrustedDir {
    /// Opens the directory `path` (creating it, and any missing parent, when missing) and checks
    /// it and every directory above it: see the [module docs](self). A missing target is created
    /// with `purpose.mode`, missing parents with 0755, whatever the umask.
    pub(crate) fn open(path: &Path, purpose: Purpose) -> io::Result<TrustedDir> {
        let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
        let root = rustix::fs::openat(CWD, "/", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(errno)?;
        // The directories opened so far, from `/`, with the path they were reached by.
        let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(root, PathBuf::from("/"))];
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, &abs);
        let st = rustix::fs::fstat(&stack[0].0).map_err(errno)?;
        check(&st, Path::new("/"), purpose, false, false)?;
        let mut links = 0;
        // `todo` is a stack: the next component is at the end.
        while let Some(name) = todo.pop() {
            if name == "." {
                continue;
            }
            if name == ".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let (parent_fd, parent_path) = match stack.last() {
                Some((fd, p)) => (fd.as_fd(), p.clone()),
                None => return Err(io::Error::other("internal: empty directory stack")),
            };
            let shown = parent_path.join(&name);
            let last = todo.is_empty();
            let mut created = false;
            match rustix::fs::statat(parent_fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    check(&st, &shown, purpose, false, true)?;
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(refusal(format!(
                            "{}: more than {MAX_LINKS} symbolic links on the way (a loop?); use another {}",
                            abs.display(),
                            purpose.option
                        )));
                    }
                    let target = rustix::fs::readlinkat(parent_fd, name.as_os_str(), Vec::new()).map_err(errno)?;
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        stack.truncate(1);
                    }
                    push_components(&mut todo, &target);
                    continue;
                }
                Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
                    return Err(refusal(format!(
                        "{} is not a directory ({:?}); remove it or use another {}",
                        shown.display(),
                        FileType::from_raw_mode(st.st_mode),
                        purpose.option
                    )));
                }
                Ok(_) => {}
                Err(rustix::io::Errno::NOENT) => {
                    let mode = if last { purpose.mode } else { PARENT_MODE };
                    match rustix::fs::mkdirat(parent_fd, name.as_os_str(), mode_bits(mode)) {
                        Ok(()) => created = true,
                        Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => {
                            return Err(io::Error::new(
                                io::Error::from(e).kind(),
                                format!("creating {}: {}", shown.display(), io::Error::from(e)),
                            ))
                        }
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("reading {}: {}", shown.display(), io::Error::from(e)),
                    ))
                }
            }
            let fd = open_dir_at(parent_fd, &name).map_err(|e| {
                let why = if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                    "it was replaced by something else while being checked".to_string()
                } else {
                    io::Error::from(e).to_string()
                };
                io::Error::new(io::Error::from(e).kind(), format!("opening {}: {why}", shown.display()))
            })?;
            let st = rustix::fs::fstat(&fd).map_err(errno)?;
            check(&st, &shown, purpose, last, false)?;
            if created {
                // The umask applied to mkdirat; the mode is set on the opened directory.
                let mode = if last { purpose.mode } else { PARENT_MODE };
                rustix::fs::fchmod(&fd, mode_bits(mode)).map_err(errno)?;
            }
            stack.push((fd, shown));
        }
        let (fd, shown) = stack.pop().ok_or_else(|| io::Error::other("internal: empty directory stack"))?;
        // Checked once more as the target: the walk may have ended on a directory it passed as a
        // parent (a path ending in "..", a link to "/").
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        check(&st, &shown, purpose, true, false)?;
        Ok(TrustedDir { fd, path: abs })
    }

    /// The descriptor of the directory.
    #[cfg(test)]
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path the directory was opened by (for messages).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`, for messages.
    pub(crate) fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Makes the directory's entries (creations, renames, removals) durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(errno)
    }

    /// Opens the regular file `name` in this directory: `O_NOFOLLOW | O_CLOEXEC` always, and
    /// created with mode 0600 when `create` is set. Refuses anything but a regular file owned by
    /// root or the daemon's user, and gives the file mode 0600 if it has another one. `Ok(None)`
    /// when it does not exist and `create` is not set.
    pub(crate) fn open_file(&self, name: &str, flags: OFlags, create: bool) -> io::Result<Option<std::fs::File>> {
        // O_NONBLOCK: a FIFO in place of a file must not hang the open (it is refused below).
        let mut flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        if create {
            flags |= OFlags::CREATE;
        }
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) if !create => return Ok(None),
            Err(rustix::io::Errno::LOOP) => {
                return Err(refusal(format!(
                    "{} is a symbolic link; the {} holds only vpstag's own files: remove it",
                    self.shown(name).display(),
                    STATE_DIR.what
                )))
            }
            Err(e) => {
                let e = io::Error::from(e);
                return Err(io::Error::new(e.kind(), format!("opening {}: {e}", self.shown(name).display())));
            }
        };
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        let (euid, _) = trusted_uids();
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(refusal(format!(
                "{} is not a regular file ({:?}); remove it",
                self.shown(name).display(),
                FileType::from_raw_mode(st.st_mode)
            )));
        }
        if st.st_uid != 0 && st.st_uid != euid {
            return Err(refusal(format!(
                "{} is owned by uid {}, not by the daemon's user; remove it",
                self.shown(name).display(),
                st.st_uid
            )));
        }
        if perms(&st) != 0o600 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600)).map_err(errno)?;
        }
        Ok(Some(std::fs::File::from(fd)))
    }

    /// What `name` in this directory is, without following a symbolic link; `None` when missing.
    pub(crate) fn stat(&self, name: impl AsRef<OsStr>) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, name.as_ref(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to`, both in this directory.
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(errno)
    }

    /// Makes `to` a second name of `from` (both in this directory); fails if `to` exists.
    pub(crate) fn link(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::linkat(&self.fd, from, &self.fd, to, AtFlags::empty()).map_err(errno)
    }

    /// Removes the file `name`; `Ok(false)` when it was not there.
    pub(crate) fn remove(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        match rustix::fs::unlinkat(&self.fd, name.as_ref(), AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the mode of `name`, relative to this directory. Call it only on an entry just checked
    /// with [`stat`](TrustedDir::stat) (not a symbolic link): the directory is writable only by
    /// trusted users, so the entry cannot have been swapped since.
    pub(crate) fn chmod(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
        rustix::fs::chmodat(&self.fd, name.as_ref(), mode_bits(mode), AtFlags::empty()).map_err(errno)
    }
}

/// The daemon's listening socket in its verified directory, to remove it at the end.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    dir: TrustedDir,
    name: OsString,
    /// The socket file's identity right after bind: only that file is removed.
    id: (u64, u64),
}

// The field types differ between systems (macOS: a signed st_dev).
#[allow(clippy::unnecessary_cast)]
fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// Binds the daemon's socket at `path`: checks its directory (creating it 0755 when missing,
/// see [`TrustedDir::open`]), removes a stale socket (one nobody listens on; anything else in
/// the way is refused), binds, checks that what is there now is the socket just bound, and gives
/// it mode 0666 relative to the directory's descriptor (anyone may connect: every request is
/// authorised by the peer's credentials).
pub(crate) fn bind_socket(path: &Path) -> io::Result<(UnixListener, BoundSocket)> {
    let name = path.file_name().map(OsStr::to_os_string).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file; use another --socket", path.display()),
        )
    })?;
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = TrustedDir::open(parent, SOCKET_DIR)?;
    match dir.stat(&name)? {
        None => {}
        Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Socket => {
            // By path: every directory on the way was just checked, and only trusted users can
            // change them.
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "a vpstag daemon is already listening on {}; stop it first or use another --socket",
                        path.display()
                    ),
                ));
            }
            dir.remove(&name)
                .map_err(|e| io::Error::new(e.kind(), format!("removing the stale socket {}: {e}", path.display())))?;
        }
        Some(st) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket ({:?}); remove it yourself or use another --socket",
                    path.display(),
                    FileType::from_raw_mode(st.st_mode)
                ),
            ))
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("listening on {}: {e}", path.display())))?;
    let euid = rustix::process::geteuid().as_raw();
    let st = match dir.stat(&name)? {
        Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Socket && st.st_uid == euid => st,
        _ => {
            return Err(refusal(format!(
                "{} is not the socket just bound (it changed under the daemon); check who else writes to {}",
                path.display(),
                dir.path().display()
            )))
        }
    };
    dir.chmod(&name, 0o666)
        .map_err(|e| io::Error::new(e.kind(), format!("setting the mode of {}: {e}", path.display())))?;
    Ok((listener, BoundSocket { dir, name, id: file_id(&st) }))
}

impl BoundSocket {
    /// Removes the socket, if it is still the one bound.
    pub(crate) fn remove(&self) -> io::Result<()> {
        match self.dir.stat(&self.name)? {
            Some(st) if file_id(&st) == self.id => {
                self.dir.remove(&self.name)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Pushes the components of `p` onto `todo` so that the first one is popped first.
fn push_components(todo: &mut Vec<OsString>, p: &Path) {
    let mut parts: Vec<OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {}
            Component::CurDir => parts.push(".".into()),
            Component::ParentDir => parts.push("..".into()),
            Component::Normal(n) => parts.push(n.to_os_string()),
        }
    }
    todo.extend(parts.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const NOBODY: u32 = 65534;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// A fresh directory (root-owned, 0755) under the system's temporary directory.
    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vpstag-paths-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refused(p: &Path, purpose: Purpose) -> String {
        match TrustedDir::open(p, purpose) {
            Ok(_) => panic!("{} was accepted", p.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_directories_are_created_with_explicit_modes_whatever_the_umask() {
        let base = scratch("create");
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        let r = TrustedDir::open(&base.join("a/b/state"), STATE_DIR);
        let s = TrustedDir::open(&base.join("run/sock"), SOCKET_DIR);
        rustix::process::umask(Mode::from_raw_mode(0o000));
        let t = TrustedDir::open(&base.join("loose"), STATE_DIR);
        rustix::process::umask(old);
        r.unwrap();
        s.unwrap();
        t.unwrap();
        let mode = |p: &str| std::fs::metadata(base.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("a"), 0o755);
        assert_eq!(mode("a/b/state"), 0o700);
        assert_eq!(mode("run/sock"), 0o755);
        assert_eq!(mode("loose"), 0o700);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_owned_by_another_user_is_refused_with_the_fix() {
        if !is_root() {
            return;
        }
        let base = scratch("owner");
        let d = base.join("state");
        std::fs::create_dir(&d).unwrap();
        chmod(&d, 0o700);
        chown(&d, NOBODY);
        let msg = refused(&d, STATE_DIR);
        assert!(msg.contains(&d.display().to_string()) && msg.contains("owned by uid 65534"), "{msg}");
        assert!(msg.contains("--state-dir") && msg.contains("chown"), "{msg}");
        // Below it, too.
        let msg = refused(&d.join("inner"), STATE_DIR);
        assert!(msg.contains("a parent of the state directory"), "{msg}");
        assert!(!d.join("inner").exists(), "nothing was created below an untrusted directory");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn group_or_world_writable_directories_are_refused_unless_a_sticky_parent() {
        let base = scratch("writable");
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let msg = refused(&open.join("state"), STATE_DIR);
        assert!(msg.contains("writable by every user (mode 0777)") && msg.contains("chmod"), "{msg}");
        chmod(&open, 0o775);
        let msg = refused(&open.join("state"), STATE_DIR);
        assert!(msg.contains("writable by group"), "{msg}");
        // Sticky: fine above the target, not as the target.
        chmod(&open, 0o1777);
        TrustedDir::open(&open.join("state"), STATE_DIR).unwrap();
        let msg = refused(&open, SOCKET_DIR);
        assert!(msg.contains("sticky bit is not enough") && msg.contains("--socket"), "{msg}");
        // Also when reached as a parent first.
        let msg = refused(&open.join("state/.."), SOCKET_DIR);
        assert!(msg.contains("sticky bit is not enough"), "{msg}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn symbolic_links_are_followed_only_when_trusted() {
        if !is_root() {
            return;
        }
        let base = scratch("links");
        let real = base.join("real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        std::os::unix::fs::symlink(&real, base.join("link")).unwrap();
        std::os::unix::fs::symlink("real", base.join("rel")).unwrap();
        let d = TrustedDir::open(&base.join("link"), STATE_DIR).unwrap();
        assert_eq!(rustix::fs::fstat(d.fd()).unwrap().st_ino, std::fs::metadata(&real).unwrap().ino());
        TrustedDir::open(&base.join("rel"), STATE_DIR).unwrap();
        TrustedDir::open(&base.join("rel/../real"), STATE_DIR).unwrap();
        // A link another user owns, in a sticky directory (where they may create it), is refused.
        let tmp = base.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        chmod(&tmp, 0o1777);
        let evil = tmp.join("evil");
        std::os::unix::fs::symlink(&real, &evil).unwrap();
        chown(&evil, NOBODY);
        let msg = refused(&evil, STATE_DIR);
        assert!(msg.contains("symbolic link owned by uid 65534"), "{msg}");
        // A loop ends.
        std::os::unix::fs::symlink("loop", base.join("loop")).unwrap();
        let msg = refused(&base.join("loop"), STATE_DIR);
        assert!(msg.contains("symbolic links"), "{msg}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn files_are_opened_without_following_links_and_get_mode_0600() {
        let base = scratch("files");
        let d = TrustedDir::open(&base.join("state"), STATE_DIR).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, base.join("state/journal.jsonl")).unwrap();
        let e = d.open_file("journal.jsonl", OFlags::WRONLY | OFlags::APPEND, true).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(d.open_file("missing", OFlags::RDONLY, false).unwrap().is_none());
        std::fs::write(base.join("state/loose"), "x").unwrap();
        chmod(&base.join("state/loose"), 0o666);
        d.open_file("loose", OFlags::RDONLY, false).unwrap().unwrap();
        assert_eq!(std::fs::metadata(base.join("state/loose")).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::create_dir(base.join("state/dir")).unwrap();
        assert!(d.open_file("dir", OFlags::RDONLY, false).is_err());
        rustix::fs::mknodat(d.fd(), "fifo", rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let e = d.open_file("fifo", OFlags::RDONLY, false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_file_in_place_of_a_directory_is_refused() {
        let base = scratch("notdir");
        std::fs::write(base.join("f"), "").unwrap();
        let msg = refused(&base.join("f"), STATE_DIR);
        assert!(msg.contains("is not a directory"), "{msg}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
