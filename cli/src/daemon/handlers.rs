//! One handler per operation, with authorisation, each returning its typed reply.

use super::*;

/// A VPS as replies name it.
fn vps_ref(v: Vps) -> VpsRef {
    VpsRef { id: v.id, name: v.name, first: v.first }
}

/// The manager's name for VPS `name` of user `owner`: names are per owner.
pub(super) fn key(owner: u32, name: &str) -> String {
    format!("{owner}:{name}")
}

/// A VPS the user does not own may be many; one user may start at most this many (root: any).
pub(super) const MAX_VPSES_PER_USER: usize = 64;

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

    /// `vps` with the name its owner gave it (the manager knows it by its [`key`]).
    pub(super) fn shown(&self, mut vps: Vps) -> Vps {
        if let Some(m) = self.meta().get(&vps.id.0) {
            vps.name = m.name.clone();
        }
        vps
    }

    /// A manager key (`uid:name`) as `peer` should see it: the bare name for its own VPSes (and for
    /// root's, to root), `uid:name` for another user's.
    pub(super) fn shown_key(&self, peer: Peer, key: &str) -> String {
        match key.split_once(':') {
            Some((uid, name)) if uid == peer.uid.to_string() => name.to_string(),
            _ => key.to_string(),
        }
    }

    /// The VPS `name` means to `peer`, if `peer` may `what` it. Names are per owner: a bare name
    /// is the caller's own VPS; `uid:name` names another user's (root only). Root's bare name falls
    /// back to the one VPS of that name of any user, except to join it (`vpstag exec`), so that
    /// root's tools never run inside a VPS another user named like theirs.
    pub(super) fn lookup(&self, peer: Peer, name: &str, what: &str) -> Result<Vps, Refusal> {
        let (owner, bare) = match name.split_once(':') {
            Some((uid, bare)) => {
                let uid: u32 = uid.parse().map_err(|_| {
                    refuse(ErrorKind::InvalidName, format!("{name:?}: say NAME, or UID:NAME with a numeric uid"))
                })?;
                (uid, bare)
            }
            None => (peer.uid, name),
        };
        if owner != peer.uid && peer.uid != 0 {
            return Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "VPS {name:?} belongs to uid {owner}; only its owner or root may {what} it (you are uid {})",
                    peer.uid
                ),
            ));
        }
        if let Ok(vps) = self.mgr.vps(&key(owner, bare)) {
            return Ok(self.shown(vps));
        }
        if name != bare {
            return Err(Error::UnknownVps(name.to_string()).into());
        }
        let others: Vec<(u64, u32)> = {
            let meta = self.meta();
            meta.iter().filter(|(_, m)| m.name == bare && m.owner != owner).map(|(id, m)| (*id, m.owner)).collect()
        };
        let running: Vec<(Vps, u32)> = others
            .into_iter()
            .filter_map(|(id, o)| self.mgr.vps(&key(o, bare)).ok().filter(|v| v.id.0 == id).map(|v| (v, o)))
            .collect();
        match running.as_slice() {
            [] => Err(Error::UnknownVps(bare.to_string()).into()),
            _ if peer.uid != 0 => Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "VPS {bare:?} belongs to another user; only its owner or root may {what} it (you are uid {})",
                    peer.uid
                ),
            )),
            [(vps, _)] if what != "join" && name == bare => Ok(self.shown(vps.clone())),
            _ => {
                let names: Vec<String> = running.iter().map(|(_, o)| format!("{o}:{bare}")).collect();
                Err(refuse(
                    ErrorKind::UnknownVps,
                    format!("you have no VPS named {bare:?}; other users do: say {}", names.join(" or ")),
                ))
            }
        }
    }

    /// The process that opened this connection, checked: it still runs (so its pid is still its
    /// own: see [`Peer::state`](vpstag::process::Peer::state)) and runs as the user that connected. Only a verified
    /// peer is registered or joined anywhere.
    pub(super) fn verified_peer(
        &self,
        peer: Peer,
        who: &vpstag::process::Peer,
    ) -> Result<vpstag::process::ProcessInfo, Refusal> {
        match who.state() {
            vpstag::process::PeerState::Alive(info) if info.uid == peer.uid => Ok(info),
            vpstag::process::PeerState::Alive(info) => Err(refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "process {} runs as uid {} but connected as uid {}; it is not registered",
                    info.id.pid, info.uid, peer.uid
                ),
            )),
            vpstag::process::PeerState::Gone => Err(refuse(
                ErrorKind::NoSuchProcess,
                format!(
                    "the process that opened this connection (pid {}) has exited; its pid may be another \
                     process's now, so nothing is registered",
                    who.pid()
                ),
            )),
            _ => Err(refuse(
                ErrorKind::Unverifiable,
                format!(
                    "cannot verify that pid {} is still the process that connected (this kernel has no \
                     SO_PEERPIDFD and its start time could not be read); reconnect and try again",
                    who.pid()
                ),
            )),
        }
    }

    /// Refuses to register or join `pid` when it is a member of another VPS (`into`: the VPS it
    /// joins, which it may already be in): a VPS started or joined from inside another would take
    /// its processes out of that VPS's reach (its `stop`, `kill` and accounting).
    pub(super) fn refuse_nested(&self, pid: Pid, into: Option<&Vps>) -> Result<(), Refusal> {
        match self.mgr.vps_of(pid)? {
            None => Ok(()),
            Some(v) if into.is_some_and(|i| i.id == v.id) => Ok(()),
            Some(v) => {
                let v = self.shown(v);
                Err(refuse(
                    ErrorKind::Nested,
                    format!(
                        "process {pid} is a member of VPS {:?}; a VPS cannot be started or joined from inside \
                         another (its processes would escape {:?}'s stop, kill and accounting): run it from \
                         outside",
                        v.name, v.name
                    ),
                ))
            }
        }
    }

    /// Returns once what the manager has journaled so far is durable: a request that changed
    /// the state answers only then (the manager writes the journal, through its hook).
    pub(super) fn durable(&self) -> Result<(), Refusal> {
        self.store.sync().map_err(|e| {
            log!("cannot write the journal in {}: {e}", self.store.dir().display());
            refuse(ErrorKind::Failed, format!("cannot write the journal: {e}"))
        })
    }

    pub(super) fn compact(&self) -> io::Result<()> {
        self.store.rotate()?;
        let (vpses, members) = self.mgr.export().map_err(|e| io::Error::other(e.to_string()))?;
        let owned: Vec<OwnedVps> = {
            let meta = self.meta();
            vpses
                .into_iter()
                .filter_map(|v| meta.get(&v.id.0).map(|m| m.owner).map(|owner| OwnedVps { vps: v, owner }))
                .collect()
        };
        // The roots: first processes, loader joins, and orphans still alive (the others go).
        let members: Vec<vpstag::SavedMember> = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            let live: HashSet<vpstag::ProcessId> =
                members.iter().map(|m| vpstag::ProcessId { pid: m.pid, start: m.start }).collect();
            orphans.retain(|id| live.contains(id));
            members
                .into_iter()
                .filter(|m| {
                    matches!(m.source, vpstag::Source::First | vpstag::Source::Loader)
                        || orphans.contains(&vpstag::ProcessId { pid: m.pid, start: m.start })
                })
                .collect()
        };
        self.store.write_snapshot(owned, members)
    }

    /// Answers one request: authorisation and the work are in the operation's own handler,
    /// which returns its typed reply (`vpstag::protocol`); this only dispatches and frames.
    pub(super) fn handle(&self, peer: Peer, who: &vpstag::process::Peer, op: Op) -> Result<Vec<u8>, Refusal> {
        Ok(match op {
            Op::Hello => ok_line(Hello {
                version: PROTOCOL_VERSION,
                daemon_pid: self.pid,
                backend: self.backend.clone(),
                uid: peer.uid,
            }),
            Op::RegisterFirst { name, limits } => ok_line(self.register_first(name, limits, peer, who)?),
            Op::Join { name } => ok_line(self.join(name, peer, who)?),
            Op::Which { pid } => ok_line(self.which(pid, peer)?),
            Op::Members { name } => ok_line(self.members(name, peer)?),
            Op::Ps { name } => ok_line(self.ps(name, peer)?),
            Op::List => ok_line(self.list(peer)?),
            Op::Kill { name, signal } => ok_line(self.kill(name, signal, peer)?),
            Op::Stop { name, grace_ms } => ok_line(self.stop(name, grace_ms, peer)?),
            Op::Events { name, after, .. } => ok_line(self.events(name, after, peer)?),
            Op::Check => ok_line(self.check(peer)?),
            _ => return Err(refuse(ErrorKind::BadRequest, "this daemon does not serve that operation")),
        })
    }

    /// Starts a VPS: registers the caller, held at its start gate, as the first process of a new
    /// VPS `name` of its user.
    fn register_first(
        &self,
        name: String,
        limits: Option<vpstag::cgroup::Limits>,
        peer: Peer,
        who: &vpstag::process::Peer,
    ) -> Result<VpsReply, Refusal> {
        Manager::validate_name(&name)?;
        let limits = limits.filter(|l| !l.is_empty());
        if limits.is_some() && self.no_cgroups {
            return Err(refuse(
                ErrorKind::LimitRefused,
                "this daemon runs with `--cgroup-root none`: it applies no resource limits",
            ));
        }
        let info = self.verified_peer(peer, who)?;
        let pid = info.id.pid;
        self.refuse_nested(pid, None)?;
        if peer.uid != 0 {
            let mine = self.meta().values().filter(|m| m.owner == peer.uid).count();
            if mine >= MAX_VPSES_PER_USER {
                return Err(refuse(
                    ErrorKind::Quota,
                    format!(
                        "uid {} has {mine} VPSes, the most one user may have ({MAX_VPSES_PER_USER}); stop one \
                         first (`vpstag list`, `vpstag stop NAME`)",
                        peer.uid
                    ),
                ));
            }
        }
        let vps = self.mgr.register_first_limited(&key(peer.uid, &name), pid, limits.as_ref())?;
        // The peer may have exited between the check and the registration (and its pid
        // been reused): then nothing stays registered.
        if !matches!(who.state(), vpstag::process::PeerState::Alive(_)) {
            let _ = self.mgr.forget(&vps);
            return Err(refuse(ErrorKind::NoSuchProcess, format!("process {pid} exited while registering")));
        }
        self.meta().insert(vps.id.0, VpsMeta { name: name.clone(), owner: peer.uid });
        if let Err(e) = self.durable() {
            let _ = self.mgr.forget(&vps);
            self.meta().remove(&vps.id.0);
            return Err(e);
        }
        log!("VPS {name:?} (id {}) started by uid {}: first process {pid}", vps.id, peer.uid);
        Ok(VpsReply { vps: vps_ref(self.shown(vps)) })
    }

    /// The loader: the caller joins the VPS `name`.
    fn join(&self, name: String, peer: Peer, who: &vpstag::process::Peer) -> Result<VpsReply, Refusal> {
        let vps = self.lookup(peer, &name, "join")?;
        let info = self.verified_peer(peer, who)?;
        let pid = info.id.pid;
        self.refuse_nested(pid, Some(&vps))?;
        // By id: the name may have been stopped and reused since it was looked up. The
        // manager journals the process as a root (what it starts is rebuilt from it
        // after a restart).
        let vps = self.mgr.join_vps(&vps, pid)?;
        if !matches!(who.state(), vpstag::process::PeerState::Alive(_)) {
            return Err(refuse(ErrorKind::NoSuchProcess, format!("process {pid} exited while joining")));
        }
        self.durable()?;
        let vps = self.shown(vps);
        log!(
            "process {pid} (real uid {}, connected as uid {}) joined VPS {:?} (id {})",
            info.uid,
            peer.uid,
            vps.name,
            vps.id
        );
        Ok(VpsReply { vps: vps_ref(vps) })
    }

    /// The VPS of `pid` (a thread id stands for its process), if the caller may see it.
    fn which(&self, pid: Pid, peer: Peer) -> Result<WhichReply, Refusal> {
        // A thread id stands for its process (the table holds processes).
        let (pid, vps) = match self.mgr.vps_of(pid)? {
            Some(v) => (pid, Some(v)),
            None => match vpstag::process::thread_group(pid).filter(|g| *g != pid) {
                Some(process) => (process, self.mgr.vps_of(process)?),
                None => (pid, None),
            },
        };
        match vps {
            None => Ok(WhichReply::default()),
            // A process may always ask about itself.
            Some(v) if self.visible(peer, v.id.0) || pid.as_raw() == peer.pid => {
                let v = self.shown(v);
                Ok(WhichReply { vps: Some(v.name), vps_id: Some(v.id), first: Some(v.first) })
            }
            Some(_) => {
                Err(refuse(ErrorKind::PermissionDenied, format!("process {pid} belongs to a VPS of another user")))
            }
        }
    }

    /// The live members of `name`.
    fn members(&self, name: String, peer: Peer) -> Result<PidsReply, Refusal> {
        let vps = self.lookup(peer, &name, "see")?;
        let pids: Vec<Pid> = self.mgr.members(&vps)?;
        Ok(PidsReply { pids })
    }

    /// The live members of `name` (or of every VPS the caller may see), described.
    fn ps(&self, name: Option<String>, peer: Peer) -> Result<PsReply, Refusal> {
        let vpses: Vec<Vps> = match name {
            Some(n) => vec![self.lookup(peer, &n, "see")?],
            None => self
                .mgr
                .list()?
                .into_iter()
                .map(|s| s.vps)
                .filter(|v| self.visible(peer, v.id.0))
                .map(|v| self.shown(v))
                .collect(),
        };
        let mut out = Vec::new();
        for vps in vpses {
            let members = match self.mgr.member_details(&vps) {
                Ok(m) => m,
                Err(Error::UnknownVps(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            for m in members {
                let Ok(Some(info)) = vpstag::process::process(m.id.pid) else { continue };
                if info.id.start != m.id.start {
                    continue;
                }
                out.push(ProcessInfo {
                    pid: m.id.pid,
                    ppid: info.ppid,
                    vps: vps.name.clone(),
                    cmd: vpstag::process::cmdline(m.id.pid).unwrap_or_else(|| format!("[{}]", info.name)),
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
        Ok(PsReply { processes: out })
    }

    /// Every VPS the caller may see, with its figures.
    fn list(&self, peer: Peer) -> Result<ListReply, Refusal> {
        let mut out = Vec::new();
        for s in self.mgr.list()? {
            let id = s.vps.id.0;
            if !self.visible(peer, id) {
                continue;
            }
            // Exited processes included (the same figures as /metrics).
            let u = match self.mgr.usage(&s.vps) {
                Ok(u) => u,
                // Forgotten since the list.
                Err(Error::UnknownVps(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            out.push(VpsInfo {
                id: s.vps.id,
                name: self.shown(s.vps.clone()).name,
                owner: self.owner(id).unwrap_or(0),
                first: s.vps.first,
                first_alive: s.first_alive,
                members: s.members,
                started: s.started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                cpu_ms: u64::try_from(u.cpu.as_millis()).unwrap_or(u64::MAX),
                rss_bytes: u.memory_bytes,
                memory_peak_bytes: u.memory_peak_bytes,
                forks: u.forks,
            });
        }
        Ok(ListReply { vpses: out })
    }

    /// Sends a signal (default TERM) to every member of `name` the caller may signal.
    fn kill(&self, name: String, signal: Option<String>, peer: Peer) -> Result<SignalledReply, Refusal> {
        let vps = self.lookup(peer, &name, "signal")?;
        let sig: Signal = signal.as_deref().unwrap_or("TERM").parse()?;
        let n = self.signal_all(peer, &vps, sig, Duration::from_secs(10))?;
        log!("uid {} sent {sig} to {n} processes of VPS {:?}", peer.uid, vps.name);
        Ok(SignalledReply { signalled: n })
    }

    /// TERM, then KILL after the grace period, then forgets the VPS.
    fn stop(&self, name: String, grace_ms: Option<u64>, peer: Peer) -> Result<SignalledReply, Refusal> {
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
        self.durable()?;
        log!("VPS {:?} stopped by uid {} ({n} processes signalled) and forgotten", vps.name, peer.uid);
        Ok(SignalledReply { signalled: n })
    }

    /// The recent events the caller may see (after `after`).
    fn events(&self, name: Option<String>, after: Option<u64>, peer: Peer) -> Result<EventsReply, Refusal> {
        let only = self.events_of(peer, name)?;
        let (recent, _) = self.replay(peer, only.as_ref(), after, false);
        Ok(EventsReply { events: recent })
    }

    /// The divergences between the table and the system that concern the caller, named as it knows them.
    fn check(&self, peer: Peer) -> Result<vpstag::CheckReport, Refusal> {
        let mut report = self.mgr.check()?;
        // The manager names VPSes by key (uid:name): keep what the caller may see, named
        // as it knows them.
        let prefix = format!("{}:", peer.uid);
        let mine = |k: &str| peer.uid == 0 || k.starts_with(&prefix);
        report.divergences.retain(|d| match d {
            vpstag::Divergence::Missing { expected, .. } => mine(expected),
            vpstag::Divergence::Extra { vps, .. } => mine(vps),
            vpstag::Divergence::WrongTag { vps, expected, .. } => mine(vps) || mine(expected),
            vpstag::Divergence::OutOfCgroup { vps, .. } => mine(vps),
            vpstag::Divergence::InCgroupUntagged { vps, .. } => mine(vps),
            // A kind this daemon does not know how to attribute: root only.
            _ => peer.uid == 0,
        });
        for d in &mut report.divergences {
            match d {
                vpstag::Divergence::Missing { expected, .. } => *expected = self.shown_key(peer, expected),
                vpstag::Divergence::Extra { vps, .. }
                | vpstag::Divergence::OutOfCgroup { vps, .. }
                | vpstag::Divergence::InCgroupUntagged { vps, .. } => *vps = self.shown_key(peer, vps),
                vpstag::Divergence::WrongTag { vps, expected, .. } => {
                    *vps = self.shown_key(peer, vps);
                    *expected = self.shown_key(peer, expected);
                }
                _ => {}
            }
        }
        Ok(report)
    }

    /// Sends `sig` to every member of `vps` that `peer` may signal, without racing new forks:
    /// SIGKILL again and again until no member is left; any other signal to each member once,
    /// then to every member born meanwhile, until a pass finds none new.
    pub(super) fn signal_all(&self, peer: Peer, vps: &Vps, sig: Signal, timeout: Duration) -> Result<usize, Refusal> {
        let deadline = Instant::now() + timeout;
        // By pidfd, after a start-time check: a member that exits meanwhile is skipped, and a later
        // holder of its pid is never signalled.
        let send = |id: vpstag::ProcessId| matches!(vpstag::process::signal_exact(id, sig), Ok(true));
        let mut done: HashSet<vpstag::ProcessId> = HashSet::new();
        loop {
            let members: Vec<vpstag::ProcessId> = self.mgr.member_details(vps)?.into_iter().map(|m| m.id).collect();
            let (allowed, denied): (Vec<vpstag::ProcessId>, Vec<vpstag::ProcessId>) =
                members.iter().partition(|m| may_signal(peer.uid, m.pid));
            let denied: Vec<Pid> = denied.into_iter().map(|m| m.pid).collect();
            let targets: Vec<vpstag::ProcessId> =
                if sig == Signal::KILL { allowed } else { allowed.into_iter().filter(|p| !done.contains(p)).collect() };
            if targets.is_empty() {
                if sig == Signal::KILL && !denied.is_empty() {
                    return Err(refuse(
                        ErrorKind::PermissionDenied,
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
                    ErrorKind::Timeout,
                    format!("{} processes of VPS {:?} still alive after SIGKILL: {left:?}", left.len(), vps.name),
                ));
            }
            if sig == Signal::KILL {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
