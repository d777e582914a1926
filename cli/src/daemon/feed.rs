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

/// The recent events (for `vpstag events` and for a follow that resumes `after` a seq): the
/// same shared copies the followers get, with their total size kept as they come and go, and
/// the next event's number.
pub(super) struct Recent {
    pub(super) items: VecDeque<(Shared, usize)>,
    bytes: usize,
    /// The `seq` of the next event recorded.
    next_seq: u64,
    /// The `seq` of this run's first event.
    first_seq: u64,
}

impl Recent {
    /// An empty ring whose first event is numbered `first_seq`.
    pub(super) fn new(first_seq: u64) -> Recent {
        let first_seq = first_seq.max(1);
        Recent { items: VecDeque::new(), bytes: 0, next_seq: first_seq, first_seq }
    }

    /// Where a new daemon's `seq` begins: its start time in microseconds, so that the numbers go
    /// on increasing from one run of the daemon to the next (a follower that resumes with a
    /// `seq` of an earlier run is told what it may have missed).
    pub(super) fn first_seq_now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1)
    }

    /// The events after `after` (all of them for `None`) that `wanted` keeps, as `shown` shows
    /// them; first a `lost` event (reason `expired`, named `vps`) when some after `after` are no
    /// longer kept: how many seqs were skipped, or an unknown number when `after` is not a seq
    /// this ring has given yet (a number of an earlier run of the daemon).
    fn replay(
        &self,
        after: Option<u64>,
        vps: &str,
        mut wanted: impl FnMut(&Shared) -> Option<EventInfo>,
    ) -> Vec<EventInfo> {
        let mut out = Vec::new();
        if let Some(after) = after {
            let oldest = self.items.front().map_or(self.next_seq, |(i, _)| i.1.seq);
            if after >= self.next_seq || after + 1 < self.first_seq {
                // Not a number of this run: how many were missed is not known.
                out.push(EventInfo::expired(vps, None, oldest.saturating_sub(1)));
            } else if after + 1 < oldest {
                out.push(EventInfo::expired(vps, Some(oldest - after - 1), oldest - 1));
            }
        }
        let from = match after {
            Some(a) if a < self.next_seq => a,
            _ => 0,
        };
        out.extend(self.items.iter().filter(|(i, _)| i.1.seq > from).filter_map(|(i, _)| wanted(i)));
        out
    }
}

/// A follower's end of its queue (see [`Daemon::replay`]).
pub(super) struct Subscription {
    rx: mpsc::Receiver<Shared>,
    queued: Arc<AtomicUsize>,
}

