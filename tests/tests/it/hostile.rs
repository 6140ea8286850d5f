//! Hostile input: a raw libp2p peer, built from shoal's own codec but driven
//! by the test, sends garbage, forged and oversized messages to a real node.
//! Each is rejected, and the node keeps serving its members.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use automerge::sync::{ChunkList, Message, MessageVersion};
use automerge::AutoCommit;
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol, Swarm};
use serde_json::json;
use shoal_node::net::codec::BytesCodec;
use shoal_node::Event;
use shoal_protocol::actor::actor_for;
use shoal_protocol::keys::SpaceGrant;
use shoal_protocol::wire::{
    self, GossipBody, HelloRequest, HelloResponse, SyncRequest, SyncResponse,
};
use shoal_protocol::{doc as jdoc, envelope, hello, DeviceId, DocId, Role, SpaceKey};

use shoal_tests::*;

#[derive(NetworkBehaviour)]
struct HostileBehaviour {
    gossipsub: gossipsub::Behaviour,
    hello: request_response::Behaviour<BytesCodec>,
    sync: request_response::Behaviour<BytesCodec>,
    invite: request_response::Behaviour<BytesCodec>,
    /// Sync requests that never finish arriving.
    trickle: request_response::Behaviour<Trickle>,
}

/// Announces a sync frame of the requested length, sends all of it but its
/// last byte (zeros, never held here) and stalls: the node holds what
/// arrived until the stream times out.
#[derive(Debug, Clone, Default)]
struct Trickle;

impl request_response::Codec for Trickle {
    type Protocol = StreamProtocol;
    type Request = usize;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<usize>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Err(std::io::Error::other("trickle only sends"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        std::future::pending().await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        len: usize,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt;
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let prefix =
            shoal_protocol::frame::header(len, usize::MAX).map_err(std::io::Error::other)?;
        io.write_all(&prefix).await?;
        let mut left = len.saturating_sub(1);
        while left > 0 {
            let n = left.min(ZEROS.len());
            io.write_all(&ZEROS[..n]).await?;
            left -= n;
        }
        io.flush().await?;
        std::future::pending().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Err(std::io::Error::other("trickle only sends"))
    }
}

enum Pumped<'a> {
    Swarm(&'a mut SwarmEvent<HostileBehaviourEvent>),
    Node(Event),
}

/// A peer that speaks shoal's protocols but obeys none of its rules.
struct Hostile {
    swarm: Swarm<HostileBehaviour>,
    grant: Option<SpaceGrant>,
    me: DeviceId,
    /// When set, every sync request the node sends us gets this answer.
    sync_answer: Option<Vec<u8>>,
}

impl Hostile {
    fn new(key: Keypair, grant: Option<SpaceGrant>) -> Result<Self> {
        let me = DeviceId::from_bytes(key.public().to_peer_id().to_bytes())?;
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| {
                let cfg = gossipsub::ConfigBuilder::default()
                    .validation_mode(ValidationMode::Strict)
                    .max_transmit_size(2 * 1024 * 1024)
                    .build()
                    .map_err(|e| e.to_string())?;
                let rr = |p: &'static str| {
                    request_response::Behaviour::with_codec(
                        // far above what shoal accepts, to send oversized frames
                        BytesCodec::new(p, 64 * 1024 * 1024, Default::default()),
                        [(StreamProtocol::new(p), ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(Duration::from_secs(20)),
                    )
                };
                Ok(HostileBehaviour {
                    gossipsub: gossipsub::Behaviour::new(
                        MessageAuthenticity::Signed(key.clone()),
                        cfg,
                    )?,
                    hello: rr(wire::HELLO_PROTOCOL),
                    sync: rr(wire::SYNC_PROTOCOL),
                    invite: rr(wire::INVITE_PROTOCOL),
                    trickle: request_response::Behaviour::with_codec(
                        Trickle,
                        [(
                            StreamProtocol::new(wire::SYNC_PROTOCOL),
                            ProtocolSupport::Outbound,
                        )],
                        request_response::Config::default()
                            .with_request_timeout(Duration::from_secs(120)),
                    ),
                })
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .build();
        Ok(Self {
            swarm,
            grant,
            me,
            sync_answer: None,
        })
    }

    /// Polls the swarm until the node under attack emits an event matching
    /// `pred` (the swarm must run for our messages to leave).
    async fn until_node_event(
        &mut self,
        rx: &mut tokio::sync::broadcast::Receiver<Event>,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let mut found = None;
        self.pump_with(Some(rx), |ev| {
            if let Pumped::Node(e) = ev {
                if pred(e) {
                    found = Some(e.clone());
                    return Some(());
                }
            }
            None
        })
        .await?;
        found.context("no event")
    }

    /// Polls the swarm, answering hello challenges (with proofs if we hold
    /// a grant), until `f` returns a value.
    async fn pump<T>(
        &mut self,
        mut f: impl FnMut(&mut SwarmEvent<HostileBehaviourEvent>) -> Option<T>,
    ) -> Result<T> {
        self.pump_with(None, |ev| match ev {
            Pumped::Swarm(e) => f(e),
            Pumped::Node(_) => None,
        })
        .await
    }

    async fn pump_with<T>(
        &mut self,
        mut rx: Option<&mut tokio::sync::broadcast::Receiver<Event>>,
        mut f: impl FnMut(&mut Pumped) -> Option<T>,
    ) -> Result<T> {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let node_ev = async {
                    match rx.as_mut() {
                        Some(r) => r.recv().await.ok(),
                        None => std::future::pending().await,
                    }
                };
                let mut ev = tokio::select! {
                    ev = self.swarm.select_next_some() => ev,
                    Some(e) = node_ev => {
                        if let Some(v) = f(&mut Pumped::Node(e)) {
                            return Ok(v);
                        }
                        continue;
                    }
                };
                if let SwarmEvent::Behaviour(HostileBehaviourEvent::Hello(
                    request_response::Event::Message {
                        peer,
                        message:
                            request_response::Message::Request {
                                request, channel, ..
                            },
                        ..
                    },
                )) = ev
                {
                    let verifier = DeviceId::from_bytes(peer.to_bytes())?;
                    let HelloRequest::V1 { challenge, .. } =
                        wire::decode("hello", &request, wire::MAX_HELLO_BYTES)?;
                    let proofs = match &self.grant {
                        Some(g) => g
                            .keys
                            .iter()
                            .map(|(e, k)| {
                                hello::proof(&g.space, *e, k, &challenge, &self.me, &verifier)
                            })
                            .collect(),
                        None => Vec::new(),
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .hello
                        .send_response(channel, wire::encode(&HelloResponse::V1 { proofs }).into());
                    continue;
                }
                if let Some(answer) = self.sync_answer.clone() {
                    if let SwarmEvent::Behaviour(HostileBehaviourEvent::Sync(
                        request_response::Event::Message {
                            message: request_response::Message::Request { channel, .. },
                            ..
                        },
                    )) = ev
                    {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, answer.into());
                        continue;
                    }
                }
                if let Some(v) = f(&mut Pumped::Swarm(&mut ev)) {
                    return Ok(v);
                }
            }
        })
        .await
        .context("hostile peer timed out")?
    }

