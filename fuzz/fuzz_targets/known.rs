//! Inputs the targets skip because of known bugs that are reported but not
//! fixed yet (see `fuzz/crashers/README.md`). Drop each check with its fix:
//! the inputs in `fuzz/crashers/` then become regression inputs.

/// Whether `data` may hold an Automerge bundle chunk (magic, checksum,
/// chunk type 3) anywhere.
///
/// KNOWN: automerge 0.12 panics parsing some hostile bundle chunks (an
/// unwrap in hexane's column decoder, from `BundleStorage`). Peers can no
/// longer reach it: `sync::changes_in` and the gossip path refuse chunk
/// types other than document and change before Automerge parses them (the
/// `sync_decode` and `wire_decode` crashers replay clean). Still open:
/// `AutoCommit::load` of a stored snapshot (the node's own disk), which
/// the `roster` target loads whole.
pub fn has_bundle(data: &[u8]) -> bool {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const CHUNK_BUNDLE: u8 = 3;
    data.windows(9)
        .any(|w| w[..4] == MAGIC && w[8] == CHUNK_BUNDLE)
}
