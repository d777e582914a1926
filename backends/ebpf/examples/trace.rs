//! Tags a command's process tree with the eBPF backend and prints its events.
//!
//! `cargo run -p vpstag-ebpf --example trace -- sh -c 'sleep 0.1 & wait'` (as root)

#[cfg(target_os = "linux")]
fn main() {
    use std::time::Duration;

    use vpstag_ebpf::Ebpf;
    use vpstag_tracker::{EventKind, ForkTracker, Pid, VpsId};

    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: trace COMMAND [ARGS...]");
        std::process::exit(2);
    }
    let mut t = match Ebpf::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("trace: {e}");
            std::process::exit(1);
        }
    };
    // Tag ourselves: the command, our child, inherits the tag in the kernel.
    let me = Pid::new(std::process::id() as i32).unwrap();
    t.watch(me, VpsId(1)).expect("watch");
    let mut child = std::process::Command::new(&args[0]).args(&args[1..]).spawn().expect("spawn");
    let root = Pid::new(child.id() as i32).unwrap();
    let mut out = Vec::new();
    let mut done = false;
    loop {
        out.clear();
        t.read_events(&mut out, Some(Duration::from_millis(200))).expect("read_events");
        for ev in &out {
            println!("{ev:?}");
            if matches!(ev.kind, EventKind::Exit { pid, .. } if pid == root) {
                done = true;
            }
        }
        if done && out.is_empty() {
            break;
        }
        if !done && child.try_wait().expect("wait").is_some() && out.is_empty() {
            done = true;
        }
    }
    let _ = child.wait();
    println!("counters: {:?}", t.counters());
    t.forget(VpsId(1)).expect("forget");
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("trace: the eBPF backend is Linux only");
}
