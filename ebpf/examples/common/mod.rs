//! What the examples share: a cgroup v2 leaf to run `sh -c` in.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Creates a cgroup v2 leaf named `name` (at /sys/fs/cgroup/unified on hybrid hosts, else
/// /sys/fs/cgroup); returns its path and its id (what the inspector watches).
pub fn leaf(name: &str) -> (PathBuf, u64) {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("no cgroup v2 hierarchy");
    let cg = root.join(name);
    fs::create_dir(&cg).unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.display()));
    let id = fs::metadata(&cg).expect("stat cgroup").ino();
    (cg, id)
}

/// `sh -c cmd`, moved into `cgroup` before exec, stdin on /dev/null.
pub fn sh_in(cgroup: &Path, cmd: &str) -> Command {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).stdin(Stdio::null());
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
    c
}