    /// The request-response outcome of `id`, if `ev` is it.
    fn outcome(
        ev: &mut SwarmEvent<HostileBehaviourEvent>,
        id: request_response::OutboundRequestId,
    ) -> Option<std::result::Result<Vec<u8>, String>> {
        let rr = match ev {
            SwarmEvent::Behaviour(HostileBehaviourEvent::Hello(e))
            | SwarmEvent::Behaviour(HostileBehaviourEvent::Sync(e))
            | SwarmEvent::Behaviour(HostileBehaviourEvent::Invite(e)) => e,
            _ => return None,
        };
        match rr {
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } if *request_id == id => Some(Ok(response.to_vec())),
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } if *request_id == id => Some(Err(error.to_string())),
            _ => None,
        }
    }

    /// Sends one request and waits for its answer (or failure).
    async fn request(
        &mut self,
        proto: &str,
        target: libp2p::PeerId,
        bytes: Vec<u8>,
    ) -> Result<std::result::Result<Vec<u8>, String>> {
        let b = self.swarm.behaviour_mut();
        let id = match proto {
            wire::HELLO_PROTOCOL => b.hello.send_request(&target, bytes.into()),
            wire::SYNC_PROTOCOL => b.sync.send_request(&target, bytes.into()),
            _ => b.invite.send_request(&target, bytes.into()),
        };
        self.pump(|ev| Self::outcome(ev, id)).await
    }

    async fn sync_request(
        &mut self,
        target: libp2p::PeerId,
        bytes: Vec<u8>,
    ) -> Result<std::result::Result<SyncResponse, String>> {
        Ok(self
            .request(wire::SYNC_PROTOCOL, target, bytes)
            .await?
            .and_then(|r| {
                wire::decode::<SyncResponse>("sync", &r, wire::MAX_SYNC_BYTES)
                    .map_err(|e| e.to_string())
            }))
    }

    fn publish(&mut self, topic: &str, data: Vec<u8>) -> Result<()> {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(IdentTopic::new(topic), data)
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
        Ok(())
    }
}

async fn rejected(
    h: &mut Hostile,
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    needle: &str,
) -> Result<String> {
    let ev = h
        .until_node_event(
            rx,
            |e| matches!(e, Event::Rejected { reason, .. } if reason.contains(needle)),
        )
        .await
        .with_context(|| format!("no rejection mentioning {needle:?}"))?;
    match ev {
        Event::Rejected { reason, .. } => Ok(reason),
        _ => bail!("unexpected event"),
    }
}

/// The node under attack (`n[0]`) and an honest member (`n[1]`) of
/// "notes", both holding `todo` with `/legit: 1`: what each test checks the
/// node still syncs with afterwards.
async fn two_members() -> Result<(Vec<TestNode>, shoal_node::SpaceInfo, DocId)> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let info = a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    let todo: DocId = "todo".parse()?;
    a.put("notes", &todo, "/legit", json!(1)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    Ok((n, info, todo))
}

/// `key`'s signature of a raw change, as shoal's wire carries it.
fn sign(
    key: &Keypair,
    space: &shoal_protocol::SpaceId,
    doc: &DocId,
    raw: &[u8],
) -> Result<wire::ChangeSig> {
    let hash = automerge::Change::try_from(raw)?.hash().0;
    Ok((
        hash,
        key.sign(&wire::change_sig_message(space, doc, &hash))?,
    ))
}

