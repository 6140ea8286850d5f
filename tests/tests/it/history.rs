//! History, trash, snapshots and restore through real nodes (issue 20):
//! every version and every deletion can be found and brought back by a
//! member that may write, from wherever its content still is.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use shoal_node::folder::history::{RestoreRequest, VersionInfo};
use shoal_node::folder::versions::Content;
use shoal_node::Node;
use shoal_protocol::Role;
use shoal_tests::*;

const SPACE: &str = "hist";

/// Waits until `node`'s history of `path` has `n` versions or more.
async fn wait_versions(node: &Node, path: &str, n: usize) -> Result<Vec<VersionInfo>> {
    let ok = wait_for(node, TIMEOUT, || async {
        node.history(SPACE, path).await.is_ok_and(|h| h.len() >= n)
    })
    .await;
    let last = node.history(SPACE, path).await;
    ok.with_context(|| format!("{path}: wanted {n} versions, history has {last:#?}"))?;
    Ok(last?)
}

/// The version of a history whose content is `content` (a one-chunk file).
fn version_of<'a>(h: &'a [VersionInfo], content: &[u8]) -> Option<&'a VersionInfo> {
    let hash = blake3::hash(content).to_hex().to_string();
    h.iter()
        .find(|v| !v.deleted && v.hash.as_deref() == Some(hash.as_str()))
}

fn write(root: &Path, rel: &str, content: &[u8]) -> Result<()> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, content)?;
    Ok(())
}

