//! The event thread, and how the backend's events change the state.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vpstag_tracker::{Event, EventKind, ExitStatus, ForkTracker, Pid, VpsId};

use super::{Shared, State};
use crate::table::Source;
use crate::tracking::TaggedEvent;
use crate::{Error, Result};
impl State {
    /// Applies everything the backend has queued.
    pub(super) fn pump(&mut self) -> Result<()> {
        if let Some(f) = &self.failed {
            return Err(Error::BackendFailed(f.clone()));
        }
        // Everything queued when this call began is read within the first (queue capacity)
        // events, since the queue is first-in first-out; stopping after that bound keeps a fork
        // storm from holding the lock forever while still answering every query with all it
        // could have seen. 100,000 is more than a 16 MiB socket buffer can hold (~820 bytes an
        // event).
        let mut budget: usize = 100_000;
        // A parent's SIGCHLD disposition is read once per drain (accounting of exits).
        self.sigchld_ignored.clear();
        while budget > 0 {
            self.buf.clear();
            match self.tracker.read_events(&mut self.buf, Some(Duration::ZERO)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return Err(Error::BackendFailed(e.to_string()));
                }
            }
            let events = std::mem::take(&mut self.buf);
            budget = budget.saturating_sub(events.len());
            for ev in &events {
                self.handle(ev)?;
            }
            self.buf = events;
        }
        self.send_batch();
        self.tracking.recheck_suspects(self.view.as_view());
        if let Some((every, last)) = self.periodic_resync {
            if last.elapsed() >= every {
                self.periodic_resync = Some((every, Instant::now()));
                self.resync()?;
            }
        }
        self.reap();
        self.flush_changes();
        Ok(())
    }

    /// Applies one event: the table, the VPS's lifecycle, the subscribers.
    fn handle(&mut self, ev: &Event) -> Result<()> {
        self.account_before(ev);
        let tagged = self.tracking.apply(ev, self.view.as_view());
        self.account_after(ev, tagged.vps);
        self.note_lifecycle(&tagged);
        if !self.subscribers.is_empty() {
            self.subscribers.retain_mut(|s| s.deliver(&tagged));
        }
        if !self.batch_subscribers.is_empty() {
            self.batch.push(tagged);
        }
        if self.tracking.resync_due {
            self.resync()?;
        }
        Ok(())
    }

    /// Resynchronises from a scan; a backend that follows only what it was told to watch (ptrace,
    /// kqueue) or keeps its own tags (eBPF) is then told to watch each process the scan added,
    /// and the scan is repeated until it adds nothing (a process may fork before it is watched).
    pub(super) fn resync(&mut self) -> Result<()> {
        let follow = !self.caps.host_wide || self.caps.holds_tags;
        for _ in 0..8 {
            let added =
                self.tracking.resync(self.view.as_view()).map_err(|e| Error::io("resynchronising from a scan", e))?;
            if !follow || added.is_empty() {
                break;
            }
            for (pid, vps) in added {
                // A process that died meanwhile, or is already followed, is fine.
                let _ = self.tracker.watch(pid, vps);
            }
        }
        self.note_lost_first_exits();
        Ok(())
    }

    /// Makes the start time of every member of `vps` exact (see [`Tracking::settle_start`]), so that
    /// identities handed out (to signal by pidfd, to `member_details`) compare exactly.
    pub(super) fn settle_starts(&mut self, vps: VpsId) {
        let approx: Vec<Pid> = self
            .tracking
            .table
            .members(vps)
            .filter(|p| self.tracking.table.get(*p).is_some_and(|e| e.start_approx))
            .collect();
        for pid in approx {
            self.tracking.settle_start(pid, self.view.as_view());
        }
    }

    /// Hands the events of this drain to the batch subscribers, one send each, and wakes the
    /// subscriptions that got events.
    pub(super) fn send_batch(&mut self) {
        for s in &mut self.subscribers {
            s.wake();
        }
        if self.batch.is_empty() {
            return;
        }
        let batch: Arc<[TaggedEvent]> = std::mem::take(&mut self.batch).into();
        self.batch_subscribers.retain(|s| s.send(Arc::clone(&batch)).is_ok());
    }

    pub(super) fn flush_changes(&mut self) {
        let orphans = self.tracking.table.take_orphaned();
        if self.journal.is_some() {
            // Orphans are roots. Their identities are compared exactly after a restart: settle
            // start times estimated from events first.
            for e in &orphans {
                self.tracking.settle_start(e.id.pid, self.view.as_view());
                let id = self.tracking.table.get(e.id.pid).map_or(e.id, |now| now.id);
                self.journal_root(id, e.vps, Source::Event);
            }
            if !self.journal_pending.is_empty() {
                let entries = std::mem::take(&mut self.journal_pending);
                if let Some(journal) = &mut self.journal {
                    journal(&entries);
                }
            }
        }
        if let Some(obs) = &mut self.observer {
            let changes = self.tracking.table.take_changes();
            if !changes.is_empty() {
                obs(&changes);
            }
        }
    }

    /// Follows the first process and the command of each VPS.
    pub(super) fn note_lifecycle(&mut self, t: &TaggedEvent) {
        let Some(vps) = t.vps else { return };
        let Some(rec) = self.vpses.get_mut(&vps) else { return };
        match t.event.kind {
            EventKind::Fork { parent, child, thread: false, .. }
                if parent == rec.first.pid && rec.command.is_none() && child != rec.first.pid =>
            {
                rec.command = Some(child);
            }
            EventKind::Exit { pid, thread, status, group_dead } if thread == pid || group_dead == Some(true) => {
                if Some(pid) == rec.command {
                    rec.command_exit = status.or(rec.command_exit);
                }
                if pid == rec.first.pid && !rec.first_gone {
                    rec.first_exit = status;
                    rec.first_gone = true;
                    // It is dead: waiting for it cannot take a ptrace stop from a backend that
                    // follows it, and if such a backend reaped it already, waitpid says ECHILD.
                    self.to_reap.push(pid);
                }
            }
            _ => {}
        }
    }

    /// Reaps first processes (our children) that have exited, unless the backend reaps.
    pub(super) fn reap(&mut self) {
        let mut reaped = Vec::new();
        let spawning = &self.spawning;
        let view = &mut self.view;
        self.to_reap.retain(|pid| {
            if spawning.contains(pid) {
                return true;
            }
            match view.try_reap(*pid) {
                Ok(None) => true,
                Ok(Some(r)) => {
                    reaped.push((*pid, r));
                    false
                }
                Err(_) => false,
            }
        });
        // Where the exit event itself was lost, or the backend does not follow the first process
        // (ptrace), the status comes from waitpid; a first process the table still has leaves it
        // by an exit event made from that status, as a backend would have reported it.
        for (pid, r) in reaped {
            let status = ExitStatus::from_wait_status(r.status);
            let first = self.vpses.values().find(|r| r.first.pid == pid).map(|r| (r.vps.id, r.first));
            if let Some((vps, first)) = first {
                self.account_reaped(vps, pid, &r);
                let tol = self.view.start_tolerance();
                if self.tracking.table.get(pid).is_some_and(|e| e.same_start(first.start, tol)) {
                    let exit = EventKind::Exit { pid, thread: pid, status, group_dead: Some(true) };
                    let mut ev = Event::new(exit);
                    ev.time_ns = Some(self.view.now_ns());
                    let _ = self.handle(&ev);
                }
            }
            for rec in self.vpses.values_mut().filter(|r| r.first.pid == pid) {
                if rec.first_exit.is_none() {
                    rec.first_exit = status;
                }
                rec.first_gone = true;
            }
        }
        self.send_batch();
    }

    /// After a resync: a first process whose exit event was lost is gone from the table; mark it
    /// gone (so `wait` returns) and reap it.
    pub(super) fn note_lost_first_exits(&mut self) {
        let tol = self.view.start_tolerance();
        for rec in self.vpses.values_mut().filter(|r| !r.first_gone) {
            let in_table = self.tracking.table.get(rec.first.pid).is_some_and(|e| e.same_start(rec.first.start, tol));
            if !in_table {
                rec.first_gone = true;
                self.to_reap.push(rec.first.pid);
            }
        }
    }
}