fn a_change_by(device: &DeviceId) -> Result<Vec<u8>> {
    let mut d = AutoCommit::new().with_actor(actor_for(device, [7; 8]));
    jdoc::put_json(&mut d, "/forged", &json!("by a non-writer"))?;
    d.commit();
    Ok(d.get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_rejected_and_the_node_keeps_serving() -> Result<()> {
    let (n, info, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let before = a.get("notes", &todo).await?;

    // A viewer: a real member who may not write.
    let vkey = Keypair::generate_ed25519();
    let vkey_copy = vkey.clone();
    let viewer = DeviceId::from_bytes(vkey.public().to_peer_id().to_bytes())?;
    a.add_member("notes", &viewer, Role::Viewer, "evil").await?;
    let grant = a.export_grant("notes").await?;
    let (space, key) = (grant.space, grant.keys[0].1.clone());
    let topic = key.topic(&space, 0);
    let mut h = Hostile::new(vkey, Some(grant))?;
    let mut ev = a.events();
    let addr: Multiaddr = a.listen_addrs().await?[0].clone();
    h.swarm.dial(addr)?;
    h.swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(topic.clone()))?;
    let a_peer = a.peer_id();
    h.pump(|e| match e {
        SwarmEvent::Behaviour(HostileBehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            ..
        })) if *peer_id == a_peer => Some(()),
        _ => None,
    })
    .await?;
    h.until_node_event(&mut ev, |e| matches!(e, Event::MemberVerified { .. }))
        .await?;

    // 1. random bytes on the space's topic
    h.publish(&topic, vec![0xFF; 100])?;
    rejected(&mut h, &mut ev, "envelope").await?;
    // 2. a well-formed envelope under the wrong key, and under an unknown epoch
    let by_viewer = a_change_by(&viewer)?;
    let sig_viewer = sign(&vkey_copy, &space, &todo, &by_viewer)?;
    let body = wire::encode(&GossipBody::Changes {
        doc: todo.clone(),
        changes: vec![by_viewer.clone()],
        sigs: vec![sig_viewer.clone()],
    });
    h.publish(
        &topic,
        envelope::seal(&space, 0, &SpaceKey::from_bytes([9; 32]), [1; 24], &body),
    )?;
    rejected(&mut h, &mut ev, "cannot open envelope").await?;
    h.publish(&topic, envelope::seal(&space, 7, &key, [2; 24], &body))?;
    rejected(&mut h, &mut ev, "unknown key epoch").await?;
    // 3. a change from a non-writer, correctly sealed
    h.publish(&topic, envelope::seal(&space, 0, &key, [3; 24], &body))?;
    rejected(&mut h, &mut ev, "viewer").await?;
    // 4. a change that claims another author
    let a_dev = a.device_id().clone();
    let as_owner = a_change_by(&a_dev)?;
    let forged = wire::encode(&GossipBody::Changes {
        doc: todo.clone(),
        changes: vec![as_owner.clone()],
        sigs: vec![sign(&vkey_copy, &space, &todo, &as_owner)?],
    });
    h.publish(&topic, envelope::seal(&space, 0, &key, [4; 24], &forged))?;
    // its publisher may not write: refused before the change is decoded
    rejected(&mut h, &mut ev, "viewer").await?;
    // 5. garbage inside a valid envelope
    h.publish(
        &topic,
        envelope::seal(&space, 0, &key, [5; 24], b"\x00\xff\xff\xff\xff\xff"),
    )?;
    rejected(&mut h, &mut ev, "malformed").await?;

    // 6. sync: random bytes, a truncated sync message, a non-writer's change
    let r = h.sync_request(a_peer, vec![1, 2, 3]).await?;
    assert!(matches!(r, Ok(SyncResponse::Refused { .. })), "{r:?}");
    let msg = Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: ChunkList::from(vec![by_viewer.clone()]),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode();
    let truncated = wire::encode(&SyncRequest::V1 {
        fresh: true,
        space,
        doc: todo.clone(),
        message: Some(msg[..msg.len() / 2].to_vec()),
        sigs: vec![],
    });
    let r = h.sync_request(a_peer, truncated).await?;
    assert!(matches!(r, Ok(SyncResponse::Refused { .. })), "{r:?}");
    rejected(&mut h, &mut ev, "sync message").await?;
    let whole = wire::encode(&SyncRequest::V1 {
        fresh: true,
        space,
        doc: todo.clone(),
        message: Some(msg),
        sigs: vec![sig_viewer.clone()],
    });
    let r = h.sync_request(a_peer, whole).await?;
    assert!(matches!(r, Ok(SyncResponse::Refused { .. })), "{r:?}");
    rejected(&mut h, &mut ev, "viewer").await?;
    // 6b. impersonation by sync: the viewer relays a change under the
    // owner's actor id, unsigned and then signed with its own key
    let imp = Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: ChunkList::from(vec![as_owner.clone()]),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode();
    for (sigs, why) in [
        (vec![], "unsigned"),
        (
            vec![sign(&vkey_copy, &space, &todo, &as_owner)?],
            "not signed by it",
        ),
    ] {
        let req = wire::encode(&SyncRequest::V1 {
            fresh: true,
            space,
            doc: todo.clone(),
            message: Some(imp.clone()),
            sigs,
        });
        let r = h.sync_request(a_peer, req).await?;
        assert!(matches!(r, Ok(SyncResponse::Refused { .. })), "{r:?}");
        rejected(&mut h, &mut ev, why).await?;
    }
    // 7. an oversized request: the codec cuts it off before buffering it
    let huge = vec![0u8; wire::MAX_SYNC_BYTES + 1024];
    let r = h.sync_request(a_peer, huge).await?;
    assert!(r.is_err(), "oversized request was answered: {r:?}");

    // Nothing changed, and the node keeps serving its members.
    assert_eq!(a.get("notes", &todo).await?, before);
    still_syncs(a, b, &todo).await?;
    assert_eq!(b.get("notes", &todo).await?.get("forged"), None);
    let _ = info;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_no_proofs_and_no_documents() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let a = &n[0].node;
    let info = a.create_space("notes").await?;
    let todo: DocId = "todo".parse()?;
    a.put("notes", &todo, "/secret", json!(42)).await?;
    // The stranger even knows the space id (say, from a leaked log line).
    let space: shoal_protocol::SpaceId = info.id.parse()?;
    let mut h = Hostile::new(Keypair::generate_ed25519(), None)?;
    h.swarm.dial(a.listen_addrs().await?[0].clone())?;
    let a_peer = a.peer_id();
    // Our challenge to a: a answers with proofs that name nothing we know.
    let me_challenge = [3u8; 32];
    let req = wire::encode(&HelloRequest::V1 {
        challenge: me_challenge,
        recheck: false,
    });
    let resp = h
        .request(wire::HELLO_PROTOCOL, a_peer, req)
        .await?
        .map_err(anyhow::Error::msg)?;
    let proofs: HelloResponse = wire::decode("hello", &resp, wire::MAX_HELLO_BYTES)?;
    let HelloResponse::V1 { proofs } = proofs;
    assert_eq!(proofs.len(), 1);
    // Without the key, the proof matches no guess of the space.
    let guess = SpaceKey::from_bytes([0; 32]);
    let stranger = DeviceId::from_bytes(a_peer.to_bytes())?;
    assert_ne!(
        proofs[0],
        hello::proof(&space, 0, &guess, &me_challenge, &stranger, &h.me)
    );
    let req = wire::encode(&SyncRequest::V1 {
        fresh: true,
        space,
        doc: todo.clone(),
        message: None,
        sigs: vec![],
    });
    let r = h.sync_request(a_peer, req).await?;
    assert!(
        matches!(
            r,
            Ok(SyncResponse::Refused {
                reason: wire::RefuseReason::NotAllowed
            })
        ),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_invite_secrets_is_rate_limited_and_slows_nothing() -> Result<()> {
    use shoal_protocol::invite::InviteCode;
    use shoal_protocol::wire::{JoinRefusal, JoinRequest, JoinResponse};
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    let todo: DocId = "todo".parse()?;
    let info = a
        .create_invite("notes", Role::Editor, Duration::from_secs(3600), 1)
        .await?;
    let code = InviteCode::decode(info.code.as_deref().unwrap_or(""))?;
    let mut h = Hostile::new(Keypair::generate_ed25519(), None)?;
    h.swarm.dial(a.listen_addrs().await?[0].clone())?;
    let a_peer = a.peer_id();
    // 1,000 guesses at the secret, all in flight at once
    let mut ids = std::collections::HashSet::new();
    for i in 0..1000u32 {
        let req = JoinRequest::V1 {
            invite: code.invite,
            ephemeral: [1; 32],
            x25519: [2; 32],
            name: "guess".into(),
            proof: *blake3::hash(&i.to_be_bytes()).as_bytes(),
        };
        ids.insert(
            h.swarm
                .behaviour_mut()
                .invite
                .send_request(&a_peer, wire::encode(&req).into()),
        );
    }
    let mut wrong = 0;
    let mut limited = 0;
    let mut other = 0;
    let started = std::time::Instant::now();
    while !ids.is_empty() {
        let pending: Vec<_> = ids.iter().copied().collect();
        let r = h
            .pump(|e| {
                pending
                    .iter()
                    .find_map(|id| Hostile::outcome(e, *id).map(|o| (*id, o.ok())))
            })
            .await?;
        ids.remove(&r.0);
        match r
            .1
            .map(|b| wire::decode::<JoinResponse>("join", &b, wire::MAX_INVITE_BYTES))
        {
            Some(Ok(JoinResponse::Refused {
                reason: JoinRefusal::WrongSecret,
            })) => wrong += 1,
            Some(Ok(JoinResponse::Refused {
                reason: JoinRefusal::RateLimited,
            })) => limited += 1,
            _ => other += 1,
        }
    }
    println!(
        "1000 guesses: {wrong} checked, {limited} rate limited, {other} other, {:?}",
        started.elapsed()
    );
    assert!(wrong <= 5, "{wrong} guesses were checked");
    assert!(limited + other >= 995);
    // nothing else slowed down: the node writes, and a real device still joins
    a.put("notes", &todo, "/still", json!("serving")).await?;
    b.join(info.code.as_deref().unwrap_or(""), Duration::from_secs(10))
        .await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    Ok(())
}

#[derive(NetworkBehaviour)]
struct StreamsOnly {
    stream: libp2p_stream::Behaviour,
}

/// Asks for one blob on `s` and reads the answer's header; `None` when the
/// node closed the stream instead.
async fn ask_blob(s: &mut libp2p::Stream) -> Option<shoal_protocol::files::BlobResponse> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use shoal_protocol::files::{BlobKind, BlobRequest};
    let req = wire::encode(&BlobRequest::V1 {
        space: shoal_protocol::SpaceId([9; 32]),
        kind: BlobKind::Chunk,
        hash: [7; 32],
    });
    let mut frame = (req.len() as u16).to_be_bytes().to_vec();
    frame.extend(req);
    s.write_all(&frame).await.ok()?;
    s.flush().await.ok()?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.ok()?;
    let mut head = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut head).await.ok()?;
    wire::decode("blob response", &head, 1024).ok()
}

/// A peer that opens blob stream after blob stream gets four; the rest are
/// closed at once, and a stranger's requests on the four are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gets_at_most_four_blob_streams() -> Result<()> {
    use shoal_protocol::files::{BlobResponse, BLOB_PROTOCOL};
    let n = spawn_nodes(1).await?;
    let node = &n[0].node;
    let addr = node.net_info().await?.listen_addrs[0].clone();
    let key = Keypair::generate_ed25519();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| StreamsOnly {
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .build();
    let mut control = swarm.behaviour().stream.new_control();
    swarm.dial(addr)?;
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let peer: libp2p::PeerId = node.device_id().to_string().parse()?;
    // One at a time, each asked before the next opens (a burst can
    // overflow libp2p-stream's accept queue, which drops streams too).
    // All stay open, holding their slots.
    let mut streams = Vec::new();
    let mut answered = 0;
    for _ in 0..7 {
        let mut s = tokio::time::timeout(
            TIMEOUT,
            control.open_stream(peer, StreamProtocol::new(BLOB_PROTOCOL)),
        )
        .await
        .context("opening a stream timed out")??;
        match tokio::time::timeout(TIMEOUT, ask_blob(&mut s)).await {
            Ok(Some(BlobResponse::Refused)) => answered += 1,
            Ok(Some(other)) => bail!("a stranger got {other:?}"),
            Ok(None) => {}
            Err(_) => bail!("a stream neither answered nor closed"),
        }
        streams.push(s);
    }
    assert_eq!(answered, 4, "streams served");
    driver.abort();
    Ok(())
}

