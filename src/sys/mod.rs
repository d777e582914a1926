//! Everything that differs per operating system, selected at this one place: the process-table
//! snapshot used for resynchronisation, the clock, how a first process becomes the reaper of its
//! descendants, and which backends exist.

pub(crate) use crate::process::{Peer as SocketPeer, PeerState, ProcessInfo as ProcInfo};

mod child;
pub(crate) use child::*;

cfg_if::cfg_if! {
    if #[cfg(target_os = "linux")] {
        mod linux;
        pub use linux::*;
    } else if #[cfg(target_os = "freebsd")] {
        mod freebsd;
        mod unix_common;
        pub use freebsd::*;
        pub(crate) use unix_common::*;
    } else {
        mod other;
        mod unix_common;
        pub use other::*;
        pub(crate) use unix_common::*;
    }
}