/// Under load the pump drains the backend at most this often, so that a fork storm costs one
/// wake-up of the pump (and one hand-off to batch subscribers and the change observer) per batch
/// instead of one per event. An event after a quiet spell is drained at once. Queries drain
/// synchronously before answering, so this delays no answer.
const PUMP_INTERVAL: Duration = Duration::from_millis(5);

pub(super) fn pump_loop(shared: &Shared, fd: &OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut last_drain = Instant::now();
    // Whether the last drain found events: then more are likely, and a backend that wakes its
    // reader at most once per interval (eBPF) may hold the tail of a burst without a wake-up, so
    // look again after one interval instead of waiting for the next wake-up.
    let mut flowing = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let busy = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.tracking.has_suspects() || !st.to_reap.is_empty()
        };
        let ms: u16 = if flowing {
            PUMP_INTERVAL.as_millis() as u16
        } else if busy {
            20
        } else {
            100
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let since = last_drain.elapsed();
        if since < PUMP_INTERVAL {
            std::thread::sleep(PUMP_INTERVAL - since);
        }
        last_drain = Instant::now();
        let failed = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let before = st.tracking.stats.events;
            let failed = st.failed.is_some() || st.pump().is_err();
            flowing = st.tracking.stats.events != before;
            failed
        };
        if failed {
            // Queries report the failure; don't spin on a descriptor nobody drains.
            std::thread::sleep(Duration::from_millis(100));
        }
        shared.changed.notify_all();
    }
}
