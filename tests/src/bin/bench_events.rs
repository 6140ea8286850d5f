//! Event stream benchmark, through the real HTTP API (server-sent events).
//!
//! 1. Delivery: one node, `--burst` document writes from 64 writers, with
//!    1 and then 10 consumers on `GET /v1/events`. For each consumer, events
//!    received per second (first write to its last event) and events lost
//!    to lag; beside it the rate the node produced them.
//! 2. Overhead: two nodes, `--files` small files written into A's folder
//!    and synced to B, with 0 and then 10 consumers attached to B's stream.
//!    Seconds until B placed them all and the process's CPU seconds; the
//!    ratio to 0 consumers is the consumers' cost.
//!
//! Each figure is the median of `--runs` runs on fresh nodes. Run it through
//! `scripts/bench/events.sh`, which puts it in its own network namespace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use shoal_protocol::DocId;
use shoal_tests::{
    flag_value, folder_nodes, median, serve_api, spawn_nodes, write_burst, API_TOKEN,
};
use tokio::sync::Notify;

/// What one consumer saw.
#[derive(Default)]
struct Seen {
    events: AtomicU64,
    dropped: AtomicU64,
    /// Microseconds from the start to its last event.
    last_us: AtomicU64,
}

/// Attaches a consumer to `base`'s event stream; returns once the stream is
/// open. It counts until the stream ends, waking `wake` at each event.
async fn consume(
    base: &str,
    t0: Arc<std::sync::OnceLock<Instant>>,
    wake: Arc<Notify>,
) -> Result<Arc<Seen>> {
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/events"))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .error_for_status()?;
    let seen = Arc::new(Seen::default());
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut events = resp.bytes_stream().eventsource();
        while let Some(Ok(ev)) = events.next().await {
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                continue;
            };
            if v["type"] == "lagged" {
                s.dropped
                    .fetch_add(v["dropped"].as_u64().unwrap_or(0), Ordering::Relaxed);
            } else {
                s.events.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(t0) = t0.get() {
                s.last_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            wake.notify_waiters();
        }
    });
    Ok(seen)
}

/// This process's user+system CPU seconds so far (from /proc/self/stat).
fn cpu_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Waits until `cond` holds, checking it each time `wake` is woken, or
/// fails after `limit`.
async fn until(
    limit: Duration,
    what: &str,
    wake: &Notify,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        // Registered before the check, so no wake-up in between is lost.
        woken.as_mut().enable();
        if cond() {
            return Ok(());
        }
        if tokio::time::timeout_at(end, woken).await.is_err() {
            bail!("{what} did not happen within {} s", limit.as_secs());
        }
    }
}

/// Wakes `wake` at every event of `node` (its own, in-process stream).
fn wake_on_events(node: &shoal_node::Node, wake: Arc<Notify>) {
    let mut rx = node.events();
    tokio::spawn(async move {
        while let Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) = rx.recv().await
        {
            wake.notify_waiters();
        }
    });
}

struct Delivery {
    produced_per_s: f64,
    /// Per consumer: events per second, events dropped.
    consumers: Vec<(f64, u64)>,
}

async fn delivery(consumers: usize, burst: usize) -> Result<Delivery> {
    let nodes = spawn_nodes(1).await?;
    let a = nodes[0].node.clone();
    a.create_space("bench").await?;
    let (base, stop) = serve_api(&a).await?;
    let t0 = Arc::new(std::sync::OnceLock::new());
    let wake = Arc::new(Notify::new());
    let mut seen = Vec::new();
    for _ in 0..consumers {
        seen.push(consume(&base, Arc::clone(&t0), Arc::clone(&wake)).await?);
    }
    let doc: DocId = "bench".parse()?;
    a.put("bench", &doc, "/warm", json!(0)).await?;
    until(Duration::from_secs(10), "warm-up event", &wake, || {
        seen.iter().all(|s| s.events.load(Ordering::Relaxed) >= 1)
    })
    .await?;
    for s in &seen {
        s.events.store(0, Ordering::Relaxed);
    }
    let start = Instant::now();
    let _ = t0.set(start);
    write_burst(&a, "bench", &doc, burst, 64).await?;
    let produced_per_s = burst as f64 / start.elapsed().as_secs_f64();
    // every consumer has each event or was told it lost it
    until(
        Duration::from_secs(60),
        "delivery of every event",
        &wake,
        || {
            seen.iter().all(|s| {
                s.events.load(Ordering::Relaxed) + s.dropped.load(Ordering::Relaxed) >= burst as u64
            })
        },
    )
    .await?;
    let consumers = seen
        .iter()
        .map(|s| {
            let n = s.events.load(Ordering::Relaxed);
            let secs = s.last_us.load(Ordering::Relaxed) as f64 / 1e6;
            (n as f64 / secs, s.dropped.load(Ordering::Relaxed))
        })
        .collect();
    let _ = stop.send(());
    nodes[0].stop().await;
    Ok(Delivery {
        produced_per_s,
        consumers,
    })
}

