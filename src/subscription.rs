//! Bounded event subscriptions: what [`Manager::subscribe`](crate::Manager::subscribe) hands out.
//!
//! Each subscription has a queue of its own with a fixed capacity. The manager never waits for a
//! subscriber: when the queue is full, events are dropped and counted, and as soon as there is
//! room again the subscriber receives one [`EventKind::Lost`] with
//! [`LossReason::SubscriberBehind`] and the count, before any later event. A subscriber therefore
//! always knows when it missed something, and a slow one costs the manager a bounded amount of
//! memory.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{Receiver, RecvError, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use vpstag_tracker::{Event, EventKind, LossReason, VpsId};

use crate::TaggedEvent;

/// How many events a subscription queues before it drops (and counts) the next ones, unless
/// [`Manager::subscribe_with`](crate::Manager::subscribe_with) says otherwise.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// The manager's end of one subscription.
pub(crate) struct Slot {
    filter: Option<VpsId>,
    tx: SyncSender<TaggedEvent>,
    lost: u64,
    wake: OwnedFd,
    woken: bool,
}

impl Slot {
    /// Queues `ev` if this subscription wants it; false once the subscription is gone.
    pub(crate) fn deliver(&mut self, ev: &TaggedEvent) -> bool {
        let wanted = match self.filter {
            None => true,
            // A loss reported by the backend may concern any VPS.
            Some(f) => ev.vps == Some(f) || matches!(ev.event.kind, EventKind::Lost { .. }),
        };
        if !wanted {
            return true;
        }
        if self.lost > 0 {
            let marker = TaggedEvent {
                event: Event::new(EventKind::Lost { count: Some(self.lost), reason: LossReason::SubscriberBehind }),
                vps: self.filter,
            };
            match self.tx.try_send(marker) {
                Ok(()) => self.lost = 0,
                Err(TrySendError::Full(_)) => {
                    self.lost += 1;
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        match self.tx.try_send(*ev) {
            Ok(()) => {
                self.woken = false;
                true
            }
            Err(TrySendError::Full(_)) => {
                self.lost += 1;
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// After a drain: makes the subscription's descriptor readable if events were queued since the
    /// last wake-up (one write per drain, not per event).
    pub(crate) fn wake(&mut self) {
        if !self.woken {
            self.woken = true;
            // Non-blocking: a full pipe is readable already.
            let _ = nix::unistd::write(&self.wake, &[1u8]);
        }
    }
}

/// A stream of tagged events from a [`Manager`](crate::Manager), bounded (see the module docs):
/// every event from the moment of subscribing, or only one VPS's
/// ([`Manager::subscribe_vps`](crate::Manager::subscribe_vps)). The methods mirror
/// [`std::sync::mpsc::Receiver`]'s. It ends (`Err(RecvError)`) when the manager is dropped.
///
/// For an event loop, the descriptor ([`AsFd`]) becomes readable when events are waiting: poll it,
/// then take them with [`try_iter`](Subscription::try_iter). With the `tokio` feature,
/// `into_async` gives a `Stream`.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<TaggedEvent>,
    wake: OwnedFd,
}

/// A new subscription and the manager's end of it.
pub(crate) fn channel(filter: Option<VpsId>, capacity: usize) -> std::io::Result<(Slot, Subscription)> {
    use nix::fcntl::OFlag;
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(std::io::Error::from)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    Ok((Slot { filter, tx, lost: 0, wake: write, woken: false }, Subscription { rx, wake: read }))
}

impl Subscription {
    /// Empties the wake-up pipe (non-blocking).
    fn clear_wake(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake, &mut buf), Ok(n) if n == buf.len()) {}
    }

    /// The next event, waiting for it.
    pub fn recv(&self) -> Result<TaggedEvent, RecvError> {
        self.rx.recv()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<TaggedEvent, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The next event if one is waiting. When none is, the descriptor is made unreadable until
    /// the next event comes.
    pub fn try_recv(&self) -> Result<TaggedEvent, TryRecvError> {
        match self.rx.try_recv() {
            Err(TryRecvError::Empty) => {
                self.clear_wake();
                // An event queued before the pipe was emptied is taken now; a later one writes
                // to the pipe again.
                self.rx.try_recv()
            }
            other => other,
        }
    }

    /// Every event waiting now, without blocking.
    pub fn try_iter(&self) -> impl Iterator<Item = TaggedEvent> + '_ {
        std::iter::from_fn(move || self.try_recv().ok())
    }

    /// Every event, blocking for each, until the manager is dropped.
    pub fn iter(&self) -> impl Iterator<Item = TaggedEvent> + '_ {
        self.rx.iter()
    }

    /// This subscription as an asynchronous `Stream` (`futures_core::Stream`) for tokio. Must be
    /// called within a tokio runtime with I/O enabled.
    /// Fails (instead of panicking as tokio would) outside a runtime.
    #[cfg(feature = "tokio")]
    #[allow(unsafe_code)]
    pub fn into_async(self) -> std::io::Result<AsyncSubscription> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(std::io::Error::other("Subscription::into_async needs a tokio runtime (with I/O enabled)"));
        }
        let fd = self.wake.try_clone()?;
        // SAFETY: an OwnedFd is a valid, open descriptor that the AsyncFd owns until it is
        // dropped, and its as_raw_fd never changes.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(AsyncSubscription { sub: self, fd })
    }
}

