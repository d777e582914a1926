//! Starting a first process.

use std::process::Command;
use std::time::Duration;

use vpstag_tracker::ForkTracker;

use super::{validate_name, Manager, State, Vps};
use crate::init::{Pipes, Plan};
use crate::table::Source;
use crate::{Error, Result};
impl Manager {
    /// Starts VPS `name` running `cmd` under a new first process, and returns once `cmd` has
    /// been executed (or failed to be).
    ///
    /// The first process is recorded in the table (and followed by the backend) before it is let
    /// past its start gate, so nothing of the VPS ever runs untagged.
    pub fn start(&self, name: &str, cmd: &mut Command) -> Result<Vps> {
        validate_name(name)?;
        let plan = Plan::new(cmd)
            .map_err(|source| Error::Spawn { program: cmd.get_program().to_string_lossy().into_owned(), source })?;
        let pipes = Pipes::new().map_err(|e| Error::io("creating the start-gate pipes", e))?;
        let mut st = self.synced()?;
        if st.name_in_use(name) {
            return Err(Error::AlreadyRunning(name.to_string()));
        }
        let child = crate::init::fork_first_process(&plan, &pipes).map_err(|e| Error::io("fork", e))?;
        let Pipes { gate_read, gate_write, err_read, err_write } = pipes;
        drop(gate_read);
        drop(err_write);
        let abort = |st: &mut State| {
            crate::sys::kill_child(child);
            if !st.caps.reaps {
                let _ = crate::sys::reap(child);
            }
        };
        let info = match crate::sys::process(child) {
            Ok(Some(i)) => i,
            Ok(None) => {
                abort(&mut st);
                return Err(Error::io("reading the new first process", std::io::ErrorKind::NotFound.into()));
            }
            Err(e) => {
                abort(&mut st);
                return Err(Error::io("reading the new first process", e));
            }
        };
        let vps = st.new_vps(name, info.id);
        if let Err(e) = st.tracker.watch(child, vps.id) {
            abort(&mut st);
            st.names.remove(name);
            st.vpses.remove(&vps.id);
            return Err(e.into());
        }
        st.tracking.insert_member(&info, vps.id, Source::First);
        // Open the gate.
        let opened = nix::unistd::write(&gate_write, &[1u8]);
        drop(gate_write);
        drop(st);
        if let Err(e) = opened {
            return Err(Error::io("opening the start gate", e.into()));
        }
        let reported =
            crate::init::read_exec_errno(err_read).map_err(|e| Error::io("waiting for the command to start", e))?;
        if let Some(errno) = reported {
            // The first process exits at once; forget the VPS so that its name is free again.
            let _ = self.wait(&vps, Some(Duration::from_secs(5)));
            let mut st = self.lock();
            st.tracking.table.remove_vps(vps.id);
            st.vpses.remove(&vps.id);
            st.names.remove(name);
            return Err(Error::Spawn {
                program: plan.program().to_string(),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(vps)
    }
}
