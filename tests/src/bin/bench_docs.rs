//! Document propagation benchmark: in-process nodes over the real swarm.
//!
//! For 2 and 8 nodes: latency from `put` on node 0 to the change being
//! applied on every other node (p50, p99, max over `--changes` sequential
//! changes), then sustained throughput with many puts in flight. Prints a
//! table. Run it through `scripts/bench/docs.sh`, which puts it in its own
//! network namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use shoal_node::{Event, Node};
use shoal_protocol::DocId;
use shoal_tests::{
    connect, flag_value, median, share_space, spawn_nodes, wait_converged, write_burst, TestNode,
};
use tokio::sync::Notify;

struct Arrivals {
    /// change hash -> (index, time applied on each receiver)
    seen: Mutex<HashMap<String, Vec<Instant>>>,
    notify: Notify,
}

fn watch(nodes: &[TestNode], arr: Arc<Arrivals>) {
    for t in nodes.iter().skip(1) {
        let mut rx = t.node.events();
        let arr = arr.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(Event::DocChanged { heads, .. }) => {
                        let now = Instant::now();
                        let mut seen = arr.seen.lock().unwrap_or_else(|e| e.into_inner());
                        for h in heads {
                            seen.entry(h).or_default().push(now);
                        }
                        drop(seen);
                        arr.notify.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(n: usize, changes: usize, burst: usize) -> Result<(Vec<f64>, f64)> {
    let nodes = spawn_nodes(n).await?;
    let a = nodes[0].node.clone();
    a.create_space("bench").await?;
    let others: Vec<&Node> = nodes.iter().skip(1).map(|t| &t.node).collect();
    share_space(&a, "bench", &others).await?;
    for (i, t) in nodes.iter().enumerate().skip(1) {
        connect(&t.node, &a).await?;
        if i > 1 {
            connect(&t.node, &nodes[i - 1].node).await?;
        }
    }
    let doc: DocId = "bench".parse()?;
    a.put("bench", &doc, "/warm", json!(0)).await?;
    let all: Vec<&Node> = nodes.iter().map(|t| &t.node).collect();
    wait_converged(&all, "bench", "bench").await?;
    // let gossipsub graft its mesh before measuring
    for i in 0..50 {
        a.put("bench", &doc, "/warm", json!(i)).await?;
    }
    wait_converged(&all, "bench", "bench").await?;

    let arr = Arc::new(Arrivals {
        seen: Mutex::new(HashMap::new()),
        notify: Notify::new(),
    });
    watch(&nodes, arr.clone());
    let receivers = n - 1;

    // Latency: one change at a time, until every receiver applied it.
    let mut lat = Vec::with_capacity(changes);
    for i in 0..changes {
        let t0 = Instant::now();
        let heads = a
            .put("bench", &doc, &format!("/k{}", i % 100), json!(i))
            .await?;
        let h = heads.first().context("no head")?.clone();
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = arr.notify.notified();
                if let Some(ts) = arr.seen.lock().unwrap_or_else(|e| e.into_inner()).get(&h) {
                    if ts.len() >= receivers {
                        return ts.iter().max().copied();
                    }
                }
                notified.await;
            }
        })
        .await
        .context("a change did not arrive within 10 s")?;
        if let Some(t) = done {
            lat.push(t.duration_since(t0).as_secs_f64() * 1000.0);
        }
    }

    // Throughput: `burst` changes, many in flight (group commit), until all
    // receivers have the last heads.
    let t0 = Instant::now();
    write_burst(&a, "bench", &doc, burst, 64).await?;
    wait_converged(&all, "bench", "bench").await?;
    let secs = t0.elapsed().as_secs_f64();
    for t in &nodes {
        t.stop().await;
    }
    lat.sort_by(|x, y| x.total_cmp(y));
    Ok((lat, burst as f64 / secs))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, d: usize| flag_value(&args, flag, d);
    let changes = get("--changes", 1000);
    let burst = get("--burst", 10_000);
    let runs = get("--runs", 3).max(1);
    println!(
        "shoal document propagation: {changes} sequential changes (latency) and {burst} \
         with 64 writers (throughput); median of {runs} runs"
    );
    println!("| nodes | p50 ms | p99 ms | max ms | changes/s | goal (2 nodes) |");
    println!("|------:|-------:|-------:|-------:|----------:|:---------------|");
    let sizes: Vec<usize> = match args.iter().position(|a| a == "--nodes") {
        Some(i) => args[i + 1..]
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect(),
        None => vec![2, 8],
    };
    for n in sizes {
        // Each configuration runs `--runs` times on fresh nodes; the table
        // shows the median of each figure (the machine is shared and noisy).
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut maxs = Vec::new();
        let mut rates = Vec::new();
        for _ in 0..runs {
            let (lat, rate) = run(n, changes, burst).await?;
            p50s.push(pct(&lat, 0.5));
            p99s.push(pct(&lat, 0.99));
            maxs.push(lat.last().copied().unwrap_or(f64::NAN));
            rates.push(rate);
        }
        let (p50, p99, max, rate) = (median(p50s), median(p99s), median(maxs), median(rates));
        let goal = if n == 2 {
            format!(
                "p50<5 {} p99<25 {} >=5000/s {}",
                ok(p50 < 5.0),
                ok(p99 < 25.0),
                ok(rate >= 5000.0)
            )
        } else {
            "-".into()
        };
        println!("| {n} | {p50:.2} | {p99:.2} | {max:.2} | {rate:.0} | {goal} |");
    }
    Ok(())
}

fn ok(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "MISSED"
    }
}