/// A device revoked from a space gets no more chunks, even on the blob
/// streams it opened while it was a member: the serving node's cached
/// admissions are dropped on any change to `members` (they used to be
/// trusted for 10 s). Asked over B's own open streams, as its folder
/// worker asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_gets_no_chunk_on_its_open_streams() -> Result<()> {
    use shoal_node::folder::links::FetchError;
    let (n, roots, _dirs) = folder_nodes(2, "box").await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let data = b"served while B is a member".to_vec();
    std::fs::write(roots[0].join("f.txt"), &data)?;
    wait_file(b, &roots[1].join("f.txt"), &data).await?;
    let hash = *blake3::hash(&data).as_bytes();
    // every one of B's streams to A is open and admitted (they are used
    // in turn): each serves the chunk
    for i in 0..4 {
        match b.fetch_chunk(a.peer_id(), "box", hash).await? {
            Ok(got) => assert_eq!(got, data, "request {i}"),
            Err(e) => bail!("request {i} before the revocation: {e}"),
        }
    }
    a.revoke("box", b.device_id()).await?;
    for i in 0..4 {
        match b.fetch_chunk(a.peer_id(), "box", hash).await? {
            Err(FetchError::Refused) => {}
            Ok(got) => bail!(
                "request {i} after the revocation was served ({} bytes)",
                got.len()
            ),
            Err(e) => bail!("request {i} after the revocation: {e}, not refused"),
        }
    }
    Ok(())
}

/// A hostile peer admitted to `a`'s space "notes" with `role`.
struct Admitted {
    h: Hostile,
    key: Keypair,
    dev: DeviceId,
    space: shoal_protocol::SpaceId,
    /// `a`'s events, subscribed before the peer dialled.
    ev: tokio::sync::broadcast::Receiver<Event>,
    a_peer: libp2p::PeerId,
}

async fn admitted(a: &shoal_node::Node, role: Role, answer: Option<Vec<u8>>) -> Result<Admitted> {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let dev = DeviceId::from_bytes(peer.to_bytes())?;
    a.add_member("notes", &dev, role, "evil").await?;
    let grant = a.export_grant("notes").await?;
    let space = grant.space;
    let mut h = Hostile::new(key.clone(), Some(grant))?;
    h.sync_answer = answer;
    let mut ev = a.events();
    h.swarm.dial(a.listen_addrs().await?[0].clone())?;
    let me = peer;
    h.until_node_event(
        &mut ev,
        |e| matches!(e, Event::MemberVerified { peer, .. } if *peer == me),
    )
    .await?;
    Ok(Admitted {
        h,
        key,
        dev,
        space,
        ev,
        a_peer: a.peer_id(),
    })
}

/// A V1 sync message carrying `changes`.
fn carrying(changes: Vec<Vec<u8>>) -> Vec<u8> {
    Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: ChunkList::from(changes),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode()
}

fn sync_req(
    space: shoal_protocol::SpaceId,
    doc: &DocId,
    message: Vec<u8>,
    sigs: Vec<wire::ChangeSig>,
) -> Vec<u8> {
    wire::encode(&SyncRequest::V1 {
        fresh: true,
        space,
        doc: doc.clone(),
        message: Some(message),
        sigs,
    })
}

fn refused(r: &std::result::Result<SyncResponse, String>, why: wire::RefuseReason) -> bool {
    matches!(r, Ok(SyncResponse::Refused { reason }) if *reason == why)
}

/// Issue 18, hole 1: a `have` bloom filter with one entry and zero bits per
/// entry made automerge divide by zero while answering, killing the engine.
/// Refused on the response path and on the request path alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bloom_filter_that_would_crash_automerge_is_refused() -> Result<()> {
    use automerge::sync::{BloomFilter, Have};
    let (n, _, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let bomb = Message {
        heads: vec![],
        need: vec![],
        have: vec![Have {
            last_sync: vec![],
            bloom: BloomFilter::try_from(&[1u8, 0, 1][..])?,
        }],
        changes: ChunkList::empty(),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode();
    // The response path: a viewer answers the node's sync requests with it.
    let answer = wire::encode(&SyncResponse::V1 {
        message: Some(bomb.clone()),
        sigs: vec![],
    });
    let mut m = admitted(a, Role::Viewer, Some(answer)).await?;
    rejected(&mut m.h, &mut m.ev, "bloom").await?;
    let before_todo = a.get("notes", &todo).await?;
    let before_members = a.get("notes", &DocId::members()).await?;
    // The request path.
    m.h.sync_answer = None;
    let r =
        m.h.sync_request(m.a_peer, sync_req(m.space, &todo, bomb, vec![]))
            .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut m.h, &mut m.ev, "bloom").await?;
    assert_eq!(a.get("notes", &todo).await?, before_todo);
    assert_eq!(a.get("notes", &DocId::members()).await?, before_members);
    // The node still syncs with an honest member.
    still_syncs(a, b, &todo).await?;
    Ok(())
}

/// Issue 18, hole 3: a compressed change chunk of about 65 KiB whose body
/// inflates to 65 MiB is refused before it is inflated past the
/// per-message limit (64 MiB), not after Automerge inflated it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_bomb_is_refused_before_it_inflates() -> Result<()> {
    use std::io::Write;
    let (n, _, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let mut m = admitted(a, Role::Editor, None).await?;
    // magic, checksum, type 2 (compressed change), uLEB128 length, body
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..65 {
        z.write_all(&zeros)?;
    }
    let body = z.finish()?;
    assert!(body.len() < 256 * 1024, "{} bytes", body.len());
    let mut bomb = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let mut len = body.len();
    while len >= 0x80 {
        bomb.push((len & 0x7f) as u8 | 0x80);
        len >>= 7;
    }
    bomb.push(len as u8);
    bomb.extend(body);
    let before = a.get("notes", &todo).await?;
    let r =
        m.h.sync_request(
            m.a_peer,
            sync_req(m.space, &todo, carrying(vec![bomb]), vec![]),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut m.h, &mut m.ev, "too large").await?;
    assert_eq!(a.get("notes", &todo).await?, before);
    still_syncs(a, b, &todo).await?;
    Ok(())
}

/// Issue 18, hole 3 (gossip): once a revocation rotates the key, the node
/// leaves the old epoch's topic, where the removed device can still publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_the_topic_of_a_rotated_epoch() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let a = &n[0].node;
    a.create_space("notes").await?;
    let grant = a.export_grant("notes").await?;
    let old = grant.keys[0].1.topic(&grant.space, 0);
    let mut m = admitted(a, Role::Editor, None).await?;
    // The node announced its topic as the connection opened (seen while
    // `admitted` pumped the swarm).
    let (a_peer, old_hash) = (m.a_peer, IdentTopic::new(old).hash());
    let gone = DeviceId::from_bytes(Keypair::generate_ed25519().public().to_peer_id().to_bytes())?;
    a.add_member("notes", &gone, Role::Editor, "gone").await?;
    let r = a.revoke("notes", &gone).await?;
    assert_eq!(r.epoch, 1);
    m.h.pump(|e| match e {
        SwarmEvent::Behaviour(HostileBehaviourEvent::Gossipsub(
            gossipsub::Event::Unsubscribed { peer_id, topic },
        )) if *peer_id == a_peer && *topic == old_hash => Some(()),
        _ => None,
    })
    .await
    .context("the node stayed on the old epoch's topic")?;
    Ok(())
}

