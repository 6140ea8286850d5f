//! Roles, the `members` document, and the rules every receiving peer applies
//! to incoming changes.
//!
//! The members document is plain Automerge JSON:
//! `{"space": {"name", "creator"}, "devices": {"<device>": {"role", "name", "added_by"}}}`.
//! The creator named in the space grant is the first owner; after that only
//! owners may change `members`, and only owners and editors may change any
//! other document.
//!
//! # Former writers
//!
//! When an owner demotes a writer to viewer or removes it, it records the
//! device's *frontier* in the device's entry:
//! `/devices/<device>/frontier/<doc>/<actor-hex>` = the highest `seq` the
//! owner had seen from that Automerge actor (one of the device's actors,
//! see [`crate::actor::device_of`]) in that document. From then on a change
//! by the device is valid iff it is a change the demoting owner had seen:
//! its (actor, seq) is at or below the recorded seq for its actor in its
//! document. Anything else (written after the demotion, or concurrently
//! with it and not yet seen by the owner) is refused, by gossip and sync
//! alike, whoever relays it. So the history a former writer wrote while it
//! could stays valid, and a device that joins later still syncs it.
//! `members` itself never accepts a former owner's changes: there the
//! current role alone decides.
//!
//! Tombstones written before frontiers existed (`was_writer` without a
//! `frontier`) keep the old, lenient meaning: the device's changes to
//! documents other than `members` are accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use automerge::{ActorId, AutoCommit, Change};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::actor::device_of;
use crate::doc::{put_json, to_json};
use crate::error::{Error, Result};
use crate::ids::{DeviceId, DocId};

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Invite, revoke, change roles, and write.
    Owner,
    /// Read and write documents.
    Editor,
    /// Read only.
    Viewer,
}

impl Role {
    /// May change documents other than `members`.
    pub fn can_write(self) -> bool {
        matches!(self, Role::Owner | Role::Editor)
    }

    /// May change `members`.
    pub fn can_admin(self) -> bool {
        self == Role::Owner
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "owner" => Ok(Role::Owner),
            "editor" => Ok(Role::Editor),
            "viewer" => Ok(Role::Viewer),
            other => Err(Error::InvalidId {
                kind: "role",
                reason: format!("{other:?} is not owner, editor or viewer"),
            }),
        }
    }
}

/// One device's entry in `members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its role.
    pub role: Role,
    /// The name the device gave itself.
    pub name: String,
    /// Who added it (none for the creator).
    pub added_by: Option<DeviceId>,
    /// Its long-term x25519 public key, to seal new epoch keys to it.
    pub x25519: Option<[u8; 32]>,
}

/// The membership of a space as one peer currently sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    /// The space's creator: an owner even before `members` is known.
    pub creator: DeviceId,
    /// Devices by id.
    pub members: BTreeMap<DeviceId, Member>,
    /// Devices that could write once and no longer can (removed or
    /// demoted), with the frontier recorded when they lost write access
    /// (`None` for a tombstone older than frontiers): their changes up to
    /// it stay valid, so a device that joins later can still sync the
    /// history they wrote; later ones are refused (see the module docs).
    pub former_writers: BTreeMap<DeviceId, Option<Frontier>>,
    /// Devices whose entry in `members` is not a member (removed, or a role
    /// this version does not know). The creator among them is no owner.
    pub tombstones: std::collections::BTreeSet<DeviceId>,
}

impl Roster {
    /// The roster of a space whose `members` is not known yet: the creator
    /// alone, as owner.
    pub fn new(creator: DeviceId) -> Self {
        Self {
            creator,
            members: BTreeMap::new(),
            former_writers: Default::default(),
            tombstones: Default::default(),
        }
    }

