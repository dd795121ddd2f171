//! Forks of forks, at any depth: a property test over random episode trees.
//!
//! Each tree has a root episode and three levels of forks below it (depth 3). Every episode, at
//! every level, runs a random sequence of steps that always contains one that starts or talks to
//! a background process (a counter daemon holding its count in memory, or a long sleep) and one
//! that writes files. Each fork is taken at a random turn of its parent, mostly at a turn the
//! parent ran itself after being restored, and checked against a model of the parent's state at
//! that turn:
//! - the files under /workspace, name and content;
//! - the process list (the daemon and every sleeper, by command line), and that every process is
//!   in init's time namespace;
//! - the daemon's in-memory counter, which the next tick must continue.
//!
//! Run on btrfs and zfs-fuse, under `full` and `auto`. The seed is printed and can be set with
//! `SANDTREE_NESTED_SEED`; `SANDTREE_NESTED_TREES` runs more trees per configuration (the bench's
//! long run), CI runs one.

use std::collections::BTreeMap;

use sandtree_tests::*;

/// What a sandbox holds after a turn, as far as the test can tell from outside.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    /// /workspace/NAME -> content
    files: BTreeMap<String, String>,
    /// The daemon's in-memory counter, if the daemon runs.
    daemon: Option<u64>,
    /// Tags of the running `sleep` processes (each sleeps a distinct number of seconds).
    sleepers: Vec<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    StartDaemon,
    Tick,
    StartSleeper(u64),
    KillSleeper(u64),
    Write(u64, u64),
    Remove(u64),
    Nothing,
}

/// The daemon: its count lives only in the shell's memory; a tick asks it (through /tmp/q) to
/// count and publish the count in /tmp/a, then waits until it did.
const DAEMON: &str = "sh -c 'n=0; while :; do if [ -e /tmp/q ]; then n=$((n+1)); \
    echo $n > /tmp/a.t; mv /tmp/a.t /tmp/a; rm -f /tmp/q; fi; sleep 0.02; done' stdaemon \
    </dev/null >/dev/null 2>&1 &";
const TICK: &str = "touch /tmp/q; i=0; while [ -e /tmp/q ] && [ $i -lt 500 ]; do \
    sleep 0.02; i=$((i+1)); done; [ -e /tmp/q ] && { echo 'no daemon answered'; exit 1; }; \
    cat /tmp/a";

impl Step {
    fn command(self) -> String {
        match self {
            Step::StartDaemon => DAEMON.to_string(),
            Step::Tick => TICK.to_string(),
            Step::StartSleeper(tag) => format!("sleep {tag} </dev/null >/dev/null 2>&1 &"),
            Step::KillSleeper(tag) => format!(
                "for p in /proc/[0-9]*; do [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = \
                 'sleep {tag} ' ] && kill ${{p#/proc/}}; done; true"
            ),
            Step::Write(k, v) => format!("mkdir -p /workspace && echo {v} > /workspace/f{k}"),
            Step::Remove(k) => format!("rm -f /workspace/f{k}"),
            Step::Nothing => "echo thinking".to_string(),
        }
    }

    /// Applies the step to the model; returns the stdout it must print, if it is known.
    fn apply(self, m: &mut Model) -> Option<String> {
        match self {
            Step::StartDaemon => m.daemon = Some(0),
            Step::Tick => {
                let n = m.daemon.as_mut().expect("tick without daemon");
                *n += 1;
                return Some(format!("{n}\n"));
            }
            Step::StartSleeper(tag) => m.sleepers.push(tag),
            Step::KillSleeper(tag) => m.sleepers.retain(|&t| t != tag),
            Step::Write(k, v) => {
                m.files.insert(format!("f{k}"), v.to_string());
            }
            Step::Remove(k) => {
                m.files.remove(&format!("f{k}"));
            }
            Step::Nothing => return Some("thinking\n".into()),
        }
        None
    }
}

