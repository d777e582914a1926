//! The throwaway recorder that made the fixtures in `src/decode.rs` (ignored by default).
//!
//! It subscribes with raw libc calls (independent of this crate's source, with cn_msg.ack =
//! 0x1234 so the ack is recognisable), creates a std::thread, forks a child that execs
//! `/bin/true` and a child that calls `_exit(3)`, unsubscribes, and prints every queued datagram
//! that is an ack or mentions those tasks, as hex. Run as root:
//!
//! `cargo test -p vpstag-cnproc --test record_fixtures -- --ignored --nocapture`
#![cfg(target_os = "linux")]

use std::mem;

fn send_op(fd: libc::c_int, op: u32) {
    let mut m = Vec::new();
    m.extend_from_slice(&(16u32 + 20 + 4).to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&std::process::id().to_ne_bytes());
    for v in [1u32, 1, 0, 0x1234] {
        m.extend_from_slice(&v.to_ne_bytes()); // idx, val, seq, ack
    }
    m.extend_from_slice(&4u16.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&op.to_ne_bytes());
    // SAFETY: sockaddr_nl is plain old data.
    let mut to: libc::sockaddr_nl = unsafe { mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `m` and `to` are valid for the lengths given.
    let r = unsafe {
        libc::sendto(
            fd,
            m.as_ptr().cast(),
            m.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            mem::size_of_val(&to) as u32,
        )
    };
    assert_eq!(r as usize, m.len());
}

#[test]
#[ignore = "prints fixtures; run by hand as root"]
fn record_fixtures() {
    // SAFETY: plain syscalls on a descriptor this test owns; every buffer outlives its call; the
    // forked children only call execv/_exit.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_CONNECTOR);
        assert!(fd >= 0);
        let mut sa: libc::sockaddr_nl = mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = 1; // CN_IDX_PROC
        assert_eq!(libc::bind(fd, (&sa as *const libc::sockaddr_nl).cast(), mem::size_of_val(&sa) as u32), 0);
        send_op(fd, 1); // LISTEN
        let me = libc::getpid();
        let tid = std::thread::spawn(|| libc::gettid()).join().unwrap();
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let p1 = libc::fork();
        if p1 == 0 {
            libc::execv(path.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
        let p2 = libc::fork();
        if p2 == 0 {
            libc::_exit(3);
        }
        let mut st = 0;
        libc::waitpid(p1, &mut st, 0);
        libc::waitpid(p2, &mut st, 0);
        std::thread::sleep(std::time::Duration::from_millis(100));
        send_op(fd, 2); // IGNORE
        println!("// recorder pid {me}, thread {tid}, exec child {p1}, exit(3) child {p2}");
        let mut buf = [0u8; 8192];
        loop {
            let mut from: libc::sockaddr_nl = mem::zeroed();
            let mut fl = mem::size_of_val(&from) as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut fl,
            );
            if n < 0 {
                break;
            }
            let d = &buf[..n as usize];
            let what = u32::from_ne_bytes(d[36..40].try_into().unwrap());
            let ints: Vec<i32> =
                (52..d.len().min(76)).step_by(4).map(|i| i32::from_ne_bytes(d[i..i + 4].try_into().unwrap())).collect();
            if what == 0 || ints.iter().any(|&v| v == me || v == tid || v == p1 || v == p2) {
                let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
                println!("// from port {} what {what:#x} ints {ints:?}\n{hex}", from.nl_pid);
            }
        }
        libc::close(fd);
    }
}