    /// Reads the roster from a members document.
    pub fn read(creator: DeviceId, doc: &AutoCommit) -> Self {
        let mut members = BTreeMap::new();
        let mut former_writers = BTreeMap::new();
        let mut tombstones = std::collections::BTreeSet::new();
        if let Some(devs) = to_json(doc).get("devices").and_then(|d| d.as_object()) {
            for (id, m) in devs {
                if m.get("was_writer").and_then(|w| w.as_bool()) == Some(true) {
                    if let Ok(d) = id.parse::<DeviceId>() {
                        former_writers.insert(d, m.get("frontier").map(read_frontier));
                    }
                }
                let Ok(id) = id.parse::<DeviceId>() else {
                    continue;
                };
                let Some(role) = m
                    .get("role")
                    .and_then(|r| r.as_str())
                    .and_then(|r| r.parse::<Role>().ok())
                else {
                    tombstones.insert(id);
                    continue;
                };
                let name = m
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_string();
                let added_by = m
                    .get("added_by")
                    .and_then(|a| a.as_str())
                    .and_then(|a| a.parse().ok());
                let x25519 = m
                    .get("x25519")
                    .and_then(|a| a.as_str())
                    .and_then(|a| hex::decode(a).ok())
                    .and_then(|b| <[u8; 32]>::try_from(b).ok());
                members.insert(
                    id,
                    Member {
                        role,
                        name,
                        added_by,
                        x25519,
                    },
                );
            }
        }
        Self {
            creator,
            members,
            former_writers,
            tombstones,
        }
    }

    /// The role of `device`, if it is a member. The creator is an owner
    /// while `members` has no entry for it at all; once it has one (a role,
    /// or a removal) that entry decides, as for anyone else.
    pub fn role_of(&self, device: &DeviceId) -> Option<Role> {
        match self.members.get(device) {
            Some(m) => Some(m.role),
            None if *device == self.creator && !self.tombstones.contains(device) => {
                Some(Role::Owner)
            }
            None => None,
        }
    }

    /// How many owners the space has (the creator counted while it has no
    /// entry). The last one may not be removed or demoted.
    pub fn owners(&self) -> usize {
        let listed = self
            .members
            .values()
            .filter(|m| m.role == Role::Owner)
            .count();
        let creator = !self.members.contains_key(&self.creator)
            && self.role_of(&self.creator) == Some(Role::Owner);
        listed + usize::from(creator)
    }

