//! shoal runs Automerge's parsers under `catch_unwind` (`sync::guarded`):
//! a panic there is refused like malformed input, and the node goes on.
//! libfuzzer-sys's panic hook aborts on every panic, caught or not. This
//! puts Rust's default hook back, so a caught panic is what it is in the
//! node (a refusal), while one that is not caught still crashes the
//! target: libfuzzer-sys aborts when a panic reaches it.
pub fn allow_caught_panics() {
    drop(std::panic::take_hook());
}