impl AsFd for Subscription {
    /// Readable when events may be waiting (then [`try_iter`](Subscription::try_iter) takes them),
    /// and at end of file once the manager is dropped.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

/// A [`Subscription`] as a `futures_core::Stream` of events, for tokio (feature `tokio`).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncSubscription {
    sub: Subscription,
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

#[cfg(feature = "tokio")]
impl AsyncSubscription {
    /// The next event if one is waiting now (see [`Subscription::try_recv`]).
    pub fn try_recv(&self) -> Result<TaggedEvent, TryRecvError> {
        self.sub.try_recv()
    }

    /// The next event; `None` once the manager is dropped.
    pub async fn recv(&mut self) -> Option<TaggedEvent> {
        std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *self), cx)).await
    }
}

#[cfg(feature = "tokio")]
impl futures_core::Stream for AsyncSubscription {
    type Item = TaggedEvent;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<TaggedEvent>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            match this.sub.rx.try_recv() {
                Ok(ev) => return Poll::Ready(Some(ev)),
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => {}
            }
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(_)) => return Poll::Ready(None),
            };
            // Empty the pipe; readiness is cleared only when a read says it would block, so a
            // byte written meanwhile is never missed. Then look at the queue again.
            let mut buf = [0u8; 64];
            loop {
                match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
                    Ok(Ok(0)) => break,
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpstag_tracker::Pid;

    fn exit(pid: i32, vps: Option<u64>) -> TaggedEvent {
        let pid = Pid::new(pid).unwrap();
        TaggedEvent {
            event: Event::new(EventKind::Exit { pid, thread: pid, status: None, group_dead: Some(true) }),
            vps: vps.map(VpsId),
        }
    }

    #[test]
    fn a_full_queue_drops_counts_and_reports_the_loss_before_the_next_event() {
        let (mut slot, sub) = channel(None, 2).unwrap();
        for pid in 1..=5 {
            assert!(slot.deliver(&exit(pid, Some(1))));
        }
        assert_eq!(sub.try_recv().unwrap(), exit(1, Some(1)));
        assert_eq!(sub.try_recv().unwrap(), exit(2, Some(1)));
        assert!(sub.try_recv().is_err());
        assert!(slot.deliver(&exit(6, Some(1))));
        let lost = sub.try_recv().unwrap();
        assert_eq!(lost.event.kind, EventKind::Lost { count: Some(3), reason: LossReason::SubscriberBehind });
        assert_eq!(sub.try_recv().unwrap(), exit(6, Some(1)));
    }

    #[test]
    fn a_vps_subscription_gets_its_events_and_every_loss_only() {
        let (mut slot, sub) = channel(Some(VpsId(7)), 16).unwrap();
        slot.deliver(&exit(1, Some(7)));
        slot.deliver(&exit(2, Some(8)));
        slot.deliver(&exit(3, None));
        let lost =
            TaggedEvent { event: Event::new(EventKind::Lost { count: None, reason: LossReason::Overflow }), vps: None };
        slot.deliver(&lost);
        let got: Vec<TaggedEvent> = sub.try_iter().collect();
        assert_eq!(got, vec![exit(1, Some(7)), lost]);
    }

    #[test]
    fn the_descriptor_is_readable_while_events_wait_and_a_dropped_subscription_is_noticed() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let readable = |sub: &Subscription| {
            let mut fds = [PollFd::new(sub.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
        };
        let (mut slot, sub) = channel(None, 16).unwrap();
        assert!(!readable(&sub));
        slot.deliver(&exit(1, None));
        slot.wake();
        assert!(readable(&sub));
        assert_eq!(sub.try_iter().count(), 1);
        assert!(!readable(&sub), "taking every event clears the descriptor");
        drop(sub);
        assert!(!slot.deliver(&exit(2, None)), "a dropped subscription is removed");
    }
}
