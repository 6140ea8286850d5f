//! Writes the seed corpus: a few real encoded messages per fuzz target,
//! into `fuzz/corpus/<target>/`. Run from `fuzz/` with
//! `cargo run --example seed_corpus` (any toolchain); the output is
//! deterministic, so a re-run changes nothing.

use std::fs;
use std::path::Path;

use automerge::sync::{self as am_sync, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use shoal_protocol::actor::actor_for;
use shoal_protocol::files::{BlobKind, BlobRequest, BlobResponse, Entry, Kind, Manifest};
use shoal_protocol::invite::{self, InviteCode, InviteSecret};
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::members::{self, Role};
use shoal_protocol::wire::{self, *};
use shoal_protocol::{envelope, frame, DeviceId, DocId, SpaceId, SpaceKey};
use x25519_dalek::{PublicKey, StaticSecret};

fn dev(n: u8) -> DeviceId {
    let mut b = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    b.extend([n; 32]);
    DeviceId::from_bytes(b).expect("device id")
}

/// Commits with a fixed time, so the corpus is the same on every run.
fn commit(d: &mut AutoCommit) {
    d.commit_with(automerge::transaction::CommitOptions::default().with_time(1_765_000_000));
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

/// A members document: the creator, an editor and a viewer, an epoch key.
fn members_doc() -> AutoCommit {
    let (a, b, c) = (dev(1), dev(2), dev(3));
    let mut d = AutoCommit::new().with_actor(actor_for(&a, [0; 8]));
    members::init_members(&mut d, "notes", &a, "laptop", Some(&[7; 32])).expect("init");
    commit(&mut d);
    members::set_member(&mut d, &b, Role::Editor, "desk", Some(&a), Some(&[5; 32])).expect("set");
    commit(&mut d);
    members::set_member(&mut d, &c, Role::Viewer, "phone", Some(&a), None).expect("set");
    commit(&mut d);
    members::put_epoch_keys(&mut d, 1, &[(b.clone(), vec![1, 2, 3])]).expect("keys");
    commit(&mut d);
    members::remove_member(&mut d, &c, None).expect("remove");
    commit(&mut d);
    d
}

/// A small document with a text and a list, by `who`.
fn small_doc(who: u8) -> AutoCommit {
    let mut d = AutoCommit::new().with_actor(actor_for(&dev(who), [who; 8]));
    d.put(ROOT, "title", "shopping").expect("put");
    commit(&mut d);
    let l = d
        .put_object(ROOT, "items", automerge::ObjType::List)
        .expect("list");
    d.insert(&l, 0, "milk").expect("insert");
    d.insert(&l, 1, 2i64).expect("insert");
    commit(&mut d);
    let t = d
        .put_object(ROOT, "note", automerge::ObjType::Text)
        .expect("text");
    d.splice_text(&t, 0, 0, "hello").expect("splice");
    commit(&mut d);
    d
}

/// The sync messages two documents exchange until they agree, from both
/// sides, encoded (the first few of each).
fn sync_exchange(a: &mut AutoCommit, b: &mut AutoCommit) -> Vec<Vec<u8>> {
    let (mut sa, mut sb) = (am_sync::State::new(), am_sync::State::new());
    let mut out = Vec::new();
    for _ in 0..6 {
        let ma = a.sync().generate_sync_message(&mut sa);
        if let Some(m) = ma.clone() {
            out.push(m.clone().encode());
            b.sync().receive_sync_message(&mut sb, m).expect("receive");
        }
        let mb = b.sync().generate_sync_message(&mut sb);
        if let Some(m) = mb.clone() {
            out.push(m.clone().encode());
            a.sync().receive_sync_message(&mut sa, m).expect("receive");
        }
        if ma.is_none() && mb.is_none() {
            break;
        }
    }
    out
}

fn main() {
    let space = SpaceId([9; 32]);
    let doc: DocId = "todo".parse().expect("doc id");

    // sync messages: a fresh peer and a peer with a concurrent edit
    let mut a = small_doc(1);
    let mut b = AutoCommit::new();
    let first = sync_exchange(&mut a, &mut b);
    let mut c = a.fork().with_actor(actor_for(&dev(3), [3; 8]));
    c.put(ROOT, "title", "groceries").expect("put");
    commit(&mut c);
    a.put(ROOT, "done", true).expect("put");
    commit(&mut a);
    let second = sync_exchange(&mut a, &mut c);
    let msgs: Vec<Vec<u8>> = first.into_iter().chain(second).collect();
    for (i, m) in msgs.iter().enumerate().take(6) {
        write("sync_decode", &format!("message-{i}"), m);
        write("sync_receive", &format!("message-{i}"), m);
    }
    // a V1 message: its changes one chunk each
    let changes: Vec<Vec<u8>> = a
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let v1 = am_sync::Message {
        heads: a.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: changes.clone().into(),
        flags: None,
        version: am_sync::MessageVersion::V1,
    };
    write("sync_decode", "message-v1", &v1.clone().encode());
    // a V2 message carrying a whole saved document
    let v2 = am_sync::Message {
        heads: a.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: a.save().into(),
        flags: None,
        version: am_sync::MessageVersion::V2,
    };
    write("sync_decode", "message-v2-document", &v2.encode());

    // wire messages, each behind the byte that picks its type
    let wire_msgs: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "hello-request",
            wire::encode(&HelloRequest::V1 {
                challenge: [1; 32],
                recheck: true,
            }),
        ),
        (
            1,
            "hello-response",
            wire::encode(&HelloResponse::V1 {
                proofs: vec![[2; 32], [3; 32]],
            }),
        ),
        (
            2,
            "sync-request",
            wire::encode(&SyncRequest::V1 {
                space,
                doc: doc.clone(),
                fresh: true,
                message: Some(msgs[0].clone()),
                sigs: vec![([4; 32], vec![5; 64])],
            }),
        ),
        (
            3,
            "sync-response",
            wire::encode(&SyncResponse::V1 {
                message: Some(v1.encode()),
                sigs: vec![([4; 32], vec![5; 64])],
            }),
        ),
        (
            3,
            "sync-refused",
            wire::encode(&SyncResponse::Refused {
                reason: RefuseReason::Busy,
            }),
        ),
        (
            4,
            "join-request",
            wire::encode(&JoinRequest::V1 {
                invite: [6; 8],
                ephemeral: [7; 32],
                x25519: [8; 32],
                name: "laptop".into(),
                proof: [9; 32],
            }),
        ),
        (
            5,
            "join-response",
            wire::encode(&JoinResponse::V1 {
                ephemeral: [1; 32],
                sealed: vec![2; 80],
            }),
        ),
        (
            5,
            "join-refused",
            wire::encode(&JoinResponse::Refused {
                reason: JoinRefusal::Expired,
            }),
        ),
        (
            6,
            "gossip-changes",
            wire::encode(&GossipBody::Changes {
                doc: doc.clone(),
                changes: changes.clone(),
                sigs: vec![([4; 32], vec![5; 64])],
            }),
        ),
        (
            6,
            "gossip-heads",
            wire::encode(&GossipBody::Heads {
                docs: vec![(doc.clone(), vec![[1; 32]]), (DocId::members(), vec![])],
            }),
        ),
        (
            7,
            "blob-request",
            wire::encode(&BlobRequest::V1 {
                space,
                kind: BlobKind::Chunk,
                hash: [3; 32],
            }),
        ),
        (
            8,
            "blob-response",
            wire::encode(&BlobResponse::Found { len: 131072 }),
        ),
    ];
    for (which, name, bytes) in &wire_msgs {
        let mut b = vec![*which];
        b.extend(bytes);
        write("wire_decode", name, &b);
    }

    // envelopes sealed under the target's fixed key, and one under another
    let key = SpaceKey::from_bytes([1; 32]);
    let body = wire_msgs
        .iter()
        .find(|(_, n, _)| *n == "gossip-changes")
        .map(|(_, _, b)| b.clone())
        .expect("gossip body");
    write(
        "envelope",
        "gossip-changes",
        &envelope::seal(&space, 0, &key, [7; 24], &body),
    );
    write(
        "envelope",
        "gossip-heads-epoch-3",
        &envelope::seal(&space, 3, &key, [8; 24], &wire_msgs[9].2),
    );
    write(
        "envelope",
        "other-key",
        &envelope::seal(&space, 1, &SpaceKey::from_bytes([2; 32]), [9; 24], b"x"),
    );

    // index entries, manifests and paths
    let file = Entry {
        kind: Kind::File,
        hash: [1; 32],
        chunked: true,
        size: 200_000,
        mode: 0o644,
        mtime_ns: 1_765_000_000_000_000_000,
        deleted: false,
        device: dev(1),
        target: None,
    };
    let link = Entry {
        kind: Kind::Symlink,
        hash: [0; 32],
        chunked: false,
        size: 0,
        mode: 0o777,
        mtime_ns: -5,
        deleted: false,
        device: dev(2),
        target: Some("../elsewhere".into()),
    };
    write("files", "entry-file", &file.encode());
    write("files", "entry-symlink", &link.encode());
    let m = Manifest {
        file_hash: [4; 32],
        size: 200_000,
        chunks: vec![([5; 32], 131_072), ([6; 32], 200_000 - 131_072)],
    };
    write("files", "manifest", &m.encode());
    write(
        "files",
        "path",
        "photos/2026/e\u{301}t\u{e9}.jpg".as_bytes(),
    );
    write("files", "path-bad", b"a/../.shoal/x");

    // invite codes and sealed grants
    let code = InviteCode {
        space,
        inviter: dev(1),
        addrs: vec![vec![4, 127, 0, 0, 1, 6, 0x12, 0x34]],
        invite: [5; 8],
        secret: InviteSecret([9; 16]),
        expires_at: 1_800_000_000,
        role: Role::Editor,
    };
    write("invite", "code", code.encode().as_bytes());
    let grant = SpaceGrant {
        space,
        name: "notes".into(),
        creator: dev(1),
        keys: vec![(0, SpaceKey::from_bytes([1; 32])), (1, key.clone())],
    };
    let grant = wire::encode(&grant);
    write(
        "invite",
        "grant-sealed",
        &invite::seal_with(&[3; 32], [5; 24], &grant),
    );
    write("invite", "grant-plain", &grant);
    let mine = PublicKey::from(&StaticSecret::from([4u8; 32])).to_bytes();
    write(
        "invite",
        "epoch-key-boxed",
        &invite::seal_to(&mine, [6; 32], [7; 24], &wire::encode(&(1u32, [1u8; 32]))),
    );

    // members documents, whole and as changes
    let mut md = members_doc();
    write("roster", "members", &md.save());
    write("roster", "small-doc", &small_doc(2).save());
    let mut fork = md.fork().with_actor(actor_for(&dev(2), [1; 8]));
    members::set_member(&mut fork, &dev(2), Role::Owner, "desk", None, None).expect("set");
    commit(&mut fork);
    write("roster", "forged-owner", &fork.save());

    // request-response frames: a limit (2 bytes, times 16), then a stream
    let mut two = vec![0x10, 0x00];
    for body in [&b"hello"[..], b""] {
        two.extend(frame::header(body.len(), 4096).expect("header"));
        two.extend(body);
    }
    write("frame", "two-frames", &two);
    let mut over = vec![0x00, 0x01];
    over.extend(frame::header(4096, usize::MAX).expect("header"));
    write("frame", "over-limit", &over);
}
