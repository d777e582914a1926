//! Starting a first process.

use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::Arc;
use std::time::Duration;

use vpstag_tracker::{ForkTracker, Pid, VpsId};

use super::{validate_name, Manager, State, Vps};
use crate::cgroup::{Limits, VpsCgroup};
use crate::init::{FirstHook, HookPipes};
use crate::table::Source;
use crate::{Error, Result};

/// A VPS just started by [`Manager::spawn`], with the ends of the pipes its `Command` asked for
/// (as [`std::process::Child`] has them). Its processes are the manager's to wait for: use
/// [`Manager::wait`].
#[derive(Debug)]
#[non_exhaustive]
pub struct VpsChild {
    /// The VPS.
    pub vps: Vps,
    /// The command's standard input, when the `Command` had `stdin(Stdio::piped())`.
    pub stdin: Option<ChildStdin>,
    /// The command's standard output, when the `Command` had `stdout(Stdio::piped())`.
    pub stdout: Option<ChildStdout>,
    /// The command's standard error, when the `Command` had `stderr(Stdio::piped())`.
    pub stderr: Option<ChildStderr>,
}

impl Manager {
    /// Starts VPS `name` running `cmd` under a new first process, and returns once `cmd` has
    /// been executed (or failed to be). The same as [`spawn`](Manager::spawn) without the pipe
    /// ends: use `spawn` to read a piped output.
    pub fn start(&self, name: &str, cmd: &mut Command) -> Result<Vps> {
        self.spawn(name, cmd).map(|c| c.vps)
    }

    /// Starts VPS `name` running `cmd`, as [`Command::spawn`] would, under a new first process
    /// (a small init that reaps the VPS's orphans and forwards termination signals), and returns
    /// once `cmd` has been executed (or failed to be).
    ///
    /// Every option of `cmd` applies, because the standard library itself applies them: program,
    /// arguments, `arg0`, environment (`env_clear`, `env_remove`), working directory, standard
    /// input/output/error (null, inherited, piped: the ends are in the returned [`VpsChild`], a
    /// file), `uid`, `gid`, `groups`, `process_group`, and `pre_exec` closures. They apply to the
    /// first process, which then forks the command's process, so both run as `cmd` says (its
    /// `pre_exec` closures run once, in the first process). The first process keeps none of the
    /// command's descriptors.
    ///
    /// Both processes are recorded in the table (and followed by the backend) before the command
    /// is let past its start gate, so nothing of the VPS ever runs untagged.
    ///
    /// ```no_run
    /// use std::io::Read;
    /// use std::os::unix::process::CommandExt;
    /// use std::process::{Command, Stdio};
    ///
    /// let mgr = vpstag::Manager::with_backend(vpstag::BackendChoice::Auto)?;
    /// let mut cmd = Command::new("id");
    /// cmd.uid(65534).gid(65534).env_clear().stdout(Stdio::piped());
    /// let mut child = mgr.spawn("job", &mut cmd)?;
    /// let mut out = String::new();
    /// child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    /// mgr.wait(&child.vps, None)?;
    /// # Ok::<(), vpstag::Error>(())
    /// ```
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<VpsChild> {
        self.spawn_in(name, cmd, None)
    }

    /// [`spawn`](Manager::spawn) with resource limits, in a cgroup of the VPS's own (cgroup v2:
    /// below the root given to [`use_cgroups`](Manager::use_cgroups), else the one
    /// [`CgroupRoot::find`](crate::cgroup::CgroupRoot::find) finds). The cgroup is made, with its
    /// limits, before anything runs, and the first process and the command's process enter it at
    /// the start gate. A limit that cannot be applied is refused with an error naming cgroup v2,
    /// the controller and what to delegate ([`Error::Cgroup`]), before any process is started.
    pub fn spawn_limited(&self, name: &str, cmd: &mut Command, limits: &Limits) -> Result<VpsChild> {
        limits.validate()?;
        self.spawn_in(name, cmd, Some(limits))
    }

    fn spawn_in(&self, name: &str, cmd: &mut Command, limits: Option<&Limits>) -> Result<VpsChild> {
        validate_name(name)?;
        if self.synced()?.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let cgroup = self.cgroup_for(name, limits)?;
        let result = self.spawn_gated(name, cmd, cgroup.clone());
        if let (Err(_), Some((_, cg))) = (&result, &cgroup) {
            // Nothing of the VPS runs any more (its processes were waited for): the directory goes.
            let _ = cg.remove(Duration::from_secs(2));
        }
        result
    }