/// A change to `doc` by `key`'s device on top of `base`, with its signature.
fn signed_change(
    key: &Keypair,
    space: &shoal_protocol::SpaceId,
    doc: &DocId,
    base: &mut AutoCommit,
    path: &str,
    value: serde_json::Value,
) -> Result<(Vec<u8>, wire::ChangeSig)> {
    jdoc::put_json(base, path, &value)?;
    base.commit();
    let raw = base
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let sig = sign(key, space, doc, &raw)?;
    Ok((raw, sig))
}

/// Issue 18, hole 4: a demoted editor's (and a revoked editor's) new
/// changes are refused through sync, sent by itself or relayed by another
/// member, while the history the owner had seen before still syncs to a
/// device that joins later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_writers_new_changes_are_refused_by_sync() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, d) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    let todo: DocId = "todo".parse()?;
    let mut e = admitted(a, Role::Editor, None).await?;
    let mut gone = admitted(a, Role::Editor, None).await?;
    let mut relay = admitted(a, Role::Editor, None).await?;
    // Both write while they may.
    let mut e_doc = AutoCommit::new().with_actor(actor_for(&e.dev, [7; 8]));
    let (old, old_sig) = signed_change(&e.key, &e.space, &todo, &mut e_doc, "/e", json!("old"))?;
    let r =
        e.h.sync_request(
            e.a_peer,
            sync_req(e.space, &todo, carrying(vec![old]), vec![old_sig]),
        )
        .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    let mut g_doc = AutoCommit::new().with_actor(actor_for(&gone.dev, [7; 8]));
    let (old, old_sig) = signed_change(
        &gone.key,
        &gone.space,
        &todo,
        &mut g_doc,
        "/g",
        json!("old"),
    )?;
    let r = gone
        .h
        .sync_request(
            gone.a_peer,
            sync_req(gone.space, &todo, carrying(vec![old]), vec![old_sig]),
        )
        .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    let had = a.get("notes", &todo).await?;
    assert_eq!(
        (had["e"].clone(), had["g"].clone()),
        (json!("old"), json!("old"))
    );

    // The owner demotes one and revokes the other.
    a.set_role("notes", &e.dev, Role::Viewer).await?;

    // New changes by the demoted editor: by itself, and relayed.
    let (new, new_sig) = signed_change(&e.key, &e.space, &todo, &mut e_doc, "/e", json!("new"))?;
    let r =
        e.h.sync_request(
            e.a_peer,
            sync_req(
                e.space,
                &todo,
                carrying(vec![new.clone()]),
                vec![new_sig.clone()],
            ),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut e.h, &mut e.ev, "no longer").await?;
    let r = relay
        .h
        .sync_request(
            relay.a_peer,
            sync_req(relay.space, &todo, carrying(vec![new]), vec![new_sig]),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut relay.h, &mut relay.ev, "no longer").await?;
    // By gossip, under the space key it still holds: refused the same way.
    let grant = e.h.grant.clone().context("no grant")?;
    let (epoch, key) = grant.keys[0].clone();
    let (newer, newer_sig) =
        signed_change(&e.key, &e.space, &todo, &mut e_doc, "/e", json!("newer"))?;
    let body = wire::encode(&GossipBody::Changes {
        doc: todo.clone(),
        changes: vec![newer],
        sigs: vec![newer_sig],
    });
    e.h.publish(
        &key.topic(&e.space, epoch),
        envelope::seal(&e.space, epoch, &key, [6; 24], &body),
    )?;
    rejected(&mut e.h, &mut e.ev, "no longer").await?;

    // The revoked one is cut off; relayed, its change is refused too.
    a.revoke("notes", &gone.dev).await?;
    let (new, new_sig) = signed_change(
        &gone.key,
        &gone.space,
        &todo,
        &mut g_doc,
        "/g",
        json!("new"),
    )?;
    let r = gone
        .h
        .sync_request(
            gone.a_peer,
            sync_req(
                gone.space,
                &todo,
                carrying(vec![new.clone()]),
                vec![new_sig.clone()],
            ),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::NotAllowed), "{r:?}");
    let r = relay
        .h
        .sync_request(
            relay.a_peer,
            sync_req(relay.space, &todo, carrying(vec![new]), vec![new_sig]),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut relay.h, &mut relay.ev, "no longer").await?;
    assert_eq!(a.get("notes", &todo).await?, had);

    // A device that joins now gets the old history, and the node syncs on.
    share_space(a, "notes", &[d]).await?;
    connect(d, a).await?;
    wait_converged(&[a, d], "notes", "todo").await?;
    assert_eq!(d.get("notes", &todo).await?, had);
    still_syncs(a, d, &todo).await?;
    Ok(())
}

/// Issue 18, hole 5: an owner removes the space's creator; the creator is
/// no owner any more: its members change re-adding itself is refused and
/// it no longer syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_creator_is_no_owner() -> Result<()> {
    use shoal_protocol::members;
    let n = spawn_nodes(2).await?;
    let (b, c) = (&n[0].node, &n[1].node);
    // The creator is a peer the test drives; b is the owner it added.
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let creator = DeviceId::from_bytes(peer.to_bytes())?;
    let space = shoal_protocol::SpaceId(rand::random());
    let grant = SpaceGrant {
        space,
        name: "notes".into(),
        creator: creator.clone(),
        keys: vec![(0, SpaceKey::from_bytes(rand::random()))],
    };
    let mut doc = AutoCommit::new().with_actor(actor_for(&creator, [1; 8]));
    members::init_members(&mut doc, "notes", &creator, "creator", None)?;
    members::set_member(
        &mut doc,
        b.device_id(),
        Role::Owner,
        "b",
        Some(&creator),
        None,
    )?;
    doc.commit();
    let history: Vec<Vec<u8>> = doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    let tip = sign(
        &key,
        &space,
        &DocId::members(),
        history.last().context("no history")?,
    )?;
    b.import_grant(grant.clone()).await?;
    let mut h = Hostile::new(key.clone(), Some(grant))?;
    let mut ev = b.events();
    h.swarm.dial(b.listen_addrs().await?[0].clone())?;
    let me = peer;
    h.until_node_event(
        &mut ev,
        |e| matches!(e, Event::MemberVerified { peer, .. } if *peer == me),
    )
    .await?;
    let b_peer = b.peer_id();
    let r = h
        .sync_request(
            b_peer,
            sync_req(space, &DocId::members(), carrying(history), vec![tip]),
        )
        .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    let is_owner = |ms: &[shoal_node::MemberInfo], d: &DeviceId| {
        ms.iter()
            .any(|m| m.device == d.to_string() && m.role == Role::Owner)
    };
    assert!(is_owner(&b.members("notes").await?, b.device_id()));

    // b removes the creator.
    b.revoke("notes", &creator).await?;
    let after = b.get("notes", &DocId::members()).await?;
    assert!(!is_owner(&b.members("notes").await?, &creator));
    // b is the last owner now: it cannot remove itself.
    let e = b.revoke("notes", b.device_id()).await.unwrap_err();
    assert!(e.to_string().contains("last owner"), "{e}");

    // The creator makes itself an owner again, on the history it has.
    members::set_member(&mut doc, &creator, Role::Owner, "creator", None, None)?;
    doc.commit();
    let back = doc
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let sig = sign(&key, &space, &DocId::members(), &back)?;
    let r = h
        .sync_request(
            b_peer,
            sync_req(space, &DocId::members(), carrying(vec![back]), vec![sig]),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::NotAllowed), "{r:?}");
    let todo: DocId = "todo".parse()?;
    let (w, wsig) = signed_change(
        &key,
        &space,
        &todo,
        &mut AutoCommit::new().with_actor(actor_for(&creator, [2; 8])),
        "/x",
        json!(1),
    )?;
    let r = h
        .sync_request(
            b_peer,
            sync_req(space, &todo, carrying(vec![w]), vec![wsig]),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::NotAllowed), "{r:?}");
    assert_eq!(b.get("notes", &DocId::members()).await?, after);
    assert!(!is_owner(&b.members("notes").await?, &creator));

    // An honest device joins by invite and syncs with b.
    let inv = b
        .create_invite("notes", Role::Editor, Duration::from_secs(600), 1)
        .await?;
    connect(c, b).await?;
    c.join(inv.code.as_deref().unwrap_or(""), Duration::from_secs(20))
        .await?;
    b.put("notes", &todo, "/after", json!(2)).await?;
    wait_converged(&[b, c], "notes", "todo").await?;
    assert_eq!(c.get("notes", &todo).await?["after"], json!(2));
    Ok(())
}

