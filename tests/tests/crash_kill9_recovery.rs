//! kill -9 of the service at any point, followed by a restart, loses no committed node and leaves
//! no orphan.
//!
//! One `full`-policy busybox episode on btrfs; every turn writes `/workspace/tNNN.txt` and turn 1
//! also starts a `sleep 1000` daemon. Each iteration kills the service with SIGKILL at a seeded
//! pseudo-random instant in one of three windows:
//!
//! - (a) 0..300 ms after a step returned (its CRIU dump + snapshot still run in the background),
//! - (b) 0..300 ms after `sandtree stats` (which waits for every checkpoint),
//! - (c) 0..300 ms into a `fork`.
//!
//! After each restart (which reconciles):
//!
//! - the episode's tree lists every turn the test knows to be committed, with the right actions;
//!   only the turn whose checkpoint was still running may be gone, and then the service reports
//!   exactly that many pending nodes abandoned; no listed node is `pending`;
//! - on disk there is no orphan: no volume, no volume record, nothing in `tmp/`, and every btrfs
//!   snapshot and every CRIU image dir belongs to a committed node (and every committed node still
//!   has both);
//! - no sandbox cgroup of this service instance is left, and no CRIU or shim process of the
//!   killed service still runs;
//! - a fork cut off by the kill leaves no episode that the client did not get: those never got
//!   a sandbox and reconcile drops them ("unborn"); ids the client did get are stopped episodes
//!   that share the source's nodes, so deleting them frees nothing;
//! - every committed node is forkable: a fork of turn T holds exactly the files of turns 1..=T
//!   and the daemon, and a rewind of the episode to its head brings it back to life.
//!
//! At the end every episode is deleted and storage, image dirs and cgroups must be empty.
//!
//! The seed is `SANDTREE_CRASH_SEED` (default below); it is printed so that a failure replays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandtree_tests::*;

const DEFAULT_SEED: u64 = 0x5eed_c0de_2026;
const ITERATIONS: usize = 6;

/// What the test knows about the episode's live path. Index = turn (index 0 is the base).
struct Model {
    actions: Vec<String>,
    /// Content of `/workspace/tNNN.txt` written at each turn.
    tags: Vec<String>,
    /// Highest turn known to be committed (everything up to it was settled by `stats`).
    committed: u32,
    /// Node ids already forked and checked.
    verified: BTreeSet<u64>,
}

impl Model {
    fn head(&self) -> u32 {
        (self.actions.len() - 1) as u32
    }
}

fn parse(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {s:?}: {e}"))
}

fn tree(svc: &Service, ep: &str) -> serde_json::Value {
    parse(&svc.ok(&["tree", ep, "--json"]))
}

