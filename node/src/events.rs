//! What the node tells its watchers (`/v1/events`, `shoal watch`, the
//! SSE stream) and the words they share with the API: the event type and
//! the small enums it names. Below every actor (engine, folders, network,
//! supervisor) so each can emit events without importing another.

use libp2p::PeerId;
use serde::Serialize;
use shoal_protocol::{DeviceId, DocId, SpaceId};

/// Serialises an id by its `Display` form (a space as hex, a device or
/// peer in base58, a document by its name): events keep ids typed until
/// they are rendered.
fn shown<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// How a document change reached this node.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Written through this node's API.
    Local,
    /// Arrived as gossip.
    Gossip,
    /// Arrived through the sync protocol.
    Sync,
    /// Written by an app on this device, through the automerge-repo
    /// endpoint.
    App,
}

impl Origin {
    /// As in events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::App => "app",
            Origin::Gossip => "gossip",
            Origin::Sync => "sync",
        }
    }
}

/// What the node tells its watchers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A peer connected.
    PeerConnected {
        /// Its device id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        peer: PeerId,
    },
    /// A peer's last connection closed.
    PeerDisconnected {
        /// Its device id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        peer: PeerId,
    },
    /// A peer proved membership of a space we are in.
    MemberVerified {
        /// Its device id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        peer: PeerId,
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
    },
    /// A document changed.
    DocChanged {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The document.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        doc: DocId,
        /// How the change arrived.
        origin: Origin,
        /// Heads after the change, hex.
        heads: Vec<String>,
        /// Devices that wrote the change(s).
        authors: Vec<String>,
    },
    /// Input from the network was refused.
    Rejected {
        /// The peer that sent or forwarded it.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        peer: PeerId,
        /// Why, for humans.
        reason: String,
    },
    /// Changes an app on this device wrote were refused (this device may
    /// not write there, or they are not the app's to write): they stay in
    /// that app's copy and reach no other device.
    AppRefused {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The document.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        doc: DocId,
        /// Why, for humans.
        reason: String,
    },
    /// An app on another device sent an ephemeral message about a
    /// document (presence, a cursor): passed to this device's apps, never
    /// stored.
    Ephemeral {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The document.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        doc: DocId,
        /// The device whose app sent it.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        from: DeviceId,
        /// The message, as the app sent it (automerge-repo's CBOR).
        #[serde(skip)]
        data: Vec<u8>,
    },
    /// A file in a synced folder changed: found by the scanner (local) or
    /// placed from a peer's version (remote).
    FileChanged {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// Normalised path in the folder.
        path: String,
        /// `local` or `remote`.
        origin: FileOrigin,
        /// The device that wrote this version.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        device: DeviceId,
        /// Size in bytes.
        size: u64,
        /// The path was deleted.
        deleted: bool,
    },
    /// Two versions of a file conflicted; the loser was kept as `copy`.
    Conflict {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The path both versions were written to.
        path: String,
        /// Where the losing version now is.
        copy: String,
        /// The device that wrote the losing version.
        device: String,
    },
    /// A version of a file was restored on this device (and published as
    /// its new version).
    Restored {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// Where it was placed.
        path: String,
        /// The restored content's hash (hex).
        hash: String,
        /// Its size.
        size: u64,
        /// A file created after the restored time was removed.
        deleted: bool,
    },
    /// Remote deletions and overwrites from one device were held back: they
    /// would change more of the folder at once than the guard allows.
    ChangesHeld {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The device whose changes are held.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        device: DeviceId,
        /// Paths held so far.
        paths: u64,
    },
    /// A file transfer started.
    TransferStarted {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The file.
        path: String,
        /// Its size.
        bytes: u64,
    },
    /// A file transfer finished and the file was placed.
    TransferFinished {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The file.
        path: String,
        /// Its size.
        bytes: u64,
        /// How long it took.
        millis: u64,
    },
    /// A folder's sync progress: every half second while it is not in
    /// sync, and once when it gets there.
    SyncProgress {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// What the folder is doing.
        state: FolderState,
        /// Percent of files in place.
        progress: f64,
        /// Files waiting.
        files_left: u64,
        /// Bytes still to fetch or copy for transfers under way.
        bytes_left: u64,
        /// Bytes per second over the last 10 s.
        rate: u64,
        /// Seconds to go at that rate.
        eta_secs: Option<u64>,
    },
    /// A task of the node panicked: the node has failed and must be
    /// restarted (`shoal up` exits). See `crate::supervise`.
    NodeFailed {
        /// The task: `engine`, `network`, `blob-server`,
        /// `folder-worker <space>` or `api`.
        actor: String,
        /// The panic message.
        error: String,
    },
    /// Something in a folder could not be synced (and is retried).
    FolderError {
        /// The space id.
        #[serde(serialize_with = "shown")]
        #[schema(value_type = String)]
        space: SpaceId,
        /// The path, when one is concerned.
        path: String,
        /// What went wrong.
        error: String,
    },
}

/// Where a file change came from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileOrigin {
    /// This device's folder.
    Local,
    /// A peer's version, placed here.
    Remote,
}

/// What a folder is doing (shown as `scanning`, `syncing`, `in sync`,
/// `paused` or `waiting for peers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
pub enum FolderState {
    /// Reading the folder (at start, or a full rescan).
    #[default]
    #[serde(rename = "scanning")]
    Scanning,
    /// Files wait to be fetched or placed.
    #[serde(rename = "syncing")]
    Syncing,
    /// Files wait, and no member that could serve them is connected.
    #[serde(rename = "waiting for peers")]
    WaitingForPeers,
    /// Nothing waits.
    #[serde(rename = "in sync")]
    InSync,
    /// Stopped until something changes: the disk is full, or the
    /// mass-delete guard holds changes (`detail` says which).
    #[serde(rename = "paused")]
    Paused,
}

impl FolderState {
    /// The word the API and CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            FolderState::Scanning => "scanning",
            FolderState::Syncing => "syncing",
            FolderState::WaitingForPeers => "waiting for peers",
            FolderState::InSync => "in sync",
            FolderState::Paused => "paused",
        }
    }
}

impl std::fmt::Display for FolderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
