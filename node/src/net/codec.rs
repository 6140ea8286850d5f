//! A length-prefixed bytes codec for shoal's request-response protocols.
//!
//! Each message is a big-endian u32 length and that many bytes. The limit is
//! checked before anything is allocated, so a peer that announces a huge
//! message is cut off without costing memory. Requests are also held to the
//! sending peer's byte budget ([`super::budget`]): a peer that has not
//! proved membership sends small frames only, and no peer holds more than
//! its share while its frames wait for the engine.

use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use shoal_protocol::frame;

use super::budget::{Budget, Frame};
use crate::metrics::Traffic;

/// Raw request and response bytes, bounded by `limit`, counted into
/// `traffic` under `protocol`. With a budget, requests are also bounded by
/// what their peer may hold (see [`PeerAware`], which tells each
/// connection's codec its peer).
#[derive(Debug)]
pub struct BytesCodec {
    limit: usize,
    protocol: &'static str,
    traffic: Traffic,
    budget: Option<Budget>,
    /// The connection's peer, once known.
    peer: Option<PeerId>,
    /// Where [`PeerAware`] leaves the peer of the connection being set up,
    /// for the codec cloned into that connection's handler to take.
    next_peer: Arc<Mutex<Option<PeerId>>>,
}

impl Clone for BytesCodec {
    fn clone(&self) -> Self {
        let peer = self.peer.or_else(|| {
            self.next_peer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        });
        Self {
            limit: self.limit,
            protocol: self.protocol,
            traffic: self.traffic.clone(),
            budget: self.budget.clone(),
            peer,
            next_peer: Arc::clone(&self.next_peer),
        }
    }
}

impl BytesCodec {
    /// A codec for `protocol` refusing messages above `limit` bytes, from
    /// any peer.
    pub fn new(protocol: &'static str, limit: usize, traffic: Traffic) -> Self {
        Self {
            limit,
            protocol,
            traffic,
            budget: None,
            peer: None,
            next_peer: Arc::default(),
        }
    }

    /// The same, with requests also held to their peer's `budget`.
    pub fn budgeted(
        protocol: &'static str,
        limit: usize,
        traffic: Traffic,
        budget: Budget,
    ) -> Self {
        Self {
            budget: Some(budget),
            ..Self::new(protocol, limit, traffic)
        }
    }

    /// Reads one frame of this connection's peer (`what`: request or
    /// response): refused unread, and reported, above the peer's frame
    /// limit or beyond its byte budget; held to the budget until dropped.
    async fn read_budgeted<T: AsyncRead + Unpin + Send>(
        &self,
        io: &mut T,
        what: &str,
    ) -> io::Result<Frame> {
        let limit = self.frame_limit();
        let mut io = self.traffic.meter(self.protocol, io);
        let (Some(budget), Some(peer)) = (&self.budget, self.peer) else {
            if self.budget.is_some() {
                return Err(io::Error::other("a frame from an unknown peer"));
            }
            return Ok(Frame::from(read_frame(&mut io, limit).await?));
        };
        let refuse = |e: String| {
            let reason = format!("{} {what} refused unread: {e}", self.protocol);
            budget.refused(peer, reason.clone());
            io::Error::new(io::ErrorKind::InvalidData, reason)
        };
        let len = match read_len(&mut io, limit).await {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(refuse(e.to_string())),
            Err(e) => return Err(e),
        };
        let permit = budget.reserve(peer, len).map_err(refuse)?;
        let bytes = read_body(&mut io, len).await?;
        Ok(Frame::reserved(bytes, permit))
    }

    /// The largest frame this connection's peer may send.
    fn frame_limit(&self) -> usize {
        match &self.budget {
            Some(b) => b.frame_limit(self.peer, self.limit),
            None => self.limit,
        }
    }
}

/// Reads a frame's length; refuses one above `limit` (InvalidData) before
/// allocating.
async fn read_len<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<usize> {
    let mut prefix = [0u8; frame::HEADER_LEN];
    io.read_exact(&mut prefix).await?;
    frame::body_len(prefix, limit).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let len = read_len(io, limit).await?;
    read_body(io, len).await
}

async fn read_body<T: AsyncRead + Unpin + Send>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    limit: usize,
) -> io::Result<()> {
    let prefix = frame::header(bytes.len(), limit)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&prefix).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Frame;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_budgeted(io, "request").await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Answers come only to what this node asked, but a hostile member
        // could answer every request at full size: held to its budget too.
        self.read_budgeted(io, "response").await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(&mut self.traffic.meter(self.protocol, io), &req, self.limit).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Frame,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(&mut self.traffic.meter(self.protocol, io), &res, self.limit).await
    }
}

/// A request-response behaviour over [`BytesCodec`] that tells each
/// connection's codec which peer it talks to (libp2p's codec is never told:
/// it is cloned into each connection's handler, which this wrapper does
/// right after leaving the peer where the clone takes it).
pub struct PeerAware {
    inner: request_response::Behaviour<BytesCodec>,
    next_peer: Arc<Mutex<Option<PeerId>>>,
}

impl PeerAware {
    /// `codec` for `protocol`, both ways, under `config`.
    pub fn new(
        codec: BytesCodec,
        protocol: StreamProtocol,
        config: request_response::Config,
    ) -> Self {
        let next_peer = Arc::clone(&codec.next_peer);
        Self {
            inner: request_response::Behaviour::with_codec(
                codec,
                [(protocol, ProtocolSupport::Full)],
                config,
            ),
            next_peer,
        }
    }

    fn for_peer<R>(&mut self, peer: PeerId, f: impl FnOnce(&mut Self) -> R) -> R {
        *self.next_peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer);
        let r = f(self);
        // Taken by the clone; cleared in case the inner behaviour refused.
        *self.next_peer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        r
    }
}

impl std::ops::Deref for PeerAware {
    type Target = request_response::Behaviour<BytesCodec>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for PeerAware {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl NetworkBehaviour for PeerAware {
    type ConnectionHandler =
        <request_response::Behaviour<BytesCodec> as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = <request_response::Behaviour<BytesCodec> as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.for_peer(peer, |s| {
            s.inner
                .handle_established_inbound_connection(id, peer, local, remote)
        })
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addrs: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addrs, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.for_peer(peer, |s| {
            s.inner
                .handle_established_outbound_connection(id, peer, addr, role, port_use)
        })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