/// Issue 18, hole 9: a change signature binds the document too. A member's
/// signed change with no dependencies, taken from one document and
/// replayed into another (by anyone), is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_change_replayed_into_another_document_is_refused() -> Result<()> {
    let n = spawn_nodes(1).await?;
    let a = &n[0].node;
    a.create_space("notes").await?;
    let todo: DocId = "todo".parse()?;
    let other: DocId = "other".parse()?;
    let mut e = admitted(a, Role::Editor, None).await?;
    let mut doc = AutoCommit::new().with_actor(actor_for(&e.dev, [3; 8]));
    let (raw, sig) = signed_change(&e.key, &e.space, &todo, &mut doc, "/x", json!(1))?;
    let mut rx = a.events();
    let r =
        e.h.sync_request(
            e.a_peer,
            sync_req(
                e.space,
                &other,
                carrying(vec![raw.clone()]),
                vec![sig.clone()],
            ),
        )
        .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    let why = rejected(&mut e.h, &mut rx, "not signed by it").await?;
    assert!(why.contains("not signed"), "{why}");
    assert!(a.docs("notes").await?.iter().all(|d| d != "other"));
    // The same change where it was signed is taken.
    let r =
        e.h.sync_request(
            e.a_peer,
            sync_req(e.space, &todo, carrying(vec![raw]), vec![sig]),
        )
        .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    assert_eq!(a.get("notes", &todo).await?["x"], json!(1));
    Ok(())
}

/// The node still syncs with an honest member after what a test threw at
/// it: a new change of `a` to `todo` in "notes" reaches `b`.
async fn still_syncs(a: &shoal_node::Node, b: &shoal_node::Node, todo: &DocId) -> Result<()> {
    a.put("notes", todo, "/after", json!(2)).await?;
    wait_converged(&[a, b], "notes", "todo").await?;
    assert_eq!(b.get("notes", todo).await?["after"], json!(2));
    Ok(())
}

/// Issue 18: a member may name any document id in a sync request. The node
/// answers from an empty document and drops it again; it kept a sync state
/// per id asked about, so a member asking about many ids grew the engine
/// for good. Failed before (1,000 responder states after 1,000 ids), passes
/// now: none is kept, and the node still syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_about_many_unknown_documents_keeps_no_state() -> Result<()> {
    let n = spawn_nodes(2).await?;
    let (a, b) = (&n[0].node, &n[1].node);
    a.create_space("notes").await?;
    share_space(a, "notes", &[b]).await?;
    connect(b, a).await?;
    let mut adm = admitted(a, Role::Editor, None).await?;
    let before = a.sync_states().await?;
    let empty = carrying(Vec::new());
    for i in 0..1000 {
        let doc: DocId = format!("nothing-{i}").parse()?;
        let r = adm
            .h
            .sync_request(adm.a_peer, sync_req(adm.space, &doc, empty.clone(), vec![]))
            .await?;
        assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    }
    let after = a.sync_states().await?;
    assert!(
        after.responders <= before.responders + 1,
        "{before:?} -> {after:?}"
    );
    let todo: DocId = "todo".parse()?;
    still_syncs(a, b, &todo).await
}

/// Issue 18, hole 8: a member's heads summary may name any document ids.
/// The node opened a sync session and created an empty document for each
/// id it did not hold, and kept both while the member never answered (512
/// ids per message, without bound). Failed before (2,048 sessions and
/// 2,048 empty documents after four summaries), passes now: sessions for
/// documents this device does not hold are capped per peer and dropped
/// when they fail, and such a document exists only once a change of it
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_summaries_naming_unknown_documents_materialise_nothing() -> Result<()> {
    let (n, _, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let mut adm = admitted(a, Role::Editor, None).await?;
    let grant = a.export_grant("notes").await?;
    let key = grant.keys[0].1.clone();
    let topic = key.topic(&adm.space, 0);
    adm.h
        .swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(topic.clone()))?;
    // The node's subscription may have arrived while we were admitted.
    let hash = IdentTopic::new(topic.clone()).hash();
    let a_peer = adm.a_peer;
    tokio::time::timeout(TIMEOUT, async {
        while !adm
            .h
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .any(|(p, topics)| *p == a_peer && topics.contains(&&hash))
        {
            adm.h.swarm.select_next_some().await;
        }
    })
    .await
    .context("the node never subscribed")?;
    let before = a.sync_states().await?;
    const SUMMARIES: usize = 4;
    for m in 0..SUMMARIES {
        let docs = (0..wire::MAX_HEADS_DOCS)
            .map(|i| Ok((format!("ghost-{m}-{i}").parse()?, vec![[m as u8 + 1; 32]])))
            .collect::<Result<Vec<(DocId, Vec<[u8; 32]>)>>>()?;
        let body = wire::encode(&GossipBody::Heads { docs });
        adm.h.publish(
            &topic,
            envelope::seal(&adm.space, 0, &key, [m as u8 + 40; 24], &body),
        )?;
    }
    // The node asks us about the ghosts; we never answer (the dropped
    // channel fails each request, and requests beyond our 100 open streams
    // fail unread). Until no ghost waits any more and nothing is held for
    // any of them.
    let ghosts = SUMMARIES * wire::MAX_HEADS_DOCS;
    let mut asked = std::collections::HashSet::new();
    let mut most = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let settled = loop {
        tokio::select! {
            ev = adm.h.swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(HostileBehaviourEvent::Sync(
                    request_response::Event::Message {
                        message: request_response::Message::Request { request, .. },
                        ..
                    },
                )) = ev
                {
                    if let Ok(SyncRequest::V1 { doc, .. }) =
                        wire::decode::<SyncRequest>("sync", &request, wire::MAX_SYNC_BYTES)
                    {
                        if doc.as_str().starts_with("ghost-") {
                            asked.insert(doc);
                        }
                    }
                }
            }
            _ = check.tick() => {
                let now = a.sync_states().await?;
                most.sessions = most.sessions.max(now.sessions);
                most.docs = most.docs.max(now.docs);
                if !asked.is_empty()
                    && now.gaps == 0
                    && now.sessions <= before.sessions + 1
                    && now.docs == before.docs
                {
                    break Some(now);
                }
                if tokio::time::Instant::now() > deadline {
                    break None;
                }
            }
        }
    };
    assert!(
        settled.is_some(),
        "asked about {} of {ghosts} ghosts; at most {} sessions and {} documents (before: {before:?})",
        asked.len(),
        most.sessions,
        most.docs
    );
    assert!(
        most.docs == before.docs,
        "empty documents were created: {before:?} -> at most {most:?}"
    );
    assert!(
        most.sessions <= before.sessions + 256 + 1,
        "sessions grew without bound: {before:?} -> at most {most:?}"
    );
    still_syncs(a, b, &todo).await
}

