//! [`Tree`]: the redb-backed checkpoint tree.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableError, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::error::{Result, TreeError};
use crate::now_unix_ms;
use crate::types::{
    Episode, EpisodeId, EpisodeMeta, EpisodeStatus, Family, FamilyTurn, ForgetReport, NewTurn,
    Node, NodeArtifacts, NodeId, NodeKind, NodeState, Observation, Policy, ReconcileReport,
    Session, Truncation, TurnId, TurnNo, TurnRecord, Verdict,
};

/// Schema version written to (and required in) the `meta` table.
pub const SCHEMA_VERSION: u64 = 1;

/// Reason recorded on pending nodes abandoned by [`Tree::reconcile`].
pub const ABANDONED_REASON: &str = "abandoned at restart";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EPISODES: TableDefinition<&str, &[u8]> = TableDefinition::new("episodes");
const TURNS: TableDefinition<u64, &[u8]> = TableDefinition::new("turns");
const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");

const KEY_SCHEMA: &str = "schema_version";
const KEY_NEXT_NODE: &str = "next_node_id";
const KEY_NEXT_TURN: &str = "next_turn_id";

/// The turn-aligned checkpoint tree, persisted in one redb file.
///
/// Every mutating method is a single redb write transaction: it either
/// happens completely or not at all, also across crashes. The type is
/// `Send + Sync`; concurrent writers are serialized by redb.
///
/// A failed read or write of the file (a full disk, an I/O error) fails
/// that call with [`TreeError::Disk`]. redb latches such a failure: every
/// later transaction on the same `Database` would fail too. So the tree
/// then closes the database and opens it again, which makes redb repair the
/// file to its last commit; if that open fails as well (the disk is still
/// full), each later call tries again and fails with the reason until it works.
pub struct Tree {
    path: PathBuf,
    /// The open database, and how many times it was opened. `None` after an
    /// I/O failure whose reopen failed.
    db: RwLock<(Option<Database>, u64)>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// (de)serialization and table helpers, generic over read and write tables

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| TreeError::Corrupt(format!("cannot encode value: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| TreeError::Corrupt(format!("cannot decode {what}: {e}")))
}

fn get_episode(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &EpisodeId,
) -> Result<Option<Episode>> {
    match t.get(id.as_str())? {
        Some(g) => Ok(Some(decode(g.value(), &format!("episode {id}"))?)),
        None => Ok(None),
    }
}

/// The episode, which must exist and not be deleted.
fn require_episode(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &EpisodeId,
) -> Result<Episode> {
    let ep = get_episode(t, id)?.ok_or_else(|| TreeError::UnknownEpisode(id.clone()))?;
    if ep.status == EpisodeStatus::Deleted {
        return Err(TreeError::EpisodeDeleted(id.clone()));
    }
    Ok(ep)
}

fn all_episodes(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Vec<Episode>> {
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push(decode(v.value(), &format!("episode {}", k.value()))?);
    }
    Ok(out)
}

fn get_turn(t: &impl ReadableTable<u64, &'static [u8]>, id: TurnId) -> Result<TurnRecord> {
    match t.get(id.0)? {
        Some(g) => decode(g.value(), &format!("turn record {id}")),
        None => Err(TreeError::Corrupt(format!("missing turn record {id}"))),
    }
}

fn get_node(t: &impl ReadableTable<u64, &'static [u8]>, id: NodeId) -> Result<Node> {
    match t.get(id.0)? {
        Some(g) => decode(g.value(), &format!("node {id}")),
        None => Err(TreeError::UnknownNode(id)),
    }
}

/// Like [`get_node`] but a missing node referenced from a turn is corruption.
fn get_referenced_node(t: &impl ReadableTable<u64, &'static [u8]>, id: NodeId) -> Result<Node> {
    get_node(t, id).map_err(|e| match e {
        TreeError::UnknownNode(n) => TreeError::Corrupt(format!("missing node {n}")),
        e => e,
    })
}

fn all_nodes(t: &impl ReadableTable<u64, &'static [u8]>) -> Result<Vec<Node>> {
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push(decode(v.value(), &format!("node {}", k.value()))?);
    }
    Ok(out)
}

fn put_episode(t: &mut Table<'_, &'static str, &'static [u8]>, ep: &Episode) -> Result<()> {
    t.insert(ep.id.as_str(), encode(ep)?.as_slice())?;
    Ok(())
}

fn put_turn(t: &mut Table<'_, u64, &'static [u8]>, rec: &TurnRecord) -> Result<()> {
    t.insert(rec.id.0, encode(rec)?.as_slice())?;
    Ok(())
}

fn put_node(t: &mut Table<'_, u64, &'static [u8]>, node: &Node) -> Result<()> {
    t.insert(node.id.0, encode(node)?.as_slice())?;
    Ok(())
}

fn next_id(meta: &mut Table<'_, &'static str, u64>, key: &str) -> Result<u64> {
    let v = meta.get(key)?.map_or(1, |g| g.value());
    meta.insert(key, v + 1)?;
    Ok(v)
}

/// The live path ending at `head`, root (turn 0) first. Checks that turn
/// numbers are consecutive.
fn path_to(t: &impl ReadableTable<u64, &'static [u8]>, head: TurnId) -> Result<Vec<TurnRecord>> {
    let mut out = Vec::new();
    let mut cur = Some(head);
    while let Some(id) = cur {
        let rec = get_turn(t, id)?;
        if let Some(prev) = out.last() {
            let prev: &TurnRecord = prev;
            if rec.turn.checked_add(1) != Some(prev.turn) {
                return Err(TreeError::Corrupt(format!(
                    "turn record {} (turn {}) has parent {} with turn {}",
                    prev.id, prev.turn, rec.id, rec.turn
                )));
            }
        }
        cur = rec.parent;
        out.push(rec);
    }
    out.reverse();
    match out.first() {
        Some(r) if r.turn == 0 => Ok(out),
        _ => Err(TreeError::Corrupt(format!(
            "path to turn record {head} does not start at turn 0"
        ))),
    }
}

/// The record at turn `t` on the episode's live path.
fn turn_at(
    t: &impl ReadableTable<u64, &'static [u8]>,
    ep: &Episode,
    turn: TurnNo,
) -> Result<TurnRecord> {
    if turn > ep.turn {
        return Err(TreeError::TurnOutOfRange {
            episode: ep.id.clone(),
            turn,
            max: ep.turn,
        });
    }
    let mut rec = get_turn(t, ep.head)?;
    while rec.turn > turn {
        let parent = rec.parent.ok_or_else(|| {
            TreeError::Corrupt(format!(
                "turn record {} (turn {}) has no parent",
                rec.id, rec.turn
            ))
        })?;
        rec = get_turn(t, parent)?;
    }
    if rec.turn != turn {
        return Err(TreeError::Corrupt(format!(
            "live path of episode {} skips turn {turn}",
            ep.id
        )));
    }
    Ok(rec)
}

/// The node to restore, which must be Committed.
fn restorable(t: &impl ReadableTable<u64, &'static [u8]>, id: NodeId) -> Result<Node> {
    let node = get_referenced_node(t, id)?;
    match &node.state {
        NodeState::Committed => Ok(node),
        NodeState::Pending => Err(TreeError::NodeNotCommitted { node: id }),
        state @ (NodeState::Failed { .. } | NodeState::Collected) => {
            Err(TreeError::NodeCollected {
                node: id,
                state: state.clone(),
            })
        }
    }
}

/// Result of the mark phase.
struct Liveness {
    /// Turn records reachable from the head of a non-deleted episode.
    turns: HashSet<TurnId>,
    /// Number of live turn records referencing each node.
    refs: HashMap<NodeId, u64>,
}

impl Liveness {
    fn refcount(&self, node: &Node) -> u64 {
        self.refs.get(&node.id).copied().unwrap_or(0) + u64::from(node.pinned)
    }

