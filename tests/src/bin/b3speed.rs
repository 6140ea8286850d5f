//! BLAKE3 hashing speed of a file, single-threaded and on all cores: the
//! ceiling the folder benchmark compares transfers against.
//!
//! usage: shoal-b3speed FILE

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: shoal-b3speed FILE"))?;
    let len = std::fs::metadata(&path)?.len() as f64;
    // Warm the page cache first, as a freshly written file is.
    blake3::Hasher::new().update_mmap(&path)?;
    let t = Instant::now();
    blake3::Hasher::new().update_mmap(&path)?;
    let one = len / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    blake3::Hasher::new().update_mmap_rayon(&path)?;
    let all = len / t.elapsed().as_secs_f64() / 1e6;
    println!("{{\"one_core_mb_s\": {one:.0}, \"all_cores_mb_s\": {all:.0}}}");
    Ok(())
}
