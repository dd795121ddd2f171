//! The one place where this crate runs external programs (zfs, zpool, btrfs, mount, umount,
//! losetup, mkfs.btrfs, cp, stat).
//!
//! Every command runs with `LC_ALL=C` (so that error messages can be matched), without a shell,
//! with its standard input closed, and is logged at debug level with its duration. A failure
//! becomes [`SnapshotError::Command`] carrying the full command line, the exit status and the
//! trimmed standard error.
//!
//! # zfs-fuse
//!
//! When the zfs-fuse daemon is running, every `zfs` and `zpool` command runs under one host-wide
//! lock ([`ZFS_FUSE_LOCK`], taken with flock(1)), across threads and processes. zfs-fuse hands
//! each new mount to its FUSE listener threads through a pipe with two `write`s (a header, then
//! the mountpoint); two mounts at once interleave those writes, a listener thread then reads a
//! garbage length and blocks in `read` forever while holding the listener mutex, and every FUSE
//! request on every zfs-fuse mount of the host hangs until the daemon is restarted. (Seen here:
//! a listener blocked in `read(6, buf, 0x656d7304)` after parallel tests mounted clones.)
//! OpenZFS has no such problem and gets no lock.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{Result, SnapshotError};

/// The lock file that serializes zfs and zpool commands while zfs-fuse runs (see module docs).
pub const ZFS_FUSE_LOCK: &str = "/run/lock/sandtree-zfs-fuse.lock";

/// How long a zfs or zpool command waits for [`ZFS_FUSE_LOCK`] before failing.
const ZFS_FUSE_LOCK_WAIT_SECS: &str = "300";

/// Whether zfs and zpool commands must be serialized: zfs-fuse is the zfs here and flock(1)
/// exists. Probed once per process.
pub fn zfs_fuse_serialized() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let fuse = zfs_fuse_running();
        let flock = find_program("flock").is_some();
        if fuse && !flock {
            tracing::warn!(
                "zfs-fuse runs but flock(1) is missing: zfs commands are not serialized"
            );
        }
        if let Some(dir) = Path::new(ZFS_FUSE_LOCK).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        fuse && flock
    })
}

/// Whether a process named `zfs-fuse` runs on this host (a zombie left by a killed daemon does
/// not count).
pub fn zfs_fuse_running() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .any(|e| {
            // /proc/<pid>/stat: "pid (comm) state ...".
            std::fs::read_to_string(e.path().join("stat")).is_ok_and(|st| {
                let (Some(open), Some(close)) = (st.find('('), st.rfind(')')) else {
                    return false;
                };
                let state = st[close + 1..].trim_start().chars().next();
                &st[open + 1..close] == "zfs-fuse" && !matches!(state, Some('Z' | 'X'))
            })
        })
}

/// Runs `program` with `args` and returns its standard output (lossily decoded as UTF-8).
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let line = command_line(program, &args);
    if matches!(program, "zfs" | "zpool") && zfs_fuse_serialized() {
        let mut wrapped: Vec<OsString> = ["-w", ZFS_FUSE_LOCK_WAIT_SECS, ZFS_FUSE_LOCK, program]
            .iter()
            .map(OsString::from)
            .collect();
        wrapped.extend(args);
        return run_as("flock", &wrapped, line);
    }
    run_as(program, &args, line)
}

/// Runs `program` with `args`, naming it `line` in logs and errors.
fn run_as(program: &str, args: &[OsString], line: String) -> Result<String> {
    let started = Instant::now();
    let output = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SnapshotError::Io {
            context: format!("cannot run `{line}`"),
            source,
        })?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let stderr = clip(String::from_utf8_lossy(&output.stderr).trim());
    if output.status.success() {
        tracing::debug!(command = %line, elapsed_ms, "ran command");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let status = match output.status.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{}", output.status),
        };
        tracing::debug!(command = %line, elapsed_ms, %status, %stderr, "command failed");
        Err(SnapshotError::Command {
            command: line,
            status,
            stderr,
        })
    }
}

