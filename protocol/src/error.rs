//! The one public error type of the protocol crate.

/// Everything that can go wrong in pure protocol logic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A typed id (space, device, document) did not parse.
    #[error("invalid {kind}: {reason}")]
    InvalidId {
        /// which id: "space id", "device id", "document id"
        kind: &'static str,
        /// why it was refused
        reason: String,
    },
    /// Bytes from the network or disk did not decode as the expected message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// the message that failed to decode
        what: &'static str,
        /// decoder error text
        reason: String,
    },
    /// A message is larger than its bound.
    #[error("{what} too large: {size} bytes (limit {limit})")]
    TooLarge {
        /// the message kind
        what: &'static str,
        /// its size
        size: usize,
        /// the bound it exceeded
        limit: usize,
    },
    /// Decryption failed: wrong key, unknown epoch or tampered ciphertext.
    #[error("cannot open envelope: {0}")]
    Seal(&'static str),
    /// A JSON pointer did not address a place in the document.
    #[error("bad path {path:?}: {reason}")]
    BadPath {
        /// the JSON pointer as given
        path: String,
        /// what is wrong with it
        reason: String,
    },
    /// A change was refused by the membership and role rules.
    #[error("change refused: {0}")]
    Unauthorized(String),
    /// Automerge refused an operation or failed to load bytes.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// Result with the protocol [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
