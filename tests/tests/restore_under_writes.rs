//! Checkpoints taken while a writer appends to a file without pause restore consistently.
//!
//! Turn 1 of a `full`-policy busybox episode starts a writer that appends 1, 2, 3, ... to
//! `/workspace/log`, one line per `echo`, as fast as it can. The next turns each read the log with
//! the writer stopped (`n` lines, last line `t`) and are checkpointed with the writer running.
//! Then every turn's node is forked, several times, and each fork must:
//!
//! - restore at all (CRIU refuses a file whose size changed after the dump: the snapshot must be
//!   taken at the dump's frozen instant);
//! - hold a log whose last line is an integer equal to its line count: the file in the snapshot
//!   and the writer's counter in the CRIU image come from the same instant (a later snapshot would
//!   duplicate lines, an earlier one would leave a gap), and hold at least the lines the source
//!   had counted at that turn;
//! - keep writing: the log grows between two later steps, and stays consistent.

use std::time::Instant;

use sandtree_tests::*;

const LOG: &str = "/workspace/log";

fn writer_cmd() -> String {
    format!(
        "(i=0; while true; do i=$((i+1)); echo $i >> {LOG}; done) </dev/null >/dev/null 2>&1 & echo $!"
    )
}

/// Stops the writer (and waits until it is stopped), reads the log's line count and last line,
/// lets the writer go on. Prints "<count> <last line>".
fn read_cmd(writer: u32) -> String {
    format!(
        "kill -STOP {writer} && until grep -q stopped /proc/{writer}/status; do :; done; \
         n=$(wc -l < {LOG}); t=$(tail -n 1 {LOG}); kill -CONT {writer}; echo \"$n $t\""
    )
}

/// Runs [`read_cmd`] in `ep`; checks the log is 1..=n and returns n.
fn read_log(svc: &Service, ep: &str, writer: u32, what: &str) -> u64 {
    let r = svc.step(ep, &read_cmd(writer));
    assert_eq!(r["exit_code"], 0, "{what}: {r}");
    let out = r["stdout"].as_str().unwrap().trim().to_string();
    let (n, t) = out
        .split_once(' ')
        .unwrap_or_else(|| panic!("{what}: unexpected output {out:?}: {r}"));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("{what}: count {n:?}"));
    let t: u64 = t
        .parse()
        .unwrap_or_else(|_| panic!("{what}: last line {t:?} is not an integer ({out:?})"));
    assert_eq!(
        n, t,
        "{what}: the log has {n} lines but its last line is {t}: file and writer state are from \
         different instants"
    );
    n
}

/// `turns` checkpointed turns with the writer running; then every turn forked `count` copies at a
/// time, `rounds` times. Returns the number of restores.
fn restore_under_writes(storage: Storage, turns: u32, count: u32, rounds: u32) -> usize {
    let started = Instant::now();
    let svc = Service::start(storage);
    let ep = svc.create("busybox", "full");
    let r = svc.step(&ep, &writer_cmd());
    let writer: u32 = r["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .expect("writer pid");
    // counted[t]: lines the source saw during turn t; turn t's checkpoint comes after it.
    let mut counted = vec![0u64, 0];
    for t in 2..=turns {
        let n = read_log(&svc, &ep, writer, &format!("source turn {t}"));
        assert!(n >= *counted.last().unwrap(), "source turn {t}: log shrank");
        counted.push(n);
    }
    let settled = Instant::now();
    let st: serde_json::Value = serde_json::from_str(&svc.ok(&["stats", "--json"])).unwrap();
    eprintln!(
        "{turns} turns in {:?} (+{:?} to settle), dump p50 {:.0} ms, checkpoint p50 {:.0} ms, log at {} lines",
        settled - started,
        settled.elapsed(),
        st["dump_ms_p50"].as_f64().unwrap_or(0.0),
        st["checkpoint_ms_p50"].as_f64().unwrap_or(0.0),
        counted.last().unwrap()
    );
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", &ep, "--json"])).unwrap();
    for rec in tree["turns"].as_array().unwrap().iter().skip(1) {
        assert_eq!(rec["kind"], "full", "{tree}");
        assert_eq!(
            rec["state"], "committed",
            "every checkpoint under writes commits: {tree}"
        );
    }
    // Stop the source's writer so that it does not compete with the forks (a new turn: the
    // forked nodes keep theirs).
    svc.step(&ep, &format!("kill {writer}"));

    let mut restores = 0;
    let forking = Instant::now();
    for round in 0..rounds {
        for t in 1..=turns {
            let out = svc.ok(&[
                "fork",
                &ep,
                "--turn",
                &t.to_string(),
                "--count",
                &count.to_string(),
            ]);
            let forks: Vec<&str> = out.lines().collect();
            assert_eq!(forks.len(), count as usize, "fork --turn {t}: {out:?}");
            restores += forks.len();
            for f in &forks {
                let what = format!("round {round}: fork {f} of turn {t}");
                let n1 = read_log(&svc, f, writer, &format!("{what}, first step"));
                assert!(
                    n1 >= counted[t as usize],
                    "{what}: {n1} lines, fewer than the {} the source had counted before this \
                     checkpoint",
                    counted[t as usize]
                );
                let n2 = read_log(&svc, f, writer, &format!("{what}, second step"));
                assert!(
                    n2 > n1,
                    "{what}: the writer did not continue ({n1} then {n2} lines)"
                );
            }
            for f in &forks {
                svc.ok(&["delete", f]);
            }
        }
    }
    eprintln!(
        "{restores} restores under writes checked in {:?} ({:?} per restore); total {:?}",
        forking.elapsed(),
        forking.elapsed() / restores.max(1) as u32,
        started.elapsed()
    );
    svc.ok(&["delete", &ep]);
    restores
}

#[test]
fn restore_under_writes_btrfs() {
    if require_sandbox_host() {
        // 100 restores: every one of 10 turns forked 5 ways, twice.
        let n = restore_under_writes(Storage::Btrfs, 10, 5, 2);
        assert_eq!(n, 100);
    }
}

#[test]
fn restore_under_writes_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        // zfs-fuse is slow (~100 ms per snapshot or clone, and the writer goes through FUSE).
        let n = restore_under_writes(Storage::Zfs, 8, 2, 1);
        assert_eq!(n, 16);
    }
}