/// Like [`run`], but retries while the command fails with a standard error that `retry_if`
/// accepts, sleeping with a growing delay, for at most `max_wait` in total. Used for transient
/// "busy" errors (zfs-fuse releases a dataset a moment after it is unmounted).
pub fn run_retrying<I, S>(
    program: &str,
    args: I,
    retry_if: impl Fn(&str) -> bool,
    max_wait: std::time::Duration,
) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let started = Instant::now();
    let mut delay = std::time::Duration::from_millis(20);
    loop {
        match run(program, &args) {
            Err(SnapshotError::Command { stderr, .. })
                if retry_if(&stderr) && started.elapsed() < max_wait =>
            {
                tracing::debug!(
                    program,
                    delay_ms = delay.as_millis() as u64,
                    "retrying transient failure"
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// Standard error kept in an error: enough to diagnose, without pages of usage text.
const MAX_STDERR: usize = 4096;

fn clip(s: &str) -> String {
    if s.len() <= MAX_STDERR {
        return s.to_string();
    }
    let mut end = MAX_STDERR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

/// The standard error of a failed command, if `err` is one.
pub fn stderr_of(err: &SnapshotError) -> Option<&str> {
    match err {
        SnapshotError::Command { stderr, .. } => Some(stderr),
        _ => None,
    }
}

/// Finds `program` in `PATH` (and in the sbin directories, which a non-login root shell may
/// lack), like `command -v`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A shell-like rendering of a command line, for logs and error messages.
pub fn command_line(program: &str, args: &[OsString]) -> String {
    let mut line = quote(program);
    for a in args {
        line.push(' ');
        line.push_str(&quote(&a.to_string_lossy()));
    }
    line
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout_of_a_successful_command() {
        assert_eq!(run("echo", ["hello", "world"]).unwrap(), "hello world\n");
    }

    #[test]
    fn failure_carries_full_command_line_status_and_stderr() {
        let err = run("sh", ["-c", "echo oops >&2; exit 3"]).unwrap_err();
        match &err {
            SnapshotError::Command {
                command,
                status,
                stderr,
            } => {
                assert_eq!(command, "sh -c 'echo oops >&2; exit 3'");
                assert_eq!(status, "exit status 3");
                assert_eq!(stderr, "oops");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string().contains("sh -c 'echo oops >&2; exit 3'"),
            "{err}"
        );
    }

    #[test]
    fn missing_program_is_an_io_error_naming_the_command() {
        let err = run("/nonexistent/sandtree-no-such-tool", ["x"]).unwrap_err();
        assert!(matches!(err, SnapshotError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("sandtree-no-such-tool x"), "{err}");
    }

    #[test]
    fn retrying_gives_up_after_max_wait_and_returns_last_error() {
        let started = Instant::now();
        let err = run_retrying(
            "sh",
            ["-c", "echo busy >&2; exit 1"],
            |e| e.contains("busy"),
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        assert_eq!(stderr_of(&err), Some("busy"));
    }

    #[test]
    fn retrying_succeeds_once_the_condition_clears() {
        let dir = std::env::temp_dir().join(format!("sandtree-cmd-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let script = format!(
            "if [ -e {0} ]; then echo done; else touch {0}; echo busy >&2; exit 1; fi",
            dir.display()
        );
        let out = run_retrying(
            "sh",
            ["-c", &script],
            |e| e.contains("busy"),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out, "done\n");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn quoting_leaves_plain_words_alone() {
        let args: Vec<OsString> = ["list", "-H", "pool/ds@snap", "a b", ""]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(
            command_line("zfs", &args),
            "zfs list -H pool/ds@snap 'a b' ''"
        );
    }

    #[test]
    fn finds_programs_in_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("sandtree-no-such-tool").is_none());
    }
}
