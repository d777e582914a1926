//! Signals, by name or number, without exposing an OS type.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A signal to send to a VPS's processes.
///
/// ```
/// use vpstag::Signal;
/// assert_eq!("TERM".parse::<Signal>().unwrap(), Signal::TERM);
/// assert_eq!("SIGKILL".parse::<Signal>().unwrap(), Signal::KILL);
/// assert_eq!("9".parse::<Signal>().unwrap(), Signal::KILL);
/// assert!("NOPE".parse::<Signal>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

impl Signal {
    /// `SIGTERM`: please terminate.
    pub const TERM: Signal = Signal(libc::SIGTERM);
    /// `SIGKILL`: terminate now.
    pub const KILL: Signal = Signal(libc::SIGKILL);
    /// `SIGINT`: interrupt (Ctrl-C).
    pub const INT: Signal = Signal(libc::SIGINT);
    /// `SIGHUP`: hang-up.
    pub const HUP: Signal = Signal(libc::SIGHUP);
    /// `SIGSTOP`: stop (cannot be caught).
    pub const STOP: Signal = Signal(libc::SIGSTOP);
    /// `SIGCONT`: continue.
    pub const CONT: Signal = Signal(libc::SIGCONT);

    /// The signal with this number, if the system has it.
    pub fn from_raw(n: i32) -> Option<Signal> {
        if n == 0 {
            return None;
        }
        nix::sys::signal::Signal::try_from(n).ok().map(|s| Signal(s as i32))
    }

    /// The signal number.
    pub fn as_raw(self) -> i32 {
        self.0
    }

    /// The name without `SIG`, e.g. `TERM`.
    pub fn name(self) -> &'static str {
        nix::sys::signal::Signal::try_from(self.0).map(|s| s.as_str().trim_start_matches("SIG")).unwrap_or("?")
    }
}

impl FromStr for Signal {
    type Err = Error;
    fn from_str(s: &str) -> Result<Signal, Error> {
        let t = s.trim();
        if let Ok(n) = t.parse::<i32>() {
            return Signal::from_raw(n).ok_or_else(|| Error::UnknownSignal(s.to_string()));
        }
        let up = t.to_ascii_uppercase();
        let full = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
        nix::sys::signal::Signal::from_str(&full)
            .map(|s| Signal(s as i32))
            .map_err(|_| Error::UnknownSignal(s.to_string()))
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name())
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name())
    }
}
