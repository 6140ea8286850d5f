//! The one public error type of the node crate.

use std::path::PathBuf;

/// Everything the node runtime can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A protocol rule or decoder refused something.
    #[error(transparent)]
    Protocol(#[from] shoal_protocol::Error),
    /// The sled store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record did not decode (disk corruption or a newer format).
    #[error("store record {key}: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Decoder text.
        reason: String,
    },
    /// File-system access in the home folder failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The home folder is in use by another node.
    #[error("another shoal node is already running on {0} (its lock is held); stop it first or use another --home")]
    Locked(PathBuf),
    /// The home folder has not been initialised.
    #[error("{0} is not a shoal home (no identity.key); run `shoal init` or `shoal up`")]
    NoHome(PathBuf),
    /// config.toml is invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The API token is unusable: empty or too short to guard the API.
    #[error("API token: {0}")]
    ApiToken(String),
    /// Network setup failed.
    #[error("network: {0}")]
    Network(String),
    /// A space name or id that this node does not know.
    #[error("unknown space {0:?}")]
    UnknownSpace(String),
    /// A document this space does not have.
    #[error("unknown document {doc:?} in space {space:?}")]
    UnknownDoc {
        /// The space as named by the caller.
        space: String,
        /// The document.
        doc: String,
    },
    /// A space with this name already exists here.
    #[error("a space named {0:?} already exists")]
    SpaceExists(String),
    /// The local device may not do this.
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// This device holds the space's key but has not received its
    /// `members` document yet, so it cannot know its own role: writes
    /// wait until a peer has synced it.
    #[error("not allowed yet: this device does not know the space's members yet; wait for a peer to sync")]
    MembersUnknown,
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The node is shutting down.
    #[error("the node has stopped")]
    Stopped,
}

/// Result with the node [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
