//! The frames of the request-response protocols, as the node's codec reads
//! them off a stream (`node/src/net/codec.rs` reads the prefix, checks it
//! with `frame::body_len`, then reads the body): the first two input bytes
//! pick the reader's limit, the rest is the stream. Every frame read must
//! be within the limit and its prefix must be what `frame::header` writes;
//! a refused prefix must announce more than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::frame;

fuzz_target!(|data: &[u8]| {
    let Some((limit, mut rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limit = usize::from(u16::from_be_bytes(*limit)) * 16;
    loop {
        match frame::split(rest, limit) {
            Ok(Some((body, more))) => {
                assert!(body.len() <= limit, "a frame over the limit was read");
                let prefix = frame::header(body.len(), limit).expect("a frame read is writable");
                assert_eq!(rest[..frame::HEADER_LEN], prefix);
                assert!(more.len() < rest.len(), "no progress");
                rest = more;
            }
            Ok(None) => break,
            Err(_) => {
                let mut prefix = [0; frame::HEADER_LEN];
                prefix.copy_from_slice(&rest[..frame::HEADER_LEN]);
                assert!(u32::from_be_bytes(prefix) as usize > limit);
                break;
            }
        }
    }
});
