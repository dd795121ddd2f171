//! The engine on fakes: the recording runtime/checkpointer/inspector of `sandtree_engine::fake`
//! and the in-memory snapshot backend of `sandtree_storage::fake`, over a real redb tree. No
//! root, no processes; seconds.
//!
//! Every test ends by checking that the tree, the storage and the sandboxes agree
//! (`assert_consistent`) and that the engine never used a sandbox that was not running.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandtree_branching::{
    EpisodeId, EpisodeMeta, EpisodeStatus, NodeKind, NodeState, Policy, Tree, TreeError, TurnKind,
};
use sandtree_engine::fake::FakeParts;
use sandtree_engine::{Config, Engine, EngineError, StepOptions};
use sandtree_storage::fake::FakeBackend;
use sandtree_storage::{Entry, SnapshotBackend};

struct Rig {
    engine: Arc<Engine>,
    parts: Arc<FakeParts>,
    storage: Arc<FakeBackend>,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn rig_with(tune: impl FnOnce(&mut Config)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(FakeBackend::with_root(dir.path().join("storage")));
    storage.create_base("img", &mut |_| Ok(())).unwrap();
    let parts = Arc::new(FakeParts::with_storage(storage.clone()));
    let tree = Tree::open(dir.path().join("sandtree.redb")).unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        default_timeout_ms: 10_000,
        out_cap: 1 << 20,
        checkpoint_slots: 2,
        scheduler: sandtree_engine::Discipline::Edf,
        checkpoint_express: 2,
        max_image_chain: 4,
        restore_slots: 4,
        max_episodes: 64,
        disk_bytes: 0,
        warm_budget_bytes: 64 << 20,
    };
    tune(&mut config);
    let engine = Engine::new(
        tree,
        storage.clone(),
        sandtree_engine::Parts {
            runtime: parts.clone(),
            checkpointer: parts.clone(),
            inspector: parts.clone(),
            files: parts.clone(),
        },
        config,
    )
    .unwrap();
    Rig {
        engine: Arc::new(engine),
        parts,
        storage,
        _dir: dir,
    }
}

async fn create(r: &Rig, policy: Policy) -> EpisodeId {
    r.engine
        .create("img", policy, EpisodeMeta::default())
        .await
        .unwrap()
}

async fn step(r: &Rig, id: &EpisodeId, cmd: &str) -> Result<u32, EngineError> {
    r.engine
        .step(id, cmd.to_string(), StepOptions::default(), None)
        .await
        .map(|o| o.turn)
}

/// The node that turn `turn` of `id` stands on.
fn node_at(r: &Rig, id: &EpisodeId, turn: u32) -> sandtree_branching::Node {
    let tree = r.engine.tree();
    tree.node(tree.turn(id, turn).unwrap().node).unwrap()
}

fn kinds(r: &Rig, id: &EpisodeId) -> Vec<TurnKind> {
    let tree = r.engine.tree();
    let turns = tree.turns(id).unwrap();
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            sandtree_branching::turn_kind(
                t,
                i.checked_sub(1).map(|j| &turns[j]),
                &tree.node(t.node).unwrap().kind,
            )
        })
        .collect()
}

