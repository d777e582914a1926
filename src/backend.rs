//! Choosing a backend.

use std::fmt;
use std::str::FromStr;

use vpstag_tracker::ForkTracker;

use crate::Error;

/// Which backend to use.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum BackendChoice {
    /// The best one this system allows: on Linux eBPF (when built in), then the proc connector,
    /// then ptrace; on FreeBSD kqueue.
    #[default]
    Auto,
    /// Linux netlink proc connector.
    Cnproc,
    /// ptrace fork following (works unprivileged on one's own children).
    Ptrace,
    /// BSD kqueue with `NOTE_TRACK`.
    Kqueue,
    /// Linux eBPF (cargo feature `ebpf`).
    Ebpf,
}

impl FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "auto" => BackendChoice::Auto,
            "cnproc" => BackendChoice::Cnproc,
            "ptrace" => BackendChoice::Ptrace,
            "kqueue" => BackendChoice::Kqueue,
            "ebpf" => BackendChoice::Ebpf,
            _ => return Err(Error::UnknownBackend(s.to_string())),
        })
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Cnproc => "cnproc",
            BackendChoice::Ptrace => "ptrace",
            BackendChoice::Kqueue => "kqueue",
            BackendChoice::Ebpf => "ebpf",
        })
    }
}

/// Opens the backend `choice` on this system.
///
/// ```no_run
/// let tracker = vpstag::open_backend(vpstag::BackendChoice::Auto)?;
/// println!("using {}", tracker.kind());
/// # Ok::<(), vpstag::Error>(())
/// ```
pub fn open_backend(choice: BackendChoice) -> Result<Box<dyn ForkTracker>, Error> {
    open_backend_with_notes(choice).map(|(t, _)| t)
}

/// Like [`open_backend`], and also says what `Auto` tried before its choice and why it fell back.
pub fn open_backend_with_notes(choice: BackendChoice) -> Result<(Box<dyn ForkTracker>, Vec<String>), Error> {
    let mut notes = Vec::new();
    let t = crate::sys::open_backend(choice, &mut notes)?;
    Ok((t, notes))
}
