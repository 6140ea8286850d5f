//! The engine's side of local apps (the automerge-repo endpoint, see
//! `crate::apps`): their changes enter a document as this device's, with
//! this device's role, each vouched for by this device's signature when
//! published (see `shoal_protocol::actor`).

use automerge::{Change, ChangeHash};
use shoal_protocol::actor::is_app_actor;
use shoal_protocol::{DocId, SpaceId};

use shoal_protocol::wire::{self, GossipBody};

use super::{hex_heads, Engine, Event, Origin};
use crate::error::{Error, Result};
use crate::net::NetCommand;
use tracing::warn;

impl Engine {
    /// Applies changes an app on this device wrote to `doc`: refused unless
    /// this device may write it, every new change is under an app actor
    /// (an app never writes as a device), and no such actor belongs to
    /// another device. Returns how many changes were new; they are
    /// persisted and published at the end of the turn, like any local edit.
    pub(super) fn app_changes(&mut self, id: SpaceId, doc: &DocId, bytes: &[u8]) -> Result<usize> {
        if doc.is_members() {
            return Err(Error::Forbidden(
                "`members` changes only through membership commands".into(),
            ));
        }
        let changes = shoal_protocol::sync::stored_changes(bytes)?;
        let s = self
            .spaces
            .get(&id)
            .ok_or_else(|| Error::UnknownSpace(id.to_string()))?;
        if s.roster.members.is_empty() && s.roster.creator != self.me {
            return Err(Error::MembersUnknown);
        }
        s.roster
            .check(doc, &self.me)
            .map_err(|e| Error::Forbidden(e.to_string()))?;
        let s = self
            .spaces
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownSpace(id.to_string()))?;
        let new: Vec<Change> = match s.docs.get_mut(doc) {
            Some(d) => changes
                .into_iter()
                .filter(|c| d.doc.get_change_by_hash(&c.hash()).is_none())
                .collect(),
            None => changes,
        };
        if new.is_empty() {
            return Ok(0);
        }
        for c in &new {
            if !is_app_actor(c.actor_id()) {
                return Err(Error::Forbidden(format!(
                    "an app writes under its own actor ids; change {} is under a device's",
                    c.hash()
                )));
            }
            if let Some(bound) = self.store.app_actor(&id, c.actor_id())? {
                if bound != self.me {
                    return Err(Error::Forbidden(format!(
                        "app actor {} belongs to {}",
                        c.actor_id(),
                        bound.short()
                    )));
                }
            }
        }
        let fresh = self.new_doc();
        let me = self.me.clone();
        let mine: std::collections::HashSet<ChangeHash> = new.iter().map(|c| c.hash()).collect();
        let Some(s) = self.spaces.get_mut(&id) else {
            return Err(Error::UnknownSpace(id.to_string()));
        };
        let d = s.docs.entry(doc.clone()).or_insert(fresh);
        let before = d.doc.get_heads();
        d.doc
            .apply_changes(new)
            .map_err(shoal_protocol::Error::from)?;
        shoal_protocol::doc::forget_patches(&mut d.doc);
        // What is now in the document, in order: the app's changes, and
        // any a peer sent earlier that were waiting for one of them (kept
        // when they came). Only the app's are this device's to vouch for.
        let (applied, _released): (Vec<Change>, Vec<Change>) = d
            .doc
            .get_changes(&before)
            .into_iter()
            .partition(|c| mine.contains(&c.hash()));
        let waiting = mine.len() - applied.len();
        let heads = d.doc.get_heads();
        for c in &applied {
            self.store.bind_app_actor(&id, c.actor_id(), &me)?;
        }
        if !applied.is_empty() {
            // Vouched for (each change) when published.
            let slot = self.local_batch.entry((id, doc.clone())).or_default();
            slot.0
                .extend(applied.iter().map(|c| c.raw_bytes().to_vec()));
            slot.1 = heads.clone();
            self.emit(Event::DocChanged {
                space: id,
                doc: doc.clone(),
                origin: Origin::App,
                heads: hex_heads(&heads),
                authors: vec![me.to_string()],
            });
        }
        if waiting > 0 {
            // Never expected from samod (it stores changes in order); said
            // rather than left to look stored.
            warn!(space = %id.short(), %doc, waiting, "app changes wait for a change this device lacks");
        }
        Ok(applied.len())
    }

    /// Gossips a local app's ephemeral message to the space's other
    /// devices, if it is small enough and this device is a member.
    pub(super) fn publish_ephemeral(
        &mut self,
        id: SpaceId,
        doc: DocId,
        data: Vec<u8>,
        outbox: &mut Vec<NetCommand>,
    ) {
        let member = self
            .spaces
            .get(&id)
            .is_some_and(|s| s.roster.role_of(&self.me).is_some());
        if !member || data.len() > wire::MAX_EPHEMERAL_BYTES || self.drop_gossip {
            return;
        }
        let bytes = wire::encode(&GossipBody::Ephemeral { doc, data });
        self.publish_sealed(id, &bytes, outbox);
    }

    /// A document's saved bytes, or its changes since `since`.
    pub(super) fn doc_bytes(
        &mut self,
        id: &SpaceId,
        doc: &DocId,
        since: Option<&[ChangeHash]>,
    ) -> Option<Vec<u8>> {
        let d = self.spaces.get_mut(id)?.docs.get_mut(doc)?;
        if d.doc.is_empty() {
            return None;
        }
        Some(match since {
            None => d.doc.save(),
            Some(heads) => d
                .doc
                .get_changes(heads)
                .iter()
                .flat_map(|c| c.raw_bytes().to_vec())
                .collect(),
        })
    }
}