/// Tree, storage and sandboxes agree, and no sandbox was used when it was not running.
async fn assert_consistent(r: &Rig) {
    r.engine.settle_checkpoints().await;
    assert_eq!(r.parts.violations(), Vec::<String>::new(), "sandbox misuse");
    let tree = r.engine.tree();
    let entries = r.storage.list().unwrap();
    let snapshots: HashSet<(String, String)> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Snapshot { volume, name } => Some((volume.clone(), name.clone())),
            _ => None,
        })
        .collect();
    let volumes: HashSet<String> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Volume { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for n in tree.all_nodes().unwrap() {
        if n.state == NodeState::Committed && !matches!(n.kind, NodeKind::Base { .. }) {
            let s = n
                .snapshot
                .as_ref()
                .expect("a committed node has a snapshot");
            assert!(
                snapshots.contains(&(s.volume.clone(), s.snap.clone())),
                "committed node {} lost its snapshot {s:?}",
                n.id
            );
            if n.kind == NodeKind::Full {
                let i = n.images.as_ref().expect("a full node has images");
                assert!(
                    std::path::Path::new(i).is_dir(),
                    "node {} lost its images",
                    n.id
                );
            }
        }
        if let NodeState::Failed { .. } = n.state {
            if let Some(s) = &n.snapshot {
                assert!(
                    !snapshots.contains(&(s.volume.clone(), s.snap.clone())),
                    "failed node {} kept a snapshot",
                    n.id
                );
            }
        }
    }
    let running: HashSet<String> = r.parts.running().into_iter().collect();
    let mut expected = HashSet::new();
    for ep in tree.list_episodes(false).unwrap() {
        if ep.status == EpisodeStatus::Running {
            let v = ep.volume.clone().expect("a running episode has a volume");
            assert!(running.contains(&v), "episode {} runs on no sandbox", ep.id);
            assert!(volumes.contains(&v), "episode {} has no volume {v}", ep.id);
            expected.insert(v);
        }
    }
    assert_eq!(running, expected, "sandboxes without a running episode");
    assert_eq!(r.engine.live_episodes(), expected.len());
}

#[tokio::test]
async fn each_turn_gets_the_node_its_verdict_asks_for() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    step(&r, &ep, "echo hi").await.unwrap();
    step(&r, &ep, "touch /a").await.unwrap();
    step(&r, &ep, "daemon &").await.unwrap();
    // Files change beside a living process: the node must hold the process too.
    step(&r, &ep, "touch /b").await.unwrap();
    r.engine.settle_checkpoints().await;
    assert_eq!(
        kinds(&r, &ep),
        vec![
            TurnKind::Base,
            TurnKind::Shared,
            TurnKind::Fs,
            TurnKind::Full,
            TurnKind::Full
        ]
    );
    let full = rig();
    let e2 = create(&full, Policy::Full).await;
    step(&full, &e2, "echo hi").await.unwrap();
    full.engine.settle_checkpoints().await;
    assert_eq!(kinds(&full, &e2), vec![TurnKind::Base, TurnKind::Full]);
    assert_consistent(&r).await;
    assert_consistent(&full).await;
}

#[tokio::test]
async fn forks_and_rewinds_restore_the_right_nodes() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    step(&r, &ep, "touch /a").await.unwrap();
    step(&r, &ep, "daemon &").await.unwrap();
    let forks = r.engine.fork(&ep, 1, 2).await.unwrap();
    assert_eq!(forks.len(), 2);
    let from_full = r.engine.fork(&ep, 2, 1).await.unwrap();
    let calls = r.parts.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with(&format!("restore {}-0", from_full[0]))),
        "a fork of a full node restores its image: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c == &format!("start {}-0", forks[0])),
        "a fork of an fs node starts a fresh init on the snapshot: {calls:?}"
    );
    r.engine.rewind(&ep, 1).await.unwrap();
    assert_eq!(r.engine.tree().episode(&ep).unwrap().turn, 1);
    assert_eq!(
        r.engine.tree().episode(&ep).unwrap().volume.as_deref(),
        Some(format!("{ep}-1").as_str())
    );
    step(&r, &ep, "echo after").await.unwrap();
    for f in forks.iter().chain(&from_full) {
        step(&r, f, "echo fork").await.unwrap();
    }
    r.engine.delete(&forks[0]).await.unwrap();
    assert!(matches!(
        step(&r, &forks[0], "echo x").await,
        Err(EngineError::Tree(TreeError::EpisodeDeleted(_)))
    ));
    assert_consistent(&r).await;
    r.engine.shutdown().await;
    assert!(r.parts.running().is_empty(), "shutdown stops every sandbox");
}

/// A fork or rewind to the turn whose checkpoint is still being taken waits for it (the actor
/// settles it first), instead of refusing a node that is about to be committed.
#[tokio::test]
async fn fork_and_rewind_wait_for_the_checkpoint_in_flight() {
    let r = rig();
    r.parts.slow_dumps(300);
    let ep = create(&r, Policy::Full).await;
    let t = step(&r, &ep, "daemon &").await.unwrap();
    let forks = r.engine.fork(&ep, t, 1).await.unwrap();
    let t2 = step(&r, &forks[0], "echo x").await.unwrap();
    let nested = r.engine.fork(&forks[0], t2, 1).await.unwrap();
    step(&r, &ep, "touch /b").await.unwrap();
    let t3 = step(&r, &nested[0], "touch /c").await.unwrap();
    r.engine.rewind(&nested[0], t3).await.unwrap();
    assert_consistent(&r).await;
}