/// A modified file and a deleted file, restored on the device that did
/// not change them; every device converges on the restored content, and
/// the version it replaced is itself kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modified_and_a_deleted_file_are_restored_on_another_device() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, SPACE).await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    write(&roots[0], "notes.txt", b"the original")?;
    write(&roots[0], "gone.txt", b"deleted by mistake")?;
    wait_file(b, &roots[1].join("notes.txt"), b"the original").await?;
    wait_file(b, &roots[1].join("gone.txt"), b"deleted by mistake").await?;
    write(&roots[0], "notes.txt", b"overwritten by A")?;
    std::fs::remove_file(roots[0].join("gone.txt"))?;
    wait_file(b, &roots[1].join("notes.txt"), b"overwritten by A").await?;
    wait_gone(b, &roots[1].join("gone.txt")).await?;

    // B lists both versions; the original is in B's kept versions.
    let h = wait_versions(b, "notes.txt", 2).await?;
    let original = version_of(&h, b"the original").context("no original")?;
    ensure!(original.content == Content::Kept, "original: {original:?}");
    ensure!(h
        .last()
        .is_some_and(|v| v.current && v.content == Content::Here));
    ensure!(original.device == a.device_id().to_string());
    let n = original.version;

    let r = b
        .restore(
            SPACE,
            RestoreRequest {
                path: "notes.txt".into(),
                version: Some(n),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored == vec!["notes.txt".to_string()], "{r:?}");
    wait_file(a, &roots[0].join("notes.txt"), b"the original").await?;
    wait_file(b, &roots[1].join("notes.txt"), b"the original").await?;
    // The restore is a third version, by B; A kept what it replaced.
    let h = wait_versions(a, "notes.txt", 3).await?;
    ensure!(
        h.last()
            .is_some_and(|v| v.device == b.device_id().to_string()),
        "{h:#?}"
    );
    let replaced = version_of(&h, b"overwritten by A").context("no A version")?;
    ensure!(
        replaced.content == Content::Kept,
        "A keeps its replaced version: {h:#?}"
    );

    // The deleted file is in B's trash, and comes back everywhere.
    let trash = b.trash(SPACE).await?;
    ensure!(
        trash
            .iter()
            .any(|t| t.path == "gone.txt" && t.content == Content::Kept),
        "{trash:#?}"
    );
    let r = b
        .restore(
            SPACE,
            RestoreRequest {
                path: "gone.txt".into(),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored == vec!["gone.txt".to_string()], "{r:?}");
    wait_file(a, &roots[0].join("gone.txt"), b"deleted by mistake").await?;
    ensure!(!b.trash(SPACE).await?.iter().any(|t| t.path == "gone.txt"));
    Ok(())
}

/// A version only a peer still has is fetched from it, verified, and
/// restored; `history` says where it is first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_only_a_peer_still_has_is_restored_from_it() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, SPACE).await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    // Big enough for several chunks.
    let original: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write(&roots[0], "big.bin", &original)?;
    wait_file(b, &roots[1].join("big.bin"), &original).await?;
    // A edits in place: A keeps nothing of the original; B keeps it.
    write(&roots[0], "big.bin", b"small now")?;
    wait_file(b, &roots[1].join("big.bin"), b"small now").await?;
    let h = wait_versions(a, "big.bin", 2).await?;
    let first = h
        .iter()
        .find(|v| v.size == original.len() as u64)
        .context("no original")?;
    ensure!(first.content == Content::Peer, "{h:#?}");
    let r = a
        .restore(
            SPACE,
            RestoreRequest {
                path: "big.bin".into(),
                version: Some(first.version),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored == vec!["big.bin".to_string()], "{r:?}");
    ensure!(std::fs::read(roots[0].join("big.bin"))? == original);
    wait_file(b, &roots[1].join("big.bin"), &original).await?;

    // With the peer gone, a version nobody here has is reported, not faked.
    write(&roots[0], "other.txt", b"one")?;
    wait_file(b, &roots[1].join("other.txt"), b"one").await?;
    write(&roots[0], "other.txt", b"two")?;
    wait_file(b, &roots[1].join("other.txt"), b"two").await?;
    nodes[1].stop().await;
    wait_for(a, TIMEOUT, || async {
        a.net_info().await.is_ok_and(|n| n.peers.is_empty())
    })
    .await
    .context("A still sees B")?;
    let h = a.history(SPACE, "other.txt").await?;
    let one = version_of(&h, b"one").context("no first version")?;
    ensure!(one.content == Content::Unknown, "{h:#?}");
    let r = a
        .restore(
            SPACE,
            RestoreRequest {
                path: "other.txt".into(),
                version: Some(one.version),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored.is_empty() && r.failed.len() == 1, "{r:?}");
    ensure!(std::fs::read(roots[0].join("other.txt"))? == b"two");
    Ok(())
}

/// After a mass delete of a folder, the subtree is restored as it was at a
/// time before it, and files created since are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_is_restored_as_it_was_after_a_mass_delete() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, SPACE).await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    for i in 0..30 {
        write(
            &roots[0],
            &format!("work/f{i:02}.txt"),
            format!("file {i}").as_bytes(),
        )?;
    }
    write(&roots[0], "work/sub/deep.txt", b"deep")?;
    write(&roots[0], "elsewhere.txt", b"untouched")?;
    wait_file(b, &roots[1].join("work/sub/deep.txt"), b"deep").await?;
    wait_file(b, &roots[1].join("work/f29.txt"), b"file 29").await?;
    wait_in_sync(b).await?;
    // "Before": the time of the last change that wrote the subtree (the
    // deletion comes later: A scans it after its debounce).
    let mut last = 0;
    for p in (0..30)
        .map(|i| format!("work/f{i:02}.txt"))
        .chain(["work/sub/deep.txt".to_string()])
    {
        let h = b.history(SPACE, &p).await?;
        last = last.max(h.iter().map(|v| v.time_ms).max().unwrap_or(0));
    }
    let before = format!("@{}.{:03}", last / 1000, last % 1000);
    b.snapshot(SPACE, "before the delete").await?;
    std::fs::remove_dir_all(roots[0].join("work"))?;
    wait_gone(b, &roots[1].join("work/f00.txt")).await?;
    wait_gone(b, &roots[1].join("work/sub/deep.txt")).await?;
    write(&roots[0], "work/new.txt", b"made after")?;
    wait_file(b, &roots[1].join("work/new.txt"), b"made after").await?;

    let r = b
        .restore(
            SPACE,
            RestoreRequest {
                path: "work".into(),
                at: Some(before),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored.len() == 31, "{r:#?}");
    ensure!(r.left == vec!["work/new.txt".to_string()], "{r:#?}");
    ensure!(r.failed.is_empty(), "{r:#?}");
    for i in 0..30 {
        wait_file(
            a,
            &roots[0].join(format!("work/f{i:02}.txt")),
            format!("file {i}").as_bytes(),
        )
        .await?;
    }
    wait_file(a, &roots[0].join("work/sub/deep.txt"), b"deep").await?;
    ensure!(std::fs::read(roots[0].join("work/new.txt"))? == b"made after");
    ensure!(std::fs::read(roots[0].join("elsewhere.txt"))? == b"untouched");

    // The snapshot names the same state: everything is already so.
    let snaps = b.snapshots(SPACE).await?;
    ensure!(snaps.len() == 1 && snaps[0].name == "before the delete");
    let r = b
        .restore(
            SPACE,
            RestoreRequest {
                path: "work".into(),
                snapshot: Some("before the delete".into()),
                remove_later: true,
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored.is_empty() && r.unchanged == 31, "{r:#?}");
    ensure!(r.removed == vec!["work/new.txt".to_string()], "{r:#?}");
    wait_gone(a, &roots[0].join("work/new.txt")).await?;
    Ok(())
}

/// A writer who publishes twenty versions of every file cannot flush the
/// originals out of another device's kept versions, even with a byte
/// budget that holds only a few versions per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churning_writer_leaves_every_original_restorable() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes_with(2, SPACE, |i, c| {
        if i == 1 {
            // Room for the originals and a few more, not for the churn.
            c.folders.retention.max_bytes = Some(5 * 3 * 1024);
        }
    })
    .await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    let body = |f: usize, v: usize| {
        let mut c = format!("file {f} version {v} ").into_bytes();
        c.resize(1024, b'.');
        c
    };
    for f in 0..5 {
        write(&roots[0], &format!("f{f}.txt"), &body(f, 0))?;
    }
    for f in 0..5 {
        wait_file(b, &roots[1].join(format!("f{f}.txt")), &body(f, 0)).await?;
    }
    for v in 1..=20 {
        for f in 0..5 {
            write(&roots[0], &format!("f{f}.txt"), &body(f, v))?;
        }
        for f in 0..5 {
            wait_file(b, &roots[1].join(format!("f{f}.txt")), &body(f, v)).await?;
        }
    }
    // Retention runs when B is over its budget; wait for it to be under.
    let kept_bytes = |root: &Path| -> u64 {
        std::fs::read_dir(root.join(".shoal/versions"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    wait_for(b, TIMEOUT, || async {
        kept_bytes(&roots[1]) <= 5 * 3 * 1024
    })
    .await
    .with_context(|| format!("B keeps {} bytes", kept_bytes(&roots[1])))?;
    for f in 0..5 {
        let path = format!("f{f}.txt");
        let h = b.history(SPACE, &path).await?;
        ensure!(h.len() >= 21, "{path}: {h:#?}");
        let original = version_of(&h, &body(f, 0)).context("no original")?;
        ensure!(
            original.content == Content::Kept,
            "{path}'s original: {original:?}"
        );
        let r = b
            .restore(
                SPACE,
                RestoreRequest {
                    path: path.clone(),
                    version: Some(original.version),
                    ..Default::default()
                },
            )
            .await?;
        ensure!(r.restored == vec![path.clone()], "{r:?}");
        wait_file(a, &roots[0].join(&path), &body(f, 0)).await?;
    }
    Ok(())
}

/// A 250-byte name is kept and restored; a file named like an old version
/// of another is an ordinary file; a viewer may list history but not
/// restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_version_like_names_and_viewers() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes(2, SPACE).await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    let long = format!("{}.txt", "n".repeat(246));
    ensure!(long.len() == 250);
    write(&roots[0], &long, b"long one")?;
    write(&roots[0], "X", b"x itself")?;
    write(&roots[0], "X~20990101-000000", b"not a version of X")?;
    wait_file(b, &roots[1].join(&long), b"long one").await?;
    wait_file(
        b,
        &roots[1].join("X~20990101-000000"),
        b"not a version of X",
    )
    .await?;
    write(&roots[0], &long, b"long two")?;
    for v in 0..3 {
        write(&roots[0], "X", format!("x {v}").as_bytes())?;
        wait_file(b, &roots[1].join("X"), format!("x {v}").as_bytes()).await?;
    }
    wait_file(b, &roots[1].join(&long), b"long two").await?;
    ensure!(std::fs::read(roots[1].join("X~20990101-000000"))? == b"not a version of X");
    ensure!(b.history(SPACE, "X~20990101-000000").await?.len() == 1);
    let h = b.history(SPACE, &long).await?;
    let one = version_of(&h, b"long one").context("no first version")?;
    let r = b
        .restore(
            SPACE,
            RestoreRequest {
                path: long.clone(),
                version: Some(one.version),
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.restored == vec![long.clone()], "{r:?}");
    wait_file(a, &roots[0].join(&long), b"long one").await?;

    a.set_role(SPACE, b.device_id(), Role::Viewer).await?;
    wait_for(b, TIMEOUT, || async {
        b.spaces().await.is_ok_and(|s| {
            s.iter()
                .any(|s| s.name == SPACE && s.role == Some(Role::Viewer))
        })
    })
    .await?;
    ensure!(b.history(SPACE, "X").await?.len() >= 4);
    let err = b
        .restore(
            SPACE,
            RestoreRequest {
                path: "X".into(),
                version: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect_err("a viewer's restore is refused");
    ensure!(format!("{err}").contains("viewer"), "{err}");
    ensure!(std::fs::read(roots[1].join("X"))? == b"x 2");
    Ok(())
}

/// The mass-delete guard: a device that deletes and overwrites most of the
/// folder at once (ransomware, a mistaken `rm -rf`) does not empty the
/// others. The receiving device holds that device's deletions and
/// overwrites past the limit, says so in its status and with an event,
/// loses nothing, and applies them once the user accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mass_delete_guard_holds_a_devices_deletions_until_accepted() -> Result<()> {
    let (nodes, roots, _dirs) = folder_nodes_with(2, SPACE, |_, c| {
        c.folders.guard.min_files = 10;
    })
    .await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    let body = |i: usize| format!("precious {i}").into_bytes();
    for i in 0..40 {
        write(&roots[0], &format!("docs/p{i:02}.txt"), &body(i))?;
    }
    for i in 0..40 {
        wait_file(b, &roots[1].join(format!("docs/p{i:02}.txt")), &body(i)).await?;
    }
    wait_in_sync(b).await?;
    // Limit: max(10, half of B's files), 21 at first (less as deletions
    // are applied). A deletes 25 files and "encrypts" 10 more.
    let mut events = b.events();
    for i in 0..25 {
        std::fs::remove_file(roots[0].join(format!("docs/p{i:02}.txt")))?;
    }
    for i in 25..35 {
        write(&roots[0], &format!("docs/p{i:02}.txt"), b"ENCRYPTED")?;
    }
    let ev = wait_event(&mut events, TIMEOUT, |e| {
        matches!(e, shoal_node::Event::ChangesHeld { .. })
    })
    .await?;
    let shoal_node::Event::ChangesHeld { device, .. } = ev else {
        unreachable!()
    };
    ensure!(&device == a.device_id());
    // A's changes keep arriving, one or a few at a time, as A's scanner
    // sees them. At most the limit is applied (21 at first, less as
    // deletions are applied); wait until B holds the rest.
    let held_at_least = 35 - 21;
    wait_for(b, TIMEOUT, || async {
        b.folder_status()
            .await
            .iter()
            .any(|s| s.state == shoal_node::folder::FolderState::Paused && s.held >= held_at_least)
    })
    .await
    .with_context(|| format!("B never held {held_at_least} changes"))?;
    let st = b.folder_status().await;
    let held = st[0].held;
    ensure!(
        st[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("folder accept")),
        "{st:?}"
    );
    // Nothing is lost: each original is on B's disk or among its kept
    // versions.
    let mut intact = 0;
    for i in 0..35 {
        let path = format!("docs/p{i:02}.txt");
        if std::fs::read(roots[1].join(&path)).is_ok_and(|c| c == body(i)) {
            intact += 1;
            continue;
        }
        let h = b.history(SPACE, &path).await?;
        let v = version_of(&h, &body(i)).context("no original")?;
        ensure!(v.content == Content::Kept, "{path}: {v:?}");
    }
    ensure!(intact as u64 >= held, "{intact} intact, {held} held");

    ensure!(b.accept_held(SPACE).await? as u64 >= held);
    for i in 0..25 {
        wait_gone(b, &roots[1].join(format!("docs/p{i:02}.txt"))).await?;
    }
    for i in 25..35 {
        wait_file(b, &roots[1].join(format!("docs/p{i:02}.txt")), b"ENCRYPTED").await?;
    }
    wait_in_sync(b).await?;
    ensure!(b.folder_status().await[0].held == 0);
    // Untouched files stay.
    ensure!(std::fs::read(roots[1].join("docs/p39.txt"))? == body(39));
    Ok(())
}