    /// Whether `author` may write a change to `doc`.
    pub fn check(&self, doc: &DocId, author: &DeviceId) -> Result<()> {
        let role = self
            .role_of(author)
            .ok_or_else(|| Error::Unauthorized(format!("{} is not a member", author.short())))?;
        let ok = if doc.is_members() {
            role.can_admin()
        } else {
            role.can_write()
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Unauthorized(format!(
                "{} is {role} and may not change {doc}",
                author.short()
            )))
        }
    }

    /// Checks the author of every change (as sync or gossip carries it): a
    /// current writer, or a former one whose change is within the frontier
    /// recorded when it lost write access (see the module docs). The first
    /// refusal wins. `vouchers` names the device vouching for each change
    /// (see [`crate::sync::vouchers`]); a change it does not name is its
    /// actor's device's.
    pub fn check_changes(
        &self,
        doc: &DocId,
        changes: &[Change],
        vouchers: &std::collections::HashMap<automerge::ChangeHash, DeviceId>,
    ) -> Result<()> {
        for c in changes {
            let author = match vouchers.get(&c.hash()) {
                Some(d) => d.clone(),
                None => device_of(c.actor_id())?,
            };
            let Err(refused) = self.check(doc, &author) else {
                continue;
            };
            if doc.is_members() {
                return Err(refused);
            }
            match self.former_writers.get(&author) {
                None => return Err(refused),
                // A tombstone from before frontiers: lenient, as it was.
                Some(None) => {}
                Some(Some(f)) => {
                    let seen = f.get(doc).and_then(|a| a.get(c.actor_id())).copied();
                    if seen.is_none_or(|s| c.seq() > s) {
                        return Err(Error::Unauthorized(format!(
                            "{} could no longer write to {doc} when it wrote change {} \
                             (seq {} of its actor; the owner had seen {})",
                            author.short(),
                            c.hash(),
                            c.seq(),
                            seen.map_or("none".to_string(), |s| format!("up to {s}")),
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What an owner had seen of a device when it lost write access: per
/// document, per Automerge actor of the device, the highest `seq`.
pub type Frontier = BTreeMap<DocId, BTreeMap<ActorId, u64>>;

/// The highest `seq` of each of `device`'s actors in `doc`, its own and
/// the app actors it vouched for (`apps`).
pub fn frontier_in(
    doc: &mut AutoCommit,
    device: &DeviceId,
    apps: &std::collections::BTreeSet<ActorId>,
) -> BTreeMap<ActorId, u64> {
    let mut out: BTreeMap<ActorId, u64> = BTreeMap::new();
    for c in doc.get_changes_meta(&[]) {
        if apps.contains(c.actor.as_ref()) || device_of(&c.actor).is_ok_and(|d| d == *device) {
            let seq = out.entry(c.actor.into_owned()).or_default();
            *seq = (*seq).max(c.seq);
        }
    }
    out
}

fn frontier_json(f: &Frontier) -> serde_json::Value {
    let mut docs = serde_json::Map::new();
    for (doc, actors) in f {
        let per: serde_json::Map<String, serde_json::Value> = actors
            .iter()
            .map(|(a, s)| (hex::encode(a.to_bytes()), json!(s)))
            .collect();
        docs.insert(doc.to_string(), serde_json::Value::Object(per));
    }
    serde_json::Value::Object(docs)
}

/// Reads a frontier; entries that do not parse are left out (so they
/// vouch for nothing).
fn read_frontier(v: &serde_json::Value) -> Frontier {
    let mut f = Frontier::new();
    for (doc, per) in v.as_object().into_iter().flatten() {
        let Ok(doc) = doc.parse::<DocId>() else {
            continue;
        };
        let actors: BTreeMap<ActorId, u64> = per
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(a, s)| Some((ActorId::from(hex::decode(a).ok()?), s.as_u64()?)))
            .collect();
        f.insert(doc, actors);
    }
    f
}

/// Writes the space header and the creator's own entry into a fresh
/// members document.
pub fn init_members(
    doc: &mut AutoCommit,
    space_name: &str,
    creator: &DeviceId,
    device_name: &str,
    x25519: Option<&[u8; 32]>,
) -> Result<()> {
    put_json(
        doc,
        "/space",
        &json!({"name": space_name, "creator": creator.to_string()}),
    )?;
    set_member(doc, creator, Role::Owner, device_name, None, x25519)
}

/// Adds a device or changes its entry.
pub fn set_member(
    doc: &mut AutoCommit,
    device: &DeviceId,
    role: Role,
    name: &str,
    added_by: Option<&DeviceId>,
    x25519: Option<&[u8; 32]>,
) -> Result<()> {
    let mut v = json!({"role": role.as_str(), "name": name});
    if let Some(a) = added_by {
        v["added_by"] = json!(a.to_string());
    }
    if let Some(k) = x25519 {
        v["x25519"] = json!(hex::encode(k));
    }
    put_json(doc, &format!("/devices/{device}"), &v)
}

/// Records a new epoch's key sealed to each remaining member:
/// `/keys/e<epoch>/<device>` = hex of a sealed box. Only the addressee can
/// open its entry.
pub fn put_epoch_keys(
    doc: &mut AutoCommit,
    epoch: u32,
    sealed: &[(DeviceId, Vec<u8>)],
) -> Result<()> {
    let mut m = serde_json::Map::new();
    for (d, b) in sealed {
        m.insert(d.to_string(), json!(hex::encode(b)));
    }
    // "e" keeps the key a map key (a bare number would index a list).
    put_json(
        doc,
        &format!("/keys/e{epoch}"),
        &serde_json::Value::Object(m),
    )
}

/// The sealed epoch keys addressed to `me`, by epoch.
pub fn epoch_keys_for(doc: &AutoCommit, me: &DeviceId) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    if let Some(keys) = to_json(doc).get("keys").and_then(|k| k.as_object()) {
        for (e, per) in keys {
            let (Ok(e), Some(b)) = (
                e.trim_start_matches('e').parse::<u32>(),
                per.get(me.to_string())
                    .and_then(|v| v.as_str())
                    .and_then(|h| hex::decode(h).ok()),
            ) else {
                continue;
            };
            out.push((e, b));
        }
    }
    out
}

/// Removes a device, keeping a tombstone; for a device that could write,
/// with the frontier of its changes the owner had seen (see the module
/// docs).
pub fn remove_member(
    doc: &mut AutoCommit,
    device: &DeviceId,
    frontier: Option<&Frontier>,
) -> Result<()> {
    let mut v = json!({"role": "removed", "was_writer": frontier.is_some()});
    if let Some(f) = frontier {
        v["frontier"] = frontier_json(f);
    }
    put_json(doc, &format!("/devices/{device}"), &v)
}

/// Records that a device could write, and what the owner had seen of it,
/// as it is demoted.
pub fn mark_former_writer(
    doc: &mut AutoCommit,
    device: &DeviceId,
    frontier: &Frontier,
) -> Result<()> {
    put_json(doc, &format!("/devices/{device}/was_writer"), &json!(true))?;
    put_json(
        doc,
        &format!("/devices/{device}/frontier"),
        &frontier_json(frontier),
    )
}

/// Applies remote changes to the members document, accepting a change only
/// when its author is an owner in the state the earlier accepted changes
/// produced. Loops until no more changes can be accepted, so a batch that
/// adds an owner and then carries that owner's changes is taken whole.
/// Returns the refused changes.
pub fn apply_members_changes(
    doc: &mut AutoCommit,
    creator: &DeviceId,
    mut pending: Vec<Change>,
) -> Result<Vec<Change>> {
    loop {
        let roster = Roster::read(creator.clone(), doc);
        let (ok, rest): (Vec<Change>, Vec<Change>) = pending.into_iter().partition(|c| {
            device_of(c.actor_id())
                .map(|d| roster.check(&DocId::members(), &d).is_ok())
                .unwrap_or(false)
        });
        pending = rest;
        if ok.is_empty() {
            return Ok(pending);
        }
        let applied = doc.apply_changes(ok);
        crate::doc::forget_patches(doc);
        applied?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::actor_for;

    fn dev(b: u8) -> DeviceId {
        DeviceId::from_bytes(vec![b; 38]).unwrap()
    }

    #[test]
    fn roles_gate_writes() {
        let (a, b, c, x) = (dev(1), dev(2), dev(3), dev(4));
        let mut d = AutoCommit::new().with_actor(actor_for(&a, [0; 8]));
        init_members(&mut d, "notes", &a, "laptop", None).unwrap();
        set_member(&mut d, &b, Role::Editor, "desk", Some(&a), Some(&[5; 32])).unwrap();
        set_member(&mut d, &c, Role::Viewer, "phone", Some(&a), None).unwrap();
        let r = Roster::read(a.clone(), &d);
        let todo: DocId = "todo".parse().unwrap();
        assert!(r.check(&todo, &a).is_ok());
        assert!(r.check(&todo, &b).is_ok());
        assert!(r.check(&todo, &c).is_err());
        assert!(r.check(&todo, &x).is_err());
        assert!(r.check(&DocId::members(), &a).is_ok());
        assert!(r.check(&DocId::members(), &b).is_err());
        assert_eq!(r.members[&b].added_by, Some(a.clone()));
        assert_eq!(r.members[&b].x25519, Some([5; 32]));
        put_epoch_keys(&mut d, 1, &[(b.clone(), vec![1, 2, 3])]).unwrap();
        assert_eq!(epoch_keys_for(&d, &b), vec![(1, vec![1, 2, 3])]);
        assert!(epoch_keys_for(&d, &c).is_empty());
        // demoting the creator takes effect
        set_member(&mut d, &a, Role::Viewer, "laptop", None, None).unwrap();
        assert!(Roster::read(a.clone(), &d).check(&todo, &a).is_err());
    }

    #[test]
    fn a_former_writer_keeps_only_the_history_the_owner_had_seen() {
        use automerge::transaction::Transactable;
        let (a, e) = (dev(1), dev(2));
        let todo: DocId = "todo".parse().unwrap();
        let mut m = AutoCommit::new().with_actor(actor_for(&a, [0; 8]));
        init_members(&mut m, "notes", &a, "laptop", None).unwrap();
        set_member(&mut m, &e, Role::Editor, "desk", Some(&a), None).unwrap();
        // e writes twice under one actor, once under another (a restart)
        let mut t = AutoCommit::new().with_actor(actor_for(&e, [1; 8]));
        t.put(automerge::ROOT, "x", 1).unwrap();
        t.commit();
        t.put(automerge::ROOT, "x", 2).unwrap();
        t.commit();
        let mut t = t.fork().with_actor(actor_for(&e, [2; 8]));
        t.put(automerge::ROOT, "x", 3).unwrap();
        t.commit();
        let seen = t.get_changes(&[]);
        assert_eq!(seen.len(), 3);
        let f: Frontier = [(todo.clone(), frontier_in(&mut t, &e, &Default::default()))].into();
        assert_eq!(f[&todo].len(), 2);
        // e is demoted with that frontier, then writes again under both
        // actors
        set_member(&mut m, &e, Role::Viewer, "desk", Some(&a), None).unwrap();
        mark_former_writer(&mut m, &e, &f).unwrap();
        let heads = t.get_heads();
        t.put(automerge::ROOT, "x", 4).unwrap();
        t.commit();
        let mut t1 = t.fork().with_actor(actor_for(&e, [1; 8]));
        t1.put(automerge::ROOT, "x", 5).unwrap();
        t1.commit();
        let after = t.get_changes(&heads);
        let after1 = t1.get_last_local_change().unwrap();
        let r = Roster::read(a.clone(), &m);
        assert_eq!(r.role_of(&e), Some(Role::Viewer));
        assert!(r.check_changes(&todo, &seen, &Default::default()).is_ok());
        let err = r
            .check_changes(&todo, &after, &Default::default())
            .unwrap_err();
        assert!(err.to_string().contains("no longer"), "{err}");
        assert!(r
            .check_changes(&todo, &[after1], &Default::default())
            .is_err());
        // nothing in a document the owner had seen nothing of
        let other: DocId = "other".parse().unwrap();
        assert!(r.check_changes(&other, &seen, &Default::default()).is_err());
        // never in members
        assert!(r
            .check_changes(&DocId::members(), &seen, &Default::default())
            .is_err());
        // removal keeps the same rule
        remove_member(&mut m, &e, Some(&f)).unwrap();
        let r = Roster::read(a.clone(), &m);
        assert_eq!(r.role_of(&e), None);
        assert!(r.check_changes(&todo, &seen, &Default::default()).is_ok());
        assert!(r.check_changes(&todo, &after, &Default::default()).is_err());
        // promoted again, it writes like any editor
        set_member(&mut m, &e, Role::Editor, "desk", Some(&a), None).unwrap();
        assert!(Roster::read(a.clone(), &m)
            .check_changes(&todo, &after, &Default::default())
            .is_ok());
        // an old tombstone without a frontier stays lenient
        put_json(
            &mut m,
            &format!("/devices/{e}"),
            &json!({"role": "removed", "was_writer": true}),
        )
        .unwrap();
        assert!(Roster::read(a.clone(), &m)
            .check_changes(&todo, &after, &Default::default())
            .is_ok());
    }

    #[test]
    fn a_removed_creator_is_no_owner() {
        let (a, b) = (dev(1), dev(2));
        // before `members` is known, the creator alone is an owner
        let r = Roster::new(a.clone());
        assert_eq!(r.role_of(&a), Some(Role::Owner));
        assert_eq!(r.owners(), 1);
        let mut d = AutoCommit::new().with_actor(actor_for(&a, [0; 8]));
        init_members(&mut d, "notes", &a, "laptop", None).unwrap();
        set_member(&mut d, &b, Role::Owner, "desk", Some(&a), None).unwrap();
        assert_eq!(Roster::read(a.clone(), &d).owners(), 2);
        // b removes the creator
        let mut by_b = d.fork().with_actor(actor_for(&b, [0; 8]));
        remove_member(&mut by_b, &a, Some(&Frontier::new())).unwrap();
        let r = Roster::read(a.clone(), &by_b);
        assert_eq!(r.role_of(&a), None);
        assert!(r.check(&DocId::members(), &a).is_err());
        assert_eq!(r.owners(), 1);
        // the creator's change re-adding itself, on the history it had, is
        // refused by a peer that has the removal
        let heads = d.get_heads();
        set_member(&mut d, &a, Role::Owner, "laptop", None, None).unwrap();
        let back = d.get_changes(&heads);
        let refused = apply_members_changes(&mut by_b, &a, back.clone()).unwrap();
        assert_eq!(refused.len(), back.len());
        assert_eq!(Roster::read(a.clone(), &by_b).role_of(&a), None);
    }

    #[test]
    fn members_changes_from_non_owners_are_refused() {
        let (a, b) = (dev(1), dev(2));
        let mut owner = AutoCommit::new().with_actor(actor_for(&a, [0; 8]));
        init_members(&mut owner, "notes", &a, "laptop", None).unwrap();
        set_member(&mut owner, &b, Role::Editor, "desk", Some(&a), None).unwrap();
        // b (an editor) tries to make itself owner
        let mut forged = owner.fork().with_actor(actor_for(&b, [1; 8]));
        set_member(&mut forged, &b, Role::Owner, "desk", None, None).unwrap();
        let heads = owner.get_heads();
        let evil = forged.get_changes(&heads);
        let all = owner.get_changes(&[]);
        let mut fresh = AutoCommit::new();
        let mut batch = evil.clone();
        batch.extend(all); // order must not matter
        let refused = apply_members_changes(&mut fresh, &a, batch).unwrap();
        assert_eq!(refused.len(), evil.len());
        assert_eq!(
            Roster::read(a.clone(), &fresh).role_of(&b),
            Some(Role::Editor)
        );
    }
}
