//! Who is asking, and what that user may do to a process.

/// The peer: who sent a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    pub(super) pid: i32,
    pub(super) uid: u32,
}

pub(super) use vpstag::process::may_signal;
