//! The real-time path: sealing and publishing local changes (and heads
//! summaries) on the space's topic, checking every gossip message before it
//! is spread, and applying accepted changes in one batch per document.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use automerge::{Change, ChangeHash};
use libp2p::gossipsub::{MessageAcceptance, TopicHash};
use libp2p::PeerId;
use shoal_protocol::members;
use shoal_protocol::wire::{self, GossipBody};
use shoal_protocol::{envelope, DocId, SpaceId};
use tracing::warn;

use super::{
    device_of_peer, hex_heads, random, verify_sig, Applied, Engine, Event, Gap, Origin,
    MAX_UNKNOWN_GAPS_PER_PEER, MAX_WANTED,
};
use crate::net::NetCommand;
use shoal_protocol::actor::device_of;

impl Engine {
    pub(super) fn publish(
        &mut self,
        id: SpaceId,
        doc: &DocId,
        changes: Vec<Vec<u8>>,
        heads: &[ChangeHash],
        outbox: &mut Vec<NetCommand>,
    ) {
        if self.drop_gossip {
            // The signatures still go with the changes by sync.
            self.sign_batch(&id, doc, &changes);
            return;
        }
        // Pack changes into messages under the inline limit, in order; each
        // message's changes are signed as a batch (`Engine::sign_batch`).
        let mut groups: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
        let mut size = 0;
        let mut too_big = false;
        for c in &changes {
            if c.len() > wire::GOSSIP_INLINE_LIMIT {
                too_big = true;
                break;
            }
            if size + c.len() > wire::GOSSIP_INLINE_LIMIT {
                groups.push(Vec::new());
                size = 0;
            }
            size += c.len() + 8;
            if let Some(g) = groups.last_mut() {
                g.push(c.clone());
            }
        }
        if too_big || groups.len() > 16 {
            // Pulled by sync, which carries the kept signatures: the last
            // change's vouches for the others (`shoal_protocol::sync::vouchers`).
            self.sign_batch(&id, doc, &changes);
            // Too big to inline: announce the heads; receivers pull.
            let bytes = wire::encode(&GossipBody::Heads {
                docs: vec![(doc.clone(), heads.iter().map(|h| h.0).collect())],
            });
            self.publish_sealed(id, &bytes, outbox);
            return;
        }
        for changes in groups.into_iter().filter(|g| !g.is_empty()) {
            let sigs = self.sign_batch(&id, doc, &changes);
            let bytes = wire::encode(&GossipBody::Changes {
                doc: doc.clone(),
                changes,
                sigs,
            });
            self.publish_sealed(id, &bytes, outbox);
        }
    }

    pub(super) fn publish_sealed(
        &mut self,
        id: SpaceId,
        plaintext: &[u8],
        outbox: &mut Vec<NetCommand>,
    ) {
        let Some(s) = self.spaces.get(&id) else {
            return;
        };
        let (epoch, key) = s.current();
        let sealed = envelope::seal(&id, epoch, key, random(), plaintext);
        outbox.push(NetCommand::Publish {
            topic: s.topic.clone(),
            data: sealed,
        });
    }

    pub(super) fn publish_summaries(&mut self, outbox: &mut Vec<NetCommand>) {
        if self.drop_gossip {
            return;
        }
        let ids: Vec<SpaceId> = self
            .spaces
            .keys()
            .filter(|id| self.peers.values().any(|p| p.proven.contains(id)))
            .copied()
            .collect();
        for id in ids {
            let mut all: Vec<(DocId, Vec<[u8; 32]>)> = Vec::new();
            if let Some(s) = self.spaces.get_mut(&id) {
                for (d, st) in s.docs.iter_mut() {
                    let h = st.doc.get_heads();
                    if !h.is_empty() {
                        all.push((d.clone(), h.iter().map(|c| c.0).collect()));
                    }
                }
            }
            for chunk in all.chunks(wire::MAX_HEADS_DOCS) {
                let body = wire::encode(&GossipBody::Heads {
                    docs: chunk.to_vec(),
                });
                self.publish_sealed(id, &body, outbox);
            }
        }
    }

