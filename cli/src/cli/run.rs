//! `vpstag run NAME -- CMD`: one VPS in the foreground.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vpstag::protocol::EventInfo;
use vpstag::{EventKind, ExitStatus, Manager, Pid, Signal, TaggedEvent, Vps};

use super::RunArgs;

enum Sink {
    Text,
    /// JSON lines to a file, or to standard output (`--json-events -`).
    Json(BufWriter<Box<dyn Write>>),
    Quiet,
}

struct Printer {
    sink: Sink,
    vps: Vps,
    /// The `seq` of the last event shown (this run numbers its own events from 1).
    seq: u64,
}

/// The event `t` as `vpstag run` shows it for `vps`, in the schema of `vpstag events`: `None` for
/// another VPS's events and for threads. A loss report belongs to no VPS but is shown (as a
/// `lost` event of `vps`): events of this VPS may be missing.
fn shown_event(t: &TaggedEvent, vps: &Vps, cmd: impl FnOnce(Pid) -> Option<String>) -> Option<EventInfo> {
    let lost = matches!(t.event.kind, EventKind::Lost { .. });
    if !lost && t.vps != Some(vps.id) {
        return None;
    }
    EventInfo::from_event(t, &vps.name, cmd)
}

impl Printer {
    fn show(&mut self, t: &TaggedEvent) {
        if matches!(self.sink, Sink::Quiet) {
            return;
        }
        let Some(mut info) = shown_event(t, &self.vps, vpstag::process::cmdline) else { return };
        self.seq += 1;
        info.seq = self.seq;
        match &mut self.sink {
            Sink::Text => eprintln!("{}", super::ctl::event_text(&info)),
            Sink::Json(w) => {
                if serde_json::to_writer(&mut *w, &info).is_ok() {
                    let _ = w.write_all(b"\n");
                }
            }
            Sink::Quiet => {}
        }
    }

    fn drain(&mut self, rx: &vpstag::Subscription, wait: Duration) {
        match rx.recv_timeout(wait) {
            Ok(t) => self.show(&t),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(t) = rx.try_recv() {
            self.show(&t);
        }
        if let Sink::Json(w) = &mut self.sink {
            let _ = w.flush();
        }
    }
}

/// Signals that arrived (SIGINT, SIGTERM, SIGHUP), to pass on to the whole VPS.
struct Signals {
    pending: Arc<AtomicUsize>,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        let pending = Arc::new(AtomicUsize::new(0));
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            signal_hook::flag::register_usize(sig, Arc::clone(&pending), sig as usize)?;
        }
        Ok(Signals { pending })
    }

    fn take(&self) -> Option<Signal> {
        match self.pending.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Signal::from_raw(n as i32),
        }
    }
}

