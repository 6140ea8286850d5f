//! shoal's pure protocol layer: typed ids, space keys and sealed envelopes,
//! wire messages, the JSON view of Automerge documents, roles and the rules
//! that decide which changes a peer accepts.
//!
//! Nothing here does I/O or reads a clock: time and randomness are passed in,
//! so every rule is unit-, property- and fuzz-testable. The runtime (`node/`)
//! turns these decisions into network and disk operations.

pub mod actor;
pub mod doc;
pub mod envelope;
pub mod error;
pub mod files;
pub mod frame;
pub mod hello;
pub mod ids;
pub mod invite;
pub mod keys;
pub mod members;
pub mod plan;
pub mod retain;
pub mod sync;
pub mod wire;

pub use error::{Error, Result};
pub use ids::{DeviceId, DocId, SpaceId};
pub use keys::{Epoch, SpaceKey};
pub use members::Role;