fn episodes(svc: &Service) -> Vec<serde_json::Value> {
    svc.ok(&["list", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse)
        .collect()
}

fn turn_cmd(t: u32, tag: &str) -> String {
    let write = format!("echo {tag} > /workspace/t{t:03}.txt");
    if t == 1 {
        format!("{write}; sleep 1000 </dev/null >/dev/null 2>&1 &")
    } else {
        write
    }
}

/// Runs the next turn; returns it. With `check`, the turn first prints [`CHECK`] (the state the
/// turn starts from) and that must match the model.
fn turn(svc: &Service, ep: &str, m: &mut Model, rng: &mut Rng, iter: usize, check: bool) -> u32 {
    let t = m.head() + 1;
    let tag = format!("i{iter}t{t}r{:x}", rng.below(1 << 32));
    let mut cmd = turn_cmd(t, &tag);
    if check {
        cmd = format!("{CHECK}; {cmd}");
    }
    let r = svc.step(ep, &cmd);
    assert_eq!(r["turn"], t as u64, "step {cmd:?}: {r}");
    assert_eq!(r["exit_code"], 0, "step {cmd:?}: {r}");
    if check {
        assert_eq!(
            r["stdout"].as_str().unwrap(),
            expected_check(m, t - 1),
            "episode {ep} at turn {}: {r}",
            t - 1
        );
    }
    m.actions.push(cmd);
    m.tags.push(tag);
    t
}

/// What a sandbox at turn `t` must print for [`CHECK`].
fn expected_check(m: &Model, t: u32) -> String {
    let mut s = String::new();
    for tag in &m.tags[1..=t as usize] {
        s.push_str(tag);
        s.push('\n');
    }
    s.push_str(&format!("sleepers={}\n", u32::from(t >= 1)));
    s
}

const CHECK: &str = "cat /workspace/t*.txt; echo sleepers=$(pidof sleep | wc -w)";

/// Forks the episode at turn `t` and checks the copy's files and daemon.
fn verify_fork(svc: &Service, ep: &str, m: &Model, t: u32) {
    let f = svc.ok(&["fork", ep, "--turn", &t.to_string()]);
    let f = f.trim();
    let r = svc.step(f, CHECK);
    assert_eq!(
        r["stdout"].as_str().unwrap(),
        expected_check(m, t),
        "fork {f} of {ep} at committed turn {t}: {r}"
    );
    svc.ok(&["delete", f]);
}

/// The reconcile summary of the latest start: (reaped, unborn, stopped, abandoned, orphans
/// removed).
fn last_reconcile(log: &str) -> (u64, u64, u64, u64, u64) {
    let clean = strip_ansi(log);
    let line = clean
        .lines()
        .rev()
        .find(|l| l.contains("reconciled: "))
        .unwrap_or_else(|| panic!("no reconcile line in the log:\n{}", tail(&clean)));
    let rest = &line[line.find("reconciled: ").unwrap() + "reconciled: ".len()..];
    let n: Vec<u64> = rest
        .split(", ")
        .map(|p| {
            p.split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("cannot parse reconcile line {line:?}"))
        })
        .collect();
    assert_eq!(n.len(), 5, "reconcile line {line:?}");
    (n[0], n[1], n[2], n[3], n[4])
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The cgroup dirs that hold this service's sandboxes (see service/runtime/src/cgroup.rs): the
/// service runs in our cgroups, below `sandtree/<instance>`, `<instance>` being the FNV-1a tag
/// of its canonical data dir (service/src/main.rs `instance_tag`).
fn instance_cgroups(data_dir: &Path) -> Vec<PathBuf> {
    let canon = std::fs::canonicalize(data_dir).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let tag = format!("{:012x}", h & 0xffff_ffff_ffff);
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut it = line.splitn(3, ':');
        let (_, ctrls, path) = (it.next(), it.next().unwrap_or(""), it.next().unwrap_or("/"));
        let rel = path.trim_start_matches('/');
        let mnt = if ctrls.is_empty() {
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.join("cgroup.controllers").exists())
        } else {
            ["memory", "pids"]
                .iter()
                .find(|c| ctrls.split(',').any(|x| x == **c))
                .map(|c| Path::new("/sys/fs/cgroup").join(c))
        };
        if let Some(m) = mnt {
            let d = m.join(rel).join("sandtree").join(&tag);
            if d.is_dir() && !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    assert!(
        !dirs.is_empty(),
        "no sandtree/{tag} cgroup dir found for {}",
        canon.display()
    );
    dirs
}

fn sandbox_cgroups(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Committed non-base nodes reachable from any listed episode: node id -> turn kind.
fn committed_nodes(svc: &Service) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for e in episodes(svc) {
        let tr = tree(svc, e["id"].as_str().unwrap());
        for t in tr["turns"].as_array().unwrap() {
            if t["state"] == "committed" && t["kind"] != "base" {
                out.insert(
                    t["node"].as_u64().unwrap(),
                    t["kind"].as_str().unwrap().into(),
                );
            }
        }
    }
    out
}

/// Every snapshot, volume and CRIU image dir on disk belongs to a committed node, and every
/// committed node still has its artifacts. Returns the number of snapshots seen.
fn assert_no_orphans(svc: &Service, when: &str) -> usize {
    let committed = committed_nodes(svc);
    let root = svc.dir.join("data/storage/mnt/sandtree");
    let mut snaps: BTreeMap<String, String> = BTreeMap::new();
    for vol in names(&root.join("snapshots")) {
        let inner = names(&root.join("snapshots").join(&vol));
        assert!(
            !inner.is_empty(),
            "{when}: empty snapshot dir snapshots/{vol} left behind"
        );
        for s in inner {
            if let Some(prev) = snaps.insert(s.clone(), vol.clone()) {
                panic!("{when}: snapshot {s} exists under {prev} and {vol}");
            }
        }
    }
    for sub in ["volumes", "meta", "tmp"] {
        assert_eq!(
            names(&root.join(sub)),
            Vec::<String>::new(),
            "{when}: {sub}/ must be empty after reconcile (no live sandbox)"
        );
    }
    let want: BTreeSet<String> = committed.keys().map(|n| format!("n{n}")).collect();
    let have: BTreeSet<String> = snaps.keys().cloned().collect();
    let orphans: Vec<_> = have.difference(&want).collect();
    let lost: Vec<_> = want.difference(&have).collect();
    assert!(
        orphans.is_empty(),
        "{when}: orphan snapshots (no committed node): {orphans:?} (committed: {committed:?})"
    );
    assert!(
        lost.is_empty(),
        "{when}: committed nodes without a snapshot: {lost:?}"
    );
    let imgs: BTreeSet<String> = names(&svc.dir.join("data/images")).into_iter().collect();
    let want_imgs: BTreeSet<String> = committed
        .iter()
        .filter(|(_, k)| *k == "full")
        .map(|(n, _)| format!("n{n}"))
        .collect();
    assert_eq!(
        imgs, want_imgs,
        "{when}: CRIU image dirs on disk vs committed full nodes"
    );
    snaps.len()
}

/// (pid, start time) of a process, from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(u32, u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ... starttime(22nd)": comm may hold spaces, so split after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((pid, f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// The running `sandtree serve` on this data dir.
fn service_pid(data_dir: &Path) -> u32 {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.iter().any(|a| a == "serve") && args.contains(&needle)
            })
        })
        .unwrap_or_else(|| panic!("no sandtree serve process for {needle}"))
}

