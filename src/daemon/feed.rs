//! The event feed: the recent-events ring and the followers of `vpstag events --follow`.

use super::*;

pub(super) fn event_info(ev: &crate::TaggedEvent, name: &str) -> Option<EventInfo> {
    let base = |event: &str, pid: Pid| EventInfo {
        event: event.into(),
        vps: name.into(),
        pid: pid.as_raw(),
        parent: None,
        cmd: None,
        code: None,
        signal: None,
        time_ns: ev.event.time_ns,
    };
    match ev.event.kind {
        EventKind::Fork { thread: true, .. } => None,
        EventKind::Fork { parent, child, .. } => {
            Some(EventInfo { parent: Some(parent.as_raw()), ..base("fork", child) })
        }
        EventKind::Exec { pid, .. } => Some(EventInfo { cmd: crate::sys::cmdline(pid), ..base("exec", pid) }),
        EventKind::Exit { pid, thread, .. } if pid != thread => None,
        EventKind::Exit { pid, status, .. } => Some(EventInfo {
            code: status.and_then(|s| match s {
                ExitStatus::Exited(c) => Some(c),
                _ => None,
            }),
            signal: status.and_then(|s| match s {
                ExitStatus::Signaled { signal, .. } => Some(signal),
                _ => None,
            }),
            ..base("exit", pid)
        }),
        EventKind::Lost { .. } => None,
    }
}

impl Daemon {
    /// Records every tagged event: the recent ring and the followers. Takes whole batches from the
    /// manager (one hand-off per drain), and takes each lock once per batch.
    pub(super) fn record_events(self: &Arc<Daemon>, rx: mpsc::Receiver<Arc<[crate::TaggedEvent]>>) {
        while !self.stop.load(Ordering::SeqCst) {
            let batch = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let infos: Vec<(u64, EventInfo)> = {
                let meta = self.meta();
                batch
                    .iter()
                    .filter_map(|t| {
                        let id = t.vps?;
                        let name = match meta.get(&id.0) {
                            Some(m) => m.name.clone(),
                            None => self.mgr.name_of(id)?,
                        };
                        event_info(t, &name).map(|info| (id.0, info))
                    })
                    .collect()
            };
            if infos.is_empty() {
                continue;
            }
            {
                let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
                for item in &infos {
                    if r.len() >= RECENT_EVENTS {
                        r.pop_front();
                    }
                    r.push_back(item.clone());
                }
            }
            let mut f = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            for item in &infos {
                f.retain(|tx| match tx.try_send(item.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
                });
            }
        }
    }

    pub(super) fn follow(&self, peer: Peer, only: Option<u64>, stream: &UnixStream) {
        let (tx, rx) = mpsc::sync_channel(FOLLOWER_QUEUE);
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        while !self.stop.load(Ordering::SeqCst) {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok((id, info)) => {
                    if only.is_some_and(|o| o != id) || !self.visible(peer, id) {
                        continue;
                    }
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
                            "lagging",
                            format!("this follower fell {FOLLOWER_QUEUE} events behind and was cut off; reconnect"),
                        )),
                        Duration::from_secs(10),
                    );
                    return;
                }
            }
        }
    }
}
