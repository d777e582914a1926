//! The event feed: the recent-events ring and the followers of `vpstag events --follow`.
//!
//! Memory is bounded in bytes, not only in events: a command line is kept to at most
//! [`MAX_EVENT_CMD`] bytes, the ring to [`RECENT_BYTES`], and each follower's queue to
//! [`FOLLOWER_BYTES`]. One copy of each event is shared by every follower's queue.

use std::borrow::Cow;

use super::*;

/// The most bytes of an exec's command line an event keeps; a longer one is cut (at a character
/// boundary) and ends with [`TRUNCATED_MARK`], so that it is at most this long with the mark.
pub const MAX_EVENT_CMD: usize = 4096;
/// The end of a command line that was cut.
pub const TRUNCATED_MARK: &str = "\u{2026}";
/// Bytes of events (as counted by `event_bytes`) kept for `vpstag events` without `--follow`,
/// besides the count [`RECENT_EVENTS`].
const RECENT_BYTES: usize = 1 << 20;
/// A follower with this many bytes of events waiting to be sent is cut off (as when it falls
/// [`FOLLOWER_QUEUE`] events behind).
const FOLLOWER_BYTES: usize = 1 << 20;

/// The id a loss report is kept under: it concerns every VPS, and every follower gets it (VPS ids
/// start at 1).
pub(super) const EVERY_VPS: u64 = 0;

/// The event `info` (of VPS `id`) as a stream of the one VPS `only` (id and name) shows it: a
/// loss (kept with the empty name, for a stream of every VPS) is named after the VPS followed.
pub(super) fn as_shown<'a>(id: u64, info: &'a EventInfo, only: Option<&(u64, String)>) -> Cow<'a, EventInfo> {
    match only {
        Some((_, name)) if id == EVERY_VPS => Cow::Owned(EventInfo { vps: name.clone(), ..info.clone() }),
        _ => Cow::Borrowed(info),
    }
}

/// The command line of `pid`, read only as far as an event keeps (see [`truncate_cmd`]).
fn event_cmd(pid: Pid) -> Option<String> {
    let (cmd, cut) = vpstag::process::cmdline_prefix(pid, MAX_EVENT_CMD + 1)?;
    Some(if cut || cmd.len() > MAX_EVENT_CMD { truncate_cmd(cmd + TRUNCATED_MARK) } else { cmd })
}

/// `cmd`, cut to at most [`MAX_EVENT_CMD`] bytes (mark included) when longer.
pub(super) fn truncate_cmd(mut cmd: String) -> String {
    if cmd.len() <= MAX_EVENT_CMD {
        return cmd;
    }
    let mut end = MAX_EVENT_CMD - TRUNCATED_MARK.len();
    while !cmd.is_char_boundary(end) {
        end -= 1;
    }
    cmd.truncate(end);
    cmd.push_str(TRUNCATED_MARK);
    cmd.shrink_to_fit();
    cmd
}

/// What an event costs in memory, roughly: its strings and a fixed part.
pub(super) fn event_bytes(e: &EventInfo) -> usize {
    std::mem::size_of::<(u64, EventInfo)>() + e.event.len() + e.vps.len() + e.cmd.as_ref().map_or(0, String::len)
}

/// An event of a VPS (by id), stored once for every follower.
pub(super) type Shared = Arc<(u64, EventInfo)>;

/// The recent events (for `vpstag events` without `--follow`): the same shared copies the
/// followers get, with their total size kept as they come and go.
#[derive(Default)]
pub(super) struct Recent {
    pub(super) items: VecDeque<(Shared, usize)>,
    bytes: usize,
}

/// One follower of `events --follow`: whom it serves, and its queue.
pub(super) struct Follower {
    tx: SyncSender<Shared>,
    /// Bytes (`event_bytes`) in the queue.
    queued: Arc<AtomicUsize>,
    uid: u32,
    only: Option<u64>,
}

