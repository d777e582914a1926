//! Serving one connection.

use super::*;

impl Daemon {
    pub(super) fn serve(self: &Arc<Daemon>, stream: UnixStream) {
        // Who connected, pinned now (a pidfd, or the start time): a later holder of its pid is never
        // taken for it.
        let who = match crate::sys::socket_peer(std::os::fd::AsFd::as_fd(&stream), crate::sys::now_ns()) {
            Ok(w) => w,
            Err(e) => {
                let mut s = &stream;
                let _ = s.write_all(&error_line(&refuse("failed", format!("cannot read the peer's credentials: {e}"))));
                return;
            }
        };
        let peer = Peer { pid: who.pid.as_raw(), uid: who.uid };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        let Ok(mut writer) = stream.try_clone() else { return };
        let mut reader = BufReader::with_capacity(8192, stream);
        loop {
            let line = match read_line(&mut reader) {
                Line::Eof | Line::Failed => return,
                Line::TooLong => {
                    let r = refuse("too_long", format!("a request line is at most {MAX_REQUEST} bytes"));
                    if writer.write_all(&error_line(&r)).is_err() {
                        return;
                    }
                    continue;
                }
                Line::Got(l) => l,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let (reply, follow) = match parse_request(&line) {
                Err(r) => (error_line(&r), None),
                Ok(req) => {
                    let follow = match &req.op {
                        Op::Events { follow: true, name } => Some(name.clone()),
                        _ => None,
                    };
                    match self.handle(peer, &who, req.op) {
                        Ok(l) => (l, follow),
                        Err(r) => (error_line(&r), None),
                    }
                }
            };
            if writer.write_all(&reply).is_err() {
                return;
            }
            if let Some(name) = follow {
                let only = name.and_then(|n| self.mgr.vps(&n).ok()).map(|v| v.id.0);
                self.follow(peer, only, &mut writer);
                return;
            }
        }
    }
}
