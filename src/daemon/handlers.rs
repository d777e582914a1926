//! One handler per operation, with authorisation.

use super::*;

impl Daemon {
    pub(super) fn meta(&self) -> MutexGuard<'_, HashMap<u64, VpsMeta>> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn owner(&self, id: u64) -> Option<u32> {
        self.meta().get(&id).map(|m| m.owner)
    }

    pub(super) fn visible(&self, peer: Peer, id: u64) -> bool {
        peer.uid == 0 || self.owner(id) == Some(peer.uid)
    }

    /// The VPS `name`, if `peer` may act on it.
    pub(super) fn lookup(&self, peer: Peer, name: &str, what: &str) -> Result<Vps, Refusal> {
        let vps = self.mgr.vps(name)?;
        if !self.visible(peer, vps.id.0) {
            let owner = self.owner(vps.id.0).map_or("another user".to_string(), |u| format!("uid {u}"));
            return Err(refuse(
                "permission_denied",
                format!(
                    "VPS {name:?} belongs to {owner}; only its owner or root may {what} it (you are uid {})",
                    peer.uid
                ),
            ));
        }
        Ok(vps)
    }

    pub(super) fn journal(&self, records: &[Record]) -> Result<(), Refusal> {
        let mut st = self.store.lock().unwrap_or_else(|e| e.into_inner());
        st.append(records).map_err(|e| {
            log!("cannot write the journal in {}: {e}", st.dir().display());
            refuse("failed", format!("cannot write the journal: {e}"))
        })
    }

    pub(super) fn compact(&self) -> io::Result<()> {
        let dir = {
            let mut st = self.store.lock().unwrap_or_else(|e| e.into_inner());
            st.rotate()?;
            st.dir().to_path_buf()
        };
        let (vpses, members) = self.mgr.export().map_err(|e| io::Error::other(e.to_string()))?;
        let owned: Vec<OwnedVps> = {
            let meta = self.meta();
            vpses
                .into_iter()
                .filter_map(|v| meta.get(&v.id).map(|m| m.owner).map(|owner| OwnedVps { vps: v, owner }))
                .collect()
        };
        Store::write_snapshot(&dir, owned, members)
    }

    pub(super) fn handle(&self, peer: Peer, op: Op) -> Result<Vec<u8>, Refusal> {
        match op {
            Op::Hello => Ok(ok_line(json!({
                "version": PROTOCOL_VERSION,
                "daemon_pid": std::process::id(),
                "backend": self.backend,
                "uid": peer.uid,
            }))),
            Op::RegisterFirst { name } => {
                let pid = Pid::new(peer.pid).ok_or_else(|| refuse("bad_request", "the peer has no pid"))?;
                let info = crate::sys::process(pid)
                    .map_err(|e| refuse("failed", format!("reading process {pid}: {e}")))?
                    .ok_or_else(|| refuse("no_such_process", format!("process {pid} is gone")))?;
                let vps = self.mgr.register_first(&name, pid)?;
                let saved = SavedVps {
                    id: vps.id.0,
                    name: vps.name.clone(),
                    first_pid: pid.as_raw(),
                    first_start: info.id.start.0,
                    started: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                };
                self.meta().insert(vps.id.0, VpsMeta { name: vps.name.clone(), owner: peer.uid });
                if let Err(e) = self.journal(&[Record::Vps { vps: saved, owner: peer.uid }]) {
                    let _ = self.mgr.forget(&vps);
                    self.meta().remove(&vps.id.0);
                    return Err(e);
                }
                log!("VPS {:?} (id {}) started by uid {}: first process {pid}", vps.name, vps.id, peer.uid);
                Ok(ok_line(json!({ "vps": vps })))
            }
            Op::Join { name } => {
                let vps = self.lookup(peer, &name, "join")?;
                let pid = Pid::new(peer.pid).ok_or_else(|| refuse("bad_request", "the peer has no pid"))?;
                let vps = self.mgr.join(&vps.name, pid)?;
                log!("process {pid} (uid {}) joined VPS {:?}", peer.uid, vps.name);
                Ok(ok_line(json!({ "vps": vps })))
            }
            Op::Which { pid } => {
                let pid = Pid::new(pid).ok_or_else(|| refuse("bad_request", format!("not a process id: {pid}")))?;
                match self.mgr.vps_of(pid)? {
                    None => Ok(ok_line(json!({ "vps": null }))),
                    Some(v) if self.visible(peer, v.id.0) => Ok(ok_line(json!({ "vps": v.name }))),
                    Some(_) => {
                        Err(refuse("permission_denied", format!("process {pid} belongs to a VPS of another user")))
                    }
                }
            }
            Op::Members { name } => {
                let vps = self.lookup(peer, &name, "see")?;
                let pids: Vec<i32> = self.mgr.members(&vps)?.into_iter().map(Pid::as_raw).collect();
                Ok(ok_line(json!({ "pids": pids })))
            }
            Op::Ps { name } => {
                let vpses: Vec<Vps> = match name {
                    Some(n) => vec![self.lookup(peer, &n, "see")?],
                    None => {
                        self.mgr.list()?.into_iter().map(|s| s.vps).filter(|v| self.visible(peer, v.id.0)).collect()
                    }
                };
                let mut out = Vec::new();
                for vps in vpses {
                    let members = match self.mgr.member_details(&vps) {
                        Ok(m) => m,
                        Err(Error::UnknownVps(_)) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    for m in members {
                        let Ok(Some(info)) = crate::sys::process(m.id.pid) else { continue };
                        if info.id.start != m.id.start {
                            continue;
                        }
                        out.push(ProcessInfo {
                            pid: m.id.pid.as_raw(),
                            ppid: info.ppid.map_or(0, Pid::as_raw),
                            vps: vps.name.clone(),
                            cmd: crate::sys::cmdline(m.id.pid).unwrap_or_else(|| format!("[{}]", info.name)),
                            uid: info.uid,
                            source: serde_json::to_value(m.source)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            start: m.id.start.0,
                        });
                    }
                }
                out.sort_by_key(|p| p.pid);
                Ok(ok_line(json!({ "processes": out })))
            }
            Op::List => {
                let mut out = Vec::new();
                for s in self.mgr.list()? {
                    let id = s.vps.id.0;
                    if !self.visible(peer, id) {
                        continue;
                    }
                    let (mut cpu, mut rss) = (0, 0);
                    for pid in self.mgr.members(&s.vps).unwrap_or_default() {
                        let (c, r) = usage(pid);
                        cpu += c;
                        rss += r;
                    }
                    out.push(VpsInfo {
                        id,
                        name: s.vps.name.clone(),
                        owner: self.owner(id).unwrap_or(0),
                        first: s.vps.first.as_raw(),
                        first_alive: s.first_alive,
                        members: s.members,
                        started: s.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                        cpu_ms: cpu,
                        rss_bytes: rss,
                    });
                }
                Ok(ok_line(json!({ "vpses": out })))
            }
            Op::Kill { name, signal } => {
                let vps = self.lookup(peer, &name, "signal")?;
                let sig: Signal = signal.as_deref().unwrap_or("TERM").parse()?;
                let n = self.signal_all(peer, &vps, sig, Duration::from_secs(10))?;
                log!("uid {} sent {sig} to {n} processes of VPS {:?}", peer.uid, vps.name);
                Ok(ok_line(json!({ "signalled": n })))
            }
            Op::Stop { name, grace_ms } => {
                let vps = self.lookup(peer, &name, "stop")?;
                let grace = Duration::from_millis(grace_ms.unwrap_or(5000).min(600_000));
                let mut n = 0;
                if !self.mgr.members(&vps)?.is_empty() {
                    n = self.signal_all(peer, &vps, Signal::TERM, grace)?;
                    if !self.mgr.wait_empty(&vps, Some(grace))? {
                        n += self.signal_all(peer, &vps, Signal::KILL, Duration::from_secs(10))?;
                    }
                }
                self.mgr.forget(&vps)?;
                self.meta().remove(&vps.id.0);
                self.journal(&[Record::Forget { id: vps.id.0 }])?;
                log!("VPS {:?} stopped by uid {} ({n} processes signalled) and forgotten", vps.name, peer.uid);
                Ok(ok_line(json!({ "signalled": n })))
            }
            Op::Events { name, .. } => {
                let only = match name {
                    Some(n) => Some(self.lookup(peer, &n, "see")?.id.0),
                    None => None,
                };
                let recent: Vec<EventInfo> = self
                    .recent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(id, _)| only.map_or(true, |o| o == *id) && self.visible(peer, *id))
                    .map(|(_, e)| e.clone())
                    .collect();
                Ok(ok_line(json!({ "events": recent })))
            }
            Op::Check => {
                let mut report = self.mgr.check()?;
                if peer.uid != 0 {
                    let mine: HashSet<String> =
                        self.meta().values().filter(|m| m.owner == peer.uid).map(|m| m.name.clone()).collect();
                    report.divergences.retain(|d| match d {
                        crate::Divergence::Missing { expected, .. } => mine.contains(expected),
                        crate::Divergence::Extra { vps, .. } => mine.contains(vps),
                        crate::Divergence::WrongTag { vps, expected, .. } => {
                            mine.contains(vps) || mine.contains(expected)
                        }
                    });
                }
                Ok(ok_line(report))
            }
        }
    }

    /// Sends `sig` to every member of `vps` that `peer` may signal, without racing new forks:
    /// SIGKILL again and again until no member is left; any other signal to each member once,
    /// then to every member born meanwhile, until a pass finds none new.
    pub(super) fn signal_all(&self, peer: Peer, vps: &Vps, sig: Signal, timeout: Duration) -> Result<usize, Refusal> {
        let deadline = Instant::now() + timeout;
        let send = |pid: Pid| {
            // SAFETY: kill with integer arguments.
            unsafe { libc::kill(pid.as_raw(), sig.as_raw()) == 0 }
        };
        let mut done: HashSet<Pid> = HashSet::new();
        loop {
            let members = self.mgr.members(vps)?;
            let (allowed, denied): (Vec<Pid>, Vec<Pid>) = members.iter().partition(|p| may_signal(peer.uid, **p));
            let targets: Vec<Pid> =
                if sig == Signal::KILL { allowed } else { allowed.into_iter().filter(|p| !done.contains(p)).collect() };
            if targets.is_empty() {
                if sig == Signal::KILL && !denied.is_empty() {
                    return Err(refuse(
                        "permission_denied",
                        format!(
                            "{} processes of VPS {:?} run as another user and were not killed: {denied:?}",
                            denied.len(),
                            vps.name
                        ),
                    ));
                }
                return Ok(done.len());
            }
            for p in targets {
                if send(p) {
                    done.insert(p);
                }
            }
            if Instant::now() >= deadline {
                let left = self.mgr.members(vps)?;
                if sig != Signal::KILL || left.is_empty() {
                    return Ok(done.len());
                }
                return Err(refuse(
                    "timeout",
                    format!("{} processes of VPS {:?} still alive after SIGKILL: {left:?}", left.len(), vps.name),
                ));
            }
            if sig == Signal::KILL {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
