//! Model-based test: random operation sequences run against both the redb
//! tree and a deliberately naive in-memory model (episodes own copies of their
//! path; liveness is recomputed from scratch), compared after every step.
//!
//! Protects: live paths, turn numbering after fork/rewind, error kinds, GC
//! safety (no live node is ever garbage) and completeness (every unreachable
//! node is garbage), refcounts, checkpoint-byte accounting, reconcile, and refuting a pending
//! fs node (its turns re-pointed to its parent node, its row gone).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use sandtree_branching::{
    EpisodeId, EpisodeStatus, NodeId, NodeKind, NodeState, Policy, Tree, TreeError, TurnId,
    VerdictKind, ABANDONED_REASON,
};

#[derive(Debug, Clone)]
enum Op {
    Create,
    Step { ep: Sel, verdict: u8, ckpt: u8 },
    Commit { node: Sel },
    Fail { node: Sel },
    Refute { node: Sel },
    Fork { ep: Sel, t: Sel, count: usize },
    Rewind { ep: Sel, t: Sel },
    Stop { ep: Sel },
    Delete { ep: Sel },
    Pin { node: usize, on: bool },
    Evict { node: usize },
    Gc,
    Restart,
}

/// A selector: an index reduced modulo the candidates. `biased` selectors
/// pick among the candidates most likely to succeed (running episodes,
/// pending nodes, in-range turns); the others pick among all, to exercise the
/// error paths.
#[derive(Debug, Clone, Copy)]
struct Sel {
    i: usize,
    biased: bool,
}

impl Sel {
    fn pick(self, all: usize, preferred: &[usize]) -> usize {
        if self.biased && !preferred.is_empty() {
            preferred[self.i % preferred.len()]
        } else {
            self.i % all
        }
    }

    /// A turn number in `0..len` when biased, else in `0..len + 2`.
    fn turn(self, len: usize) -> usize {
        if self.biased {
            self.i % len
        } else {
            self.i % (len + 2)
        }
    }
}

fn sel() -> impl Strategy<Value = Sel> + Clone {
    (0usize..1000, prop::bool::weighted(0.8)).prop_map(|(i, biased)| Sel { i, biased })
}

