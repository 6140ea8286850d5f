//! The frames of shoal's request-response protocols (hello, sync, invite):
//! a big-endian u32 length, then that many bytes. The length is checked
//! against the reader's limit before anything is allocated, so a peer that
//! announces a huge frame costs nothing. The node's codec
//! (`node/src/net/codec.rs`) reads and writes the bytes around these
//! functions; the `frame` fuzz target feeds them arbitrary streams.

use crate::error::{Error, Result};

/// Bytes of a frame's length prefix.
pub const HEADER_LEN: usize = 4;

/// The length prefix of a frame of `len` bytes, or an error if the frame
/// exceeds `limit` (or what a u32 can say).
pub fn header(len: usize, limit: usize) -> Result<[u8; HEADER_LEN]> {
    match u32::try_from(len) {
        Ok(n) if len <= limit => Ok(n.to_be_bytes()),
        _ => Err(Error::TooLarge {
            what: "frame",
            size: len,
            limit,
        }),
    }
}

/// The body length a prefix announces, or an error if it exceeds `limit`.
pub fn body_len(header: [u8; HEADER_LEN], limit: usize) -> Result<usize> {
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len > limit {
        return Err(Error::TooLarge {
            what: "frame",
            size: len,
            limit,
        });
    }
    Ok(len)
}

/// Splits the first whole frame off `buf`: its body and the rest, `None`
/// while the frame is incomplete, an error if its prefix exceeds `limit`.
pub fn split(buf: &[u8], limit: usize) -> Result<Option<(&[u8], &[u8])>> {
    let Some((prefix, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = body_len(*prefix, limit)?;
    Ok((rest.len() >= len).then(|| rest.split_at(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused_from_the_prefix() {
        let mut stream = Vec::new();
        for body in [&b""[..], b"hello", &[7u8; 300]] {
            stream.extend(header(body.len(), 1024).unwrap());
            stream.extend(body);
        }
        let mut rest = &stream[..];
        let mut bodies = Vec::new();
        while let Some((body, more)) = split(rest, 1024).unwrap() {
            bodies.push(body.len());
            rest = more;
        }
        assert_eq!(bodies, [0, 5, 300]);
        assert!(rest.is_empty());
        // incomplete: wait for more
        assert_eq!(split(&stream[4..10], 1024).unwrap(), None);
        // a prefix over the limit is refused before any body arrived
        let big = header(1 << 20, usize::MAX).unwrap();
        assert!(matches!(
            split(&big, 64 * 1024),
            Err(Error::TooLarge { size, .. }) if size == 1 << 20
        ));
        assert!(header(2048, 1024).is_err());
        assert!(body_len([0xff; 4], usize::MAX).is_ok());
    }
}