#[tokio::test]
async fn a_failed_dump_fails_its_node_and_keeps_the_episode() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    r.parts.fail_next("dump");
    let t = step(&r, &ep, "daemon &").await.unwrap();
    r.engine.settle_checkpoints().await;
    let node = node_at(&r, &ep, t);
    assert!(matches!(node.state, NodeState::Failed { .. }), "{node:?}");
    // Not restorable, and nothing was torn down for it.
    assert!(matches!(
        r.engine.fork(&ep, t, 1).await,
        Err(EngineError::Tree(TreeError::NodeCollected { .. }))
    ));
    assert!(matches!(
        r.engine.rewind(&ep, t).await,
        Err(EngineError::Tree(TreeError::NodeCollected { .. }))
    ));
    step(&r, &ep, "echo still here").await.unwrap();
    assert_consistent(&r).await;
}

#[tokio::test]
async fn a_failed_snapshot_inside_the_dump_fails_the_node() {
    let r = rig();
    let ep = create(&r, Policy::Full).await;
    r.storage.fail_next("snapshot");
    let t = step(&r, &ep, "echo x").await.unwrap();
    r.engine.settle_checkpoints().await;
    let node = node_at(&r, &ep, t);
    assert!(matches!(node.state, NodeState::Failed { .. }), "{node:?}");
    assert!(
        r.parts.calls().iter().any(|c| c.starts_with("discard ")),
        "the partial image is discarded"
    );
    assert_consistent(&r).await;
}

#[tokio::test]
async fn a_failed_clone_or_restore_leaves_no_episode_behind() {
    for (fault, turn) in [("clone_snapshot", 1), ("restore", 2), ("start", 1)] {
        let r = rig();
        let ep = create(&r, Policy::Auto).await;
        step(&r, &ep, "touch /a").await.unwrap();
        step(&r, &ep, "daemon &").await.unwrap();
        r.engine.settle_checkpoints().await;
        if fault == "clone_snapshot" {
            r.storage.fail_next(fault);
        } else {
            r.parts.fail_next(fault);
        }
        let e = r.engine.fork(&ep, turn, 3).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("injected fault"),
            "{fault}: {e:#}"
        );
        let left: Vec<_> = r
            .engine
            .tree()
            .list_episodes(false)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(left, vec![ep.clone()], "{fault}: forks left behind");
        assert_consistent(&r).await;
        // And the source still works, and forks once the fault is gone.
        step(&r, &ep, "echo ok").await.unwrap();
        assert_eq!(r.engine.fork(&ep, turn, 2).await.unwrap().len(), 2);
        assert_consistent(&r).await;
    }
}

#[tokio::test]
async fn a_failed_rewind_stops_the_episode_cleanly_and_a_later_rewind_revives_it() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    step(&r, &ep, "daemon &").await.unwrap();
    step(&r, &ep, "echo later").await.unwrap();
    r.engine.settle_checkpoints().await;
    r.parts.fail_next("restore");
    assert!(r.engine.rewind(&ep, 1).await.is_err());
    assert_eq!(
        r.engine.tree().episode(&ep).unwrap().status,
        EpisodeStatus::Stopped
    );
    assert!(matches!(
        step(&r, &ep, "echo x").await,
        Err(EngineError::Precondition(_))
    ));
    assert_consistent(&r).await;
    r.engine.rewind(&ep, 1).await.unwrap();
    step(&r, &ep, "echo back").await.unwrap();
    assert_consistent(&r).await;
}