fn op() -> impl Strategy<Value = Op> {
    let sel = sel();
    prop_oneof![
        2 => Just(Op::Create),
        14 => (sel.clone(), 0u8..3, 0u8..3).prop_map(|(ep, verdict, ckpt)| Op::Step { ep, verdict, ckpt }),
        6 => sel.clone().prop_map(|node| Op::Commit { node }),
        1 => sel.clone().prop_map(|node| Op::Fail { node }),
        3 => sel.clone().prop_map(|node| Op::Refute { node }),
        3 => (sel.clone(), sel.clone(), 1usize..4).prop_map(|(ep, t, count)| Op::Fork { ep, t, count }),
        3 => (sel.clone(), sel.clone()).prop_map(|(ep, t)| Op::Rewind { ep, t }),
        1 => sel.clone().prop_map(|ep| Op::Stop { ep }),
        1 => sel.clone().prop_map(|ep| Op::Delete { ep }),
        1 => (0usize..1000, any::<bool>()).prop_map(|(node, on)| Op::Pin { node, on }),
        1 => (0usize..1000).prop_map(|node| Op::Evict { node }),
        2 => Just(Op::Gc),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MState {
    Pending,
    Committed,
    Failed,
    Collected,
    /// Refuted: the row is gone.
    Gone,
}

#[derive(Debug)]
struct MNode {
    id: NodeId,
    /// Fs, Full or Base.
    kind: &'static str,
    parent: Option<usize>,
    state: MState,
    pinned: bool,
    created_by: usize,
    bytes: u64,
}

#[derive(Debug)]
struct MTurn {
    id: TurnId,
    node: usize,
    cwd: String,
}

#[derive(Debug)]
struct MEp {
    id: EpisodeId,
    status: EpisodeStatus,
    /// Indices into `Model::turns`, turn 0 first.
    path: Vec<usize>,
    forked_from: Option<(usize, u32)>,
}

#[derive(Debug, Default)]
struct Model {
    eps: Vec<MEp>,
    turns: Vec<MTurn>,
    nodes: Vec<MNode>,
}

/// Error kinds the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    Deleted,
    NotRunning,
    OutOfRange,
    Collected,
    NotCommitted,
    NotPending,
    Invalid,
    Unknown,
}

fn kind<T>(r: &Result<T, TreeError>) -> Expect {
    match r {
        Ok(_) => Expect::Ok,
        Err(TreeError::EpisodeDeleted(_)) => Expect::Deleted,
        Err(TreeError::EpisodeNotRunning { .. }) => Expect::NotRunning,
        Err(TreeError::TurnOutOfRange { .. }) => Expect::OutOfRange,
        Err(TreeError::NodeCollected { .. }) => Expect::Collected,
        Err(TreeError::NodeNotCommitted { .. }) => Expect::NotCommitted,
        Err(TreeError::NodeNotPending { .. }) => Expect::NotPending,
        Err(TreeError::InvalidArgument(_)) => Expect::Invalid,
        Err(TreeError::UnknownNode(_)) => Expect::Unknown,
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

impl Model {
    fn live_turns(&self) -> BTreeSet<usize> {
        self.eps
            .iter()
            .filter(|e| e.status != EpisodeStatus::Deleted)
            .flat_map(|e| e.path.iter().copied())
            .collect()
    }

    fn refcount(&self, node: usize) -> u64 {
        let refs = self
            .live_turns()
            .into_iter()
            .filter(|&t| self.turns[t].node == node)
            .count() as u64;
        refs + u64::from(self.nodes[node].pinned)
    }

    fn garbage(&self) -> BTreeSet<NodeId> {
        (0..self.nodes.len())
            .filter(|&n| {
                !matches!(self.nodes[n].state, MState::Collected | MState::Gone)
                    && self.refcount(n) == 0
            })
            .map(|n| self.nodes[n].id)
            .collect()
    }

    /// Expected outcome of restoring turn `t` of episode `e`.
    fn restore_check(&self, e: usize, t: usize) -> Expect {
        let ep = &self.eps[e];
        if ep.status == EpisodeStatus::Deleted {
            return Expect::Deleted;
        }
        if t >= ep.path.len() {
            return Expect::OutOfRange;
        }
        match self.nodes[self.turns[ep.path[t]].node].state {
            MState::Committed => Expect::Ok,
            MState::Pending => Expect::NotCommitted,
            MState::Failed | MState::Collected => Expect::Collected,
            MState::Gone => panic!("a turn refers to a refuted node"),
        }
    }

    /// Expected outcome of refuting node `n`, in the order the tree checks.
    fn refute_check(&self, n: usize) -> Expect {
        let node = &self.nodes[n];
        match node.state {
            MState::Gone => return Expect::Unknown,
            MState::Pending => {}
            _ => return Expect::NotPending,
        }
        if node.kind != "fs" || node.pinned {
            return Expect::Invalid;
        }
        match self.nodes[node.parent.expect("an fs node has a parent")].state {
            MState::Committed => Expect::Ok,
            MState::Pending => Expect::NotCommitted,
            MState::Failed | MState::Collected => Expect::Collected,
            MState::Gone => panic!("a node's parent was refuted"),
        }
    }

    fn eps_with(&self, f: impl Fn(EpisodeStatus) -> bool) -> Vec<usize> {
        (0..self.eps.len())
            .filter(|&e| f(self.eps[e].status))
            .collect()
    }

    fn pending(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].state == MState::Pending)
            .collect()
    }

    fn node_index(&self, id: NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("node known to model")
    }
}

struct Harness {
    dir: tempfile::TempDir,
    tree: Option<Tree>,
    m: Model,
}

impl Harness {
    fn tree(&self) -> &Tree {
        self.tree.as_ref().expect("tree open")
    }

    fn apply(&mut self, op: &Op) {
        let neps = self.m.eps.len();
        let nnodes = self.m.nodes.len();
        match *op {
            Op::Create => {
                let env = vec![("HOME".to_owned(), "/root".to_owned())];
                let ep = self
                    .tree()
                    .create_episode("img:1", Policy::Auto, env.clone())
                    .unwrap();
                assert_eq!(ep.turn, 0);
                assert_eq!(ep.status, EpisodeStatus::Running);
                let t0 = self.tree().turn(&ep.id, 0).unwrap();
                assert_eq!(t0.session.cwd, "/");
                assert_eq!(t0.session.env, env);
                assert_eq!(t0.action, "");
                let base = self.tree().node(t0.node).unwrap();
                assert_eq!(
                    base.kind,
                    NodeKind::Base {
                        image: "img:1".into()
                    }
                );
                assert_eq!(base.state, NodeState::Committed);
                let e = self.m.eps.len();
                self.m.nodes.push(MNode {
                    id: base.id,
                    kind: "base",
                    parent: None,
                    state: MState::Committed,
                    pinned: false,
                    created_by: e,
                    bytes: 0,
                });
                self.m.turns.push(MTurn {
                    id: t0.id,
                    node: self.m.nodes.len() - 1,
                    cwd: "/".into(),
                });
                self.m.eps.push(MEp {
                    id: ep.id,
                    status: EpisodeStatus::Running,
                    path: vec![self.m.turns.len() - 1],
                    forked_from: None,
                });
            }
            Op::Step { ep, verdict, ckpt } if neps > 0 => {
                let e = ep.pick(neps, &self.m.eps_with(|s| s == EpisodeStatus::Running));
                let verdict =
                    [VerdictKind::None, VerdictKind::Fs, VerdictKind::Proc][verdict as usize];
                let new_node =
                    [None, Some(NodeKind::Fs), Some(NodeKind::Full)][ckpt as usize].clone();
                let action = format!("a{}", self.m.turns.len());
                let r = self.tree().append_turn(
                    &self.m.eps[e].id,
                    common::step(&action, verdict, new_node.clone()),
                );
                let expect = match self.m.eps[e].status {
                    EpisodeStatus::Deleted => Expect::Deleted,
                    EpisodeStatus::Stopped => Expect::NotRunning,
                    EpisodeStatus::Running => Expect::Ok,
                };
                assert_eq!(kind(&r), expect, "{op:?}");
                if let Ok((rec, node)) = r {
                    let path = &self.m.eps[e].path;
                    assert_eq!(rec.turn as usize, path.len(), "turn numbers continue");
                    assert_eq!(rec.parent, Some(self.m.turns[*path.last().unwrap()].id));
                    let head_node = self.m.turns[*path.last().unwrap()].node;
                    let node_idx = match (new_node, node) {
                        (None, None) => {
                            assert_eq!(rec.node, self.m.nodes[head_node].id, "shares head's node");
                            head_node
                        }
                        (Some(k), Some(n)) => {
                            assert_eq!(n.kind, k);
                            assert_eq!(n.state, NodeState::Pending);
                            assert_eq!(n.parent, Some(self.m.nodes[head_node].id));
                            assert_eq!(n.created_by, self.m.eps[e].id);
                            assert_eq!(rec.node, n.id);
                            self.m.nodes.push(MNode {
                                id: n.id,
                                kind: n.kind.as_str(),
                                parent: Some(head_node),
                                state: MState::Pending,
                                pinned: false,
                                created_by: e,
                                bytes: 0,
                            });
                            self.m.nodes.len() - 1
                        }
                        other => panic!("new node mismatch: {other:?}"),
                    };
                    self.m.turns.push(MTurn {
                        id: rec.id,
                        node: node_idx,
                        cwd: format!("/{action}"),
                    });
                    let t = self.m.turns.len() - 1;
                    self.m.eps[e].path.push(t);
                }
            }
            Op::Commit { node } if nnodes > 0 => {
                let n = node.pick(nnodes, &self.m.pending());
                let bytes = 100 + n as u64;
                let r = self.tree().commit_node(
                    self.m.nodes[n].id,
                    common::artifacts(self.m.nodes[n].id, bytes),
                );
                let expect = match self.m.nodes[n].state {
                    MState::Pending => Expect::Ok,
                    MState::Gone => Expect::Unknown,
                    _ => Expect::NotPending,
                };
                assert_eq!(kind(&r), expect, "{op:?}");
                if r.is_ok() {
                    self.m.nodes[n].state = MState::Committed;
                    self.m.nodes[n].bytes = bytes;
                }
            }
            Op::Fail { node } if nnodes > 0 => {
                let n = node.pick(nnodes, &self.m.pending());
                let r = self.tree().fail_node(self.m.nodes[n].id, "dump failed");
                let expect = match self.m.nodes[n].state {
                    MState::Pending => Expect::Ok,
                    MState::Gone => Expect::Unknown,
                    _ => Expect::NotPending,
                };
                assert_eq!(kind(&r), expect, "{op:?}");
                if r.is_ok() {
                    self.m.nodes[n].state = MState::Failed;
                }
            }
            Op::Refute { node } if nnodes > 0 => {
                let n = node.pick(nnodes, &self.m.pending());
                let id = self.m.nodes[n].id;
                let r = self.tree().refute_node(id, "refuted: no change");
                assert_eq!(kind(&r), self.m.refute_check(n), "{op:?}");
                if let Ok((parent, turns)) = r {
                    let p = self.m.nodes[n].parent.unwrap();
                    assert_eq!(parent.id, self.m.nodes[p].id);
                    let mut want = Vec::new();
                    for t in &mut self.m.turns {
                        if t.node == n {
                            t.node = p;
                            want.push(t.id);
                        }
                    }
                    want.sort();
                    assert_eq!(
                        turns, want,
                        "every turn on the refuted node, and only those"
                    );
                    for m in &mut self.m.nodes {
                        if m.parent == Some(n) {
                            m.parent = Some(p);
                        }
                    }
                    self.m.nodes[n].state = MState::Gone;
                }
            }
            Op::Fork { ep, t, count } if neps > 0 => {
                let e = ep.pick(neps, &self.m.eps_with(|s| s != EpisodeStatus::Deleted));
                let t = t.turn(self.m.eps[e].path.len());
                let r = self.tree().fork(&self.m.eps[e].id, t as u32, count);
                assert_eq!(kind(&r), self.m.restore_check(e, t), "{op:?}");
                if let Ok(forks) = r {
                    assert_eq!(forks.len(), count);
                    let path: Vec<usize> = self.m.eps[e].path[..=t].to_vec();
                    let want_node = self.m.nodes[self.m.turns[path[t]].node].id;
                    for (ep, node, session) in forks {
                        assert_eq!(ep.turn as usize, t);
                        assert_eq!(ep.status, EpisodeStatus::Running);
                        assert_eq!(ep.volume, None);
                        assert_eq!(ep.forked_from, Some((self.m.eps[e].id.clone(), t as u32)));
                        assert_eq!(node.id, want_node);
                        assert_eq!(session.cwd, self.m.turns[path[t]].cwd);
                        self.m.eps.push(MEp {
                            id: ep.id,
                            status: EpisodeStatus::Running,
                            path: path.clone(),
                            forked_from: Some((e, t as u32)),
                        });
                    }
                }
            }
            Op::Rewind { ep, t } if neps > 0 => {
                let e = ep.pick(neps, &self.m.eps_with(|s| s != EpisodeStatus::Deleted));
                let t = t.turn(self.m.eps[e].path.len());
                let r = self.tree().rewind(&self.m.eps[e].id, t as u32);
                assert_eq!(kind(&r), self.m.restore_check(e, t), "{op:?}");
                if let Ok((ep, node, session)) = r {
                    let path = &mut self.m.eps[e].path;
                    path.truncate(t + 1);
                    assert_eq!(ep.turn as usize, t);
                    assert_eq!(ep.status, EpisodeStatus::Running);
                    assert_eq!(node.id, self.m.nodes[self.m.turns[path[t]].node].id);
                    assert_eq!(session.cwd, self.m.turns[path[t]].cwd);
                    self.m.eps[e].status = EpisodeStatus::Running;
                }
            }
            Op::Stop { ep } if neps > 0 => {
                let e = ep.pick(neps, &self.m.eps_with(|s| s == EpisodeStatus::Running));
                let r = self
                    .tree()
                    .set_status(&self.m.eps[e].id, EpisodeStatus::Stopped);
                let expect = if self.m.eps[e].status == EpisodeStatus::Deleted {
                    Expect::Deleted
                } else {
                    Expect::Ok
                };
                assert_eq!(kind(&r), expect, "{op:?}");
                if r.is_ok() {
                    self.m.eps[e].status = EpisodeStatus::Stopped;
                }
            }
            Op::Delete { ep } if neps > 0 => {
                let e = ep.pick(neps, &self.m.eps_with(|s| s != EpisodeStatus::Deleted));
                let r = self.tree().delete_episode(&self.m.eps[e].id).unwrap();
                assert_eq!(r.status, EpisodeStatus::Deleted);
                self.m.eps[e].status = EpisodeStatus::Deleted;
            }
            Op::Pin { node, on } if nnodes > 0 => {
                let n = node % nnodes;
                let r = self.tree().pin(self.m.nodes[n].id, on);
                let expect = match self.m.nodes[n].state {
                    MState::Gone => Expect::Unknown,
                    MState::Failed | MState::Collected if on => Expect::Collected,
                    _ => Expect::Ok,
                };
                assert_eq!(kind(&r), expect, "{op:?}");
                if r.is_ok() {
                    self.m.nodes[n].pinned = on;
                }
            }
            Op::Evict { node } if nnodes > 0 => {
                let n = node % nnodes;
                let id = self.m.nodes[n].id;
                if self.m.nodes[n].state == MState::Gone {
                    assert!(matches!(
                        self.tree().forget_nodes(&[id]),
                        Err(TreeError::UnknownNode(_))
                    ));
                    return;
                }
                let was_live = self.m.refcount(n) > 0;
                let report = self.tree().forget_nodes(&[id]).unwrap();
                if self.m.nodes[n].state == MState::Collected {
                    assert!(report.collected.is_empty());
                } else {
                    assert_eq!(report.collected, vec![id]);
                    assert_eq!(report.were_live, if was_live { vec![id] } else { vec![] });
                }
                self.m.nodes[n].state = MState::Collected;
            }
            Op::Gc => {
                let garbage: Vec<NodeId> = self
                    .tree()
                    .garbage()
                    .unwrap()
                    .iter()
                    .map(|n| n.id)
                    .collect();
                let report = self.tree().forget_nodes(&garbage).unwrap();
                assert!(
                    report.were_live.is_empty(),
                    "garbage() returned a live node"
                );
                for id in garbage {
                    let n = self.m.node_index(id);
                    self.m.nodes[n].state = MState::Collected;
                }
            }
            Op::Restart => {
                drop(self.tree.take());
                self.tree = Some(Tree::open(common::db_path(&self.dir)).unwrap());
                let report = self.tree().reconcile().unwrap();
                // Model: pending -> failed, running -> stopped, heads back to
                // the latest committed turn.
                let mut abandoned = BTreeSet::new();
                for n in &mut self.m.nodes {
                    if n.state == MState::Pending {
                        n.state = MState::Failed;
                        abandoned.insert(n.id);
                    }
                }
                let mut stopped = BTreeSet::new();
                let mut truncated = BTreeMap::new();
                for ep in &mut self.m.eps {
                    if ep.status == EpisodeStatus::Deleted {
                        continue;
                    }
                    if ep.status == EpisodeStatus::Running {
                        ep.status = EpisodeStatus::Stopped;
                        stopped.insert(ep.id.clone());
                    }
                    let keep = ep
                        .path
                        .iter()
                        .rposition(|&t| {
                            self.m.nodes[self.m.turns[t].node].state == MState::Committed
                        })
                        .unwrap_or(0);
                    if keep + 1 != ep.path.len() {
                        truncated.insert(ep.id.clone(), (ep.path.len() as u32 - 1, keep as u32));
                        ep.path.truncate(keep + 1);
                    }
                }
                let got_abandoned: BTreeSet<NodeId> = report
                    .abandoned
                    .iter()
                    .map(|n| {
                        assert_eq!(
                            n.state,
                            NodeState::Failed {
                                reason: ABANDONED_REASON.into()
                            }
                        );
                        n.id
                    })
                    .collect();
                assert_eq!(got_abandoned, abandoned);
                assert_eq!(report.stopped.into_iter().collect::<BTreeSet<_>>(), stopped);
                let got_truncated: BTreeMap<EpisodeId, (u32, u32)> = report
                    .truncated
                    .into_iter()
                    .map(|t| (t.episode, (t.from, t.to)))
                    .collect();
                assert_eq!(got_truncated, truncated);
            }
            _ => {}
        }
    }

    /// Compares everything observable with the model.
    fn check(&self) {
        let tree = self.tree();
        let m = &self.m;
        for (e, ep) in m.eps.iter().enumerate() {
            let got = tree.episode(&ep.id).unwrap();
            assert_eq!(got.status, ep.status, "status of {}", ep.id);
            assert_eq!(
                got.forked_from,
                ep.forked_from.map(|(src, t)| (m.eps[src].id.clone(), t))
            );
            if ep.status == EpisodeStatus::Deleted {
                assert!(matches!(
                    tree.turns(&ep.id),
                    Err(TreeError::EpisodeDeleted(_))
                ));
                continue;
            }
            assert_eq!(got.turn as usize, ep.path.len() - 1);
            assert_eq!(got.head, m.turns[*ep.path.last().unwrap()].id);
            let recs = tree.turns(&ep.id).unwrap();
            assert_eq!(recs.len(), ep.path.len(), "live path length of {}", ep.id);
            for (i, (rec, &t)) in recs.iter().zip(&ep.path).enumerate() {
                assert_eq!(rec.turn as usize, i);
                assert_eq!(rec.id, m.turns[t].id, "live path of {} at turn {i}", ep.id);
                assert_eq!(rec.node, m.nodes[m.turns[t].node].id);
            }
            // Distinct nodes on the path, and bytes charged to the creator.
            let mut distinct = Vec::new();
            for &t in &ep.path {
                if !distinct.contains(&m.turns[t].node) {
                    distinct.push(m.turns[t].node);
                }
            }
            let got_nodes: Vec<NodeId> = tree
                .episode_nodes(&ep.id)
                .unwrap()
                .iter()
                .map(|n| n.id)
                .collect();
            assert_eq!(
                got_nodes,
                distinct.iter().map(|&n| m.nodes[n].id).collect::<Vec<_>>()
            );
            let bytes: u64 = distinct
                .iter()
                .map(|&n| &m.nodes[n])
                .filter(|n| n.created_by == e && n.state == MState::Committed)
                .map(|n| n.bytes)
                .sum();
            assert_eq!(tree.episode_checkpoint_bytes(&ep.id).unwrap(), bytes);
        }
        let listed: BTreeSet<EpisodeId> = tree
            .list_episodes(false)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        let want: BTreeSet<EpisodeId> = m
            .eps
            .iter()
            .filter(|e| e.status != EpisodeStatus::Deleted)
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(listed, want);
        assert_eq!(tree.list_episodes(true).unwrap().len(), m.eps.len());

        let all = tree.all_nodes().unwrap();
        assert_eq!(
            all.len(),
            m.nodes.iter().filter(|n| n.state != MState::Gone).count()
        );
        for (i, n) in m.nodes.iter().enumerate() {
            if n.state == MState::Gone {
                assert!(matches!(tree.node(n.id), Err(TreeError::UnknownNode(_))));
                continue;
            }
            let got = tree.node(n.id).unwrap();
            assert_eq!(got.kind.as_str(), n.kind);
            assert_eq!(
                got.parent,
                n.parent.map(|p| m.nodes[p].id),
                "parent of node {}",
                n.id
            );
            let state = match got.state {
                NodeState::Pending => MState::Pending,
                NodeState::Committed => MState::Committed,
                NodeState::Failed { .. } => MState::Failed,
                NodeState::Collected => MState::Collected,
            };
            assert_eq!(state, n.state, "state of node {}", n.id);
            assert_eq!(got.pinned, n.pinned);
            assert_eq!(got.created_by, m.eps[n.created_by].id);
            assert_eq!(
                tree.refcount(n.id).unwrap(),
                m.refcount(i),
                "refcount of node {}",
                n.id
            );
        }
        let garbage: BTreeSet<NodeId> = tree.garbage().unwrap().iter().map(|n| n.id).collect();
        assert_eq!(garbage, m.garbage(), "garbage set");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

fn run(ops: &[Op]) {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let mut h = Harness {
        dir,
        tree: Some(tree),
        m: Model::default(),
    };
    for op in ops {
        h.apply(op);
        h.check();
    }
    // Finally everything becomes garbage once nothing roots it, and GC then
    // leaves no turn record behind.
    for e in 0..h.m.eps.len() {
        h.tree().delete_episode(&h.m.eps[e].id).unwrap();
        h.m.eps[e].status = EpisodeStatus::Deleted;
    }
    for n in 0..h.m.nodes.len() {
        if h.m.nodes[n].state == MState::Gone {
            continue;
        }
        h.tree().pin(h.m.nodes[n].id, false).unwrap();
        h.m.nodes[n].pinned = false;
    }
    h.check();
    h.apply(&Op::Gc);
    h.check();
    assert!(h.tree().garbage().unwrap().is_empty());
    for n in h.tree().all_nodes().unwrap() {
        assert_eq!(n.state, NodeState::Collected, "node {} not collected", n.id);
    }
    drop(h.tree.take());
    let db = redb::Database::open(common::db_path(&h.dir)).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let turns: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("turns");
    let table = txn.open_table(turns).unwrap();
    assert_eq!(
        redb::ReadableTableMetadata::len(&table).unwrap(),
        0,
        "turn records leaked"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn tree_matches_reference_model(ops in prop::collection::vec(op(), 1..100)) {
        run(&ops);
    }
}

/// A fixed scenario the random search may take a while to hit: fork at t,
/// rewind the source below t, and the fork keeps the shared history alive.
#[test]
fn fork_keeps_shared_history_alive_after_source_rewinds() {
    let any = |i| Sel { i, biased: false };
    let ops = [
        Op::Create,
        Op::Step {
            ep: any(0),
            verdict: 1,
            ckpt: 1,
        },
        Op::Commit { node: any(1) },
        Op::Step {
            ep: any(0),
            verdict: 0,
            ckpt: 0,
        },
        Op::Step {
            ep: any(0),
            verdict: 2,
            ckpt: 2,
        },
        Op::Commit { node: any(2) },
        Op::Fork {
            ep: any(0),
            t: any(3),
            count: 2,
        },
        Op::Step {
            ep: any(1),
            verdict: 1,
            ckpt: 1,
        },
        Op::Rewind {
            ep: any(0),
            t: any(1),
        },
        Op::Gc,
        Op::Delete { ep: any(1) },
        Op::Gc,
        Op::Restart,
        Op::Delete { ep: any(2) },
        Op::Gc,
    ];
    run(&ops);
}
