//! Builds the sandbox init (init/init.c) as a freestanding static binary that the service embeds.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("sandtree-init");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-Os", "-static", "-nostdlib", "-fno-stack-protector", "-fno-asynchronous-unwind-tables"])
        .args(["-Wl,--build-id=none", "-s", "-o"])
        .arg(&out)
        .arg("init/init.c")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?} ({e}): install the Debian package build-essential"));
    assert!(status.success(), "building init/init.c failed");
    println!("cargo:rerun-if-changed=init/init.c");
}
