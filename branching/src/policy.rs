//! The checkpoint policy: what a turn's node is, from the policy, what the turn did (the
//! verdict) and whether processes other than init are alive. Pure, so it is table-tested here.

use crate::types::{NodeKind, Policy, VerdictKind};

/// The decision for one turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The verdict the turn is recorded with.
    pub verdict: VerdictKind,
    /// The node the turn needs; None: it shares its parent's.
    pub node: Option<NodeKind>,
    /// Why the node is more than the verdict alone asks for, if it is.
    pub upgrade: Option<&'static str>,
}

/// Why an fs turn beside living processes needs a full node.
pub const FS_BESIDE_PROCESSES: &str =
    "full node: processes other than init are alive, and a restore needs their image with the snapshot";

/// `none` never checkpoints (the chat-only baseline), `full` checkpoints everything after every
/// turn, `auto` follows the verdict: nothing for none, a snapshot for fs, a snapshot and a CRIU
/// image for proc. A node must restore the whole sandbox, so an fs turn while processes other
/// than init live needs their image too: a full node.
pub fn decide(policy: Policy, observed: VerdictKind, others_alive: bool) -> Decision {
    match policy {
        Policy::None => Decision {
            verdict: VerdictKind::None,
            node: None,
            upgrade: None,
        },
        Policy::Full => Decision {
            verdict: VerdictKind::Proc,
            node: Some(NodeKind::Full),
            upgrade: None,
        },
        Policy::Auto => match observed {
            VerdictKind::None => Decision {
                verdict: VerdictKind::None,
                node: None,
                upgrade: None,
            },
            VerdictKind::Proc => Decision {
                verdict: VerdictKind::Proc,
                node: Some(NodeKind::Full),
                upgrade: None,
            },
            VerdictKind::Fs if others_alive => Decision {
                verdict: VerdictKind::Fs,
                node: Some(NodeKind::Full),
                upgrade: Some(FS_BESIDE_PROCESSES),
            },
            VerdictKind::Fs => Decision {
                verdict: VerdictKind::Fs,
                node: Some(NodeKind::Fs),
                upgrade: None,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeKind::{Fs, Full};
    use VerdictKind as V;

    #[test]
    fn the_policy_table() {
        // (policy, observed verdict, others alive) -> (recorded verdict, node, upgraded)
        let table = [
            (Policy::None, V::None, false, V::None, None, false),
            (Policy::None, V::Fs, true, V::None, None, false),
            (Policy::None, V::Proc, true, V::None, None, false),
            (Policy::Full, V::None, false, V::Proc, Some(Full), false),
            (Policy::Full, V::Fs, false, V::Proc, Some(Full), false),
            (Policy::Full, V::Proc, true, V::Proc, Some(Full), false),
            (Policy::Auto, V::None, false, V::None, None, false),
            (Policy::Auto, V::None, true, V::None, None, false),
            (Policy::Auto, V::Fs, false, V::Fs, Some(Fs), false),
            (Policy::Auto, V::Fs, true, V::Fs, Some(Full), true),
            (Policy::Auto, V::Proc, false, V::Proc, Some(Full), false),
            (Policy::Auto, V::Proc, true, V::Proc, Some(Full), false),
        ];
        for (policy, observed, others, verdict, node, upgraded) in table {
            let d = decide(policy, observed, others);
            assert_eq!(
                (d.verdict, d.node, d.upgrade.is_some()),
                (verdict, node, upgraded),
                "{policy:?} {observed:?} others={others}"
            );
        }
    }
}
