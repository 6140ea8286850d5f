//! The engine's side of folder sync: reads and batched writes of the
//! `index-*` documents, and which peers may exchange a space's blobs.
//!
//! Index documents are flat maps from a normalised path to a packed
//! [`Entry`]; this module hands the folder worker every value of a key
//! (concurrent versions included) and leaves the decisions to it.
//!
//! [`Entry`]: shoal_protocol::files::Entry

use automerge::{ChangeHash, ReadDoc, ScalarValue, Value, ROOT};
use libp2p::PeerId;
use shoal_protocol::files;
use shoal_protocol::{DocId, Role, SpaceId};

use super::{Engine, Error, Result};

/// Every packed value of one path (more than one while versions conflict).
pub type Values = Vec<Vec<u8>>;

/// Paths of one shard that changed since a cursor, and the shard's heads.
#[derive(Debug, Default)]
pub struct ShardChanges {
    /// Heads the answer was read at.
    pub heads: Vec<[u8; 32]>,
    /// Changed paths with their values.
    pub paths: Vec<(String, Values)>,
}

fn values_of(doc: &automerge::AutoCommit, key: &str) -> Values {
    doc.get_all(ROOT, key)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Bytes(b) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl Engine {
    /// This device's role in a space (`None` until `members` names it).
    pub(super) fn role_in(&self, space: &SpaceId) -> Option<Role> {
        let s = self.spaces.get(space)?;
        s.roster.role_of(&self.me)
    }

    /// Writes index entries: one change per touched shard.
    pub(super) fn index_put(
        &mut self,
        space: SpaceId,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        let mut by_shard: std::collections::BTreeMap<DocId, Vec<(String, Vec<u8>)>> =
            Default::default();
        for (path, value) in entries {
            by_shard
                .entry(files::shard_of(&path))
                .or_default()
                .push((path, value));
        }
        for (shard, entries) in by_shard {
            self.edit_doc(space, &shard, |d| {
                use automerge::transaction::Transactable;
                for (path, value) in entries {
                    d.put(ROOT, path, ScalarValue::Bytes(value))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Current values of `paths`.
    pub(super) fn index_get(&self, space: &SpaceId, paths: &[String]) -> Result<Vec<Values>> {
        let s = self
            .spaces
            .get(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        Ok(paths
            .iter()
            .map(|p| match s.docs.get(&files::shard_of(p)) {
                Some(d) => values_of(&d.doc, p),
                None => Vec::new(),
            })
            .collect())
    }

    /// Paths of `shard` that changed since heads `since` (every path when
    /// `since` is empty or unknown).
    pub(super) fn index_changes(
        &mut self,
        space: &SpaceId,
        shard: &DocId,
        since: &[[u8; 32]],
    ) -> Result<ShardChanges> {
        let s = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let Some(d) = s.docs.get_mut(shard) else {
            return Ok(ShardChanges::default());
        };
        let heads = d.doc.get_heads();
        let mut before: Vec<ChangeHash> = since.iter().map(|h| ChangeHash(*h)).collect();
        if before.iter().any(|h| d.doc.get_change_by_hash(h).is_none()) {
            before.clear();
        }
        // Keys touched by the changes since `before`, read from the changes
        // themselves: a diff shows only the visible value of a key, and a
        // concurrent version that Automerge orders below it would be missed.
        let mut keys: Vec<String> = if before.is_empty() {
            d.doc.keys(ROOT).collect()
        } else {
            use automerge::legacy::{Key, ObjectId};
            d.doc
                .get_changes(&before)
                .iter()
                .flat_map(|c| c.decode().operations)
                .filter(|op| op.obj == ObjectId::Root)
                .filter_map(|op| match op.key {
                    Key::Map(k) => Some(k.to_string()),
                    Key::Seq(_) => None,
                })
                .collect()
        };
        keys.sort();
        keys.dedup();
        let paths = keys
            .into_iter()
            .map(|k| {
                let v = values_of(&d.doc, &k);
                (k, v)
            })
            .collect();
        Ok(ShardChanges {
            heads: heads.iter().map(|h| h.0).collect(),
            paths,
        })
    }

    /// Every path in the space whose normalised form starts with `prefix`.
    pub(super) fn index_list(
        &self,
        space: &SpaceId,
        prefix: &str,
    ) -> Result<Vec<(String, Values)>> {
        let s = self
            .spaces
            .get(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let mut out = Vec::new();
        for shard in files::shards() {
            if let Some(d) = s.docs.get(&shard) {
                for k in d.doc.keys(ROOT).filter(|k| k.starts_with(prefix)) {
                    let v = values_of(&d.doc, &k);
                    out.push((k, v));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Connected peers that proved membership of `space` and are admitted.
    pub(super) fn space_peers(&self, space: &SpaceId) -> Vec<PeerId> {
        self.peers
            .keys()
            .filter(|p| self.is_admitted(p, space))
            .copied()
            .collect()
    }

    /// Whether `peer` may exchange `space`'s blobs: connected, proved the
    /// space key, and listed in `members`.
    pub(super) fn is_admitted(&self, peer: &PeerId, space: &SpaceId) -> bool {
        self.is_proven(peer, space)
            && super::device_of_peer(peer).is_ok_and(|d| {
                self.spaces
                    .get(space)
                    .is_some_and(|s| s.roster.role_of(&d).is_some())
            })
    }

    pub(super) fn on_index_command(&mut self, cmd: IndexCommand) {
        match cmd {
            IndexCommand::Put {
                space,
                entries,
                reply,
            } => {
                let r = self.index_put(space, entries);
                self.ack_after_flush(reply, r);
            }
            IndexCommand::Get {
                space,
                paths,
                reply,
            } => {
                let _ = reply.send(self.index_get(&space, &paths));
            }
            IndexCommand::Changes {
                space,
                shard,
                since,
                reply,
            } => {
                let _ = reply.send(self.index_changes(&space, &shard, &since));
            }
            IndexCommand::List {
                space,
                prefix,
                reply,
            } => {
                let _ = reply.send(self.index_list(&space, &prefix));
            }
            IndexCommand::Peers { space, reply } => {
                let _ = reply.send(self.space_peers(&space));
            }
            IndexCommand::Admitted { peer, space, reply } => {
                let _ = reply.send(self.is_admitted(&peer, &space));
            }
            IndexCommand::Resolve { space, reply } => {
                let r = self.resolve(&space).map(|id| (id, self.role_in(&id)));
                let _ = reply.send(r);
            }
        }
    }
}

/// What the folder worker asks the engine.
#[derive(Debug)]
pub(crate) enum IndexCommand {
    /// Write entries (path, packed entry), acknowledged after the flush.
    Put {
        space: SpaceId,
        entries: Vec<(String, Vec<u8>)>,
        reply: super::Reply<()>,
    },
    /// Current values of paths.
    Get {
        space: SpaceId,
        paths: Vec<String>,
        reply: super::Reply<Vec<Values>>,
    },
    /// Paths of a shard changed since a cursor.
    Changes {
        space: SpaceId,
        shard: DocId,
        since: Vec<[u8; 32]>,
        reply: super::Reply<ShardChanges>,
    },
    /// Paths under a prefix.
    List {
        space: SpaceId,
        prefix: String,
        reply: super::Reply<Vec<(String, Values)>>,
    },
    /// Admitted connected peers of a space.
    Peers {
        space: SpaceId,
        reply: tokio::sync::oneshot::Sender<Vec<PeerId>>,
    },
    /// Whether a peer may exchange a space's blobs.
    Admitted {
        peer: PeerId,
        space: SpaceId,
        reply: tokio::sync::oneshot::Sender<bool>,
    },
    /// A space by name or id, and our role in it.
    Resolve {
        space: String,
        reply: super::Reply<(SpaceId, Option<Role>)>,
    },
}