struct Overhead {
    secs: f64,
    cpu: f64,
    /// Events each consumer received (median), and dropped (max).
    events: u64,
    dropped: u64,
}

async fn overhead(consumers: usize, files: usize) -> Result<Overhead> {
    let (nodes, roots, _dirs) = folder_nodes(2, "bench").await?;
    let b = &nodes[1].node;
    let (base, stop) = serve_api(b).await?;
    let t0 = Arc::new(std::sync::OnceLock::new());
    // B's own events (a placement is one) wake the wait for completion.
    let wake = Arc::new(Notify::new());
    wake_on_events(b, Arc::clone(&wake));
    let mut seen = Vec::new();
    for _ in 0..consumers {
        seen.push(consume(&base, Arc::clone(&t0), Arc::clone(&wake)).await?);
    }
    let placed = b.folder_counters();
    let placed0 = placed.files_placed.load(Ordering::Relaxed);
    let cpu0 = cpu_secs()?;
    let start = Instant::now();
    let _ = t0.set(start);
    for i in 0..files {
        let dir = roots[0].join(format!("d{:02}", i % 20));
        std::fs::create_dir_all(&dir)?;
        let mut body = vec![0u8; 4096];
        body[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::fs::write(dir.join(format!("f{i:05}")), body)?;
    }
    until(
        Duration::from_secs(300),
        "every file placed on B",
        &wake,
        || placed.files_placed.load(Ordering::Relaxed) - placed0 >= files as u64,
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs()? - cpu0;
    let mut counts: Vec<u64> = seen
        .iter()
        .map(|s| s.events.load(Ordering::Relaxed))
        .collect();
    counts.sort();
    let dropped = seen
        .iter()
        .map(|s| s.dropped.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let _ = stop.send(());
    for t in &nodes {
        t.stop().await;
    }
    Ok(Overhead {
        secs,
        cpu,
        events: counts.get(counts.len() / 2).copied().unwrap_or(0),
        dropped,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, d: usize| flag_value(&args, flag, d);
    let burst = get("--burst", 20_000);
    let files = get("--files", 2_000);
    let runs = get("--runs", 3).max(1);

    println!(
        "shoal event stream (SSE through the HTTP API): {burst} document writes by 64 writers; \
         median of {runs} runs"
    );
    println!(
        "| consumers | produced events/s | delivered events/s per consumer (min) | dropped (max) |"
    );
    println!(
        "|----------:|------------------:|--------------------------------------:|--------------:|"
    );
    for k in [1, 10] {
        let (mut prod, mut min_rate, mut drop) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let d = delivery(k, burst).await?;
            prod.push(d.produced_per_s);
            min_rate.push(
                d.consumers
                    .iter()
                    .map(|c| c.0)
                    .fold(f64::INFINITY, f64::min),
            );
            drop.push(d.consumers.iter().map(|c| c.1).max().unwrap_or(0) as f64);
        }
        println!(
            "| {k} | {:.0} | {:.0} | {:.0} |",
            median(prod),
            median(min_rate),
            median(drop)
        );
    }

    println!();
    println!(
        "busy sync: {files} files of 4 KiB written on A, placed on B; consumers on B's stream; \
         median of {runs} runs (alternating)"
    );
    println!("| consumers on B | seconds | ratio | CPU seconds (process) | ratio | events per consumer | dropped (max) |");
    println!("|---------------:|--------:|------:|----------------------:|------:|--------------------:|--------------:|");
    let mut by_k: Vec<(usize, Vec<Overhead>)> = vec![(0, Vec::new()), (10, Vec::new())];
    for _ in 0..runs {
        for (k, v) in by_k.iter_mut() {
            v.push(overhead(*k, files).await?);
        }
    }
    let mut base = (f64::NAN, f64::NAN);
    for (k, v) in &by_k {
        let secs = median(v.iter().map(|o| o.secs).collect());
        let cpu = median(v.iter().map(|o| o.cpu).collect());
        let events = median(v.iter().map(|o| o.events as f64).collect());
        let dropped = v.iter().map(|o| o.dropped).max().unwrap_or(0);
        if *k == 0 {
            base = (secs, cpu);
        }
        println!(
            "| {k} | {secs:.2} | {:.2}x | {cpu:.2} | {:.2}x | {events:.0} | {dropped} |",
            secs / base.0,
            cpu / base.1
        );
    }
    Ok(())
}