    /// Decides on one gossip message; applies nothing yet (see
    /// [`Self::apply_gossip_batch`]).
    pub(super) fn on_gossip(
        &mut self,
        propagation: PeerId,
        source: Option<PeerId>,
        topic: &TopicHash,
        data: &[u8],
        outbox: &mut Vec<NetCommand>,
    ) -> std::result::Result<(), (MessageAcceptance, String)> {
        let reject = |r: String| (MessageAcceptance::Reject, r);
        let Some(space) = self.topics.get(topic).copied() else {
            return Err((
                MessageAcceptance::Ignore,
                "gossip on a topic we do not follow".into(),
            ));
        };
        let source = source.ok_or_else(|| reject("unsigned gossip".into()))?;
        let author = device_of_peer(&source).map_err(|e| reject(e.to_string()))?;
        let s = &self.spaces[&space];
        let epoch = envelope::peek_epoch(data).map_err(|e| reject(e.to_string()))?;
        let key = s
            .grant
            .keys
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, k)| k)
            .ok_or_else(|| reject(format!("unknown key epoch {epoch}")))?;
        let plain = envelope::open(&space, key, data).map_err(|e| reject(e.to_string()))?;
        let body: GossipBody = wire::decode("gossip body", &plain, wire::MAX_GOSSIP_BYTES)
            .map_err(|e| reject(e.to_string()))?;
        match body {
            GossipBody::Changes { doc, changes, sigs } => {
                if sigs.len() > changes.len() {
                    return Err(reject("more signatures than changes".into()));
                }
                // What can be decided before Automerge decodes anything: an
                // author that may not write this document, and never could,
                // is refused here. (A former writer's changes need their
                // seq, so they are decoded and checked below.)
                if s.roster.role_of(&author).is_some() {
                    let former = !doc.is_members() && s.roster.former_writers.contains_key(&author);
                    if !former {
                        s.roster
                            .check(&doc, &author)
                            .map_err(|e| reject(e.to_string()))?;
                    }
                }
                let mut budget = shoal_protocol::sync::Budget::new(
                    shoal_protocol::sync::MAX_INFLATED_PER_GOSSIP,
                );
                let mut parsed = Vec::with_capacity(changes.len());
                for c in &changes {
                    let c = shoal_protocol::sync::parse_change(c, &mut budget)
                        .map_err(|e| reject(format!("malformed change: {e}")))?;
                    // A device publishes its own changes and the app
                    // changes it vouches for, nobody else's.
                    if !shoal_protocol::actor::is_app_actor(c.actor_id()) {
                        let by = device_of(c.actor_id()).map_err(|e| reject(e.to_string()))?;
                        if by != author {
                            return Err(reject(format!(
                                "change by {} published by {}",
                                by.short(),
                                author.short()
                            )));
                        }
                    }
                    parsed.push(c);
                }
                // The author signs its batch's last change, which vouches
                // for its earlier ones, and vouches for each app change.
                let by_hash: HashMap<[u8; 32], &Change> =
                    parsed.iter().map(|c| (c.hash().0, c)).collect();
                let mut signed = HashMap::new();
                for (h, sig) in &sigs {
                    let Some(c) = by_hash.get(h) else { continue };
                    match verify_sig(&space, &doc, c, sig) {
                        Some(signer) if signer == author => {
                            signed.insert(ChangeHash(*h), signer);
                        }
                        _ => return Err(reject("a change's signature does not verify".into())),
                    }
                }
                let vouchers = shoal_protocol::sync::vouchers(&parsed, &signed)
                    .map_err(|_| reject("changes no signature vouches for".into()))?;
                // An app actor whose first change has not reached us: pulled
                // by sync (gaps), not held against whoever passed it on.
                self.check_app_actors(&space, &parsed, &vouchers)
                    .map_err(|(gap, why)| {
                        if gap {
                            (MessageAcceptance::Ignore, why)
                        } else {
                            reject(why)
                        }
                    })?;
                let Some(s) = self.spaces.get(&space) else {
                    return Err((MessageAcceptance::Ignore, "unknown space".into()));
                };
                match s.roster.role_of(&author) {
                    // Not in our view of members: maybe we lag (a new
                    // member), maybe it was removed. Neither spread nor
                    // penalised; `members` is pulled in case we lag.
                    None if !doc.is_members() || !s.roster.members.is_empty() => {
                        // Not fresh: an up-to-date session costs nothing, so a
                        // peer forwarding such messages cannot force full syncs.
                        self.kick((propagation, space, DocId::members()), false, outbox);
                        return Err((
                            MessageAcceptance::Ignore,
                            format!("{} is not a member (yet)", author.short()),
                        ));
                    }
                    // A fresh space's first members changes: checked in
                    // order when applied.
                    None => {}
                    // The same rule as sync: a former writer's changes only
                    // within the frontier recorded when it lost write access.
                    Some(_) => s
                        .roster
                        .check_changes(&doc, &parsed, &vouchers)
                        .map_err(|e| reject(e.to_string()))?,
                }
                self.store_sigs(&sigs);
                let slot = self.gossip_batch.entry((space, doc)).or_default();
                slot.0.extend(parsed);
                slot.1.extend(vouchers);
                slot.2.insert(propagation);
                slot.2.insert(source);
                Ok(())
            }
            GossipBody::Ephemeral { doc, data } => {
                if data.len() > wire::MAX_EPHEMERAL_BYTES {
                    return Err(reject("ephemeral message too large".into()));
                }
                // Any member's apps may say where they are, viewers' too;
                // nobody else's.
                if s.roster.role_of(&author).is_none() {
                    return Err((
                        MessageAcceptance::Ignore,
                        format!("ephemeral message from {}, not a member", author.short()),
                    ));
                }
                let now = Instant::now();
                let (since, n) = self
                    .ephemeral_rate
                    .entry(author.clone())
                    .or_insert((now, 0));
                if now.duration_since(*since) >= std::time::Duration::from_secs(1) {
                    (*since, *n) = (now, 0);
                }
                *n += 1;
                if *n > super::MAX_EPHEMERAL_PER_SEC {
                    return Err((
                        MessageAcceptance::Ignore,
                        format!("{} sends ephemeral messages too fast", author.short()),
                    ));
                }
                self.emit(Event::Ephemeral {
                    space,
                    doc,
                    from: author,
                    data,
                });
                Ok(())
            }
            GossipBody::Heads { docs } => {
                if docs.len() > wire::MAX_HEADS_DOCS {
                    return Err(reject("heads summary too long".into()));
                }
                if !s.roster.members.is_empty() && s.roster.role_of(&author).is_none() {
                    return Err((
                        MessageAcceptance::Ignore,
                        format!("heads from {}, not a member", author.short()),
                    ));
                }
                let mut behind = Vec::new();
                let mut ahead = Vec::new();
                if let Some(s) = self.spaces.get_mut(&space) {
                    for (doc, heads) in docs {
                        let mine = s.docs.get_mut(&doc).map(|d| {
                            let known = heads
                                .iter()
                                .all(|h| d.doc.get_change_by_hash(&ChangeHash(*h)).is_some());
                            let mut own: Vec<[u8; 32]> =
                                d.doc.get_heads().iter().map(|h| h.0).collect();
                            own.sort_unstable();
                            (known, own)
                        });
                        match mine {
                            Some((true, own)) => {
                                let mut theirs = heads;
                                theirs.sort_unstable();
                                if own != theirs {
                                    ahead.push(doc);
                                }
                            }
                            _ => behind.push((doc, heads)),
                        }
                    }
                }
                let from = if self.is_proven(&source, &space) {
                    source
                } else {
                    propagation
                };
                // The sender lacks changes we have: our own gossip of them
                // may never have reached it (a link that was cut while we
                // published). Offer them by sync, from this side; only to
                // the member itself, not to whoever relayed its summary.
                if from == source {
                    for doc in ahead {
                        self.kick((source, space, doc), true, outbox);
                    }
                }
                // Gossip in flight may bring them; pull only if it does not.
                for (doc, heads) in behind {
                    let held = self.holds(&space, &doc);
                    let key = (space, doc);
                    let mut opened_by = None;
                    if !held && !self.gaps.contains_key(&key) {
                        // A document we do not hold: counted against the
                        // member that named it, so made-up ids from one
                        // member cannot crowd out anyone else's.
                        let n = self.unknown_gaps.entry(from).or_default();
                        if *n >= MAX_UNKNOWN_GAPS_PER_PEER {
                            continue;
                        }
                        *n += 1;
                        opened_by = Some(from);
                    }
                    let g = self.gaps.entry(key).or_insert_with(|| Gap {
                        since: Instant::now(),
                        peers: HashSet::new(),
                        wanted: Vec::new(),
                        opened_by,
                    });
                    g.peers.insert(from);
                    if g.wanted.len() < MAX_WANTED {
                        g.wanted.extend(heads.into_iter().map(ChangeHash));
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) fn apply_gossip_batch(&mut self, outbox: &mut Vec<NetCommand>) {
        let batch = std::mem::take(&mut self.gossip_batch);
        for ((space, doc), (changes, vouchers, from)) in batch {
            let fresh = self.new_doc();
            let Some(s) = self.spaces.get_mut(&space) else {
                continue;
            };
            let d = s.docs.entry(doc.clone()).or_insert(fresh);
            let before = d.doc.get_heads();
            let authored: Vec<Change> = changes
                .iter()
                .filter(|c| d.doc.get_change_by_hash(&c.hash()).is_none())
                .cloned()
                .collect();
            let mut raw: Vec<Vec<u8>> = authored.iter().map(|c| c.raw_bytes().to_vec()).collect();
            let r = if doc.is_members() {
                members::apply_members_changes(&mut d.doc, &s.grant.creator, changes).map(|refused| {
                    if !refused.is_empty() {
                        warn!(space = %space.short(), n = refused.len(), "members changes refused");
                        let bad: HashSet<&[u8]> = refused.iter().map(|c| c.raw_bytes()).collect();
                        raw.retain(|r| !bad.contains(r.as_slice()));
                    }
                })
            } else {
                d.doc
                    .apply_changes(changes)
                    .map_err(shoal_protocol::Error::from)
            };
            shoal_protocol::doc::forget_patches(&mut d.doc);
            if let Err(e) = r {
                // Not stored either: a bad chunk in the log would take good
                // changes down with it at load. Sync fetches them again.
                warn!(space = %space.short(), %doc, error = %e, "gossiped changes failed to apply");
                raw.clear();
            }
            let missing = !d.doc.get_missing_deps(&[]).is_empty();
            let heads = d.doc.get_heads();
            if missing {
                // A gap: an earlier change has not reached us. Gossip over
                // several paths reorders, so give it a moment before pulling.
                let g = self
                    .gaps
                    .entry((space, doc.clone()))
                    .or_insert_with(|| Gap {
                        since: Instant::now(),
                        peers: HashSet::new(),
                        wanted: Vec::new(),
                        opened_by: None,
                    });
                g.peers.extend(from);
            }
            self.bind_app_actors(&space, &doc, &authored, &vouchers);
            let applied = Applied::new(raw, &authored, &vouchers);
            self.after_remote_change(space, &doc, None, heads != before, &applied, outbox);
        }
    }

    /// Persist, update roles, tell watchers; changes that came by sync (from
    /// `synced_from`) are passed on to the other members we are connected
    /// to, while gossip (`None`) spreads by itself.
    pub(super) fn after_remote_change(
        &mut self,
        space: SpaceId,
        doc: &DocId,
        synced_from: Option<PeerId>,
        changed: bool,
        applied: &Applied,
        outbox: &mut Vec<NetCommand>,
    ) {
        if let Err(e) = self.persist(space, doc, &applied.raw) {
            warn!(space = %space.short(), %doc, error = %e, "cannot persist remote change");
        }
        if !changed {
            return;
        }
        let origin = if synced_from.is_some() {
            Origin::Sync
        } else {
            Origin::Gossip
        };
        for t in &applied.times {
            self.counters.sync_lag.observe(origin.as_str(), *t);
        }
        if doc.is_members() {
            self.refresh_roster(space);
        }
        let heads = self
            .spaces
            .get_mut(&space)
            .and_then(|s| s.docs.get_mut(doc))
            .map(|d| d.doc.get_heads())
            .unwrap_or_default();
        self.emit(Event::DocChanged {
            space: space.to_owned(),
            doc: doc.to_owned(),
            origin,
            heads: hex_heads(&heads),
            authors: applied.authors.clone(),
        });
        if let Some(from) = synced_from {
            let others: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(p, e)| **p != from && e.proven.contains(&space))
                .map(|(p, _)| *p)
                .collect();
            for p in others {
                self.kick((p, space, doc.clone()), false, outbox);
            }
        }
    }
}