#[tokio::test]
async fn max_episodes_is_never_exceeded() {
    let r = rig_with(|c| c.max_episodes = 3);
    let a = create(&r, Policy::Auto).await;
    step(&r, &a, "touch /x").await.unwrap();
    r.engine.settle_checkpoints().await;
    assert!(matches!(
        r.engine.fork(&a, 1, 3).await,
        Err(EngineError::Exhausted(_))
    ));
    let f = r.engine.fork(&a, 1, 2).await.unwrap();
    assert!(matches!(
        r.engine
            .create("img", Policy::Auto, Default::default())
            .await,
        Err(EngineError::Exhausted(_))
    ));
    // A rewind of a live episode needs no new place.
    r.engine.rewind(&a, 0).await.unwrap();
    r.engine.delete(&f[0]).await.unwrap();
    create(&r, Policy::Auto).await;
    assert_eq!(r.engine.live_episodes(), 3);
    assert_consistent(&r).await;
}

/// A failure after every number of operations, over one script of creates, steps, forks,
/// rewinds and deletes: whatever fails, the tree, storage and sandboxes stay consistent, and
/// once the fault is gone every running episode steps again.
#[tokio::test]
async fn faults_after_n_operations_keep_everything_consistent() {
    for n in 0..60u64 {
        eprintln!("fault after {n} operations");
        let r = rig();
        let ep = create(&r, Policy::Auto).await;
        r.parts.fail_after(n);
        r.storage.fail_after(n / 2);
        let _ = step(&r, &ep, "touch /a").await;
        let _ = step(&r, &ep, "daemon &").await;
        let forks = r.engine.fork(&ep, 1, 2).await.unwrap_or_default();
        let _ = r.engine.fork(&ep, 2, 1).await;
        let _ = step(&r, &ep, "touch /b").await;
        let _ = r.engine.rewind(&ep, 1).await;
        for f in &forks {
            let _ = step(&r, f, "kill").await;
        }
        if let Some(f) = forks.first() {
            let _ = r.engine.delete(f).await;
        }
        r.engine.settle_checkpoints().await;
        r.parts.heal();
        r.storage.heal();
        assert_consistent(&r).await;
        for e in r.engine.tree().list_episodes(false).unwrap() {
            match e.status {
                EpisodeStatus::Running => {
                    if let Err(err) = step(&r, &e.id, "echo alive").await {
                        // Only a sandbox ahead of its tree may refuse, and says so.
                        assert!(
                            format!("{err}").contains("rewind or fork"),
                            "n={n}: {}: {err}",
                            e.id
                        );
                    }
                }
                _ => {
                    let _ = r.engine.rewind(&e.id, 0).await;
                }
            }
        }
        assert_consistent(&r).await;
        r.engine.shutdown().await;
        assert!(r.parts.running().is_empty(), "n={n}");
    }
}

/// Random step/write/read/fork/rewind/delete/tree/stats calls from 8 tasks on 8 shared
/// episodes, 1,200 in all, with slow commands so that they overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_interleavings_never_touch_a_torn_down_sandbox() {
    let r = rig_with(|c| c.max_episodes = 1_000);
    let mut eps = Vec::new();
    for _ in 0..8 {
        eps.push(create(&r, Policy::Auto).await);
    }
    let eps = Arc::new(std::sync::Mutex::new(eps));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (engine, eps) = (r.engine.clone(), eps.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut unclear = Vec::new();
            for _ in 0..150 {
                let id = {
                    let e = eps.lock().unwrap();
                    e[next(e.len() as u64) as usize].clone()
                };
                let turn = engine.tree().episode(&id).map(|e| e.turn).unwrap_or(0);
                let r: Result<(), EngineError> = match next(10) {
                    0..=2 => {
                        let cmd = [
                            "touch /f", "daemon &", "kill", "echo hi", "sleep 5", "openw /f",
                        ][next(6) as usize];
                        engine
                            .step(&id, cmd.into(), StepOptions::default(), None)
                            .await
                            .map(|_| ())
                    }
                    3 => engine
                        .write_file(&id, "/w".into(), b"x".to_vec(), 0o644)
                        .await
                        .map(|_| ()),
                    4 => engine.read_file(&id, "/w".into(), 0).await.map(|_| ()),
                    5 => engine
                        .fork(&id, next(turn as u64 + 1) as u32, 1)
                        .await
                        .map(|f| eps.lock().unwrap().extend(f)),
                    6 => engine.rewind(&id, next(turn as u64 + 1) as u32).await,
                    7 => {
                        if eps.lock().unwrap().len() > 4 {
                            engine.delete(&id).await
                        } else {
                            Ok(())
                        }
                    }
                    8 => engine.tree_view(&id).await.map(|_| ()),
                    _ => engine.charges().await.map(|_| ()),
                };
                // Every answer is a success or an error that says what to do; none is internal.
                if let Err(EngineError::Internal(e)) = &r {
                    unclear.push(format!("{id}: {e:#}"));
                }
            }
            unclear
        }));
    }
    let mut unclear = Vec::new();
    for t in tasks {
        unclear.extend(t.await.unwrap());
    }
    assert_eq!(unclear, Vec::<String>::new());
    assert_consistent(&r).await;
    r.engine.shutdown().await;
    assert!(r.parts.running().is_empty());
    assert_eq!(r.parts.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_never_wait_behind_a_step() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    let engine = r.engine.clone();
    let id = ep.clone();
    let slow = tokio::spawn(async move {
        engine
            .step(&id, "sleep 1500".into(), StepOptions::default(), None)
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    r.engine.charges().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "stats waited {:?} behind another step",
        t.elapsed()
    );
    // A second step on the same episode waits for the first: one owner, in order.
    let t = Instant::now();
    step(&r, &ep, "echo after").await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1000));
    assert_eq!(slow.await.unwrap().unwrap().turn, 1);
    assert_consistent(&r).await;
}

