//! Typed identifiers: spaces, devices and documents.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A space: 32 random bytes, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SpaceId(pub [u8; 32]);

impl SpaceId {
    /// Wraps 32 bytes that the caller drew from a CSPRNG.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The first 8 hex characters, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpaceId({})", self.short())
    }
}

impl FromStr for SpaceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bytes = hex::decode(s).map_err(|e| Error::InvalidId {
            kind: "space id",
            reason: e.to_string(),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| Error::InvalidId {
            kind: "space id",
            reason: "expected 64 hex characters".into(),
        })?;
        Ok(Self(arr))
    }
}

/// A device: the bytes of its libp2p `PeerId` (a multihash of its ed25519
/// public key). Shown in base58, exactly as libp2p shows the `PeerId`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(Vec<u8>);

/// Upper bound on the byte length of a device id (ed25519 peer ids are 38).
pub const MAX_DEVICE_ID_LEN: usize = 64;

impl DeviceId {
    /// Wraps peer-id bytes; refuses empty or oversized input.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() || bytes.len() > MAX_DEVICE_ID_LEN {
            return Err(Error::InvalidId {
                kind: "device id",
                reason: format!("length {} out of range", bytes.len()),
            });
        }
        Ok(Self(bytes))
    }

    /// The raw peer-id bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The last 8 characters of the base58 form, for logs and file names.
    pub fn short(&self) -> String {
        let s = self.to_string();
        s[s.len().saturating_sub(8)..].to_string()
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(&self.0).into_string())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

impl FromStr for DeviceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bytes = bs58::decode(s).into_vec().map_err(|e| Error::InvalidId {
            kind: "device id",
            reason: e.to_string(),
        })?;
        Self::from_bytes(bytes)
    }
}

/// A document inside a space: 1 to 64 characters of `[A-Za-z0-9._-]`, not
/// starting with a dot. `members` is reserved for the membership document.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

/// Upper bound on a document id's length.
pub const MAX_DOC_ID_LEN: usize = 64;

impl DocId {
    /// The id of every space's membership document.
    pub fn members() -> Self {
        Self("members".into())
    }

    /// Whether this is the membership document.
    pub fn is_members(&self) -> bool {
        self.0 == "members"
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DocId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidId {
            kind: "document id",
            reason: format!("{s:?}: {reason}"),
        };
        if s.is_empty() || s.len() > MAX_DOC_ID_LEN {
            return Err(bad("must be 1 to 64 characters"));
        }
        if s.starts_with('.') {
            return Err(bad("must not start with a dot"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
        }
        Ok(Self(s))
    }
}

impl From<DocId> for String {
    fn from(d: DocId) -> String {
        d.0
    }
}

impl FromStr for DocId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::try_from(s.to_string())
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_id_round_trips_through_hex() {
        let id = SpaceId([7; 32]);
        assert_eq!(id.to_string().parse::<SpaceId>().unwrap(), id);
        assert!("abc".parse::<SpaceId>().is_err());
        assert!("zz".repeat(32).parse::<SpaceId>().is_err());
    }

    #[test]
    fn doc_ids_are_checked() {
        assert!("todo".parse::<DocId>().is_ok());
        assert!("a.b_c-9".parse::<DocId>().is_ok());
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65), "é"] {
            assert!(bad.parse::<DocId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn device_id_round_trips_through_base58() {
        let id = DeviceId::from_bytes(vec![0, 36, 8, 1, 18, 32, 9, 9]).unwrap();
        assert_eq!(id.to_string().parse::<DeviceId>().unwrap(), id);
        assert!("0OIl".parse::<DeviceId>().is_err());
        assert!(DeviceId::from_bytes(vec![]).is_err());
    }
}
