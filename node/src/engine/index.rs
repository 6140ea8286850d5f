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

/// One value written at a path, from the index's history.
#[derive(Debug, Clone)]
pub struct HistoryValue {
    /// When the change that wrote it was made (its author's clock, ms).
    pub time_ms: i64,
    /// That change's hash.
    pub change: [u8; 32],
    /// The packed entry.
    pub value: Vec<u8>,
    /// Still one of the path's current values.
    pub current: bool,
}

/// The heads of each index shard.
pub type ShardHeads = Vec<(DocId, Vec<[u8; 32]>)>;

/// A past state of the index.
#[derive(Debug, Clone)]
pub enum When {
    /// As it was at this time (ms since the epoch).
    Time(i64),
    /// At these heads (a snapshot).
    Heads(ShardHeads),
}

/// Paths of one shard that changed since a cursor, and the shard's heads.
#[derive(Debug, Default)]
pub struct ShardChanges {
    /// Heads the answer was read at.
    pub heads: Vec<[u8; 32]>,
    /// Changed paths with their values.
    pub paths: Vec<(String, Values)>,
}

fn values_of(doc: &automerge::AutoCommit, key: &str) -> Values {
    packed(doc.get_all(ROOT, key))
}

fn values_at(doc: &automerge::AutoCommit, key: &str, heads: &[ChangeHash]) -> Values {
    packed(doc.get_all_at(ROOT, key, heads))
}

/// The byte values among a key's values (index entries are bytes).
fn packed(
    all: std::result::Result<Vec<(Value<'_>, automerge::ObjId)>, automerge::AutomergeError>,
) -> Values {
    all.unwrap_or_default()
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

/// The heads of the changes made at or before `ms` (by their own clocks),
/// with everything they depend on: a change whose dependency is later is
/// left out, so the answer is a state the document really had.
fn heads_at(doc: &mut automerge::AutoCommit, ms: i64) -> Vec<ChangeHash> {
    use std::collections::HashSet;
    let metas: Vec<(ChangeHash, i64, Vec<ChangeHash>)> = doc
        .get_changes_meta(&[])
        .into_iter()
        .map(|m| (m.hash, m.timestamp, m.deps.clone()))
        .collect();
    let mut kept: HashSet<ChangeHash> = HashSet::new();
    // Dependencies come first in a document's order; loop until stable in
    // case they do not.
    loop {
        let before = kept.len();
        for (h, t, deps) in &metas {
            if *t <= ms && !kept.contains(h) && deps.iter().all(|d| kept.contains(d)) {
                kept.insert(*h);
            }
        }
        if kept.len() == before {
            break;
        }
    }
    let depended: HashSet<ChangeHash> = metas
        .iter()
        .filter(|(h, _, _)| kept.contains(h))
        .flat_map(|(_, _, d)| d.iter().copied())
        .collect();
    let mut heads: Vec<ChangeHash> = kept.into_iter().filter(|h| !depended.contains(h)).collect();
    heads.sort();
    heads
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

    /// Every value written at `path`, with the time and hash of the change
    /// that wrote it, oldest first (by time, then change hash: the same
    /// order on every device that has the same changes).
    pub(super) fn index_history(
        &mut self,
        space: &SpaceId,
        path: &str,
    ) -> Result<Vec<HistoryValue>> {
        use automerge::legacy::{Key, ObjectId, OpType};
        let s = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let Some(d) = s.docs.get_mut(&files::shard_of(path)) else {
            return Ok(Vec::new());
        };
        let current = values_of(&d.doc, path);
        let mut out = Vec::new();
        for c in d.doc.get_changes(&[]) {
            let (time_ms, change) = (c.timestamp(), c.hash().0);
            for op in c.decode().operations {
                let here = op.obj == ObjectId::Root
                    && matches!(&op.key, Key::Map(k) if k.as_str() == path);
                if let (true, OpType::Put(ScalarValue::Bytes(b))) = (here, op.action) {
                    out.push(HistoryValue {
                        time_ms,
                        change,
                        current: current.contains(&b),
                        value: b,
                    });
                }
            }
        }
        out.sort_by_key(|a| (a.time_ms, a.change));
        Ok(out)
    }

    /// Paths under `prefix` as the index had them `when`.
    pub(super) fn index_at(
        &mut self,
        space: &SpaceId,
        when: &When,
        prefix: &str,
    ) -> Result<Vec<(String, Values)>> {
        let s = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        let mut out = Vec::new();
        for shard in files::shards() {
            let Some(d) = s.docs.get_mut(&shard) else {
                continue;
            };
            let heads: Vec<ChangeHash> = match when {
                When::Time(ms) => heads_at(&mut d.doc, *ms),
                When::Heads(all) => all
                    .iter()
                    .find(|(s, _)| *s == shard)
                    .map(|(_, h)| h.iter().map(|h| ChangeHash(*h)).collect())
                    .unwrap_or_default(),
            };
            if heads.is_empty() || heads.iter().any(|h| d.doc.get_change_by_hash(h).is_none()) {
                continue;
            }
            let keys: Vec<String> = d
                .doc
                .keys_at(ROOT, &heads)
                .filter(|k| k.starts_with(prefix))
                .collect();
            for k in keys {
                let v = values_at(&d.doc, &k, &heads);
                out.push((k, v));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The heads of every index shard of a space.
    pub(super) fn index_heads(&mut self, space: &SpaceId) -> Result<ShardHeads> {
        let s = self
            .spaces
            .get_mut(space)
            .ok_or_else(|| Error::UnknownSpace(space.to_string()))?;
        Ok(files::shards()
            .filter_map(|shard| {
                let d = s.docs.get_mut(&shard)?;
                Some((shard, d.doc.get_heads().iter().map(|h| h.0).collect()))
            })
            .collect())
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
            IndexCommand::History { space, path, reply } => {
                let _ = reply.send(self.index_history(&space, &path));
            }
            IndexCommand::At {
                space,
                when,
                prefix,
                reply,
            } => {
                let _ = reply.send(self.index_at(&space, &when, &prefix));
            }
            IndexCommand::Heads { space, reply } => {
                let _ = reply.send(self.index_heads(&space));
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
    /// Every value ever written at a path, from the index's history.
    History {
        space: SpaceId,
        path: String,
        reply: super::Reply<Vec<HistoryValue>>,
    },
    /// Paths under a prefix as they were at a time or at named heads.
    At {
        space: SpaceId,
        when: When,
        prefix: String,
        reply: super::Reply<Vec<(String, Values)>>,
    },
    /// The heads of every index shard (a snapshot's name for now).
    Heads {
        space: SpaceId,
        reply: super::Reply<ShardHeads>,
    },
    /// A space by name or id, and our role in it.
    Resolve {
        space: String,
        reply: super::Reply<(SpaceId, Option<Role>)>,
    },
}
