//! Compiles the BPF program (src/bpf/vpstag.bpf.c) with clang into $OUT_DIR/vpstag.bpf.o, which
//! src/source.rs embeds. Only for Linux targets; elsewhere the crate is a stub and needs nothing.
//!
//! Environment: `VPSTAG_BPF_CLANG` (or `CLANG`) names the compiler, default `clang`;
//! `VPSTAG_BPF_CFLAGS` adds flags. The libbpf headers (bpf_helpers.h) come from libbpf-sys's
//! vendored libbpf (`DEP_BPF_INCLUDE`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/bpf");
    for var in ["VPSTAG_BPF_CLANG", "CLANG", "VPSTAG_BPF_CFLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let bpf_dir = manifest.join("src").join("bpf");
    let obj = out.join("vpstag.bpf.o");
    let libbpf_include = env::var_os("DEP_BPF_INCLUDE")
        .map(PathBuf::from)
        .expect("DEP_BPF_INCLUDE is not set: libbpf-sys must be a direct dependency");

    let clang = env::var_os("VPSTAG_BPF_CLANG").or_else(|| env::var_os("CLANG")).unwrap_or_else(|| "clang".into());
    // BPF has both byte orders; the program must use the target's.
    let bpf_target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };

    let mut cmd = Command::new(&clang);
    cmd.arg("-target")
        .arg(bpf_target)
        // -g makes clang emit BTF (.BTF, .BTF.ext), which CO-RE and the tp_btf programs need.
        .args(["-g", "-O2", "-mcpu=v3", "-Wall", "-Wno-unused-function"])
        .arg("-I")
        .arg(&bpf_dir)
        .arg("-I")
        .arg(&libbpf_include)
        .arg("-c")
        .arg(bpf_dir.join("vpstag.bpf.c"))
        .arg("-o")
        .arg(&obj);
    if let Some(extra) = env::var_os("VPSTAG_BPF_CFLAGS") {
        cmd.args(extra.to_string_lossy().split_whitespace());
    }

    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot run {clang:?} ({e}): the eBPF backend needs clang to compile its BPF program \
             (Debian: apt-get install clang libelf-dev zlib1g-dev pkg-config, or run \
             .ci/install-ebpf-deps); set VPSTAG_BPF_CLANG to use another clang"
        ),
    };
    assert!(status.success(), "{clang:?} failed to compile src/bpf/vpstag.bpf.c ({status})");
}