/// Whether a reader of the events of VPS `only` (every VPS for `None`) gets an event of VPS `id`,
/// `may_see` saying whether the reader may see that VPS: a loss report ([`EVERY_VPS`]) always.
fn wants(only: Option<u64>, id: u64, may_see: impl FnOnce() -> bool) -> bool {
    id == EVERY_VPS || (only.is_none_or(|o| o == id) && may_see())
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
        if !wants(self.only, item.0, || self.uid == 0 || owner == Some(self.uid)) {
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

/// What the feed keeps of `t` (not numbered yet), with the id and owner of its VPS and its
/// size: an event of a tagged process (`vps` gives its VPS's name and owner), or a loss report
/// (under [`EVERY_VPS`], with the empty name: every follower may have missed something); `None`
/// for the rest (untagged processes, threads).
fn feed_item(
    t: &vpstag::TaggedEvent,
    vps: impl FnOnce(vpstag::VpsId) -> Option<(String, Option<u32>)>,
) -> Option<(u64, EventInfo, Option<u32>, usize)> {
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
    Some((id, info, owner, bytes))
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
            let infos: Vec<(u64, EventInfo, Option<u32>, usize)> = {
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
            // Numbered, kept and offered under the ring's lock: a follower registers under it
            // too (`replay`), so it gets each event either in its replay or in its queue, never
            // both and never neither.
            let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let infos: Vec<(Shared, Option<u32>, usize)> = infos
                .into_iter()
                .map(|(id, mut info, owner, bytes)| {
                    info.seq = r.next_seq;
                    r.next_seq += 1;
                    (Arc::new((id, info)), owner, bytes)
                })
                .collect();
            for (item, _, bytes) in &infos {
                r.items.push_back((Arc::clone(item), *bytes));
                r.bytes += bytes;
            }
            while r.items.len() > RECENT_EVENTS || (r.bytes > RECENT_BYTES && r.items.len() > 1) {
                if let Some((_, b)) = r.items.pop_front() {
                    r.bytes -= b;
                }
            }
            let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|fl| infos.iter().all(|(item, owner, bytes)| fl.offer(item, *owner, *bytes)));
        }
    }

    /// The VPS (id and name) an `events` request of `peer` names, if any.
    pub(super) fn events_of(&self, peer: Peer, name: Option<String>) -> Result<Option<(u64, String)>, Refusal> {
        match name {
            Some(n) => {
                let v = self.lookup(peer, &n, "see")?;
                Ok(Some((v.id.0, v.name)))
            }
            None => Ok(None),
        }
    }

    /// The kept events `peer` may see (of the one VPS `only`, when given) after `after` (all of
    /// them for `None`; see [`Recent::replay`]); with `follow`, also a subscription to every
    /// later one, taken under the same lock as the replay, so that no event falls between them
    /// and none is in both.
    pub(super) fn replay(
        &self,
        peer: Peer,
        only: Option<&(u64, String)>,
        after: Option<u64>,
        follow: bool,
    ) -> (Vec<EventInfo>, Option<Subscription>) {
        let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let vps = only.map_or("", |(_, n)| n.as_str());
        let events = r.replay(after, vps, |item| {
            let (id, e) = &**item;
            wants(only.map(|(o, _)| *o), *id, || self.visible(peer, *id)).then(|| as_shown(*id, e, only).into_owned())
        });
        let sub = follow.then(|| {
            let (tx, rx) = mpsc::sync_channel(FOLLOWER_QUEUE);
            let queued = Arc::new(AtomicUsize::new(0));
            self.followers.lock().unwrap_or_else(|e| e.into_inner()).push(Follower {
                tx,
                queued: Arc::clone(&queued),
                uid: peer.uid,
                only: only.map(|(id, _)| *id),
            });
            Subscription { rx, queued }
        });
        drop(r);
        (events, sub)
    }

    /// Streams every event of `sub` that `peer` may see (of the one VPS `only`, id and name, when
    /// given) on `stream`, loss reports included, until either side goes.
    pub(super) fn follow(&self, peer: Peer, only: Option<(u64, String)>, sub: Subscription, stream: &UnixStream) {
        let Subscription { rx, queued } = sub;
        while !self.stop.load(Ordering::SeqCst) {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(item) => {
                    let (id, info) = &*item;
                    queued.fetch_sub(event_bytes(info), Ordering::SeqCst);
                    if !wants(only.as_ref().map(|(o, _)| *o), *id, || self.visible(peer, *id)) {
                        continue;
                    }
                    let info = as_shown(*id, info, only.as_ref());
                    if write_within(stream, &ok_line(NextReply { next: &*info }), Duration::from_secs(10)).is_err() {
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
            pid: Pid::new(1),
            cmd: Some(cmd.into()),
            ..EventInfo::default()
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
        let (id, info, owner, bytes) = feed_item(&lost, |_| panic!("a loss has no VPS")).expect("a loss is kept");
        let item = Arc::new((id, info));
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
        let (id, info, owner, _) = feed_item(&fork(Some(vpstag::VpsId(5))), named).expect("a member's fork");
        assert_eq!((id, info.vps.as_str(), info.pid, owner), (5, "web", Some(c), Some(1000)));
        assert_eq!(info.vps_id, Some(vpstag::VpsId(5)));
        assert!(feed_item(&fork(None), named).is_none(), "an untagged process's fork");
        assert!(feed_item(&fork(Some(vpstag::VpsId(6))), |_| None).is_none(), "a VPS already forgotten");
    }

    /// A ring of events numbered `seqs` (all of VPS 1).
    fn ring(first: u64, seqs: &[u64]) -> Recent {
        let mut r = Recent::new(first);
        for &seq in seqs {
            let mut e = exec("a");
            e.seq = seq;
            r.items.push_back((Arc::new((1, e)), 10));
            r.next_seq = seq + 1;
        }
        r
    }

    fn seqs(events: &[EventInfo]) -> Vec<(String, u64, Option<u64>)> {
        events.iter().map(|e| (e.event.clone(), e.seq, e.count)).collect()
    }

    #[test]
    fn a_replay_after_a_seq_sends_what_came_after_and_says_what_is_no_longer_kept() {
        let all = |i: &Shared| Some(i.1.clone());
        let r = ring(100, &[105, 106, 107]);
        let exec = |s| ("exec".to_string(), s, None);
        assert_eq!(seqs(&r.replay(None, "a", all)), [exec(105), exec(106), exec(107)]);
        assert_eq!(seqs(&r.replay(Some(105), "a", all)), [exec(106), exec(107)]);
        assert_eq!(seqs(&r.replay(Some(107), "a", all)), [], "nothing new");
        assert_eq!(seqs(&r.replay(Some(104), "a", all)), [exec(105), exec(106), exec(107)], "no gap: no marker");
        // 102..=104 fell out of the ring: a marker first, standing for the last of them.
        let got = r.replay(Some(101), "a", all);
        assert_eq!(seqs(&got), [("lost".to_string(), 104, Some(3)), exec(105), exec(106), exec(107)]);
        assert_eq!((got[0].reason.as_deref(), got[0].vps.as_str()), (Some("expired"), "a"));
        // A seq of another run (earlier: below this run's first; or one never given): how many
        // is not known, and everything kept comes.
        for other_run in [7, 500] {
            let got = r.replay(Some(other_run), "", all);
            assert_eq!(seqs(&got), [("lost".to_string(), 104, None), exec(105), exec(106), exec(107)], "{other_run}");
        }
        // What the filter leaves out is not sent, and the marker still is.
        assert_eq!(seqs(&r.replay(Some(101), "a", |_| None)), [("lost".to_string(), 104, Some(3))]);
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
