//! Starts a small VPS, lists its processes with how each was learned, then ends it.
//!
//! Run it with `cargo run --example tag_a_tree` (as root, or on Linux 6.6+ as any user; it falls
//! back to ptrace where the proc connector is not allowed).

use std::process::Command;
use std::time::Duration;

use vpstag::{BackendChoice, Manager};

fn main() -> Result<(), vpstag::Error> {
    let mgr = Manager::with_backend(BackendChoice::Auto)?;
    println!("backend: {}", mgr.backend_kind());
    // A shell with a background job and a double-forked daemon that calls setsid.
    let vps =
        mgr.start("example", Command::new("sh").args(["-c", "sleep 30 & setsid sh -c 'sleep 30 &'; sleep 30"]))?;
    std::thread::sleep(Duration::from_millis(300));
    for m in mgr.member_details(&vps)? {
        let tag = mgr.vps_of(m.id.pid)?.map(|v| v.name).unwrap_or_default();
        println!("pid {:>7}  vps {tag:<8} learned by {:?}  parent {:?}", m.id.pid, m.source, m.parent);
    }
    mgr.kill_all(&vps, Duration::from_secs(5))?;
    println!("status of the command: {:?}", mgr.wait(&vps, Some(Duration::from_secs(5)))?);
    Ok(())
}