/// A step that starts or talks to a background process, possible in state `sim`.
fn proc_step(rng: &mut Rng, sim: &Model, tags: &mut u64) -> Step {
    let pick = rng.below(4);
    if sim.daemon.is_none() && pick < 2 {
        Step::StartDaemon
    } else if sim.daemon.is_some() && pick < 2 {
        Step::Tick
    } else if !sim.sleepers.is_empty() && pick == 3 {
        Step::KillSleeper(sim.sleepers[rng.below(sim.sleepers.len() as u64) as usize])
    } else {
        *tags += 1;
        Step::StartSleeper(10_000 + *tags)
    }
}

/// A random run of 2..=4 steps for one episode that holds `m`: always one that starts or talks
/// to a background process and one that writes files, in random order, plus up to two more.
fn random_steps(rng: &mut Rng, m: &Model, tags: &mut u64) -> Vec<Step> {
    let mut sim = m.clone();
    let file_step = |rng: &mut Rng| {
        if rng.chance(20) {
            Step::Remove(rng.below(4))
        } else {
            Step::Write(rng.below(4), rng.below(1_000_000))
        }
    };
    let mut steps = Vec::new();
    let proc_first = rng.chance(50);
    for i in 0..2 + rng.below(3) {
        let s = match (i, proc_first) {
            (0, true) | (1, false) => proc_step(rng, &sim, tags),
            (0, false) | (1, true) => file_step(rng),
            _ => match rng.below(3) {
                0 => proc_step(rng, &sim, tags),
                1 => file_step(rng),
                _ => Step::Nothing,
            },
        };
        s.apply(&mut sim);
        steps.push(s);
    }
    steps
}

struct Episode {
    id: String,
    /// `models[t]`: the state after turn t (index 0: before the first turn).
    models: Vec<Model>,
    /// The first turn this episode ran itself (turns before it came from its parent).
    own_from: usize,
}

/// The check step: files, the process list and the time namespaces of every process.
const CHECK: &str = "cd /workspace 2>/dev/null && for f in f*; do [ -e \"$f\" ] && \
    echo \"file $f=$(cat $f)\"; done; for p in /proc/[0-9]*; do \
    c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); echo \"proc $c\"; \
    echo \"timens $(readlink $p/ns/time)\"; done";

fn check(svc: &Service, ep: &Episode, what: &str) {
    let want = ep.models.last().unwrap();
    let out = svc.step(&ep.id, CHECK);
    let stdout = out["stdout"].as_str().unwrap();
    let mut files = BTreeMap::new();
    let mut daemon = false;
    let mut sleepers = Vec::new();
    let mut timens: Vec<&str> = Vec::new();
    for line in stdout.lines() {
        if let Some(kv) = line.strip_prefix("file ") {
            let (k, v) = kv.split_once('=').unwrap();
            files.insert(k.to_string(), v.to_string());
        } else if let Some(cmd) = line.strip_prefix("proc ") {
            // (Between fork and exec, the daemon's `sleep 0.02` shows the daemon's command line
            // too, so two lines are not two daemons.)
            if cmd.starts_with("sh -c ") && cmd.contains("stdaemon") {
                daemon = true;
            } else if let Some(tag) = cmd.strip_prefix("sleep ") {
                if let Ok(t) = tag.trim().parse::<u64>() {
                    if t >= 10_000 {
                        sleepers.push(t);
                    }
                }
            }
        } else if let Some(ns) = line.strip_prefix("timens ") {
            // A process that exited between the listing and readlink prints nothing.
            if !ns.trim().is_empty() && !timens.contains(&ns) {
                timens.push(ns);
            }
        }
    }
    sleepers.sort();
    let mut want_sleepers = want.sleepers.clone();
    want_sleepers.sort();
    assert_eq!(files, want.files, "{what}: files\n{stdout}");
    assert_eq!(daemon, want.daemon.is_some(), "{what}: daemon\n{stdout}");
    assert_eq!(sleepers, want_sleepers, "{what}: sleepers\n{stdout}");
    assert_eq!(
        timens.len(),
        1,
        "{what}: every process in one time namespace\n{stdout}"
    );
}

