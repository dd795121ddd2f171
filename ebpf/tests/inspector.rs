//! End-to-end tests of the inspector: one tiny command per effect class, run in a watched
//! cgroup v2 leaf, then end_turn and the verdict with its reason.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{inspector, uniq, wait_gone, Sandbox};
use sandtree_ebpf::{kernel_dev, verdict, SandboxConfig, TurnEffects, VerdictKind};

fn assert_kind(e: &TurnEffects, want: VerdictKind) -> Vec<String> {
    let (kind, reasons) = verdict(e);
    assert_eq!(
        kind, want,
        "verdict {kind:?} (want {want:?}); reasons {reasons:?}; effects {e:#?}"
    );
    reasons
}

fn assert_reason(reasons: &[String], needle: &str) {
    assert!(
        reasons.iter().any(|r| r.contains(needle)),
        "no reason with {needle:?} in {reasons:?}"
    );
}

/// A temp file path removed on drop.
struct TmpPath(String);
impl TmpPath {
    fn new(tag: &str) -> Self {
        Self(format!("/tmp/{}", uniq(tag)))
    }
}
impl Drop for TmpPath {
    fn drop(&mut self) {
        let p = Path::new(&self.0);
        let _ = if p.is_dir() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
    }
}

#[test]
fn true_changes_nothing() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "true");
    sb.sh_ok("true");
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::None);
    assert!(
        e.procs_created >= 1,
        "the command itself was not seen: {e:#?}"
    );
    assert!(e.survivors.is_empty());
}

#[test]
fn reading_a_file_changes_nothing() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "cat");
    sb.sh_ok("cat /etc/hostname > /dev/null");
    assert_kind(&sb.end_turn(), VerdictKind::None);
}

#[test]
fn writing_a_file_is_fs_with_its_path() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "echo");
    let f = TmpPath::new("echo");
    sb.sh_ok(&format!("echo x > {}", f.0));
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Fs);
    assert!(e.sample_paths.contains(&f.0), "{} not sampled: {e:#?}", f.0);
    assert_reason(
        &reasons,
        &format!("fs: openat(O_WRONLY|O_CREAT|O_TRUNC) {}", f.0),
    );
    assert_eq!(e.fs_classes.get("open"), Some(&1));
    assert_eq!(e.fs_classes.get("write"), Some(&1));
}

#[test]
fn file_commands_are_fs() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "files");
    let d = TmpPath::new("dir");
    let cases = [
        (format!("mkdir {}", d.0), "mkdir", d.0.clone()),
        (format!("touch {}/a", d.0), "open", format!("{}/a", d.0)),
        (
            format!("chmod 600 {}/a", d.0),
            "chmod",
            format!("{}/a", d.0),
        ),
        (
            format!("mv {0}/a {0}/b", d.0),
            "rename",
            format!("{}/b", d.0),
        ),
        (format!("rm {}/b", d.0), "unlink", format!("{}/b", d.0)),
        (format!("rmdir {}", d.0), "rmdir", d.0.clone()),
    ];
    for (cmd, class, path) in cases {
        sb.sh_ok(&cmd);
        let e = sb.end_turn();
        let reasons = assert_kind(&e, VerdictKind::Fs);
        assert!(
            e.fs_classes.contains_key(class),
            "{cmd}: no {class} in {e:#?}"
        );
        assert!(
            e.sample_paths.contains(&path),
            "{cmd}: {path} not sampled in {e:#?}"
        );
        assert_reason(&reasons, &path);
    }
}

#[test]
fn a_background_process_that_outlives_the_turn_is_proc() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "bg");
    sb.sh_ok("sleep 100 &");
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert_eq!(e.survivors.len(), 1, "{e:#?}");
    assert_reason(
        &reasons,
        &format!("proc: pid {} outlives the turn", e.survivors[0]),
    );
}

#[test]
fn a_sleeping_long_lived_process_changes_nothing() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "sleeper");
    sb.sh_ok("sleep 100 &");
    sb.wait_for_comm("sleep"); // its execve would land in the next turn
    assert_kind(&sb.end_turn(), VerdictKind::Proc);
    sb.sh_ok("true");
    std::thread::sleep(Duration::from_millis(300));
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::None);
    assert!(e.long_lived_active.is_empty());
}

#[test]
fn a_long_lived_process_reading_a_fifo_is_proc() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "fifo");
    let fifo = TmpPath::new("fifo");
    sb.sh_ok(&format!("mkfifo {0} && cat {0} > /dev/null &", fifo.0));
    sb.wait_for_comm("cat");
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::Proc);
    let reader = *e.survivors.first().expect("the reader survives the turn");

    sb.sh_ok(&format!("echo hi > {}", fifo.0));
    wait_gone(reader); // reads "hi", then EOF, then exits
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert_reason(
        &reasons,
        &format!("proc: long-lived pid {reader} read from a fifo"),
    );
    // The writer opened the fifo, which is no file mutation.
    assert_eq!(e.fs_mutations, 0, "{e:#?}");
}

#[test]
fn binding_a_socket_is_proc() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "bind");
    let st = sb.sh("command -v python3 >/dev/null");
    if !st.success() {
        common::skip::<()>("python3 is not installed");
        return;
    }
    sb.end_turn();
    sb.sh_ok("python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\",0))'");
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert_reason(&reasons, "proc: bind x1");
}

#[test]
fn processes_outside_watched_cgroups_leave_no_trace() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "outside");
    let f = TmpPath::new("outside");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > {0}; mkdir {0}.d; rmdir {0}.d; sleep 0.1 & python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\",0))' 2>/dev/null; true", f.0))
        .status()
        .expect("sh");
    assert!(st.success());
    assert_eq!(sb.end_turn(), TurnEffects::default());
}