/// Counts `rejected` events whose reason mentions `needle` until there are
/// `n` of them (the hostile swarm runs meanwhile).
async fn rejections(
    h: &mut Hostile,
    rx: &mut tokio::sync::broadcast::Receiver<Event>,
    needle: &str,
    n: usize,
) -> Result<()> {
    let mut seen = 0;
    h.until_node_event(rx, |e| {
        if matches!(e, Event::Rejected { reason, .. } if reason.contains(needle)) {
            seen += 1;
        }
        seen >= n
    })
    .await
    .with_context(|| format!("fewer than {n} rejections mentioning {needle:?}"))?;
    Ok(())
}

/// Issue 18, hole 8: a stranger could send sync frames as large as a
/// member's (32 MiB), 100 streams per connection, all read before its
/// membership was checked; and no peer's frames were bounded in bytes.
/// Failed before (the stranger's 1 MiB request was read and answered),
/// passes now: a stranger's frames are refused unread above 64 KiB; each
/// peer's frames hold at most its budget (256 KiB for a stranger, 96 MiB
/// for a member) while they arrive and wait for the engine, and the next
/// one is refused unread, with a `rejected` event; the node still syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_gets_small_frames_and_every_peer_a_byte_budget() -> Result<()> {
    use shoal_node::net::budget::{MEMBER_BYTES, STRANGER_BYTES, STRANGER_FRAME_BYTES};
    let (n, info, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let space: shoal_protocol::SpaceId = info.id.parse()?;
    let a_peer = a.peer_id();
    let addr = a.listen_addrs().await?[0].clone();

    // 1. A stranger's 1 MiB sync request: refused before it is read.
    let mut s = Hostile::new(Keypair::generate_ed25519(), None)?;
    let mut ev = a.events();
    s.swarm.dial(addr.clone())?;
    let big = sync_req(space, &todo, vec![0; 1 << 20], vec![]);
    let r = s.request(wire::SYNC_PROTOCOL, a_peer, big).await?;
    assert!(r.is_err(), "a stranger's 1 MiB frame was read: {r:?}");
    rejected(&mut s, &mut ev, &format!("(limit {STRANGER_FRAME_BYTES})")).await?;

    // 2. Eight frames the stranger may send, each stalled before its last
    // byte: four fit its budget and are held, four are refused unread.
    let each = STRANGER_FRAME_BYTES - 4096;
    for _ in 0..8 {
        s.swarm.behaviour_mut().trickle.send_request(&a_peer, each);
    }
    rejections(
        &mut s,
        &mut ev,
        "exceed its budget",
        8 - STRANGER_BYTES / each,
    )
    .await?;
    let held = a.frames_held();
    assert!(held.total <= STRANGER_BYTES, "{held:?}");

    // 3. A member doing the same with full-size sync frames: three are
    // held, the other two refused unread.
    let mut adm = admitted(a, Role::Editor, None).await?;
    let each = wire::MAX_SYNC_BYTES - 4096;
    for _ in 0..5 {
        adm.h
            .swarm
            .behaviour_mut()
            .trickle
            .send_request(&a_peer, each);
    }
    rejections(
        &mut adm.h,
        &mut adm.ev,
        "exceed its budget",
        5 - MEMBER_BYTES / each,
    )
    .await?;
    let held = a.frames_held();
    assert!(held.total <= STRANGER_BYTES + MEMBER_BYTES, "{held:?}");
    assert!(
        held.total >= 3 * each,
        "the member's frames are held: {held:?}"
    );

    // 4. Meanwhile the node serves its honest member.
    still_syncs(a, b, &todo).await
}

/// Issue 18, bad bytes from disk: automerge 0.12 panics parsing some
/// bundle chunks (`fuzz/crashers/roster-automerge-bundle-unwrap`), and the
/// engine handed stored saves to it unchecked, so one corrupt save made
/// the node panic as it started. Failed before (the start panicked),
/// passes now: a stored change that is no change is skipped with a
/// warning, the document keeps the rest; a stored snapshot that is no
/// document stops the start with an error naming the space and document,
/// and nothing on disk is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_save_on_disk_is_an_error_not_a_panic() -> Result<()> {
    let bundle: &[u8] = include_bytes!("../../../fuzz/crashers/roster-automerge-bundle-unwrap");
    let mut t = TestNode::spawn("disk").await?;
    let info = t.node.create_space("notes").await?;
    let space: shoal_protocol::SpaceId = info.id.parse()?;
    let todo: DocId = "todo".parse()?;
    t.node.put("notes", &todo, "/kept", json!(1)).await?;
    t.stop().await;

    // 1. A corrupt incremental save: skipped, the rest of the document loads.
    {
        let store = shoal_node::store::Store::open(&t.home.db_path())?;
        let next = store.load_doc(&space, &todo)?.next_seq;
        store.append_doc(&space, &todo, next, bundle)?;
    }
    t.start().await?;
    assert_eq!(t.node.get("notes", &todo).await?["kept"], json!(1));
    t.stop().await;

    // 2. A corrupt snapshot: the start fails with an error, not a panic.
    let store = shoal_node::store::Store::open(&t.home.db_path())?;
    store.compact_doc(&space, &todo, bundle)?;
    drop(store);
    let err = match t.start().await {
        Ok(()) => bail!("a node started on a corrupt snapshot"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("todo") && err.contains("chunk type 3"),
        "unclear error: {err}"
    );
    // Nothing was rewritten: the snapshot is still the bytes we put there.
    let store = shoal_node::store::Store::open(&t.home.db_path())?;
    assert_eq!(
        store.load_doc(&space, &todo)?.snapshot.as_deref(),
        Some(bundle)
    );
    Ok(())
}

/// This process's resident memory, in bytes (Linux).
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

/// Issue 18, hole 8, the figures of the README's hostile-peer section:
/// sixteen strangers send 100 stalled frames each (just under their 64 KiB
/// frame limit) and a member sends 20 stalled full-size sync frames, all at
/// once. Each peer gets its budget's worth held (four frames a stranger,
/// three the member), every other frame is refused unread, the bytes held
/// stay within the budgets, and the node still syncs with its honest
/// member meanwhile. Prints the figures (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stalled_frames_stays_within_the_budgets() -> Result<()> {
    use shoal_node::net::budget::{MEMBER_BYTES, STRANGER_BYTES, STRANGER_FRAME_BYTES};
    const STRANGERS: usize = 16;
    const PER_STRANGER: usize = 100;
    const PER_MEMBER: usize = 20;
    let (n, _, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let a_peer = a.peer_id();
    let addr = a.listen_addrs().await?[0].clone();
    let adm = admitted(a, Role::Editor, None).await?;
    let rss_before = rss_bytes()?;
    let before = a.frames_held();

    let mut pumps = Vec::new();
    let stranger_frame = STRANGER_FRAME_BYTES - 4096;
    for _ in 0..STRANGERS {
        let mut s = Hostile::new(Keypair::generate_ed25519(), None)?;
        s.swarm.dial(addr.clone())?;
        for _ in 0..PER_STRANGER {
            s.swarm
                .behaviour_mut()
                .trickle
                .send_request(&a_peer, stranger_frame);
        }
        pumps.push(tokio::spawn(async move {
            loop {
                s.swarm.select_next_some().await;
            }
        }));
    }
    let member_frame = wire::MAX_SYNC_BYTES - 4096;
    let mut m = adm.h;
    for _ in 0..PER_MEMBER {
        m.swarm
            .behaviour_mut()
            .trickle
            .send_request(&a_peer, member_frame);
    }
    pumps.push(tokio::spawn(async move {
        loop {
            m.swarm.select_next_some().await;
        }
    }));

    let held_each = STRANGER_BYTES / stranger_frame;
    let expected = (STRANGERS * (PER_STRANGER - held_each)
        + (PER_MEMBER - MEMBER_BYTES / member_frame)) as u64;
    let mut peak_rss = rss_before;
    let mut peak_held = 0;
    // Looked at on each of the node's events (its rejections, its
    // summaries) until every frame over a budget was refused.
    let mut held = a.frames_held();
    wait_for(a, TIMEOUT, || {
        held = a.frames_held();
        if let Ok(r) = rss_bytes() {
            peak_rss = peak_rss.max(r);
        }
        peak_held = peak_held.max(held.total);
        let done = held.refused - before.refused >= expected && held.total >= 3 * member_frame;
        async move { done }
    })
    .await
    .with_context(|| format!("the flood was not refused: {:?}", a.frames_held()))?;
    // While every budget is full, an honest change still gets through.
    let start = std::time::Instant::now();
    still_syncs(a, b, &todo).await?;
    let honest = start.elapsed();
    peak_rss = peak_rss.max(rss_bytes()?);
    for p in pumps {
        p.abort();
    }

    let tried = STRANGERS * PER_STRANGER + PER_MEMBER;
    let bound = STRANGERS * STRANGER_BYTES + MEMBER_BYTES;
    println!(
        "flood: {tried} stalled frames from {STRANGERS} strangers and 1 member; \
         {} refused unread; held at most {:.1} MiB (budgets allow {:.1} MiB); \
         process RSS +{:.1} MiB; an honest change reached the other member in {} ms",
        held.refused - before.refused,
        peak_held as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        peak_rss.saturating_sub(rss_before) as f64 / 1048576.0,
        honest.as_millis()
    );
    assert!(peak_held <= bound, "held {peak_held} > {bound}");
    assert_eq!(held.refused - before.refused, expected);
    Ok(())
}

