//! Warm forks: copies of a node made ahead of a fork (`Prepare`), each a clone of the node's
//! snapshot with its CRIU image restored (or a fresh init started) and then frozen, so that a
//! fork takes one, records it as the new episode's sandbox and thaws it instead of cloning and
//! restoring while the trainer waits.
//!
//! A copy is named like any sandbox (`warm<node>x<k>-0`, a [`VolumeName`] of no episode); once a
//! fork takes it, the new episode's record names that volume, and rewinds go on from it
//! (`warm…-1`, …). Copies count against a memory budget (their cgroups' anonymous memory, read
//! once frozen); making one past the budget evicts the least recently used node's copies first.
//! They are dropped when their node is collected and at shutdown; a restart's reconcile removes
//! any that a crash left (it removes every volume no episode records).
//!
//! The pool is plain data under one mutex; the engine makes and destroys the sandboxes.

use std::collections::HashMap;
use std::time::Instant;

use sandtree_branching::{NodeId, SandboxLimits, VolumeName};

/// One ready copy.
#[derive(Debug, Clone)]
pub struct WarmCopy {
    pub volume: VolumeName,
    /// Anonymous memory it holds, frozen.
    pub bytes: u64,
    pub limits: Option<SandboxLimits>,
}

/// Counters for `stats` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmCounts {
    pub copies: usize,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evicted: u64,
}

#[derive(Debug, Default)]
pub struct WarmPool {
    by_node: HashMap<NodeId, Vec<WarmCopy>>,
    last_used: HashMap<NodeId, Instant>,
    hits: u64,
    misses: u64,
    evicted: u64,
    seq: u64,
}

impl WarmPool {
    /// A fresh name for a copy of `node`.
    pub fn name(&mut self, node: NodeId) -> VolumeName {
        self.seq += 1;
        VolumeName::first(&sandtree_branching::EpisodeId::new(format!(
            "warm{}x{}",
            node.0, self.seq
        )))
    }

    pub fn ready(&self, node: NodeId) -> usize {
        self.by_node.get(&node).map_or(0, Vec::len)
    }

    pub fn bytes_of(&self, node: NodeId) -> u64 {
        self.by_node
            .get(&node)
            .map_or(0, |v| v.iter().map(|c| c.bytes).sum())
    }

    pub fn bytes(&self) -> u64 {
        self.by_node.values().flatten().map(|c| c.bytes).sum()
    }

    pub fn counts(&self) -> WarmCounts {
        WarmCounts {
            copies: self.by_node.values().map(Vec::len).sum(),
            bytes: self.bytes(),
            hits: self.hits,
            misses: self.misses,
            evicted: self.evicted,
        }
    }

    /// Marks `node` as used now (a prepare or a fork of it).
    pub fn touch(&mut self, node: NodeId) {
        self.last_used.insert(node, Instant::now());
    }

    pub fn insert(&mut self, node: NodeId, copy: WarmCopy) {
        self.by_node.entry(node).or_default().push(copy);
        self.touch(node);
    }

    /// A ready copy of `node` made with `limits`, for a fork: counted as a hit, or a miss.
    pub fn take(&mut self, node: NodeId, limits: Option<SandboxLimits>) -> Option<WarmCopy> {
        self.touch(node);
        let copies = self.by_node.get_mut(&node);
        let got = copies.and_then(|v| {
            let i = v.iter().position(|c| c.limits == limits)?;
            Some(v.swap_remove(i))
        });
        if got.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        if self.by_node.get(&node).is_some_and(Vec::is_empty) {
            self.by_node.remove(&node);
        }
        got
    }

    /// Takes copies of `node` beyond `keep` (prepare with a smaller count).
    pub fn trim(&mut self, node: NodeId, keep: usize) -> Vec<WarmCopy> {
        let Some(v) = self.by_node.get_mut(&node) else {
            return Vec::new();
        };
        let out = if v.len() > keep {
            v.split_off(keep)
        } else {
            Vec::new()
        };
        if v.is_empty() {
            self.by_node.remove(&node);
        }
        out
    }

    /// Takes copies of the least recently used other nodes until `need` more bytes fit under
    /// `budget`; the copies of `keep` are never taken. Returns what to destroy, and whether
    /// `need` fits now.
    pub fn evict_for(&mut self, need: u64, budget: u64, keep: NodeId) -> (Vec<WarmCopy>, bool) {
        let mut out = Vec::new();
        while self.bytes() + need > budget {
            let victim = self
                .by_node
                .keys()
                .filter(|n| **n != keep)
                .min_by_key(|n| self.last_used.get(n).copied())
                .copied();
            let Some(v) = victim else {
                break;
            };
            let copies = self.by_node.remove(&v).unwrap_or_default();
            self.evicted += copies.len() as u64;
            out.extend(copies);
        }
        let fits = self.bytes() + need <= budget;
        (out, fits)
    }

    /// Takes every copy of `node` (it is being collected).
    pub fn drop_node(&mut self, node: NodeId) -> Vec<WarmCopy> {
        self.last_used.remove(&node);
        self.by_node.remove(&node).unwrap_or_default()
    }

    /// Takes every copy (shutdown).
    pub fn drain(&mut self) -> Vec<WarmCopy> {
        self.last_used.clear();
        self.by_node.drain().flat_map(|(_, v)| v).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(pool: &mut WarmPool, node: u64, bytes: u64) -> WarmCopy {
        WarmCopy {
            volume: pool.name(NodeId(node)),
            bytes,
            limits: None,
        }
    }

    #[test]
    fn take_counts_hits_and_misses_and_respects_limits() {
        let mut p = WarmPool::default();
        let c = copy(&mut p, 1, 10);
        p.insert(NodeId(1), c.clone());
        let other = SandboxLimits {
            memory_bytes: 1,
            pids: 1,
            cpu_quota_us: 1,
        };
        assert!(p.take(NodeId(1), Some(other)).is_none(), "other limits");
        assert_eq!(p.take(NodeId(1), None).unwrap().volume, c.volume);
        assert!(p.take(NodeId(1), None).is_none());
        let n = p.counts();
        assert_eq!((n.hits, n.misses, n.copies), (1, 2, 0));
    }

    #[test]
    fn eviction_takes_the_least_recently_used_other_node() {
        let mut p = WarmPool::default();
        for node in [1, 2, 3] {
            let c = copy(&mut p, node, 100);
            p.insert(NodeId(node), c);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        p.touch(NodeId(1)); // 2 is now the least recently used
        let (gone, fits) = p.evict_for(100, 300, NodeId(3));
        assert!(fits);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].volume.to_string().starts_with("warm2x"));
        // Only the kept node's copies left over the budget: it does not fit.
        let (gone, fits) = p.evict_for(250, 300, NodeId(3));
        assert_eq!(gone.len(), 1, "node 1 goes");
        assert!(!fits, "node 3's own copy is never evicted for itself");
        assert_eq!(p.counts().evicted, 2);
    }

    #[test]
    fn names_are_unique_and_parse_back() {
        let mut p = WarmPool::default();
        let (a, b) = (p.name(NodeId(7)), p.name(NodeId(7)));
        assert_ne!(a, b);
        assert_eq!(VolumeName::parse(&a.to_string()), Some(a));
    }
}
