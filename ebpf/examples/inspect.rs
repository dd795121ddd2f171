//! Runs shell commands as turns of a throwaway sandbox cgroup and prints what the inspector saw.
//!
//! Usage (as root): `cargo run --example inspect -- 'echo x > /tmp/a' 'sleep 100 &' true`
//! Each argument is one turn: `sh -c ARG` runs in the cgroup, then end_turn and the verdict.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandtree_ebpf::{verdict, Inspector, SandboxConfig};

fn main() {
    let turns: Vec<String> = std::env::args().skip(1).collect();
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("no cgroup v2 hierarchy");
    let cg = root.join(format!("sandtree-inspect-{}", std::process::id()));
    fs::create_dir(&cg).expect("mkdir cgroup");
    let id = fs::metadata(&cg).expect("stat").ino();
    let insp = Inspector::load().unwrap_or_else(|e| panic!("{e}"));
    insp.watch(id, SandboxConfig::default()).expect("watch");
    let procs = CString::new(
        cg.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    for turn in &turns {
        let procs = procs.clone();
        let mut c = Command::new("sh");
        c.arg("-c").arg(turn).stdin(Stdio::null());
        // SAFETY: only async-signal-safe syscalls on memory allocated before the fork.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let status = c.status().expect("sh");
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let e = insp
            .end_turn(id, &|pid| fs::metadata(format!("/proc/{pid}")).is_ok())
            .expect("end_turn");
        let took = t.elapsed();
        let (kind, reasons) = verdict(&e);
        println!("== {turn:?} ({status}); end_turn took {took:?}");
        println!("{e:#?}");
        println!("verdict {kind:?}");
        for r in reasons {
            println!("  {r}");
        }
    }
    println!("sandbox map bytes: {}", insp.sandbox_map_bytes(id));
    insp.unwatch(id).expect("unwatch");
    let _ = fs::write(cg.join("cgroup.kill"), "1");
    std::thread::sleep(Duration::from_millis(100));
    let _ = fs::remove_dir(&cg);
}