/// A step's wait for its own episode's previous checkpoint, with one checkpoint place taken by
/// another episode's slow dump.
async fn wait_behind_a_slow_dump(discipline: sandtree_engine::Discipline) -> Duration {
    let r = rig_with(|c| {
        c.checkpoint_slots = 1;
        c.scheduler = discipline;
    });
    r.parts.slow_dumps(800);
    let (x, y) = (
        create(&r, Policy::Auto).await,
        create(&r, Policy::Auto).await,
    );
    // x's turn leaves a process running: a full checkpoint that holds the one place for 800 ms.
    step(&r, &x, "sleep 1 &").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // y's turn changes files: its fs checkpoint queues behind x's dump.
    step(&r, &y, "touch f").await.unwrap();
    let out = r
        .engine
        .step(&y, "echo next".into(), StepOptions::default(), None)
        .await
        .unwrap();
    assert_consistent(&r).await;
    assert_eq!(node_at(&r, &y, 1).state, NodeState::Committed);
    Duration::from_micros(out.waited_us)
}

#[tokio::test]
async fn a_step_never_waits_for_another_episodes_checkpoint() {
    let edf = wait_behind_a_slow_dump(sandtree_engine::Discipline::Edf).await;
    let fifo = wait_behind_a_slow_dump(sandtree_engine::Discipline::Fifo).await;
    // edf promotes y's own checkpoint past the cap; fifo (the old semaphore) makes it wait out
    // x's dump, which shows the measurement can tell them apart.
    assert!(edf < Duration::from_millis(300), "edf: waited {edf:?}");
    assert!(fifo >= Duration::from_millis(500), "fifo: waited {fifo:?}");
}

#[tokio::test]
async fn fs_checkpoints_due_together_are_one_storage_batch() {
    let r = rig_with(|c| c.checkpoint_slots = 1);
    r.parts.slow_dumps(500);
    let x = create(&r, Policy::Auto).await;
    let mut eps = Vec::new();
    for _ in 0..3 {
        eps.push(create(&r, Policy::Auto).await);
    }
    step(&r, &x, "sleep 1 &").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for ep in &eps {
        step(&r, ep, "touch f").await.unwrap();
    }
    assert_consistent(&r).await;
    let batches: Vec<String> = r
        .storage
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("snapshot_many "))
        .collect();
    assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    assert_eq!(
        batches[0].split(' ').count(),
        4,
        "three snapshots in it: {batches:?}"
    );
    for ep in &eps {
        let n = node_at(&r, ep, 1);
        assert_eq!((n.kind, n.state), (NodeKind::Fs, NodeState::Committed));
    }
    // Each snapshot was taken while its own sandbox was frozen.
    let calls = r.parts.calls();
    for ep in &eps {
        let frozen = calls
            .iter()
            .filter(|c| c.starts_with("freeze") && c.contains(&ep.0))
            .count();
        assert!(frozen >= 2, "{ep}: freeze and thaw: {calls:?}");
    }
}

