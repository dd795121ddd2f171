//! Every public trajectory runs to the end through `sandtree step`, on btrfs and on zfs-fuse,
//! with the outputs its commands imply.

use sandtree_tests::*;

/// Spot checks: (trajectory, 1-based turn, expected stdout).
const EXPECT: &[(&str, usize, &str)] = &[
    ("shell-counter-daemon", 5, "1\n"),
    ("shell-counter-daemon", 7, "2\n"),
    ("shell-counter-daemon", 14, "4\n"),
    ("shell-bg-inherit", 5, "1\n"),
    ("shell-bg-inherit", 10, "3\n"),
    ("shell-httpd", 3, "hello\n"),
    ("shell-httpd", 5, "world\n"),
    ("shell-httpd", 9, "1\n"),
    ("shell-logs", 2, "/workspace/logs\n"),
    ("shell-logs", 4, "200 access.log\n"),
    ("shell-logs", 17, "250\n"),
    (
        "shell-build-tree",
        11,
        "a.txt\nb.txt\nc.txt\nd.txt\ne.txt\n",
    ),
    ("shell-build-tree", 18, "documentation\nsrc\n"),
    ("repair-env-cwd", 6, "/workspace/app/conf\n"),
    ("repair-env-cwd", 8, "release\n"),
    ("repair-env-cwd", 12, "release /workspace/app\n"),
    ("repair-calc", 11, "ok\nrc=0\n"),
    ("repair-pycache", 4, "6.0\n"),
    ("repair-pycache", 8, "4.0\n"),
    ("repair-background-worker", 4, "1"),
    ("repair-background-worker", 6, "2"),
    ("repair-background-worker", 9, "3"),
];

fn run_all(storage: Storage) {
    let svc = Service::start(storage);
    for t in trajectories() {
        let ep = svc.create(&t.image, "auto");
        for (i, turn) in t.turns.iter().enumerate() {
            let r = svc.step(&ep, &turn.cmd);
            assert_eq!(r["turn"], i as u64 + 1, "{} turn numbering", t.name);
            assert_eq!(
                r["timed_out"],
                false,
                "{} turn {}: timed out",
                t.name,
                i + 1
            );
            if let Some((_, _, want)) = EXPECT.iter().find(|(n, k, _)| *n == t.name && *k == i + 1)
            {
                assert_eq!(
                    r["stdout"].as_str().unwrap(),
                    *want,
                    "{} turn {} `{}`: {r}",
                    t.name,
                    i + 1,
                    turn.cmd
                );
            }
            // `diff` of two different files exits 1 inside an `; echo`; every turn's shell exits 0.
            assert_eq!(
                r["exit_code"],
                0,
                "{} turn {} `{}` failed: {r}",
                t.name,
                i + 1,
                turn.cmd
            );
        }
        svc.ok(&["delete", &ep]);
    }
}

#[test]
fn public_trajectories_run_on_btrfs() {
    if require_sandbox_host() {
        run_all(Storage::Btrfs);
    }
}

#[test]
fn public_trajectories_run_on_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        run_all(Storage::Zfs);
    }
}