    fn spawn_gated(&self, name: &str, cmd: &mut Command, cgroup: Option<(VpsId, Arc<VpsCgroup>)>) -> Result<VpsChild> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let (hook, pipes) = FirstHook::new().map_err(|e| Error::io("creating the start-gate pipes", e))?;
        let HookPipes { gate_write, pids_read, child_ends } = pipes;
        std::thread::scope(|scope| {
            let spawner = std::thread::Builder::new()
                .name("vpstag-spawn".into())
                .spawn_scoped(scope, move || {
                    let r = hook.spawn(cmd);
                    drop(child_ends);
                    r
                })
                .map_err(|e| Error::io("starting the spawning thread", e))?;
            let spawned = |spawner: std::thread::ScopedJoinHandle<'_, std::io::Result<std::process::Child>>| {
                spawner.join().unwrap_or_else(|_| Err(std::io::Error::other("spawning the command panicked")))
            };
            // The first process sends its pid and the command's; end of file if it failed first
            // (then `spawn` says why).
            let pids = match crate::init::read_hook_pids(&pids_read) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return Err(match spawned(spawner) {
                        Err(source) => Error::Spawn { program, source },
                        Ok(mut child) => {
                            let _ = child.kill();
                            let _ = child.wait();
                            Error::io("starting the first process", std::io::Error::other("it sent no pid"))
                        }
                    })
                }
                Err(e) => {
                    drop(gate_write);
                    if let Ok(mut child) = spawned(spawner) {
                        let _ = child.wait();
                    }
                    return Err(Error::io("reading the first process's pid", e));
                }
            };
            let (first, command) = pids;
            let vps = match self.register_started(name, first, command, cgroup) {
                Ok(v) => v,
                Err(e) => {
                    // Closing the gate makes the command's process exit, and the first process
                    // with it; `spawn` then returns it, ours to reap.
                    drop(gate_write);
                    if let Ok(mut child) = spawned(spawner) {
                        let _ = child.wait();
                    }
                    return Err(e);
                }
            };
            let opened = nix::unistd::write(&gate_write, &[1u8]);
            drop(gate_write);
            let result = spawned(spawner);
            let mut st = self.lock();
            st.spawning.retain(|p| *p != first);
            match (opened, result) {
                (Ok(_), Ok(mut child)) => Ok(VpsChild {
                    vps,
                    stdin: child.stdin.take(),
                    stdout: child.stdout.take(),
                    stderr: child.stderr.take(),
                }),
                (opened, result) => {
                    // The command was not executed. The standard library waited for the first
                    // process when it reported why; otherwise it is ours to reap.
                    st.to_reap.retain(|p| *p != first);
                    forget_started(&mut st, &vps);
                    drop(st);
                    match result {
                        Err(source) => Err(Error::Spawn { program, source }),
                        Ok(mut child) => {
                            let _ = child.wait();
                            let e =
                                opened.err().map_or_else(|| std::io::Error::other("the gate did not open"), Into::into);
                            Err(Error::io("opening the start gate", e))
                        }
                    }
                }
            }
        })
    }

    /// Records a first process and its command's process, both held before running anything of
    /// the command, as a new VPS `name`.
    fn register_started(
        &self,
        name: &str,
        first: Pid,
        command: Pid,
        cgroup: Option<(VpsId, Arc<VpsCgroup>)>,
    ) -> Result<Vps> {
        // Both enter the VPS's cgroup while the command waits at the gate: nothing of it runs
        // outside.
        if let Some((_, cg)) = &cgroup {
            cg.attach(first)?;
            cg.attach(command)?;
        }
        let mut st = self.synced()?;
        if st.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let mut read = |pid| {
            st.view
                .process(pid)
                .map_err(|e| Error::io("reading the new first process", e))?
                .ok_or(Error::NoSuchProcess(pid))
        };
        let (first_info, command_info) = (read(first)?, read(command)?);
        let vps = st.new_vps_as(name, first_info.id, cgroup.as_ref().map(|(id, _)| *id));
        // The command's process is followed by every backend. The first process is followed too,
        // except by a backend that reaps what it follows (ptrace): the first process is our
        // child, which the standard library waits for when the command cannot be executed, so
        // the manager reaps it itself (and learns its end that way).
        let follow_first = !st.caps.reaps;
        let watched = st.tracker.watch(command, vps.id).and_then(|()| match follow_first {
            true => st.tracker.watch(first, vps.id),
            false => Ok(()),
        });
        if let Err(e) = watched {
            forget_started(&mut st, &vps);
            return Err(e.into());
        }
        st.tracking.insert_member(&first_info, vps.id, Source::First);
        st.tracking.insert_held(&command_info, vps.id, Source::Event);
        if let Some(rec) = st.vpses.get_mut(&vps.id) {
            rec.command = Some(command);
            rec.cgroup = cgroup.map(|(_, cg)| cg);
        }
        st.journal_new_vps(vps.id);
        st.spawning.push(first);
        if !follow_first {
            st.to_reap.push(first);
        }
        st.flush_changes();
        Ok(vps)
    }
}

/// Undoes [`Manager::register_started`] for a VPS whose command was not executed.
fn forget_started(st: &mut State, vps: &Vps) {
    st.tracking.table.remove_vps(vps.id);
    st.vpses.remove(&vps.id);
    if st.names.get(&vps.name) == Some(&vps.id) {
        st.names.remove(&vps.name);
    }
    let _ = st.tracker.forget(vps.id);
}