/// Whether the storage fake was ever asked for a snapshot named after `node`.
fn snapshot_taken(r: &Rig, node: sandtree_branching::NodeId) -> bool {
    r.storage
        .calls()
        .iter()
        .any(|c| c.contains(&format!("@n{}", node.0)) || c.ends_with(&format!(" n{}", node.0)))
}

/// An fs verdict whose volume did not change (a file opened for writing, nothing written) gets
/// no snapshot: the turn shares its parent turn's node, which fork and rewind then restore; a
/// turn that wrote keeps its node. Counted per episode and since start.
#[tokio::test]
async fn an_fs_verdict_without_a_storage_change_is_refuted() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    // Right after creation: the volume is the base's clone, unchanged.
    step(&r, &ep, "openw /etc/hostname").await.unwrap();
    let t2 = step(&r, &ep, "touch /a").await.unwrap();
    let out = r
        .engine
        .step(&ep, "openw /a".into(), StepOptions::default(), None)
        .await
        .unwrap();
    let (t3, asked) = (out.turn, out.node);
    step(&r, &ep, "touch /b").await.unwrap();
    r.engine.settle_checkpoints().await;
    assert_eq!(
        kinds(&r, &ep),
        vec![
            TurnKind::Base,
            TurnKind::Shared,
            TurnKind::Fs,
            TurnKind::Shared,
            TurnKind::Fs
        ]
    );
    let n2 = node_at(&r, &ep, t2);
    assert_eq!(
        node_at(&r, &ep, t3).id,
        n2.id,
        "shares its parent turn's node"
    );
    assert!(
        !snapshot_taken(&r, asked),
        "no snapshot for the refuted node"
    );
    assert!(matches!(
        r.engine.tree().node(asked),
        Err(TreeError::UnknownNode(_))
    ));
    let rec = r.engine.tree().turn(&ep, t3).unwrap();
    assert_eq!(rec.verdict.kind, sandtree_branching::VerdictKind::Fs);
    assert!(
        rec.verdict.reasons.iter().any(|w| w.contains("refuted")),
        "{:?}",
        rec.verdict.reasons
    );
    assert_eq!(node_at(&r, &ep, 4).parent, Some(n2.id));
    assert_eq!(r.engine.fs_verdicts_refuted(), 2);
    let charges = r.engine.charges().await.unwrap();
    let c = charges.iter().find(|(e, _)| e.id == ep).unwrap().1;
    assert_eq!(
        (c.nodes_fs, c.turns_shared, c.fs_verdicts_refuted),
        (2, 2, 2)
    );

    // Fork and rewind to the refuted turn restore the parent node's snapshot.
    let f = r.engine.fork(&ep, t3, 1).await.unwrap();
    let want = format!("clone_snapshot {ep}-0 n{} {}-0", n2.id.0, f[0]);
    assert!(r.storage.calls().contains(&want), "{want}");
    r.engine.rewind(&ep, t3).await.unwrap();
    let want = format!("clone_snapshot {ep}-0 n{} {ep}-1", n2.id.0);
    assert!(r.storage.calls().contains(&want), "{want}");
    assert_consistent(&r).await;
}

/// A fresh clone has no snapshot of its own: right after a fork (or rewind), a turn that wrote
/// nothing is refuted onto the fork point's node, and one that wrote is not.
#[tokio::test]
async fn right_after_a_fork_only_a_turn_that_wrote_nothing_is_refuted() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    step(&r, &ep, "touch /a").await.unwrap();
    let n1 = node_at(&r, &ep, 1);
    let f = r.engine.fork(&ep, 1, 2).await.unwrap();
    step(&r, &f[0], "openw /a").await.unwrap();
    step(&r, &f[1], "echo x > /a").await.unwrap();
    r.engine.rewind(&ep, 1).await.unwrap();
    step(&r, &ep, "openw /a").await.unwrap();
    r.engine.settle_checkpoints().await;
    assert_eq!(node_at(&r, &f[0], 2).id, n1.id, "unchanged clone: refuted");
    assert_eq!(
        node_at(&r, &ep, 2).id,
        n1.id,
        "unchanged after a rewind: refuted"
    );
    let wrote = node_at(&r, &f[1], 2);
    assert_eq!(
        (wrote.kind, wrote.state),
        (NodeKind::Fs, NodeState::Committed)
    );
    assert_eq!(wrote.parent, Some(n1.id));
    assert_consistent(&r).await;
}