#[test]
fn the_ignored_device_and_suspension_record_nothing() {
    let Some(insp) = inspector() else { return };
    // A tmpfs standing in for the sandbox's /.sandtree.
    let dir = TmpPath::new("ignored");
    fs::create_dir(&dir.0).expect("mkdir");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "sandtree-test", &dir.0])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::skip::<()>("cannot mount a tmpfs");
        return;
    }
    struct Unmount<'a>(&'a str);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&dir.0);
    use std::os::unix::fs::MetadataExt;
    let dev = kernel_dev(fs::metadata(&dir.0).expect("stat").dev());
    let sb = Sandbox::with_config(
        insp,
        "ignored",
        SandboxConfig {
            init_tgid: 0,
            ignore_dev: dev,
        },
    );
    sb.sh_ok(&format!(
        "cd {0} && echo x > out && mkdir d && mv out d/ && rm -r d && echo y > {0}/err",
        dir.0
    ));
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::None);

    let f = TmpPath::new("suspended");
    insp.suspend(sb.id, true).expect("suspend");
    sb.sh_ok(&format!("echo x > {}; sleep 100 &", f.0));
    insp.suspend(sb.id, false).expect("resume");
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::None);
    assert_eq!(e.procs_created, 0, "{e:#?}");
}

#[test]
fn background_effects_between_turns_land_in_the_next_turn() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "between");
    let f = TmpPath::new("later");
    sb.sh_ok(&format!("(sleep 0.3; echo x > {}) &", f.0));
    let e = sb.end_turn();
    assert_kind(&e, VerdictKind::Proc); // the subshell survives
    let pid = e.survivors[0];
    wait_gone(pid);
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert!(e.sample_paths.contains(&f.0), "{e:#?}");
    assert_reason(&reasons, &format!("proc: long-lived pid {pid}"));
}

#[test]
fn after_a_restore_every_process_is_long_lived() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "restore");
    // A process born in the current epoch that is still running: marking all long-lived turns
    // its exit into long-lived activity.
    sb.sh_ok("sleep 0.5 &");
    sb.wait_for_comm("sleep");
    insp.mark_all_long_lived(sb.id).expect("mark");
    std::thread::sleep(Duration::from_millis(800));
    let e = sb.end_turn();
    assert!(e.survivors.is_empty(), "{e:#?}");
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert_reason(&reasons, "exited");
}

#[test]
fn map_memory_is_reported() {
    let Some(insp) = inspector() else { return };
    let total = insp.map_memory_bytes();
    assert!(total > 1 << 20 && total < 64 << 20, "{total}");
    let sb = Sandbox::new(insp, "mem");
    let per = insp.sandbox_map_bytes(sb.id);
    assert!(per > 1000 && per < 16 << 10, "{per}");
    println!("bpf map memory: {total} bytes defined; one idle sandbox: {per} bytes");
}

#[test]
fn signalling_a_long_lived_process_is_proc() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "signal");
    sb.sh_ok("sleep 100 &");
    let pid = sb.wait_for_comm("sleep");
    let e = sb.end_turn();
    assert_eq!(e.survivors, vec![pid]);
    sb.sh_ok(&format!("kill -TERM {pid}"));
    wait_gone(pid);
    let e = sb.end_turn();
    let reasons = assert_kind(&e, VerdictKind::Proc);
    assert_reason(
        &reasons,
        &format!("proc: long-lived pid {pid} received signal 15"),
    );
    assert_eq!(e.ipc.get("signal"), Some(&1), "{e:#?}");
}

#[test]
fn no_event_is_lost_across_turn_boundaries() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "boundaries");
    let f = TmpPath::new("appends");
    sb.sh_ok(&format!(
        "(for i in $(seq 50); do echo x >> {}; sleep 0.01; done) &",
        f.0
    ));
    let mut writes = 0;
    let mut turns = 0;
    let started = std::time::Instant::now();
    let mut last = false;
    loop {
        // One more turn after the last append is visible: its syscall may not have returned yet.
        let done = last;
        last = fs::read_to_string(&f.0).is_ok_and(|s| s.lines().count() == 50);
        std::thread::sleep(Duration::from_millis(7));
        let e = sb.end_turn();
        writes += e.fs_classes.get("write").copied().unwrap_or(0);
        turns += 1;
        if done || started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    assert!(turns > 5, "only {turns} turns");
    assert_eq!(writes, 50, "appends counted over {turns} turns");
}

/// The fast path (no grace period once only init is left): 50 short turns back to back, each
/// writing one file; every write lands in its own turn and none leaks into the next one.
#[test]
fn quiet_turn_ends_skip_the_grace_period_and_lose_nothing() {
    let Some(insp) = inspector() else { return };
    let sb = Sandbox::new(insp, "quiet");
    let dir = TmpPath::new("quiet");
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut skipped = 0;
    for i in 0..50 {
        sb.sh_ok(&format!("echo {i} > {}/f{i}", dir.0));
        let (e, fast) = sb.end_turn_quiet();
        skipped += usize::from(fast);
        assert_eq!(e.fs_classes.get("open"), Some(&1), "turn {i}: {e:#?}");
        assert_eq!(e.fs_classes.get("write"), Some(&1), "turn {i}: {e:#?}");
        assert!(
            e.sample_paths
                .iter()
                .any(|p| p.ends_with(&format!("/f{i}"))),
            "turn {i}: {e:#?}"
        );
        sb.sh_ok("true");
        let (e, _) = sb.end_turn_quiet();
        assert_kind(&e, VerdictKind::None);
    }
    assert_eq!(skipped, 50, "the cgroup was empty after every command");
}
