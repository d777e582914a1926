//! Runs the supervisor example (examples/supervisor.rs) under every backend and checks what it
//! reports against what its job did.
#![cfg(target_os = "linux")]

#[path = "../examples/supervisor.rs"]
mod supervisor;

use vpstag::{BackendChoice, ExitStatus, Manager};

#[test]
fn the_supervisor_example_drops_privileges_captures_output_follows_events_and_kills() {
    let mut backends = vec![BackendChoice::Cnproc, BackendChoice::Ptrace];
    if cfg!(feature = "ebpf") {
        backends.push(BackendChoice::Ebpf);
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for b in backends {
        let mgr = Manager::with_backend(b).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let report = rt.block_on(supervisor::supervise(&mgr)).unwrap_or_else(|e| panic!("{b:?}: {e}"));
        // `read` is a builtin; `id`, two `true`s and two `sleep`s are forks and executions.
        let uid = if root { "65534".to_string() } else { unsafe { libc::geteuid() }.to_string() };
        assert_eq!(report.output, vec![uid, "ready".to_string()], "{b:?}: {report:?}");
        assert!(report.forks >= 5, "{b:?}: {report:?}");
        // id and the two trues; the sleeps may execute after "ready" was printed.
        assert!(report.execs >= 3, "{b:?}: {report:?}");
        assert!(report.exits >= 3, "{b:?}: id and the two trues exited: {report:?}");
        assert_eq!(report.losses, 0, "{b:?}: {report:?}");
        assert!(report.members_when_killed >= 4, "{b:?}: init, sh and two sleeps: {report:?}");
        assert_eq!(
            report.status,
            Some(ExitStatus::Signaled { signal: 9, core_dumped: false }),
            "{b:?}: the shell was killed: {report:?}"
        );
        assert_eq!(report.members_after, 0, "{b:?}: {report:?}");
    }
}