/// Only fs nodes on a committed parent, and only on a definite answer: a full node (processes
/// may have changed), a turn whose parent node failed, and a storage layer that cannot answer
/// all get their checkpoint as before.
#[tokio::test]
async fn full_nodes_failed_parents_and_storage_errors_are_never_refuted() {
    let r = rig();
    let ep = create(&r, Policy::Auto).await;
    step(&r, &ep, "daemon &").await.unwrap();
    // Beside a living process an fs verdict asks for a full node.
    step(&r, &ep, "openw /a").await.unwrap();
    step(&r, &ep, "kill").await.unwrap();
    // (Each fault is set once the checkpoints in flight are done, so it hits the next one.)
    r.engine.settle_checkpoints().await;
    r.storage.fail_next("changed_since_last_snapshot");
    step(&r, &ep, "openw /a").await.unwrap();
    r.engine.settle_checkpoints().await;
    r.storage.fail_next("snapshot_many");
    step(&r, &ep, "touch /b").await.unwrap();
    step(&r, &ep, "openw /b").await.unwrap();
    r.engine.settle_checkpoints().await;
    let full = rig();
    let e2 = create(&full, Policy::Full).await;
    step(&full, &e2, "openw /a").await.unwrap();
    full.engine.settle_checkpoints().await;
    assert_eq!(kinds(&full, &e2), vec![TurnKind::Base, TurnKind::Full]);
    assert_eq!(
        kinds(&r, &ep),
        vec![
            TurnKind::Base,
            TurnKind::Full,
            TurnKind::Full,
            TurnKind::Full,
            TurnKind::Fs,
            TurnKind::Fs,
            TurnKind::Fs
        ]
    );
    assert_eq!(node_at(&r, &ep, 4).state, NodeState::Committed);
    assert!(matches!(
        node_at(&r, &ep, 5).state,
        NodeState::Failed { .. }
    ));
    assert_eq!(node_at(&r, &ep, 6).state, NodeState::Committed);
    assert_eq!(r.engine.fs_verdicts_refuted(), 0);
    assert_consistent(&r).await;
    assert_consistent(&full).await;
}

/// In a batch only the volumes that changed are frozen and snapshotted; the others are
/// refuted without being frozen.
#[tokio::test]
async fn a_batch_snapshots_only_the_volumes_that_changed() {
    let r = rig_with(|c| c.checkpoint_slots = 1);
    r.parts.slow_dumps(500);
    let x = create(&r, Policy::Auto).await;
    let mut eps = Vec::new();
    for _ in 0..4 {
        eps.push(create(&r, Policy::Auto).await);
    }
    step(&r, &x, "sleep 1 &").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (i, ep) in eps.iter().enumerate() {
        let cmd = if i % 2 == 0 { "touch f" } else { "openw f" };
        step(&r, ep, cmd).await.unwrap();
    }
    assert_consistent(&r).await;
    let batches: Vec<String> = r
        .storage
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("snapshot_many "))
        .collect();
    assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    assert_eq!(
        batches[0].split(' ').count(),
        3,
        "two snapshots: {batches:?}"
    );
    let calls = r.parts.calls();
    for (i, ep) in eps.iter().enumerate() {
        let n = node_at(&r, ep, 1);
        let frozen = calls
            .iter()
            .any(|c| c.starts_with("freeze") && c.contains(&ep.0));
        if i % 2 == 0 {
            assert_eq!((n.kind, n.state), (NodeKind::Fs, NodeState::Committed));
            assert!(frozen, "{ep} was snapshotted frozen");
        } else {
            assert!(matches!(n.kind, NodeKind::Base { .. }), "{ep}: {n:?}");
            assert!(!frozen, "{ep} was frozen for nothing");
        }
    }
    assert_eq!(r.engine.fs_verdicts_refuted(), 2);
}