fn run(svc: &Service, ep: &mut Episode, steps: &[Step]) {
    for &s in steps {
        let mut m = ep.models.last().unwrap().clone();
        let want = s.apply(&mut m);
        let out = svc.step(&ep.id, &s.command());
        assert_eq!(out["exit_code"], 0, "{} step {s:?}: {out}", ep.id);
        if let Some(w) = want {
            assert_eq!(out["stdout"].as_str().unwrap(), w, "{} step {s:?}", ep.id);
        }
        ep.models.push(m);
    }
    // The check is a turn too; it changes nothing.
    let m = ep.models.last().unwrap().clone();
    check(svc, ep, &format!("{} after its steps", ep.id));
    ep.models.push(m);
}

fn tree(storage: Storage, policy: &str, seed: u64) {
    eprintln!("nested forks on {policy}: seed {seed} (SANDTREE_NESTED_SEED={seed} to rerun)");
    let svc = Service::start(storage);
    let mut rng = Rng::new(seed);
    let mut tags = 0;
    let mut root = Episode {
        id: svc.create("busybox", policy),
        models: vec![Model::default()],
        own_from: 1,
    };
    let steps = random_steps(&mut rng, &Model::default(), &mut tags);
    run(&svc, &mut root, &steps);
    let mut all = vec![root];
    let mut level = vec![0usize];
    for depth in 1..=3 {
        let mut next = Vec::new();
        for &p in &level {
            // One or two forks per parent, fewer at the bottom to bound the run.
            let count = if depth < 3 { 1 + rng.below(2) } else { 1 };
            let parent = &all[p];
            let last = parent.models.len() - 1;
            // Mostly a turn the parent ran after it was itself restored.
            let turn = if depth > 1 && rng.chance(75) {
                parent.own_from + rng.below((last - parent.own_from + 1) as u64) as usize
            } else {
                1 + rng.below(last as u64) as usize
            };
            let ids: Vec<String> = svc
                .ok(&[
                    "fork",
                    &parent.id,
                    "--turn",
                    &turn.to_string(),
                    "--count",
                    &count.to_string(),
                ])
                .lines()
                .map(String::from)
                .collect();
            assert_eq!(ids.len(), count as usize);
            let models = parent.models[..=turn].to_vec();
            let what = format!("depth {depth}: fork of {} at turn {turn}", parent.id);
            for id in ids {
                let mut child = Episode {
                    id,
                    models: models.clone(),
                    own_from: turn + 1,
                };
                eprintln!("{what} -> {}", child.id);
                check(&svc, &child, &what);
                child.models.push(child.models.last().unwrap().clone());
                // The daemon's memory: the next tick continues the parent's count.
                let mut steps = Vec::new();
                if child.models.last().unwrap().daemon.is_some() {
                    steps.push(Step::Tick);
                }
                steps.extend(random_steps(
                    &mut rng,
                    child.models.last().unwrap(),
                    &mut tags,
                ));
                // The tick above counts as the run's background-process step when it is there.
                run(&svc, &mut child, &steps);
                next.push(all.len());
                all.push(child);
            }
        }
        level = next;
    }
    // A parent is not changed by forking it.
    check(&svc, &all[0], "root after every fork");
    for ep in &all {
        svc.ok(&["delete", &ep.id]);
    }
    assert_eq!(svc.ok(&["list"]).trim(), "", "every episode deleted");
}

fn seeds() -> Vec<u64> {
    let n: usize = std::env::var("SANDTREE_NESTED_TREES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let first = std::env::var("SANDTREE_NESTED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    (0..n as u64).map(|i| first.wrapping_add(i)).collect()
}

#[test]
fn nested_forks_btrfs_full() {
    if require_sandbox_host() {
        for s in seeds() {
            tree(Storage::Btrfs, "full", s);
        }
    }
}

#[test]
fn nested_forks_btrfs_auto() {
    if require_sandbox_host() {
        for s in seeds() {
            tree(Storage::Btrfs, "auto", s);
        }
    }
}

#[test]
fn nested_forks_zfs_fuse_full() {
    if require_sandbox_host() && require_zfs() {
        for s in seeds() {
            tree(Storage::Zfs, "full", s);
        }
    }
}

#[test]
fn nested_forks_zfs_fuse_auto() {
    if require_sandbox_host() && require_zfs() {
        for s in seeds() {
            tree(Storage::Zfs, "auto", s);
        }
    }
}