fn reap_orphans() {
    loop {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

pub(crate) fn run(a: RunArgs) -> vpstag::Result<i32> {
    let choice = a.backend;
    let (tracker, notes) = vpstag::open_backend_with_notes(choice)?;
    for n in &notes {
        eprintln!("vpstag: {n}");
    }
    if choice == vpstag::BackendChoice::Auto {
        eprintln!("vpstag: using the {} backend", tracker.kind());
    }
    // Orphans of the VPS whose first process has exited come to us rather than to the system's
    // init, so their parent links stay inside this run.
    let _ = vpstag::process::become_subreaper();
    let mgr = Manager::new(tracker)?;
    let reaps_itself = mgr.capabilities().reaps;
    let signals = Signals::install().map_err(|e| vpstag::Error::io("installing signal handlers", e))?;
    let rx = mgr.subscribe()?;
    let mut cmd = Command::new(&a.cmd[0]);
    cmd.args(&a.cmd[1..]);
    let limits = a.limits.limits();
    let vps = if limits.is_empty() {
        mgr.start(&a.name, &mut cmd)?
    } else {
        mgr.spawn_limited(&a.name, &mut cmd, &limits)?.vps
    };
    let sink = match (&a.json_events, a.quiet) {
        (Some(path), _) if path.as_os_str() == "-" => Sink::Json(BufWriter::new(Box::new(std::io::stdout()))),
        (Some(path), _) => Sink::Json(BufWriter::new(Box::new(
            File::create(path).map_err(|e| vpstag::Error::io(format!("creating {}", path.display()), e))?,
        ))),
        (None, true) => Sink::Quiet,
        (None, false) => Sink::Text,
    };
    let mut out = Printer { sink, vps: vps.clone(), seq: 0 };
    let tick = |out: &mut Printer| -> vpstag::Result<()> {
        out.drain(&rx, Duration::from_millis(50));
        if let Some(sig) = signals.take() {
            let n = mgr.signal(&vps, sig)?;
            eprintln!("vpstag: got {sig}; sent it to the {n} processes of VPS {:?}", vps.name);
        }
        if !reaps_itself {
            reap_orphans();
        }
        Ok(())
    };
    while mgr.is_running(&vps)? {
        tick(&mut out)?;
    }
    let status = mgr.wait(&vps, Some(Duration::ZERO))?;
    tick(&mut out)?;
    let left: Vec<Pid> = mgr.members(&vps)?;
    if !left.is_empty() {
        if a.wait_all {
            eprintln!(
                "vpstag: {} exited; waiting for the {} remaining processes of VPS {:?}",
                a.name,
                left.len(),
                vps.name
            );
            while !mgr.members(&vps)?.is_empty() {
                tick(&mut out)?;
            }
        } else {
            eprintln!(
                "vpstag: the command exited but {} processes of VPS {:?} are still running: {:?}; sending SIGTERM (SIGKILL after {}s)",
                left.len(),
                vps.name,
                left.iter().map(|p| p.as_raw()).collect::<Vec<_>>(),
                a.grace
            );
            mgr.signal(&vps, Signal::TERM)?;
            let deadline = Instant::now() + Duration::from_secs_f64(a.grace.max(0.0));
            while Instant::now() < deadline && !mgr.members(&vps)?.is_empty() {
                tick(&mut out)?;
            }
            if !mgr.members(&vps)?.is_empty() {
                mgr.kill_all(&vps, Duration::from_secs(10))?;
            }
        }
    }
    tick(&mut out)?;
    let stats = mgr.stats();
    if stats.loss_reports > 0 {
        eprintln!(
            "vpstag: the backend lost events {} times ({} counted); the table was resynchronised {} times",
            stats.loss_reports, stats.lost_events, stats.resyncs
        );
    }
    Ok(status.map_or(0, ExitStatus::shell_code))
}

#[cfg(test)]
mod tests {
    use vpstag::{Event, LossReason, VpsId};

    use super::*;

    fn vps() -> Vps {
        Vps { id: VpsId(7), name: "demo".into(), first: Pid::new(100).unwrap() }
    }

    #[test]
    fn a_loss_is_shown_as_a_lost_event_of_the_vps_and_other_vpses_events_are_not() {
        let lost = TaggedEvent {
            event: Event::new(EventKind::Lost { count: Some(5), reason: LossReason::Overflow }),
            vps: None,
        };
        let info = shown_event(&lost, &vps(), |_| None).expect("a loss is shown");
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"event":"lost","vps":"demo","pid":0,"count":5}"#,
            "the JSON line of --json-events"
        );
        assert_eq!(
            super::super::ctl::event_text(&info),
            "[demo] lost 5 events (the table was repaired from a scan, but events are missing here)"
        );
        let (p, c) = (Pid::new(100).unwrap(), Pid::new(101).unwrap());
        let fork = |vps| TaggedEvent {
            event: Event::new(EventKind::Fork {
                parent: p,
                child: c,
                child_thread: c,
                thread: false,
                child_start: None,
            }),
            vps,
        };
        let f = shown_event(&fork(Some(VpsId(7))), &vps(), |_| None).expect("a member's fork");
        assert_eq!((f.pid.map(Pid::as_raw), f.vps_id), (Some(101), Some(VpsId(7))));
        assert!(shown_event(&fork(Some(VpsId(8))), &vps(), |_| None).is_none(), "another VPS's fork");
        assert!(shown_event(&fork(None), &vps(), |_| None).is_none(), "an untagged fork");
    }
}
