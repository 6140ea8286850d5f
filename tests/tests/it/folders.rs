//! Folder sync between real nodes on loopback: real folders in temp dirs,
//! the real watcher, store and blob streams.

use std::fs;

use anyhow::Result;
use shoal_tests::{folder_nodes, wait_file, wait_gone};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_modify_append_truncate_delete_rename() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, "f").await?;
    let (a, b) = (&roots[0], &roots[1]);
    let bn = &nodes[1].node;

    fs::write(a.join("hello.txt"), b"hello")?;
    wait_file(bn, &b.join("hello.txt"), b"hello").await?;

    fs::write(a.join("hello.txt"), b"hello, world")?;
    wait_file(bn, &b.join("hello.txt"), b"hello, world").await?;

    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(a.join("hello.txt"))?
        .write_all(b"!")?;
    wait_file(bn, &b.join("hello.txt"), b"hello, world!").await?;

    fs::OpenOptions::new()
        .write(true)
        .open(a.join("hello.txt"))?
        .set_len(2)?;
    wait_file(bn, &b.join("hello.txt"), b"he").await?;

    fs::create_dir_all(a.join("sub/deeper"))?;
    fs::write(a.join("sub/deeper/x.bin"), vec![7u8; 1000])?;
    wait_file(bn, &b.join("sub/deeper/x.bin"), &[7u8; 1000]).await?;

    fs::rename(a.join("sub/deeper/x.bin"), a.join("moved.bin"))?;
    wait_file(bn, &b.join("moved.bin"), &[7u8; 1000]).await?;
    wait_gone(bn, &b.join("sub/deeper/x.bin")).await?;

    fs::remove_file(a.join("hello.txt"))?;
    wait_gone(bn, &b.join("hello.txt")).await?;
    // the deleted version is kept under .shoal/versions on B
    let kept = fs::read_dir(b.join(".shoal/versions"))?.count();
    assert!(kept > 0, "no old version kept");

    // and the other way
    fs::write(b.join("from-b.txt"), b"b")?;
    wait_file(&nodes[0].node, &a.join("from-b.txt"), b"b").await?;
    Ok(())
}
