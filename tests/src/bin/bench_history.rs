//! History and restore benchmark (issue 20), on real in-process nodes.
//!
//! Two nodes share a folder of `--files` small files (100,000 by default,
//! in folders of 1,000). Then, `--runs` times: A deletes everything (as a
//! mistaken `rm -rf`; the mass-delete guard is off here, or it would hold
//! the deletions), B applies and keeps every file as an old version, and B
//! restores the whole folder as it was just before. Measured on B:
//!
//! - `history` of one path (median of 20 calls) and `trash` (every deleted
//!   file, with where its content is);
//! - the point-in-time restore: seconds from the call to its report, and
//!   until A has every file back; the process's peak RSS growth over it
//!   (both nodes run in this process).
//!
//! Prints a table: each run's figures, then the medians. Run it through
//! `scripts/bench/history.sh` (its own network namespace when root).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_node::folder::history::RestoreRequest;
use shoal_node::folder::FolderState;
use shoal_node::{Event, Node};
use shoal_tests::{flag_value, folder_nodes_with, median};
use tokio::sync::broadcast::error::RecvError;

const SPACE: &str = "bench";

fn content(i: usize) -> Vec<u8> {
    format!("file {i} {}\n", "x".repeat(64)).into_bytes()
}

fn rel(i: usize) -> String {
    format!("d{:03}/f{i:06}.txt", i / 1000)
}

/// Peak and current RSS of this process, in KiB (Linux).
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the peak RSS (`VmHWM`) to the current RSS.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Waits until `node`'s folder is in sync and counts `n` entries. Looks
/// at the status (which counts the folder's records, O(files)) only on the
/// node's sync-progress events, not on every file event: on every event,
/// the waiting itself grew quadratic with the folder and was most of a
/// 100,000-file run's time.
async fn wait_files(node: &Node, n: u64, limit: Duration) -> Result<()> {
    let mut events = node.events();
    let done = || async {
        node.folder_status()
            .await
            .iter()
            .any(|s| s.state == FolderState::InSync && s.files_left == 0 && s.files == n)
    };
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => bail!("never {n} files: {:?}", node.folder_status().await),
                Ok(Ok(Event::SyncProgress { .. })) => break,
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
                Ok(Err(RecvError::Closed)) => bail!("the node stopped"),
            }
        }
    }
    Ok(())
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let Ok(dirs) = std::fs::read_dir(root) else {
        return 0;
    };
    for d in dirs.flatten() {
        if d.file_name() == ".shoal" {
            continue;
        }
        n += std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0);
    }
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let files = flag_value(&args, "--files", 100_000);
    let runs = flag_value(&args, "--runs", 3);
    let dirs_n = files.div_ceil(1000) as u64;
    let (nodes, roots, _tmp) = folder_nodes_with(2, SPACE, |_, c| {
        c.folders.guard.min_files = 0;
    })
    .await?;
    let (a, b) = (&nodes[0].node, &nodes[1].node);
    eprintln!("writing {files} files into A's folder");
    for i in 0..files {
        let p = roots[0].join(rel(i));
        if i % 1000 == 0 {
            std::fs::create_dir_all(p.parent().context("parent")?)?;
        }
        std::fs::write(&p, content(i))?;
    }
    let t = Instant::now();
    wait_files(b, files as u64 + dirs_n, Duration::from_secs(1800)).await?;
    eprintln!("first sync: {:.1} s", t.elapsed().as_secs_f64());

    println!(
        "| run | history of one path, ms | trash ({files} entries), s | restore --at (whole folder), s | until A has all back, s | peak RSS growth over the restore (both nodes), MiB |"
    );
    println!("|---|---|---|---|---|---|");
    let (mut hist, mut trash, mut rest, mut back, mut mem) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        // B is in sync: every change that wrote the files was made by now,
        // and the deletion's comes after A's scan of it.
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        for d in 0..dirs_n {
            std::fs::remove_dir_all(roots[0].join(format!("d{d:03}")))?;
        }
        wait_files(b, 0, Duration::from_secs(1800)).await?;

        let probe = rel(files / 2);
        let mut calls = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let h = b.history(SPACE, &probe).await?;
            calls.push(t.elapsed().as_secs_f64() * 1000.0);
            if h.len() < 2 {
                bail!("history of {probe} has {} versions", h.len());
            }
        }
        let h_ms = median(calls);
        let t = Instant::now();
        let listed = b.trash(SPACE).await?;
        let trash_s = t.elapsed().as_secs_f64();
        if listed.len() != files {
            bail!("trash lists {} of {files}", listed.len());
        }

        reset_peak();
        let (_, rss0) = rss_kib();
        let t = Instant::now();
        let report = b
            .restore(
                SPACE,
                RestoreRequest {
                    at: Some(format!("@{}.{:03}", before / 1000, before % 1000)),
                    ..Default::default()
                },
            )
            .await?;
        let restore_s = t.elapsed().as_secs_f64();
        let (peak, _) = rss_kib();
        if report.restored.len() != files || !report.failed.is_empty() {
            bail!(
                "restored {} of {files}, {} failed: {:?}",
                report.restored.len(),
                report.failed.len(),
                report.failed.first()
            );
        }
        wait_files(a, files as u64 + dirs_n, Duration::from_secs(1800)).await?;
        let back_s = t.elapsed().as_secs_f64();
        if count_files(&roots[0]) != files {
            bail!("A has {} files", count_files(&roots[0]));
        }
        let grow = peak.saturating_sub(rss0) as f64 / 1024.0;
        println!("| {run} | {h_ms:.1} | {trash_s:.2} | {restore_s:.1} | {back_s:.1} | {grow:.0} |");
        hist.push(h_ms);
        trash.push(trash_s);
        rest.push(restore_s);
        back.push(back_s);
        mem.push(grow);
        // The next run's "before" is after this restore.
        wait_files(b, files as u64 + dirs_n, Duration::from_secs(600)).await?;
    }
    println!(
        "| median | {:.1} | {:.2} | {:.1} | {:.1} | {:.0} |",
        median(hist),
        median(trash),
        median(rest),
        median(back),
        median(mem)
    );
    Ok(())
}