/// Offers `changes` with `sigs` to the node by sync, as a member (its
/// swarm, the node's peer id, the space).
async fn offer(
    m: (&mut Hostile, libp2p::PeerId, shoal_protocol::SpaceId),
    doc: &DocId,
    changes: Vec<Vec<u8>>,
    sigs: Vec<wire::ChangeSig>,
) -> Result<std::result::Result<SyncResponse, String>> {
    let (h, peer, space) = m;
    h.sync_request(peer, sync_req(space, doc, carrying(changes), sigs))
        .await
}

/// An app's change (under an actor id of its own, see
/// `shoal_protocol::actor`) is taken only with the vouch of a device that
/// may write, and an app actor belongs to the first device that vouched for
/// it: no other member can write under it, vouch with a signature that is
/// not its own, or pass an app change off without a vouch; and no member
/// can vouch its way into another device's own actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_actor_belongs_to_the_device_that_vouched_for_it() -> Result<()> {
    let (n, _, todo) = two_members().await?;
    let (a, b) = (&n[0].node, &n[1].node);
    let mut e = admitted(a, Role::Editor, None).await?;
    let mut f = admitted(a, Role::Editor, None).await?;
    let mut v = admitted(a, Role::Viewer, None).await?;
    let space = e.space;
    let vouched = |k: &Keypair, dev: &DeviceId, raw: &[u8]| -> Result<wire::ChangeSig> {
        let (h, sig) = sign(k, &space, &todo, raw)?;
        Ok((h, wire::vouch(dev, &sig)))
    };
    let mut base = AutoCommit::load(&a.doc_bytes("notes", &todo).await?)?;
    // E's app writes under its own actor; E vouches: taken.
    let mut app = base.fork().with_actor(automerge::ActorId::from([0xA5; 16]));
    jdoc::put_json(&mut app, "/app", &json!("by e's app"))?;
    app.commit();
    let first = app
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let r = offer(
        (&mut e.h, e.a_peer, e.space),
        &todo,
        vec![first.clone()],
        vec![vouched(&e.key, &e.dev, &first)?],
    )
    .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    assert_eq!(a.get("notes", &todo).await?["app"], json!("by e's app"));

    // F continues under E's app actor with its own vouch: refused.
    jdoc::put_json(&mut app, "/app", &json!("forged by f"))?;
    app.commit();
    let second = app
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        vec![second.clone()],
        vec![vouched(&f.key, &f.dev, &second)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "belongs to").await?;
    // F claims E vouched, with its own signature: refused.
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        vec![second.clone()],
        vec![vouched(&f.key, &e.dev, &second)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "no valid vouch").await?;
    // An app change with a bare signature, no vouch: refused.
    let mut other = base.fork().with_actor(automerge::ActorId::from([0x5A; 16]));
    jdoc::put_json(&mut other, "/bare", &json!(1))?;
    other.commit();
    let bare = other
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        vec![bare.clone()],
        vec![sign(&f.key, &f.space, &todo, &bare)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "no valid vouch").await?;
    // A viewer vouching for its app: refused by its role.
    let r = offer(
        (&mut v.h, v.a_peer, v.space),
        &todo,
        vec![bare.clone()],
        vec![vouched(&v.key, &v.dev, &bare)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut v.h, &mut v.ev, "may not change").await?;
    // F vouching for a change under E's own device actor: refused.
    let mut as_e = base.fork().with_actor(actor_for(&e.dev, [9; 8]));
    jdoc::put_json(&mut as_e, "/as_e", &json!(1))?;
    as_e.commit();
    let as_e = as_e
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        vec![as_e.clone()],
        vec![vouched(&f.key, &f.dev, &as_e)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "not signed by it").await?;

    // Two vouchers for one new app actor in one message: refused.
    let mut twin = base.fork().with_actor(automerge::ActorId::from([0x77; 16]));
    let mut twins = Vec::new();
    for i in 0..2 {
        jdoc::put_json(&mut twin, "/twin", &json!(i))?;
        twin.commit();
        twins.push(
            twin.get_last_local_change()
                .context("no change")?
                .raw_bytes()
                .to_vec(),
        );
    }
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        twins.clone(),
        vec![
            vouched(&f.key, &f.dev, &twins[0])?,
            vouched(&e.key, &e.dev, &twins[1])?,
        ],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "in one message").await?;
    // A later change of an app actor this device has never seen, without
    // its first change: nobody can be told its owner from it. Refused.
    let mut later = base.fork().with_actor(automerge::ActorId::from([0x99; 16]));
    jdoc::put_json(&mut later, "/unseen", &json!(1))?;
    later.commit();
    jdoc::put_json(&mut later, "/unseen", &json!(2))?;
    later.commit();
    let second_only = later
        .get_last_local_change()
        .context("no change")?
        .raw_bytes()
        .to_vec();
    let r = offer(
        (&mut f.h, f.a_peer, f.space),
        &todo,
        vec![second_only.clone()],
        vec![vouched(&f.key, &f.dev, &second_only)?],
    )
    .await?;
    assert!(refused(&r, wire::RefuseReason::BadMessage), "{r:?}");
    rejected(&mut f.h, &mut f.ev, "first change is not here").await?;

    // E itself continues its app's chain: taken. Nothing refused landed.
    let r = offer(
        (&mut e.h, e.a_peer, e.space),
        &todo,
        vec![second.clone()],
        vec![vouched(&e.key, &e.dev, &second)?],
    )
    .await?;
    assert!(matches!(r, Ok(SyncResponse::V1 { .. })), "{r:?}");
    let d = a.get("notes", &todo).await?;
    assert_eq!(d["app"], json!("forged by f"), "E's own second change: {d}");
    for refused_key in ["bare", "as_e", "twin", "unseen"] {
        ensure!(d.get(refused_key).is_none(), "{refused_key} landed: {d}");
    }
    // The honest member gets E's app changes, vouched, by sync from A.
    still_syncs(a, b, &todo).await?;
    assert_eq!(b.get("notes", &todo).await?["app"], json!("forged by f"));
    Ok(())
}
