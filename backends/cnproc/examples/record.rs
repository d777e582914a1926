//! Throwaway recorder used once to make the fixtures in `src/decode.rs`: subscribes to the proc
//! connector with raw libc calls (independent of this crate's source), then creates a thread, a
//! process that execs `/bin/true`, and a process that exits with status 3, and prints every
//! datagram about those tasks as hex. Run as root: `cargo run -p vpstag-cnproc --example record`.
#[cfg(target_os = "linux")]
fn main() {
    use std::io::Write;
    // SAFETY: plain syscalls on an fd we own; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_CONNECTOR);
        assert!(fd >= 0);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = 1;
        assert_eq!(libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32), 0);
        let send_op = |op: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&(16u32 + 20 + 4).to_ne_bytes());
            m.extend_from_slice(&3u16.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&(libc::getpid() as u32).to_ne_bytes());
            for v in [1u32, 1, 0, 0x1234] {
                m.extend_from_slice(&v.to_ne_bytes());
            }
            m.extend_from_slice(&4u16.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&op.to_ne_bytes());
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            let r = libc::sendto(fd, m.as_ptr().cast(), m.len(), 0, &to as *const _ as *const libc::sockaddr, std::mem::size_of_val(&to) as u32);
            assert_eq!(r as usize, m.len());
        };
        send_op(1);
        let me = libc::getpid();
        let tid = std::thread::spawn(|| libc::gettid()).join().unwrap();
        let p1 = libc::fork();
        if p1 == 0 {
            let path = b"/bin/true\0";
            let argv = [path.as_ptr() as *const libc::c_char, std::ptr::null()];
            libc::execv(path.as_ptr().cast(), argv.as_ptr());
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
        send_op(2);
        println!("// recorder pid {me}, thread {tid}, exec child {p1}, exit(3) child {p2}");
        let mut buf = [0u8; 8192];
        loop {
            let mut from: libc::sockaddr_nl = std::mem::zeroed();
            let mut fl = std::mem::size_of_val(&from) as u32;
            let n = libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT, &mut from as *mut _ as *mut libc::sockaddr, &mut fl);
            if n < 0 {
                break;
            }
            let d = &buf[..n as usize];
            let what = u32::from_ne_bytes(d[36..40].try_into().unwrap());
            let ints: Vec<i32> = (52..d.len().min(76)).step_by(4).map(|i| i32::from_ne_bytes(d[i..i + 4].try_into().unwrap())).collect();
            if what == 0 || ints.iter().any(|&v| v == me || v == tid || v == p1 || v == p2) {
                let hex: Vec<String> = d.iter().map(|b| format!("{b:02x}")).collect();
                println!("// from port {} what {what:#x} ints {ints:?}\n{}", from.nl_pid, hex.join(""));
            }
        }
        std::io::stdout().flush().unwrap();
    }
}
#[cfg(not(target_os = "linux"))]
fn main() {}
