//! Compiles bpf/inspector.bpf.c into $OUT_DIR/inspector.bpf.o with clang (BPF target, BTF, CO-RE).
//!
//! Needs the Debian packages `clang` (the compiler) and `libbpf-dev` (bpf_helpers.h and
//! bpf_core_read.h); the kernel uapi headers come from `linux-libc-dev`. On targets other than
//! x86_64 Linux nothing is compiled and `Inspector::load` reports the architecture as unsupported.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SRC: &str = "bpf/inspector.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rustc-check-cfg=cfg(sandtree_bpf)");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let obj = out.join("inspector.bpf.o");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        println!(
            "cargo:warning=sandtree-ebpf: the inspector supports x86_64 Linux only; building without it for {arch}-{os}"
        );
        return;
    }

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "sandtree-ebpf: `{clang}` not found: the BPF programs are compiled with clang; install \
             the Debian packages `clang` and `libbpf-dev` (apt-get install clang libbpf-dev), or \
             set CLANG to a clang binary"
        ),
    }
    let include = ["/usr/include", "/usr/local/include"]
        .iter()
        .map(Path::new)
        .find(|dir| dir.join("bpf/bpf_helpers.h").exists());
    if include.is_none() {
        panic!(
            "sandtree-ebpf: bpf/bpf_helpers.h not found: install the Debian package `libbpf-dev` \
             (apt-get install libbpf-dev)"
        );
    }

    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
            "-I/usr/include/x86_64-linux-gnu",
            "-Wall",
            "-c",
            SRC,
            "-o",
        ])
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("sandtree-ebpf: running {clang}: {e}"));
    if !status.success() {
        panic!("sandtree-ebpf: {clang} failed to compile {SRC} ({status})");
    }
    println!("cargo:rustc-cfg=sandtree_bpf");
}
