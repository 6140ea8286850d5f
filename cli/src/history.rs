//! `shoal history`, `trash`, `restore`, `snapshot` and `snapshots`: the
//! running node's `/v1/spaces/{space}/...` history endpoints.

use anyhow::Result;
use clap::Args;
use serde_json::{json, Value};

use crate::client::Client;
use crate::{enc, human_bytes, print};

/// What `shoal restore` takes.
#[derive(Args)]
pub struct RestoreArgs {
    /// Space name or id.
    pub space: String,
    /// A file (a deleted one, or with --version), or with --at/--snapshot a
    /// folder (nothing: the whole folder).
    pub path: Option<String>,
    /// Version number from `shoal history`.
    #[arg(long)]
    pub version: Option<usize>,
    /// As it was at this time: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` (UTC),
    /// `@UNIX_SECONDS[.mmm]`, or `-30m`, `-2h`, `-1d` ago.
    #[arg(long, allow_hyphen_values = true)]
    pub at: Option<String>,
    /// As it was at this snapshot (`shoal snapshots`).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Put it here instead (a path, or a folder for a subtree).
    #[arg(long)]
    pub to: Option<String>,
    /// With --at/--snapshot: also delete files created since (they are
    /// kept as old versions). Without it they are left alone.
    #[arg(long)]
    pub remove_later: bool,
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn content_text(c: &str) -> &str {
    match c {
        "here" => "here",
        "kept" => "kept here",
        "local" => "on this device",
        "peer" => "on a peer",
        "gone" => "gone (no member has it)",
        "unknown" => "not here (no member online to ask)",
        _ => "",
    }
}

/// `shoal history SPACE PATH`.
pub async fn history(c: &Client, json_out: bool, space: &str, path: &str) -> Result<()> {
    let v = c
        .get(&format!(
            "/v1/spaces/{}/history?path={}",
            enc(space),
            enc(path)
        ))
        .await?;
    print(json_out, v.clone(), || {
        let versions = list(&v);
        if versions.is_empty() {
            return format!("{path}: no versions in {space}'s index");
        }
        let mut out = vec![format!(
            "{:>4}  {:<20}  {:<10}  {:>10}  {:<12}  content",
            "#", "time (UTC)", "device", "size", "hash"
        )];
        for x in versions {
            let device = x["device"].as_str().unwrap_or("");
            let short = &device[device.len().saturating_sub(8)..];
            let what = if x["deleted"].as_bool() == Some(true) {
                "deleted".to_string()
            } else if x["kind"].as_str() != Some("file") {
                x["kind"].as_str().unwrap_or("").to_string()
            } else {
                human_bytes(x["size"].as_u64().unwrap_or(0))
            };
            let hash = x["hash"].as_str().map_or("-", |h| &h[..h.len().min(12)]);
            out.push(format!(
                "{:>4}  {:<20}  …{:<9}  {:>10}  {:<12}  {}{}",
                x["version"].as_u64().unwrap_or(0),
                x["time"]
                    .as_str()
                    .unwrap_or("")
                    .replace('T', " ")
                    .trim_end_matches('Z'),
                short,
                what,
                hash,
                content_text(x["content"].as_str().unwrap_or("")),
                if x["current"].as_bool() == Some(true) {
                    "  (current)"
                } else {
                    ""
                }
            ));
        }
        out.join("\n")
    });
    Ok(())
}

/// `shoal trash SPACE`.
pub async fn trash(c: &Client, json_out: bool, space: &str) -> Result<()> {
    let v = c.get(&format!("/v1/spaces/{}/trash", enc(space))).await?;
    print(json_out, v.clone(), || {
        let items = list(&v);
        if items.is_empty() {
            return format!("nothing deleted in {space}");
        }
        let mut out: Vec<String> = items
            .iter()
            .map(|t| {
                let device = t["device"].as_str().unwrap_or("");
                format!(
                    "{}\n    deleted {} UTC by …{}, {}, {}",
                    t["path"].as_str().unwrap_or(""),
                    t["time"]
                        .as_str()
                        .unwrap_or("")
                        .replace('T', " ")
                        .trim_end_matches('Z'),
                    &device[device.len().saturating_sub(8)..],
                    human_bytes(t["size"].as_u64().unwrap_or(0)),
                    content_text(t["content"].as_str().unwrap_or(""))
                )
            })
            .collect();
        out.push(format!("restore one with `shoal restore {space} PATH`"));
        out.join("\n")
    });
    Ok(())
}

/// `shoal restore ...`.
pub async fn restore(c: &Client, json_out: bool, a: RestoreArgs) -> Result<()> {
    let body = json!({
        "path": a.path.clone().unwrap_or_default(),
        "version": a.version,
        "at": a.at,
        "snapshot": a.snapshot,
        "to": a.to,
        "remove_later": a.remove_later,
    });
    let v = c
        .post(&format!("/v1/spaces/{}/restore", enc(&a.space)), body)
        .await?;
    print(json_out, v.clone(), || {
        let names = |k: &str| -> Vec<String> {
            list(&v[k])
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        };
        let mut out = Vec::new();
        for p in names("restored") {
            out.push(format!("restored  {p}"));
        }
        for p in names("folders") {
            out.push(format!("made      {p}/"));
        }
        for p in names("removed") {
            out.push(format!(
                "removed   {p} (created since; kept as an old version)"
            ));
        }
        for p in names("left") {
            out.push(format!(
                "left      {p} (created since; --remove-later removes it)"
            ));
        }
        for f in list(&v["failed"]) {
            out.push(format!(
                "NOT restored  {}: {}",
                f["path"].as_str().unwrap_or(""),
                f["reason"].as_str().unwrap_or("")
            ));
        }
        let unchanged = v["unchanged"].as_u64().unwrap_or(0);
        if unchanged > 0 {
            out.push(format!("{unchanged} already as they were"));
        }
        if out.is_empty() {
            out.push("nothing to restore".into());
        }
        out.join("\n")
    });
    if !list(&v["failed"]).is_empty() {
        anyhow::bail!("some paths could not be restored (listed above)");
    }
    Ok(())
}

/// `shoal snapshot SPACE NAME`.
pub async fn snapshot(c: &Client, json_out: bool, space: &str, name: &str) -> Result<()> {
    let v = c
        .post(
            &format!("/v1/spaces/{}/snapshots", enc(space)),
            json!({ "name": name }),
        )
        .await?;
    print(json_out, v.clone(), || {
        format!(
            "snapshot {name:?} of {space} taken at {} (restore with `shoal restore {space} --snapshot {name:?}`)",
            v["time"].as_str().unwrap_or("")
        )
    });
    Ok(())
}

/// `shoal snapshots SPACE`.
pub async fn snapshots(c: &Client, json_out: bool, space: &str) -> Result<()> {
    let v = c
        .get(&format!("/v1/spaces/{}/snapshots", enc(space)))
        .await?;
    print(json_out, v.clone(), || {
        let items = list(&v);
        if items.is_empty() {
            return format!("no snapshots of {space} on this device");
        }
        items
            .iter()
            .map(|s| {
                format!(
                    "{}  {}",
                    s["time"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}