    fn is_live(&self, node: &Node) -> bool {
        self.refcount(node) > 0
    }
}

fn mark(
    eps: &impl ReadableTable<&'static str, &'static [u8]>,
    turns: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Liveness> {
    let mut live = Liveness {
        turns: HashSet::new(),
        refs: HashMap::new(),
    };
    for ep in all_episodes(eps)? {
        if ep.status == EpisodeStatus::Deleted {
            continue;
        }
        let mut cur = Some(ep.head);
        while let Some(id) = cur {
            if !live.turns.insert(id) {
                break;
            }
            let rec = get_turn(turns, id)?;
            *live.refs.entry(rec.node).or_insert(0) += 1;
            cur = rec.parent;
        }
    }
    Ok(live)
}

/// All four tables, opened in a write transaction.
struct WriteTables<'t> {
    meta: Table<'t, &'static str, u64>,
    eps: Table<'t, &'static str, &'static [u8]>,
    turns: Table<'t, u64, &'static [u8]>,
    nodes: Table<'t, u64, &'static [u8]>,
}

impl<'t> WriteTables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(WriteTables {
            meta: txn.open_table(META)?,
            eps: txn.open_table(EPISODES)?,
            turns: txn.open_table(TURNS)?,
            nodes: txn.open_table(NODES)?,
        })
    }

    /// A fresh, unused episode id.
    fn fresh_episode_id(&self) -> Result<EpisodeId> {
        loop {
            let id = EpisodeId::generate();
            if self.eps.get(id.as_str())?.is_none() {
                return Ok(id);
            }
        }
    }

    fn new_node(
        &mut self,
        parent: Option<NodeId>,
        kind: NodeKind,
        state: NodeState,
        created_by: &EpisodeId,
    ) -> Result<Node> {
        let node = Node {
            id: NodeId(next_id(&mut self.meta, KEY_NEXT_NODE)?),
            parent,
            kind,
            state,
            bytes: 0,
            image_bytes: 0,
            image_dumped_bytes: 0,
            image_parent: None,
            snapshot: None,
            images: None,
            timings_ms: None,
            created_unix_ms: now_unix_ms(),
            pinned: false,
            created_by: created_by.clone(),
        };
        put_node(&mut self.nodes, &node)?;
        Ok(node)
    }

    /// Episode `id`'s base node (image `image`, committed) and its turn 0 on it.
    fn new_root(&mut self, id: &EpisodeId, image: &str, session: Session) -> Result<TurnRecord> {
        let base = self.new_node(
            None,
            NodeKind::Base {
                image: image.to_owned(),
            },
            NodeState::Committed,
            id,
        )?;
        let root = TurnRecord {
            id: TurnId(next_id(&mut self.meta, KEY_NEXT_TURN)?),
            parent: None,
            turn: 0,
            action: String::new(),
            observation: Observation::default(),
            session,
            verdict: Verdict::default(),
            node: base.id,
        };
        put_turn(&mut self.turns, &root)?;
        Ok(root)
    }
}

