//! The folder model's decoders: index entries read from a peer's index
//! documents, manifests fetched from a peer (checked against the hash they
//! were asked by; the input's own hash too, so the decoder runs), and path
//! normalisation of names from the index or the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_protocol::files::{self, Entry, Manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Entry::decode(data) {
        assert_eq!(Entry::decode(&e.encode()).ok(), Some(e.clone()));
        let _ = files::winner(&[e.clone(), e]);
    }

    // A manifest is only decoded when its bytes hash to the name asked
    // for: with a wrong name it is refused, with its own name it is parsed.
    let _ = Manifest::decode(data, &[0; 32]);
    let name = *blake3::hash(data).as_bytes();
    if let Ok(m) = Manifest::decode(data, &name) {
        let total: u64 = m.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
        assert_eq!(total, m.size);
        assert_eq!(m.offsets().len(), m.chunks.len());
    }

    let text = String::from_utf8_lossy(data);
    if let Ok(p) = files::normalize_path(&text) {
        assert!(!p.is_empty() && !p.starts_with('/'));
        assert_eq!(files::normalize_path(&p).ok().as_deref(), Some(p.as_str()));
        let _ = files::shard_of(&p);
    }
});
