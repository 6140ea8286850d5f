//! Inputs the targets skip because of known bugs that are reported but not
//! fixed yet (see `fuzz/crashers/README.md`). Drop each check with its fix:
//! the inputs in `fuzz/crashers/` then become regression inputs.

/// Whether `data` may hold an Automerge bundle chunk (magic, checksum,
/// chunk type 3) anywhere.
///
/// KNOWN: automerge 0.12 panics parsing some hostile bundle chunks (an
/// unwrap in hexane's column decoder, from `BundleStorage`), and shoal
/// hands peer bytes to that parser: `sync::changes_in` calls
/// `Change::try_from` on every chunk that is not a document, and the
/// gossip path does the same for gossiped changes; `AutoCommit::load` of
/// a stored snapshot too. The fix is to refuse chunk types other than
/// document and change before Automerge parses them.
pub fn has_bundle(data: &[u8]) -> bool {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const CHUNK_BUNDLE: u8 = 3;
    data.windows(9)
        .any(|w| w[..4] == MAGIC && w[8] == CHUNK_BUNDLE)
}