impl Follower {
    /// Queues `item` (of a VPS owned by `owner`) if this follower wants it; `false` when the
    /// follower is gone or too far behind (then it is to be dropped).
    fn offer(&self, item: &Shared, owner: Option<u32>, bytes: usize) -> bool {
        let wanted = item.0 == EVERY_VPS
            || (self.only.is_none_or(|o| o == item.0) && (self.uid == 0 || owner == Some(self.uid)));
        if !wanted {
            return true;
        }
        if self.queued.fetch_add(bytes, Ordering::SeqCst) + bytes > FOLLOWER_BYTES {
            return false;
        }
        match self.tx.try_send(Arc::clone(item)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

pub(super) fn event_info(ev: &vpstag::TaggedEvent, name: &str) -> Option<EventInfo> {
    EventInfo::from_event(ev, name, event_cmd)
}

/// What the feed keeps of `t`, with the owner of its VPS and its size: an event of a tagged
/// process (`vps` gives its VPS's name and owner), or a loss report (under [`EVERY_VPS`], with
/// the empty name: every follower may have missed something); `None` for the rest (untagged
/// processes, threads).
fn feed_item(
    t: &vpstag::TaggedEvent,
    vps: impl FnOnce(vpstag::VpsId) -> Option<(String, Option<u32>)>,
) -> Option<(Shared, Option<u32>, usize)> {
    let (id, name, owner) = match t.vps {
        Some(id) => {
            let (name, owner) = vps(id)?;
            (id.0, name, owner)
        }
        None if matches!(t.event.kind, vpstag::EventKind::Lost { .. }) => (EVERY_VPS, String::new(), None),
        None => return None,
    };
    let info = event_info(t, &name)?;
    let bytes = event_bytes(&info);
    Some((Arc::new((id, info)), owner, bytes))
}

impl Daemon {
    /// Records every tagged event: the recent ring and the followers. Takes whole batches from the
    /// manager (one hand-off per drain), and takes each lock once per batch.
    pub(super) fn record_events(self: &Arc<Daemon>, rx: mpsc::Receiver<Arc<[vpstag::TaggedEvent]>>) {
        while !self.stop.load(Ordering::SeqCst) {
            let batch = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Each event once, shared by every follower, with its VPS's owner and its size.
            let infos: Vec<(Shared, Option<u32>, usize)> = {
                let meta = self.meta();
                batch
                    .iter()
                    .filter_map(|t| {
                        feed_item(t, |id| match meta.get(&id.0) {
                            Some(m) => Some((m.name.clone(), Some(m.owner))),
                            None => Some((self.mgr.name_of(id)?, None)),
                        })
                    })
                    .collect()
            };
            if infos.is_empty() {
                continue;
            }
            {
                let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                for (item, _, bytes) in &infos {
                    r.items.push_back((Arc::clone(item), *bytes));
                    r.bytes += bytes;
                }
                while r.items.len() > RECENT_EVENTS || (r.bytes > RECENT_BYTES && r.items.len() > 1) {
                    if let Some((_, b)) = r.items.pop_front() {
                        r.bytes -= b;
                    }
                }
            }
            let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|fl| infos.iter().all(|(item, owner, bytes)| fl.offer(item, *owner, *bytes)));
        }
    }

    /// Streams every new event `peer` may see (of the one VPS `only`, id and name, when given) on
    /// `stream`, loss reports included, until either side goes.
    pub(super) fn follow(&self, peer: Peer, only: Option<(u64, String)>, stream: &UnixStream) {
        let (tx, rx) = mpsc::sync_channel(FOLLOWER_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).push(Follower {
            tx,
            queued: Arc::clone(&queued),
            uid: peer.uid,
            only: only.as_ref().map(|(id, _)| *id),
        });
        while !self.stop.load(Ordering::SeqCst) {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(item) => {
                    let (id, info) = &*item;
                    queued.fetch_sub(event_bytes(info), Ordering::SeqCst);
                    if *id != EVERY_VPS && (only.as_ref().is_some_and(|(o, _)| o != id) || !self.visible(peer, *id)) {
                        continue;
                    }
                    let info = as_shown(*id, info, only.as_ref());
                    if write_within(stream, &ok_line(json!({ "next": info })), Duration::from_secs(10)).is_err() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Notice a client that went away.
                    let mut b = [0u8; 1];
                    match stream.peek_nonblocking(&mut b) {
                        Some(0) => return,
                        _ => continue,
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = write_within(
                        stream,
                        &error_line(&refuse(
                            ErrorKind::Lagging,
                            format!(
                                "this follower fell behind ({FOLLOWER_QUEUE} events or {} MiB waiting) and was cut \
                                 off; reconnect",
                                FOLLOWER_BYTES >> 20
                            ),
                        )),
                        Duration::from_secs(10),
                    );
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(cmd: &str) -> EventInfo {
        EventInfo {
            event: "exec".into(),
            vps: "v".into(),
            pid: 1,
            parent: None,
            cmd: Some(cmd.into()),
            code: None,
            signal: None,
            count: None,
            time_ns: None,
        }
    }

    #[test]
    fn long_command_lines_are_cut_and_marked_and_short_ones_kept() {
        assert_eq!(truncate_cmd("sleep 1".into()), "sleep 1");
        let exact = "x".repeat(MAX_EVENT_CMD);
        assert_eq!(truncate_cmd(exact.clone()), exact);
        let cut = truncate_cmd("y".repeat(1 << 20));
        assert_eq!(cut.len(), MAX_EVENT_CMD);
        assert!(cut.ends_with(TRUNCATED_MARK) && cut.starts_with("yyy"));
        // Never in the middle of a character.
        let cut = truncate_cmd("\u{e9}".repeat(MAX_EVENT_CMD));
        assert!(cut.len() <= MAX_EVENT_CMD && cut.ends_with(TRUNCATED_MARK));
    }

    #[test]
    fn a_follower_gets_only_what_it_may_see_and_is_dropped_when_too_far_behind() {
        let (tx, rx) = mpsc::sync_channel(FOLLOWER_QUEUE);
        let f = Follower { tx, queued: Arc::new(AtomicUsize::new(0)), uid: 1000, only: None };
        let mine = Arc::new((1, exec("a")));
        let theirs = Arc::new((2, exec("b")));
        assert!(f.offer(&mine, Some(1000), 10));
        assert!(f.offer(&theirs, Some(1001), 10));
        assert!(f.offer(&theirs, None, 10), "an event of a VPS without an owner is root's");
        assert_eq!(rx.try_iter().map(|i| i.0).collect::<Vec<_>>(), [1]);
        let big = FOLLOWER_BYTES / 3;
        assert!(f.offer(&mine, Some(1000), big));
        assert!(f.offer(&mine, Some(1000), big));
        assert!(!f.offer(&mine, Some(1000), big), "more bytes waiting than a follower may hold");
    }

    #[test]
    fn a_loss_reaches_every_follower_named_after_the_vps_it_follows() {
        let (tx, rx) = mpsc::sync_channel(4);
        let one = Follower { tx, queued: Arc::new(AtomicUsize::new(0)), uid: 1000, only: Some(3) };
        let lost = vpstag::TaggedEvent {
            event: vpstag::Event::new(vpstag::EventKind::Lost {
                count: Some(9),
                reason: vpstag::LossReason::SequenceGap,
            }),
            vps: None,
        };
        let (item, owner, bytes) = feed_item(&lost, |_| panic!("a loss has no VPS")).expect("a loss is kept");
        assert_eq!((item.0, item.1.vps.as_str(), owner), (EVERY_VPS, "", None));
        assert!(one.offer(&item, owner, bytes));
        let got = rx.try_recv().expect("a follower of one VPS, not root, gets the loss");
        let only = (3, "web".to_string());
        let shown = as_shown(got.0, &got.1, Some(&only));
        assert_eq!((shown.event.as_str(), shown.vps.as_str(), shown.count), ("lost", "web", Some(9)));
        assert_eq!(as_shown(got.0, &got.1, None).vps, "", "a follower of every VPS");
        // Another VPS's fork still does not reach it, and its own events keep their name.
        let mut other = exec("x");
        other.vps = "other".into();
        assert!(one.offer(&Arc::new((4, other.clone())), Some(1000), 10));
        assert!(rx.try_recv().is_err());
        assert_eq!(as_shown(4, &other, Some(&only)).vps, "other");
    }

    #[test]
    fn the_feed_keeps_tagged_events_and_losses_and_drops_untagged_events() {
        let (p, c) = (Pid::new(10).unwrap(), Pid::new(11).unwrap());
        let fork = |vps| vpstag::TaggedEvent {
            event: vpstag::Event::new(vpstag::EventKind::Fork {
                parent: p,
                child: c,
                child_thread: c,
                thread: false,
                child_start: None,
            }),
            vps,
        };
        let named = |_| Some(("web".to_string(), Some(1000)));
        let (item, owner, _) = feed_item(&fork(Some(vpstag::VpsId(5))), named).expect("a member's fork");
        assert_eq!((item.0, item.1.vps.as_str(), item.1.pid, owner), (5, "web", 11, Some(1000)));
        assert!(feed_item(&fork(None), named).is_none(), "an untagged process's fork");
        assert!(feed_item(&fork(Some(vpstag::VpsId(6))), |_| None).is_none(), "a VPS already forgotten");
    }

    #[test]
    fn followers_share_one_copy_of_an_event() {
        let (tx, rx) = mpsc::sync_channel(4);
        let (tx2, rx2) = mpsc::sync_channel(4);
        let root = Follower { tx, queued: Arc::new(AtomicUsize::new(0)), uid: 0, only: None };
        let other = Follower { tx: tx2, queued: Arc::new(AtomicUsize::new(0)), uid: 0, only: Some(1) };
        let item = Arc::new((1, exec("a")));
        assert!(root.offer(&item, Some(5), 10) && other.offer(&item, Some(5), 10));
        let (a, b) = (rx.recv().unwrap(), rx2.recv().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
    }
}