/// Tables opened in a read transaction.
struct ReadTables {
    eps: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    turns: redb::ReadOnlyTable<u64, &'static [u8]>,
    nodes: redb::ReadOnlyTable<u64, &'static [u8]>,
}

impl ReadTables {
    fn open(txn: &ReadTransaction) -> Result<Self> {
        Ok(ReadTables {
            eps: txn.open_table(EPISODES)?,
            turns: txn.open_table(TURNS)?,
            nodes: txn.open_table(NODES)?,
        })
    }
}

/// Creates or opens the database (redb repairs it if it was not closed
/// cleanly) and checks its schema version.
fn open_db(path: &Path) -> Result<Database> {
    let db = Database::create(path)?;
    // Check the version read-only first, so a foreign version is never
    // touched.
    let found = {
        let txn = db.begin_read()?;
        match txn.open_table(META) {
            Ok(meta) => meta.get(KEY_SCHEMA)?.map(|g| g.value()),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match found {
        Some(v) if v != SCHEMA_VERSION => {
            return Err(TreeError::SchemaMismatch {
                found: v,
                expected: SCHEMA_VERSION,
            })
        }
        Some(_) => {}
        None => {
            let txn = db.begin_write()?;
            {
                let mut t = WriteTables::open(&txn)?;
                if !t.eps.is_empty()? || !t.turns.is_empty()? || !t.nodes.is_empty()? {
                    return Err(TreeError::Corrupt(
                        "database has data but no schema_version".into(),
                    ));
                }
                t.meta.insert(KEY_SCHEMA, SCHEMA_VERSION)?;
            }
            txn.commit()?;
            info!(path = %path.display(), version = SCHEMA_VERSION, "created checkpoint tree");
        }
    }
    // Make sure every table exists. Only written when one is missing: a
    // reopen after a full disk should not need space.
    let missing = {
        let txn = db.begin_read()?;
        let absent = |r: Result<(), TableError>| match r {
            Ok(()) => Ok(false),
            Err(TableError::TableDoesNotExist(_)) => Ok(true),
            Err(e) => Err(e),
        };
        absent(txn.open_table(EPISODES).map(drop))?
            | absent(txn.open_table(TURNS).map(drop))?
            | absent(txn.open_table(NODES).map(drop))?
    };
    if missing {
        let txn = db.begin_write()?;
        WriteTables::open(&txn)?;
        txn.commit()?;
    }
    debug!(path = %path.display(), "opened checkpoint tree");
    Ok(db)
}

impl Tree {
    /// Creates or opens the tree database at `path`.
    ///
    /// A new database gets schema version [`SCHEMA_VERSION`]; an existing one
    /// with another version is refused with [`TreeError::SchemaMismatch`]
    /// before anything is written to it.
    pub fn open(path: impl AsRef<Path>) -> Result<Tree> {
        let path = path.as_ref();
        let db = open_db(path)?;
        Ok(Tree {
            path: path.to_owned(),
            db: RwLock::new((Some(db), 1)),
        })
    }

    /// Runs `f` on the open database (opening it first if an earlier I/O
    /// failure closed it). An I/O failure in `f` closes the database and
    /// tries to open it again, so that the next call does not inherit it.
    fn with_db<R>(&self, f: impl FnOnce(&Database) -> Result<R>) -> Result<R> {
        for _ in 0..2 {
            let generation = {
                let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
                if let (Some(db), generation) = &*guard {
                    // Every transaction of `f` ends inside it, before the guard is dropped.
                    return match f(db) {
                        Err(e) => {
                            let generation = *generation;
                            drop(guard);
                            match self.disk_error(e, "cannot read or write it") {
                                Ok(disk) => {
                                    self.recover(generation);
                                    Err(disk)
                                }
                                Err(other) => Err(other),
                            }
                        }
                        ok => ok,
                    };
                }
                guard.1
            };
            self.reopen(generation)?;
        }
        Err(TreeError::Disk {
            path: self.path.clone(),
            what: "cannot reopen it",
            source: std::io::Error::other("it was closed again while it was being reopened"),
        })
    }

    /// `Ok(Disk)` if `e` is a failure of the file underneath (the database
    /// needs reopening), else `Err(e)` unchanged.
    fn disk_error(&self, e: TreeError, what: &'static str) -> Result<TreeError, TreeError> {
        let source = match e {
            TreeError::Storage(redb::Error::Io(io)) => io,
            TreeError::Storage(redb::Error::PreviousIo) => {
                std::io::Error::other("an earlier read or write of the database failed")
            }
            e => return Err(e),
        };
        Ok(TreeError::Disk {
            path: self.path.clone(),
            what,
            source,
        })
    }

    /// After an I/O failure on the database of `generation`: close it and
    /// open it again (redb repairs it). A failed open leaves it closed, and
    /// the next call tries again.
    fn recover(&self, generation: u64) {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if guard.1 != generation || guard.0.is_none() {
            return; // another call already did
        }
        warn!(path = %self.path.display(), "checkpoint tree: I/O failure; reopening the database");
        guard.0 = None; // closes the file: every transaction on it has ended
        match open_db(&self.path) {
            Ok(db) => {
                guard.0 = Some(db);
                guard.1 += 1;
                info!(path = %self.path.display(), "checkpoint tree reopened");
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "checkpoint tree stays closed until a later call reopens it");
            }
        }
    }

    /// Opens the database closed by an earlier failure (if it still is).
    fn reopen(&self, generation: u64) -> Result<()> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if guard.1 != generation || guard.0.is_some() {
            return Ok(());
        }
        match open_db(&self.path) {
            Ok(db) => {
                guard.0 = Some(db);
                guard.1 += 1;
                info!(path = %self.path.display(), "checkpoint tree reopened");
                Ok(())
            }
            Err(e) => Err(self
                .disk_error(e, "cannot reopen it after an I/O failure")
                .unwrap_or_else(|e| e)),
        }
    }

    fn write<R>(&self, f: impl FnOnce(&mut WriteTables<'_>) -> Result<R>) -> Result<R> {
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let r = {
                let mut tables = WriteTables::open(&txn)?;
                f(&mut tables)?
            };
            txn.commit()?;
            Ok(r)
        })
    }

    fn read<R>(&self, f: impl FnOnce(&ReadTables) -> Result<R>) -> Result<R> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let tables = ReadTables::open(&txn)?;
            f(&tables)
        })
    }

    // -- episodes ----------------------------------------------------------

    /// Creates a Running episode with a committed Base node and turn 0
    /// (action `""`, empty observation, session `{cwd: "/", env}`).
    pub fn create_episode(
        &self,
        image: &str,
        policy: Policy,
        env: Vec<(String, String)>,
    ) -> Result<Episode> {
        self.create_episode_with(image, policy, env, "/".to_owned(), EpisodeMeta::default())
    }

    /// Like [`Tree::create_episode`], with a starting working directory and the labels and
    /// limits that its forks inherit.
    pub fn create_episode_with(
        &self,
        image: &str,
        policy: Policy,
        env: Vec<(String, String)>,
        cwd: String,
        meta: EpisodeMeta,
    ) -> Result<Episode> {
        self.write(|t| {
            let id = t.fresh_episode_id()?;
            let rec = t.new_root(&id, image, Session { cwd, env })?;
            let ep = Episode {
                id,
                image: image.to_owned(),
                policy,
                status: EpisodeStatus::Running,
                head: rec.id,
                turn: 0,
                volume: None,
                forked_from: None,
                created_unix_ms: now_unix_ms(),
                meta,
            };
            put_episode(&mut t.eps, &ep)?;
            debug!(episode = %ep.id, image, "created episode");
            Ok(ep)
        })
    }

    /// The episode (also when Deleted).
    pub fn episode(&self, id: &EpisodeId) -> Result<Episode> {
        self.read(|t| get_episode(&t.eps, id)?.ok_or_else(|| TreeError::UnknownEpisode(id.clone())))
    }

    /// All episodes, oldest first; Deleted ones only if `include_deleted`.
    pub fn list_episodes(&self, include_deleted: bool) -> Result<Vec<Episode>> {
        let mut eps = self.read(|t| all_episodes(&t.eps))?;
        eps.retain(|e| include_deleted || e.status != EpisodeStatus::Deleted);
        eps.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(eps)
    }

    /// Sets the status. A Deleted episode cannot change status
    /// ([`TreeError::EpisodeDeleted`]); setting Deleted equals
    /// [`Tree::delete_episode`].
    pub fn set_status(&self, id: &EpisodeId, status: EpisodeStatus) -> Result<Episode> {
        self.write(|t| {
            let mut ep = require_episode(&t.eps, id)?;
            ep.status = status;
            put_episode(&mut t.eps, &ep)?;
            Ok(ep)
        })
    }

    /// Sets (or clears) the name of the episode's live storage volume.
    pub fn set_volume(&self, id: &EpisodeId, volume: Option<String>) -> Result<Episode> {
        self.write(|t| {
            let mut ep = require_episode(&t.eps, id)?;
            ep.volume = volume;
            put_episode(&mut t.eps, &ep)?;
            Ok(ep)
        })
    }

    /// Marks the episode Deleted: it no longer roots any turn or node, so
    /// history only it used becomes garbage. Deleting twice is a no-op.
    pub fn delete_episode(&self, id: &EpisodeId) -> Result<Episode> {
        self.write(|t| {
            let mut ep =
                get_episode(&t.eps, id)?.ok_or_else(|| TreeError::UnknownEpisode(id.clone()))?;
            if ep.status != EpisodeStatus::Deleted {
                ep.status = EpisodeStatus::Deleted;
                put_episode(&mut t.eps, &ep)?;
                debug!(episode = %id, "deleted episode");
            }
            Ok(ep)
        })
    }

    // -- turns ---------------------------------------------------------------

    /// Appends a turn to a Running episode and advances its head.
    ///
    /// With `new_node: Some(Fs | Full)` a Pending node is created whose parent
    /// is the head turn's node (the caller then checkpoints and calls
    /// [`Tree::commit_node`] or [`Tree::fail_node`]); with `None` the new turn
    /// shares the head turn's node.
    pub fn append_turn(&self, id: &EpisodeId, new: NewTurn) -> Result<(TurnRecord, Option<Node>)> {
        if matches!(new.new_node, Some(NodeKind::Base { .. })) {
            return Err(TreeError::InvalidArgument(
                "a turn's new node must be fs or full, not base".into(),
            ));
        }
        self.write(|t| {
            let mut ep = require_episode(&t.eps, id)?;
            if ep.status != EpisodeStatus::Running {
                return Err(TreeError::EpisodeNotRunning {
                    id: id.clone(),
                    status: ep.status,
                });
            }
            let head = get_turn(&t.turns, ep.head)?;
            let turn_no = head.turn.checked_add(1).ok_or_else(|| {
                TreeError::InvalidArgument(format!("episode {id} has reached the maximum turn"))
            })?;
            let node = match new.new_node {
                Some(kind) => Some(t.new_node(Some(head.node), kind, NodeState::Pending, id)?),
                None => None,
            };
            let rec = TurnRecord {
                id: TurnId(next_id(&mut t.meta, KEY_NEXT_TURN)?),
                parent: Some(head.id),
                turn: turn_no,
                action: new.action,
                observation: new.observation,
                session: new.session,
                verdict: new.verdict,
                node: node.as_ref().map_or(head.node, |n| n.id),
            };
            put_turn(&mut t.turns, &rec)?;
            ep.head = rec.id;
            ep.turn = turn_no;
            put_episode(&mut t.eps, &ep)?;
            Ok((rec, node))
        })
    }

    /// The live path of the episode: turn records 0..=head, in order.
    pub fn turns(&self, id: &EpisodeId) -> Result<Vec<TurnRecord>> {
        self.read(|t| {
            let ep = require_episode(&t.eps, id)?;
            path_to(&t.turns, ep.head)
        })
    }

    /// The whole tree `id` belongs to, across its forks: the root episode of its fork family
    /// (following `forked_from` up), every episode of the family that is not deleted, and every
    /// turn record on one of their live paths, each once, in id order, with the episodes whose
    /// live path holds it and the episodes forked from it.
    pub fn family(&self, id: &EpisodeId) -> Result<Family> {
        self.read(|t| {
            require_episode(&t.eps, id)?;
            let all = all_episodes(&t.eps)?;
            let by_id: HashMap<&str, &Episode> = all.iter().map(|e| (e.id.as_str(), e)).collect();
            let mut root = by_id[id.as_str()];
            while let Some(p) = root
                .forked_from
                .as_ref()
                .and_then(|(p, _)| by_id.get(p.as_str()))
            {
                root = p;
            }
            fn root_of<'a>(mut e: &'a Episode, by_id: &HashMap<&str, &'a Episode>) -> EpisodeId {
                while let Some(p) = e
                    .forked_from
                    .as_ref()
                    .and_then(|(p, _)| by_id.get(p.as_str()))
                {
                    e = p;
                }
                e.id.clone()
            }
            let members: Vec<&Episode> = all
                .iter()
                .filter(|e| e.status != EpisodeStatus::Deleted && root_of(e, &by_id) == root.id)
                .collect();
            let mut turns: std::collections::BTreeMap<TurnId, FamilyTurn> = Default::default();
            for e in &members {
                let path = path_to(&t.turns, e.head)?;
                for rec in path {
                    turns
                        .entry(rec.id)
                        .or_insert_with(|| FamilyTurn {
                            record: rec.clone(),
                            episodes: Vec::new(),
                            forks: Vec::new(),
                        })
                        .episodes
                        .push(e.id.clone());
                }
            }
            for e in &members {
                if let Some((src, turn)) = &e.forked_from {
                    // The fork point is the source's record at that turn; find it on the
                    // child's own path (the child shares the source's history up to it).
                    let at = path_to(&t.turns, e.head)?
                        .into_iter()
                        .find(|r| r.turn == *turn)
                        .map(|r| r.id);
                    if let Some(ft) = at.and_then(|id| turns.get_mut(&id)) {
                        ft.forks.push(e.id.clone());
                    }
                    let _ = src;
                }
            }
            Ok(Family {
                root: root.id.clone(),
                episodes: members.iter().map(|e| e.id.clone()).collect(),
                turns: turns.into_values().collect(),
            })
        })
    }

    /// The record of turn `turn` on the episode's live path.
    pub fn turn(&self, id: &EpisodeId, turn: TurnNo) -> Result<TurnRecord> {
        self.read(|t| {
            let ep = require_episode(&t.eps, id)?;
            turn_at(&t.turns, &ep, turn)
        })
    }

    // -- nodes ---------------------------------------------------------------

    /// The node.
    pub fn node(&self, id: NodeId) -> Result<Node> {
        self.read(|t| get_node(&t.nodes, id))
    }

    /// Every node, in id order (including Failed and Collected ones).
    pub fn all_nodes(&self) -> Result<Vec<Node>> {
        self.read(|t| all_nodes(&t.nodes))
    }

    /// The distinct nodes referenced by the episode's live path, root first.
    pub fn episode_nodes(&self, id: &EpisodeId) -> Result<Vec<Node>> {
        self.read(|t| {
            let ep = require_episode(&t.eps, id)?;
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for rec in path_to(&t.turns, ep.head)? {
                if seen.insert(rec.node) {
                    out.push(get_referenced_node(&t.nodes, rec.node)?);
                }
            }
            Ok(out)
        })
    }

    /// Checkpoint bytes charged to the episode: the sum of `bytes` of the
    /// Committed nodes on its live path that it created itself (nodes shared
    /// from the episode it was forked from are charged to that episode).
    pub fn episode_checkpoint_bytes(&self, id: &EpisodeId) -> Result<u64> {
        Ok(self
            .episode_nodes(id)?
            .iter()
            .filter(|n| &n.created_by == id && n.state == NodeState::Committed)
            .map(|n| n.bytes)
            .sum())
    }

    /// Records a Pending node's durable artifacts and marks it Committed.
    ///
    /// Call only after the artifacts are durable: a Committed row is a
    /// promise that the node can be restored.
    pub fn commit_node(&self, id: NodeId, artifacts: NodeArtifacts) -> Result<Node> {
        self.write(|t| {
            let mut node = get_node(&t.nodes, id)?;
            if node.state != NodeState::Pending {
                return Err(TreeError::NodeNotPending {
                    node: id,
                    state: node.state,
                });
            }
            node.state = NodeState::Committed;
            node.snapshot = artifacts.snapshot;
            node.images = artifacts.images;
            node.bytes = artifacts.bytes;
            node.image_bytes = artifacts.image_bytes;
            node.image_dumped_bytes = artifacts.image_dumped_bytes;
            node.image_parent = artifacts.image_parent;
            node.timings_ms = artifacts.timings;
            put_node(&mut t.nodes, &node)?;
            Ok(node)
        })
    }

    /// Marks a Pending node Failed. Turns referencing it stay in history but
    /// cannot be forked or rewound to.
    pub fn fail_node(&self, id: NodeId, reason: &str) -> Result<Node> {
        self.write(|t| {
            let mut node = get_node(&t.nodes, id)?;
            if node.state != NodeState::Pending {
                return Err(TreeError::NodeNotPending {
                    node: id,
                    state: node.state,
                });
            }
            node.state = NodeState::Failed {
                reason: reason.to_owned(),
            };
            put_node(&mut t.nodes, &node)?;
            Ok(node)
        })
    }

    /// Refutes a Pending fs node whose checkpoint turned out to hold nothing new: the storage
    /// layer saw no change since the state of its parent node. In one transaction, every turn
    /// record that refers to the node is re-pointed to the parent node (so the turn that made it
    /// now shares its parent turn's node, as a verdict-none turn does, and restores it), the
    /// turn that made it gets `reason` appended to its verdict's reasons, nodes made on top of
    /// it get the parent node as their parent, and the node's row is deleted (it has no
    /// artifacts). Returns the parent node and the re-pointed turn records.
    ///
    /// Refused, changing nothing: a node that is not Pending ([`TreeError::NodeNotPending`]),
    /// not fs or pinned ([`TreeError::InvalidArgument`]: a full node also holds processes), or
    /// whose parent cannot be restored ([`TreeError::NodeNotCommitted`],
    /// [`TreeError::NodeCollected`]): a turn is re-pointed only to a Committed node.
    pub fn refute_node(&self, id: NodeId, reason: &str) -> Result<(Node, Vec<TurnId>)> {
        self.write(|t| {
            let node = get_node(&t.nodes, id)?;
            if node.state != NodeState::Pending {
                return Err(TreeError::NodeNotPending {
                    node: id,
                    state: node.state,
                });
            }
            if node.kind != NodeKind::Fs {
                return Err(TreeError::InvalidArgument(format!(
                    "checkpoint node {id} is {}, and only fs nodes can be refuted",
                    node.kind.as_str()
                )));
            }
            if node.pinned {
                return Err(TreeError::InvalidArgument(format!(
                    "checkpoint node {id} is pinned and cannot be refuted"
                )));
            }
            let parent_id = node.parent.ok_or_else(|| {
                TreeError::Corrupt(format!("fs checkpoint node {id} has no parent"))
            })?;
            let parent = restorable(&t.nodes, parent_id)?;
            // Every record that refers to the node descends from the one that made it, so it
            // has a larger id: walk back from the newest record until that one.
            let mut refs = Vec::new();
            for row in t.turns.iter()?.rev() {
                let (_, v) = row?;
                let rec: TurnRecord = decode(v.value(), "turn record")?;
                if rec.node != id {
                    continue;
                }
                let made_it = match rec.parent {
                    Some(p) => get_turn(&t.turns, p)?.node != id,
                    None => true,
                };
                refs.push((rec, made_it));
                if made_it {
                    break;
                }
            }
            let mut turns = Vec::with_capacity(refs.len());
            for (mut rec, made_it) in refs {
                rec.node = parent_id;
                if made_it {
                    rec.verdict.reasons.push(reason.to_owned());
                }
                put_turn(&mut t.turns, &rec)?;
                turns.push(rec.id);
            }
            // Nodes made on top of it (ids are handed out in order).
            let mut children = Vec::new();
            for row in t.nodes.range(id.0 + 1..)? {
                let (_, v) = row?;
                let n: Node = decode(v.value(), "node")?;
                if n.parent == Some(id) {
                    children.push(n);
                }
            }
            for mut n in children {
                n.parent = Some(parent_id);
                put_node(&mut t.nodes, &n)?;
            }
            t.nodes.remove(id.0)?;
            turns.sort();
            debug!(node = %id, parent = %parent_id, turns = turns.len(), "refuted checkpoint node");
            Ok((parent, turns))
        })
    }

    // -- fork / rewind ---------------------------------------------------------

    /// Forks `count` new Running episodes off turn `turn` of `src` (Running or
    /// Stopped, not Deleted). Each new episode's head is `src`'s turn record
    /// at `turn` (history is shared, not copied), `volume` is None and
    /// `forked_from` is `(src, turn)`. Returns each episode with the node to
    /// restore and the session at that turn.
    pub fn fork(
        &self,
        src: &EpisodeId,
        turn: TurnNo,
        count: usize,
    ) -> Result<Vec<(Episode, Node, Session)>> {
        if count == 0 {
            return Err(TreeError::InvalidArgument(
                "fork count must be at least 1".into(),
            ));
        }
        self.write(|t| {
            let sep = require_episode(&t.eps, src)?;
            let rec = turn_at(&t.turns, &sep, turn)?;
            let node = restorable(&t.nodes, rec.node)?;
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                let ep = Episode {
                    id: t.fresh_episode_id()?,
                    image: sep.image.clone(),
                    policy: sep.policy,
                    status: EpisodeStatus::Running,
                    head: rec.id,
                    turn,
                    volume: None,
                    forked_from: Some((src.clone(), turn)),
                    created_unix_ms: now_unix_ms(),
                    meta: sep.meta.clone(),
                };
                put_episode(&mut t.eps, &ep)?;
                out.push((ep, node.clone(), rec.session.clone()));
            }
            debug!(episode = %src, turn, count, node = %node.id, "forked");
            Ok(out)
        })
    }

    /// The one fork/rewind preflight: the node that `id`'s turn `turn` would restore, if it is
    /// committed. [`Tree::fork`] and [`Tree::rewind`] check the same; the engine calls this first
    /// so that a refused rewind tears nothing down.
    pub fn restorable_turn(&self, id: &EpisodeId, turn: TurnNo) -> Result<Node> {
        self.read(|t| {
            let ep = require_episode(&t.eps, id)?;
            let rec = turn_at(&t.turns, &ep, turn)?;
            restorable(&t.nodes, rec.node)
        })
    }

    /// Moves the episode's head back to its turn `turn` and makes it Running.
    /// Later turns leave the live path (and become garbage unless another
    /// episode still reaches them). Returns the episode, the node to restore
    /// and the session at that turn.
    pub fn rewind(&self, id: &EpisodeId, turn: TurnNo) -> Result<(Episode, Node, Session)> {
        self.write(|t| {
            let mut ep = require_episode(&t.eps, id)?;
            let rec = turn_at(&t.turns, &ep, turn)?;
            let node = restorable(&t.nodes, rec.node)?;
            ep.head = rec.id;
            ep.turn = turn;
            ep.status = EpisodeStatus::Running;
            put_episode(&mut t.eps, &ep)?;
            debug!(episode = %id, turn, node = %node.id, "rewound");
            Ok((ep, node, rec.session))
        })
    }

    /// Creates a Running episode that starts at a node brought from elsewhere (a node bundle):
    /// turn 0 on `image`'s committed Base node with `base_session`, as [`Tree::create_episode`]
    /// makes it, and turn 1 (`turn`: its action, observation, session and verdict) on a new
    /// Pending node of kind `turn.new_node` (fs or full) whose parent is that Base node. The
    /// head is turn 1. The caller makes the node's artifacts durable, then commits the node (or
    /// fails it and deletes the episode). One transaction: all of it or nothing.
    pub fn import_episode(
        &self,
        image: &str,
        policy: Policy,
        base_session: Session,
        meta: EpisodeMeta,
        turn: NewTurn,
    ) -> Result<(Episode, Node)> {
        let kind = match turn.new_node {
            Some(k @ (NodeKind::Fs | NodeKind::Full)) => k,
            _ => {
                return Err(TreeError::InvalidArgument(
                    "an imported node must be fs or full".into(),
                ))
            }
        };
        self.write(|t| {
            let id = t.fresh_episode_id()?;
            let root = t.new_root(&id, image, base_session)?;
            let node = t.new_node(Some(root.node), kind, NodeState::Pending, &id)?;
            let rec = TurnRecord {
                id: TurnId(next_id(&mut t.meta, KEY_NEXT_TURN)?),
                parent: Some(root.id),
                turn: 1,
                action: turn.action,
                observation: turn.observation,
                session: turn.session,
                verdict: turn.verdict,
                node: node.id,
            };
            put_turn(&mut t.turns, &rec)?;
            let ep = Episode {
                id,
                image: image.to_owned(),
                policy,
                status: EpisodeStatus::Running,
                head: rec.id,
                turn: 1,
                volume: None,
                forked_from: None,
                created_unix_ms: now_unix_ms(),
                meta,
            };
            put_episode(&mut t.eps, &ep)?;
            debug!(episode = %ep.id, image, node = %node.id, "imported episode");
            Ok((ep, node))
        })
    }

    // -- garbage collection ------------------------------------------------------

    /// Pins or unpins a node. Pinned nodes are GC roots. Only a Pending or
    /// Committed node can be pinned ([`TreeError::NodeCollected`] otherwise);
    /// unpinning always succeeds.
    pub fn pin(&self, id: NodeId, pinned: bool) -> Result<Node> {
        self.write(|t| {
            let mut node = get_node(&t.nodes, id)?;
            if pinned {
                if let state @ (NodeState::Failed { .. } | NodeState::Collected) = &node.state {
                    return Err(TreeError::NodeCollected {
                        node: id,
                        state: state.clone(),
                    });
                }
            }
            if node.pinned != pinned {
                node.pinned = pinned;
                put_node(&mut t.nodes, &node)?;
            }
            Ok(node)
        })
    }

    /// Number of live turn records referencing the node, plus one if pinned.
    /// A turn record is live when it is reachable from the head of a
    /// non-deleted episode.
    pub fn refcount(&self, id: NodeId) -> Result<u64> {
        self.read(|t| {
            let node = get_node(&t.nodes, id)?;
            Ok(mark(&t.eps, &t.turns)?.refcount(&node))
        })
    }

    /// Nodes (Pending, Committed or Failed) that are no longer live: not
    /// referenced by any live turn record and not pinned. The caller frees
    /// their artifacts, then calls [`Tree::forget_nodes`].
    ///
    /// Garbage stays garbage: no operation makes an unreachable node live
    /// again except [`Tree::pin`], so GC and pinning should not race.
    pub fn garbage(&self) -> Result<Vec<Node>> {
        self.read(|t| {
            let live = mark(&t.eps, &t.turns)?;
            let mut out = all_nodes(&t.nodes)?;
            out.retain(|n| n.state != NodeState::Collected && !live.is_live(n));
            Ok(out)
        })
    }

    /// Marks the nodes Collected (their artifacts are gone; the rows stay so
    /// that errors can say so) and deletes every unreachable turn record.
    ///
    /// Normally called with nodes from [`Tree::garbage`]; collecting a live
    /// node is allowed (eviction): its turns stay in history but can no
    /// longer be forked or rewound to. Unknown ids fail the whole call.
    pub fn forget_nodes(&self, ids: &[NodeId]) -> Result<ForgetReport> {
        self.write(|t| {
            let live = mark(&t.eps, &t.turns)?;
            let mut report = ForgetReport::default();
            for &id in ids {
                let mut node = get_node(&t.nodes, id)?;
                if node.state == NodeState::Collected {
                    continue;
                }
                if live.is_live(&node) {
                    warn!(node = %id, "collecting a live checkpoint node");
                    report.were_live.push(id);
                }
                node.state = NodeState::Collected;
                put_node(&mut t.nodes, &node)?;
                report.collected.push(id);
            }
            let mut dead = Vec::new();
            for row in t.turns.iter()? {
                let (k, _) = row?;
                let id = TurnId(k.value());
                if !live.turns.contains(&id) {
                    dead.push(id);
                }
            }
            for id in &dead {
                t.turns.remove(id.0)?;
            }
            report.turns_deleted = dead.len() as u64;
            debug!(
                collected = report.collected.len(),
                turns_deleted = report.turns_deleted,
                "forgot nodes"
            );
            Ok(report)
        })
    }

    // -- crash recovery ------------------------------------------------------------

    /// Brings the tree to a consistent state at service start:
    ///
    /// * every Running episode becomes Stopped (its sandbox died with the
    ///   service);
    /// * every Pending node is marked Failed (`"abandoned at restart"`) and
    ///   reported, so the caller deletes its partial artifacts;
    /// * every non-deleted episode whose head turn's node is not Committed is
    ///   moved back to the latest turn on its live path whose node is
    ///   Committed (turn 0 if there is none), and reported.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let report = self.write(|t| {
            let mut report = ReconcileReport::default();
            for mut node in all_nodes(&t.nodes)? {
                if node.state == NodeState::Pending {
                    node.state = NodeState::Failed {
                        reason: ABANDONED_REASON.to_owned(),
                    };
                    put_node(&mut t.nodes, &node)?;
                    report.abandoned.push(node);
                }
            }
            for mut ep in all_episodes(&t.eps)? {
                if ep.status == EpisodeStatus::Deleted {
                    continue;
                }
                let mut changed = false;
                if ep.status == EpisodeStatus::Running {
                    ep.status = EpisodeStatus::Stopped;
                    report.stopped.push(ep.id.clone());
                    changed = true;
                }
                let path = path_to(&t.turns, ep.head)?;
                let mut target = None;
                for rec in path.iter().rev() {
                    if get_referenced_node(&t.nodes, rec.node)?.state == NodeState::Committed {
                        target = Some(rec);
                        break;
                    }
                }
                let target = match target {
                    Some(r) => r,
                    None => {
                        warn!(episode = %ep.id, "no committed checkpoint on live path; head moved to turn 0");
                        &path[0]
                    }
                };
                if target.id != ep.head {
                    report.truncated.push(Truncation {
                        episode: ep.id.clone(),
                        from: ep.turn,
                        to: target.turn,
                    });
                    ep.head = target.id;
                    ep.turn = target.turn;
                    changed = true;
                }
                if changed {
                    put_episode(&mut t.eps, &ep)?;
                }
            }
            Ok(report)
        })?;
        info!(
            stopped = report.stopped.len(),
            abandoned = report.abandoned.len(),
            truncated = report.truncated.len(),
            "reconciled checkpoint tree"
        );
        Ok(report)
    }
}
