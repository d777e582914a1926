//! Names, once, the systems whose kqueue can follow forks (`EVFILT_PROC` with `NOTE_TRACK`): the
//! `kqueue` cfg that `src/lib.rs` selects the live backend with, and `src/decode.rs` checks the
//! kernel constants on. macOS is among them because its kqueue exists (`Kqueue::new` then says
//! that `NOTE_TRACK` is refused there). Every other system gets `src/unsupported.rs`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    cfg_aliases::cfg_aliases! {
        kqueue: {
            any(
                target_os = "freebsd",
                target_os = "netbsd",
                target_os = "openbsd",
                target_os = "dragonfly",
                target_os = "macos"
            )
        },
    }
}