/// Every descendant of `root` as (pid, start time): CRIU and shims at work.
fn descendants(root: u32) -> Vec<(u32, u64)> {
    let all: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect();
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, start) in &all {
            if ppid == p && !out.iter().any(|(x, _)| *x == pid) {
                out.push((pid, start));
                frontier.push(pid);
            }
        }
    }
    out
}

/// Processes of `procs` that still run (same pid and start time).
fn survivors(procs: &[(u32, u64)]) -> Vec<String> {
    procs
        .iter()
        .filter(|(pid, start)| proc_stat(*pid).is_some_and(|(_, _, s)| s == *start))
        .map(|(pid, _)| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid} {:?}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            )
        })
        .collect()
}

/// `sandtree fork` run as a child process, so that the service can be killed while it runs.
fn spawn_fork(svc: &Service, ep: &str, turn: u32) -> std::process::Child {
    Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["fork", ep, "--turn", &turn.to_string(), "--count", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sandtree fork")
}

#[test]
fn kill9_anywhere_loses_no_committed_node_and_leaves_no_orphan() {
    if !require_sandbox_host() {
        return;
    }
    let started = Instant::now();
    let seed = std::env::var("SANDTREE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("crash_kill9_recovery: seed {seed} (set SANDTREE_CRASH_SEED to replay)");
    let mut rng = Rng::new(seed);
    let mut svc = Service::start(Storage::Btrfs);
    let cgroups = instance_cgroups(&svc.dir.join("data"));
    let ep = svc.create("busybox", "full");
    let mut m = Model {
        actions: vec![String::new()],
        tags: vec![String::new()],
        committed: 0,
        verified: BTreeSet::new(),
    };
    for _ in 0..2 {
        turn(&svc, &ep, &mut m, &mut rng, 0, false);
    }
    let (mut truncations, mut stray_forks, mut restores) = (0, 0, 0);
    for iter in 1..=ITERATIONS {
        let scenario = ["a: after a step", "b: after stats", "c: during a fork"][(iter - 1) % 3];
        let delay = Duration::from_millis(rng.below(300));
        let mut fork_child = None;
        match scenario.as_bytes()[0] {
            b'a' => {
                for _ in 0..=rng.below(2) {
                    turn(&svc, &ep, &mut m, &mut rng, iter, false);
                }
                std::thread::sleep(delay);
            }
            b'b' => {
                turn(&svc, &ep, &mut m, &mut rng, iter, false);
                svc.ok(&["stats", "--json"]);
                m.committed = m.head();
                std::thread::sleep(delay);
            }
            _ => {
                turn(&svc, &ep, &mut m, &mut rng, iter, false);
                svc.ok(&["stats"]);
                m.committed = m.head();
                let at = 1 + rng.below(u64::from(m.head())) as u32;
                fork_child = Some(spawn_fork(&svc, &ep, at));
                std::thread::sleep(delay);
            }
        }
        let returned = m.head();
        let old = descendants(service_pid(&svc.dir.join("data")));
        svc.kill9();
        let fork_result = fork_child.map(|c| c.wait_with_output().unwrap());
        svc.restart();
        let (reaped, unborn, stopped, abandoned, removed) = last_reconcile(&svc.log());
        eprintln!(
            "iter {iter} ({scenario}, kill after {delay:?}): reconcile reaped {reaped} sandboxes, \
             dropped {unborn} unborn episodes, stopped {stopped} episodes, abandoned {abandoned} pending nodes, removed {removed} orphans; \
             the killed service had {} descendant processes",
            old.len()
        );

        // No child of the killed service (CRIU, shims) survives the restart; sandbox processes are
        // not its children but live in its sandbox cgroups, which must all be gone (a cgroup with a
        // process in it cannot be removed).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !survivors(&old).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            survivors(&old).is_empty(),
            "iter {iter}: processes of the killed service still run after the restart: {:?}",
            survivors(&old)
        );
        // No sandbox of the killed service survives the restart.
        let left = sandbox_cgroups(&cgroups);
        assert!(
            left.is_empty(),
            "iter {iter}: sandbox cgroups left after restart: {left:?}"
        );

        // Every committed turn is still there; only the turn whose checkpoint was running may go.
        let tr = tree(&svc, &ep);
        assert_eq!(tr["episode"]["status"], "stopped", "iter {iter}: {tr}");
        let head = tr["episode"]["turn"].as_u64().unwrap() as u32;
        assert!(
            head >= m.committed && head <= returned,
            "iter {iter}: head turn {head} after restart; known committed {}, returned {returned}",
            m.committed
        );
        assert!(
            returned - head <= 1,
            "iter {iter}: {} turns lost; only the last checkpoint can be in flight",
            returned - head
        );
        assert_eq!(
            abandoned,
            u64::from(returned - head),
            "iter {iter}: the turn dropped from the tree must be reported as an abandoned pending node"
        );
        truncations += returned - head;
        let turns = tr["turns"].as_array().unwrap();
        assert_eq!(turns.len(), head as usize + 1, "iter {iter}: {tr}");
        for (t, rec) in turns.iter().enumerate() {
            assert_eq!(rec["turn"], t as u64);
            assert_eq!(
                rec["action"].as_str().unwrap(),
                m.actions[t],
                "iter {iter} turn {t}"
            );
            let state = rec["state"].as_str().unwrap();
            assert!(
                state == "committed" || (state == "failed" && t as u32 != head),
                "iter {iter} turn {t}: node {} is {state}: {tr}",
                rec["node"]
            );
            if state == "failed" {
                eprintln!("iter {iter}: turn {t} node {} failed", rec["node"]);
            }
        }
        m.actions.truncate(head as usize + 1);
        m.tags.truncate(head as usize + 1);
        m.committed = head;

        // A fork that was cut off: episodes whose ids the client got are stopped in the tree;
        // the others never got a sandbox and were dropped at restart. The test deletes the rest.
        let others: Vec<String> = episodes(&svc)
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .filter(|id| *id != ep)
            .collect();
        if let Some(o) = &fork_result {
            eprintln!(
                "iter {iter}: interrupted fork exited {} (stdout {:?}); episodes besides the source: {others:?}",
                o.status,
                String::from_utf8_lossy(&o.stdout).trim()
            );
            let returned: Vec<String> = if o.status.success() {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .collect()
            } else {
                Vec::new()
            };
            for id in &returned {
                assert!(
                    others.iter().any(|x| x == id),
                    "fork {id} was returned but is gone"
                );
            }
            for id in &others {
                assert!(
                    returned.contains(id),
                    "iter {iter}: episode {id} was never returned to the client but survived the restart"
                );
            }
        } else {
            assert!(
                others.is_empty(),
                "iter {iter}: unexpected episodes {others:?}"
            );
        }
        stray_forks += others.len();

        let snaps = assert_no_orphans(&svc, &format!("iter {iter} after restart"));
        for id in &others {
            svc.ok(&["delete", id]);
        }
        assert_eq!(
            assert_no_orphans(&svc, &format!("iter {iter} after deleting cut-off forks")),
            snaps,
            "deleting forks that made no turn frees nothing of the source"
        );

        // Every committed node not yet checked is forkable and holds its turn's state.
        for (t, rec) in turns.iter().enumerate().skip(1) {
            let node = rec["node"].as_u64().unwrap();
            if rec["state"] == "committed" && !m.verified.contains(&node) {
                verify_fork(&svc, &ep, &m, t as u32);
                m.verified.insert(node);
                restores += 1;
            }
        }
        // The episode continues from its head, daemon included.
        svc.ok(&["rewind", &ep, "--turn", &head.to_string()]);
        restores += 1;
        turn(&svc, &ep, &mut m, &mut rng, iter, true);
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "crash test is too slow: {:?} after iteration {iter}",
            started.elapsed()
        );
    }

    // Final: everything committed (the last turn too), then delete everything: nothing may stay
    // behind.
    svc.ok(&["stats"]);
    let tr = tree(&svc, &ep);
    for rec in tr["turns"].as_array().unwrap().iter().skip(1) {
        assert_eq!(rec["state"], "committed", "{tr}");
    }
    let head = tr["episode"]["turn"].as_u64().unwrap() as u32;
    verify_fork(&svc, &ep, &m, head);
    svc.ok(&["delete", &ep]);
    assert!(episodes(&svc).is_empty());
    let root = svc.dir.join("data/storage/mnt/sandtree");
    for sub in ["snapshots", "volumes", "meta", "tmp"] {
        assert_eq!(
            names(&root.join(sub)),
            Vec::<String>::new(),
            "{sub}/ after deleting every episode"
        );
    }
    assert_eq!(names(&root.join("images")), vec!["busybox".to_string()]);
    assert_eq!(
        names(&svc.dir.join("data/images")),
        Vec::<String>::new(),
        "CRIU image dirs after deleting every episode"
    );
    let left = sandbox_cgroups(&cgroups);
    assert!(
        left.is_empty(),
        "sandbox cgroups left after deleting every episode: {left:?}"
    );
    eprintln!(
        "crash_kill9_recovery: {ITERATIONS} kills, {truncations} in-flight turns dropped, \
         {stray_forks} cut-off fork episodes, {restores} restores checked, {:?}",
        started.elapsed()
    );
    drop(svc);
    // The instance's own cgroup dirs (the service leaves them for its next start).
    for d in cgroups.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}
